package server_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

func TestEnqueueConsumeAck(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 10*time.Second)
	before := time.Now().Add(-time.Second)
	resp, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "jobs", Payload: []byte("hello"), Headers: map[string]string{"k": "v"}, Id: "job-1"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetId() != "job-1" {
		t.Fatalf("id = %q, want the client-chosen job-1", resp.GetId())
	}
	gen, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "jobs", Payload: []byte("second")})
	if err != nil {
		t.Fatal(err)
	}
	if len(gen.GetId()) != 36 {
		t.Fatalf("server-assigned id %q is not a UUID", gen.GetId())
	}
	if r, f := stats(t, in.client, "jobs"); r != 2 || f != 0 {
		t.Fatalf("stats before consume = %d ready, %d in flight; want 2, 0", r, f)
	}

	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "jobs"})
	d := s.next(t, 5*time.Second)
	if d.GetId() != "job-1" || string(d.GetPayload()) != "hello" || d.GetHeaders()["k"] != "v" || d.GetAttempt() != 1 || d.GetQueue() != "jobs" {
		t.Fatalf("delivery = %v", d)
	}
	if d.GetAckToken() == "" || d.GetLeaseDeadline() == nil {
		t.Fatalf("delivery lacks ack token or lease deadline: %v", d)
	}
	if et := d.GetEnqueueTime().AsTime(); et.Before(before) || et.After(time.Now().Add(time.Second)) {
		t.Fatalf("enqueue time %v is not now", et)
	}
	if dl := d.GetLeaseDeadline().AsTime(); time.Until(dl) < 20*time.Second || time.Until(dl) > 31*time.Second {
		t.Fatalf("lease deadline %v is not about 30s (the default) away", dl)
	}
	d2 := s.next(t, 5*time.Second)
	if string(d2.GetPayload()) != "second" {
		t.Fatalf("second delivery = %q: FIFO order broken", d2.GetPayload())
	}
	if r, f := stats(t, in.client, "jobs"); r != 0 || f != 2 {
		t.Fatalf("stats while held = %d ready, %d in flight; want 0, 2", r, f)
	}
	if err := ack(t, in.client, d, d2); err != nil {
		t.Fatal(err)
	}
	if r, f := stats(t, in.client, "jobs"); r != 0 || f != 0 {
		t.Fatalf("stats after ack = %d ready, %d in flight; want 0, 0", r, f)
	}
	// Acking again is a stale token now.
	wantCode(t, ack(t, in.client, d), codes.FailedPrecondition, "no longer hold a lease")
}

func TestIdleConsumerWakesOnEnqueue(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "idle"})
	// Let the dispatcher reach its blocking wait: a wait slice is 1s in
	// these tests, so a delivery that arrives well inside it was woken by
	// Redis, not by a re-poll.
	time.Sleep(50 * time.Millisecond) // not synchronisation: the test passes either way, it only makes the wait path likely
	start := time.Now()
	if _, err := in.client.Enqueue(ctxT(t, 5*time.Second), &qbridgev1.EnqueueRequest{Queue: "idle", Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	s.next(t, 5*time.Second)
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Fatalf("waiting consumer got the message after %v; want milliseconds", el)
	}
}

func TestCreditWindow(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	enqueueN(t, in.client, "win", 5)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "win", MaxInFlight: 2})
	a := s.next(t, 5*time.Second)
	s.next(t, 5*time.Second)
	eventually(t, 5*time.Second, "2 in flight, 3 ready", func() bool {
		r, f := stats(t, in.client, "win")
		return r == 3 && f == 2
	})
	s.none(t)
	if err := ack(t, in.client, a); err != nil {
		t.Fatal(err)
	}
	c := s.next(t, 5*time.Second)
	if string(c.GetPayload()) != "m2" {
		t.Fatalf("third delivery = %q, want m2", c.GetPayload())
	}
	if r, f := stats(t, in.client, "win"); r != 2 || f != 2 {
		t.Fatalf("after one ack: %d ready, %d in flight; want 2, 2", r, f)
	}
}

// Invariant 1: every message is, at every instant, either ready or in
// flight. Consumers take and give back messages as fast as they can while a
// sampler reads both counts atomically (one Lua call).
func TestInvariantAlwaysReadyOrInFlight(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	const n = 300
	enqueueN(t, a.client, "atomic", n)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var moves atomic.Int64
	for i, in := range []*instance{a, a, b, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := in.client.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "atomic", MaxInFlight: uint32(8 * (i + 1))})
			if err != nil {
				return
			}
			for k := 0; ; k++ {
				resp, err := st.Recv()
				if err != nil {
					return
				}
				var toks []string
				for _, d := range resp.GetDeliveries() {
					toks = append(toks, d.GetAckToken())
				}
				// Nack (requeue) most; let the stream end hold some.
				if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: toks}); err == nil {
					moves.Add(int64(len(toks)))
				}
			}
		}()
	}
	// Every place a message can be: ready, in flight, delayed, dead (the
	// churn exhausts max attempts, so some end up dead).
	snap := `return {redis.call('LLEN', KEYS[1]), redis.call('HLEN', KEYS[2]), redis.call('HLEN', KEYS[3]), redis.call('HLEN', KEYS[4])}`
	keys := []string{"atomic", "{atomic}:qb:inflight", "{atomic}:qb:scheduled", "{atomic}:qb:dead"}
	samples := 0
	var last []int64
	for ctx.Err() == nil {
		v, err := a.rdb.Eval(context.Background(), snap, keys).Int64Slice()
		if err != nil {
			t.Fatal(err)
		}
		if v[0]+v[1]+v[2]+v[3] != n {
			t.Fatalf("sample %d: %d ready + %d in flight + %d delayed + %d dead; want %d in all", samples, v[0], v[1], v[2], v[3], n)
		}
		last = v
		samples++
	}
	cancel()
	wg.Wait()
	if moves.Load() < 100 {
		t.Fatalf("only %d moves happened; the test did not exercise anything", moves.Load())
	}
	eventually(t, 5*time.Second, "nothing in flight after every stream ended", func() bool {
		v, err := a.rdb.Eval(context.Background(), snap, keys).Int64Slice()
		return err == nil && v[1] == 0 && v[0]+v[2]+v[3] == n
	})
	t.Logf("%d samples, %d requeues, last sample %v", samples, moves.Load(), last)
}

// Invariant 2 and competing consumers: 8 consumers on two instances share
// 10k messages; each is delivered to exactly one of them.
func TestCompetingConsumersAcrossInstances(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	n := 10000
	if testing.Short() {
		n = 2000
	}
	ids := enqueueN(t, a.client, "compete", n)
	var mu sync.Mutex
	seen := map[string]int{}
	perConsumer := make([]int, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var total atomic.Int64
	for i := 0; i < 8; i++ {
		in := a
		if i%2 == 1 {
			in = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := in.client.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "compete", MaxInFlight: 32})
			if err != nil {
				t.Errorf("consume: %v", err)
				return
			}
			for total.Load() < int64(n) {
				resp, err := st.Recv()
				if err != nil {
					return
				}
				var toks []string
				mu.Lock()
				for _, d := range resp.GetDeliveries() {
					seen[d.GetId()]++
					perConsumer[i]++
					toks = append(toks, d.GetAckToken())
				}
				mu.Unlock()
				if _, err := in.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: toks}); err != nil {
					t.Errorf("ack: %v", err)
					return
				}
				if total.Add(int64(len(toks))) >= int64(n) {
					cancel()
				}
			}
		}()
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	for _, id := range ids {
		if seen[id] != 1 {
			t.Fatalf("message %s delivered %d times; want exactly once", id, seen[id])
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct ids delivered; want %d", len(seen), n)
	}
	busy := 0
	for _, c := range perConsumer {
		if c > 0 {
			busy++
		}
	}
	if busy < 2 {
		t.Fatalf("only %d of 8 consumers got work: %v", busy, perConsumer)
	}
	if r, f := stats(t, a.client, "compete"); r != 0 || f != 0 {
		t.Fatalf("after draining: %d ready, %d in flight", r, f)
	}
	t.Logf("per consumer: %v", perConsumer)
}

// Invariant 3: when a stream ends for any reason, what it holds is ready
// again at once (the lease is a minute, so nothing here waits for it).
// Invariant 6: the redelivery keeps the id and counts the attempt.
func TestStreamEndRequeuesAtOnce(t *testing.T) {
	rs := redistest.Start(t)
	for _, tc := range []struct {
		name string
		end  func(in *instance, s *stream)
		code codes.Code
	}{
		{"client cancels", func(in *instance, s *stream) { s.cancel() }, codes.Canceled},
		{"connection breaks", func(in *instance, s *stream) { _ = in.conn.Close() }, codes.Canceled},
		{"server shuts down", func(in *instance, s *stream) { in.srv.StopStreams() }, codes.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := "end-" + itoa(int(time.Now().UnixNano()%1e6))
			in := startInstance(t, rs, instanceConfig{})
			ids := enqueueN(t, in.client, q, 5)
			s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(time.Minute), MaxInFlight: 3})
			got := []*qbridgev1.Delivery{s.next(t, 5*time.Second), s.next(t, 5*time.Second), s.next(t, 5*time.Second)}
			if err := ack(t, in.client, got[1]); err != nil {
				t.Fatal(err)
			}
			// The ack freed one credit: the stream takes the 4th message.
			if d := s.next(t, 5*time.Second); d.GetId() != ids[3] {
				t.Fatalf("after the ack got %s, want %s", d.GetId(), ids[3])
			}
			tc.end(in, s)
			if err := s.err(t, 5*time.Second); tc.code != codes.Canceled && err != nil {
				wantCode(t, err, tc.code, "")
			}
			// Check Redis directly: a closed connection cannot ask for stats.
			eventually(t, 2*time.Second, "4 messages back in the ready list", func() bool {
				return in.rdb.LLen(context.Background(), q).Val() == 4 && in.rdb.HLen(context.Background(), "{"+q+"}:qb:inflight").Val() == 0
			})
			other := startInstance(t, rs, instanceConfig{})
			s2 := consume(t, other.client, &qbridgev1.ConsumeRequest{Queue: q})
			want := []struct {
				id      string
				attempt uint32
			}{{ids[0], 2}, {ids[2], 2}, {ids[3], 2}, {ids[4], 1}}
			for _, w := range want {
				d := s2.next(t, 5*time.Second)
				if d.GetId() != w.id || d.GetAttempt() != w.attempt {
					t.Fatalf("redelivery = id %s attempt %d; want id %s attempt %d (order kept, id kept, attempt counted)", d.GetId(), d.GetAttempt(), w.id, w.attempt)
				}
			}
		})
	}
}

// Invariants 4 and 5: a lease that runs out is requeued by the reaper and
// redelivered with the same id and attempt + 1; the old token is then
// rejected and does not touch the new delivery.
func TestLeaseExpiryAndFencedAck(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	id := enqueueN(t, a.client, "fence", 1)[0]
	// One stream that never acks, with a window of 1: it gets the message
	// again only after its lease ran out and the reaper requeued it.
	s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: "fence", LeaseDuration: lease(2 * time.Second), MaxInFlight: 1})
	first := s.next(t, 5*time.Second)
	start := time.Now()
	second := s.next(t, 10*time.Second)
	if el := time.Since(start); el < time.Second {
		t.Fatalf("redelivered after %v, before the 2s lease ran out", el)
	}
	if second.GetId() != id || second.GetAttempt() != 2 || second.GetAckToken() == first.GetAckToken() {
		t.Fatalf("redelivery id %s attempt %d; want %s attempt 2 with a new token", second.GetId(), second.GetAttempt(), id)
	}
	ctx := ctxT(t, 5*time.Second)
	// Keep the new delivery from expiring while the test looks at it.
	if _, err := a.client.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{AckTokens: []string{second.GetAckToken()}, LeaseDuration: lease(time.Minute)}); err != nil {
		t.Fatalf("extend the current delivery: %v", err)
	}
	// Stale tokens are rejected on any instance, for every operation.
	for _, in := range []*instance{a, b} {
		wantCode(t, ack(t, in.client, first), codes.FailedPrecondition, "no longer hold a lease")
		_, err := in.client.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{AckTokens: []string{first.GetAckToken()}})
		wantCode(t, err, codes.FailedPrecondition, "")
		_, err = in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{first.GetAckToken()}})
		wantCode(t, err, codes.FailedPrecondition, "")
	}
	if r, f := stats(t, a.client, "fence"); r != 0 || f != 1 {
		t.Fatalf("the stale tokens touched the new delivery: %d ready, %d in flight; want 0, 1", r, f)
	}
	// A batch with one stale and one current token acks the current one
	// and says so.
	_, err := b.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{first.GetAckToken(), second.GetAckToken()}})
	wantCode(t, err, codes.FailedPrecondition, "1 of 2 ack tokens")
	if r, f := stats(t, a.client, "fence"); r != 0 || f != 0 {
		t.Fatalf("after ack: %d ready, %d in flight", r, f)
	}
}

func TestNackAndExtend(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ids := enqueueN(t, in.client, "nack", 2)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "nack", MaxInFlight: 1, LeaseDuration: lease(5 * time.Second)})
	d := s.next(t, 5*time.Second)
	ctx := ctxT(t, 10*time.Second)
	ext, err := in.client.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{AckTokens: []string{d.GetAckToken()}, LeaseDuration: lease(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if time.Until(ext.GetLeaseDeadline().AsTime()) < 50*time.Minute {
		t.Fatalf("extended deadline %v is not about an hour away", ext.GetLeaseDeadline().AsTime())
	}
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
		t.Fatal(err)
	}
	again := s.next(t, 5*time.Second)
	if again.GetId() != ids[0] || again.GetAttempt() != 2 {
		t.Fatalf("after nack got %s attempt %d; want %s attempt 2 (requeued at the head)", again.GetId(), again.GetAttempt(), ids[0])
	}
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{again.GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_DROP}); err != nil {
		t.Fatal(err)
	}
	last := s.next(t, 5*time.Second)
	if last.GetId() != ids[1] {
		t.Fatalf("after drop got %s, want %s", last.GetId(), ids[1])
	}
	if r, f := stats(t, in.client, "nack"); r != 0 || f != 1 {
		t.Fatalf("dropped message still counted: %d ready, %d in flight", r, f)
	}
}

func TestAutoAck(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	enqueueN(t, in.client, "auto", 3)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "auto", AutoAck: true})
	for i := 0; i < 3; i++ {
		d := s.next(t, 5*time.Second)
		if d.GetAckToken() != "" || d.GetAttempt() != 1 || string(d.GetPayload()) != fmt.Sprintf("m%d", i) {
			t.Fatalf("auto-ack delivery %d = %v", i, d)
		}
	}
	if r, f := stats(t, in.client, "auto"); r != 0 || f != 0 {
		t.Fatalf("auto-ack left %d ready, %d in flight", r, f)
	}
	// Auto-acked deliveries count as acked (stats, metrics and the
	// dashboard's throughput read this total).
	st, err := in.client.GetQueueStats(ctxT(t, 5*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: "auto"})
	if err != nil {
		t.Fatal(err)
	}
	if got := st.GetCounters().GetAcked(); got != 3 {
		t.Fatalf("acked total %d after 3 auto-ack deliveries; want 3", got)
	}
	s.cancel()
	s.err(t, 5*time.Second)
	if r, _ := stats(t, in.client, "auto"); r != 0 {
		t.Fatalf("auto-ack deliveries came back after the stream ended: %d ready", r)
	}
}

// A stream on one instance whose deliveries are acked through another
// (round-robin clients) gets its credit back at once, not after the lease.
func TestAckOnOtherInstanceFreesCredit(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	enqueueN(t, a.client, "cross", 3)
	s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: "cross", MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
	for i := 0; i < 3; i++ {
		d := s.next(t, 5*time.Second)
		if string(d.GetPayload()) != fmt.Sprintf("m%d", i) {
			t.Fatalf("delivery %d = %q", i, d.GetPayload())
		}
		if err := ack(t, b.client, d); err != nil {
			t.Fatal(err)
		}
	}
	// Nack through b frees credit too.
	enqueueN(t, a.client, "cross", 1)
	d := s.next(t, 5*time.Second)
	if _, err := b.client.Nack(ctxT(t, 5*time.Second), &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
		t.Fatal(err)
	}
	if again := s.next(t, 5*time.Second); again.GetId() != d.GetId() || again.GetAttempt() != 2 {
		t.Fatalf("after a nack through b: %v", again)
	}
}

// max_messages caps what a stream takes in all: it can take exactly N,
// and nothing more is charged an attempt when it closes.
func TestConsumeMaxMessages(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ids := enqueueN(t, in.client, "exact", 3)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "exact", MaxMessages: 1})
	d := s.next(t, 5*time.Second)
	if d.GetId() != ids[0] {
		t.Fatalf("got %s, want %s", d.GetId(), ids[0])
	}
	if err := ack(t, in.client, d); err != nil {
		t.Fatal(err)
	}
	// The ack freed credit, but the stream has had its one message.
	if r, f := stats(t, in.client, "exact"); r != 2 || f != 0 {
		t.Fatalf("after the ack: %d ready, %d in flight; want 2, 0", r, f)
	}
	s.none(t)
	s.cancel()
	s.err(t, 5*time.Second)
	p, err := in.admin.PeekMessages(ctxT(t, 5*time.Second), &qbridgev1.PeekMessagesRequest{Queue: "exact", State: qbridgev1.MessageState_MESSAGE_STATE_READY})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range p.GetMessages() {
		if m.GetDeliveries() != 0 {
			t.Fatalf("message %s was charged %d deliveries without being delivered", m.GetId(), m.GetDeliveries())
		}
	}
}
