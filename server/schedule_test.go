package server_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/broker"
)

// Tests of delayed and scheduled messages (and the promoter), idempotent
// enqueue (dedup), message expiry (ttl) and bounded queues.
//
// Time is taken from Redis wherever the server's view matters: due times
// and expiry are computed by the scripts from Redis TIME, and a delivery's
// lease deadline is Redis TIME at the claim plus the lease, so
// leaseDeadline - lease is when the server took the message off the ready
// list, on the same clock as its due time.

const schedLease = time.Minute // long enough that no test here sees a lease expire

// schedRedisNow reads Redis's clock.
func schedRedisNow(t *testing.T, rdb *redis.Client) time.Time {
	t.Helper()
	now, err := rdb.Time(context.Background()).Result()
	if err != nil {
		t.Fatalf("redis TIME: %v", err)
	}
	return now
}

// schedClockOffset estimates Redis's clock minus the local clock, from the
// TIME round trip with the smallest RTT of a few.
func schedClockOffset(t *testing.T, rdb *redis.Client) (offset, rtt time.Duration) {
	t.Helper()
	rtt = time.Hour
	for i := 0; i < 5; i++ {
		before := time.Now()
		r := schedRedisNow(t, rdb)
		after := time.Now()
		if d := after.Sub(before); d < rtt {
			rtt = d
			offset = r.Sub(before.Add(d / 2))
		}
	}
	return offset, rtt
}

// schedClaimTime is when the server leased d (Redis clock, ms precision).
func schedClaimTime(d *qbridgev1.Delivery) time.Time {
	return d.GetLeaseDeadline().AsTime().Add(-schedLease)
}

func schedStats(t *testing.T, c qbridgev1.QueueServiceClient, q string) *qbridgev1.GetQueueStatsResponse {
	t.Helper()
	r, err := c.GetQueueStats(ctxT(t, 5*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil {
		t.Fatalf("stats of %s: %v", q, err)
	}
	return r
}

func schedEnqueue(t *testing.T, c qbridgev1.QueueServiceClient, req *qbridgev1.EnqueueRequest) *qbridgev1.EnqueueResponse {
	t.Helper()
	r, err := c.Enqueue(ctxT(t, 5*time.Second), req)
	if err != nil {
		t.Fatalf("enqueue to %s: %v", req.GetQueue(), err)
	}
	return r
}

func schedSetConfig(t *testing.T, a qbridgev1.AdminServiceClient, q string, cfg *qbridgev1.QueueConfig) *qbridgev1.QueueConfig {
	t.Helper()
	r, err := a.UpdateQueueConfig(ctxT(t, 5*time.Second), &qbridgev1.UpdateQueueConfigRequest{Queue: q, Config: cfg})
	if err != nil {
		t.Fatalf("update config of %s: %v", q, err)
	}
	return r.GetConfig()
}

func schedPeek(t *testing.T, a qbridgev1.AdminServiceClient, q string, st qbridgev1.MessageState) []*qbridgev1.QueuedMessage {
	t.Helper()
	r, err := a.PeekMessages(ctxT(t, 5*time.Second), &qbridgev1.PeekMessagesRequest{Queue: q, State: st, PageSize: 1000})
	if err != nil {
		t.Fatalf("peek %s: %v", q, err)
	}
	return r.GetMessages()
}

// schedHeld reads ready + delayed of q atomically (one script).
func schedHeld(ctx context.Context, rdb *redis.Client, q string) (int64, error) {
	return rdb.Eval(ctx, `return redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])`,
		[]string{q, "{" + q + "}:qb:delayed"}).Int64()
}

// schedTimedDelivery is a delivery with the local time the client received it.
type schedTimedDelivery struct {
	d  *qbridgev1.Delivery
	at time.Time
}

// schedConsumeTimed is like consume, but stamps each delivery as soon as the
// stream's Recv returns it.
func schedConsumeTimed(t *testing.T, c qbridgev1.QueueServiceClient, req *qbridgev1.ConsumeRequest) <-chan schedTimedDelivery {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	st, err := c.Consume(ctx, req)
	if err != nil {
		t.Fatalf("consume: %v", err)
	}
	ch := make(chan schedTimedDelivery, 100000)
	go func() {
		defer close(ch)
		for {
			resp, err := st.Recv()
			if err != nil {
				return
			}
			at := time.Now()
			for _, d := range resp.GetDeliveries() {
				ch <- schedTimedDelivery{d, at}
			}
		}
	}()
	return ch
}

func schedNextTimed(t *testing.T, ch <-chan schedTimedDelivery, within time.Duration) schedTimedDelivery {
	t.Helper()
	select {
	case td, ok := <-ch:
		if !ok {
			t.Fatal("stream ended")
		}
		return td
	case <-time.After(within):
		t.Fatalf("no delivery within %v", within)
	}
	return schedTimedDelivery{}
}

// schedPercentile returns the p-th percentile (nearest rank) of sorted ds.
func schedPercentile(sorted []time.Duration, p int) time.Duration {
	i := (len(sorted)*p + 99) / 100
	return sorted[max(0, i-1)]
}

// schedWaitRedisPast waits until Redis's clock is past at.
func schedWaitRedisPast(t *testing.T, rdb *redis.Client, at time.Time) {
	t.Helper()
	eventually(t, 10*time.Second, "Redis clock past "+at.Format(time.StampMilli), func() bool {
		return schedRedisNow(t, rdb).After(at)
	})
}

// ---------------------------------------------------------------------------
// Delayed and scheduled messages

// A delayed or scheduled message waits in the delayed set (not ready, not
// delivered to a waiting consumer) until its due time, then is delivered. A
// deliver_at in the past, or a zero delay, is ready at once.
func TestScheduledDelivery(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const wait = 600 * time.Millisecond
	cases := []struct {
		name string
		// set fills in the schedule; now is Redis's clock just before the
		// enqueue. It returns the earliest due time allowed.
		set       func(r *qbridgev1.EnqueueRequest, now time.Time) time.Time
		wantReady bool
	}{
		{"delay", func(r *qbridgev1.EnqueueRequest, now time.Time) time.Time {
			r.Delay = durationpb.New(wait)
			return now.Add(wait)
		}, false},
		{"deliver_at", func(r *qbridgev1.EnqueueRequest, now time.Time) time.Time {
			at := now.Add(wait)
			r.DeliverAt = timestamppb.New(at)
			return at
		}, false},
		{"deliver_at in the past", func(r *qbridgev1.EnqueueRequest, now time.Time) time.Time {
			r.DeliverAt = timestamppb.New(now.Add(-time.Hour))
			return time.Time{}
		}, true},
		{"deliver_at before 1970", func(r *qbridgev1.EnqueueRequest, now time.Time) time.Time {
			r.DeliverAt = timestamppb.New(time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC))
			return time.Time{}
		}, true},
		{"zero delay", func(r *qbridgev1.EnqueueRequest, now time.Time) time.Time {
			r.Delay = durationpb.New(0)
			return time.Time{}
		}, true},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			q := "sched-" + itoa(i)
			req := &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(tc.name)}
			due := tc.set(req, schedRedisNow(t, in.rdb))
			var s *stream
			minWait := time.Duration(0)
			if !tc.wantReady {
				// The consumer waits first: a delayed message must not
				// reach it early.
				s = consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(schedLease)})
				// The least time left until the due time, on the local
				// clock (the clocks agree to microseconds on one host).
				minWait = due.Sub(schedRedisNow(t, in.rdb))
			}
			start := time.Now()
			resp := schedEnqueue(t, in.client, req)
			st := schedStats(t, in.client, q)
			if tc.wantReady {
				if st.GetDelayed() != 0 || st.GetReady() != 1 {
					t.Fatalf("right after enqueue: %d delayed, %d ready; want 0, 1 (ready at once)", st.GetDelayed(), st.GetReady())
				}
				s = consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(schedLease)})
				if d := s.next(t, 5*time.Second); d.GetId() != resp.GetId() || string(d.GetPayload()) != tc.name {
					t.Fatalf("delivery = %v; want %s", d, resp.GetId())
				}
				return
			}
			// Promptly after the enqueue, well before the due time.
			if el := time.Since(start); el < wait/2 {
				if st.GetDelayed() != 1 || st.GetReady() != 0 || st.GetInFlight() != 0 {
					t.Fatalf("right after enqueue: %d delayed, %d ready, %d in flight; want 1, 0, 0", st.GetDelayed(), st.GetReady(), st.GetInFlight())
				}
				s.none(t)
			} else {
				t.Logf("the stats call came %v after the enqueue; not checking the delayed state", el)
			}
			peek := schedPeek(t, in.admin, q, qbridgev1.MessageState_MESSAGE_STATE_DELAYED)
			if len(peek) != 1 || peek[0].GetId() != resp.GetId() || peek[0].GetDeliverTime().AsTime().Before(due.Truncate(time.Millisecond)) {
				t.Fatalf("delayed messages = %v; want %s due at %v", peek, resp.GetId(), due)
			}
			d := s.next(t, 5*time.Second)
			if d.GetId() != resp.GetId() || string(d.GetPayload()) != tc.name || d.GetAttempt() != 1 {
				t.Fatalf("delivery = %v; want %s attempt 1", d, resp.GetId())
			}
			// Due times have millisecond precision in Redis.
			claimed := schedClaimTime(d)
			if claimed.Before(due.Truncate(time.Millisecond)) {
				t.Fatalf("claimed at %v (Redis clock), %v before its due time %v", claimed.Format(time.StampMilli), due.Sub(claimed), due.Format(time.StampMilli))
			}
			if el := time.Since(start); el < minWait-2*time.Millisecond {
				t.Fatalf("delivered %v after the enqueue, when %v were left until its due time", el, minWait)
			}
			if late := claimed.Sub(due); late > time.Second {
				t.Fatalf("claimed %v after its due time", late)
			}
			st = schedStats(t, in.client, q)
			if st.GetDelayed() != 0 || st.GetReady() != 0 || st.GetInFlight() != 1 {
				t.Fatalf("after delivery: %d delayed, %d ready, %d in flight; want 0, 0, 1", st.GetDelayed(), st.GetReady(), st.GetInFlight())
			}
		})
	}
}

// Messages scheduled out of order, one by one and in a batch, are
// delivered in due order.
func TestScheduledDueOrder(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q, n = "due-order", 8
	const step = 60 * time.Millisecond
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 100, LeaseDuration: lease(schedLease)})
	base := schedRedisNow(t, in.rdb).Add(700 * time.Millisecond).Truncate(time.Millisecond)
	due := func(k int) time.Time { return base.Add(time.Duration(k) * step) }
	order := []int{5, 2, 7, 0, 3, 6, 1, 4} // k = rank in due order
	ctx := ctxT(t, 10*time.Second)
	// The first half one by one, the rest in one batch.
	for _, k := range order[:n/2] {
		req := &qbridgev1.EnqueueRequest{Queue: q, Id: "k" + itoa(k), Payload: []byte(itoa(k)), DeliverAt: timestamppb.New(due(k))}
		schedEnqueue(t, in.client, req)
	}
	var batch []*qbridgev1.BatchMessage
	for _, k := range order[n/2:] {
		batch = append(batch, &qbridgev1.BatchMessage{Id: "k" + itoa(k), Payload: []byte(itoa(k)), DeliverAt: timestamppb.New(due(k))})
	}
	if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: batch}); err != nil {
		t.Fatal(err)
	}
	// One message that is ready at once goes first.
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "now", Payload: []byte("now")})
	if now := schedRedisNow(t, in.rdb); !now.Before(base) {
		t.Fatalf("scheduling took until %v, past the first due time %v: the test cannot check order", now, base)
	}
	peek := schedPeek(t, in.admin, q, qbridgev1.MessageState_MESSAGE_STATE_DELAYED)
	if len(peek) != n {
		t.Fatalf("%d delayed messages; want %d", len(peek), n)
	}
	for k, m := range peek {
		if m.GetId() != "k"+itoa(k) || !m.GetDeliverTime().AsTime().Equal(due(k)) {
			t.Fatalf("delayed[%d] = %s due %v; want k%d due %v (PeekMessages lists due first)", k, m.GetId(), m.GetDeliverTime().AsTime(), k, due(k))
		}
	}
	if d := s.next(t, 5*time.Second); d.GetId() != "now" {
		t.Fatalf("first delivery %s; want the message that was ready at once", d.GetId())
	}
	for k := 0; k < n; k++ {
		d := s.next(t, 5*time.Second)
		if d.GetId() != "k"+itoa(k) {
			t.Fatalf("delivery %d is %s; want k%d (due order)", k, d.GetId(), k)
		}
		if c := schedClaimTime(d); c.Before(due(k)) {
			t.Fatalf("k%d claimed at %v, before its due time %v", k, c, due(k))
		}
	}
}

// Messages with the same due time keep their enqueue order, like the
// messages of a batch that are ready at once.
func TestScheduledSameDueTimeKeepsOrder(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q, n = "same-due", 12
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 100, LeaseDuration: lease(schedLease)})
	at := timestamppb.New(schedRedisNow(t, in.rdb).Add(300 * time.Millisecond))
	var batch []*qbridgev1.BatchMessage
	for k := 0; k < n; k++ {
		batch = append(batch, &qbridgev1.BatchMessage{Id: "k" + itoa(k), DeliverAt: at})
	}
	if _, err := in.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: batch}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for k := 0; k < n; k++ {
		got = append(got, s.next(t, 5*time.Second).GetId())
	}
	for k, id := range got {
		if id != "k"+itoa(k) {
			t.Fatalf("delivered in the order %v; want the batch order k0..k%d", got, n-1)
		}
	}
}

// Bad schedules, ttls and dedup keys are refused with INVALID_ARGUMENT and
// write nothing.
func TestScheduleBadInput(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q = "bad-sched"
	now := time.Now()
	d := durationpb.New
	year := 365 * 24 * time.Hour
	cases := []struct {
		name string
		m    *qbridgev1.BatchMessage
		msg  string
	}{
		{"delay and deliver_at", &qbridgev1.BatchMessage{Delay: d(time.Second), DeliverAt: timestamppb.New(now.Add(time.Minute))}, "not both"},
		{"zero delay and deliver_at", &qbridgev1.BatchMessage{Delay: d(0), DeliverAt: timestamppb.New(now.Add(time.Minute))}, "not both"},
		{"negative delay", &qbridgev1.BatchMessage{Delay: d(-time.Second)}, "delay -1s is out of range"},
		{"delay over a year", &qbridgev1.BatchMessage{Delay: d(year + time.Second)}, "out of range"},
		{"invalid delay", &qbridgev1.BatchMessage{Delay: &durationpb.Duration{Seconds: 1, Nanos: -1}}, "delay"},
		{"deliver_at over a year ahead", &qbridgev1.BatchMessage{DeliverAt: timestamppb.New(now.Add(year + time.Hour))}, "more than"},
		{"invalid deliver_at", &qbridgev1.BatchMessage{DeliverAt: &timestamppb.Timestamp{Seconds: 1e12}}, "deliver_at"},
		{"negative ttl", &qbridgev1.BatchMessage{Ttl: d(-time.Second)}, "ttl"},
		{"ttl over a year", &qbridgev1.BatchMessage{Ttl: d(year + time.Second)}, "ttl"},
		{"dedup key with a space", &qbridgev1.BatchMessage{DedupKey: "a key"}, "dedup_key"},
		{"dedup key with a control byte", &qbridgev1.BatchMessage{DedupKey: "a\x01"}, "dedup_key"},
		{"dedup key not ASCII", &qbridgev1.BatchMessage{DedupKey: "clé"}, "dedup_key"},
		{"dedup key too long", &qbridgev1.BatchMessage{DedupKey: strings.Repeat("k", 129)}, "dedup_key"},
	}
	ctx := ctxT(t, 20*time.Second)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.m
			_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x"),
				Delay: m.Delay, DeliverAt: m.DeliverAt, Ttl: m.Ttl, DedupKey: m.DedupKey})
			wantCode(t, err, codes.InvalidArgument, tc.msg)
			// In a batch the message is named, and the good one next to it
			// is not written either.
			m.Payload = []byte("x")
			_, err = in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{{Payload: []byte("good")}, m}})
			wantCode(t, err, codes.InvalidArgument, "messages[1]: ")
			wantCode(t, err, codes.InvalidArgument, tc.msg)
		})
	}
	st := schedStats(t, in.client, q)
	if st.GetReady()+st.GetDelayed()+st.GetCounters().GetEnqueued() != 0 {
		t.Fatalf("refused enqueues wrote something: %v", st)
	}
	if n := in.rdb.HKeys(ctx, "{"+q+"}:qb:dedup").Val(); len(n) != 0 {
		t.Fatalf("refused enqueues remembered dedup keys %v", n)
	}
	// The bounds themselves are accepted.
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Delay: d(year)})
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, DeliverAt: timestamppb.New(time.Now().Add(year - time.Minute))})
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Ttl: d(year), DedupKey: strings.Repeat("k", 128)})
	if st := schedStats(t, in.client, q); st.GetDelayed() != 2 || st.GetReady() != 1 {
		t.Fatalf("boundary values: %d delayed, %d ready; want 2, 1", st.GetDelayed(), st.GetReady())
	}
}

// ---------------------------------------------------------------------------
// The promoter

// The issue asks for promotion within 100ms of the due time (p99). 100
// messages due over one second, scheduled in random order in a few
// batches, are consumed by a waiting stream. Lateness is measured twice:
// at the claim, from the lease deadline (Redis clock, so exactly the
// server's view: promoter wake-up, promote script, the dispatcher's
// wake-up and claim), and at the client, from the local receive time
// mapped onto Redis's clock (adds the gRPC send and the client's
// scheduling).
//
// A reference runs alongside: at each due time a local timer enqueues a
// ready message to a second queue with its own waiting stream, the same
// path minus the promoter. On an idle machine it is a few ms late; on two
// CPUs shared with -race and busy loops its p99 reaches hundreds of ms,
// which no promoter can beat. The budget is therefore 100ms on top of what
// the reference measured: the promoter may add at most 100ms (p99) over an
// immediate enqueue at the due time, which on an idle machine is the
// requirement itself, and a promoter that misses its wake-ups (late by up
// to its 1s idle time) still fails.
func TestPromotionLatency(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q, refQ, n = "latency", "latency-ref", 100
	const spread = time.Second
	ch := schedConsumeTimed(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 256, LeaseDuration: lease(schedLease)})
	refCh := schedConsumeTimed(t, in.client, &qbridgev1.ConsumeRequest{Queue: refQ, MaxInFlight: 256, LeaseDuration: lease(schedLease)})
	// Warm up: both streams are attached and their dispatchers wait in
	// Redis.
	for _, c := range []struct {
		q  string
		ch <-chan schedTimedDelivery
	}{{q, ch}, {refQ, refCh}} {
		schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: c.q, Id: "warm"})
		if td := schedNextTimed(t, c.ch, 5*time.Second); td.d.GetId() != "warm" {
			t.Fatalf("warm-up delivery %s", td.d.GetId())
		}
	}
	offset, rtt := schedClockOffset(t, in.rdb)
	base := schedRedisNow(t, in.rdb).Add(600 * time.Millisecond).Truncate(time.Millisecond)
	due := make(map[string]time.Time, n)
	perm := rand.Perm(n)
	ctx := ctxT(t, 20*time.Second)
	for b := 0; b < 4; b++ {
		var msgs []*qbridgev1.BatchMessage
		for _, i := range perm[b*n/4 : (b+1)*n/4] {
			id := "lat-" + itoa(i)
			due[id] = base.Add(time.Duration(i) * spread / n)
			msgs = append(msgs, &qbridgev1.BatchMessage{Id: id, DeliverAt: timestamppb.New(due[id])})
		}
		if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs}); err != nil {
			t.Fatal(err)
		}
	}
	var refWG sync.WaitGroup
	var timers []*time.Timer
	defer func() {
		for _, tm := range timers {
			if tm.Stop() {
				refWG.Done() // never ran
			}
		}
		refWG.Wait()
	}()
	for id, dt := range due {
		refWG.Add(1)
		timers = append(timers, time.AfterFunc(time.Until(dt.Add(-offset)), func() {
			defer refWG.Done()
			if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: refQ, Id: id}); err != nil && ctx.Err() == nil {
				t.Errorf("reference enqueue: %v", err)
			}
		}))
	}
	if now := schedRedisNow(t, in.rdb); !now.Before(base) {
		t.Fatalf("scheduling took until %v, past the first due time %v", now, base)
	}
	// collect reads n deliveries of ch and returns their lateness at the
	// claim and at the client.
	collect := func(ch <-chan schedTimedDelivery, early bool) (atClaim, atClient []time.Duration) {
		seen := map[string]bool{}
		for len(seen) < n {
			td := schedNextTimed(t, ch, 10*time.Second)
			id := td.d.GetId()
			dt, ok := due[id]
			if !ok || seen[id] {
				t.Fatalf("unexpected delivery %s (seen before: %v)", id, seen[id])
			}
			seen[id] = true
			claim := schedClaimTime(td.d).Sub(dt)
			client := td.at.Add(offset).Sub(dt)
			// Never early: due times and the claim time are whole Redis
			// milliseconds; the client's view is within the clock
			// offset's uncertainty.
			if early && (claim < 0 || client < -rtt/2-time.Millisecond) {
				t.Fatalf("%s delivered early: claimed %v, received %v relative to its due time", id, claim, client)
			}
			atClaim = append(atClaim, claim)
			atClient = append(atClient, client)
		}
		slices.Sort(atClaim)
		slices.Sort(atClient)
		return atClaim, atClient
	}
	atClaim, atClient := collect(ch, true)
	refClaim, refClient := collect(refCh, false)
	dist := func(ds []time.Duration) string {
		return fmt.Sprintf("min %v p50 %v p90 %v p99 %v max %v", ds[0], schedPercentile(ds, 50), schedPercentile(ds, 90), schedPercentile(ds, 99), ds[len(ds)-1])
	}
	t.Logf("lateness of %d messages due over %v (clock offset %v, rtt %v):", n, spread, offset, rtt)
	t.Logf("  scheduled, at the claim:  %s", dist(atClaim))
	t.Logf("  scheduled, at the client: %s", dist(atClient))
	t.Logf("  reference, at the claim:  %s", dist(refClaim))
	t.Logf("  reference, at the client: %s", dist(refClient))
	for _, m := range []struct {
		what       string
		sched, ref []time.Duration
	}{{"at the claim", atClaim, refClaim}, {"at the client", atClient, refClient}} {
		p99, refP99 := schedPercentile(m.sched, 99), schedPercentile(m.ref, 99)
		if p99 > 100*time.Millisecond+max(0, refP99) {
			t.Errorf("p99 promotion lateness %s is %v; the requirement is 100ms (here plus the reference's %v)", m.what, p99, refP99)
		}
	}
}

// Two instances promote the same queue: every message is promoted, and so
// delivered, exactly once.
func TestPromotionTwoInstancesExactlyOnce(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	const q, n = "promote-twice", 200
	ctx := ctxT(t, 20*time.Second)
	var mu sync.Mutex
	seen := map[string]int{}
	var acked atomic.Int64
	var wg sync.WaitGroup
	cctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); wg.Wait() }()
	for _, in := range []*instance{a, b} {
		st, err := in.client.Consume(cctx, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 32, LeaseDuration: lease(schedLease)})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				resp, err := st.Recv()
				if err != nil {
					return
				}
				var toks []string
				mu.Lock()
				for _, d := range resp.GetDeliveries() {
					seen[d.GetId()]++
					toks = append(toks, d.GetAckToken())
				}
				mu.Unlock()
				if _, err := in.client.Ack(cctx, &qbridgev1.AckRequest{AckTokens: toks}); err != nil {
					if cctx.Err() == nil {
						t.Errorf("ack: %v", err)
					}
					return
				}
				acked.Add(int64(len(toks)))
			}
		}()
	}
	// Half through each instance, due over 500ms, many at the same
	// millisecond, so that both promoters find due messages at once.
	base := schedRedisNow(t, a.rdb).Add(300 * time.Millisecond)
	for half, in := range []*instance{a, b} {
		var msgs []*qbridgev1.BatchMessage
		for i := half; i < n; i += 2 {
			msgs = append(msgs, &qbridgev1.BatchMessage{Id: "p" + itoa(i), DeliverAt: timestamppb.New(base.Add(time.Duration(i/8) * 20 * time.Millisecond))})
		}
		if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 10*time.Second, "every message delivered and acked", func() bool { return acked.Load() >= n })
	// A message promoted twice would now be ready, in flight or counted
	// twice.
	st := schedStats(t, a.client, q)
	if st.GetReady()+st.GetDelayed()+st.GetInFlight() != 0 || st.GetCounters().GetAcked() != n {
		t.Fatalf("after %d acks: %d ready, %d delayed, %d in flight, %d acked; want 0, 0, 0, %d", acked.Load(), st.GetReady(), st.GetDelayed(), st.GetInFlight(), st.GetCounters().GetAcked(), n)
	}
	mu.Lock()
	defer mu.Unlock()
	for i := 0; i < n; i++ {
		if c := seen["p"+itoa(i)]; c != 1 {
			t.Fatalf("p%d delivered %d times; want exactly once", i, c)
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct ids delivered; want %d", len(seen), n)
	}
}

// A message scheduled through an instance that then stops is promoted by
// another one, which learns of it from the due index at its next look (at
// most the promoter's idle time, a second, later).
func TestPromotionSurvivesSchedulingInstance(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	plain := rs.Client(t, 0)
	const q = "orphan"
	const maxIdle = time.Second // the promoter's longest sleep (promote.go)
	s := consume(t, b.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(schedLease)})
	due := schedRedisNow(t, plain).Add(500 * time.Millisecond).Truncate(time.Millisecond)
	resp := schedEnqueue(t, a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("orphan"), DeliverAt: timestamppb.New(due)})
	a.stop()
	if st := schedStats(t, b.client, q); st.GetDelayed() != 1 {
		t.Fatalf("%d delayed after the scheduling instance stopped; want 1", st.GetDelayed())
	}
	d := s.next(t, 5*time.Second)
	if d.GetId() != resp.GetId() {
		t.Fatalf("delivered %s; want %s", d.GetId(), resp.GetId())
	}
	late := schedClaimTime(d).Sub(due)
	t.Logf("promoted by the other instance %v after its due time", late)
	if late < 0 || late > maxIdle+500*time.Millisecond {
		t.Fatalf("promoted %v after its due time; want within the promoter's idle time (%v) plus a margin", late, maxIdle)
	}
}

// A delayed message is promoted even when the write of its due time to the
// global index was lost. That write is a separate step after the enqueue
// script (server.go enqueue -> noteDue; likewise after a Nack with a
// delay): it is lost when the instance dies between the two, or when the
// ZADD fails (a connection error, a failover). The test removes the index
// entry right after the enqueue, the state these leave behind.
func TestPromotionWithoutDueIndexEntry(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q = "stranded"
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(schedLease)})
	resp := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Delay: durationpb.New(300 * time.Millisecond)})
	if err := in.rdb.ZRem(context.Background(), "qbridge:due", q).Err(); err != nil {
		t.Fatal(err)
	}
	// The promoters' sweep (every 5s) puts the entry back; then the
	// message is promoted at the next wake (at most 1s later).
	if d := s.next(t, 10*time.Second); d.GetId() != resp.GetId() {
		t.Fatalf("delivered %s; want %s", d.GetId(), resp.GetId())
	}
}

// ---------------------------------------------------------------------------
// Dedup

// Enqueues with a dedup key already seen in the window enqueue nothing and
// return the first message's id, within a batch too; keys are per queue.
func TestDedupEnqueue(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 10*time.Second)
	const q = "dedup"

	first := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("first"), DedupKey: "order-1"})
	if first.GetDuplicate() || first.GetId() == "" {
		t.Fatalf("first enqueue with a key = %v; want a fresh message", first)
	}
	// A retry, even with another id, payload and schedule, is the same
	// message.
	again := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("second"), Id: "other-id", DedupKey: "order-1", Delay: durationpb.New(time.Hour)})
	if !again.GetDuplicate() || again.GetId() != first.GetId() {
		t.Fatalf("second enqueue with the key = %v; want duplicate of %s", again, first.GetId())
	}
	other := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("other"), DedupKey: "order-2"})
	if other.GetDuplicate() || other.GetId() == first.GetId() {
		t.Fatalf("enqueue with another key = %v; want a fresh message", other)
	}
	// The same key on another queue is another key.
	elsewhere := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q + "-b", Payload: []byte("b"), DedupKey: "order-1"})
	if elsewhere.GetDuplicate() {
		t.Fatalf("the key of queue %s deduplicated an enqueue to %s-b", q, q)
	}
	st := schedStats(t, in.client, q)
	if st.GetReady() != 2 || st.GetDelayed() != 0 || st.GetCounters().GetEnqueued() != 2 {
		t.Fatalf("%d ready, %d delayed, %d enqueued; want 2, 0, 2 (duplicates not counted)", st.GetReady(), st.GetDelayed(), st.GetCounters().GetEnqueued())
	}

	// In a batch: a key remembered from before, a key repeated within the
	// batch, and messages without key.
	br, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{
		{Payload: []byte("b0"), DedupKey: "batch-1"},
		{Payload: []byte("b1"), DedupKey: "order-2"},
		{Payload: []byte("b2"), DedupKey: "batch-1", Id: "b2-id"},
		{Payload: []byte("b3")},
		{Payload: []byte("b4"), DedupKey: "batch-2"},
		{Payload: []byte("b5")},
	}})
	if err != nil {
		t.Fatal(err)
	}
	ids, dup := br.GetIds(), br.GetDuplicate()
	wantDup := []bool{false, true, true, false, false, false}
	if !slices.Equal(dup, wantDup) {
		t.Fatalf("batch duplicate flags %v; want %v", dup, wantDup)
	}
	if ids[1] != other.GetId() || ids[2] != ids[0] || len(slices.Compact(slices.Sorted(slices.Values([]string{ids[0], ids[3], ids[4], ids[5]})))) != 4 {
		t.Fatalf("batch ids %v: want [1] = %s (order-2), [2] = [0], the rest distinct", ids, other.GetId())
	}
	// A key first seen in a batch dedups later single enqueues.
	if r := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, DedupKey: "batch-2"}); !r.GetDuplicate() || r.GetId() != ids[4] {
		t.Fatalf("enqueue with a key from a batch = %v; want duplicate of %s", r, ids[4])
	}
	// What is queued is exactly the first message of each key, in order.
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 100})
	want := []string{"first", "other", "b0", "b3", "b4", "b5"}
	for _, w := range want {
		if d := s.next(t, 5*time.Second); string(d.GetPayload()) != w {
			t.Fatalf("delivered %q; want %q (the first message of each key, in order)", d.GetPayload(), w)
		}
	}
	if st := schedStats(t, in.client, q); st.GetReady() != 0 || st.GetInFlight() != int64(len(want)) || st.GetCounters().GetEnqueued() != int64(len(want)) {
		t.Fatalf("%d ready, %d in flight, %d enqueued; want 0, %d, %d", st.GetReady(), st.GetInFlight(), st.GetCounters().GetEnqueued(), len(want), len(want))
	}
	s.none(t)
	// A key stays remembered after its message was delivered.
	if r := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, DedupKey: "order-1"}); !r.GetDuplicate() || r.GetId() != first.GetId() {
		t.Fatalf("enqueue with the key of a delivered message = %v; want duplicate of %s", r, first.GetId())
	}
}

// Many producers on two instances enqueue with the same key at once: one
// message is enqueued, and every caller gets its id.
func TestDedupConcurrentAcrossInstances(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	const q, rounds, perInstance = "dedup-race", 5, 16
	ctx := ctxT(t, 20*time.Second)
	winners := make([]string, rounds)
	for r := 0; r < rounds; r++ {
		key := "key-" + itoa(r)
		type result struct {
			self, id string
			dup      bool
			err      error
		}
		results := make(chan result, 2*perInstance)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for g := 0; g < 2*perInstance; g++ {
			in := a
			if g%2 == 1 {
				in = b
			}
			self := fmt.Sprintf("r%d-g%d", r, g)
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				resp, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Id: self, Payload: []byte(self), DedupKey: key})
				results <- result{self, resp.GetId(), resp.GetDuplicate(), err}
			}()
		}
		close(start)
		wg.Wait()
		close(results)
		fresh := 0
		var ids []string
		for res := range results {
			if res.err != nil {
				t.Fatalf("round %d: %s: %v", r, res.self, res.err)
			}
			ids = append(ids, res.id)
			if !res.dup {
				fresh++
				winners[r] = res.self
				if res.id != res.self {
					t.Fatalf("round %d: the fresh enqueue got id %s; want its own %s", r, res.id, res.self)
				}
			}
		}
		if fresh != 1 {
			t.Fatalf("round %d: %d of %d concurrent enqueues with one key were fresh; want exactly 1", r, fresh, 2*perInstance)
		}
		for _, id := range ids {
			if id != winners[r] {
				t.Fatalf("round %d: callers got ids %v; want all %s", r, ids, winners[r])
			}
		}
	}
	st := schedStats(t, a.client, q)
	if st.GetReady() != rounds || st.GetCounters().GetEnqueued() != rounds {
		t.Fatalf("%d ready, %d enqueued; want %d (one per key)", st.GetReady(), st.GetCounters().GetEnqueued(), rounds)
	}
	s := consume(t, b.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 100})
	for r := 0; r < rounds; r++ {
		if d := s.next(t, 5*time.Second); d.GetId() != winners[r] || string(d.GetPayload()) != winners[r] {
			t.Fatalf("message of round %d is %s %q; want the winner %s", r, d.GetId(), d.GetPayload(), winners[r])
		}
	}
}

// Once the queue's dedup window has passed, the key is accepted again.
func TestDedupWindowExpires(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q, window = "dedup-window", time.Second
	cfg := schedSetConfig(t, in.admin, q, &qbridgev1.QueueConfig{DedupWindow: durationpb.New(window)})
	if cfg.GetDedupWindow().AsDuration() != window {
		t.Fatalf("config in force has dedup_window %v; want %v", cfg.GetDedupWindow().AsDuration(), window)
	}
	start := time.Now()
	first := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("1"), DedupKey: "k"})
	again := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("2"), DedupKey: "k"})
	if el := time.Since(start); el < window/2 && (!again.GetDuplicate() || again.GetId() != first.GetId()) {
		t.Fatalf("enqueue %v after the first, inside the window: %v; want duplicate of %s", el, again, first.GetId())
	}
	var fresh *qbridgev1.EnqueueResponse
	eventually(t, 5*time.Second, "the key accepted again after the window", func() bool {
		fresh = schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("3"), DedupKey: "k"})
		return !fresh.GetDuplicate()
	})
	if el := time.Since(start); el < window-10*time.Millisecond {
		t.Fatalf("key accepted again %v after the first enqueue; the window is %v", el, window)
	}
	if fresh.GetId() == first.GetId() {
		t.Fatalf("the new message got the old id %s", fresh.GetId())
	}
	if st := schedStats(t, in.client, q); st.GetReady() != 2 || st.GetCounters().GetEnqueued() != 2 {
		t.Fatalf("%d ready, %d enqueued; want 2, 2", st.GetReady(), st.GetCounters().GetEnqueued())
	}
	// The new message starts a new window.
	if r := schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, DedupKey: "k"}); !r.GetDuplicate() || r.GetId() != fresh.GetId() {
		t.Fatalf("enqueue right after the key was accepted again = %v; want duplicate of %s", r, fresh.GetId())
	}
}

// ---------------------------------------------------------------------------
// TTL

// A message not delivered before its ttl is never delivered: it is dropped
// or dead-lettered (reason "expired") per the queue's expired_action or the
// server default, and counted as expired.
func TestTTLExpiry(t *testing.T) {
	rs := redistest.Start(t)
	const ttl = 150 * time.Millisecond
	deadDefault := broker.DefaultPolicy
	deadDefault.ExpiredDeadLetter = true
	cases := []struct {
		name        string
		deadDefault bool                    // server default: dead-letter
		action      qbridgev1.ExpiredAction // queue config (unspecified: none)
		delay       time.Duration           // longer than ttl: expires while delayed
		autoAck     bool
		wantDead    bool
	}{
		{name: "dropped while ready"},
		{name: "dropped while delayed", delay: 2 * ttl},
		{name: "dropped for an auto-ack consumer", autoAck: true},
		{name: "dead-lettered by queue config", action: qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER, wantDead: true},
		{name: "dead-lettered by server default", deadDefault: true, wantDead: true},
		{name: "dead-lettered while delayed", deadDefault: true, delay: 2 * ttl, wantDead: true},
		{name: "dead-lettered for an auto-ack consumer", deadDefault: true, autoAck: true, wantDead: true},
		{name: "queue config drop over server default", deadDefault: true, action: qbridgev1.ExpiredAction_EXPIRED_ACTION_DROP},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := instanceConfig{db: i}
			if tc.deadDefault {
				cfg.brokerOpts = []broker.Option{broker.WithDefaults(deadDefault)}
			}
			in := startInstance(t, rs, cfg)
			q := "ttl-" + itoa(i)
			if tc.action != qbridgev1.ExpiredAction_EXPIRED_ACTION_UNSPECIFIED {
				schedSetConfig(t, in.admin, q, &qbridgev1.QueueConfig{ExpiredAction: tc.action})
			}
			req := &qbridgev1.EnqueueRequest{Queue: q, Id: "doomed", Payload: []byte("doomed"), Headers: map[string]string{"h": "v"}, Ttl: durationpb.New(ttl)}
			if tc.delay > 0 {
				req.Delay = durationpb.New(tc.delay)
			}
			before := schedRedisNow(t, in.rdb)
			schedEnqueue(t, in.client, req)
			after := schedRedisNow(t, in.rdb)
			state := qbridgev1.MessageState_MESSAGE_STATE_READY
			if tc.delay > 0 {
				state = qbridgev1.MessageState_MESSAGE_STATE_DELAYED
			}
			peek := schedPeek(t, in.admin, q, state)
			if len(peek) != 1 || peek[0].GetExpireTime() == nil {
				t.Fatalf("peek = %v; want the message with an expire time", peek)
			}
			exp := peek[0].GetExpireTime().AsTime()
			if exp.Before(before.Add(ttl).Truncate(time.Millisecond)) || exp.After(after.Add(ttl)) {
				t.Fatalf("expire time %v; want enqueue time + %v, in [%v, %v]", exp, ttl, before.Add(ttl), after.Add(ttl))
			}
			schedWaitRedisPast(t, in.rdb, exp)
			// A delayed message expired before it was due; the consumer
			// usually attaches while it is still delayed.
			s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, AutoAck: tc.autoAck, LeaseDuration: lease(schedLease)})
			var st *qbridgev1.GetQueueStatsResponse
			eventually(t, 5*time.Second, "the expired message disposed of", func() bool {
				st = schedStats(t, in.client, q)
				return st.GetCounters().GetExpired() == 1 && st.GetReady() == 0 && st.GetDelayed() == 0
			})
			wantDead := int64(0)
			if tc.wantDead {
				wantDead = 1
			}
			if st.GetInFlight() != 0 || st.GetDead() != wantDead || st.GetCounters().GetDeadLettered() != wantDead {
				t.Fatalf("%d in flight, %d dead, %d dead-lettered; want 0, %d, %d", st.GetInFlight(), st.GetDead(), st.GetCounters().GetDeadLettered(), wantDead, wantDead)
			}
			if tc.wantDead {
				dead := schedPeek(t, in.admin, q, qbridgev1.MessageState_MESSAGE_STATE_DEAD)
				if len(dead) != 1 || dead[0].GetId() != "doomed" || dead[0].GetDeadReason() != "expired" ||
					string(dead[0].GetPayload()) != "doomed" || dead[0].GetHeaders()["h"] != "v" || dead[0].GetDeadTime() == nil {
					t.Fatalf("dead letters = %v; want the message intact with reason \"expired\"", dead)
				}
			}
			// The consumer is live, and the expired message never reached it.
			s.none(t)
			schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "sentinel"})
			if d := s.next(t, 5*time.Second); d.GetId() != "sentinel" {
				t.Fatalf("delivered %s; want only the sentinel", d.GetId())
			}
		})
	}
}

// A message consumed before its ttl is delivered normally.
func TestTTLDeliveredBeforeExpiry(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q = "ttl-ok"
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(schedLease)})
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "ready", Ttl: durationpb.New(30 * time.Second)})
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "delayed", Ttl: durationpb.New(30 * time.Second), Delay: durationpb.New(200 * time.Millisecond)})
	for _, want := range []string{"ready", "delayed"} {
		d := s.next(t, 5*time.Second)
		if d.GetId() != want || d.GetAttempt() != 1 {
			t.Fatalf("delivered %v; want %s", d, want)
		}
		if err := ack(t, in.client, d); err != nil {
			t.Fatal(err)
		}
	}
	st := schedStats(t, in.client, q)
	if st.GetCounters().GetExpired() != 0 || st.GetCounters().GetAcked() != 2 {
		t.Fatalf("counters %v; want 2 acked, none expired", st.GetCounters())
	}
}

// GetQueueConfig reports the expired_action in force: a queue's explicit
// DROP over a server default that dead-letters.
func TestTTLConfigReportsExpiredAction(t *testing.T) {
	rs := redistest.Start(t)
	deadDefault := broker.DefaultPolicy
	deadDefault.ExpiredDeadLetter = true
	in := startInstance(t, rs, instanceConfig{brokerOpts: []broker.Option{broker.WithDefaults(deadDefault)}})
	cfg := schedSetConfig(t, in.admin, "ttl-cfg", &qbridgev1.QueueConfig{ExpiredAction: qbridgev1.ExpiredAction_EXPIRED_ACTION_DROP})
	if cfg.GetExpiredAction() != qbridgev1.ExpiredAction_EXPIRED_ACTION_DROP {
		t.Fatalf("config in force reports expired_action %v; the queue's config says DROP (and expired messages are dropped)", cfg.GetExpiredAction())
	}
}

// A ttl on a raw-mode queue is either refused or honoured, not silently
// ignored.
func TestTTLOnRawQueue(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{brokerOpts: []broker.Option{broker.WithRawQueues(func(q string) bool { return q == "raw-ttl" })}})
	const q = "raw-ttl"
	_, err := in.client.Enqueue(ctxT(t, 5*time.Second), &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("doomed"), Ttl: durationpb.New(100 * time.Millisecond)})
	if status.Code(err) == codes.InvalidArgument {
		return // refused: fine
	}
	if err != nil {
		t.Fatal(err)
	}
	schedWaitRedisPast(t, in.rdb, schedRedisNow(t, in.rdb).Add(100*time.Millisecond))
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q})
	d := s.next(t, 5*time.Second)
	if string(d.GetPayload()) == "doomed" {
		t.Fatal("the message was delivered after its ttl, which was accepted and ignored")
	}
}

// ---------------------------------------------------------------------------
// Bounded queues

// An Enqueue beyond max_length (ready + delayed) fails with
// RESOURCE_EXHAUSTED and writes nothing; a batch must fit entirely; a
// duplicate needs no room; in-flight messages take none.
func TestBoundedQueueRejects(t *testing.T) {
	rs := redistest.Start(t)
	const maxLen = 3
	withDefault := broker.DefaultPolicy
	withDefault.MaxLength = maxLen
	cases := []struct {
		name string
		cfg  instanceConfig
	}{
		{name: "queue config", cfg: instanceConfig{db: 0}},
		{name: "server default", cfg: instanceConfig{db: 1, brokerOpts: []broker.Option{broker.WithDefaults(withDefault)}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := startInstance(t, rs, tc.cfg)
			q := "bounded"
			ctx := ctxT(t, 10*time.Second)
			if tc.cfg.brokerOpts == nil {
				schedSetConfig(t, in.admin, q, &qbridgev1.QueueConfig{MaxLength: maxLen})
			}
			held := func() (int64, int64) {
				st := schedStats(t, in.client, q)
				return st.GetReady() + st.GetDelayed(), st.GetCounters().GetEnqueued()
			}
			// Delayed messages take room too.
			schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "r1", DedupKey: "k-r1"})
			schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "d1", Delay: durationpb.New(time.Hour)})
			// 2 of 3: a batch of 2 does not fit, and writes nothing (not
			// even its dedup keys).
			_, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{
				{Id: "b1", DedupKey: "k-b1"}, {Id: "b2", Delay: durationpb.New(time.Hour)},
			}})
			wantCode(t, err, codes.ResourceExhausted, `queue "bounded" is full: it holds 2 of at most 3 messages`)
			if h, e := held(); h != 2 || e != 2 {
				t.Fatalf("after a refused batch: %d held, %d enqueued; want 2, 2", h, e)
			}
			// A batch of one fits.
			if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{{Id: "b1", DedupKey: "k-b1"}}}); err != nil {
				t.Fatalf("a batch that fits: %v", err)
			}
			// Full.
			for _, req := range []*qbridgev1.EnqueueRequest{
				{Queue: q, Id: "x1"},
				{Queue: q, Id: "x2", Delay: durationpb.New(time.Second)},
				{Queue: q, Id: "x3", DedupKey: "k-new"},
			} {
				_, err := in.client.Enqueue(ctx, req)
				wantCode(t, err, codes.ResourceExhausted, `queue "bounded" is full: it holds 3 of at most 3 messages (ready and delayed)`)
			}
			if h, e := held(); h != 3 || e != 3 {
				t.Fatalf("after refused enqueues: %d held, %d enqueued; want 3, 3", h, e)
			}
			// A duplicate enqueues nothing, so it needs no room.
			if r, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, DedupKey: "k-b1"}); err != nil || !r.GetDuplicate() || r.GetId() != "b1" {
				t.Fatalf("duplicate on a full queue = %v, %v; want duplicate of b1", r, err)
			}
			// The refused enqueue with a key did not remember it.
			if in.rdb.HExists(ctx, "{"+q+"}:qb:dedup", "k-new").Val() {
				t.Fatal("a refused enqueue remembered its dedup key")
			}
			// A consumer takes the ready messages: in flight they take no
			// room.
			s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(schedLease)})
			for _, want := range []string{"r1", "b1"} {
				if d := s.next(t, 5*time.Second); d.GetId() != want {
					t.Fatalf("delivered %s; want %s", d.GetId(), want)
				}
			}
			r, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{
				{Id: "x1", Delay: durationpb.New(time.Hour)}, {Id: "x3", DedupKey: "k-new", Delay: durationpb.New(time.Hour)},
			}})
			if err != nil || slices.Contains(r.GetDuplicate(), true) {
				t.Fatalf("a batch once there is room = %v, %v", r, err)
			}
			st := schedStats(t, in.client, q)
			if st.GetReady() != 0 || st.GetDelayed() != 3 || st.GetInFlight() != 2 || st.GetCounters().GetEnqueued() != 5 {
				t.Fatalf("%d ready, %d delayed, %d in flight, %d enqueued; want 0, 3, 2, 5", st.GetReady(), st.GetDelayed(), st.GetInFlight(), st.GetCounters().GetEnqueued())
			}
			cfg, err := in.admin.GetQueueConfig(ctx, &qbridgev1.GetQueueConfigRequest{Queue: q})
			if err != nil || cfg.GetConfig().GetMaxLength() != maxLen {
				t.Fatalf("config in force %v, %v; want max_length %d", cfg, err, maxLen)
			}
		})
	}
}

// Many producers race for room in a small queue drained by a slow
// consumer. At no instant does the queue hold more than max_length
// messages (ready + delayed, read atomically), and every accepted message
// is delivered exactly once; refused ones never are.
func TestBoundedQueueConcurrentProducers(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	const q, maxLen, producers, perProducer = "bounded-race", 10, 16, 50
	schedSetConfig(t, a.admin, q, &qbridgev1.QueueConfig{MaxLength: maxLen})
	ctx := ctxT(t, 60*time.Second)

	// The slow consumer: one message at a time, acked before the next.
	var mu sync.Mutex
	delivered := map[string]int{}
	cctx, cancel := context.WithCancel(ctx)
	var cwg sync.WaitGroup
	defer func() { cancel(); cwg.Wait() }()
	st, err := b.client.Consume(cctx, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(schedLease)})
	if err != nil {
		t.Fatal(err)
	}
	cwg.Add(1)
	go func() {
		defer cwg.Done()
		for {
			resp, err := st.Recv()
			if err != nil {
				return
			}
			for _, d := range resp.GetDeliveries() {
				mu.Lock()
				delivered[d.GetId()]++
				mu.Unlock()
				if _, err := b.client.Ack(cctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
					if cctx.Err() == nil {
						t.Errorf("ack: %v", err)
					}
					return
				}
			}
		}
	}()

	// The sampler.
	var samples, maxSeen, atMax atomic.Int64
	sctx, stopSampling := context.WithCancel(ctx)
	var swg sync.WaitGroup
	swg.Add(1)
	go func() {
		defer swg.Done()
		for sctx.Err() == nil {
			n, err := schedHeld(context.Background(), a.rdb, q)
			if err != nil {
				t.Errorf("sample: %v", err)
				return
			}
			samples.Add(1)
			if n > maxSeen.Load() {
				maxSeen.Store(n)
			}
			if n == maxLen {
				atMax.Add(1)
			}
		}
	}()

	// The producers: half fail fast, half wait for room until a short
	// deadline; a quarter of the messages are delayed a little.
	var (
		pmu       sync.Mutex
		accepted  = map[string]bool{}
		refused   = map[string]bool{}
		uncertain = map[string]bool{} // the client's deadline passed: enqueued or not
		waitedOK  atomic.Int64
	)
	var pwg sync.WaitGroup
	for g := 0; g < producers; g++ {
		in := a
		if g%4 >= 2 {
			in = b
		}
		wait := g%2 == 1
		pwg.Add(1)
		go func() {
			defer pwg.Done()
			for i := 0; i < perProducer; i++ {
				id := fmt.Sprintf("g%d-%d", g, i)
				req := &qbridgev1.EnqueueRequest{Queue: q, Id: id, WaitForRoom: wait}
				if i%4 == 0 {
					req.Delay = durationpb.New(20 * time.Millisecond)
				}
				timeout := 5 * time.Second
				if wait {
					timeout = 300 * time.Millisecond
				}
				pctx, pcancel := context.WithTimeout(ctx, timeout)
				_, err := in.client.Enqueue(pctx, req)
				pcancel()
				pmu.Lock()
				switch code := status.Code(err); {
				case err == nil:
					accepted[id] = true
					if wait {
						waitedOK.Add(1)
					}
				case code == codes.ResourceExhausted:
					refused[id] = true
					if msg := status.Convert(err).Message(); !strings.Contains(msg, "is full: it holds") || !strings.Contains(msg, "of at most 10 messages") {
						t.Errorf("%s: unclear message %q", id, msg)
					}
				case code == codes.DeadlineExceeded && wait:
					uncertain[id] = true
				default:
					t.Errorf("%s: %v", id, err)
				}
				pmu.Unlock()
			}
		}()
	}
	pwg.Wait()
	stopSampling()
	swg.Wait()

	pmu.Lock()
	defer pmu.Unlock()
	t.Logf("%d accepted (%d after waiting), %d refused, %d uncertain; %d samples, max %d held, %d samples at the limit",
		len(accepted), waitedOK.Load(), len(refused), len(uncertain), samples.Load(), maxSeen.Load(), atMax.Load())
	if maxSeen.Load() > maxLen {
		t.Fatalf("the queue held %d messages (ready + delayed) at one instant; max_length is %d", maxSeen.Load(), maxLen)
	}
	if len(refused) == 0 || len(accepted) < maxLen || waitedOK.Load() == 0 || atMax.Load() == 0 {
		t.Fatalf("the test did not exercise the bound: %d accepted (%d after waiting), %d refused, %d samples at the limit", len(accepted), waitedOK.Load(), len(refused), atMax.Load())
	}
	if samples.Load() < 100 {
		t.Fatalf("only %d samples", samples.Load())
	}
	// Everything accepted gets delivered; then the queue is empty.
	eventually(t, 20*time.Second, "every accepted message delivered and the queue empty", func() bool {
		mu.Lock()
		n := 0
		for id := range accepted {
			if delivered[id] > 0 {
				n++
			}
		}
		mu.Unlock()
		if n < len(accepted) {
			return false
		}
		st := schedStats(t, a.client, q)
		return st.GetReady()+st.GetDelayed()+st.GetInFlight() == 0
	})
	mu.Lock()
	defer mu.Unlock()
	for id, c := range delivered {
		switch {
		case c != 1:
			t.Errorf("%s delivered %d times; want once", id, c)
		case refused[id]:
			t.Errorf("%s was refused (RESOURCE_EXHAUSTED) but delivered", id)
		case !accepted[id] && !uncertain[id]:
			t.Errorf("%s delivered but never enqueued", id)
		}
	}
	if st := schedStats(t, a.client, q); st.GetCounters().GetEnqueued() != int64(len(delivered)) || st.GetCounters().GetAcked() != int64(len(delivered)) {
		t.Errorf("counters %v; want %d enqueued and acked", st.GetCounters(), len(delivered))
	}
}

// wait_for_room: the call waits while the queue is full and succeeds once a
// consumer makes room (for a batch: room for all of it); if nobody does
// before the call's deadline, it fails and writes nothing.
func TestBoundedQueueWaitForRoom(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q = "bounded-wait"
	schedSetConfig(t, in.admin, q, &qbridgev1.QueueConfig{MaxLength: 2})
	ctx := ctxT(t, 20*time.Second)
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "m1"})
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Id: "m2"})
	full := func() {
		t.Helper()
		_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Id: "probe"})
		wantCode(t, err, codes.ResourceExhausted, "is full")
	}

	type result struct {
		ids []string
		err error
	}
	single := make(chan result, 1)
	go func() {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		r, err := in.client.Enqueue(wctx, &qbridgev1.EnqueueRequest{Queue: q, Id: "w1", WaitForRoom: true})
		single <- result{[]string{r.GetId()}, err}
	}()
	full() // still full: the waiter cannot have succeeded
	select {
	case r := <-single:
		t.Fatalf("wait_for_room returned %v, %v while the queue was full", r.ids, r.err)
	default:
	}
	// A consumer takes one message at a time; acks make it take the next.
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(schedLease)})
	d1 := s.next(t, 5*time.Second)
	select {
	case r := <-single:
		if r.err != nil || r.ids[0] != "w1" {
			t.Fatalf("wait_for_room after room was made = %v, %v", r.ids, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("wait_for_room did not succeed within 5s of a consumer making room")
	}
	// Held: m2, w1. A batch of 2 waits for room for both.
	batch := make(chan result, 1)
	go func() {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		r, err := in.client.EnqueueBatch(wctx, &qbridgev1.EnqueueBatchRequest{Queue: q, WaitForRoom: true, Messages: []*qbridgev1.BatchMessage{{Id: "w2"}, {Id: "w3"}}})
		batch <- result{r.GetIds(), err}
	}()
	if err := ack(t, in.client, d1); err != nil {
		t.Fatal(err)
	}
	d2 := s.next(t, 5*time.Second) // m2: one free slot, not two
	if d2.GetId() != "m2" {
		t.Fatalf("delivered %s; want m2", d2.GetId())
	}
	_, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{{Id: "p1"}, {Id: "p2"}}})
	wantCode(t, err, codes.ResourceExhausted, "holds 1 of at most 2")
	select {
	case r := <-batch:
		t.Fatalf("a batch of 2 returned %v, %v with room for 1", r.ids, r.err)
	default:
	}
	if err := ack(t, in.client, d2); err != nil {
		t.Fatal(err)
	}
	d3 := s.next(t, 5*time.Second)
	if d3.GetId() != "w1" {
		t.Fatalf("delivered %s; want w1", d3.GetId())
	}
	select {
	case r := <-batch:
		if r.err != nil || !slices.Equal(r.ids, []string{"w2", "w3"}) {
			t.Fatalf("batch wait_for_room after room was made = %v, %v", r.ids, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("batch wait_for_room did not succeed within 5s of room for it")
	}
	// The consumer acks w1 and takes w2; its stream then ends and w2 goes
	// back: w2 and w3 are held, the queue is full again.
	if err := ack(t, in.client, d3); err != nil {
		t.Fatal(err)
	}
	s.cancel()
	s.err(t, 5*time.Second)
	eventually(t, 5*time.Second, "w2 and w3 ready, nothing in flight", func() bool {
		st := schedStats(t, in.client, q)
		return st.GetInFlight() == 0 && st.GetReady() == 2
	})
	enqueuedBefore := schedStats(t, in.client, q).GetCounters().GetEnqueued()

	// Nobody makes room: the call fails at its deadline. Through gRPC the
	// client's own deadline usually fires first (DEADLINE_EXCEEDED); the
	// server, called directly, says why (RESOURCE_EXHAUSTED).
	const deadline = 300 * time.Millisecond
	wctx, cancel := context.WithTimeout(ctx, deadline)
	start := time.Now()
	_, err = in.client.Enqueue(wctx, &qbridgev1.EnqueueRequest{Queue: q, Id: "late", WaitForRoom: true})
	cancel()
	if el := time.Since(start); el < deadline-10*time.Millisecond {
		t.Fatalf("wait_for_room gave up after %v, before its %v deadline", el, deadline)
	}
	if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.ResourceExhausted {
		t.Fatalf("wait_for_room past its deadline: %v; want DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED", err)
	}
	t.Logf("through gRPC: %v", err)
	wctx, cancel = context.WithTimeout(ctx, deadline)
	_, err = in.srv.Enqueue(wctx, &qbridgev1.EnqueueRequest{Queue: q, Id: "late2", WaitForRoom: true})
	cancel()
	t.Logf("from the server: %v", err)
	wantCode(t, err, codes.ResourceExhausted, `queue "bounded-wait" is full: it holds 2 of at most 2 messages (ready and delayed); waited for room until the call's deadline`)
	st := schedStats(t, in.client, q)
	if st.GetReady() != 2 || st.GetCounters().GetEnqueued() != enqueuedBefore {
		t.Fatalf("after the failed waits: %d ready, %d enqueued; want 2, %d (nothing written)", st.GetReady(), st.GetCounters().GetEnqueued(), enqueuedBefore)
	}
}

// The error of a wait_for_room call that timed out does not advise setting
// wait_for_room.
func TestBoundedQueueWaitForRoomMessage(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q = "bounded-msg"
	schedSetConfig(t, in.admin, q, &qbridgev1.QueueConfig{MaxLength: 1})
	schedEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := in.srv.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, WaitForRoom: true})
	wantCode(t, err, codes.ResourceExhausted, "waited for room")
	if msg := status.Convert(err).Message(); strings.Contains(msg, "set wait_for_room") {
		t.Fatalf("the message advises setting wait_for_room to a caller that did: %q", msg)
	}
}
