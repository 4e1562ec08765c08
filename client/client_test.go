package client_test

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

func TestEnqueueConsumeAckRoundtrip(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "orders:eu"
	headers := map[string]string{"content-type": "application/json", "trace": "abc"}

	wantStats(t, ctx, e.c, q, 0, 0) // an unknown queue is empty

	before := time.Now().Truncate(time.Millisecond)
	id1, err := e.c.Enqueue(ctx, q, []byte(`{"n":1}`), client.WithHeaders(headers), client.WithID("order-1"))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	if id1 != "order-1" {
		t.Fatalf("Enqueue with WithID returned id %q; want order-1", id1)
	}
	id2, err := e.c.Enqueue(ctx, q, nil) // empty payload, server-assigned id
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	if id2 == "" || id2 == id1 {
		t.Fatalf("server-assigned id = %q; want a fresh non-empty id", id2)
	}
	after := time.Now()
	wantStats(t, ctx, e.c, q, 2, 0)

	// A window of 1: the second message stays ready until the first is
	// settled.
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1), client.WithLease(time.Minute))
	d1 := next(t, cs)
	if d1.ID != id1 || d1.Queue != q || string(d1.Payload) != `{"n":1}` || !maps.Equal(d1.Headers, headers) {
		t.Fatalf("first delivery = {ID %q Queue %q Payload %q Headers %v}; want {%q %q %q %v}",
			d1.ID, d1.Queue, d1.Payload, d1.Headers, id1, q, `{"n":1}`, headers)
	}
	if d1.Attempt != 1 {
		t.Errorf("Attempt = %d; want 1", d1.Attempt)
	}
	if d1.AckToken == "" {
		t.Errorf("AckToken is empty")
	}
	if d1.EnqueueTime.Before(before) || d1.EnqueueTime.After(after) {
		t.Errorf("EnqueueTime = %v; want within [%v, %v]", d1.EnqueueTime, before, after)
	}
	if until := time.Until(d1.LeaseDeadline); until < 50*time.Second || until > time.Minute {
		t.Errorf("LeaseDeadline is %v from now; want about the 1m lease", until)
	}
	wantStats(t, ctx, e.c, q, 1, 1)

	if err := d1.Ack(ctx); err != nil {
		t.Fatalf("Delivery.Ack: %v", err)
	}
	d2 := next(t, cs)
	if d2.ID != id2 || len(d2.Payload) != 0 || len(d2.Headers) != 0 || d2.Attempt != 1 {
		t.Fatalf("second delivery = {ID %q Payload %q Headers %v Attempt %d}; want {%q, empty, none, 1}",
			d2.ID, d2.Payload, d2.Headers, d2.Attempt, id2)
	}
	wantStats(t, ctx, e.c, q, 0, 1)

	if err := e.c.Ack(ctx, d2.AckToken); err != nil {
		t.Fatalf("Client.Ack: %v", err)
	}
	wantStats(t, ctx, e.c, q, 0, 0)

	// Settled deliveries are fenced.
	wantCode(t, "second Ack of a settled delivery", d1.Ack(ctx), codes.FailedPrecondition)
	if err := e.c.Ack(ctx); err != nil {
		t.Errorf("Client.Ack with no tokens: %v; want nil", err)
	}

	// Raw gives the generated client over the same connection.
	st, err := e.c.Raw().GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil || st.GetQueue() != q {
		t.Errorf("Raw().GetQueueStats = %v, %v", st, err)
	}
}

func TestEnqueueBatchOrderAndBatchedDeliveries(t *testing.T) {
	// Count the deliveries of each ConsumeResponse as it arrives, to see
	// that the server did batch them and Next split them up.
	var mu sync.Mutex
	var sizes []int
	count := func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
		streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		s, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return &recvHook{ClientStream: s, onRecv: func(m any) {
			if r, ok := m.(*qbridgev1.ConsumeResponse); ok {
				mu.Lock()
				sizes = append(sizes, len(r.GetDeliveries()))
				mu.Unlock()
			}
		}}, nil
	}
	e := newEnv(t, client.WithDialOptions(grpc.WithChainStreamInterceptor(count)))
	ctx := testCtx(t)
	const q = "batch"

	msgs := []client.Message{
		{Payload: []byte("m0"), ID: "b-0"},
		{Payload: []byte("m1")},
		{Payload: []byte("m2"), ID: "b-2", Headers: map[string]string{"k": "v"}},
		{Payload: []byte("m3")},
		{Payload: []byte("m4"), ID: "b-4"},
	}
	ids, err := e.c.EnqueueBatch(ctx, q, msgs)
	if err != nil {
		t.Fatalf("EnqueueBatch: %v", err)
	}
	if len(ids) != len(msgs) {
		t.Fatalf("EnqueueBatch returned %d ids; want %d", len(ids), len(msgs))
	}
	seen := map[string]bool{}
	for i, id := range ids {
		if msgs[i].ID != "" && id != msgs[i].ID {
			t.Errorf("ids[%d] = %q; want the given %q", i, id, msgs[i].ID)
		}
		if id == "" || seen[id] {
			t.Errorf("ids[%d] = %q; want a distinct non-empty id", i, id)
		}
		seen[id] = true
	}
	wantStats(t, ctx, e.c, q, 5, 0)

	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(16))
	var tokens []string
	for i := range msgs {
		d := next(t, cs)
		if d.ID != ids[i] || !bytes.Equal(d.Payload, msgs[i].Payload) || !maps.Equal(d.Headers, msgs[i].Headers) {
			t.Fatalf("delivery %d = {ID %q Payload %q Headers %v}; want {%q %q %v}",
				i, d.ID, d.Payload, d.Headers, ids[i], msgs[i].Payload, msgs[i].Headers)
		}
		tokens = append(tokens, d.AckToken)
	}
	mu.Lock()
	got := append([]int(nil), sizes...)
	mu.Unlock()
	total, largest := 0, 0
	for _, n := range got {
		total += n
		largest = max(largest, n)
	}
	if total != len(msgs) || largest < 2 {
		t.Errorf("ConsumeResponse sizes = %v; want %d deliveries in total, some batched "+
			"(all were ready when the stream opened)", got, len(msgs))
	}
	wantStats(t, ctx, e.c, q, 0, 5)

	if err := e.c.Ack(ctx, tokens...); err != nil {
		t.Fatalf("Client.Ack(5 tokens): %v", err)
	}
	wantStats(t, ctx, e.c, q, 0, 0)
}

// recvHook calls onRecv with every message received on a client stream.
type recvHook struct {
	grpc.ClientStream
	onRecv func(any)
}

func (h *recvHook) RecvMsg(m any) error {
	err := h.ClientStream.RecvMsg(m)
	if err == nil {
		h.onRecv(m)
	}
	return err
}

func TestNack(t *testing.T) {
	for _, tc := range []struct {
		name    string
		requeue bool
	}{
		{"requeue", true},
		{"drop", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := testCtx(t)
			const q = "nack"
			id, err := e.c.Enqueue(ctx, q, []byte("job"), client.WithHeaders(map[string]string{"h": "1"}))
			if err != nil {
				t.Fatalf("Enqueue: %v", err)
			}
			cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1), client.WithLease(time.Minute))
			d := next(t, cs)
			if d.ID != id || d.Attempt != 1 {
				t.Fatalf("delivery = {ID %q Attempt %d}; want {%q 1}", d.ID, d.Attempt, id)
			}
			if err := d.Nack(ctx, tc.requeue); err != nil {
				t.Fatalf("Nack(requeue=%v): %v", tc.requeue, err)
			}
			wantCode(t, "Ack after Nack", d.Ack(ctx), codes.FailedPrecondition)

			if tc.requeue {
				again := next(t, cs)
				if again.ID != id || again.Attempt != 2 || string(again.Payload) != "job" || again.Headers["h"] != "1" {
					t.Fatalf("redelivery = {ID %q Attempt %d Payload %q Headers %v}; want {%q 2 job map[h:1]}",
						again.ID, again.Attempt, again.Payload, again.Headers, id)
				}
				if again.AckToken == d.AckToken {
					t.Errorf("redelivery has the old ack token")
				}
				if err := again.Ack(ctx); err != nil {
					t.Fatalf("Ack redelivery: %v", err)
				}
				waitStats(t, ctx, e.c, q, 0, 0)
				return
			}
			waitStats(t, ctx, e.c, q, 0, 0)
			// Were the dropped message still around it would come first
			// (requeues go to the head); the marker must be next.
			marker, err := e.c.Enqueue(ctx, q, []byte("marker"))
			if err != nil {
				t.Fatalf("Enqueue marker: %v", err)
			}
			if got := next(t, cs); got.ID != marker {
				t.Fatalf("after a dropping Nack the next delivery is %q (attempt %d); want the marker %q",
					got.ID, got.Attempt, marker)
			}
		})
	}
}

func TestExtendLease(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "extend"
	if _, err := e.c.Enqueue(ctx, q, []byte("slow")); err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	cs := consume(t, ctx, e.c, q, client.WithLease(2*time.Second))
	d := next(t, cs)
	if until := time.Until(d.LeaseDeadline); until <= 0 || until > 2*time.Second {
		t.Fatalf("LeaseDeadline is %v from now; want within the 2s lease", until)
	}

	for _, tc := range []struct {
		name  string
		lease time.Duration
		want  time.Duration // expected new deadline - now
		code  codes.Code
	}{
		{name: "one minute", lease: time.Minute, want: time.Minute},
		{name: "server default", lease: 0, want: 30 * time.Second},
		{name: "below the server minimum", lease: 10 * time.Millisecond, code: codes.InvalidArgument},
		{name: "longer again", lease: 2 * time.Minute, want: 2 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			got, err := d.ExtendLease(ctx, tc.lease)
			if tc.code != codes.OK {
				wantCode(t, "ExtendLease", err, tc.code)
				return
			}
			if err != nil {
				t.Fatalf("ExtendLease(%v): %v", tc.lease, err)
			}
			if !got.After(d.LeaseDeadline) {
				t.Errorf("new deadline %v is not after the delivery's %v", got, d.LeaseDeadline)
			}
			lo, hi := start.Add(tc.want-time.Second), time.Now().Add(tc.want+time.Second)
			if got.Before(lo) || got.After(hi) {
				t.Errorf("ExtendLease(%v) = %v; want about now+%v", tc.lease, got, tc.want)
			}
		})
	}

	if err := d.Ack(ctx); err != nil {
		t.Fatalf("Ack: %v", err)
	}
	_, err := d.ExtendLease(ctx, time.Minute)
	wantCode(t, "ExtendLease after Ack", err, codes.FailedPrecondition)
}

func TestLeaseExpiryRedelivers(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "expiry"
	id, err := e.c.Enqueue(ctx, q, []byte("x"))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1), client.WithLease(time.Second))
	d1 := next(t, cs)
	// Not settled: after the 1s lease the server delivers it again.
	d2 := next(t, cs)
	if d2.ID != id || d2.Attempt != 2 {
		t.Fatalf("after lease expiry got {ID %q Attempt %d}; want {%q 2}", d2.ID, d2.Attempt, id)
	}
	if d2.EnqueueTime.IsZero() || !d2.EnqueueTime.Equal(d1.EnqueueTime) {
		t.Errorf("EnqueueTime changed across redelivery: %v, then %v", d1.EnqueueTime, d2.EnqueueTime)
	}
	wantCode(t, "Ack with the expired token", d1.Ack(ctx), codes.FailedPrecondition)
	if err := d2.Ack(ctx); err != nil {
		t.Fatalf("Ack of the redelivery: %v", err)
	}
	wantStats(t, ctx, e.c, q, 0, 0)
}

func TestAutoAck(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "auto"
	id, err := e.c.Enqueue(ctx, q, []byte("fire and forget"))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	cs := consume(t, ctx, e.c, q, client.WithAutoAck())
	d := next(t, cs)
	if d.ID != id || d.AckToken != "" || !d.LeaseDeadline.IsZero() || d.Attempt != 1 {
		t.Fatalf("auto-ack delivery = {ID %q AckToken %q LeaseDeadline %v Attempt %d}; want {%q, none, zero, 1}",
			d.ID, d.AckToken, d.LeaseDeadline, d.Attempt, id)
	}
	wantStats(t, ctx, e.c, q, 0, 0)

	wantCode(t, "Ack of an auto-ack delivery", d.Ack(ctx), codes.InvalidArgument)
	wantCode(t, "Nack of an auto-ack delivery", d.Nack(ctx, true), codes.InvalidArgument)
	_, err = d.ExtendLease(ctx, time.Minute)
	wantCode(t, "ExtendLease of an auto-ack delivery", err, codes.InvalidArgument)
}

func TestConsumerEnd(t *testing.T) {
	for _, tc := range []struct {
		name  string
		end   func(cs *client.Consumer, cancel context.CancelFunc)
		cause error
	}{
		{"Close", func(cs *client.Consumer, _ context.CancelFunc) { _ = cs.Close() }, context.Canceled},
		{"ctx cancel", func(_ *client.Consumer, cancel context.CancelFunc) { cancel() }, context.Canceled},
		{"Close twice", func(cs *client.Consumer, _ context.CancelFunc) { _ = cs.Close(); _ = cs.Close() }, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := testCtx(t)
			const q = "close"
			ids, err := e.c.EnqueueBatch(ctx, q, []client.Message{{Payload: []byte("a")}, {Payload: []byte("b")}, {Payload: []byte("c")}})
			if err != nil {
				t.Fatalf("EnqueueBatch: %v", err)
			}
			cctx, cancel := context.WithCancel(ctx)
			defer cancel()
			// The lease is long: what comes back at once comes back
			// because the stream ended, not because the lease ran out.
			cs := consume(t, cctx, e.c, q, client.WithMaxInFlight(2), client.WithLease(10*time.Minute))
			held := []*client.Delivery{next(t, cs), next(t, cs)}
			wantStats(t, ctx, e.c, q, 1, 2)

			// Next blocks (the window is full) until the stream ends.
			type result struct {
				d   *client.Delivery
				err error
			}
			blocked := make(chan result, 1)
			go func() {
				d, err := cs.Next()
				blocked <- result{d, err}
			}()
			tc.end(cs, cancel)
			r, _ := within(t, "Next blocked during the end", func() (result, error) { return <-blocked, nil })
			if r.err == nil {
				t.Fatalf("Next after the end returned delivery %q; want an error", r.d.ID)
			}
			wantClosed(t, "Next after the end", r.err, tc.cause)
			_, err = cs.Next()
			wantClosed(t, "second Next after the end", err, tc.cause)

			waitStats(t, ctx, e.c, q, 3, 0)
			wantCode(t, "Ack of a delivery requeued by the end of its stream", held[0].Ack(ctx), codes.FailedPrecondition)

			// The requeued deliveries come back first, in order, as
			// redeliveries.
			cs2 := consume(t, ctx, e.c, q)
			for i, id := range ids {
				d := next(t, cs2)
				wantAttempt := 2
				if i == 2 {
					wantAttempt = 1 // was never delivered
				}
				if d.ID != id || d.Attempt != wantAttempt {
					t.Errorf("delivery %d after the end = {ID %q Attempt %d}; want {%q %d}", i, d.ID, d.Attempt, id, wantAttempt)
				}
			}
		})
	}
}

func TestConsumerDeadline(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(testCtx(t), 200*time.Millisecond)
	defer cancel()
	cs := consume(t, ctx, e.c, "idle")
	_, err := within(t, "Next on an idle queue with a deadline", cs.Next)
	wantClosed(t, "Next after the deadline", err, context.DeadlineExceeded)
}

func TestBrokenStreamIsReported(t *testing.T) {
	breakers := []struct {
		name string
		do   func(e *testEnv)
	}{
		{"server StopStreams", func(e *testEnv) { e.srv.StopStreams() }},
		{"grpc Server.Stop", func(e *testEnv) { e.gs.Stop() }},
	}
	for _, br := range breakers {
		t.Run("Consumer/"+br.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := testCtx(t)
			if _, err := e.c.Enqueue(ctx, "q", []byte("x")); err != nil {
				t.Fatalf("Enqueue: %v", err)
			}
			cs := consume(t, ctx, e.c, "q")
			next(t, cs) // the stream is up

			errc := make(chan error, 1)
			go func() {
				_, err := cs.Next() // waits: the queue is empty
				errc <- err
			}()
			br.do(e)
			err, _ := within(t, "Next on a broken stream", func() (error, error) { return <-errc, nil })
			wantCode(t, "Next on a broken stream", err, codes.Unavailable)
			// Sticky: no silent reconnect.
			err2, _ := within(t, "second Next on a broken stream", func() (error, error) {
				_, err := cs.Next()
				return err, nil
			})
			if err2 == nil || err2.Error() != err.Error() {
				t.Errorf("second Next = %v; want the same error %v", err2, err)
			}
			// Closing a broken Consumer does not hide why it broke.
			_ = cs.Close()
			_, err3 := cs.Next()
			wantCode(t, "Next after Close of a broken stream", err3, codes.Unavailable)
		})
		t.Run("Subscription/"+br.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := testCtx(t)
			sub, err := e.c.Subscribe(ctx, []string{"ch"}, nil)
			if err != nil {
				t.Fatalf("Subscribe: %v", err)
			}
			defer sub.Close()
			errc := make(chan error, 1)
			go func() {
				_, err := sub.Next()
				errc <- err
			}()
			br.do(e)
			err, _ = within(t, "Next on a broken subscription", func() (error, error) { return <-errc, nil })
			wantCode(t, "Next on a broken subscription", err, codes.Unavailable)
			_, err2 := sub.Next()
			wantCode(t, "second Next on a broken subscription", err2, codes.Unavailable)
		})
	}
}

func TestPubSub(t *testing.T) {
	for _, tc := range []struct {
		name     string
		channels []string
		patterns []string
		publish  string
		want     client.PubSubMessage
	}{
		{
			name:     "channel",
			channels: []string{"news.eu"},
			publish:  "news.eu",
			want:     client.PubSubMessage{Channel: "news.eu"},
		},
		{
			name:     "pattern",
			patterns: []string{"news.*"},
			publish:  "news.us",
			want:     client.PubSubMessage{Channel: "news.us", Pattern: "news.*"},
		},
		{
			name:     "pattern next to a channel",
			channels: []string{"alerts"},
			patterns: []string{"metrics:*:cpu"},
			publish:  "metrics:host1:cpu",
			want:     client.PubSubMessage{Channel: "metrics:host1:cpu", Pattern: "metrics:*:cpu"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := testCtx(t)
			sub, err := e.c.Subscribe(ctx, tc.channels, tc.patterns)
			if err != nil {
				t.Fatalf("Subscribe: %v", err)
			}
			defer sub.Close()

			// Not matched: must not arrive (Redis keeps publish order, so
			// it would arrive before the matched message).
			n, err := e.c.Publish(ctx, "unrelated", []byte("nope"))
			if err != nil || n != 0 {
				t.Fatalf("Publish(unrelated) = %d, %v; want 0 receivers", n, err)
			}
			// Published right after Subscribe returned: must arrive.
			payload := []byte("payload of " + tc.name)
			n, err = e.c.Publish(ctx, tc.publish, payload)
			if err != nil {
				t.Fatalf("Publish: %v", err)
			}
			if n < 1 {
				t.Fatalf("Publish(%q) reached %d receivers right after Subscribe returned; want >= 1", tc.publish, n)
			}
			m := nextMsg(t, sub)
			if m.Channel != tc.want.Channel || m.Pattern != tc.want.Pattern || !bytes.Equal(m.Payload, payload) {
				t.Fatalf("got {Channel %q Pattern %q Payload %q}; want {%q %q %q}",
					m.Channel, m.Pattern, m.Payload, tc.want.Channel, tc.want.Pattern, payload)
			}

			if err := sub.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			_, err = sub.Next()
			wantClosed(t, "Next after Close", err, context.Canceled)
		})
	}
}

func TestInvalidArguments(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	// consumeErr opens a Consumer and returns the error of its first Next:
	// the server rejects a Consume request on the stream.
	consumeErr := func(queue string, opts ...client.ConsumeOption) error {
		cs, err := e.c.Consume(ctx, queue, opts...)
		if err != nil {
			return err
		}
		defer cs.Close()
		_, err = within(t, "Next of a rejected Consume", cs.Next)
		return err
	}
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"Enqueue empty queue", func() error { _, err := e.c.Enqueue(ctx, "", []byte("x")); return err }},
		{"Enqueue bad queue name", func() error { _, err := e.c.Enqueue(ctx, "has space", []byte("x")); return err }},
		{"Enqueue bad id", func() error { _, err := e.c.Enqueue(ctx, "q", nil, client.WithID("has space")); return err }},
		{"Enqueue bad header", func() error {
			_, err := e.c.Enqueue(ctx, "q", nil, client.WithHeaders(map[string]string{"": "empty key"}))
			return err
		}},
		{"EnqueueBatch empty queue", func() error {
			_, err := e.c.EnqueueBatch(ctx, "", []client.Message{{Payload: []byte("x")}})
			return err
		}},
		{"EnqueueBatch no messages", func() error { _, err := e.c.EnqueueBatch(ctx, "q", nil); return err }},
		{"QueueStats empty queue", func() error { _, _, err := e.c.QueueStats(ctx, ""); return err }},
		{"Publish empty channel", func() error { _, err := e.c.Publish(ctx, "", []byte("x")); return err }},
		{"Subscribe nothing", func() error { _, err := e.c.Subscribe(ctx, nil, nil); return err }},
		{"Subscribe bad channel", func() error { _, err := e.c.Subscribe(ctx, []string{"a*"}, nil); return err }},
		{"Subscribe bad pattern", func() error { _, err := e.c.Subscribe(ctx, nil, []string{"bad pattern"}); return err }},
		{"Consume empty queue", func() error { return consumeErr("") }},
		{"Consume window above the cap", func() error { return consumeErr("q", client.WithMaxInFlight(5000)) }},
		{"Consume lease below the minimum", func() error { return consumeErr("q", client.WithLease(10*time.Millisecond)) }},
		{"Ack bad token", func() error { return e.c.Ack(ctx, "not-a-token") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCode(t, tc.name, tc.call(), codes.InvalidArgument)
		})
	}
}

func TestNewDoesNotOwnConn(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	defer conn.Close()
	c := client.New(conn)
	if _, err := c.Enqueue(ctx, "q", []byte("x")); err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if s := conn.GetState(); s == connectivity.Shutdown {
		t.Fatalf("Client.Close closed a connection it did not dial")
	}
	wantStats(t, ctx, client.New(conn), "q", 1, 0)
}

func TestDialOwnsConn(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	c, err := client.Dial(e.addr, client.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	wantStats(t, ctx, c, "q", 0, 0)
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	_, _, err = c.QueueStats(ctx, "q")
	wantCode(t, "QueueStats after Close", err, codes.Canceled)
}

func TestStatusCodeSurvivesWrapping(t *testing.T) {
	// Callers may wrap the client's errors with %w; with the grpc version
	// in go.mod status.Code still finds the code.
	err := fmt.Errorf("handling order: %w", status.Error(codes.FailedPrecondition, "stale token"))
	if got := status.Code(err); got != codes.FailedPrecondition {
		t.Fatalf("status.Code(wrapped) = %v; want FailedPrecondition", got)
	}
}

// fakeServer serves scripted streams, for what a real server does not do
// on demand.
type fakeServer struct {
	qbridgev1.UnimplementedQueueServiceServer
	consume   func(qbridgev1.QueueService_ConsumeServer) error
	subscribe func(qbridgev1.QueueService_SubscribeServer) error
}

func (f *fakeServer) Consume(_ *qbridgev1.ConsumeRequest, s qbridgev1.QueueService_ConsumeServer) error {
	return f.consume(s)
}

func (f *fakeServer) Subscribe(_ *qbridgev1.SubscribeRequest, s qbridgev1.QueueService_SubscribeServer) error {
	return f.subscribe(s)
}

// newFake serves f on 127.0.0.1 and returns a Client dialled to it.
func newFake(t *testing.T, f *fakeServer) *client.Client {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	gs := grpc.NewServer()
	qbridgev1.RegisterQueueServiceServer(gs, f)
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(lis) }()
	c, err := client.Dial(lis.Addr().String())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() {
		_ = c.Close()
		gs.Stop()
		<-done
	})
	return c
}

func TestNextSplitsBatchesAndKeepsTheStreamError(t *testing.T) {
	batches := [][]string{{"a", "b", "c"}, {}, {"d"}, {"e", "f"}}
	for _, tc := range []struct {
		name    string
		end     error
		code    codes.Code
		message string
	}{
		{"status error", status.Error(codes.Unavailable, "going away"), codes.Unavailable, "going away"},
		{"other code", status.Error(codes.Internal, "boom"), codes.Internal, "boom"},
		{"clean end", nil, codes.Unavailable, "the server ended the Consume stream"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newFake(t, &fakeServer{consume: func(s qbridgev1.QueueService_ConsumeServer) error {
				for _, b := range batches {
					r := &qbridgev1.ConsumeResponse{}
					for _, id := range b {
						r.Deliveries = append(r.Deliveries, &qbridgev1.Delivery{Id: id, Queue: "q", Attempt: 1, AckToken: "t-" + id})
					}
					if err := s.Send(r); err != nil {
						return err
					}
				}
				return tc.end
			}})
			cs := consume(t, testCtx(t), c, "q")
			for _, b := range batches {
				for _, id := range b {
					if d := next(t, cs); d.ID != id || d.AckToken != "t-"+id {
						t.Fatalf("got {ID %q AckToken %q}; want {%q %q}", d.ID, d.AckToken, id, "t-"+id)
					}
				}
			}
			for i := range 2 {
				_, err := within(t, "Next at the end of the stream", cs.Next)
				wantCode(t, fmt.Sprintf("Next #%d at the end of the stream", i+1), err, tc.code)
				if got := status.Convert(err).Message(); !bytes.Contains([]byte(got), []byte(tc.message)) {
					t.Errorf("error message %q does not contain %q", got, tc.message)
				}
			}
		})
	}
}

func TestSubscribeNeedsConfirmationFirst(t *testing.T) {
	for _, tc := range []struct {
		name string
		serv func(qbridgev1.QueueService_SubscribeServer) error
		code codes.Code
	}{
		{"message before confirmation", func(s qbridgev1.QueueService_SubscribeServer) error {
			_ = s.Send(&qbridgev1.SubscribeResponse{Event: &qbridgev1.SubscribeResponse_Message{
				Message: &qbridgev1.PubSubMessage{Channel: "c", Payload: []byte("early")}}})
			<-s.Context().Done()
			return nil
		}, codes.Internal},
		{"empty event", func(s qbridgev1.QueueService_SubscribeServer) error {
			_ = s.Send(&qbridgev1.SubscribeResponse{})
			<-s.Context().Done()
			return nil
		}, codes.Internal},
		{"error before confirmation", func(qbridgev1.QueueService_SubscribeServer) error {
			return status.Error(codes.ResourceExhausted, "no room")
		}, codes.ResourceExhausted},
		{"end before confirmation", func(qbridgev1.QueueService_SubscribeServer) error { return nil }, codes.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newFake(t, &fakeServer{subscribe: tc.serv})
			sub, err := within(t, "Subscribe", func() (*client.Subscription, error) {
				return c.Subscribe(testCtx(t), []string{"c"}, nil)
			})
			if sub != nil {
				sub.Close()
			}
			wantCode(t, "Subscribe", err, tc.code)
		})
	}
}

func TestSubscribeWaitsForConfirmation(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	c := newFake(t, &fakeServer{subscribe: func(s qbridgev1.QueueService_SubscribeServer) error {
		close(entered)
		select {
		case <-release:
		case <-s.Context().Done():
			return s.Context().Err()
		}
		if err := s.Send(&qbridgev1.SubscribeResponse{Event: &qbridgev1.SubscribeResponse_Subscribed{Subscribed: &qbridgev1.Subscribed{Channels: []string{"c"}}}}); err != nil {
			return err
		}
		if err := s.Send(&qbridgev1.SubscribeResponse{Event: &qbridgev1.SubscribeResponse_Message{Message: &qbridgev1.PubSubMessage{Channel: "c", Payload: []byte("hi")}}}); err != nil {
			return err
		}
		<-s.Context().Done()
		return nil
	}})
	ctx := testCtx(t)
	type result struct {
		sub *client.Subscription
		err error
	}
	done := make(chan result, 1)
	go func() {
		sub, err := c.Subscribe(ctx, []string{"c"}, nil)
		done <- result{sub, err}
	}()
	within(t, "the server's Subscribe handler to run", func() (struct{}, error) { <-entered; return struct{}{}, nil })
	select {
	case r := <-done:
		t.Fatalf("Subscribe returned (%v, %v) before the confirmation was sent", r.sub, r.err)
	default:
	}
	close(release)
	r, _ := within(t, "Subscribe", func() (result, error) { return <-done, nil })
	if r.err != nil {
		t.Fatalf("Subscribe: %v", r.err)
	}
	defer r.sub.Close()
	if m := nextMsg(t, r.sub); m.Channel != "c" || string(m.Payload) != "hi" || m.Pattern != "" {
		t.Fatalf("got %+v; want {Channel c Payload hi}", m)
	}

	// A cancelled context unblocks a Subscribe that waits for the
	// confirmation.
	c2 := newFake(t, &fakeServer{subscribe: func(s qbridgev1.QueueService_SubscribeServer) error {
		<-s.Context().Done()
		return nil
	}})
	cctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() {
		_, err := c2.Subscribe(cctx, []string{"c"}, nil)
		errc <- err
	}()
	cancel()
	err, _ := within(t, "cancelled Subscribe", func() (error, error) { return <-errc, nil })
	wantClosed(t, "cancelled Subscribe", err, context.Canceled)
}

func TestNoGoroutineLeaks(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	// The server's pub/sub hub sets up its Redis connection (and go-redis
	// its goroutines for it) asynchronously after Start; one confirmed
	// subscription makes sure that is done, so it is part of the baseline.
	warm, err := e.c.Subscribe(ctx, []string{"warm-up"}, nil)
	if err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	_ = warm.Close()
	// Everything that exists now (redis-server watcher, go-redis, the
	// server's background work, the gRPC server) is not ours.
	beforeDial := goleak.IgnoreCurrent()

	c, err := client.Dial(e.addr)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	if _, err := c.Enqueue(ctx, "leak", []byte("x")); err != nil { // connects
		t.Fatalf("Enqueue: %v", err)
	}
	connected := goleak.IgnoreCurrent()

	cs, err := c.Consume(ctx, "leak")
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	next(t, cs) // left unacked
	sub, err := c.Subscribe(ctx, []string{"ch"}, []string{"p.*"})
	if err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	if _, err := c.Publish(ctx, "p.1", []byte("x")); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	nextMsg(t, sub)
	// Two more, blocked in Next while they are closed.
	cs2, err := c.Consume(ctx, "leak-idle")
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	sub2, err := c.Subscribe(ctx, []string{"quiet"}, nil)
	if err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = cs2.Next() })
	wg.Go(func() { _, _ = sub2.Next() })

	for _, cl := range []interface{ Close() error }{cs, sub, cs2, sub2} {
		if err := cl.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	within(t, "Next of closed streams", func() (struct{}, error) { wg.Wait(); return struct{}{}, nil })
	// With the connection still open, nothing of the streams is left
	// (on either side: the server's stream handlers and the queue's
	// dispatcher end too).
	waitNoLeaks(t, connected)
	waitStats(t, ctx, c, "leak", 1, 0) // and the unacked delivery is back

	if err := c.Close(); err != nil {
		t.Fatalf("Client.Close: %v", err)
	}
	waitNoLeaks(t, beforeDial)
}

// waitNoLeaks polls goleak.Find until no goroutine is left besides those
// ignored, failing the test after waitTimeout with goleak's report.
func waitNoLeaks(t *testing.T, opts ...goleak.Option) {
	t.Helper()
	var last error
	eventually(t, func() (bool, string) {
		last = goleak.Find(opts...)
		return last == nil, fmt.Sprint(last)
	})
}

func TestBacklogOfLargeMessages(t *testing.T) {
	// The default window (16) takes all 5 at once: ~5 MiB, which the
	// server must split to stay under the client's 4 MiB receive limit.
	e := newEnv(t)
	ctx := testCtx(t)
	big := bytes.Repeat([]byte("x"), 1<<20) // the server's default max payload
	var ids []string
	for range 5 {
		id, err := e.c.Enqueue(ctx, "big", big)
		if err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
		ids = append(ids, id)
	}
	cs := consume(t, ctx, e.c, "big")
	for i, id := range ids {
		if d := next(t, cs); d.ID != id || len(d.Payload) != len(big) {
			t.Fatalf("delivery %d = {ID %q, %d bytes}; want {%q, %d bytes}", i, d.ID, len(d.Payload), id, len(big))
		}
	}
}
