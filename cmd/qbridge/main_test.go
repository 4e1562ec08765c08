package main

// The tests run the real qbridge binary, built once in TestMain, as a
// subprocess against a live qbridge server (in this process) on a real
// redis-server. Text output is compared with golden files in testdata/
// (go test -run ... -update rewrites them), JSON output is parsed.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

const (
	// waitTimeout bounds every wait for output or an exit.
	waitTimeout = 15 * time.Second
	// runTimeout bounds one foreground run of the binary.
	runTimeout = 30 * time.Second
)

// binPath is the qbridge binary TestMain built.
var binPath string

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "qbridge-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binPath = filepath.Join(dir, "qbridge")
	goTool, err := exec.LookPath("go")
	if err != nil {
		fmt.Fprintf(os.Stderr, "no go tool in PATH to build qbridge: %v\n", err)
		os.Exit(1)
	}
	build := exec.Command(goTool, "build", "-o", binPath, ".")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// testEnv is a live qbridge stack: redis-server, broker, server and a gRPC
// server on 127.0.0.1, plus a Go client for setting up and checking.
type testEnv struct {
	addr string
	c    *client.Client

	mu    sync.Mutex
	calls []call // every RPC the server received
}

// call is one RPC as the server saw it.
type call struct {
	method string // e.g. "EnqueueBatch"
	auth   string // its authorization metadata
}

type envConfig struct {
	tlsCert *tls.Certificate
	// clientCAs, when set with tlsCert, makes the server require client
	// certificates signed by them (mutual TLS).
	clientCAs *x509.CertPool
}

type envOption func(*envConfig)

func withTLS(cert tls.Certificate) envOption { return func(c *envConfig) { c.tlsCert = &cert } }

func withMutualTLS(cert tls.Certificate, clientCAs *x509.CertPool) envOption {
	return func(c *envConfig) { c.tlsCert, c.clientCAs = &cert, clientCAs }
}

// newEnv starts the stack; it is torn down at test cleanup. Retries back
// off for 20-50ms, so that tests of retries need not wait long.
func newEnv(t *testing.T, opts ...envOption) *testEnv {
	t.Helper()
	var cfg envConfig
	for _, o := range opts {
		o(&cfg)
	}
	rs := redistest.Start(t)
	rdb := redis.NewClient(rs.ServiceOptions(0)) // the least-privilege ACL user
	t.Cleanup(func() { _ = rdb.Close() })
	b := broker.New(rdb, broker.WithDefaults(broker.Policy{
		MaxAttempts: 25, BackoffMin: 20 * time.Millisecond, BackoffMax: 50 * time.Millisecond, DedupWindow: 10 * time.Minute,
	}))
	srv := server.New(b,
		server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithReapInterval(100*time.Millisecond),
		server.WithWaitSlice(time.Second),
	)
	srv.Start()
	e := &testEnv{}
	record := func(ctx context.Context, method string) {
		md, _ := metadata.FromIncomingContext(ctx)
		c := call{method: method[strings.LastIndex(method, "/")+1:]}
		if v := md.Get("authorization"); len(v) > 0 {
			c.auth = v[0]
		}
		e.mu.Lock()
		e.calls = append(e.calls, c)
		e.mu.Unlock()
	}
	gopts := []grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			record(ctx, info.FullMethod)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			record(ss.Context(), info.FullMethod)
			return h(srv, ss)
		}),
	}
	if cfg.tlsCert != nil {
		tc := &tls.Config{Certificates: []tls.Certificate{*cfg.tlsCert}, MinVersion: tls.VersionTLS12}
		if cfg.clientCAs != nil {
			tc.ClientCAs, tc.ClientAuth = cfg.clientCAs, tls.RequireAndVerifyClientCert
		}
		gopts = append(gopts, grpc.Creds(credentials.NewTLS(tc)))
	}
	gs := grpc.NewServer(gopts...)
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	e.addr = lis.Addr().String()
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = gs.Serve(lis)
	}()
	if cfg.tlsCert == nil {
		if e.c, err = client.Dial(e.addr); err != nil {
			t.Fatalf("Dial: %v", err)
		}
	}
	t.Cleanup(func() {
		if e.c != nil {
			_ = e.c.Close()
		}
		gs.Stop()
		<-served
		srv.Close()
	})
	return e
}

// methodCalls returns how many calls of method the server received.
func (e *testEnv) methodCalls(method string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, c := range e.calls {
		if c.method == method {
			n++
		}
	}
	return n
}

// env is the environment of the binary: the test's, without QBRIDGE_*
// variables, plus QBRIDGE_ADDR and extra.
func (e *testEnv) env(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "QBRIDGE_") {
			out = append(out, kv)
		}
	}
	return append(append(out, "QBRIDGE_ADDR="+e.addr), extra...)
}

// result is what one run of the binary did.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// run runs the binary with args and stdin (a pipe), and waits for it.
func (e *testEnv) run(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	return e.runEnv(t, nil, stdin, args...)
}

// runEnv is run with extra environment variables.
func (e *testEnv) runEnv(t *testing.T, extraEnv []string, stdin string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), runTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, args...)
	cmd.Env = e.env(extraEnv...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run qbridge %s: %v", strings.Join(args, " "), err)
	}
	if ctx.Err() != nil {
		t.Fatalf("qbridge %s did not finish within %v:\n%v", strings.Join(args, " "), runTimeout, r)
	}
	return r
}

// mustRun runs the binary and fails the test unless it exits 0.
func (e *testEnv) mustRun(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	r := e.run(t, stdin, args...)
	if r.code != 0 {
		t.Fatalf("qbridge %s: %v", strings.Join(args, " "), r)
	}
	return r
}

// wantExit fails the test unless r exited with code and its stderr is one
// line containing each of msgs.
func wantExit(t *testing.T, what string, r result, code int, msgs ...string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("%s: got exit %d, want %d\n%v", what, r.code, code, r)
	}
	for _, m := range msgs {
		if !strings.Contains(r.stderr, m) {
			t.Fatalf("%s: stderr does not contain %q\n%v", what, m, r)
		}
	}
}

// --- background processes ---

// proc is the binary running in the background.
type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *watchBuffer
	stderr *watchBuffer
	done   chan struct{}
	code   int
}

// start runs the binary in the background with a stdin pipe the test
// writes to. Cleanup kills it (by PID) if it still runs.
func (e *testEnv) start(t *testing.T, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, stdout: newWatchBuffer(), stderr: newWatchBuffer(), done: make(chan struct{})}
	p.cmd = exec.Command(binPath, args...)
	p.cmd.Env = e.env()
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start qbridge: %v", err)
	}
	go func() {
		err := p.cmd.Wait()
		p.code = 0
		if ee, ok := err.(*exec.ExitError); ok {
			p.code = ee.ExitCode()
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// waitOut waits until stdout matches re and returns the match.
func (p *proc) waitOut(re string) []string { p.t.Helper(); return p.stdout.wait(p.t, "stdout", re) }

// waitErr waits until stderr matches re and returns the match.
func (p *proc) waitErr(re string) []string { p.t.Helper(); return p.stderr.wait(p.t, "stderr", re) }

// signal sends sig to the process.
func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal %v: %v", sig, err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait() int {
	p.t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(waitTimeout):
		p.t.Fatalf("qbridge did not exit within %v\nstdout:\n%s\nstderr:\n%s", waitTimeout, p.stdout, p.stderr)
		return -1
	}
}

// watchBuffer collects output and lets tests wait for a pattern in it.
type watchBuffer struct {
	mu      sync.Mutex
	b       bytes.Buffer
	changed chan struct{} // closed and replaced on each write
}

func newWatchBuffer() *watchBuffer { return &watchBuffer{changed: make(chan struct{})} }

func (w *watchBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b.Write(p)
	close(w.changed)
	w.changed = make(chan struct{})
	return len(p), nil
}

func (w *watchBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// wait blocks until the output matches re (no polling: it is woken by
// writes), failing the test after waitTimeout.
func (w *watchBuffer) wait(t *testing.T, what, re string) []string {
	t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		w.mu.Lock()
		m := rx.FindStringSubmatch(w.b.String())
		ch := w.changed
		w.mu.Unlock()
		if m != nil {
			return m
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("%s did not match %q within %v:\n%s", what, re, waitTimeout, w)
		}
	}
}

// --- golden files ---

var (
	uuidRE  = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)
	timeRE  = regexp.MustCompile(`\d{4}-\d\d-\d\d \d\d:\d\d:\d\d`)
	clockRE = regexp.MustCompile(`\b\d\d:\d\d:\d\d(\.\d{3})?\b`)
	// rateRE matches rates (one decimal) and ageRE ages of stats output.
	rateRE = regexp.MustCompile(`\b\d+\.\d\b`)
	ageRE  = regexp.MustCompile(`\b\d+(\.\d+)?(µs|ms|s|m|h)\b`)
)

// normalize replaces what changes from run to run: each distinct UUID by
// <ID1>, <ID2>, ... in order of appearance, local times by <TIME>, clock
// times by <CLOCK>, and the given extra patterns (regexp, placeholder
// pairs) by their placeholder. Placeholders are padded to the width of what
// they replace, so that tables stay aligned.
func normalize(s string, extra ...any) string {
	ids := map[string]string{}
	s = uuidRE.ReplaceAllStringFunc(s, func(id string) string {
		if _, ok := ids[id]; !ok {
			ids[id] = "<ID" + strconv.Itoa(len(ids)+1) + ">"
		}
		return pad(ids[id], id)
	})
	s = replacePadded(s, timeRE, "<TIME>")
	s = replacePadded(s, clockRE, "<CLOCK>")
	for i := 0; i+1 < len(extra); i += 2 {
		s = replacePadded(s, extra[i].(*regexp.Regexp), extra[i+1].(string))
	}
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, " ")
	}
	return strings.Join(lines, "\n")
}

func replacePadded(s string, re *regexp.Regexp, placeholder string) string {
	return re.ReplaceAllStringFunc(s, func(m string) string { return pad(placeholder, m) })
}

// pad pads placeholder with spaces to the width of orig.
func pad(placeholder, orig string) string {
	if n := utf8.RuneCountInString(orig) - len(placeholder); n > 0 {
		return placeholder + strings.Repeat(" ", n)
	}
	return placeholder
}

// collapse makes column alignment irrelevant: runs of spaces become one.
func collapse(s string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		lines[i] = strings.Join(strings.Fields(l), " ")
	}
	return strings.Join(lines, "\n")
}

// golden compares got (already normalised) with testdata/<name>.golden,
// ignoring column alignment, or rewrites the file with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if collapse(got) != collapse(string(want)) {
		t.Errorf("%s differs (go test -run '%s' -update rewrites it)\n--- got:\n%s\n--- want:\n%s", path, t.Name(), got, want)
	}
}

// --- JSON ---

// jsonLines parses one JSON object per line.
func jsonLines(t *testing.T, s string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("not a JSON object: %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

// jsonOne parses exactly one JSON object.
func jsonOne(t *testing.T, s string) map[string]any {
	t.Helper()
	ms := jsonLines(t, s)
	if len(ms) != 1 {
		t.Fatalf("want one JSON object, got %d in %q", len(ms), s)
	}
	return ms[0]
}

// stats returns the queue's stats as the JSON output of qbridge stats.
func (e *testEnv) stats(t *testing.T, queue string) map[string]any {
	t.Helper()
	return jsonOne(t, e.mustRun(t, "", "-o", "json", "stats", queue).stdout)
}

// wantCounts checks ready, in_flight, delayed and dead of a queue.
func (e *testEnv) wantCounts(t *testing.T, queue string, ready, inFlight, delayed, dead int) {
	t.Helper()
	s := e.stats(t, queue)
	got := [4]float64{s["ready"].(float64), s["in_flight"].(float64), s["delayed"].(float64), s["dead"].(float64)}
	want := [4]float64{float64(ready), float64(inFlight), float64(delayed), float64(dead)}
	if got != want {
		t.Fatalf("%s: ready, in flight, delayed, dead = %v; want %v", queue, got, want)
	}
}

// waitCounts waits until the queue has these ready and in-flight counts,
// for what the server does after a client is gone (a stream that ends puts
// what it held back on the queue, asynchronously). It asks the server each
// 10ms, failing the test after waitTimeout.
func (e *testEnv) waitCounts(t *testing.T, queue string, ready, inFlight int64) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		r, f, err := e.c.QueueStats(testCtx(t), queue)
		if err == nil && r == ready && f == inFlight {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: ready %d, in flight %d (%v); want %d, %d", queue, r, f, err, ready, inFlight)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testCtx is a context for the test's own client calls.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}
