package main

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/internal/testcerts"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/auth"
	"github.com/qbridge/qbridge/server/broker"
)

// tokenNewRE matches the text output of `qbridge token new`.
var tokenNewRE = regexp.MustCompile(`\Atoken: (qbt_[A-Za-z0-9_-]+)\nhash: +(sha256:[0-9a-f]{64})\n\z`)

// newToken runs `qbridge token new` and returns the token and hash it
// printed, checking that the hash is the token's.
func newToken(t *testing.T, e *testEnv) (token, hash string) {
	t.Helper()
	r := e.mustRun(t, "", "token", "new")
	m := tokenNewRE.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("token new: output does not match %s:\n%v", tokenNewRE, r)
	}
	token, hash = m[1], m[2]
	if n := len(strings.TrimPrefix(token, "qbt_")); n < 43 {
		t.Errorf("token new: %d random characters after qbt_, want at least 43 (256 bits)", n)
	}
	if hash != auth.HashToken(token) {
		t.Errorf("token new: hash %s, but auth.HashToken(token) is %s", hash, auth.HashToken(token))
	}
	if r.stderr != "" {
		t.Errorf("token new: stderr %q, want nothing", r.stderr)
	}
	return token, hash
}

func TestTokenNew(t *testing.T) {
	t.Parallel()
	e := &testEnv{addr: "127.0.0.1:1"} // needs no server
	tok1, hash1 := newToken(t, e)
	tok2, hash2 := newToken(t, e)
	if tok1 == tok2 || hash1 == hash2 {
		t.Errorf("two runs of token new gave the same token %s / hash %s", tok1, hash1)
	}

	r := e.mustRun(t, "", "-o", "json", "token", "new")
	m := jsonOne(t, r.stdout)
	tok, _ := m["token"].(string)
	hash, _ := m["hash"].(string)
	if len(m) != 2 || !strings.HasPrefix(tok, "qbt_") || len(tok) < 4+43 || hash != auth.HashToken(tok) {
		t.Fatalf(`token new -o json: %v; want {"token": "qbt_...", "hash": auth.HashToken(token)}`, m)
	}
	if tok == tok1 || tok == tok2 {
		t.Errorf("token new -o json repeated an earlier token")
	}
	// The long form of -o.
	if m := jsonOne(t, e.mustRun(t, "", "token", "new", "--output=json").stdout); m["hash"] != auth.HashToken(m["token"].(string)) {
		t.Errorf("token new --output=json: %v", m)
	}

	wantExit(t, "token new with an argument", e.run(t, "", "token", "new", "extra"), exitUsage, "unknown command", "Run 'qbridge token new --help' for usage.")
	if r := e.mustRun(t, "", "token"); !strings.Contains(r.stdout, "token new") || !strings.Contains(r.stdout, "token hash") {
		t.Errorf("qbridge token without a subcommand: want help naming new and hash\n%v", r)
	}
}

func TestTokenHash(t *testing.T) {
	t.Parallel()
	e := &testEnv{addr: "127.0.0.1:1"} // needs no server
	const tok = "qbt_some-token_value"
	want := auth.HashToken(tok)
	for _, tc := range []struct{ name, stdin string }{
		{"without newline", tok},
		{"with newline", tok + "\n"},
		{"with CRLF", tok + "\r\n"},
		{"surrounding blanks", "  " + tok + " \n"},
		{"only the first line", tok + "\nsecond line\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.mustRun(t, tc.stdin, "token", "hash")
			if r.stdout != want+"\n" {
				t.Errorf("token hash of %q: %q, want %q", tc.stdin, r.stdout, want+"\n")
			}
		})
	}
	if m := jsonOne(t, e.mustRun(t, tok, "-o", "json", "token", "hash").stdout); len(m) != 1 || m["hash"] != want {
		t.Errorf(`token hash -o json: %v, want {"hash": %q}`, m, want)
	}
	// What token new prints, token hash reproduces.
	newTok, newHash := newToken(t, e)
	if r := e.mustRun(t, newTok, "token", "hash"); r.stdout != newHash+"\n" {
		t.Errorf("token hash of a new token: %q, want %q", r.stdout, newHash)
	}

	r := e.run(t, "", "token", "hash")
	wantExit(t, "token hash with empty stdin", r, exitUsage, "qbridge: no token on stdin")
	if r.stdout != "" {
		t.Errorf("token hash with empty stdin printed %q", r.stdout)
	}
	wantExit(t, "token hash of a blank line", e.run(t, " \n", "token", "hash"), exitUsage, "qbridge: the token on stdin is empty")
	wantExit(t, "token hash with an argument", e.run(t, tok, "token", "hash", tok), exitUsage, "unknown command")
}

// authEnv is a qbridge server on a real Redis with a TLS listener and the
// auth guard enforcing principals, as qbridged runs it with a --config
// file: the CLI's --token and --ca-file are checked against it.
type authEnv struct {
	*testEnv
	caFile string
}

// newAuthEnv starts the stack with these principals; it is torn down at
// test cleanup. Denials are logged into logs.
func newAuthEnv(t *testing.T, logs io.Writer, principals ...auth.Principal) *authEnv {
	t.Helper()
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "qbridge CLI test CA")
	serverCert := ca.Server(t, "qbridged")
	e := &authEnv{testEnv: &testEnv{}, caFile: ca.WriteCA(t, dir, "ca.pem")}

	rs := redistest.Start(t)
	svc := redis.NewClient(rs.ServiceOptions(0))
	t.Cleanup(func() { _ = svc.Close() })
	b := broker.New(svc)
	srv := server.New(b,
		server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithWaitSlice(time.Second),
	)
	srv.Start()
	guard, err := auth.New(auth.Config{Principals: principals, PublicHealth: true, MaxMessageBytes: 16 << 20},
		auth.WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatalf("auth.New: %v", err)
	}
	gs := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serverCert.TLS}, MinVersion: tls.VersionTLS12})),
		grpc.ChainUnaryInterceptor(guard.UnaryInterceptors()...),
		grpc.ChainStreamInterceptor(guard.StreamInterceptors()...),
	)
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
	t.Cleanup(func() {
		gs.Stop()
		<-served
		srv.Close()
	})
	return e
}

// TestTokenAgainstTLSServer: tokens made by `qbridge token new`, their
// hashes in principals, used by the CLI with --token (or QBRIDGE_TOKEN)
// and --ca-file against a TLS server that enforces them.
func TestTokenAgainstTLSServer(t *testing.T) {
	t.Parallel()
	noServer := &testEnv{addr: "127.0.0.1:1"}
	prodTok, prodHash := newToken(t, noServer)
	consTok, consHash := newToken(t, noServer)
	var logs tokenLogBuffer
	e := newAuthEnv(t, &logs,
		auth.Principal{Name: "orders-api", TokenHashes: []string{prodHash},
			Grants: []auth.Grant{{Queues: []string{"orders.*"}, Allow: []auth.Permission{auth.Produce}}}},
		auth.Principal{Name: "worker", TokenHashes: []string{consHash},
			Grants: []auth.Grant{{Queues: []string{"orders.*"}, Allow: []auth.Permission{auth.Consume}}}},
	)
	ca := "--ca-file=" + e.caFile

	if r := e.mustRun(t, "", ca, "--token", prodTok, "enqueue", "orders.eu", "first", "--id", "o-1"); r.stdout != "o-1\n" {
		t.Fatalf("enqueue as orders-api: %v", r)
	}
	if r := e.runEnv(t, []string{"QBRIDGE_TOKEN=" + prodTok, "QBRIDGE_CA_FILE=" + e.caFile}, "", "enqueue", "orders.eu", "second", "--id", "o-2"); r.code != 0 || r.stdout != "o-2\n" {
		t.Fatalf("enqueue with QBRIDGE_TOKEN and QBRIDGE_CA_FILE: %v", r)
	}
	wantExit(t, "enqueue to a queue not granted", e.run(t, "", ca, "--token", prodTok, "enqueue", "billing", "x"),
		exitServer, "qbridge: PermissionDenied: ", `principal "orders-api"`)
	wantExit(t, "enqueue by the consumer", e.run(t, "", ca, "--token", consTok, "enqueue", "orders.eu", "x"),
		exitServer, "qbridge: PermissionDenied: ", `principal "worker"`)

	r := e.mustRun(t, "", ca, "--token", consTok, "consume", "orders.eu", "--count", "2", "--timeout", "10s")
	if !strings.Contains(r.stdout, "first") || !strings.Contains(r.stdout, "second") {
		t.Fatalf("consume as worker: want both messages\n%v", r)
	}
	wantExit(t, "consume by the producer", e.run(t, "", ca, "--token", prodTok, "consume", "orders.eu", "--count", "1", "--timeout", "5s"),
		exitServer, "qbridge: PermissionDenied: ", `principal "orders-api"`)

	wantExit(t, "no token", e.run(t, "", ca, "enqueue", "orders.eu", "x"), exitServer, "qbridge: Unauthenticated: ", "Bearer")
	wantExit(t, "a token's hash as the token", e.run(t, "", ca, "--token", prodHash, "enqueue", "orders.eu", "x"),
		exitServer, "qbridge: Unauthenticated: ")
	wantExit(t, "token without the CA", e.run(t, "", "--tls", "--token", prodTok, "enqueue", "orders.eu", "x"),
		exitUnavailable, "certificate")
	wantExit(t, "token over plaintext to the TLS server", e.run(t, "", "--token", prodTok, "enqueue", "orders.eu", "x"),
		exitUnavailable, "cannot connect to")

	if l := logs.String(); !strings.Contains(l, "principal=orders-api") || strings.Contains(l, prodTok) || strings.Contains(l, consTok) {
		t.Errorf("server log: want principal=orders-api and no token\n%s", l)
	}
}

// tokenLogBuffer is a strings.Builder safe for concurrent writers.
type tokenLogBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (w *tokenLogBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *tokenLogBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}
