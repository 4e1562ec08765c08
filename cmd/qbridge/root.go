package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
)

// app is one invocation of qbridge: its streams, environment, global
// options and (once a command needs it) its connection.
type app struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string

	// Global options (flags, else environment variables, else defaults).
	addr     string
	useTLS   bool
	caFile   string
	certFile string
	keyFile  string
	token    string
	output   string
	timeout  time.Duration

	out *printer
	c   *client.Client

	// Serialise writes of concurrent --exec commands and log lines.
	stdoutMu, stderrMu sync.Mutex
}

// globalEnv maps each global flag to its environment variable.
var globalEnv = []struct{ flag, env string }{
	{"addr", "QBRIDGE_ADDR"},
	{"tls", "QBRIDGE_TLS"},
	{"ca-file", "QBRIDGE_CA_FILE"},
	{"cert-file", "QBRIDGE_CERT_FILE"},
	{"key-file", "QBRIDGE_KEY_FILE"},
	{"token", "QBRIDGE_TOKEN"},
	{"output", "QBRIDGE_OUTPUT"},
	{"timeout", "QBRIDGE_TIMEOUT"},
}

const rootLong = `qbridge talks to a qbridged server: it enqueues and consumes messages of
work queues, publishes and subscribes to pub/sub channels, and lets operators
inspect and steer queues (stats, peek, purge, pause, dead letters, config).

Output is text for people, or with --output json one JSON object per line
(for jq). Payloads are shown as text when they are valid UTF-8, else as
base64; JSON has "payload" (the text, or null) and "payload_base64".

Global options can also be set in the environment; a flag wins:
  --addr       QBRIDGE_ADDR       server address (default 127.0.0.1:7070)
  --tls        QBRIDGE_TLS        use TLS (true/false)
  --ca-file    QBRIDGE_CA_FILE    CA certificate(s) to verify the server (PEM; implies --tls)
  --cert-file  QBRIDGE_CERT_FILE  client certificate for mutual TLS (PEM; implies --tls)
  --key-file   QBRIDGE_KEY_FILE   its private key (PEM)
  --token      QBRIDGE_TOKEN      sent as "authorization: Bearer <token>"
  --output     QBRIDGE_OUTPUT     text or json
  --timeout    QBRIDGE_TIMEOUT    deadline of each unary call (0: none)

` + exitCodesHelp

const rootExample = `  qbridge enqueue jobs 'hello'                 # prints the new message's id
  seq 1000 | qbridge enqueue jobs              # one message per line, in batches
  qbridge consume jobs --count 1 --timeout 60s # wait at most 60s for one message
  qbridge consume jobs --exec ./handle.sh      # run a command per message
  qbridge -o json stats | jq .ready
  qbridge stats --watch                        # live table of every queue`

// run is qbridge's main: it runs the command args asks for and returns the
// process exit code. Everything it needs from the process comes in as
// arguments, so that it can be tested.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	a := &app{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr, getenv: getenv}
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if a.c != nil {
		_ = a.c.Close()
	}
	return a.exit(cmd, err)
}

// exit prints what err says (one line on stderr) and returns the exit code.
func (a *app) exit(cmd *cobra.Command, err error) int {
	if err == nil {
		return exitOK
	}
	if a.ctx.Err() != nil {
		// Interrupted: whatever failed, failed because of it.
		return exitInterrupted
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.msg != "" {
			fmt.Fprintf(a.stderr, "qbridge: %s\n", oneLine(ee.msg))
		}
		return ee.code
	}
	var ue *usageError
	if errors.As(err, &ue) || !isStatus(err) {
		// Cobra's own errors: unknown command or flag, wrong arguments.
		fmt.Fprintf(a.stderr, "qbridge: %s\n", oneLine(err.Error()))
		path := "qbridge"
		if cmd != nil {
			path = cmd.CommandPath()
		}
		fmt.Fprintf(a.stderr, "Run '%s --help' for usage.\n", path)
		return exitUsage
	}
	line, code := statusLine(err, a.addr)
	fmt.Fprintf(a.stderr, "qbridge: %s\n", line)
	return code
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:               "qbridge",
		Short:             "Command-line client of qbridge, message queues on Redis over gRPC",
		Long:              rootLong,
		Example:           rootExample,
		SilenceErrors:     true,
		SilenceUsage:      true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error { return a.setup(cmd) },
		// Without a subcommand: help, and a usage error when args were
		// given (cobra reports unknown commands itself).
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cmd.Help()
		},
	}
	pf := root.PersistentFlags()
	pf.StringVar(&a.addr, "addr", "127.0.0.1:7070", "qbridged address (host:port, or any gRPC target) [QBRIDGE_ADDR]")
	pf.BoolVar(&a.useTLS, "tls", false, "connect with TLS, verifying the server with the system's CAs or --ca-file [QBRIDGE_TLS]")
	pf.StringVar(&a.caFile, "ca-file", "", "PEM file of the CA certificates that verify the server; implies --tls [QBRIDGE_CA_FILE]")
	pf.StringVar(&a.certFile, "cert-file", "", "PEM client certificate for mutual TLS, with --key-file; implies --tls [QBRIDGE_CERT_FILE]")
	pf.StringVar(&a.keyFile, "key-file", "", "PEM private key of --cert-file [QBRIDGE_KEY_FILE]")
	pf.StringVar(&a.token, "token", "", `token sent with every call as "authorization: Bearer <token>" [QBRIDGE_TOKEN]`)
	pf.StringVarP(&a.output, "output", "o", "text", "output format: text or json (one object per line) [QBRIDGE_OUTPUT]")
	pf.DurationVar(&a.timeout, "timeout", 10*time.Second, "deadline of each unary call, e.g. 5s; 0 means none [QBRIDGE_TIMEOUT]")

	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err} })
	root.AddGroup(
		&cobra.Group{ID: "queue", Title: "Work queues:"},
		&cobra.Group{ID: "pubsub", Title: "Pub/sub:"},
		&cobra.Group{ID: "admin", Title: "Inspecting and administering queues:"},
		&cobra.Group{ID: "security", Title: "Security:"},
	)
	for _, c := range []*cobra.Command{a.enqueueCmd(), a.consumeCmd(), a.resultCmd(), a.messageCmd()} {
		c.GroupID = "queue"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{a.publishCmd(), a.subscribeCmd()} {
		c.GroupID = "pubsub"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{a.statsCmd(), a.queuesCmd(), a.peekCmd(), a.purgeCmd(), a.pauseCmd(), a.resumeCmd(), a.deadCmd(), a.configCmd()} {
		c.GroupID = "admin"
		root.AddCommand(c)
	}
	tok := a.tokenCmd()
	tok.GroupID = "security"
	root.AddCommand(tok)
	return root
}

// setup applies the environment to the global flags not given on the
// command line and checks them. It runs before every command.
func (a *app) setup(cmd *cobra.Command) error {
	if err := a.applyEnv(cmd); err != nil {
		return err
	}
	switch a.output {
	case "text", "json":
	default:
		return usageErrorf("--output %q: use text or json", a.output)
	}
	if a.timeout < 0 {
		return usageErrorf("--timeout %v: must not be negative", a.timeout)
	}
	a.out = newPrinter(a.stdout, a.output == "json")
	return nil
}

// applyEnv sets each global flag that was not given from its environment
// variable, if that is set.
func (a *app) applyEnv(cmd *cobra.Command) error {
	for _, g := range globalEnv {
		f := lookupGlobal(cmd, g.flag)
		if f == nil || f.Changed {
			continue
		}
		v := a.getenv(g.env)
		if v == "" {
			continue
		}
		if err := f.Value.Set(v); err != nil {
			return usageErrorf("%s=%q: %v", g.env, v, err)
		}
	}
	return nil
}

// lookupGlobal returns the root's persistent flag name. Subcommands share
// the same *pflag.Flag, so Changed tells whether it was given anywhere on
// the command line (except where a local flag of the same name shadows it:
// consume's --timeout).
func lookupGlobal(cmd *cobra.Command, name string) *pflag.Flag {
	return cmd.Root().PersistentFlags().Lookup(name)
}

// isStatus reports whether err carries a gRPC status.
func isStatus(err error) bool {
	_, ok := status.FromError(err)
	return ok
}

// rpcCtx returns the context of one unary call: the global --timeout.
func (a *app) rpcCtx() (context.Context, context.CancelFunc) {
	return a.timeoutCtx(a.ctx, 0)
}

// timeoutCtx returns parent with the global --timeout plus extra as its
// deadline (none when --timeout is 0).
func (a *app) timeoutCtx(parent context.Context, extra time.Duration) (context.Context, context.CancelFunc) {
	if a.timeout <= 0 {
		return context.WithCancel(parent)
	}
	return context.WithTimeout(parent, a.timeout+extra)
}

// isTTY reports whether f is a terminal (false for anything but an
// *os.File).
func isTTY(f any) bool {
	file, ok := f.(*os.File)
	return ok && isTerminal(file)
}
