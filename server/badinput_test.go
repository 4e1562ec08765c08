package server_test

import (
	"context"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
)

// Every bad request gets a precise status and changes nothing in Redis.
func TestBadInput(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{serverOpts: []server.Option{server.WithMaxPayload(1000), server.WithMaxBatch(3)}})
	c := in.client
	// A message that is already accepted and must survive all of this.
	id := enqueueN(t, c, "keep", 1)[0]
	good := consume(t, c, &qbridgev1.ConsumeRequest{Queue: "keep"}).next(t, 5*time.Second)

	long := strings.Repeat("q", server.MaxNameLen+1)
	okTok := good.GetAckToken()
	tampered := okTok[:len(okTok)-2] + "!!"
	cases := []struct {
		name string
		call func(ctx context.Context) error
		code codes.Code
		msg  string
	}{
		{"enqueue empty queue", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Payload: []byte("x")})
			return err
		}, codes.InvalidArgument, "queue name is empty"},
		{"enqueue glob in name", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "jobs*", Payload: []byte("x")})
			return err
		}, codes.InvalidArgument, "glob character"},
		{"enqueue brace in name", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "a{b}", Payload: []byte("x")})
			return err
		}, codes.InvalidArgument, "hash tags"},
		{"enqueue space in name", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "my jobs", Payload: []byte("x")})
			return err
		}, codes.InvalidArgument, "a space"},
		{"enqueue name too long", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: long, Payload: []byte("x")})
			return err
		}, codes.InvalidArgument, "the limit is 256"},
		{"enqueue payload too big", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "keep", Payload: make([]byte, 1001)})
			return err
		}, codes.InvalidArgument, "1001 bytes; the limit is 1000"},
		{"enqueue bad id", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "keep", Payload: []byte("x"), Id: "has space"})
			return err
		}, codes.InvalidArgument, "message id"},
		{"enqueue empty header key", func(ctx context.Context) error {
			_, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "keep", Payload: []byte("x"), Headers: map[string]string{"": "v"}})
			return err
		}, codes.InvalidArgument, "empty key"},
		{"batch empty", func(ctx context.Context) error {
			_, err := c.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: "keep"})
			return err
		}, codes.InvalidArgument, "messages is empty"},
		{"batch too large", func(ctx context.Context) error {
			_, err := c.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: "keep", Messages: make([]*qbridgev1.BatchMessage, 4)})
			return err
		}, codes.InvalidArgument, "the limit is 3"},
		{"batch with one bad message writes none", func(ctx context.Context) error {
			_, err := c.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: "keep", Messages: []*qbridgev1.BatchMessage{
				{Payload: []byte("ok")}, {Payload: make([]byte, 2000)},
			}})
			return err
		}, codes.InvalidArgument, "messages[1]"},
		{"consume window too large", func(ctx context.Context) error {
			return recvErr(c.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "keep", MaxInFlight: 100000}))
		}, codes.InvalidArgument, "max_in_flight 100000"},
		{"consume lease too short", func(ctx context.Context) error {
			return recvErr(c.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "keep", LeaseDuration: durationpb.New(time.Millisecond)}))
		}, codes.InvalidArgument, "lease_duration"},
		{"consume lease negative", func(ctx context.Context) error {
			return recvErr(c.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "keep", LeaseDuration: durationpb.New(-time.Second)}))
		}, codes.InvalidArgument, "lease_duration"},
		{"consume bad name", func(ctx context.Context) error {
			return recvErr(c.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "?"}))
		}, codes.InvalidArgument, "queue name"},
		{"ack no tokens", func(ctx context.Context) error {
			_, err := c.Ack(ctx, &qbridgev1.AckRequest{})
			return err
		}, codes.InvalidArgument, "ack_tokens is empty"},
		{"ack garbage token", func(ctx context.Context) error {
			_, err := c.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{"garbage"}})
			return err
		}, codes.InvalidArgument, "malformed ack token"},
		{"ack tampered token", func(ctx context.Context) error {
			_, err := c.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{tampered}})
			return err
		}, codes.InvalidArgument, "malformed ack token"},
		{"ack good and garbage acks nothing", func(ctx context.Context) error {
			_, err := c.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{okTok, "v1.AAAA"}})
			return err
		}, codes.InvalidArgument, "ack_tokens[1]"},
		{"nack unknown action", func(ctx context.Context) error {
			_, err := c.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{okTok}, Action: 42})
			return err
		}, codes.InvalidArgument, "unknown action"},
		{"extend lease too long", func(ctx context.Context) error {
			_, err := c.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{AckTokens: []string{okTok}, LeaseDuration: durationpb.New(1000 * time.Hour)})
			return err
		}, codes.InvalidArgument, "out of range"},
		{"publish bad channel", func(ctx context.Context) error {
			_, err := c.Publish(ctx, &qbridgev1.PublishRequest{Channel: "news.*"})
			return err
		}, codes.InvalidArgument, "channel name"},
		{"publish payload too big", func(ctx context.Context) error {
			_, err := c.Publish(ctx, &qbridgev1.PublishRequest{Channel: "news", Payload: make([]byte, 1001)})
			return err
		}, codes.InvalidArgument, "the limit is 1000"},
		{"subscribe nothing", func(ctx context.Context) error {
			return recvErr(c.Subscribe(ctx, &qbridgev1.SubscribeRequest{}))
		}, codes.InvalidArgument, "no channels or patterns"},
		{"subscribe bad pattern", func(ctx context.Context) error {
			return recvErr(c.Subscribe(ctx, &qbridgev1.SubscribeRequest{Patterns: []string{"a b*"}}))
		}, codes.InvalidArgument, "pattern"},
		{"stats bad name", func(ctx context.Context) error {
			_, err := c.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: ""})
			return err
		}, codes.InvalidArgument, "queue name is empty"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			wantCode(t, tc.call(ctxT(t, 5*time.Second)), tc.code, tc.msg)
		})
	}
	// Nothing was written, and the accepted message is intact and ackable.
	ctx := ctxT(t, 5*time.Second)
	// (Not counting the consumers hash: presence that a consuming instance
	// refreshes every reap interval, not data.)
	keys := slices.DeleteFunc(in.rdb.Keys(ctx, "*").Val(), func(k string) bool { return strings.HasSuffix(k, ":qb:consumers") })
	if len(keys) != 5 {
		t.Fatalf("Redis holds %d keys %v; want 5 (inflight, leases, seq, counters, registry)", len(keys), keys)
	}
	if n := in.rdb.HGet(ctx, "{keep}:qb:counters", "enqueued").Val(); n != "1" {
		t.Fatalf("enqueued counter = %q; the refused calls were counted", n)
	}
	if r, f := stats(t, c, "keep"); r != 0 || f != 1 {
		t.Fatalf("accepted message disturbed: %d ready, %d in flight", r, f)
	}
	if good.GetId() != id {
		t.Fatalf("got %s want %s", good.GetId(), id)
	}
	if err := ack(t, c, good); err != nil {
		t.Fatalf("the accepted message cannot be acked after the bad calls: %v", err)
	}
}

// recvErr returns the error a stream ends with before sending anything.
func recvErr[T any](st interface{ Recv() (T, error) }, err error) error {
	if err != nil {
		return err
	}
	for {
		if _, err := st.Recv(); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

func TestNameRules(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"task:prodcons:queue", true},
		{"orders.eu-west/critical@v2+x=1", true},
		{"a", true},
		{strings.Repeat("a", server.MaxNameLen), true},
		{"", false},
		{strings.Repeat("a", server.MaxNameLen+1), false},
		{"a*", false}, {"a?", false}, {"a[1]", false}, {"{a}", false},
		{"tab\tname", false}, {"newline\n", false}, {"ünïcode", false}, {"a b", false},
	} {
		if err := server.ValidateName("queue", tc.name); (err == nil) != tc.ok {
			t.Errorf("ValidateName(%q) = %v; want ok=%v", tc.name, err, tc.ok)
		}
	}
	for _, tc := range []struct {
		p  string
		ok bool
	}{
		{"news.*", true}, {"h?llo", true}, {"h[ae]llo", true}, {"h[^e]llo", true}, {`a\*`, true},
		{"", false}, {"a b", false}, {"{x}*", false},
	} {
		if err := server.ValidatePattern(tc.p); (err == nil) != tc.ok {
			t.Errorf("ValidatePattern(%q) = %v; want ok=%v", tc.p, err, tc.ok)
		}
	}
}

func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"task:prodcons:queue", "", "a*", "{x}", "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := server.ValidateName("queue", s)
		if err != nil {
			return
		}
		// Anything accepted must be safe inside a hash tag and not a glob.
		if strings.ContainsAny(s, "{}*?[] \t\r\n") || len(s) == 0 || len(s) > server.MaxNameLen {
			t.Fatalf("accepted unsafe name %q", s)
		}
	})
}

func FuzzValidatePattern(f *testing.F) {
	for _, s := range []string{"news.*", "task:pubsub:[ab]?", "", "{x}*", "a b", "\\*"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if err := server.ValidatePattern(s); err != nil {
			return
		}
		// A pattern may glob, but never leaves the key prefix's hash tag
		// scheme (braces) or carries whitespace or control bytes.
		if len(s) == 0 || len(s) > server.MaxNameLen || strings.ContainsAny(s, "{} \t\r\n") {
			t.Fatalf("accepted unsafe pattern %q", s)
		}
		for i := 0; i < len(s); i++ {
			if s[i] < 0x21 || s[i] > 0x7e {
				t.Fatalf("accepted pattern %q with byte 0x%02x", s, s[i])
			}
		}
	})
}
