package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// drainRun moves n messages of l through queue with producers and 4
// consumers on cc while fault runs alongside (until the end), and returns
// once every confirmed message is acked or the queue is empty (or within
// passes).
func drainRun(t *testing.T, cc qbridgev1.QueueServiceClient, rdb *redis.Client, l *ledger, queue string, n int, within time.Duration, o consumeOpts, fault func(ctx context.Context)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	cctx, stopConsumers := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); consume(cctx, cc, l, queue, o) }()
	}
	fctx, stopFault := context.WithCancel(ctx)
	var fwg sync.WaitGroup
	if fault != nil {
		fwg.Add(1)
		go func() { defer fwg.Done(); fault(fctx) }()
	}
	produce(ctx, cc, l, queue, 0, n, 8)
	// Done when every confirmed message is acked, or when the queue holds
	// nothing any more (an ack whose reply was lost leaves a message acked
	// that the ledger does not know of yet; report resolves those).
	ok := waitFor(time.Until(deadlineOf(ctx)), func() bool {
		if l.ackedCount() >= l.confirmedCount() {
			return true
		}
		s, err := strays(ctx, rdb, queue)
		return err == nil && s == ""
	})
	stopFault()
	fwg.Wait()
	stopConsumers()
	wg.Wait()
	if !ok {
		t.Logf("not every confirmed message was acked within %v", within)
	}
}

func deadlineOf(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

// Case 1: kill -9 a random qbridged (of three) every 2 s while producers
// and 4 consumers move messages through them; the killed one is restarted
// at once. Clients round-robin over all three and reconnect by themselves.
func TestKillInstances(t *testing.T) {
	rs := redistest.Start(t)
	n := pick(20000, 100000)
	every := pick(700*time.Millisecond, 2*time.Second)
	var ds []*daemon
	var addrs []string
	for i := 0; i < 3; i++ {
		d := startDaemon(t, rs.URL(0), "--reap-interval", "200ms")
		ds = append(ds, d)
		addrs = append(addrs, d.Addr)
	}
	qc := queueClient(dial(t, addrs...))
	l := newLedger("kill")
	kills := 0
	drainRun(t, qc, rs.Client(t, 0), l, "chaos-kill", n, pick(90*time.Second, 15*time.Minute), consumeOpts{window: 16, lease: 2 * time.Second}, func(ctx context.Context) {
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(every): // the fault schedule
			}
			d := ds[rand.IntN(len(ds))]
			d.Kill()
			kills++
			d.Start()
		}
	})
	l.report(t, qc, "chaos-kill", fmt.Sprintf("kills=%d", kills))
	checkNoStrays(t, rs.Client(t, 0), "chaos-kill")
}

// The checker can fail: a qbridged built with the test-only fault that
// loses every 50th delivery (acked in Redis, never sent) is caught.
func TestCheckerCatchesLoss(t *testing.T) {
	rs := redistest.Start(t)
	d := startDaemonBin(t, faultBin, []string{"QBRIDGE_FAULT_LOSE_EVERY=50"}, rs.URL(0))
	qc := queueClient(dial(t, d.Addr))
	l := newLedger("fault")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	produce(ctx, qc, l, "chaos-fault", 0, 1000, 4)
	cctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); consume(cctx, qc, l, "chaos-fault", consumeOpts{window: 8}) }()
	rdb := rs.Client(t, 0)
	if !waitFor(20*time.Second, func() bool { s, err := strays(ctx, rdb, "chaos-fault"); return err == nil && s == "" }) {
		t.Fatal("the queue did not drain")
	}
	stop()
	wg.Wait()
	l.resolve(ctx, qc, "chaos-fault") // finished in Redis, never given to a client: still lost
	s := l.summarize()
	t.Logf("CHAOS %-28s %s (the fault loses every 50th delivery)", t.Name(), s)
	if s.Lost != 20 {
		t.Fatalf("the checker found %d lost; the fault lost 20 of 1000", s.Lost)
	}
}
