package client_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

const (
	// waitTimeout bounds every wait of the tests (polling and blocking
	// calls): far above what anything should take, far below a hung test.
	waitTimeout  = 10 * time.Second
	pollInterval = 10 * time.Millisecond
)

// testEnv is a real qbridge stack: redis-server, broker, server, a gRPC
// server on 127.0.0.1, and a Client dialled to it.
type testEnv struct {
	redis *redistest.Server
	rdb   *redis.Client   // the default user, for the tests' own checks
	svcs  []*redis.Client // the services' clients (least-privilege ACL user), closed at cleanup
	srv   *server.Server
	gs    *grpc.Server
	addr  string
	c     *client.Client

	log    *slog.Logger
	served chan error // what the current gs.Serve returned
}

// newEnv starts the stack; everything is torn down at test cleanup.
// dialOpts are passed to client.Dial.
func newEnv(t *testing.T, dialOpts ...client.Option) *testEnv {
	t.Helper()
	e := &testEnv{redis: redistest.Start(t)}
	e.rdb = e.redis.Client(t, 0)
	e.log = testLogger(t)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	e.addr = lis.Addr().String()
	e.serve(lis)

	e.c, err = client.Dial(e.addr, dialOpts...)
	if err != nil {
		t.Fatalf("Dial(%s): %v", e.addr, err)
	}
	t.Cleanup(func() {
		_ = e.c.Close() // may have been closed by the test already
		e.stopServer(t)
		for _, c := range e.svcs {
			_ = c.Close()
		}
	})
	return e
}

// serve starts a qbridge server and a gRPC server for it on lis.
func (e *testEnv) serve(lis net.Listener) {
	svc := redis.NewClient(e.redis.ServiceOptions(0))
	e.svcs = append(e.svcs, svc)
	e.srv = server.New(broker.New(svc),
		server.WithLogger(e.log),
		server.WithReapInterval(100*time.Millisecond),
		server.WithWaitSlice(time.Second),
	)
	e.srv.Start()
	// Accept the client's keepalive pings (every 20s, also without streams).
	e.gs = grpc.NewServer(grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
		MinTime:             10 * time.Second,
		PermitWithoutStream: true,
	}))
	qbridgev1.RegisterQueueServiceServer(e.gs, e.srv)
	qbridgev1.RegisterAdminServiceServer(e.gs, e.srv.Admin())
	served := make(chan error, 1)
	e.served = served
	gs := e.gs
	go func() { served <- gs.Serve(lis) }()
}

// stopServer stops the gRPC server at once (every stream ends) and then
// the qbridge server.
func (e *testEnv) stopServer(t *testing.T) {
	e.gs.Stop()
	if err := <-e.served; err != nil {
		t.Errorf("grpc Serve: %v", err)
	}
	e.served <- nil // a later stopServer of the same server does not block
	e.srv.Close()
}

// restartServer stops the servers as a crash-free restart of qbridged
// would (streams end, the unacked deliveries they held go back to their
// queues) and starts new ones on the same address, over the same Redis.
// Clients reconnect by themselves.
func (e *testEnv) restartServer(t *testing.T) {
	t.Helper()
	e.stopServer(t)
	var lis net.Listener
	eventually(t, func() (bool, string) {
		var err error
		lis, err = net.Listen("tcp", e.addr)
		return err == nil, fmt.Sprintf("listen on %s again: %v", e.addr, err)
	})
	e.serve(lis)
}

// testLogger sends the server's log to t.Log until the test is over (the
// server may log from goroutines that outlive it by a moment).
func testLogger(t *testing.T) *slog.Logger {
	w := &testLogWriter{t: t}
	t.Cleanup(w.stop) // registered first: runs after the stack is torn down
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testLogWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log("server: " + strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testLogWriter) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
}

// testCtx is the context of one test, with a generous deadline.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it reports true, failing the test with cond's
// last description after waitTimeout.
func eventually(t *testing.T, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		ok, desc := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v: %s", waitTimeout, desc)
		}
		<-tick.C
	}
}

// wantStats asserts the queue's stats now.
func wantStats(t *testing.T, ctx context.Context, c *client.Client, queue string, ready, inFlight int64) {
	t.Helper()
	r, f, err := c.QueueStats(ctx, queue)
	if err != nil {
		t.Fatalf("QueueStats(%q): %v", queue, err)
	}
	if r != ready || f != inFlight {
		t.Fatalf("QueueStats(%q) = ready %d, in flight %d; want %d, %d", queue, r, f, ready, inFlight)
	}
}

// waitStats polls until the queue's stats are as given.
func waitStats(t *testing.T, ctx context.Context, c *client.Client, queue string, ready, inFlight int64) {
	t.Helper()
	eventually(t, func() (bool, string) {
		r, f, err := c.QueueStats(ctx, queue)
		if err != nil {
			return false, fmt.Sprintf("QueueStats(%q): %v", queue, err)
		}
		return r == ready && f == inFlight,
			fmt.Sprintf("QueueStats(%q) = ready %d, in flight %d; want %d, %d", queue, r, f, ready, inFlight)
	})
}

// within runs f and returns what it returns, failing the test if it takes
// longer than waitTimeout (instead of hanging the test binary).
func within[T any](t *testing.T, what string, f func() (T, error)) (T, error) {
	t.Helper()
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-timer.C:
		t.Fatalf("%s did not return within %v", what, waitTimeout)
		panic("unreachable")
	}
}

// next returns the consumer's next delivery, failing the test on error or
// timeout.
func next(t *testing.T, cs *client.Consumer) *client.Delivery {
	t.Helper()
	d, err := within(t, "Consumer.Next", cs.Next)
	if err != nil {
		t.Fatalf("Consumer.Next: %v", err)
	}
	return d
}

// nextMsg returns the subscription's next message, failing the test on
// error or timeout.
func nextMsg(t *testing.T, s *client.Subscription) *client.PubSubMessage {
	t.Helper()
	m, err := within(t, "Subscription.Next", s.Next)
	if err != nil {
		t.Fatalf("Subscription.Next: %v", err)
	}
	return m
}

// consume opens a Consumer that is closed at test cleanup.
func consume(t *testing.T, ctx context.Context, c *client.Client, queue string, opts ...client.ConsumeOption) *client.Consumer {
	t.Helper()
	cs, err := c.Consume(ctx, queue, opts...)
	if err != nil {
		t.Fatalf("Consume(%q): %v", queue, err)
	}
	t.Cleanup(func() { _ = cs.Close() })
	return cs
}

// wantCode asserts that err carries the gRPC code want.
func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: got no error, want %v", what, want)
	}
	if got := status.Code(err); got != want {
		t.Fatalf("%s: got code %v (%v), want %v", what, got, err, want)
	}
}

// wantClosed asserts that err is what Next returns after the stream's
// context ended with cause (context.Canceled or context.DeadlineExceeded).
func wantClosed(t *testing.T, what string, err error, cause error) {
	t.Helper()
	if !errors.Is(err, cause) {
		t.Errorf("%s: got %v; want an error wrapping %v", what, err, cause)
	}
	want := status.FromContextError(cause).Code()
	if got := status.Code(err); got != want {
		t.Errorf("%s: status.Code = %v; want %v", what, got, want)
	}
}
