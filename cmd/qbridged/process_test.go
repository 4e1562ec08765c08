package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// buildBinary compiles qbridged into a temporary directory.
func buildBinary(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go tool in PATH to build qbridged: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "qbridged")
	cmd := exec.Command(goTool, "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// proc is a qbridged subprocess.
type proc struct {
	cmd  *exec.Cmd
	logs *syncBuffer
	addr string
	done chan struct{} // closed once the process was reaped
	err  error         // what Wait returned; valid after done
}

// startProc starts bin with args, with no QBRIDGE_* variables from the test's
// environment, and waits until it listens. Cleanup kills it (by PID) if it
// is still running.
func startProc(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{logs: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, append([]string{"--http-listen", "127.0.0.1:0"}, args...)...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "QBRIDGE_") {
			p.cmd.Env = append(p.cmd.Env, kv)
		}
	}
	p.cmd.Stdout = p.logs
	p.cmd.Stderr = p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			_ = p.cmd.Process.Kill()
		}
		<-p.done
		if t.Failed() {
			t.Logf("qbridged pid %d logs:\n%s", p.cmd.Process.Pid, p.logs)
		}
	})
	ok := poll(15*time.Second, func() bool {
		if m := grpcAddrRE.FindStringSubmatch(p.logs.String()); m != nil {
			p.addr = m[1]
			return true
		}
		return p.exited()
	})
	if !ok || p.addr == "" {
		t.Fatalf("qbridged pid %d did not log its grpc= address (exited: %v)\n%s", p.cmd.Process.Pid, p.exited(), p.logs)
	}
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits up to timeout for the process to exit.
func (p *proc) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		t.Fatalf("qbridged pid %d still running %v later", p.cmd.Process.Pid, timeout)
		return nil
	}
}

// TestSIGKILLRedelivery: two qbridged processes share a Redis. Instance A is
// killed with SIGKILL while its consumer holds 5 unacked deliveries;
// instance B's lease reaper gives them back once their lease runs out, and a
// consumer on B receives them again with the same ids and attempt 2. The old
// ack tokens are fenced off. B then exits 0 on SIGTERM.
func TestSIGKILLRedelivery(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and waits for a lease; skipped with -short")
	}
	rs := redistest.Start(t)
	bin := buildBinary(t)
	args := []string{"--listen", "127.0.0.1:0", "--redis-url", rs.URL(0), "--plaintext", "--reap-interval", "200ms"}
	a := startProc(t, bin, args...)
	b := startProc(t, bin, args...)
	qa := qbridgev1.NewQueueServiceClient(dial(t, a.addr))
	qb := qbridgev1.NewQueueServiceClient(dial(t, b.addr))
	ctx := rpcCtx(t)

	const queue, lease = "killq", 2 * time.Second
	var ids []string
	for i := 0; i < 5; i++ {
		r, err := qb.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: []byte{byte('0' + i)}})
		if err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
		ids = append(ids, r.GetId())
	}
	actx, cancelA := context.WithCancel(ctx)
	defer cancelA()
	sa, err := qa.Consume(actx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: 10, LeaseDuration: durationpb.New(lease)})
	if err != nil {
		t.Fatalf("Consume on A: %v", err)
	}
	first := recvDeliveries(t, sa, 5)
	var oldTokens []string
	var deadline time.Time
	for i, d := range first {
		if d.GetId() != ids[i] || d.GetAttempt() != 1 {
			t.Fatalf("delivery %d on A: id %s attempt %d, want %s attempt 1", i, d.GetId(), d.GetAttempt(), ids[i])
		}
		oldTokens = append(oldTokens, d.GetAckToken())
		if dl := d.GetLeaseDeadline().AsTime(); dl.After(deadline) {
			deadline = dl
		}
	}

	// kill -9 A: it cannot requeue anything.
	if err := a.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill A: %v", err)
	}
	var ee *exec.ExitError
	if err := a.wait(t, 10*time.Second); !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("A exited with %v, want killed by SIGKILL", err)
	}
	killedAt := time.Now()

	bctx, cancelB := context.WithCancel(ctx)
	defer cancelB()
	sb, err := qb.Consume(bctx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: 10, LeaseDuration: durationpb.New(time.Minute)})
	if err != nil {
		t.Fatalf("Consume on B: %v", err)
	}
	type recv struct {
		ds  []*qbridgev1.Delivery
		err error
	}
	got := make(chan recv, 1)
	go func() {
		var out []*qbridgev1.Delivery
		for len(out) < 5 {
			r, err := sb.Recv()
			if err != nil {
				got <- recv{out, err}
				return
			}
			out = append(out, r.GetDeliveries()...)
		}
		got <- recv{out, nil}
	}()
	var again []*qbridgev1.Delivery
	limit := time.Until(deadline) + 3*time.Second // the lease, plus reaping and delivery
	select {
	case r := <-got:
		if r.err != nil {
			t.Fatalf("Consume on B after %d redeliveries: %v", len(r.ds), r.err)
		}
		again = r.ds
	case <-time.After(limit):
		t.Fatalf("B did not redeliver 5 messages within %v of the kill (lease %v)", limit, lease)
	}
	arrived := time.Now()
	if arrived.Before(deadline) {
		t.Errorf("redelivered at %v, before the lease deadline %v: not by lease expiry", arrived, deadline)
	}
	var gotIDs []string
	for _, d := range again {
		gotIDs = append(gotIDs, d.GetId())
		if d.GetAttempt() != 2 {
			t.Errorf("redelivery of %s: attempt %d, want 2", d.GetId(), d.GetAttempt())
		}
	}
	sort.Strings(gotIDs)
	wantIDs := append([]string(nil), ids...)
	sort.Strings(wantIDs)
	if strings.Join(gotIDs, ",") != strings.Join(wantIDs, ",") {
		t.Fatalf("redelivered ids %v, want %v", gotIDs, wantIDs)
	}
	t.Logf("redelivered %v after the kill (lease %v)", arrived.Sub(killedAt).Round(time.Millisecond), lease)

	// A's tokens are fenced: acking them on B does nothing.
	_, err = qb.Ack(ctx, &qbridgev1.AckRequest{AckTokens: oldTokens})
	wantCode(t, "Ack of A's tokens on B", err, codes.FailedPrecondition, "5 of 5 ack tokens no longer hold a lease")
	st, err := qb.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: queue})
	if err != nil || st.GetInFlight() != 5 {
		t.Fatalf("stats after stale acks: %v %v, want the 5 redeliveries still in flight", st, err)
	}
	var newTokens []string
	for _, d := range again {
		newTokens = append(newTokens, d.GetAckToken())
	}
	ack, err := qb.Ack(ctx, &qbridgev1.AckRequest{AckTokens: newTokens})
	if err != nil || ack.GetAcked() != 5 {
		t.Fatalf("Ack of the redeliveries: %v %v, want 5", ack, err)
	}
	st, err = qb.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: queue})
	if err != nil || st.GetReady() != 0 || st.GetInFlight() != 0 {
		t.Fatalf("stats at the end: %v %v, want 0/0", st, err)
	}

	// B shuts down cleanly on SIGTERM.
	cancelB()
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM B: %v", err)
	}
	if err := b.wait(t, 20*time.Second); err != nil {
		t.Fatalf("B exited with %v after SIGTERM, want status 0", err)
	}
	if !strings.Contains(b.logs.String(), "Redis clients closed") {
		t.Errorf("B did not log its shutdown:\n%s", b.logs)
	}
}
