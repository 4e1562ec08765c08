package client_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// qbInstance is one in-process qbridge instance of TestRoundRobin: a
// server.Server and its grpc.Server on a loopback port, over the shared
// Redis as the least-privilege user, with counters of what it served.
type qbInstance struct {
	name   string
	addr   string
	srv    *server.Server
	gs     *grpc.Server
	svc    *redis.Client
	served chan error

	enqueues atomic.Int64 // Enqueue calls received
	unary    atomic.Int64 // unary calls received (Enqueue, Ack, ExtendLease, ...)
	opened   atomic.Int64 // Consume streams opened
	open     atomic.Int64 // Consume streams open now

	stopOnce sync.Once
}

// startInstance starts an instance; it is stopped at test cleanup if the test
// did not stop it.
func startInstance(t *testing.T, rs *redistest.Server, name string, log *slog.Logger) *qbInstance {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	p := &qbInstance{name: name, addr: lis.Addr().String(), served: make(chan error, 1)}
	p.svc = redis.NewClient(rs.ServiceOptions(0))
	p.srv = server.New(broker.New(p.svc),
		server.WithLogger(log.With("instance", name)),
		server.WithReapInterval(100*time.Millisecond),
		server.WithWaitSlice(time.Second),
	)
	p.srv.Start()
	p.gs = grpc.NewServer(
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			p.unary.Add(1)
			if info.FullMethod == qbridgev1.QueueService_Enqueue_FullMethodName {
				p.enqueues.Add(1)
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if info.FullMethod == qbridgev1.QueueService_Consume_FullMethodName {
				p.opened.Add(1)
				p.open.Add(1)
				defer p.open.Add(-1)
			}
			return h(srv, ss)
		}),
	)
	qbridgev1.RegisterQueueServiceServer(p.gs, p.srv)
	qbridgev1.RegisterAdminServiceServer(p.gs, p.srv.Admin())
	go func() { p.served <- p.gs.Serve(lis) }()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// stop ends the instance as qbridged does on SIGTERM with a drain timeout
// of 0: its streams end at once (their unacked messages go back to their
// queues), the gRPC server stops gracefully (GOAWAY, calls in progress
// finish), then the background work (reaper, promoter) stops.
func (p *qbInstance) stop(t *testing.T) {
	p.stopOnce.Do(func() {
		p.srv.StopStreams()
		p.gs.GracefulStop()
		if err := <-p.served; err != nil {
			t.Errorf("%s: grpc Serve: %v", p.name, err)
		}
		p.srv.Close()
		_ = p.svc.Close()
	})
}

// processed records every handler run, per message id.
type processed struct {
	mu   sync.Mutex
	runs map[string][]processedRun
}

type processedRun struct {
	attempt int
	at      time.Time
}

func (p *processed) add(id string, attempt int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.runs == nil {
		p.runs = map[string][]processedRun{}
	}
	p.runs[id] = append(p.runs[id], processedRun{attempt, time.Now()})
}

func (p *processed) get(id string) []processedRun {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]processedRun(nil), p.runs[id]...)
}

// missing counts the ids of ids not processed yet.
func (p *processed) missing(ids map[string]bool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for id := range ids {
		if len(p.runs[id]) == 0 {
			n++
		}
	}
	return n
}

// enqueueRetrying enqueues through c, again while the call fails with
// UNAVAILABLE (an instance going away), for up to waitTimeout. The dedup
// key makes a retry of an enqueue that landed harmless. It returns the
// message id and how many calls failed with UNAVAILABLE.
func enqueueRetrying(ctx context.Context, c *client.Client, queue, key string, opts ...client.EnqueueOption) (string, int, error) {
	deadline := time.Now().Add(waitTimeout)
	unavailable := 0
	opts = append(opts, client.WithDedupKey(key))
	for {
		id, err := c.Enqueue(ctx, queue, []byte(key), opts...)
		if err == nil {
			return id, unavailable, nil
		}
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			return "", unavailable, fmt.Errorf("Enqueue(%q, key %q) after %d UNAVAILABLE: %w", queue, key, unavailable, err)
		}
		unavailable++
		time.Sleep(5 * time.Millisecond) // a backoff between retries, not a synchronisation
	}
}

// TestRoundRobin runs three qbridge instances over one Redis and one Client
// that round-robins over them (a manual resolver listing the three
// addresses, and WithRoundRobin): unary calls and streams are spread over
// the instances, and when one stops in the middle of the work, the others
// take over with nothing lost.
func TestRoundRobin(t *testing.T) {
	const (
		n       = 300 // messages of each phase
		workers = 6   // Workers, each with one Consume stream
		conc    = 4   // handlers per Worker: its stream's credit window
		delayed = 20  // delayed messages scheduled through the instance that stops
		// maxUnavailable bounds the Enqueue calls that may fail with
		// UNAVAILABLE around the stop, before the client notices.
		maxUnavailable = 20
	)
	start := time.Now()
	log := testLogger(t)
	rs := redistest.Start(t)
	var peers []*qbInstance
	var addrs []resolver.Address
	for i := range 3 {
		p := startInstance(t, rs, fmt.Sprintf("qb%d", i), log)
		peers = append(peers, p)
		addrs = append(addrs, resolver.Address{Addr: p.addr})
	}
	r := manual.NewBuilderWithScheme("qbridge-balance")
	r.InitialState(resolver.State{Addresses: addrs})
	c, err := client.Dial(r.Scheme()+":///qbridge", client.WithRoundRobin(), client.WithDialOptions(grpc.WithResolvers(r)))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	ctx := testCtx(t)
	q, qLease := "balance", "balance-lease"
	counts := func(f func(*qbInstance) int64) []int64 {
		out := make([]int64, len(peers))
		for i, p := range peers {
			out[i] = f(p)
		}
		return out
	}
	enqueues := func(p *qbInstance) int64 { return p.enqueues.Load() }
	unaryCalls := func(p *qbInstance) int64 { return p.unary.Load() }
	openStreams := func(p *qbInstance) int64 { return p.open.Load() }

	// (a) Unary calls go to every instance in turn.
	ids := map[string]bool{}
	for i := range n {
		id, unavailable, err := enqueueRetrying(ctx, c, q, fmt.Sprintf("a-%d", i))
		if err != nil || unavailable > 0 {
			t.Fatalf("phase a: %v (%d UNAVAILABLE with every instance up)", err, unavailable)
		}
		ids[id] = true
	}
	perPeer := counts(enqueues)
	t.Logf("(a) %d Enqueue calls per instance: %v", n, perPeer)
	for i, got := range perPeer {
		if got < n/5 {
			t.Errorf("instance %s got %d of %d Enqueue calls; want at least 20%% (%d)", peers[i].name, got, n, n/5)
		}
	}
	if len(ids) != n {
		t.Fatalf("phase a: %d distinct ids for %d messages", len(ids), n)
	}

	// (b) Workers: their streams land on several instances, and every
	// message is processed exactly once.
	var (
		seen    processed
		gating  atomic.Bool  // phase c: handlers wait for release
		gated   atomic.Int64 // handlers waiting for release
		release = make(chan struct{})
	)
	h := client.HandlerFunc(func(hctx context.Context, task *client.Task) ([]byte, error) {
		seen.add(task.ID, task.Attempt)
		if gating.Load() {
			gated.Add(1)
			select {
			case <-release:
			case <-hctx.Done(): // the lease was lost: its outcome would not count
				return nil, context.Cause(hctx)
			}
		}
		return nil, nil
	})
	for range workers {
		startWorker(t, ctx, client.NewWorker(c, []string{q}, h,
			client.WithConcurrency(conc),
			client.WithWorkerLease(2*time.Second),
			client.WithReconnectBackoff(10*time.Millisecond, 200*time.Millisecond),
			client.WithWorkerLogger(log)))
	}
	eventually(t, func() (bool, string) {
		m := seen.missing(ids)
		return m == 0, fmt.Sprintf("phase b: %d of %d messages not processed", m, n)
	})
	waitCounters(t, ctx, c, q, n)
	for id := range ids {
		if runs := seen.get(id); len(runs) != 1 || runs[0].attempt != 1 {
			t.Errorf("phase b: message %s was processed %d times (%v); want once, at attempt 1", id, len(runs), runs)
		}
	}
	eventually(t, func() (bool, string) {
		open := counts(openStreams)
		return open[0]+open[1]+open[2] == workers, fmt.Sprintf("open Consume streams per instance %v; want %d in all", open, workers)
	})
	streams := counts(openStreams)
	t.Logf("(b) Consume streams per instance: %v", streams)
	used := 0
	for _, s := range streams {
		if s > 0 {
			used++
		}
	}
	if used < 2 {
		t.Errorf("the %d Workers' streams are on %d instance(s) (%v); want more than one", workers, used, streams)
	}
	bDone := time.Now()

	// (c) Stop the instance with the most streams while every handler holds
	// a task, a producer enqueues, delayed messages scheduled through it
	// wait, and another stream holds a lease it never settles.
	xi := 0
	for i, s := range streams {
		if s > streams[xi] {
			xi = i
		}
	}
	x := peers[xi]
	var survivors []*qbInstance
	for i, p := range peers {
		if i != xi {
			survivors = append(survivors, p)
		}
	}
	xStreams := streams[xi]

	// Delayed messages are scheduled through x only, just before it stops.
	cx, err := client.Dial(x.addr)
	if err != nil {
		t.Fatalf("Dial(%s): %v", x.addr, err)
	}
	t.Cleanup(func() { _ = cx.Close() })

	// A stream (on a survivor) that takes one message and never settles it:
	// its lease runs out and the reapers put it back.
	cs, err := client.Dial(survivors[0].addr)
	if err != nil {
		t.Fatalf("Dial(%s): %v", survivors[0].addr, err)
	}
	t.Cleanup(func() { _ = cs.Close() })
	holder := consume(t, ctx, cs, qLease, client.WithMaxInFlight(1), client.WithLease(time.Second))
	leaseID, _, err := enqueueRetrying(ctx, c, qLease, "lease")
	if err != nil {
		t.Fatal(err)
	}
	held := next(t, holder)
	if held.ID != leaseID || held.Attempt != 1 {
		t.Fatalf("holder got %s attempt %d; want %s attempt 1", held.ID, held.Attempt, leaseID)
	}

	// Every handler busy: each stream holds its whole window.
	gating.Store(true)
	cIDs := map[string]bool{}
	unavailable := 0
	for i := range n / 3 {
		id, u, err := enqueueRetrying(ctx, c, q, fmt.Sprintf("c1-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		cIDs[id], unavailable = true, unavailable+u
	}
	eventually(t, func() (bool, string) {
		g := gated.Load()
		return g == workers*conc, fmt.Sprintf("%d handlers running; want %d", g, workers*conc)
	})

	// A producer that runs through the stop.
	type produced struct {
		ids         []string
		unavailable int
		err         error
	}
	var progress atomic.Int64
	prodDone := make(chan produced, 1)
	go func() {
		var out produced
		defer func() { prodDone <- out }()
		for i := range n / 3 {
			id, u, err := enqueueRetrying(ctx, c, q, fmt.Sprintf("c2-%d", i))
			out.unavailable += u
			if err != nil {
				out.err = err
				return
			}
			out.ids = append(out.ids, id)
			progress.Add(1)
		}
	}()
	eventually(t, func() (bool, string) {
		return progress.Load() >= 10, fmt.Sprintf("the producer enqueued %d", progress.Load())
	})

	batch := make([]client.Message, delayed)
	for i := range batch {
		batch[i] = client.Message{Payload: []byte("later"), Delay: time.Second, DedupKey: fmt.Sprintf("d-%d", i)}
	}
	due := time.Now().Add(time.Second)
	dIDs, err := cx.EnqueueBatch(ctx, q, batch)
	if err != nil {
		t.Fatalf("EnqueueBatch of delayed messages through %s: %v", x.name, err)
	}
	delayedIDs := map[string]bool{}
	for _, id := range dIDs {
		delayedIDs[id] = true
	}
	openedBefore := counts(func(p *qbInstance) int64 { return p.opened.Load() })
	stopStart := time.Now()
	x.stop(t)
	stopped := time.Now()
	t.Logf("(c) stopped %s (%d of the %d Worker streams, %d tasks held) in %v, %v before the delayed messages are due",
		x.name, xStreams, workers, xStreams*conc, stopped.Sub(stopStart).Round(time.Millisecond), due.Sub(stopped).Round(time.Millisecond))
	if !stopped.Before(due) {
		t.Fatalf("the instance stopped at %v, after the delayed messages were due (%v): the test machine is too slow for this test",
			stopped.Format(time.StampMilli), due.Format(time.StampMilli))
	}
	gating.Store(false)
	close(release)

	// The holder takes its message again once a reaper has put it back,
	// and acks it at once (its new lease is 1s too).
	redelivered := make(chan error, 1)
	go func() {
		d, err := holder.Next()
		switch {
		case err != nil:
			err = fmt.Errorf("holder: Next: %w", err)
		case d.ID != leaseID || d.Attempt != 2:
			err = fmt.Errorf("holder got %s attempt %d after the lease ran out; want %s attempt 2", d.ID, d.Attempt, leaseID)
		case !time.Now().After(held.LeaseDeadline):
			err = fmt.Errorf("holder got %s again before its lease ran out (%v)", d.ID, held.LeaseDeadline)
		default:
			if err = d.Ack(ctx); err != nil {
				err = fmt.Errorf("holder: Ack: %w", err)
			}
		}
		redelivered <- err
	}()

	prod := <-prodDone
	if prod.err != nil {
		t.Fatalf("producer: %v", prod.err)
	}
	for _, id := range prod.ids {
		cIDs[id] = true
	}
	unavailable += prod.unavailable

	// Unary calls after the stop go to the two others. (The Workers' acks
	// and lease extensions share the round robin with the Enqueue calls,
	// so it is all unary calls that alternate between the two.)
	after := counts(unaryCalls)
	for i := range n / 3 {
		id, u, err := enqueueRetrying(ctx, c, q, fmt.Sprintf("c3-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		cIDs[id], unavailable = true, unavailable+u
	}
	final := counts(unaryCalls)
	var sinceStop int64
	for i := range peers {
		sinceStop += final[i] - after[i]
	}
	t.Logf("(c) %d unary calls (%d Enqueue) after the stop, per instance: %v; %d Enqueue calls failed with UNAVAILABLE around the stop, retried",
		sinceStop, n/3, []int64{final[0] - after[0], final[1] - after[1], final[2] - after[2]}, unavailable)
	if unavailable > maxUnavailable {
		t.Errorf("%d Enqueue calls failed with UNAVAILABLE around the stop; want at most %d", unavailable, maxUnavailable)
	}
	if final[xi] != after[xi] {
		t.Errorf("the stopped instance served %d unary calls", final[xi]-after[xi])
	}
	for _, s := range survivors {
		i := slices.Index(peers, s)
		if got := final[i] - after[i]; got < sinceStop/5 {
			t.Errorf("instance %s got %d of the %d unary calls after the stop; want at least 20%%", s.name, got, sinceStop)
		}
	}
	if len(cIDs) != n {
		t.Fatalf("phase c: %d distinct ids for %d messages", len(cIDs), n)
	}

	// The held lease runs out and a reaper puts the message back: the
	// holder gets it again (its only credit is free again), attempt 2.
	if _, err := within(t, "the redelivery of the held message", func() (struct{}, error) { return struct{}{}, <-redelivered }); err != nil {
		t.Fatal(err)
	}
	_ = holder.Close()
	st, err := c.Stats(ctx, qLease)
	if err != nil {
		t.Fatalf("Stats(%q): %v", qLease, err)
	}
	if st.Ready != 0 || st.InFlight != 0 || st.Counters.LeaseExpired != 1 || st.Counters.Acked != 1 {
		t.Errorf("Stats(%q) = ready %d, in flight %d, %+v; want 0, 0, one lease expired, one ack", qLease, st.Ready, st.InFlight, st.Counters)
	}

	// Every message is processed, the delayed ones after the stop.
	all := map[string]bool{}
	for id := range cIDs {
		all[id] = true
	}
	for id := range delayedIDs {
		all[id] = true
	}
	eventually(t, func() (bool, string) {
		m := seen.missing(all)
		return m == 0, fmt.Sprintf("phase c: %d of %d messages not processed", m, len(all))
	})
	waitCounters(t, ctx, c, q, 2*n+delayed)
	st, err = c.Stats(ctx, q)
	if err != nil {
		t.Fatalf("Stats(%q): %v", q, err)
	}
	if st.Delayed != 0 || st.Dead != 0 || st.Counters.LeaseExpired != 0 || st.Counters.DeadLettered != 0 {
		t.Errorf("Stats(%q) = delayed %d, dead %d, %+v; want nothing delayed or dead, no lease expired (a stopping instance requeues at once)",
			q, st.Delayed, st.Dead, st.Counters)
	}
	// The tasks the stopped instance's streams held were given back when
	// the streams ended, and delivered again (attempt 2) elsewhere: those
	// are the only duplicates.
	twice := 0
	for id := range all {
		runs := seen.get(id)
		switch {
		case len(runs) == 1 && runs[0].attempt == 1:
		case len(runs) == 2 && runs[0].attempt == 1 && runs[1].attempt == 2 && cIDs[id]:
			twice++
		default:
			t.Errorf("message %s: runs %v; want one (or, when the stop took it back, two: attempts 1 and 2)", id, runs)
		}
		if delayedIDs[id] && !runs[0].at.After(stopped) {
			t.Errorf("delayed message %s was processed at %v, before %s stopped", id, runs[0].at.Format(time.StampMilli), x.name)
		}
	}
	if want := int(xStreams) * conc; twice != want {
		t.Errorf("%d messages were processed twice; want %d (the tasks of the %d stream(s) on the stopped instance)", twice, want, xStreams)
	}

	// The Workers reopened the streams they had on x on the others.
	eventually(t, func() (bool, string) {
		open := counts(openStreams)
		var sum int64
		for _, s := range survivors {
			sum += s.open.Load()
		}
		return sum == workers && open[xi] == 0, fmt.Sprintf("open Consume streams per instance %v; want all %d on the survivors", open, workers)
	})
	openedAfter := counts(func(p *qbInstance) int64 { return p.opened.Load() })
	reopened := int64(0)
	for _, s := range survivors {
		i := slices.Index(peers, s)
		reopened += openedAfter[i] - openedBefore[i]
	}
	if reopened < xStreams {
		t.Errorf("%d Consume streams opened on the survivors after the stop; want at least %d", reopened, xStreams)
	}
	t.Logf("(c) %d tasks processed twice, streams per instance now %v; phases a+b took %v, c %v",
		twice, counts(openStreams), bDone.Sub(start).Round(time.Millisecond), time.Since(bDone).Round(time.Millisecond))
}

// waitCounters waits until queue is settled: nothing ready or in flight,
// and as many acks as enqueues, total of each.
func waitCounters(t *testing.T, ctx context.Context, c *client.Client, queue string, total int) {
	t.Helper()
	eventually(t, func() (bool, string) {
		st, err := c.Stats(ctx, queue)
		if err != nil {
			return false, fmt.Sprintf("Stats(%q): %v", queue, err)
		}
		return st.Ready == 0 && st.InFlight == 0 && st.Counters.Enqueued == int64(total) && st.Counters.Acked == int64(total),
			fmt.Sprintf("Stats(%q) = ready %d, in flight %d, enqueued %d, acked %d; want 0, 0, %d, %d",
				queue, st.Ready, st.InFlight, st.Counters.Enqueued, st.Counters.Acked, total, total)
	})
}
