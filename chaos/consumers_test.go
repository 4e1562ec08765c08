package chaos

// Cases 2, 3, 8 and 9 of the fault-tolerance issue: consumers that die,
// hang, never read, or ack too late. Helpers here are prefixed "cons".

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// consEnqueue enqueues messages from..to-1 of l to queue, in order (one
// EnqueueBatch per 500), with keep_result and their number as dedup key.
func consEnqueue(t *testing.T, qc qbridgev1.QueueServiceClient, l *ledger, queue string, from, to int) {
	t.Helper()
	for i := from; i < to; i += 500 {
		j := min(to, i+500)
		msgs := make([]*qbridgev1.BatchMessage, 0, j-i)
		for n := i; n < j; n++ {
			msgs = append(msgs, &qbridgev1.BatchMessage{Payload: l.payload(n), DedupKey: strconv.Itoa(n), KeepResult: true})
			// Attempted before the call: a consumer may get the message
			// before EnqueueBatch returns, and the ledger must know it.
			l.sent(n, "", false)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := qc.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: queue, Messages: msgs})
		cancel()
		if err != nil {
			t.Fatalf("EnqueueBatch %d..%d to %s: %v", i, j-1, queue, err)
		}
		for k, id := range r.GetIds() {
			l.sent(i+k, id, true)
		}
	}
}

// consHold starts a "hold" child on queue: it takes up to window messages
// with the given lease, prints them and never acks.
func consHold(t *testing.T, addr, queue string, lease time.Duration, window int) *child {
	t.Helper()
	return startChild(t, "hold", "CHAOS_ADDR="+addr, "CHAOS_QUEUE="+queue,
		"CHAOS_LEASE="+lease.String(), "CHAOS_WINDOW="+strconv.Itoa(window))
}

// consTaken is one delivery a child printed.
type consTaken struct {
	n       int
	attempt uint32
	at      time.Time
}

// consTake reads n deliveries a child printed, records them in l and
// returns them.
func consTake(t *testing.T, c *child, l *ledger, n int, within time.Duration) []consTaken {
	t.Helper()
	deadline := time.Now().Add(within)
	var out []consTaken
	for len(out) < n {
		line, err := c.next(time.Until(deadline))
		if err != nil {
			t.Fatalf("a hold child printed %d of %d deliveries within %v", len(out), n, within)
		}
		if tk, ok := consParse(l, line); ok {
			out = append(out, tk)
		}
	}
	return out
}

// consParse records a child's "got <payload> <attempt>" line in l.
func consParse(l *ledger, line string) (consTaken, bool) {
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "got" {
		return consTaken{}, false
	}
	a, err := strconv.ParseUint(f[2], 10, 32)
	if err != nil {
		return consTaken{}, false
	}
	n := l.delivered(&qbridgev1.Delivery{Payload: []byte(f[1]), Attempt: uint32(a)})
	return consTaken{n: n, attempt: uint32(a), at: time.Now()}, true
}

// consDrainLines records whatever a child printed and was not read yet.
func consDrainLines(l *ledger, c *child) (extra []consTaken) {
	for {
		select {
		case line := <-c.lines:
			if tk, ok := consParse(l, line); ok {
				extra = append(extra, tk)
			}
		default:
			return extra
		}
	}
}

// consSeen records, per message, the first delivery a healthy consumer got
// after a mark (the fault), with its attempt.
type consSeen struct {
	mu      sync.Mutex
	l       *ledger
	at      map[int]time.Time
	attempt map[int]uint32
}

func newConsSeen(l *ledger) *consSeen {
	return &consSeen{l: l, at: map[int]time.Time{}, attempt: map[int]uint32{}}
}

// hook is a consumeOpts.onDelivery that records and lets the delivery be
// acked.
func (s *consSeen) hook(d *qbridgev1.Delivery) bool {
	n := s.l.parse(d.GetPayload())
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.at[n]; !ok {
		s.at[n] = time.Now()
		s.attempt[n] = d.GetAttempt()
	}
	return true
}

func (s *consSeen) get(n int) (time.Time, uint32, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	at, ok := s.at[n]
	return at, s.attempt[n], ok
}

// consHealthy is an in-process consumer (consume from ledger_test.go) that
// acks everything it gets.
type consHealthy struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// consStartHealthy starts a healthy consumer on queue and proves it is
// attached: it enqueues message probe of l and waits until the consumer
// acked it. Nothing else may be ready on queue meanwhile.
func consStartHealthy(t *testing.T, qc qbridgev1.QueueServiceClient, l *ledger, queue string, o consumeOpts, probe int) *consHealthy {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h := &consHealthy{cancel: cancel}
	h.wg.Add(1)
	go func() { defer h.wg.Done(); consume(ctx, qc, l, queue, o) }()
	t.Cleanup(h.stop)
	consEnqueue(t, qc, l, queue, probe, probe+1)
	if !waitFor(20*time.Second, func() bool { return l.allAcked(probe) }) {
		l.mu.Lock()
		id, deliveries := l.ids[probe], len(l.deliveries[probe])
		l.mu.Unlock()
		where := ""
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if m, err := qc.GetMessage(ctx, &qbridgev1.GetMessageRequest{Queue: queue, Id: id}); err == nil {
			where = fmt.Sprintf("%s after %d deliveries", m.GetState(), m.GetDeliveries())
		} else {
			where = err.Error()
		}
		st := consStats(t, qc, queue)
		t.Fatalf("the healthy consumer on %s did not ack its probe message within 20s (it got it %d times; the message is %s; queue ready=%d in_flight=%d)",
			queue, deliveries, where, st.GetReady(), st.GetInFlight())
	}
	return h
}

func (h *consHealthy) stop() {
	h.cancel()
	h.wg.Wait()
}

func consStats(t *testing.T, qc qbridgev1.QueueServiceClient, queue string) *qbridgev1.GetQueueStatsResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := qc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: queue})
	if err != nil {
		t.Fatalf("GetQueueStats %s: %v", queue, err)
	}
	return st
}

// consDeadLetters pages through the dead letters of queue.
func consDeadLetters(t *testing.T, ac qbridgev1.AdminServiceClient, queue string) []*qbridgev1.QueuedMessage {
	t.Helper()
	var out []*qbridgev1.QueuedMessage
	token := ""
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := ac.PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{Queue: queue, State: qbridgev1.MessageState_MESSAGE_STATE_DEAD, PageSize: 1000, PageToken: token})
		cancel()
		if err != nil {
			t.Fatalf("PeekMessages dead %s: %v", queue, err)
		}
		out = append(out, r.GetMessages()...)
		if token = r.GetNextPageToken(); token == "" {
			return out
		}
	}
}

// consCheckDead asserts that messages 0..n-1 of l are dead letters of
// queue after exactly maxAttempts deliveries, for reason, with lastError
// when set, and nowhere else.
func consCheckDead(t *testing.T, qc qbridgev1.QueueServiceClient, ac qbridgev1.AdminServiceClient, l *ledger, queue string, n, maxAttempts int, reason, lastError string) {
	t.Helper()
	var st *qbridgev1.GetQueueStatsResponse
	if !waitFor(10*time.Second, func() bool {
		st = consStats(t, qc, queue)
		return st.GetDead() == int64(n) && st.GetReady() == 0 && st.GetInFlight() == 0 && st.GetDelayed() == 0
	}) {
		t.Fatalf("%s: want %d dead letters and nothing else; stats: ready=%d in_flight=%d delayed=%d dead=%d",
			queue, n, st.GetReady(), st.GetInFlight(), st.GetDelayed(), st.GetDead())
	}
	if got := st.GetCounters().GetDeadLettered(); got != int64(n) {
		t.Errorf("%s: counters.dead_lettered=%d, want %d", queue, got, n)
	}
	dead := consDeadLetters(t, ac, queue)
	seen := map[int]bool{}
	for _, m := range dead {
		k := l.parse(m.GetPayload())
		switch {
		case k < 0 || k >= n || seen[k]:
			t.Errorf("%s: unexpected dead letter %q (id %s)", queue, m.GetPayload(), m.GetId())
			continue
		case int(m.GetDeliveries()) != maxAttempts:
			t.Errorf("%s: dead letter %q after %d deliveries, want max attempts %d", queue, m.GetPayload(), m.GetDeliveries(), maxAttempts)
		case m.GetDeadReason() != reason:
			t.Errorf("%s: dead letter %q died for %q, want %q", queue, m.GetPayload(), m.GetDeadReason(), reason)
		case lastError != "" && m.GetLastError() != lastError:
			t.Errorf("%s: dead letter %q has last error %q, want %q", queue, m.GetPayload(), m.GetLastError(), lastError)
		}
		seen[k] = true
	}
	if len(seen) != n {
		t.Errorf("%s: %d of %d poison messages are in the dead letters", queue, len(seen), n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for k := 0; k < n; k++ {
		l.mu.Lock()
		id := l.ids[k]
		l.mu.Unlock()
		m, err := qc.GetMessage(ctx, &qbridgev1.GetMessageRequest{Queue: queue, Id: id})
		if err != nil || m.GetState() != qbridgev1.MessageState_MESSAGE_STATE_DEAD {
			t.Errorf("%s: GetMessage %d (%s) = %v, %v; want DEAD", queue, k, id, m.GetState(), err)
		}
		r, err := qc.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: queue, Id: id})
		if err != nil || r.GetState() != qbridgev1.ResultState_RESULT_STATE_DEAD || int(r.GetAttempts()) != maxAttempts {
			t.Errorf("%s: GetResult %d (%s) = %v after %d attempts, %v; want DEAD after %d", queue, k, id, r.GetState(), r.GetAttempts(), err, maxAttempts)
		}
	}
}

// Case 2: consumers killed (SIGKILL) after receiving and before acking.
// Each round a "hold" child process takes a batch and is killed; a healthy
// consumer must get every message again within 2× the lease of the kill,
// with a higher attempt. Poison messages that every consumer dies on (and,
// on a second queue, that die once, are nacked for retry once and then
// left to expire) end in the dead letters after --max-attempts deliveries.
func TestConsumersKilledBeforeAck(t *testing.T) {
	const maxAttempts = 3
	rs := redistest.Start(t)
	d := startDaemon(t, rs.URL(0), "--reap-interval", "200ms", "--max-attempts", strconv.Itoa(maxAttempts),
		"--retry-backoff-min", "10ms", "--retry-backoff-max", "50ms")
	cc := dial(t, d.Addr)
	qc, ac := queueClient(cc), qbridgev1.NewAdminServiceClient(cc)
	lease := 2 * time.Second
	bound := 2 * lease
	rounds, window := pick(3, 30), pick(16, 64)

	queue := "chaos-cons-killed"
	l := newLedger("conskill")
	seen := newConsSeen(l)
	next := 0
	var maxDelay, maxHold time.Duration
	kills := 0
	for r := 0; r < rounds; r++ {
		batch := make([]int, window)
		for i := range batch {
			batch[i] = next + i
		}
		consEnqueue(t, qc, l, queue, next, next+window)
		next += window
		c := consHold(t, d.Addr, queue, lease, window)
		taken := consTake(t, c, l, window, 30*time.Second)
		for _, tk := range taken {
			if tk.attempt != 1 {
				t.Errorf("round %d: first delivery of %d has attempt %d", r, tk.n, tk.attempt)
			}
		}
		// The healthy consumer attaches now that the child holds the whole
		// batch (the queue is empty), then the child dies holding it.
		h := consStartHealthy(t, qc, l, queue, consumeOpts{window: 16, lease: lease, onDelivery: seen.hook}, next)
		next++
		killed := time.Now()
		maxHold = max(maxHold, killed.Sub(taken[0].at))
		c.Kill()
		kills++
		if extra := consDrainLines(l, c); len(extra) > 0 {
			t.Logf("round %d: the child printed %d more deliveries before it died (its lease ran out while it held the batch: the test was too slow)", r, len(extra))
		}
		if !waitFor(10*bound, func() bool { return l.allAcked(batch...) }) {
			t.Errorf("round %d: not every message the killed consumer held was redelivered and acked within %v", r, 10*bound)
		}
		h.stop()
		for _, n := range batch {
			at, attempt, ok := seen.get(n)
			if !ok {
				t.Errorf("round %d: message %d never reached the healthy consumer after the kill", r, n)
				continue
			}
			delay := at.Sub(killed)
			maxDelay = max(maxDelay, delay)
			if delay > bound {
				t.Errorf("round %d: message %d redelivered %v after its consumer was killed; want within 2× lease = %v", r, n, delay.Round(time.Millisecond), bound)
			}
			if attempt < 2 {
				t.Errorf("round %d: message %d redelivered with attempt %d; want >= 2", r, n, attempt)
			}
		}
	}

	// Poison: every consumer that takes these messages is killed.
	poisonQ := "chaos-cons-poison"
	pl := newLedger("conspoison")
	np := pick(4, 32)
	consEnqueue(t, qc, pl, poisonQ, 0, np)
	for k := 1; k <= maxAttempts; k++ {
		c := consHold(t, d.Addr, poisonQ, lease, np)
		for _, tk := range consTake(t, c, pl, np, 30*time.Second) {
			if int(tk.attempt) != k {
				t.Errorf("poison message %d: delivery %d has attempt %d", tk.n, k, tk.attempt)
			}
		}
		c.Kill()
		kills++
	}
	consCheckDead(t, qc, ac, pl, poisonQ, np, maxAttempts, "max attempts reached", "")

	// Poison, every way of failing an attempt: a killed consumer, a Nack
	// with NACK_ACTION_RETRY (backoff), then a lease left to expire.
	mixedQ := "chaos-cons-poison-mixed"
	ml := newLedger("consmixed")
	nm := pick(4, 32)
	consEnqueue(t, qc, ml, mixedQ, 0, nm)
	c := consHold(t, d.Addr, mixedQ, lease, nm)
	consTake(t, c, ml, nm, 30*time.Second)
	c.Kill()
	kills++
	shortLease := time.Second
	s := consOpen(t, qc, &qbridgev1.ConsumeRequest{Queue: mixedQ, MaxInFlight: uint32(nm), LeaseDuration: durationpb(shortLease)})
	ds, err := s.take(nm, 20*time.Second)
	if err != nil {
		t.Fatalf("mixed poison, second delivery: %v", err)
	}
	for _, dl := range ds {
		ml.delivered(dl)
		if dl.GetAttempt() != 2 {
			t.Errorf("mixed poison %q: second delivery has attempt %d", dl.GetPayload(), dl.GetAttempt())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := qc.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{dl.GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_RETRY, Error: "handler crashed"})
		cancel()
		if err != nil {
			t.Fatalf("Nack RETRY: %v", err)
		}
	}
	ds, err = s.take(nm, 20*time.Second)
	if err != nil {
		t.Fatalf("mixed poison, third delivery (after the retry backoff): %v", err)
	}
	for _, dl := range ds {
		ml.delivered(dl)
		if dl.GetAttempt() != 3 || dl.GetLastError() != "handler crashed" {
			t.Errorf("mixed poison %q: third delivery has attempt %d, last error %q", dl.GetPayload(), dl.GetAttempt(), dl.GetLastError())
		}
	}
	// The third lease runs out while the stream stays open: dead letters.
	consCheckDead(t, qc, ac, ml, mixedQ, nm, maxAttempts, "max attempts reached", "handler crashed")
	mc := consStats(t, qc, mixedQ).GetCounters()
	if mc.GetNacked() != int64(nm) || mc.GetLeaseExpired() != int64(nm) {
		t.Errorf("%s counters: nacked=%d lease_expired=%d, want %d each", mixedQ, mc.GetNacked(), mc.GetLeaseExpired(), nm)
	}
	s.cancel()

	l.report(t, qc, queue, fmt.Sprintf("kills=%d kill_to_redelivery_max=%v (bound 2×lease=%v) hold_max=%v poison_dead=%d/%d mixed_poison_dead=%d/%d max_attempts=%d",
		kills, maxDelay.Round(time.Millisecond), bound, maxHold.Round(time.Millisecond), np, np, nm, nm, maxAttempts))
	checkNoStrays(t, rs.Client(t, 0), queue)
}

// consStream is an in-process Consume stream read by a goroutine.
type consStream struct {
	ch     chan *qbridgev1.Delivery
	errc   chan error
	cancel context.CancelFunc
}

func consOpen(t *testing.T, qc qbridgev1.QueueServiceClient, req *qbridgev1.ConsumeRequest) *consStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := qc.Consume(ctx, req)
	if err != nil {
		cancel()
		t.Fatalf("Consume %s: %v", req.GetQueue(), err)
	}
	s := &consStream{ch: make(chan *qbridgev1.Delivery, 1<<14), errc: make(chan error, 1), cancel: cancel}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			r, err := st.Recv()
			if err != nil {
				s.errc <- err
				return
			}
			for _, d := range r.GetDeliveries() {
				s.ch <- d
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return s
}

// take returns the next n deliveries of the stream.
func (s *consStream) take(n int, within time.Duration) ([]*qbridgev1.Delivery, error) {
	timer := time.NewTimer(within)
	defer timer.Stop()
	var out []*qbridgev1.Delivery
	for len(out) < n {
		select {
		case d := <-s.ch:
			out = append(out, d)
		case err := <-s.errc:
			return out, fmt.Errorf("stream ended after %d of %d deliveries: %v", len(out), n, err)
		case <-timer.C:
			return out, fmt.Errorf("%d of %d deliveries within %v", len(out), n, within)
		}
	}
	return out, nil
}

// Case 3: a half-open consumer. "hold" children take their batches with a
// 60 s lease and are suspended with SIGSTOP: they never ack and never
// close their connections. qbridged runs with 1 s keepalive time and
// timeout, so it must find them dead through keepalive and requeue what
// they held within keepalive time + timeout (plus slack), far inside the
// lease.
func TestConsumersHalfOpen(t *testing.T) {
	rs := redistest.Start(t)
	kaTime, kaTimeout := time.Second, time.Second
	d := startDaemon(t, rs.URL(0), "--keepalive-time", kaTime.String(), "--keepalive-timeout", kaTimeout.String(), "--reap-interval", "200ms")
	qc := queueClient(dial(t, d.Addr))
	lease := 60 * time.Second
	slack := 3 * time.Second
	bound := kaTime + kaTimeout + slack
	nchild, window := pick(2, 6), pick(8, 64)

	queue := "chaos-cons-halfopen"
	l := newLedger("conshalf")
	seen := newConsSeen(l)
	next := 0
	var children []*child
	var held []int
	for i := 0; i < nchild; i++ {
		// Each child fills its window before the next batch is enqueued
		// (a full child takes no more), so each holds exactly its batch.
		consEnqueue(t, qc, l, queue, next, next+window)
		c := consHold(t, d.Addr, queue, lease, window)
		for _, tk := range consTake(t, c, l, window, 30*time.Second) {
			held = append(held, tk.n)
		}
		next += window
		children = append(children, c)
	}
	h := consStartHealthy(t, qc, l, queue, consumeOpts{window: 16, lease: 30 * time.Second, onDelivery: seen.hook}, next)
	stopped := time.Now()
	for _, c := range children {
		c.Stop()
	}
	ok := waitFor(lease/2, func() bool { return l.allAcked(held...) })
	h.stop()
	if !ok {
		t.Errorf("the messages of SIGSTOPped consumers were not requeued within %v (lease %v): keepalive did not find them", lease/2, lease)
	}
	var maxDetect time.Duration
	for _, n := range held {
		at, attempt, ok := seen.get(n)
		if !ok {
			t.Errorf("message %d held by a stopped consumer never reached the healthy one", n)
			continue
		}
		delay := at.Sub(stopped)
		maxDetect = max(maxDetect, delay)
		if delay > bound {
			t.Errorf("message %d requeued %v after its consumer was stopped; want within keepalive time + timeout + %v = %v", n, delay.Round(time.Millisecond), slack, bound)
		}
		if attempt != 2 {
			t.Errorf("message %d redelivered with attempt %d; want 2", n, attempt)
		}
	}
	for i, c := range children {
		select {
		case <-c.done:
			t.Errorf("child %d exited; it should still be alive, stopped (half-open)", i)
		default:
		}
	}
	if le := consStats(t, qc, queue).GetCounters().GetLeaseExpired(); le != 0 {
		t.Errorf("%d leases expired: the requeue must come from keepalive, not from the %v lease", le, lease)
	}
	l.report(t, qc, queue, fmt.Sprintf("stopped=%d held=%d detection_max=%v (bound keepalive %v+%v+slack %v=%v, lease %v)",
		nchild, len(held), maxDetect.Round(time.Millisecond), kaTime, kaTimeout, slack, bound, lease))
	checkNoStrays(t, rs.Client(t, 0), queue)
}

// Case 8: a consumer that never reads its stream. With N ≫ W messages
// queued, a Consume stream with max_in_flight W that is never read takes
// exactly W (Redis shows W in flight and N−W ready, and it stays so);
// other consumers drain the N−W, each exactly once; when the stuck stream
// ends, its W come back (attempt 2) and are drained too.
func TestConsumersUnreadStream(t *testing.T) {
	rs := redistest.Start(t)
	d := startDaemon(t, rs.URL(0), "--reap-interval", "200ms")
	qc := queueClient(dial(t, d.Addr))
	rdb := rs.Client(t, 0)
	n, w := pick(1000, 50000), pick(8, 32)
	queue := "chaos-cons-unread"
	tag := "{" + queue + "}:qb:"
	l := newLedger("consunread")
	consEnqueue(t, qc, l, queue, 0, n)

	// The stuck stream, on a connection of its own. Nobody calls Recv.
	sctx, endStuck := context.WithCancel(context.Background())
	defer endStuck()
	if _, err := queueClient(dial(t, d.Addr)).Consume(sctx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: uint32(w), LeaseDuration: durationpb(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	redisCounts := func() (inflight, ready int64) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		inflight, _ = rdb.HLen(ctx, tag+"inflight").Result()
		ready, _ = rdb.LLen(ctx, queue).Result()
		return inflight, ready
	}
	var inflight, ready int64
	if !waitFor(10*time.Second, func() bool {
		inflight, ready = redisCounts()
		return inflight >= int64(w)
	}) {
		t.Fatalf("the unread stream took %d messages within 10s; want its credit %d", inflight, w)
	}
	// Watch it for a while: it must never take more than its credit.
	watch := pick(500*time.Millisecond, 3*time.Second)
	var maxInflight, minReady int64 = 0, int64(n)
	for end := time.Now().Add(watch); time.Now().Before(end); {
		inflight, ready = redisCounts()
		maxInflight, minReady = max(maxInflight, inflight), min(minReady, ready)
		<-time.After(20 * time.Millisecond) // sampling interval of the watch, not synchronisation
	}
	if maxInflight != int64(w) || minReady != int64(n-w) {
		t.Errorf("while a stream of credit %d was unread: Redis in flight up to %d (want %d), ready down to %d (want %d)", w, maxInflight, w, minReady, n-w)
	}
	st := consStats(t, qc, queue)
	if st.GetInFlight() != int64(w) || st.GetReady() != int64(n-w) {
		t.Errorf("GetQueueStats while unread: in_flight=%d ready=%d; want %d and %d", st.GetInFlight(), st.GetReady(), w, n-w)
	}

	// Others drain the rest while the stuck stream keeps its W.
	dctx, stopDrain := context.WithCancel(context.Background())
	defer stopDrain()
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); consume(dctx, qc, l, queue, consumeOpts{window: 32, lease: 30 * time.Second}) }()
	}
	drainWithin := pick(30*time.Second, 10*time.Minute)
	if !waitFor(drainWithin, func() bool { return l.ackedCount() >= n-w }) {
		t.Errorf("the other consumers acked %d of %d within %v", l.ackedCount(), n-w, drainWithin)
	}
	inflight, ready = redisCounts()
	if inflight != int64(w) || ready != 0 {
		t.Errorf("after the others drained the queue: Redis in flight %d (want the stuck %d), ready %d (want 0)", inflight, w, ready)
	}
	var stuck []int
	l.mu.Lock()
	for m := 0; m < n; m++ {
		if !l.acked[m] {
			stuck = append(stuck, m)
			if len(l.deliveries[m]) != 0 {
				t.Errorf("message %d, held by the unread stream, was also delivered to another consumer", m)
			}
		}
	}
	l.mu.Unlock()
	if len(stuck) != w {
		t.Errorf("%d messages left unacked while the unread stream held its credit; want %d", len(stuck), w)
	}
	for i, m := range stuck {
		if m != i {
			t.Errorf("the unread stream held messages %v; want the head of the queue, 0..%d", stuck, w-1)
			break
		}
	}

	// End the stuck stream: its W come back at once and are drained.
	ended := time.Now()
	endStuck()
	if !waitFor(20*time.Second, func() bool { return l.ackedCount() >= n }) {
		t.Errorf("the messages of the ended stream were not drained within 20s (%d of %d acked)", l.ackedCount(), n)
	}
	returned := time.Since(ended)
	stopDrain()
	wg.Wait()
	l.mu.Lock()
	for _, m := range stuck {
		if l.attempts[m] != 2 {
			t.Errorf("message %d, given back by the ended stream, was delivered with attempt %d; want 2", m, l.attempts[m])
		}
	}
	l.mu.Unlock()
	s := l.report(t, qc, queue, fmt.Sprintf("window=%d in_flight_while_unread=%d ready_while_unread=%d returned_after_end=%d in %v",
		w, maxInflight, minReady, len(stuck), returned.Round(time.Millisecond)))
	if s.Duplicates != 0 {
		t.Errorf("%d duplicate deliveries; every message should reach the draining consumers exactly once", s.Duplicates)
	}
	checkNoStrays(t, rdb, queue)
}

// Case 9: stale acks. Consumer A takes messages with a 1 s lease and holds
// them; the leases run out and consumer B gets the same messages (attempt
// 2). Then A's Ack (one by one and as a batch), Nack and ExtendLease fail
// with FAILED_PRECONDITION and touch nothing; B's Acks succeed; every
// message is acked exactly once and nothing is left.
func TestConsumersStaleAck(t *testing.T) {
	rs := redistest.Start(t)
	d := startDaemon(t, rs.URL(0), "--reap-interval", "100ms")
	qc := queueClient(dial(t, d.Addr))
	k := pick(8, 500)
	lease := time.Second
	queue := "chaos-cons-stale"
	l := newLedger("consstale")
	consEnqueue(t, qc, l, queue, 0, k)

	// A: max_messages keeps it from taking the messages again itself.
	a := consOpen(t, qc, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: uint32(k), MaxMessages: uint32(k), LeaseDuration: durationpb(lease)})
	da, err := a.take(k, 20*time.Second)
	if err != nil {
		t.Fatalf("consumer A: %v", err)
	}
	tokA := map[int]string{}
	for _, dl := range da {
		tokA[l.delivered(dl)] = dl.GetAckToken()
	}
	b := consOpen(t, qc, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: uint32(k), LeaseDuration: durationpb(30 * time.Second)})
	db, err := b.take(k, lease+20*time.Second)
	if err != nil {
		t.Fatalf("consumer B, after A's leases ran out: %v", err)
	}
	tokB := map[int]string{}
	for _, dl := range db {
		m := l.delivered(dl)
		tokB[m] = dl.GetAckToken()
		if dl.GetAttempt() != 2 {
			t.Errorf("message %d reached B with attempt %d; want 2", m, dl.GetAttempt())
		}
		if _, ok := tokA[m]; !ok {
			t.Errorf("B got message %d, which A never had", m)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	wantStale := func(what string, err error, msg string) {
		t.Helper()
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("%s: %v; want FAILED_PRECONDITION", what, err)
			return
		}
		m := status.Convert(err).Message()
		if !strings.Contains(m, msg) || !strings.Contains(m, "expired") {
			t.Errorf("%s: message %q; want it to say %q and why (the lease expired)", what, m, msg)
		}
	}
	stale := 0
	var all []string
	for m := 0; m < k; m++ {
		_, err := qc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{tokA[m]}})
		wantStale(fmt.Sprintf("A's late Ack of %d", m), err, "1 of 1 ack tokens no longer hold a lease")
		if status.Code(err) == codes.FailedPrecondition {
			stale++
		}
		all = append(all, tokA[m])
	}
	_, err = qc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: all})
	wantStale("A's late batch Ack", err, fmt.Sprintf("%d of %d ack tokens no longer hold a lease", k, k))
	_, err = qc.Nack(ctx, &qbridgev1.NackRequest{AckTokens: all, Action: qbridgev1.NackAction_NACK_ACTION_DROP})
	wantStale("A's late Nack DROP", err, "no longer hold a lease")
	_, err = qc.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{AckTokens: all, LeaseDuration: durationpb(time.Hour)})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("A's late ExtendLease: %v; want FAILED_PRECONDITION", err)
	}
	if st := consStats(t, qc, queue); st.GetInFlight() != int64(k) || st.GetCounters().GetAcked() != 0 {
		t.Errorf("after A's stale calls: in_flight=%d acked=%d; want %d held by B and 0 acked", st.GetInFlight(), st.GetCounters().GetAcked(), k)
	}

	for m := 0; m < k; m++ {
		r, err := qc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{tokB[m]}})
		if err != nil || r.GetAcked() != 1 {
			t.Errorf("B's Ack of %d: %v, %v; want acked 1", m, r, err)
			continue
		}
		l.ackedOK(m)
	}
	st := consStats(t, qc, queue)
	c := st.GetCounters()
	if c.GetAcked() != int64(k) || c.GetLeaseExpired() != int64(k) || c.GetNacked() != 0 || st.GetDead() != 0 {
		t.Errorf("counters: acked=%d lease_expired=%d nacked=%d dead=%d; want %d, %d, 0, 0", c.GetAcked(), c.GetLeaseExpired(), c.GetNacked(), st.GetDead(), k, k)
	}
	for m := 0; m < k; m++ {
		l.mu.Lock()
		id := l.ids[m]
		l.mu.Unlock()
		r, err := qc.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: queue, Id: id})
		if err != nil || r.GetState() != qbridgev1.ResultState_RESULT_STATE_SUCCEEDED || r.GetAttempts() != 2 {
			t.Errorf("GetResult %d: %v after %d attempts, %v; want SUCCEEDED after 2", m, r.GetState(), r.GetAttempts(), err)
		}
	}
	a.cancel()
	b.cancel()
	s := l.summarize()
	redel := s.MaxRedelivery
	l.report(t, qc, queue, fmt.Sprintf("stale_acks_rejected=%d/%d acked_counter=%d lease=%v lease_to_redelivery=%v",
		stale, k, c.GetAcked(), lease, redel.Round(time.Millisecond)))
	checkNoStrays(t, rs.Client(t, 0), queue)
}
