package server_test

// Retries and dead letters: the Nack actions and their delays, the retry
// backoff, max attempts (whatever makes an attempt fail), the precedence of
// message, queue and server retry policies, and the dead-letter admin calls
// (peek, replay, delete), also for raw-mode queues.
//
// Helpers here are prefixed with rt so that they do not collide with those
// of other test files of the package.

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/broker"
)

const (
	rtRequeue    = qbridgev1.NackAction_NACK_ACTION_REQUEUE
	rtRetry      = qbridgev1.NackAction_NACK_ACTION_RETRY
	rtDrop       = qbridgev1.NackAction_NACK_ACTION_DROP
	rtDeadLetter = qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER

	rtStateReady   = qbridgev1.MessageState_MESSAGE_STATE_READY
	rtStateDelayed = qbridgev1.MessageState_MESSAGE_STATE_DELAYED
	rtStateDead    = qbridgev1.MessageState_MESSAGE_STATE_DEAD

	rtMaxAttemptsReason = "max attempts reached"
	rtNackedReason      = "nacked as dead letter"

	// rtClockSlack covers the millisecond truncation of Redis times.
	rtClockSlack = 2 * time.Millisecond
)

// rtPolicy is the server default policy of these tests: few attempts and
// short backoffs, so that retries happen within the test.
var rtPolicy = broker.Policy{
	MaxAttempts: 3,
	BackoffMin:  50 * time.Millisecond,
	BackoffMax:  200 * time.Millisecond,
	DedupWindow: 10 * time.Minute,
}

func rtStart(t *testing.T, rs *redistest.Server, p broker.Policy, opts ...broker.Option) *instance {
	t.Helper()
	return startInstance(t, rs, instanceConfig{brokerOpts: append([]broker.Option{broker.WithDefaults(p)}, opts...)})
}

func rtEnqueue(t *testing.T, in *instance, req *qbridgev1.EnqueueRequest) string {
	t.Helper()
	resp, err := in.client.Enqueue(ctxT(t, 5*time.Second), req)
	if err != nil {
		t.Fatalf("enqueue to %s: %v", req.GetQueue(), err)
	}
	return resp.GetId()
}

func rtNack(t *testing.T, in *instance, action qbridgev1.NackAction, delay *durationpb.Duration, errText string, ds ...*qbridgev1.Delivery) error {
	t.Helper()
	toks := make([]string, len(ds))
	for i, d := range ds {
		toks[i] = d.GetAckToken()
	}
	resp, err := in.client.Nack(ctxT(t, 5*time.Second), &qbridgev1.NackRequest{AckTokens: toks, Action: action, RetryDelay: delay, Error: errText})
	if err == nil && int(resp.GetNacked()) != len(ds) {
		t.Fatalf("nack of %d deliveries reports %d nacked", len(ds), resp.GetNacked())
	}
	return err
}

func rtMustNack(t *testing.T, in *instance, action qbridgev1.NackAction, delay *durationpb.Duration, errText string, ds ...*qbridgev1.Delivery) {
	t.Helper()
	if err := rtNack(t, in, action, delay, errText, ds...); err != nil {
		t.Fatalf("nack %v: %v", action, err)
	}
}

func rtStats(t *testing.T, in *instance, q string) *qbridgev1.GetQueueStatsResponse {
	t.Helper()
	st, err := in.client.GetQueueStats(ctxT(t, 5*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil {
		t.Fatalf("stats of %s: %v", q, err)
	}
	return st
}

// rtPeekAll returns every message of q in state, following the pages.
func rtPeekAll(t *testing.T, in *instance, q string, state qbridgev1.MessageState) []*qbridgev1.QueuedMessage {
	t.Helper()
	var out []*qbridgev1.QueuedMessage
	tok := ""
	for range 100 {
		resp, err := in.admin.PeekMessages(ctxT(t, 5*time.Second), &qbridgev1.PeekMessagesRequest{Queue: q, State: state, PageSize: 1000, PageToken: tok})
		if err != nil {
			t.Fatalf("peek %v of %s: %v", state, q, err)
		}
		out = append(out, resp.GetMessages()...)
		if tok = resp.GetNextPageToken(); tok == "" {
			return out
		}
	}
	t.Fatalf("peek %v of %s: more than 100 pages", state, q)
	return nil
}

// rtCounts is what a queue holds in each of its Redis structures.
type rtCounts struct {
	ready, inflight, leases, delayed, scheduled, dead, deadIdx int64
}

// rtCountKeys reads every structure of q in one script, so the counts are
// one consistent snapshot.
func rtCountKeys(t *testing.T, in *instance, q string) rtCounts {
	t.Helper()
	k := broker.NewKeys("")
	const script = `return {redis.call('LLEN', KEYS[1]), redis.call('HLEN', KEYS[2]), redis.call('ZCARD', KEYS[3]),
		redis.call('ZCARD', KEYS[4]), redis.call('HLEN', KEYS[5]), redis.call('HLEN', KEYS[6]), redis.call('ZCARD', KEYS[7])}`
	v, err := in.rdb.Eval(ctxT(t, 5*time.Second), script, []string{k.Ready(q), k.InFlight(q), k.Leases(q),
		k.Delayed(q), k.Scheduled(q), k.Dead(q), k.DeadIndex(q)}).Int64Slice()
	if err != nil || len(v) != 7 {
		t.Fatalf("count keys of %s: %v %v", q, v, err)
	}
	return rtCounts{v[0], v[1], v[2], v[3], v[4], v[5], v[6]}
}

// rtNext waits for the next delivery and checks that it is message id at
// the given attempt.
func rtNext(t *testing.T, s *stream, id string, attempt uint32, within time.Duration) *qbridgev1.Delivery {
	t.Helper()
	d := s.next(t, within)
	if d.GetId() != id || d.GetAttempt() != attempt {
		t.Fatalf("delivery id %s attempt %d; want id %s attempt %d", d.GetId(), d.GetAttempt(), id, attempt)
	}
	return d
}

// rtTake waits for n deliveries.
func rtTake(t *testing.T, s *stream, n int) []*qbridgev1.Delivery {
	t.Helper()
	ds := make([]*qbridgev1.Delivery, n)
	for i := range ds {
		ds[i] = s.next(t, 10*time.Second)
	}
	return ds
}

func rtConfigure(t *testing.T, in *instance, q string, rp *qbridgev1.RetryPolicy) {
	t.Helper()
	if _, err := in.admin.UpdateQueueConfig(ctxT(t, 5*time.Second), &qbridgev1.UpdateQueueConfigRequest{
		Queue: q, Config: &qbridgev1.QueueConfig{RetryPolicy: rp},
	}); err != nil {
		t.Fatalf("configure %s: %v", q, err)
	}
}

// rtIDs returns the ids of msgs (for dead letters: their dead ids).
func rtIDs(msgs []*qbridgev1.QueuedMessage) []string {
	ids := make([]string, len(msgs))
	for i, m := range msgs {
		ids[i] = m.GetId()
	}
	return ids
}

// rtMakeDead enqueues one message per id (payload "payload-<id>", header
// id=<id>), takes them all on a new stream and dead-letters them one Nack
// at a time, in order. It returns the stream, still open and holding
// nothing.
func rtMakeDead(t *testing.T, in *instance, q string, ids ...string) *stream {
	t.Helper()
	for _, id := range ids {
		rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: id, Payload: []byte("payload-" + id), Headers: map[string]string{"id": id}})
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: uint32(len(ids)), LeaseDuration: lease(time.Minute)})
	for i, d := range rtTake(t, s, len(ids)) {
		if d.GetId() != ids[i] {
			t.Fatalf("delivery %d is %s; want %s", i, d.GetId(), ids[i])
		}
		rtMustNack(t, in, rtDeadLetter, nil, "cannot process "+ids[i], d)
	}
	if st := rtStats(t, in, q); st.GetDead() != int64(len(ids)) || st.GetInFlight() != 0 || st.GetReady() != 0 {
		t.Fatalf("after dead-lettering %d: %d dead, %d in flight, %d ready", len(ids), st.GetDead(), st.GetInFlight(), st.GetReady())
	}
	return s
}

// rtWantDelayed checks that msg is delayed until a time in
// [t0+lo, t1+hi], where t0 and t1 bracket the call that delayed it.
func rtWantDelayed(t *testing.T, m *qbridgev1.QueuedMessage, t0, t1 time.Time, lo, hi time.Duration) time.Time {
	t.Helper()
	if m.GetState() != rtStateDelayed || m.GetDeliverTime() == nil {
		t.Fatalf("message %s is %v with deliver_time %v; want delayed with a deliver_time", m.GetId(), m.GetState(), m.GetDeliverTime())
	}
	due := m.GetDeliverTime().AsTime()
	if due.Before(t0.Add(lo-rtClockSlack)) || due.After(t1.Add(hi)) {
		t.Fatalf("message %s is due %v after the nack; want %v to %v", m.GetId(), due.Sub(t0), lo, hi)
	}
	return due
}

// Retry n waits a random time in [10%, 100%] of min(max, min*2^(n-1)).
// With 30 messages per attempt the test sees the spread: some land in each
// half of the range (either miss has a probability below 3e-8), so a bound
// that did not double, or no jitter, is caught; no sample may exceed the
// bound, so a cap that is not applied is caught too (retry 5 and 8 would
// otherwise wait up to 16s and 128s).
func TestRetryBackoffDoublesUpToMax(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const perAttempt = 30
	policy := &qbridgev1.RetryPolicy{MaxAttempts: 100, MinBackoff: durationpb.New(time.Second), MaxBackoff: durationpb.New(6 * time.Second)}
	for _, tc := range []struct {
		attempt int
		bound   time.Duration
	}{
		{1, time.Second},
		{2, 2 * time.Second},
		{3, 4 * time.Second},
		{4, 6 * time.Second}, // 8s capped
		{5, 6 * time.Second},
		{8, 6 * time.Second},
	} {
		t.Run(fmt.Sprintf("retry %d", tc.attempt), func(t *testing.T) {
			t.Parallel()
			q := fmt.Sprintf("rt-backoff-%d", tc.attempt)
			msgs := make([]*qbridgev1.BatchMessage, perAttempt)
			for i := range msgs {
				msgs[i] = &qbridgev1.BatchMessage{Payload: []byte(itoa(i)), RetryPolicy: policy}
			}
			if _, err := in.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs}); err != nil {
				t.Fatal(err)
			}
			s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: perAttempt, LeaseDuration: lease(time.Minute)})
			var ds []*qbridgev1.Delivery
			for k := 1; ; k++ {
				ds = rtTake(t, s, perAttempt)
				for _, d := range ds {
					if d.GetAttempt() != uint32(k) {
						t.Fatalf("delivery %s has attempt %d; want %d", d.GetId(), d.GetAttempt(), k)
					}
				}
				if k == tc.attempt {
					break
				}
				// Requeue at once (no backoff) to get to the attempt.
				rtMustNack(t, in, rtRequeue, nil, "", ds...)
			}
			t0 := time.Now()
			rtMustNack(t, in, rtRetry, nil, "", ds...)
			t1 := time.Now()
			delayed := rtPeekAll(t, in, q, rtStateDelayed)
			if len(delayed) != perAttempt {
				t.Fatalf("%d messages delayed; want all %d", len(delayed), perAttempt)
			}
			lowest, highest := time.Duration(1<<62), time.Duration(0)
			for _, m := range delayed {
				if m.GetDeliveries() != uint32(tc.attempt) {
					t.Fatalf("delayed message %s shows %d deliveries; want %d", m.GetId(), m.GetDeliveries(), tc.attempt)
				}
				due := rtWantDelayed(t, m, t0, t1, tc.bound/10, tc.bound)
				lowest = min(lowest, due.Sub(t0))
				highest = max(highest, due.Sub(t1))
			}
			if highest <= tc.bound/2 {
				t.Fatalf("the longest of %d backoffs is %v, at most half the bound %v: the bound did not grow to %v", perAttempt, highest, tc.bound, tc.bound)
			}
			if lowest >= tc.bound/2 {
				t.Fatalf("the shortest of %d backoffs is %v, at least half the bound %v: no jitter", perAttempt, lowest, tc.bound)
			}
			if st := rtStats(t, in, q); st.GetDelayed() != perAttempt || st.GetReady() != 0 || st.GetInFlight() != 0 {
				t.Fatalf("stats while backing off: %d delayed, %d ready, %d in flight", st.GetDelayed(), st.GetReady(), st.GetInFlight())
			}
			s.none(t)
		})
	}
}

// A retried message comes back after its backoff, not before its due time
// and not much after the bound, with attempt + 1 and the Nack's error.
func TestRetryRedeliversAfterBackoff(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-redeliver"
	id := rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: "job-7", Payload: []byte("work"), Headers: map[string]string{"k": "v"},
		RetryPolicy: &qbridgev1.RetryPolicy{MaxAttempts: 10, MinBackoff: durationpb.New(300 * time.Millisecond), MaxBackoff: durationpb.New(600 * time.Millisecond)}})
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
	d := rtNext(t, s, id, 1, 5*time.Second)
	if d.GetLastError() != "" {
		t.Fatalf("first delivery has last_error %q", d.GetLastError())
	}
	for i, bound := range []time.Duration{300 * time.Millisecond, 600 * time.Millisecond, 600 * time.Millisecond} {
		attempt := uint32(i + 1)
		errText := fmt.Sprintf("attempt %d: upstream timed out", attempt)
		t0 := time.Now()
		rtMustNack(t, in, rtRetry, nil, errText, d)
		t1 := time.Now()
		// While it backs off it is delayed (unless it is already due,
		// which the 10% floor makes unlikely but possible under load).
		var due time.Time
		if delayed := rtPeekAll(t, in, q, rtStateDelayed); len(delayed) == 1 {
			m := delayed[0]
			due = rtWantDelayed(t, m, t0, t1, bound/10, bound)
			if m.GetId() != id || m.GetDeliveries() != attempt || m.GetLastError() != errText {
				t.Fatalf("delayed message = id %s, %d deliveries, last_error %q; want %s, %d, %q", m.GetId(), m.GetDeliveries(), m.GetLastError(), id, attempt, errText)
			}
		} else if len(delayed) > 1 {
			t.Fatalf("%d messages delayed; want 1", len(delayed))
		}
		d = rtNext(t, s, id, attempt+1, bound+5*time.Second)
		got := time.Now()
		if el := got.Sub(t0); el < bound/10-rtClockSlack {
			t.Fatalf("retry %d came back after %v; want at least 10%% of the %v bound", attempt, el, bound)
		} else if el > bound+3*time.Second {
			t.Fatalf("retry %d came back after %v; the bound is %v", attempt, el, bound)
		}
		if !due.IsZero() && got.Before(due.Add(-rtClockSlack)) {
			t.Fatalf("retry %d came back at %v, before it was due at %v", attempt, got, due)
		}
		if d.GetLastError() != errText || string(d.GetPayload()) != "work" || d.GetHeaders()["k"] != "v" {
			t.Fatalf("redelivery = last_error %q payload %q headers %v; want %q, work, k=v", d.GetLastError(), d.GetPayload(), d.GetHeaders(), errText)
		}
	}
	if err := ack(t, in.client, d); err != nil {
		t.Fatalf("ack of the 4th attempt: %v", err)
	}
	st := rtStats(t, in, q)
	if c := st.GetCounters(); c.GetAcked() != 1 || c.GetNacked() != 3 || c.GetDeadLettered() != 0 || st.GetDead() != 0 || st.GetDelayed() != 0 {
		t.Fatalf("after 3 retries and an ack: counters %v, %d dead, %d delayed", c, st.GetDead(), st.GetDelayed())
	}
	if c := rtCountKeys(t, in, q); c != (rtCounts{}) {
		t.Fatalf("Redis still holds %+v after the ack", c)
	}
}

// What Nack does with the delivery, per action and retry_delay: requeue
// without delay puts it back at the head at once; an explicit retry_delay
// delays it by exactly that, for REQUEUE and RETRY alike, overriding the
// retry policy's backoff (30s here); RETRY without delay uses the backoff.
func TestRetryNackDelays(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	slow := &qbridgev1.RetryPolicy{MinBackoff: durationpb.New(30 * time.Second), MaxBackoff: durationpb.New(30 * time.Second)}
	for _, tc := range []struct {
		name   string
		action qbridgev1.NackAction
		delay  *durationpb.Duration
		// want: ready at the head at once (lo == 0), or delayed by [lo, hi].
		lo, hi time.Duration
		wait   bool // receive the redelivery too
	}{
		{"requeue", rtRequeue, nil, 0, 0, true},
		{"unspecified is requeue", qbridgev1.NackAction_NACK_ACTION_UNSPECIFIED, nil, 0, 0, true},
		{"requeue with retry_delay", rtRequeue, durationpb.New(700 * time.Millisecond), 700 * time.Millisecond, 700 * time.Millisecond, true},
		{"retry uses the backoff", rtRetry, nil, 3 * time.Second, 30 * time.Second, false},
		{"retry_delay overrides the backoff", rtRetry, durationpb.New(700 * time.Millisecond), 700 * time.Millisecond, 700 * time.Millisecond, true},
		{"long retry_delay", rtRetry, durationpb.New(time.Hour), time.Hour, time.Hour, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			q := "rt-delay-" + strings.ReplaceAll(tc.name, " ", "-")
			rtConfigure(t, in, q, slow)
			// Another message behind it shows where the nacked one goes.
			id := rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: "first", Payload: []byte("1")})
			s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
			d := rtNext(t, s, id, 1, 5*time.Second)
			rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: "second", Payload: []byte("2")})
			t0 := time.Now()
			rtMustNack(t, in, tc.action, tc.delay, "try later", d)
			t1 := time.Now()
			if tc.lo == 0 {
				// Back at the head: it comes before "second".
				rtNext(t, s, id, 2, 5*time.Second)
				return
			}
			// Not ready: "second" comes first, "first" is delayed.
			second := rtNext(t, s, "second", 1, 5*time.Second)
			delayed := rtPeekAll(t, in, q, rtStateDelayed)
			if len(delayed) != 1 || delayed[0].GetId() != id {
				t.Fatalf("delayed = %v; want only %s", rtIDs(delayed), id)
			}
			due := rtWantDelayed(t, delayed[0], t0, t1, tc.lo, tc.hi)
			if delayed[0].GetLastError() != "try later" {
				t.Fatalf("delayed message has last_error %q", delayed[0].GetLastError())
			}
			if err := ack(t, in.client, second); err != nil {
				t.Fatal(err)
			}
			if !tc.wait {
				return
			}
			again := rtNext(t, s, id, 2, tc.hi+5*time.Second)
			if got := time.Now(); got.Before(due.Add(-rtClockSlack)) {
				t.Fatalf("redelivered at %v, before it was due at %v", got, due)
			}
			if again.GetLastError() != "try later" {
				t.Fatalf("redelivery has last_error %q", again.GetLastError())
			}
		})
	}
}

// Nack arguments that make no sense are refused and leave the delivery
// alone: it stays in flight and can still be acked.
func TestRetryNackRejectsBadArguments(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-badnack"
	id := rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
	d := rtNext(t, s, id, 1, 5*time.Second)
	for _, tc := range []struct {
		name    string
		action  qbridgev1.NackAction
		delay   *durationpb.Duration
		errText string
		msg     string
	}{
		{"retry_delay with drop", rtDrop, durationpb.New(time.Second), "", "retry_delay"},
		{"retry_delay with dead letter", rtDeadLetter, durationpb.New(time.Second), "", "retry_delay"},
		{"negative retry_delay", rtRetry, durationpb.New(-time.Second), "", "retry_delay"},
		{"retry_delay over a year", rtRequeue, durationpb.New(366 * 24 * time.Hour), "", "retry_delay"},
		{"error text over 4 KiB", rtRetry, nil, strings.Repeat("e", 4<<10+1), "error"},
		{"unknown action", qbridgev1.NackAction(99), nil, "", "action"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCode(t, rtNack(t, in, tc.action, tc.delay, tc.errText, d), codes.InvalidArgument, tc.msg)
			st := rtStats(t, in, q)
			if st.GetInFlight() != 1 || st.GetDead() != 0 || st.GetDelayed() != 0 || st.GetCounters().GetNacked() != 0 {
				t.Fatalf("a refused nack changed the queue: %d in flight, %d dead, %d delayed, counters %v", st.GetInFlight(), st.GetDead(), st.GetDelayed(), st.GetCounters())
			}
		})
	}
	// The largest error text is accepted whole.
	long := strings.Repeat("e", 4<<10)
	rtMustNack(t, in, rtRequeue, nil, long, d)
	if again := rtNext(t, s, id, 2, 5*time.Second); again.GetLastError() != long {
		t.Fatalf("a 4 KiB error text came back as %d bytes", len(again.GetLastError()))
	} else if err := ack(t, in.client, again); err != nil {
		t.Fatal(err)
	}
}

// A message that fails every attempt ends in the dead letters exactly once,
// whatever makes its attempts fail, with everything needed to understand
// and replay it, and nowhere else.
func TestRetryMaxAttemptsDeadLettersOnce(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy) // 3 attempts
	headers := map[string]string{"tenant": "acme", "trace": "abc-123"}
	for _, tc := range []struct {
		name string
		// fail makes all 3 attempts of message id on q fail; it returns
		// the stream if one is still open.
		fail                 func(t *testing.T, q, id string) *stream
		wantErr              string
		nacked, leaseExpired int64
	}{
		{
			name: "nack requeue",
			fail: func(t *testing.T, q, id string) *stream {
				s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
				for k := uint32(1); k <= 3; k++ {
					d := rtNext(t, s, id, k, 5*time.Second)
					rtMustNack(t, in, rtRequeue, nil, fmt.Sprintf("fail %d", k), d)
				}
				return s
			},
			wantErr: "fail 3", nacked: 3,
		},
		{
			name: "nack retry",
			fail: func(t *testing.T, q, id string) *stream {
				s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
				for k := uint32(1); k <= 3; k++ {
					d := rtNext(t, s, id, k, 5*time.Second)
					rtMustNack(t, in, rtRetry, nil, fmt.Sprintf("fail %d", k), d)
				}
				return s
			},
			wantErr: "fail 3", nacked: 3,
		},
		{
			// The first attempt is nacked, the others run out of lease;
			// the nack's error stays with the message.
			name: "lease expiry",
			fail: func(t *testing.T, q, id string) *stream {
				s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Second)})
				d := rtNext(t, s, id, 1, 5*time.Second)
				rtMustNack(t, in, rtRequeue, nil, "fail 1", d)
				if d = rtNext(t, s, id, 2, 5*time.Second); d.GetLastError() != "fail 1" {
					t.Fatalf("attempt 2 has last_error %q", d.GetLastError())
				}
				if d = rtNext(t, s, id, 3, 10*time.Second); d.GetLastError() != "fail 1" {
					t.Fatalf("attempt 3 (after a lease expiry) has last_error %q", d.GetLastError())
				}
				return s
			},
			wantErr: "fail 1", nacked: 1, leaseExpired: 2,
		},
		{
			name: "stream end",
			fail: func(t *testing.T, q, id string) *stream {
				for k := uint32(1); k <= 3; k++ {
					s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
					rtNext(t, s, id, k, 5*time.Second)
					s.cancel()
					s.err(t, 5*time.Second)
				}
				return nil
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			q := "rt-poison-" + strings.ReplaceAll(tc.name, " ", "-")
			id := "poison-" + strings.ReplaceAll(tc.name, " ", "-")
			start := time.Now()
			rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: id, Payload: []byte("bad payload"), Headers: headers})
			s := tc.fail(t, q, id)
			eventually(t, 10*time.Second, "the message in the dead letters", func() bool {
				return rtStats(t, in, q).GetDead() > 0
			})
			if c := rtCountKeys(t, in, q); c != (rtCounts{dead: 1, deadIdx: 1}) {
				t.Fatalf("Redis holds %+v; want only the one dead letter", c)
			}
			st := rtStats(t, in, q)
			c := st.GetCounters()
			if st.GetReady() != 0 || st.GetInFlight() != 0 || st.GetDelayed() != 0 || st.GetDead() != 1 ||
				c.GetDeadLettered() != 1 || c.GetNacked() != tc.nacked || c.GetLeaseExpired() != tc.leaseExpired || c.GetAcked() != 0 || c.GetEnqueued() != 1 {
				t.Fatalf("stats: %d ready, %d in flight, %d delayed, %d dead, counters %v; want 0, 0, 0, 1, dead_lettered 1, nacked %d, lease_expired %d",
					st.GetReady(), st.GetInFlight(), st.GetDelayed(), st.GetDead(), c, tc.nacked, tc.leaseExpired)
			}
			dead := rtPeekAll(t, in, q, rtStateDead)
			if len(dead) != 1 {
				t.Fatalf("%d dead letters; want 1", len(dead))
			}
			m := dead[0]
			if m.GetId() != id || string(m.GetPayload()) != "bad payload" || !maps.Equal(m.GetHeaders(), headers) || m.GetState() != rtStateDead {
				t.Fatalf("dead letter = id %q payload %q headers %v state %v; want %q, the payload, %v, dead", m.GetId(), m.GetPayload(), m.GetHeaders(), m.GetState(), id, headers)
			}
			if m.GetDeliveries() != 3 || m.GetLastError() != tc.wantErr || m.GetDeadReason() != rtMaxAttemptsReason {
				t.Fatalf("dead letter = %d deliveries, last_error %q, reason %q; want 3, %q, %q", m.GetDeliveries(), m.GetLastError(), m.GetDeadReason(), tc.wantErr, rtMaxAttemptsReason)
			}
			now := time.Now()
			if m.GetDeadTime() == nil || m.GetDeadTime().AsTime().Before(start.Add(-rtClockSlack)) || m.GetDeadTime().AsTime().After(now) {
				t.Fatalf("dead_time %v is not between the enqueue (%v) and now (%v)", m.GetDeadTime(), start, now)
			}
			if et := m.GetEnqueueTime().AsTime(); et.Before(start.Add(-rtClockSlack)) || et.After(now) {
				t.Fatalf("enqueue_time %v is not between %v and %v", et, start, now)
			}
			if s != nil {
				s.none(t)
			}
		})
	}
}

// Max attempts come from the message's retry policy, else the queue's,
// else the server default (3 here); so does the backoff. Each level's
// backoff range is disjoint from the others'.
func TestRetryPolicyPrecedence(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, broker.Policy{MaxAttempts: 3, BackoffMin: 5 * time.Second, BackoffMax: 5 * time.Second, DedupWindow: time.Minute})
	queueCfg := func(n uint32) *qbridgev1.RetryPolicy {
		return &qbridgev1.RetryPolicy{MaxAttempts: n, MinBackoff: durationpb.New(time.Minute), MaxBackoff: durationpb.New(time.Minute)}
	}
	msgCfg := func(n uint32) *qbridgev1.RetryPolicy {
		return &qbridgev1.RetryPolicy{MaxAttempts: n, MinBackoff: durationpb.New(900 * time.Second), MaxBackoff: durationpb.New(900 * time.Second)}
	}
	for _, tc := range []struct {
		name           string
		queue, message *qbridgev1.RetryPolicy
		configLater    bool // configure the queue after the message is enqueued
		attempts       uint32
		backoff        time.Duration // the bound of the first retry
	}{
		{"server default", nil, nil, false, 3, 5 * time.Second},
		{"queue overrides server", queueCfg(2), nil, false, 2, time.Minute},
		{"queue config applies to queued messages", queueCfg(4), nil, true, 4, time.Minute},
		{"message overrides queue", queueCfg(2), msgCfg(5), false, 5, 900 * time.Second},
		{"message overrides server", nil, msgCfg(1), false, 1, 900 * time.Second},
		{"message max_attempts only", queueCfg(2), &qbridgev1.RetryPolicy{MaxAttempts: 4}, false, 4, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			q := "rt-prec-" + strings.ReplaceAll(tc.name, " ", "-")
			if tc.queue != nil && !tc.configLater {
				rtConfigure(t, in, q, tc.queue)
			}
			ids := make([]string, 2)
			for i := range ids {
				ids[i] = rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: fmt.Sprintf("m%d", i), RetryPolicy: tc.message})
			}
			if tc.queue != nil && tc.configLater {
				rtConfigure(t, in, q, tc.queue)
			}
			s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
			// m0 is requeued until it dies: it must get exactly the
			// attempts of the policy in force.
			for k := uint32(1); k <= tc.attempts; k++ {
				d := rtNext(t, s, ids[0], k, 5*time.Second)
				rtMustNack(t, in, rtRequeue, nil, fmt.Sprintf("fail %d", k), d)
			}
			dead := rtPeekAll(t, in, q, rtStateDead)
			if len(dead) != 1 || dead[0].GetId() != ids[0] || dead[0].GetDeliveries() != tc.attempts || dead[0].GetDeadReason() != rtMaxAttemptsReason {
				t.Fatalf("after %d failed attempts: dead letters %v; want %s with %d deliveries", tc.attempts, dead, ids[0], tc.attempts)
			}
			// m1 is retried once: the first retry's bound is the
			// policy's min backoff.
			d := rtNext(t, s, ids[1], 1, 5*time.Second)
			if tc.attempts == 1 {
				rtMustNack(t, in, rtRetry, nil, "", d)
				if st := rtStats(t, in, q); st.GetDead() != 2 || st.GetDelayed() != 0 {
					t.Fatalf("a retry of a message with 1 attempt: %d dead, %d delayed; want 2, 0", st.GetDead(), st.GetDelayed())
				}
				return
			}
			t0 := time.Now()
			rtMustNack(t, in, rtRetry, nil, "", d)
			t1 := time.Now()
			delayed := rtPeekAll(t, in, q, rtStateDelayed)
			if len(delayed) != 1 {
				t.Fatalf("%d delayed; want 1", len(delayed))
			}
			rtWantDelayed(t, delayed[0], t0, t1, tc.backoff/10, tc.backoff)
		})
	}
}

// NACK_ACTION_DEAD_LETTER moves deliveries to the dead letters at once,
// however many attempts they have left.
func TestRetryNackDeadLetter(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-nackdead"
	for _, id := range []string{"a", "b", "c"} {
		rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: id, Payload: []byte("p-" + id), Headers: map[string]string{"h": id}})
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 3, LeaseDuration: lease(time.Minute)})
	ds := rtTake(t, s, 3)
	start := time.Now()
	rtMustNack(t, in, rtDeadLetter, nil, "schema mismatch", ds[0], ds[1])
	dead := rtPeekAll(t, in, q, rtStateDead)
	if got := rtIDs(dead); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("dead letters %v; want [a b]", got)
	}
	for _, m := range dead {
		id := m.GetId()
		if m.GetDeadReason() != rtNackedReason || m.GetDeliveries() != 1 || m.GetLastError() != "schema mismatch" ||
			string(m.GetPayload()) != "p-"+id || m.GetHeaders()["h"] != id || m.GetDeadTime().AsTime().Before(start.Add(-rtClockSlack)) {
			t.Fatalf("dead letter %s = reason %q, %d deliveries, last_error %q, payload %q, headers %v, dead_time %v",
				id, m.GetDeadReason(), m.GetDeliveries(), m.GetLastError(), m.GetPayload(), m.GetHeaders(), m.GetDeadTime().AsTime())
		}
	}
	// The tokens are spent: acking one fails and leaves its dead letter.
	wantCode(t, ack(t, in.client, ds[0]), codes.FailedPrecondition, "no longer hold a lease")
	wantCode(t, rtNack(t, in, rtDeadLetter, nil, "", ds[1]), codes.FailedPrecondition, "")
	// The stream got its credit back.
	rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: "d"})
	d := rtNext(t, s, "d", 1, 5*time.Second)
	if err := ack(t, in.client, ds[2], d); err != nil {
		t.Fatal(err)
	}
	st := rtStats(t, in, q)
	if c := st.GetCounters(); st.GetDead() != 2 || st.GetInFlight() != 0 || st.GetReady() != 0 || c.GetDeadLettered() != 2 || c.GetNacked() != 2 || c.GetAcked() != 2 {
		t.Fatalf("stats: %d dead, %d in flight, %d ready, counters %v", st.GetDead(), st.GetInFlight(), st.GetReady(), c)
	}
	if c := rtCountKeys(t, in, q); c != (rtCounts{dead: 2, deadIdx: 2}) {
		t.Fatalf("Redis holds %+v; want the 2 dead letters only", c)
	}
}

func TestRetryDeadLetterPaging(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-paging"
	ids := []string{"d0", "d1", "d2", "d3", "d4"}
	rtMakeDead(t, in, q, ids...)
	for _, tc := range []struct {
		pageSize uint32
		pages    []int
	}{
		{1, []int{1, 1, 1, 1, 1}},
		{2, []int{2, 2, 1}},
		{4, []int{4, 1}},
		{5, []int{5}},
		{6, []int{5}},
		{0, []int{5}}, // the default, 50
	} {
		t.Run(fmt.Sprintf("page size %d", tc.pageSize), func(t *testing.T) {
			var got []*qbridgev1.QueuedMessage
			var sizes []int
			tok := ""
			for {
				resp, err := in.admin.PeekMessages(ctxT(t, 5*time.Second), &qbridgev1.PeekMessagesRequest{Queue: q, State: rtStateDead, PageSize: tc.pageSize, PageToken: tok})
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, resp.GetMessages()...)
				sizes = append(sizes, len(resp.GetMessages()))
				if tok = resp.GetNextPageToken(); tok == "" {
					break
				}
				if len(sizes) > len(ids) {
					t.Fatalf("still a next page after %d pages", len(sizes))
				}
			}
			if !slices.Equal(sizes, tc.pages) {
				t.Fatalf("page sizes %v; want %v (the last page has no next_page_token)", sizes, tc.pages)
			}
			if gotIDs := rtIDs(got); !slices.Equal(gotIDs, ids) {
				t.Fatalf("dead letters over the pages: %v; want %v, each once, oldest dead first", gotIDs, ids)
			}
			for i := 1; i < len(got); i++ {
				if got[i].GetDeadTime().AsTime().Before(got[i-1].GetDeadTime().AsTime()) {
					t.Fatalf("dead letter %s died before %s but comes after it", got[i].GetId(), got[i-1].GetId())
				}
			}
		})
	}
}

// ReplayDeadLetters puts dead letters back on the queue with their attempts
// reset; a consumer then processes them normally.
func TestRetryReplayDeadLetters(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-replay"
	ids := []string{"r0", "r1", "r2", "r3", "r4"}
	s := rtMakeDead(t, in, q, ids...)
	enqueued := map[string]time.Time{}
	for _, m := range rtPeekAll(t, in, q, rtStateDead) {
		enqueued[m.GetId()] = m.GetEnqueueTime().AsTime()
	}
	replay := func(req *qbridgev1.ReplayDeadLettersRequest) int64 {
		t.Helper()
		req.Queue = q
		resp, err := in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), req)
		if err != nil {
			t.Fatalf("replay %v: %v", req, err)
		}
		return resp.GetReplayed()
	}
	// expect receives the replayed messages, checks them and acks them.
	expect := func(want ...string) {
		t.Helper()
		for _, id := range want {
			d := rtNext(t, s, id, 1, 5*time.Second) // attempts reset
			if string(d.GetPayload()) != "payload-"+id || d.GetHeaders()["id"] != id || !d.GetEnqueueTime().AsTime().Equal(enqueued[id]) {
				t.Fatalf("replayed %s = payload %q headers %v enqueue_time %v; want the original message", id, d.GetPayload(), d.GetHeaders(), d.GetEnqueueTime().AsTime())
			}
			if err := ack(t, in.client, d); err != nil {
				t.Fatalf("ack of replayed %s: %v", id, err)
			}
		}
	}
	wantDead := func(want ...string) {
		t.Helper()
		if got := rtIDs(rtPeekAll(t, in, q, rtStateDead)); !slices.Equal(got, want) {
			t.Fatalf("dead letters %v; want %v", got, want)
		}
	}

	if n := replay(&qbridgev1.ReplayDeadLettersRequest{Ids: []string{"r1"}}); n != 1 {
		t.Fatalf("replay of one id replayed %d", n)
	}
	expect("r1")
	wantDead("r0", "r2", "r3", "r4")

	if n := replay(&qbridgev1.ReplayDeadLettersRequest{Ids: []string{"r3", "no-such-id", "r0"}}); n != 2 {
		t.Fatalf("replay of 2 known ids and an unknown one replayed %d", n)
	}
	expect("r3", "r0") // to the tail, in the order given
	wantDead("r2", "r4")

	for _, unknown := range [][]string{{"no-such-id"}, {"r1"}, {"r2#1"}} {
		if n := replay(&qbridgev1.ReplayDeadLettersRequest{Ids: unknown}); n != 0 {
			t.Fatalf("replay of %v (not dead letters) replayed %d", unknown, n)
		}
	}
	wantDead("r2", "r4")

	if n := replay(&qbridgev1.ReplayDeadLettersRequest{All: true}); n != 2 {
		t.Fatalf("replay all replayed %d; want 2", n)
	}
	expect("r2", "r4")
	wantDead()
	if n := replay(&qbridgev1.ReplayDeadLettersRequest{All: true}); n != 0 {
		t.Fatalf("replay all with no dead letters replayed %d", n)
	}

	st := rtStats(t, in, q)
	if c := st.GetCounters(); st.GetDead() != 0 || st.GetReady() != 0 || st.GetInFlight() != 0 || c.GetAcked() != 5 || c.GetDeadLettered() != 5 {
		t.Fatalf("after replaying and acking all: %d dead, %d ready, %d in flight, counters %v", st.GetDead(), st.GetReady(), st.GetInFlight(), c)
	}
	if c := rtCountKeys(t, in, q); c != (rtCounts{}) {
		t.Fatalf("Redis still holds %+v", c)
	}
}

// A replayed message gets a full set of attempts again: if it keeps
// failing it dies again (once), and if it then succeeds it is gone.
func TestRetryReplayedMessageStartsOver(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy) // 3 attempts
	const q = "rt-startover"
	id := rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: "flaky", Payload: []byte("p"), Headers: map[string]string{"h": "v"}})
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
	failAll := func(round int) *qbridgev1.QueuedMessage {
		t.Helper()
		for k := uint32(1); k <= 3; k++ {
			d := rtNext(t, s, id, k, 5*time.Second)
			if d.GetHeaders()["h"] != "v" {
				t.Fatalf("round %d attempt %d lost the headers: %v", round, k, d.GetHeaders())
			}
			rtMustNack(t, in, rtRequeue, nil, fmt.Sprintf("round %d fail %d", round, k), d)
		}
		dead := rtPeekAll(t, in, q, rtStateDead)
		if len(dead) != 1 || dead[0].GetId() != id || dead[0].GetDeliveries() != 3 || dead[0].GetDeadReason() != rtMaxAttemptsReason ||
			dead[0].GetLastError() != fmt.Sprintf("round %d fail 3", round) {
			t.Fatalf("round %d: dead letters %v; want %s once, with 3 deliveries", round, dead, id)
		}
		return dead[0]
	}
	first := failAll(1)
	if resp, err := in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, Ids: []string{id}}); err != nil || resp.GetReplayed() != 1 {
		t.Fatalf("replay: %v %v", resp, err)
	}
	second := failAll(2)
	if second.GetDeadTime().AsTime().Before(first.GetDeadTime().AsTime()) {
		t.Fatalf("second death %v is before the first %v", second.GetDeadTime().AsTime(), first.GetDeadTime().AsTime())
	}
	if resp, err := in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, All: true}); err != nil || resp.GetReplayed() != 1 {
		t.Fatalf("replay all: %v %v", resp, err)
	}
	d := rtNext(t, s, id, 1, 5*time.Second)
	if err := ack(t, in.client, d); err != nil {
		t.Fatalf("ack after replay: %v", err)
	}
	st := rtStats(t, in, q)
	if c := st.GetCounters(); st.GetDead() != 0 || c.GetDeadLettered() != 2 || c.GetAcked() != 1 || c.GetNacked() != 6 {
		t.Fatalf("stats: %d dead, counters %v; want 0 dead, 2 dead-lettered, 1 acked, 6 nacked", st.GetDead(), c)
	}
	if c := rtCountKeys(t, in, q); c != (rtCounts{}) {
		t.Fatalf("Redis still holds %+v", c)
	}
}

func TestRetryDeleteDeadLetters(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-delete"
	rtMakeDead(t, in, q, "x0", "x1", "x2", "x3")
	del := func(req *qbridgev1.DeleteDeadLettersRequest) int64 {
		t.Helper()
		req.Queue = q
		resp, err := in.admin.DeleteDeadLetters(ctxT(t, 5*time.Second), req)
		if err != nil {
			t.Fatalf("delete %v: %v", req, err)
		}
		return resp.GetDeleted()
	}
	if n := del(&qbridgev1.DeleteDeadLettersRequest{Ids: []string{"x1", "no-such-id", "x3"}}); n != 2 {
		t.Fatalf("delete of 2 known ids and an unknown one deleted %d", n)
	}
	if got := rtIDs(rtPeekAll(t, in, q, rtStateDead)); !slices.Equal(got, []string{"x0", "x2"}) {
		t.Fatalf("dead letters after deleting x1, x3: %v", got)
	}
	if n := del(&qbridgev1.DeleteDeadLettersRequest{Ids: []string{"x1"}}); n != 0 {
		t.Fatalf("deleting x1 again deleted %d", n)
	}
	if c := rtCountKeys(t, in, q); c != (rtCounts{dead: 2, deadIdx: 2}) {
		t.Fatalf("Redis holds %+v; want 2 dead letters", c)
	}
	if n := del(&qbridgev1.DeleteDeadLettersRequest{All: true}); n != 2 {
		t.Fatalf("delete all deleted %d; want 2", n)
	}
	if n := del(&qbridgev1.DeleteDeadLettersRequest{All: true}); n != 0 {
		t.Fatalf("delete all of nothing deleted %d", n)
	}
	if c := rtCountKeys(t, in, q); c != (rtCounts{}) {
		t.Fatalf("Redis still holds %+v", c)
	}
	// Deleted is gone: nothing to replay, and the total stays.
	resp, err := in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, All: true})
	if err != nil || resp.GetReplayed() != 0 {
		t.Fatalf("replay after delete: %v %v", resp, err)
	}
	if st := rtStats(t, in, q); st.GetDead() != 0 || st.GetReady() != 0 || st.GetCounters().GetDeadLettered() != 4 {
		t.Fatalf("stats: %d dead, %d ready, counters %v", st.GetDead(), st.GetReady(), st.GetCounters())
	}
}

// Replay and delete need a known queue and exactly one of ids and all.
func TestRetryDeadLetterCallsRejectBadSelections(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-badsel"
	rtMakeDead(t, in, q, "z")
	for _, tc := range []struct {
		name  string
		queue string
		ids   []string
		all   bool
		code  codes.Code
	}{
		{"ids and all", q, []string{"z"}, true, codes.InvalidArgument},
		{"neither ids nor all", q, nil, false, codes.InvalidArgument},
		{"empty id", q, []string{""}, false, codes.InvalidArgument},
		{"too many ids", q, make([]string, 1001), false, codes.InvalidArgument},
		{"unknown queue", "rt-no-such-queue", []string{"z"}, false, codes.NotFound},
		{"bad queue name", "rt bad", []string{"z"}, false, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := ctxT(t, 5*time.Second)
			_, err := in.admin.ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: tc.queue, Ids: tc.ids, All: tc.all})
			wantCode(t, err, tc.code, "")
			_, err = in.admin.DeleteDeadLetters(ctx, &qbridgev1.DeleteDeadLettersRequest{Queue: tc.queue, Ids: tc.ids, All: tc.all})
			wantCode(t, err, tc.code, "")
			if got := rtIDs(rtPeekAll(t, in, q, rtStateDead)); !slices.Equal(got, []string{"z"}) {
				t.Fatalf("a refused call changed the dead letters: %v", got)
			}
		})
	}
}

// Two messages with the same client-chosen id can both be dead: the second
// gets a dead id of its own, and each is replayed as itself.
func TestRetryDeadLettersWithTheSameID(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-sameid"
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
	for i, payload := range []string{"first", "second", "third"} {
		rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: "order-1", Payload: []byte(payload)})
		d := rtNext(t, s, "order-1", 1, 5*time.Second)
		rtMustNack(t, in, rtDeadLetter, nil, fmt.Sprintf("failure %d", i+1), d)
	}
	dead := rtPeekAll(t, in, q, rtStateDead)
	if len(dead) != 3 {
		t.Fatalf("%d dead letters; want all 3 kept", len(dead))
	}
	byPayload := map[string]string{}
	seen := map[string]bool{}
	for _, m := range dead {
		byPayload[string(m.GetPayload())] = m.GetId()
		if seen[m.GetId()] {
			t.Fatalf("dead id %s used twice: %v", m.GetId(), rtIDs(dead))
		}
		seen[m.GetId()] = true
	}
	if byPayload["first"] != "order-1" {
		t.Fatalf("the first dead letter has dead id %q; want the message id order-1", byPayload["first"])
	}
	for _, p := range []string{"second", "third"} {
		if !strings.HasPrefix(byPayload[p], "order-1#") {
			t.Fatalf("dead letter %q has dead id %q; want order-1#<n>", p, byPayload[p])
		}
	}
	// Replaying by the "#" id brings back that message, under its own id.
	resp, err := in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, Ids: []string{byPayload["second"]}})
	if err != nil || resp.GetReplayed() != 1 {
		t.Fatalf("replay %s: %v %v", byPayload["second"], resp, err)
	}
	d := rtNext(t, s, "order-1", 1, 5*time.Second)
	if string(d.GetPayload()) != "second" {
		t.Fatalf("replaying %s brought back %q; want second", byPayload["second"], d.GetPayload())
	}
	if err := ack(t, in.client, d); err != nil {
		t.Fatal(err)
	}
	// Deleting by the plain id removes only the first.
	if resp, err := in.admin.DeleteDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.DeleteDeadLettersRequest{Queue: q, Ids: []string{"order-1"}}); err != nil || resp.GetDeleted() != 1 {
		t.Fatalf("delete order-1: %v %v", resp, err)
	}
	rest := rtPeekAll(t, in, q, rtStateDead)
	if len(rest) != 1 || rest[0].GetId() != byPayload["third"] || string(rest[0].GetPayload()) != "third" || rest[0].GetLastError() != "failure 3" {
		t.Fatalf("dead letters left: %v; want only the third", rest)
	}
}

// Raw-mode queues (bare payloads in the list, for plain BLPOP consumers)
// still dead-letter, and a replay puts the bare payload back on the list.
func TestRetryRawQueueDeadLetters(t *testing.T) {
	rs := redistest.Start(t)
	raw := broker.WithRawQueues(func(q string) bool { return strings.HasPrefix(q, "rt-raw") })
	a := rtStart(t, rs, rtPolicy, raw)
	b := rtStart(t, rs, rtPolicy, raw)
	plain := rs.Client(t, 0)
	ctx := ctxT(t, 20*time.Second)
	const q = "rt-raw:jobs"
	// One attempt: any failure dead-letters.
	rtConfigure(t, a, q, &qbridgev1.RetryPolicy{MaxAttempts: 1})
	for _, p := range []string{"p1", "p2"} {
		rtEnqueue(t, a, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(p)})
	}
	if els := plain.LRange(ctx, q, 0, -1).Val(); !slices.Equal(els, []string{"p1", "p2"}) {
		t.Fatalf("raw list holds %q; want the bare payloads", els)
	}
	s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 2, LeaseDuration: lease(time.Minute)})
	ds := rtTake(t, s, 2)
	if string(ds[0].GetPayload()) != "p1" || string(ds[1].GetPayload()) != "p2" {
		t.Fatalf("deliveries %q, %q; want p1, p2", ds[0].GetPayload(), ds[1].GetPayload())
	}
	rtMustNack(t, a, rtDeadLetter, nil, "poison", ds[0])
	rtMustNack(t, a, rtRequeue, nil, "flaky", ds[1])
	dead := rtPeekAll(t, b, q, rtStateDead)
	if len(dead) != 2 {
		t.Fatalf("%d dead letters; want 2", len(dead))
	}
	for i, want := range []struct{ payload, lastErr, reason string }{
		{"p1", "poison", rtNackedReason},
		{"p2", "flaky", rtMaxAttemptsReason},
	} {
		m := dead[i]
		if m.GetId() != ds[i].GetId() || string(m.GetPayload()) != want.payload || m.GetLastError() != want.lastErr || m.GetDeadReason() != want.reason || m.GetDeliveries() != 1 {
			t.Fatalf("dead letter %d = id %s payload %q last_error %q reason %q deliveries %d; want id %s, %q, %q, %q, 1",
				i, m.GetId(), m.GetPayload(), m.GetLastError(), m.GetDeadReason(), m.GetDeliveries(), ds[i].GetId(), want.payload, want.lastErr, want.reason)
		}
	}
	if c := rtCountKeys(t, b, q); c != (rtCounts{dead: 2, deadIdx: 2}) {
		t.Fatalf("Redis holds %+v; want the 2 dead letters only", c)
	}
	// Stop the qbridge consumer, so that only the plain client reads.
	a.stop()
	resp, err := b.admin.ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: q, Ids: []string{dead[0].GetId()}})
	if err != nil || resp.GetReplayed() != 1 {
		t.Fatalf("replay %s: %v %v", dead[0].GetId(), resp, err)
	}
	rtWantBLPop(t, plain, q, "p1")
	resp, err = b.admin.ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: q, All: true})
	if err != nil || resp.GetReplayed() != 1 {
		t.Fatalf("replay all: %v %v", resp, err)
	}
	rtWantBLPop(t, plain, q, "p2")
	if c := rtCountKeys(t, b, q); c != (rtCounts{}) {
		t.Fatalf("Redis still holds %+v", c)
	}
}

// rtWantBLPop pops the head of list q as a plain Redis consumer would and
// checks that it is the bare payload want.
func rtWantBLPop(t *testing.T, plain *redis.Client, q, want string) {
	t.Helper()
	got, err := plain.BLPop(ctxT(t, 10*time.Second), 5*time.Second, q).Result()
	if err != nil {
		t.Fatalf("plain BLPOP on %s: %v", q, err)
	}
	if len(got) != 2 || got[1] != want {
		t.Fatalf("plain BLPOP on %s read %q; want the bare payload %q", q, got, want)
	}
}

// A retry_delay of zero given with NACK_ACTION_RETRY means "deliver again
// at once" (queue.proto: "With REQUEUE or RETRY: deliver again after this
// delay (0 to 365 days) instead of ... after the policy's backoff"), just
// as a zero retry_delay counts as given for DROP (which it makes
// INVALID_ARGUMENT).
func TestRetryZeroRetryDelayRetriesAtOnce(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-zero-delay"
	rtConfigure(t, in, q, &qbridgev1.RetryPolicy{MinBackoff: durationpb.New(30 * time.Second), MaxBackoff: durationpb.New(30 * time.Second)})
	id := rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
	d := rtNext(t, s, id, 1, 5*time.Second)
	rtMustNack(t, in, rtRetry, durationpb.New(0), "again now", d)
	if delayed := rtPeekAll(t, in, q, rtStateDelayed); len(delayed) != 0 {
		t.Fatalf("retried with retry_delay 0 but delayed until %v", delayed[0].GetDeliverTime().AsTime())
	}
	rtNext(t, s, id, 2, 5*time.Second)
}

// Deliveries nacked together with the same retry_delay come back in their
// order, like requeued ones do (broker.Nack: "oldest delivery first, so
// order is kept").
func TestRetryDelayedBatchKeepsOrder(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	for _, action := range []qbridgev1.NackAction{rtRequeue, rtRetry} {
		t.Run(action.String(), func(t *testing.T) {
			q := "rt-order-" + action.String()
			ids := enqueueN(t, in.client, q, 3)
			s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 3, LeaseDuration: lease(time.Minute)})
			rtMustNack(t, in, action, durationpb.New(200*time.Millisecond), "", rtTake(t, s, 3)...)
			for _, id := range ids {
				rtNext(t, s, id, 2, 5*time.Second)
			}
		})
	}
}

// Deliveries whose leases run out together come back in delivery order,
// like those of an ended stream (sortLeaseIDs in consume.go).
func TestRetryLeaseExpiryKeepsOrder(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-reap-order"
	// A fresh queue: the 12 leases of one claim get ids 1 to 12, across
	// the 9/10 boundary, and all the same deadline.
	ids := enqueueN(t, in.client, q, 12)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 12, LeaseDuration: lease(time.Second)})
	for _, id := range ids {
		rtNext(t, s, id, 1, 5*time.Second)
	}
	for _, id := range ids {
		rtNext(t, s, id, 2, 10*time.Second)
	}
}

// ReplayDeadLetters gives a dead letter back to consumers, whatever its
// dead reason. One that died because its ttl passed must not die again
// at once for the same reason, unseen.
func TestRetryReplayOfExpiredDeadLetterIsDelivered(t *testing.T) {
	rs := redistest.Start(t)
	in := rtStart(t, rs, rtPolicy)
	const q = "rt-replay-expired"
	if _, err := in.admin.UpdateQueueConfig(ctxT(t, 5*time.Second), &qbridgev1.UpdateQueueConfigRequest{
		Queue: q, Config: &qbridgev1.QueueConfig{ExpiredAction: qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER},
	}); err != nil {
		t.Fatal(err)
	}
	id := rtEnqueue(t, in, &qbridgev1.EnqueueRequest{Queue: q, Id: "stale", Payload: []byte("x"), Ttl: durationpb.New(20 * time.Millisecond)})
	ready := rtPeekAll(t, in, q, rtStateReady)
	if len(ready) != 1 || ready[0].GetExpireTime() == nil {
		t.Fatalf("ready = %v; want the message with an expire_time", ready)
	}
	expires := ready[0].GetExpireTime().AsTime()
	eventually(t, 5*time.Second, "the ttl to pass", func() bool { return time.Now().After(expires.Add(rtClockSlack)) })
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
	eventually(t, 5*time.Second, "the expired message in the dead letters", func() bool { return rtStats(t, in, q).GetDead() == 1 })
	if dead := rtPeekAll(t, in, q, rtStateDead); len(dead) != 1 || dead[0].GetDeadReason() != "expired" {
		t.Fatalf("dead letters = %v; want %s, expired", dead, id)
	}
	resp, err := in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, Ids: []string{id}})
	if err != nil || resp.GetReplayed() != 1 {
		t.Fatalf("replay: %v %v", resp, err)
	}
	d := rtNext(t, s, id, 1, 5*time.Second)
	if err := ack(t, in.client, d); err != nil {
		t.Fatal(err)
	}
	if st := rtStats(t, in, q); st.GetDead() != 0 || st.GetCounters().GetDeadLettered() != 1 {
		t.Fatalf("after the replay: %d dead, counters %v", st.GetDead(), st.GetCounters())
	}
}
