package client_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// enqueue enqueues one message, failing the test on error.
func enqueue(t *testing.T, ctx context.Context, c *client.Client, queue, payload string, opts ...client.EnqueueOption) string {
	t.Helper()
	id, err := c.Enqueue(ctx, queue, []byte(payload), opts...)
	if err != nil {
		t.Fatalf("Enqueue(%q, %q): %v", queue, payload, err)
	}
	return id
}

// stats returns the queue's stats, failing the test on error.
func stats(t *testing.T, ctx context.Context, c *client.Client, queue string) *client.QueueStats {
	t.Helper()
	st, err := c.Stats(ctx, queue)
	if err != nil {
		t.Fatalf("Stats(%q): %v", queue, err)
	}
	return st
}

// waitFor polls the queue's stats until ok accepts them.
func waitFor(t *testing.T, ctx context.Context, c *client.Client, queue, want string, ok func(*client.QueueStats) bool) *client.QueueStats {
	t.Helper()
	var last *client.QueueStats
	eventually(t, func() (bool, string) {
		st, err := c.Stats(ctx, queue)
		if err != nil {
			return false, fmt.Sprintf("Stats(%q): %v", queue, err)
		}
		last = st
		return ok(st), fmt.Sprintf("Stats(%q) = %+v; want %s", queue, *st, want)
	})
	return last
}

// peek returns the queue's messages in state (first page), through Admin.
func peek(t *testing.T, ctx context.Context, c *client.Client, queue string, state qbridgev1.MessageState) []*qbridgev1.QueuedMessage {
	t.Helper()
	resp, err := c.Admin().PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{Queue: queue, State: state})
	if err != nil {
		t.Fatalf("Admin().PeekMessages(%q, %v): %v", queue, state, err)
	}
	return resp.GetMessages()
}

// waitUntil polls until the local clock has passed at. (The server takes
// its time from Redis, which runs on this host: the same clock.)
func waitUntil(t *testing.T, at time.Time) {
	t.Helper()
	eventually(t, func() (bool, string) {
		return time.Now().After(at), fmt.Sprintf("the clock to pass %v", at)
	})
}

// ms is the millisecond the server stores for t (its times have millisecond
// precision, truncated).
func ms(t time.Time) time.Time { return t.Truncate(time.Millisecond) }

func TestDelayedDelivery(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q, delay = "delayed", 300 * time.Millisecond
	// The consumer is there all along: a message it receives is one the
	// server delivered at that moment.
	cs := consume(t, ctx, e.c, q)

	before := time.Now()
	later := enqueue(t, ctx, e.c, q, "later", client.WithDelay(delay))
	now := enqueue(t, ctx, e.c, q, "now")
	enqueued := time.Now()
	due := ms(before).Add(delay) // the earliest the server may deliver it

	// Until it is due, the message is delayed (checked only while that is
	// certain, so a slow machine does not fail the test).
	st := stats(t, ctx, e.c, q)
	if time.Now().Before(due) {
		if st.Delayed != 1 || st.Ready+st.InFlight != 1 {
			t.Errorf("before the delay passed: Stats = %+v; want 1 delayed, 1 ready or in flight", *st)
		}
	}
	if ds := peek(t, ctx, e.c, q, qbridgev1.MessageState_MESSAGE_STATE_DELAYED); time.Now().Before(due) {
		if len(ds) != 1 || ds[0].GetId() != later {
			t.Fatalf("PeekMessages(DELAYED) = %v; want the delayed message %q", ds, later)
		}
		if at := ds[0].GetDeliverTime().AsTime(); at.Before(due) || at.After(enqueued.Add(delay)) {
			t.Errorf("DeliverTime = %v; want within [%v, %v]", at, due, enqueued.Add(delay))
		}
	}

	first := next(t, cs)
	if enqueued.Before(due) && first.ID != now {
		t.Fatalf("first delivery is %q (%s); want the undelayed %q", first.ID, first.Payload, now)
	}
	d := first
	if first.ID == now {
		d = next(t, cs)
	}
	got := time.Now()
	if d.ID != later || string(d.Payload) != "later" || d.Attempt != 1 {
		t.Fatalf("delivery = {ID %q Payload %q Attempt %d}; want {%q later 1}", d.ID, d.Payload, d.Attempt, later)
	}
	if got.Before(due) {
		t.Fatalf("the delayed message arrived %v after Enqueue; want no earlier than %v", got.Sub(before), delay)
	}
	if d.EnqueueTime.Before(ms(before)) || d.EnqueueTime.After(enqueued) {
		t.Errorf("EnqueueTime = %v; want the Enqueue's time, not the due time", d.EnqueueTime)
	}
}

func TestDeliverAt(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "scheduled"
	cs := consume(t, ctx, e.c, q)

	at := time.Now().Add(300 * time.Millisecond)
	id := enqueue(t, ctx, e.c, q, "at", client.WithDeliverAt(at))
	past := enqueue(t, ctx, e.c, q, "past", client.WithDeliverAt(time.Now().Add(-time.Hour)))
	enqueued := time.Now()

	got := map[string]time.Time{} // id -> when it arrived
	var order []string
	for range 2 {
		d := next(t, cs)
		got[d.ID] = time.Now()
		order = append(order, d.ID)
	}
	if _, ok := got[id]; !ok {
		t.Fatalf("deliveries %q; want %q and %q", order, id, past)
	}
	if got[id].Before(ms(at)) {
		t.Fatalf("the scheduled message arrived %v before its time", ms(at).Sub(got[id]))
	}
	// A deliver-at time in the past means now: that message came first
	// (checked only when it was enqueued before the other one's time).
	if enqueued.Before(ms(at)) && order[0] != past {
		t.Fatalf("deliveries %q; want %q (deliver-at in the past) first", order, past)
	}

	// Delay and deliver-at together are refused.
	_, err := e.c.Enqueue(ctx, q, nil, client.WithDelay(time.Second), client.WithDeliverAt(time.Now().Add(time.Second)))
	wantCode(t, "Enqueue with delay and deliver-at", err, codes.InvalidArgument)
}

func TestDedup(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "dedup"

	r1, err := e.c.EnqueueResult(ctx, q, []byte("first"), client.WithDedupKey("order-42"))
	if err != nil {
		t.Fatalf("EnqueueResult: %v", err)
	}
	if r1.Duplicate || r1.ID == "" {
		t.Fatalf("first EnqueueResult = %+v; want a fresh id, not a duplicate", r1)
	}
	r2, err := e.c.EnqueueResult(ctx, q, []byte("second"), client.WithDedupKey("order-42"))
	if err != nil {
		t.Fatalf("EnqueueResult: %v", err)
	}
	if !r2.Duplicate || r2.ID != r1.ID {
		t.Fatalf("second EnqueueResult with the same key = %+v; want {ID %q Duplicate true}", r2, r1.ID)
	}
	// Enqueue reports the first id too, without error.
	if id := enqueue(t, ctx, e.c, q, "third", client.WithDedupKey("order-42")); id != r1.ID {
		t.Fatalf("Enqueue with a duplicate key returned %q; want the first id %q", id, r1.ID)
	}
	// Another key, and a chosen id, are independent.
	r3, err := e.c.EnqueueResult(ctx, q, []byte("other"), client.WithDedupKey("order-43"), client.WithID("msg-43"))
	if err != nil {
		t.Fatalf("EnqueueResult: %v", err)
	}
	if r3.Duplicate || r3.ID != "msg-43" {
		t.Fatalf("EnqueueResult with a new key = %+v; want {msg-43 false}", r3)
	}
	r4, err := e.c.EnqueueResult(ctx, q, []byte("other again"), client.WithDedupKey("order-43"), client.WithID("msg-44"))
	if err != nil {
		t.Fatalf("EnqueueResult: %v", err)
	}
	if !r4.Duplicate || r4.ID != "msg-43" {
		t.Fatalf("EnqueueResult with a duplicate key and another id = %+v; want {msg-43 true}", r4)
	}

	// In a batch: against earlier messages, and within the batch.
	rs, err := e.c.EnqueueBatchResult(ctx, q, []client.Message{
		{Payload: []byte("b0"), DedupKey: "order-42"},
		{Payload: []byte("b1"), DedupKey: "order-44"},
		{Payload: []byte("b2"), DedupKey: "order-44"},
		{Payload: []byte("b3")},
	})
	if err != nil {
		t.Fatalf("EnqueueBatchResult: %v", err)
	}
	if len(rs) != 4 || !rs[0].Duplicate || rs[0].ID != r1.ID || rs[1].Duplicate || !rs[2].Duplicate ||
		rs[2].ID != rs[1].ID || rs[3].Duplicate || rs[3].ID == "" {
		t.Fatalf("EnqueueBatchResult = %+v; want [{%s true} {X false} {X true} {Y false}]", rs, r1.ID)
	}
	ids, err := e.c.EnqueueBatch(ctx, q, []client.Message{{Payload: []byte("b4"), DedupKey: "order-44"}})
	if err != nil || len(ids) != 1 || ids[0] != rs[1].ID {
		t.Fatalf("EnqueueBatch with a duplicate key = %v, %v; want [%s]", ids, err, rs[1].ID)
	}

	st := stats(t, ctx, e.c, q)
	if st.Ready != 4 || st.Counters.Enqueued != 4 {
		t.Fatalf("Stats = %+v; want 4 ready and 4 enqueued (duplicates are not)", *st)
	}
	cs := consume(t, ctx, e.c, q)
	var got []string
	for range 4 {
		d := next(t, cs)
		got = append(got, string(d.Payload))
		if err := d.Ack(ctx); err != nil {
			t.Fatalf("Ack: %v", err)
		}
	}
	if want := []string{"first", "other", "b1", "b3"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("delivered %q; want %q", got, want)
	}
	wantStats(t, ctx, e.c, q, 0, 0)
}

func TestTTL(t *testing.T) {
	for _, tc := range []struct {
		name   string
		action qbridgev1.ExpiredAction
	}{
		{"drop", qbridgev1.ExpiredAction_EXPIRED_ACTION_UNSPECIFIED},
		{"dead letter", qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := testCtx(t)
			const q, ttl = "ttl", 100 * time.Millisecond
			if tc.action != qbridgev1.ExpiredAction_EXPIRED_ACTION_UNSPECIFIED {
				_, err := e.c.Admin().UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{
					Queue: q, Config: &qbridgev1.QueueConfig{ExpiredAction: tc.action},
				})
				if err != nil {
					t.Fatalf("UpdateQueueConfig: %v", err)
				}
			}
			before := time.Now()
			short := enqueue(t, ctx, e.c, q, "short-lived", client.WithTTL(ttl))
			enqueued := time.Now()
			long := enqueue(t, ctx, e.c, q, "long-lived", client.WithTTL(time.Hour))
			keep := enqueue(t, ctx, e.c, q, "immortal")

			ready := peek(t, ctx, e.c, q, qbridgev1.MessageState_MESSAGE_STATE_READY)
			if len(ready) != 3 || ready[0].GetId() != short || ready[2].GetExpireTime() != nil {
				t.Fatalf("PeekMessages(READY) = %v; want %q (with an expire time), %q, %q (without)", ready, short, long, keep)
			}
			expire := ready[0].GetExpireTime().AsTime()
			if expire.Before(ms(before).Add(ttl)) || expire.After(enqueued.Add(ttl)) {
				t.Fatalf("ExpireTime = %v; want about the Enqueue's time + %v", expire, ttl)
			}

			// The consumer comes late, when the ttl has passed.
			waitUntil(t, expire)
			cs := consume(t, ctx, e.c, q)
			for _, want := range []string{long, keep} {
				d := next(t, cs)
				if d.ID != want {
					t.Fatalf("delivery %q (%s); want %q: the expired message must not be delivered", d.ID, d.Payload, want)
				}
				if err := d.Ack(ctx); err != nil {
					t.Fatalf("Ack: %v", err)
				}
			}
			st := waitFor(t, ctx, e.c, q, "all settled, 1 expired", func(st *client.QueueStats) bool {
				return st.Ready == 0 && st.InFlight == 0 && st.Delayed == 0 && st.Counters.Expired == 1 && st.Counters.Acked == 2
			})
			dead := peek(t, ctx, e.c, q, qbridgev1.MessageState_MESSAGE_STATE_DEAD)
			if tc.action == qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER {
				if st.Dead != 1 || len(dead) != 1 || dead[0].GetId() != short || dead[0].GetDeadReason() != "expired" ||
					string(dead[0].GetPayload()) != "short-lived" {
					t.Fatalf("Dead = %d, dead letters %v; want %q, dead because expired", st.Dead, dead, short)
				}
			} else if st.Dead != 0 || len(dead) != 0 {
				t.Fatalf("Dead = %d, dead letters %v; want none (expired messages are dropped)", st.Dead, dead)
			}
		})
	}
}

func TestRetry(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "retry"
	id := enqueue(t, ctx, e.c, q, "job", client.WithRetryPolicy(client.RetryPolicy{
		MaxAttempts: 3, MinBackoff: 20 * time.Millisecond, MaxBackoff: 40 * time.Millisecond,
	}))
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1), client.WithLease(time.Minute))

	d1 := next(t, cs)
	if d1.ID != id || d1.Attempt != 1 || d1.LastError != "" {
		t.Fatalf("delivery = {ID %q Attempt %d LastError %q}; want {%q 1 \"\"}", d1.ID, d1.Attempt, d1.LastError, id)
	}
	// Retry after the message's own backoff: 10% to 100% of 20ms.
	before := time.Now()
	if err := d1.Retry(ctx, errors.New("smtp: 451 try again later")); err != nil {
		t.Fatalf("Retry: %v", err)
	}
	wantCode(t, "Ack after Retry", d1.Ack(ctx), codes.FailedPrecondition)
	d2 := next(t, cs)
	if d2.ID != id || d2.Attempt != 2 || d2.LastError != "smtp: 451 try again later" || string(d2.Payload) != "job" {
		t.Fatalf("redelivery = {ID %q Attempt %d LastError %q Payload %q}; want {%q 2 %q job}",
			d2.ID, d2.Attempt, d2.LastError, d2.Payload, id, "smtp: 451 try again later")
	}
	if got := time.Now(); got.Before(ms(before).Add(2 * time.Millisecond)) {
		t.Errorf("redelivered %v after Retry; want at least the backoff's 2ms floor", got.Sub(before))
	}

	// An explicit delay; a nil error keeps the last error text.
	const delay = 250 * time.Millisecond
	before = time.Now()
	if err := d2.Retry(ctx, nil, client.WithRetryDelay(delay)); err != nil {
		t.Fatalf("Retry(WithRetryDelay): %v", err)
	}
	st := stats(t, ctx, e.c, q)
	if time.Now().Before(ms(before).Add(delay)) && (st.Delayed != 1 || st.Ready != 0 || st.InFlight != 0) {
		t.Errorf("while the retry waits: Stats = %+v; want 1 delayed", *st)
	}
	d3 := next(t, cs)
	if got := time.Now(); got.Before(ms(before).Add(delay)) {
		t.Fatalf("redelivered %v after Retry; want no earlier than the %v delay", got.Sub(before), delay)
	}
	if d3.ID != id || d3.Attempt != 3 || d3.LastError != "smtp: 451 try again later" {
		t.Fatalf("redelivery = {ID %q Attempt %d LastError %q}; want {%q 3 %q}", d3.ID, d3.Attempt, d3.LastError, id, "smtp: 451 try again later")
	}

	// The third attempt was the last one (MaxAttempts 3): a Retry
	// dead-letters the message.
	if err := d3.Retry(ctx, fmt.Errorf("send: %w", errors.New("mailbox full"))); err != nil {
		t.Fatalf("Retry: %v", err)
	}
	st = stats(t, ctx, e.c, q)
	if st.Ready != 0 || st.InFlight != 0 || st.Delayed != 0 || st.Dead != 1 ||
		st.Counters.Nacked != 3 || st.Counters.DeadLettered != 1 {
		t.Fatalf("after the last Retry: Stats = %+v; want 1 dead, 3 nacked, 1 dead-lettered, nothing else", *st)
	}
	dead := peek(t, ctx, e.c, q, qbridgev1.MessageState_MESSAGE_STATE_DEAD)
	if len(dead) != 1 || dead[0].GetId() != id || dead[0].GetDeliveries() != 3 ||
		dead[0].GetLastError() != "send: mailbox full" || dead[0].GetDeadReason() != "max attempts reached" {
		t.Fatalf("dead letters = %v; want %q after 3 deliveries, last error %q, max attempts reached", dead, id, "send: mailbox full")
	}
}

func TestRetryAtOnce(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "retry-now"
	id := enqueue(t, ctx, e.c, q, "job") // the server's policy: backoff from 1s
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1))

	// Without a delay: the policy's backoff, at least 10% of 1s.
	d := next(t, cs)
	before := time.Now()
	if err := d.Retry(ctx, errors.New("first")); err != nil {
		t.Fatalf("Retry: %v", err)
	}
	st := stats(t, ctx, e.c, q)
	if time.Now().Before(ms(before).Add(100*time.Millisecond)) && st.Delayed != 1 {
		t.Fatalf("right after Retry: Stats = %+v; want the message delayed by the backoff", *st)
	}
	d = next(t, cs)
	if got := time.Now(); got.Before(ms(before).Add(100 * time.Millisecond)) {
		t.Fatalf("redelivered %v after Retry; want at least the backoff's 100ms floor", got.Sub(before))
	}

	// WithRetryDelay(0): at once, never delayed.
	if err := d.Retry(ctx, errors.New("second"), client.WithRetryDelay(0)); err != nil {
		t.Fatalf("Retry(WithRetryDelay(0)): %v", err)
	}
	if st := stats(t, ctx, e.c, q); st.Delayed != 0 || st.Ready+st.InFlight != 1 {
		t.Fatalf("right after Retry(WithRetryDelay(0)): Stats = %+v; want the message ready or in flight, not delayed", *st)
	}
	d = next(t, cs)
	if d.ID != id || d.Attempt != 3 || d.LastError != "second" {
		t.Fatalf("redelivery = {ID %q Attempt %d LastError %q}; want {%q 3 second}", d.ID, d.Attempt, d.LastError, id)
	}
}

func TestRetryErrorText(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "retry-text"
	enqueue(t, ctx, e.c, q, "job")
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1))
	d := next(t, cs)
	// Longer than the server's 4 KiB limit, with a 3-byte character across
	// the cut and a byte that is not UTF-8 (a proto string must be).
	text := "\xff" + strings.Repeat("x", 4092) + "€" + strings.Repeat("y", 5000)
	if err := d.Retry(ctx, errors.New(text), client.WithRetryDelay(0)); err != nil {
		t.Fatalf("Retry with a long, non-UTF-8 error text: %v", err)
	}
	d = next(t, cs)
	// The replacement character takes 3 bytes: 4095 in all, and "€" would
	// cross the limit.
	want := "\uFFFD" + strings.Repeat("x", 4092)
	if d.LastError != want {
		t.Fatalf("LastError = %.20q... (%d bytes, valid UTF-8 %v); want %.20q... (%d bytes)",
			d.LastError, len(d.LastError), utf8.ValidString(d.LastError), want, len(want))
	}
}

func TestDeadLetter(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "poison"
	headers := map[string]string{"k": "v"}
	id := enqueue(t, ctx, e.c, q, "{not json", client.WithHeaders(headers))
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1))
	d := next(t, cs)
	before := time.Now()
	if err := d.DeadLetter(ctx, errors.New("parse: unexpected end of input")); err != nil {
		t.Fatalf("DeadLetter: %v", err)
	}
	wantCode(t, "Ack after DeadLetter", d.Ack(ctx), codes.FailedPrecondition)
	wantCode(t, "DeadLetter again", d.DeadLetter(ctx, nil), codes.FailedPrecondition)

	st := stats(t, ctx, e.c, q)
	if st.Ready != 0 || st.InFlight != 0 || st.Dead != 1 || st.Counters.Nacked != 1 || st.Counters.DeadLettered != 1 {
		t.Fatalf("Stats = %+v; want 1 dead (1 nacked, 1 dead-lettered), nothing else", *st)
	}
	dead := peek(t, ctx, e.c, q, qbridgev1.MessageState_MESSAGE_STATE_DEAD)
	if len(dead) != 1 {
		t.Fatalf("PeekMessages(DEAD) = %v; want 1 message", dead)
	}
	m := dead[0]
	if m.GetId() != id || string(m.GetPayload()) != "{not json" || !maps.Equal(m.GetHeaders(), headers) ||
		m.GetDeliveries() != 1 || m.GetState() != qbridgev1.MessageState_MESSAGE_STATE_DEAD ||
		m.GetLastError() != "parse: unexpected end of input" || m.GetDeadReason() != "nacked as dead letter" {
		t.Fatalf("dead letter = %v; want %q, 1 delivery, its error text, nacked as dead letter", m, id)
	}
	if dt := m.GetDeadTime().AsTime(); dt.Before(ms(before)) || dt.After(time.Now()) {
		t.Errorf("DeadTime = %v; want the DeadLetter's time", dt)
	}

	// Replayed, it is delivered again from attempt 1, error text kept.
	if _, err := e.c.Admin().ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: q, Ids: []string{m.GetId()}}); err != nil {
		t.Fatalf("ReplayDeadLetters: %v", err)
	}
	d = next(t, cs)
	if d.ID != id || d.Attempt != 1 || d.LastError != "parse: unexpected end of input" {
		t.Fatalf("replayed delivery = {ID %q Attempt %d LastError %q}; want {%q 1 the error text}", d.ID, d.Attempt, d.LastError, id)
	}

	// Auto-ack deliveries have nothing to settle.
	enqueue(t, ctx, e.c, "auto", "x")
	auto := consume(t, ctx, e.c, "auto", client.WithAutoAck())
	ad := next(t, auto)
	wantCode(t, "DeadLetter of an auto-ack delivery", ad.DeadLetter(ctx, errors.New("x")), codes.InvalidArgument)
	wantCode(t, "Retry of an auto-ack delivery", ad.Retry(ctx, errors.New("x")), codes.InvalidArgument)
}

func TestConsumeQueuesPriority(t *testing.T) {
	const high, mid, low = "jobs:high", "jobs:mid", "jobs:low"
	fill := func(t *testing.T, ctx context.Context, c *client.Client) {
		t.Helper()
		// Lowest first, so that enqueue order cannot pass for priority.
		for _, m := range []struct{ q, p string }{{low, "l1"}, {low, "l2"}, {mid, "m1"}, {high, "h1"}, {high, "h2"}} {
			enqueue(t, ctx, c, m.q, m.p)
		}
	}

	t.Run("one at a time", func(t *testing.T) {
		e := newEnv(t)
		ctx := testCtx(t)
		fill(t, ctx, e.c)
		cs, err := e.c.ConsumeQueues(ctx, []string{high, mid, low}, client.WithMaxInFlight(1))
		if err != nil {
			t.Fatalf("ConsumeQueues: %v", err)
		}
		defer cs.Close()
		// The stream holds one delivery at a time, so each settle frees the
		// credit for the next pick, which must again start from the top.
		// Every queue's messages are already there: a delivery that does
		// not come is a stalled stream.
		take := func(wantQueue, wantPayload string) *client.Delivery {
			t.Helper()
			d, err := within(t, fmt.Sprintf("Consumer.Next (want %s from %s)", wantPayload, wantQueue), cs.Next)
			if err != nil {
				t.Fatalf("Consumer.Next: %v", err)
			}
			if d.Queue != wantQueue || string(d.Payload) != wantPayload {
				t.Fatalf("delivery from %q: %q; want %q from %q", d.Queue, d.Payload, wantPayload, wantQueue)
			}
			return d
		}
		ack := func(d *client.Delivery) {
			t.Helper()
			if err := d.Ack(ctx); err != nil {
				t.Fatalf("Ack: %v", err)
			}
		}
		ack(take(high, "h1"))
		ack(take(high, "h2"))
		ack(take(mid, "m1"))
		l1 := take(low, "l1")
		// While l1 is held (the window is full), higher-priority work
		// arrives: it comes before the rest of the low queue.
		enqueue(t, ctx, e.c, high, "h3")
		enqueue(t, ctx, e.c, mid, "m2")
		ack(l1)
		ack(take(high, "h3"))
		ack(take(mid, "m2"))
		ack(take(low, "l2"))
		for _, q := range []string{high, mid, low} {
			wantStats(t, ctx, e.c, q, 0, 0)
		}
	})

	t.Run("window", func(t *testing.T) {
		e := newEnv(t)
		ctx := testCtx(t)
		fill(t, ctx, e.c)
		cs, err := e.c.ConsumeQueues(ctx, []string{high, mid, low}, client.WithMaxInFlight(16))
		if err != nil {
			t.Fatalf("ConsumeQueues: %v", err)
		}
		defer cs.Close()
		var got []string
		for range 5 {
			got = append(got, string(next(t, cs).Payload))
		}
		if want := "[h1 h2 m1 l1 l2]"; fmt.Sprint(got) != want {
			t.Fatalf("deliveries %v; want %s", got, want)
		}
		for _, q := range []string{high, mid, low} {
			wantStats(t, ctx, e.c, q, 0, int64(map[string]int{high: 2, mid: 1, low: 2}[q]))
		}
		// Closing requeues from every queue.
		_ = cs.Close()
		waitStats(t, ctx, e.c, high, 2, 0)
		waitStats(t, ctx, e.c, mid, 1, 0)
		waitStats(t, ctx, e.c, low, 2, 0)
	})

	t.Run("invalid", func(t *testing.T) {
		e := newEnv(t)
		ctx := testCtx(t)
		_, err := e.c.ConsumeQueues(ctx, nil)
		wantCode(t, "ConsumeQueues with no queues", err, codes.InvalidArgument)
		for _, qs := range [][]string{
			{high, high},
			{high, "bad name"},
			strings.Split("a b c d e f g h i j k l m n o p q", " "), // 17
		} {
			cs, err := e.c.ConsumeQueues(ctx, qs)
			if err != nil {
				t.Fatalf("ConsumeQueues(%q): %v; want the error from Next", qs, err)
			}
			_, err = within(t, "Next of a rejected ConsumeQueues", cs.Next)
			wantCode(t, fmt.Sprintf("ConsumeQueues(%q)", qs), err, codes.InvalidArgument)
			_ = cs.Close()
		}
	})
}

func TestStats(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "stats"

	if st := stats(t, ctx, e.c, q); *st != (client.QueueStats{Queue: q}) {
		t.Fatalf("Stats of an unknown queue = %+v; want empty", *st)
	}

	before := time.Now()
	expiring := enqueue(t, ctx, e.c, q, "expiring", client.WithTTL(time.Millisecond))
	for _, p := range []string{"ack", "drop", "dead", "expire lease"} {
		enqueue(t, ctx, e.c, q, p, client.WithDedupKey(strings.ReplaceAll(p, " ", "-")))
	}
	enqueue(t, ctx, e.c, q, "ack again", client.WithDedupKey("ack")) // a duplicate: not counted
	enqueue(t, ctx, e.c, q, "delayed", client.WithDelay(time.Hour))

	st := stats(t, ctx, e.c, q)
	want := client.QueueStats{Queue: q, Ready: 5, Delayed: 1, Counters: client.QueueCounters{Enqueued: 6}}
	got := *st
	got.OldestReadyAge, got.EnqueueRate, got.AckRate = 0, 0, 0
	if got != want {
		t.Fatalf("Stats = %+v; want %+v", got, want)
	}
	// The head has waited since its Enqueue, and keeps waiting.
	if age := st.OldestReadyAge; age < 0 || age > time.Since(before)+time.Millisecond {
		t.Fatalf("OldestReadyAge = %v; want within [0, %v]", age, time.Since(before))
	}
	waitFor(t, ctx, e.c, q, "OldestReadyAge of at least 20ms", func(st *client.QueueStats) bool {
		return st.OldestReadyAge >= 20*time.Millisecond
	})

	// Paused shows.
	if _, err := e.c.Admin().PauseQueue(ctx, &qbridgev1.PauseQueueRequest{Queue: q}); err != nil {
		t.Fatalf("PauseQueue: %v", err)
	}
	if st := stats(t, ctx, e.c, q); !st.Paused {
		t.Fatalf("Stats after PauseQueue: Paused = false")
	}
	if _, err := e.c.Admin().ResumeQueue(ctx, &qbridgev1.ResumeQueueRequest{Queue: q}); err != nil {
		t.Fatalf("ResumeQueue: %v", err)
	}
	if st := stats(t, ctx, e.c, q); st.Paused {
		t.Fatalf("Stats after ResumeQueue: Paused = true")
	}

	// One message per counter. The ttl of the head has passed by now
	// (20ms), so it expires when the consumer takes it.
	ready := peek(t, ctx, e.c, q, qbridgev1.MessageState_MESSAGE_STATE_READY)
	if len(ready) == 0 || ready[0].GetId() != expiring {
		t.Fatalf("head of the queue: %v; want %q", ready, expiring)
	}
	waitUntil(t, ready[0].GetExpireTime().AsTime())
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(4), client.WithLease(time.Second))
	byPayload := map[string]*client.Delivery{}
	for range 4 {
		d := next(t, cs)
		byPayload[string(d.Payload)] = d
	}
	for _, p := range []string{"ack", "drop", "dead", "expire lease"} {
		if byPayload[p] == nil {
			t.Fatalf("deliveries %v; want one of %q", slices.Collect(maps.Keys(byPayload)), p)
		}
	}
	if err := byPayload["ack"].Ack(ctx); err != nil {
		t.Fatalf("Ack: %v", err)
	}
	if err := byPayload["drop"].Nack(ctx, false); err != nil {
		t.Fatalf("Nack: %v", err)
	}
	if err := byPayload["dead"].DeadLetter(ctx, errors.New("no")); err != nil {
		t.Fatalf("DeadLetter: %v", err)
	}
	// "expire lease" is left alone: after its 1s lease it is redelivered.
	d := next(t, cs)
	if string(d.Payload) != "expire lease" || d.Attempt != 2 {
		t.Fatalf("redelivery %q attempt %d; want %q attempt 2", d.Payload, d.Attempt, "expire lease")
	}
	if err := d.Ack(ctx); err != nil {
		t.Fatalf("Ack: %v", err)
	}

	st = stats(t, ctx, e.c, q)
	// The stream cs is still open: one consumer (once its instance has
	// reported it, within a reap interval: not asserted here).
	want = client.QueueStats{Queue: q, Delayed: 1, Dead: 1, Consumers: st.Consumers, Counters: client.QueueCounters{
		Enqueued: 6, Acked: 2, Nacked: 2, LeaseExpired: 1, DeadLettered: 1, Expired: 1,
	}}
	if st.Consumers > 1 {
		t.Errorf("Consumers = %d with one stream open", st.Consumers)
	}
	got = *st
	got.EnqueueRate, got.AckRate = 0, 0
	if got != want {
		t.Fatalf("Stats = %+v; want %+v", got, want)
	}
	// QueueStats is the short form.
	wantStats(t, ctx, e.c, q, 0, 0)
}

func TestStatsRates(t *testing.T) {
	t.Parallel() // mostly waits for the server's rate sampler
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "rates"
	cs := consume(t, ctx, e.c, q)
	// The server samples the counters every 5s and needs a sample that
	// includes the queue from a second ago: keep enqueueing (3 at a time)
	// and acking (1 at a time) until both rates show. Every ack follows
	// its batch, so from any sample on at least as many batches as acks,
	// but one, count: the enqueue rate is the higher one.
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(pollInterval) // paces the rounds
	defer tick.Stop()
	for i := 0; ; i++ {
		if _, err := e.c.EnqueueBatch(ctx, q, []client.Message{{}, {}, {}}); err != nil {
			t.Fatalf("EnqueueBatch: %v", err)
		}
		if err := next(t, cs).Ack(ctx); err != nil {
			t.Fatalf("Ack: %v", err)
		}
		st := stats(t, ctx, e.c, q)
		if st.EnqueueRate > 0 && st.AckRate > 0 {
			if st.EnqueueRate <= st.AckRate {
				t.Fatalf("EnqueueRate %v, AckRate %v; want enqueue above ack (3 enqueued per ack)", st.EnqueueRate, st.AckRate)
			}
			// A minute at most: the rates cannot exceed what was done
			// since the first sample, over at least a second.
			if st.EnqueueRate > float64(3*(i+1)) || st.AckRate > float64(i+1) {
				t.Fatalf("EnqueueRate %v, AckRate %v after %d rounds; too high", st.EnqueueRate, st.AckRate, i+1)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("rates still %v (enqueue), %v (ack) after %d rounds", st.EnqueueRate, st.AckRate, i+1)
		}
		<-tick.C
	}
}

func TestWaitForRoom(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "bounded"
	if _, err := e.c.Admin().UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{
		Queue: q, Config: &qbridgev1.QueueConfig{MaxLength: 2},
	}); err != nil {
		t.Fatalf("UpdateQueueConfig: %v", err)
	}
	enqueue(t, ctx, e.c, q, "1")
	enqueue(t, ctx, e.c, q, "2")
	_, err := e.c.Enqueue(ctx, q, []byte("3"))
	wantCode(t, "Enqueue to a full queue", err, codes.ResourceExhausted)
	_, err = e.c.EnqueueBatch(ctx, q, []client.Message{{Payload: []byte("3")}})
	wantCode(t, "EnqueueBatch to a full queue", err, codes.ResourceExhausted)

	// With a deadline and no consumer, waiting ends at the deadline.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = e.c.Enqueue(short, q, []byte("3"), client.WithWaitForRoom())
	cancel()
	if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.ResourceExhausted {
		t.Fatalf("Enqueue waiting for room past its deadline: %v; want DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED", err)
	}

	type result struct {
		what string
		err  error
	}
	done := make(chan result, 2)
	wctx, cancel := context.WithTimeout(ctx, waitTimeout)
	defer cancel()
	go func() {
		_, err := e.c.Enqueue(wctx, q, []byte("3"), client.WithWaitForRoom())
		done <- result{"Enqueue", err}
	}()
	go func() {
		_, err := e.c.EnqueueBatch(wctx, q, []client.Message{{Payload: []byte("4")}}, client.WithBatchWaitForRoom())
		done <- result{"EnqueueBatch", err}
	}()
	// Still full: neither can have succeeded.
	_, err = e.c.Enqueue(ctx, q, []byte("x"))
	wantCode(t, "Enqueue to the still full queue", err, codes.ResourceExhausted)
	select {
	case r := <-done:
		t.Fatalf("%s waiting for room returned before there was room: %v", r.what, r.err)
	default:
	}

	// A consumer takes both messages: room for the two waiting calls.
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(2))
	held := []*client.Delivery{next(t, cs), next(t, cs)}
	for range 2 {
		r, err := within(t, "Enqueue waiting for room", func() (result, error) { r := <-done; return r, r.err })
		if err != nil {
			t.Fatalf("%s waiting for room: %v", r.what, err)
		}
	}
	for _, d := range held {
		if err := d.Ack(ctx); err != nil {
			t.Fatalf("Ack: %v", err)
		}
	}
	var got []string
	for range 2 {
		got = append(got, string(next(t, cs).Payload))
	}
	if fmt.Sprint(got) != "[3 4]" && fmt.Sprint(got) != "[4 3]" {
		t.Fatalf("then delivered %q; want 3 and 4", got)
	}
}

func TestAdminOverTheSameConnection(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	enqueue(t, ctx, e.c, "b", "x")
	enqueue(t, ctx, e.c, "a", "x")
	resp, err := e.c.Admin().ListQueues(ctx, &qbridgev1.ListQueuesRequest{})
	if err != nil {
		t.Fatalf("Admin().ListQueues: %v", err)
	}
	if got := fmt.Sprint(resp.GetQueues()); got != "[a b]" {
		t.Fatalf("ListQueues = %s; want [a b]", got)
	}
	_, err = e.c.Admin().PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: "unknown"})
	wantCode(t, "PurgeQueue of an unknown queue", err, codes.NotFound)
}
