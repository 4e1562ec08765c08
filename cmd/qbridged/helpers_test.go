package main

import (
	"bytes"
	"context"
	"io"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// syncBuffer is a bytes.Buffer safe for concurrent writers and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// eventually polls cond every 10ms until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !poll(timeout, cond) {
		t.Fatalf("timed out after %v waiting for %s", timeout, what)
	}
}

// poll reports whether cond held within timeout.
func poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if cond() {
			return true
		}
		select {
		case <-deadline.C:
			return cond()
		case <-tick.C:
		}
	}
}

var grpcAddrRE = regexp.MustCompile(`grpc=(\S+)`)

// daemon is run() executing in-process.
type daemon struct {
	addr   string
	logs   *syncBuffer
	cancel context.CancelFunc
	done   chan error
}

// startDaemon runs run() with args and env (nothing else is visible to it)
// and waits until it listens. Cleanup stops it if the test did not.
func startDaemon(t *testing.T, args []string, env map[string]string) *daemon {
	t.Helper()
	d := &daemon{logs: &syncBuffer{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	getenv := func(k string) string { return env[k] }
	if !slices.ContainsFunc(args, func(a string) bool { return strings.Contains(a, "http-listen") }) {
		// Tests run many daemons at once: no fixed HTTP port.
		args = append([]string{"--http-listen", "127.0.0.1:0"}, args...)
	}
	go func() { d.done <- run(ctx, args, getenv, io.Discard, d.logs) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-d.done:
		case <-time.After(30 * time.Second):
			t.Errorf("run did not return within 30s of cancel; logs:\n%s", d.logs)
		}
		if t.Failed() {
			t.Logf("qbridged logs:\n%s", d.logs)
		}
	})
	var addr string
	if !poll(10*time.Second, func() bool {
		m := grpcAddrRE.FindStringSubmatch(d.logs.String())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	}) {
		select {
		case err := <-d.done:
			d.done <- err
			t.Fatalf("run returned before listening: %v\nlogs:\n%s", err, d.logs)
		default:
		}
		t.Fatalf("run did not log a grpc= address within 10s; logs:\n%s", d.logs)
	}
	d.addr = addr
	return d
}

// stop cancels run's ctx and returns what run returned.
func (d *daemon) stop(t *testing.T) error {
	t.Helper()
	d.cancel()
	select {
	case err := <-d.done:
		d.done <- err // for the cleanup
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("run did not return within 30s of cancel")
		return nil
	}
}

// dial connects a gRPC client to addr; it is closed at cleanup.
func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", addr, err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// rpcCtx returns a context for one test RPC.
func rpcCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// healthStatus returns the health status of service, or UNKNOWN with the
// error when the check fails.
func healthStatus(cc *grpc.ClientConn, service string) (healthpb.HealthCheckResponse_ServingStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN, err
	}
	return resp.GetStatus(), nil
}

// waitHealth waits until both "" and the QueueService report want.
func waitHealth(t *testing.T, cc *grpc.ClientConn, want healthpb.HealthCheckResponse_ServingStatus, timeout time.Duration) {
	t.Helper()
	var last string
	ok := poll(timeout, func() bool {
		for _, svc := range []string{"", queueServiceName} {
			st, err := healthStatus(cc, svc)
			if err != nil || st != want {
				last = st.String()
				if err != nil {
					last += " (" + err.Error() + ")"
				}
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("health did not become %v within %v; last: %s", want, timeout, last)
	}
}

// recvDeliveries reads from a Consume stream until it has n deliveries.
func recvDeliveries(t *testing.T, stream grpc.ServerStreamingClient[qbridgev1.ConsumeResponse], n int) []*qbridgev1.Delivery {
	t.Helper()
	var out []*qbridgev1.Delivery
	for len(out) < n {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("Consume: Recv after %d of %d deliveries: %v", len(out), n, err)
		}
		out = append(out, resp.GetDeliveries()...)
	}
	if len(out) != n {
		t.Fatalf("got %d deliveries, want exactly %d", len(out), n)
	}
	return out
}

// wantCode fails unless err is a gRPC status with code c whose message
// contains msg.
func wantCode(t *testing.T, what string, err error, c codes.Code, msg string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: succeeded, want %v", what, c)
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("%s: %v is not a gRPC status, want %v", what, err, c)
	}
	if st.Code() != c || !strings.Contains(st.Message(), msg) {
		t.Fatalf("%s: got %v %q, want %v containing %q", what, st.Code(), st.Message(), c, msg)
	}
}

// logLine returns the first log line containing s, or "".
func logLine(logs, s string) string {
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}
