package server_test

import (
	"context"
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

// Scenario 11: legacy producers and consumers on the same keys, in db 5.
func TestLegacyProducerIsConsumed(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{db: 5})
	plain := rs.Client(t, 5)
	ctx := ctxT(t, 10*time.Second)
	if err := plain.LPush(ctx, "task:prodcons:queue", "5").Err(); err != nil {
		t.Fatal(err)
	}
	if n := rs.Client(t, 0).Exists(ctx, "task:prodcons:queue").Val(); n != 0 {
		t.Fatal("the list landed in db 0; the test is not using db 5")
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "task:prodcons:queue", MaxInFlight: 1})
	d := s.next(t, 5*time.Second)
	if string(d.GetPayload()) != "5" || !strings.HasPrefix(d.GetId(), "raw-") || len(d.GetHeaders()) != 0 || d.GetAttempt() != 1 {
		t.Fatalf("legacy element delivered as %v", d)
	}
	if time.Since(d.GetEnqueueTime().AsTime()) > time.Minute {
		t.Fatalf("enqueue time of a legacy element should be when qbridge took it, got %v", d.GetEnqueueTime().AsTime())
	}
	// Redelivery of a legacy element keeps the id qbridge gave it.
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
		t.Fatal(err)
	}
	again := s.next(t, 5*time.Second)
	if again.GetId() != d.GetId() || again.GetAttempt() != 2 || string(again.GetPayload()) != "5" {
		t.Fatalf("redelivered legacy element = %v; want id %s attempt 2", again, d.GetId())
	}
	if err := ack(t, in.client, again); err != nil {
		t.Fatal(err)
	}
	if n := plain.LLen(ctx, "task:prodcons:queue").Val(); n != 0 {
		t.Fatalf("%d elements left", n)
	}
}

func TestRawModeForPlainConsumers(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{db: 5, brokerOpts: []broker.Option{
		broker.WithRawQueues(func(q string) bool { return q == "legacy:jobs" }),
	}})
	plain := rs.Client(t, 5)
	ctx := ctxT(t, 10*time.Second)
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "legacy:jobs", Payload: []byte("bare payload")}); err != nil {
		t.Fatal(err)
	}
	got, err := plain.BLPop(ctx, time.Second, "legacy:jobs").Result()
	if err != nil {
		t.Fatal(err)
	}
	if got[1] != "bare payload" {
		t.Fatalf("plain BLPOP read %q; want the bare payload", got[1])
	}
	// Headers cannot be kept in raw mode: refused, nothing written.
	_, err = in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "legacy:jobs", Payload: []byte("x"), Headers: map[string]string{"a": "b"}})
	wantCode(t, err, codes.InvalidArgument, "raw mode")
	if n := plain.LLen(ctx, "legacy:jobs").Val(); n != 0 {
		t.Fatalf("a refused enqueue wrote %d elements", n)
	}
	// Trace context (which tracing clients add by themselves) is dropped,
	// not refused: the payload goes in bare.
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "legacy:jobs", Payload: []byte("traced"),
		Headers: map[string]string{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "x=1"}}); err != nil {
		t.Fatalf("a traced enqueue to a raw queue: %v", err)
	}
	if v, err := plain.LPop(ctx, "legacy:jobs").Result(); err != nil || v != "traced" {
		t.Fatalf("plain LPOP read %q, %v; want the bare payload", v, err)
	}
	// A qbridge delivery that is requeued goes back bare, so plain
	// consumers can still read it.
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "legacy:jobs", Payload: []byte("again")}); err != nil {
		t.Fatal(err)
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "legacy:jobs"})
	d := s.next(t, 5*time.Second)
	s.cancel()
	eventually(t, 5*time.Second, "the message back in the list", func() bool {
		return plain.LLen(ctx, "legacy:jobs").Val() == 1
	})
	if v := plain.LIndex(ctx, "legacy:jobs", 0).Val(); v != "again" {
		t.Fatalf("requeued raw element is %q; want the bare payload", v)
	}
	_ = d
}

func TestWrongTypeKey(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	plain := rs.Client(t, 0)
	ctx := ctxT(t, 10*time.Second)
	plain.Set(ctx, "not-a-list", "precious", 0)
	_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "not-a-list", Payload: []byte("x")})
	wantCode(t, err, codes.FailedPrecondition, "not a list")
	if v := plain.Get(ctx, "not-a-list").Val(); v != "precious" {
		t.Fatalf("the string key was changed to %q", v)
	}
	// A consumer is told too, instead of waiting forever.
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "not-a-list"})
	wantCode(t, s.err(t, 5*time.Second), codes.FailedPrecondition, "not a list")
	if v := plain.Get(ctx, "not-a-list").Val(); v != "precious" {
		t.Fatalf("the string key was changed to %q", v)
	}
	// Other queues on the same instance are unaffected.
	enqueueN(t, in.client, "fine", 1)
	consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "fine"}).next(t, 5*time.Second)
}

// Publish reaches plain SUBSCRIBE clients unchanged, and a plain PUBLISH
// reaches Subscribe streams.
func TestPubSubInterop(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{db: 5})
	plain := rs.Client(t, 5)
	ctx := ctxT(t, 10*time.Second)

	ps := plain.Subscribe(ctx, "task:pubsub:channel")
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	resp, err := in.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "task:pubsub:channel", Payload: []byte("\x00binary\xff")})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetReceivers() != 1 {
		t.Fatalf("receivers = %d, want 1 (the plain subscriber)", resp.GetReceivers())
	}
	m, err := ps.ReceiveMessage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if m.Payload != "\x00binary\xff" {
		t.Fatalf("plain subscriber got %q", m.Payload)
	}

	sub := subscribe(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"task:pubsub:channel"}})
	if n := plain.Publish(ctx, "task:pubsub:channel", "from legacy").Val(); n != 2 {
		t.Fatalf("plain PUBLISH reached %d, want 2 (plain + qbridge)", n)
	}
	got := sub.next(t)
	if got.GetChannel() != "task:pubsub:channel" || string(got.GetPayload()) != "from legacy" {
		t.Fatalf("Subscribe got %v", got)
	}
}

type subStream struct {
	ch   chan *qbridgev1.PubSubMessage
	errc chan error
}

// subscribe opens a Subscribe stream and waits for its confirmation.
func subscribe(t *testing.T, c qbridgev1.QueueServiceClient, req *qbridgev1.SubscribeRequest) *subStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	st, err := c.Subscribe(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	first, err := st.Recv()
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	if first.GetSubscribed() == nil {
		t.Fatalf("first message is %v, not the subscription confirmation", first)
	}
	s := &subStream{ch: make(chan *qbridgev1.PubSubMessage, 10000), errc: make(chan error, 1)}
	go func() {
		for {
			m, err := st.Recv()
			if err != nil {
				s.errc <- err
				return
			}
			s.ch <- m.GetMessage()
		}
	}()
	return s
}

func (s *subStream) next(t *testing.T) *qbridgev1.PubSubMessage {
	t.Helper()
	select {
	case m := <-s.ch:
		return m
	case err := <-s.errc:
		t.Fatalf("subscription ended: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no message within 5s")
	}
	return nil
}

func TestPubSubFanOutAcrossInstances(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 10*time.Second)
	a1 := subscribe(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"news"}})
	a2 := subscribe(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"news", "sport"}})
	b1 := subscribe(t, b.client, &qbridgev1.SubscribeRequest{Patterns: []string{"new*"}})
	resp, err := b.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "news", Payload: []byte("hello")})
	if err != nil {
		t.Fatal(err)
	}
	// Instance a subscribes "news" once for its two streams; b has the
	// pattern: two Redis-level receivers.
	if resp.GetReceivers() != 2 {
		t.Fatalf("receivers = %d, want 2", resp.GetReceivers())
	}
	for name, s := range map[string]*subStream{"a1": a1, "a2": a2} {
		if m := s.next(t); string(m.GetPayload()) != "hello" || m.GetChannel() != "news" || m.GetPattern() != "" {
			t.Fatalf("%s got %v", name, m)
		}
	}
	if m := b1.next(t); string(m.GetPayload()) != "hello" || m.GetChannel() != "news" || m.GetPattern() != "new*" {
		t.Fatalf("pattern subscriber got %v", m)
	}
	// Per-publisher order is kept.
	for i := 0; i < 100; i++ {
		if _, err := a.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "sport", Payload: []byte(itoa(i))}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 100; i++ {
		if m := a2.next(t); string(m.GetPayload()) != itoa(i) {
			t.Fatalf("message %d is %q: order broken", i, m.GetPayload())
		}
	}
	select {
	case m := <-a1.ch:
		t.Fatalf("a1 is not subscribed to sport but got %v", m)
	default:
	}
}

// Only what is published after the confirmation arrives; an unsubscribed
// channel (after every stream left) receives nothing on this instance.
func TestSubscribeSeesOnlyLaterMessages(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 10*time.Second)
	if _, err := in.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "c", Payload: []byte("before")}); err != nil {
		t.Fatal(err)
	}
	s := subscribe(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"c"}})
	if _, err := in.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "c", Payload: []byte("after")}); err != nil {
		t.Fatal(err)
	}
	if m := s.next(t); string(m.GetPayload()) != "after" {
		t.Fatalf("first message %q; want only what came after the confirmation", m.GetPayload())
	}
}

func TestSlowSubscriberIsCutOff(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{serverOpts: nil})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := in.client.Subscribe(ctx, &qbridgev1.SubscribeRequest{Channels: []string{"firehose"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	// Never read; publish far more than buffer + transport windows hold.
	payload := []byte(strings.Repeat("x", 64<<10))
	plain := rs.Client(t, 0)
	for i := 0; i < 400; i++ {
		plain.Publish(ctx, "firehose", payload)
	}
	var last error
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := st.Recv(); err != nil {
			last = err
			break
		}
	}
	wantCode(t, last, codes.ResourceExhausted, "too slow")
}

// Redis stops mid-test: calls fail with UNAVAILABLE, and everything works
// again once it is back, including a Consume stream opened before.
func TestRedisRestartMidTest(t *testing.T) {
	rs := redistest.Start(t, redistest.WithAOF())
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 30*time.Second)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "survive"})
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "survive", Payload: []byte("one")}); err != nil {
		t.Fatal(err)
	}
	if err := ack(t, in.client, s.next(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	rs.Stop(t)
	_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "survive", Payload: []byte("lost?")})
	wantCode(t, err, codes.Unavailable, "")
	_, err = in.client.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "survive"})
	wantCode(t, err, codes.Unavailable, "")
	rs.Restart(t)
	eventually(t, 10*time.Second, "enqueue works again", func() bool {
		_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "survive", Payload: []byte("two")})
		return err == nil
	})
	d := s.next(t, 10*time.Second)
	if string(d.GetPayload()) != "two" {
		t.Fatalf("after the restart the open stream got %q", d.GetPayload())
	}
	if err := ack(t, in.client, d); err != nil {
		t.Fatal(err)
	}
}

var _ = redis.Nil

// Redis scripts do not roll back: a script that failed on the ready list
// after removing a message elsewhere would lose it. When the queue's key is
// overwritten with something that is not a list, every operation that would
// write it fails up front and the message stays where it was.
func TestOverwrittenQueueKeyLosesNothing(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	plain := rs.Client(t, 0)
	ctx := ctxT(t, 20*time.Second)
	enqueueN(t, in.client, "clobber", 1)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "clobber", LeaseDuration: lease(time.Minute)})
	d := s.next(t, 5*time.Second)
	// A delayed message that becomes due while the key is clobbered.
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "clobber", Payload: []byte("later"), Delay: durationpb.New(300 * time.Millisecond)}); err != nil {
		t.Fatal(err)
	}
	plain.Set(ctx, "clobber", "oops", 0)

	_, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}})
	wantCode(t, err, codes.FailedPrecondition, "not a list")
	_, err = in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "clobber", Payload: []byte("x"), DedupKey: "k1"})
	wantCode(t, err, codes.FailedPrecondition, "not a list")
	// Let the promoter try (and fail) on the due message: it is due after
	// 300ms and the promoter looks at least every second.
	time.Sleep(1500 * time.Millisecond) // not synchronisation: nothing may happen in this window, and this is how long it would take
	if n := plain.HLen(ctx, "{clobber}:qb:inflight").Val(); n != 1 {
		t.Fatalf("the nacked message left the in-flight hash: %d there", n)
	}
	if n := plain.HLen(ctx, "{clobber}:qb:scheduled").Val(); n != 1 {
		t.Fatalf("the delayed message left the scheduled hash: %d there", n)
	}
	if plain.HExists(ctx, "{clobber}:qb:dedup", "k1").Val() {
		t.Fatal("the failed enqueue recorded its dedup key")
	}
	// Once the key is a list again, everything flows.
	plain.Del(ctx, "clobber")
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "both messages ready or delivered again", func() bool {
		return plain.HLen(ctx, "{clobber}:qb:scheduled").Val() == 0
	})
}

// A stream joining a channel that is already subscribed on the shared
// connection must not get a message published before it joined, even when
// that message is still on its way through the hub.
func TestLateJoinerSeesNothingPublishedBefore(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 60*time.Second)
	subscribe(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"ch"}}) // keeps "ch" subscribed
	rounds := 200
	if testing.Short() {
		rounds = 50
	}
	for i := 0; i < rounds; i++ {
		if _, err := in.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "ch", Payload: []byte("before-" + itoa(i))}); err != nil {
			t.Fatal(err)
		}
		sctx, cancel := context.WithCancel(ctx)
		st, err := in.client.Subscribe(sctx, &qbridgev1.SubscribeRequest{Channels: []string{"ch"}})
		if err != nil {
			t.Fatal(err)
		}
		if first, err := st.Recv(); err != nil || first.GetSubscribed() == nil {
			t.Fatalf("round %d: no confirmation: %v %v", i, first, err)
		}
		if _, err := in.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "ch", Payload: []byte("after-" + itoa(i))}); err != nil {
			t.Fatal(err)
		}
		m, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if got := string(m.GetMessage().GetPayload()); got != "after-"+itoa(i) {
			t.Fatalf("round %d: the late joiner's first message is %q, published before it subscribed", i, got)
		}
		cancel()
	}
}
