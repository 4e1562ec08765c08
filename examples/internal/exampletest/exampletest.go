// Package exampletest runs the examples under test: it starts a real
// redis-server and an in-process qbridge server for them, runs an example's
// run function in the background, and lets the test wait for what it
// prints.
//
// Waits are driven by the output (every write wakes the waiters), never by
// sleeps, and each is bounded by Timeout so that a broken example fails its
// test instead of hanging it.
package exampletest

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// Timeout bounds every wait of these helpers: far above what anything
// should take, far below a hung test.
const Timeout = 15 * time.Second

// Env is a running qbridge stack: redis-server, a qbridge server on a
// loopback port, and a client of it for the test's own checks.
type Env struct {
	// Addr is the gRPC address of the qbridge server (pass it as -addr).
	Addr string
	// Client is a client of the server for the test's own checks.
	Client *client.Client
	// Redis is the redis-server process; RDB a client of its database 0.
	Redis *redistest.Server
	RDB   *redis.Client
}

// Start starts redis-server and a qbridge server, both torn down at test
// cleanup. (Processes started afterwards with Go are stopped first: cleanups
// run in reverse order.)
func Start(t *testing.T) *Env {
	t.Helper()
	rs := redistest.Start(t)
	rdb := redis.NewClient(rs.ServiceOptions(0))

	srv := server.New(broker.New(rdb),
		server.WithLogger(testLogger(t)),
		server.WithReapInterval(100*time.Millisecond),
		server.WithWaitSlice(time.Second),
	)
	srv.Start()

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	// Accept the client's keepalive pings (every 20s, also without streams).
	gs := grpc.NewServer(grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
		MinTime:             5 * time.Second,
		PermitWithoutStream: true,
	}))
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()

	c, err := client.Dial(lis.Addr().String())
	if err != nil {
		t.Fatalf("client.Dial: %v", err)
	}
	t.Cleanup(func() {
		_ = c.Close()
		srv.StopStreams()
		gs.Stop()
		if err := <-served; err != nil {
			t.Errorf("grpc Serve: %v", err)
		}
		srv.Close()
		_ = rdb.Close()
	})
	return &Env{Addr: lis.Addr().String(), Client: c, Redis: rs, RDB: rdb}
}

// testLogger sends the server's log to t.Log until the test is over (the
// server may log from goroutines that outlive it by a moment).
func testLogger(t *testing.T) *slog.Logger {
	w := &logWriter{t: t}
	t.Cleanup(w.stop) // registered first: runs after the stack is torn down
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type logWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log("server: " + strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *logWriter) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
}

// RunFunc is the signature of every example's run function.
type RunFunc func(ctx context.Context, args []string, stdout io.Writer) error

// Proc is an example's run function running in the background.
type Proc struct {
	name   string
	out    output
	cancel context.CancelFunc
	done   chan struct{} // closed when run returned
	err    error         // what run returned; valid once done is closed
}

// Go starts run(ctx, args, stdout) in the background, capturing stdout. At
// test cleanup the run is cancelled and waited for (and its error
// reported, if it is not nil).
func Go(t *testing.T, name string, run RunFunc, args ...string) *Proc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proc{name: name, cancel: cancel, done: make(chan struct{})}
	p.out.changed = make(chan struct{})
	go func() {
		defer close(p.done)
		p.err = run(ctx, args, &p.out)
	}()
	t.Cleanup(func() {
		if err := p.Stop(t); err != nil {
			t.Errorf("%s: run returned %v", name, err)
		}
	})
	return p
}

// Stop cancels the run's context and returns what run returned.
func (p *Proc) Stop(t *testing.T) error {
	t.Helper()
	p.cancel()
	return p.Wait(t)
}

// Wait waits for run to return by itself and returns its error.
func (p *Proc) Wait(t *testing.T) error {
	t.Helper()
	timer := time.NewTimer(Timeout)
	defer timer.Stop()
	select {
	case <-p.done:
		return p.err
	case <-timer.C:
		t.Fatalf("%s: run did not return within %v; its output:\n%s", p.name, Timeout, p.Output())
		return nil
	}
}

// Output returns everything the run printed so far.
func (p *Proc) Output() string {
	p.out.mu.Lock()
	defer p.out.mu.Unlock()
	return p.out.buf.String()
}

// Lines returns the lines the run printed so far that match re, each as
// its submatches (as regexp.FindStringSubmatch).
func (p *Proc) Lines(re *regexp.Regexp) [][]string {
	var out [][]string
	for _, line := range strings.Split(p.Output(), "\n") {
		if m := re.FindStringSubmatch(line); m != nil {
			out = append(out, m)
		}
	}
	return out
}

// WaitLine waits until the run has printed a line that matches re and
// returns the first such line's submatches.
func (p *Proc) WaitLine(t *testing.T, re *regexp.Regexp) []string {
	t.Helper()
	return p.WaitLines(t, re, 1)[0]
}

// WaitLines waits until the run has printed at least n lines that match re
// and returns all of them (submatches, as Lines). It fails the test if run
// returns or Timeout passes first.
func (p *Proc) WaitLines(t *testing.T, re *regexp.Regexp, n int) [][]string {
	t.Helper()
	timer := time.NewTimer(Timeout)
	defer timer.Stop()
	for {
		p.out.mu.Lock()
		changed := p.out.changed
		p.out.mu.Unlock()
		if lines := p.Lines(re); len(lines) >= n {
			return lines
		}
		select {
		case <-changed:
		case <-p.done:
			if lines := p.Lines(re); len(lines) >= n {
				return lines
			}
			t.Fatalf("%s: run returned (%v) after printing %d of %d lines matching %q; its output:\n%s",
				p.name, p.err, len(p.Lines(re)), n, re, p.Output())
		case <-timer.C:
			t.Fatalf("%s: %d of %d lines matching %q after %v; its output:\n%s",
				p.name, len(p.Lines(re)), n, re, Timeout, p.Output())
		}
	}
}

// output is a goroutine-safe buffer whose every write wakes the waiters.
type output struct {
	mu      sync.Mutex
	buf     strings.Builder
	changed chan struct{} // closed and replaced by every write
}

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(p)
	close(o.changed)
	o.changed = make(chan struct{})
	return len(p), nil
}

// Must fails the test with what when err is not nil.
func Must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// Ctx returns a context for the test's own calls, bounded by Timeout.
func Ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	t.Cleanup(cancel)
	return ctx
}

// Proxy forwards TCP connections to a target until Cut, which breaks them
// all at once, like a process that crashed or a network that failed.
type Proxy struct {
	// Addr is the proxy's address: dial it instead of the target.
	Addr string

	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

// StartProxy starts a proxy to target on a loopback port; it is cut at
// test cleanup.
func StartProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	p := &Proxy{Addr: ln.Addr().String(), ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Cut)
	return p
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		down, err := p.ln.Accept()
		if err != nil {
			return // Cut
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = down.Close()
			continue
		}
		if !p.track(down, up) {
			return
		}
		p.wg.Add(2)
		go p.pipe(up, down)
		go p.pipe(down, up)
	}
}

// track registers the connections, or closes them if the proxy was cut.
func (p *Proxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		for _, c := range conns {
			_ = c.Close()
		}
		return false
	}
	for _, c := range conns {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *Proxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	_, _ = io.Copy(dst, src)
	_ = dst.Close()
	_ = src.Close()
}

// Cut closes the proxy's listener and every connection through it, and
// waits for its goroutines. Later dials of Addr are refused.
func (p *Proxy) Cut() {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		_ = p.ln.Close()
		for c := range p.conns {
			_ = c.Close()
		}
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// HTTP is the HTTP client for tests to call the examples' web apps with. It
// uses a new connection per request and leaves none open, so an example's
// graceful HTTP shutdown never waits for a connection the test's client
// keeps (net/http's Shutdown waits up to 5s for a connection that was
// opened but never sent a request, which a pooling client may leave).
var HTTP = &http.Client{
	Timeout:   Timeout,
	Transport: &http.Transport{DisableKeepAlives: true},
}
