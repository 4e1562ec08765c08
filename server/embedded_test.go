package server_test

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// startEmbedded runs a server on the embedded engine (miniredis), as
// qbridged does without --redis-url.
func startEmbedded(t *testing.T) *instance {
	t.Helper()
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	b := broker.New(rdb, broker.WithDefaults(broker.Policy{
		MaxAttempts: 3, BackoffMin: 50 * time.Millisecond, BackoffMax: 200 * time.Millisecond, DedupWindow: time.Minute,
	}))
	srv := server.New(b, server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithReapInterval(100*time.Millisecond), server.WithWaitSlice(time.Second))
	srv.Start()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	in := &instance{srv: srv, gs: gs, addr: lis.Addr().String(), client: qbridgev1.NewQueueServiceClient(conn),
		admin: qbridgev1.NewAdminServiceClient(conn), conn: conn, rdb: rdb}
	t.Cleanup(in.stop)
	return in
}

// The delivery policies work on the embedded engine too: delayed delivery,
// retries with backoff, dead letters after max attempts, lease expiry,
// dedup, bounded queues, replay.
func TestEmbeddedEnginePolicies(t *testing.T) {
	in := startEmbedded(t)
	c := in.client
	ctx := ctxT(t, 30*time.Second)

	// Delayed.
	start := time.Now()
	if _, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "emb", Payload: []byte("late"), Delay: durationpb.New(300 * time.Millisecond)}); err != nil {
		t.Fatal(err)
	}
	s := consume(t, c, &qbridgev1.ConsumeRequest{Queue: "emb", MaxInFlight: 1, LeaseDuration: lease(time.Second)})
	d := s.next(t, 5*time.Second)
	if el := time.Since(start); el < 250*time.Millisecond || string(d.GetPayload()) != "late" {
		t.Fatalf("delayed message %q came after %v", d.GetPayload(), el)
	}
	// Retry with backoff, then lease expiry: attempts 2 and 3, then dead.
	if _, err := c.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_RETRY, Error: "boom"}); err != nil {
		t.Fatal(err)
	}
	d2 := s.next(t, 5*time.Second)
	if d2.GetAttempt() != 2 || d2.GetLastError() != "boom" {
		t.Fatalf("retry: attempt %d last error %q", d2.GetAttempt(), d2.GetLastError())
	}
	d3 := s.next(t, 5*time.Second) // the 1s lease of d2 ran out
	if d3.GetAttempt() != 3 || d3.GetId() != d.GetId() {
		t.Fatalf("after lease expiry: %v", d3)
	}
	if _, err := c.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d3.GetAckToken()}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "dead-lettered after 3 attempts", func() bool {
		st, err := c.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "emb"})
		return err == nil && st.GetDead() == 1 && st.GetInFlight() == 0 && st.GetReady() == 0
	})
	dead, err := in.admin.PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{Queue: "emb", State: qbridgev1.MessageState_MESSAGE_STATE_DEAD})
	if err != nil || len(dead.GetMessages()) != 1 || dead.GetMessages()[0].GetDeadReason() != "max attempts reached" || dead.GetMessages()[0].GetDeliveries() != 3 {
		t.Fatalf("dead letters: %v %v", dead, err)
	}
	if _, err := in.admin.ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: "emb", All: true}); err != nil {
		t.Fatal(err)
	}
	if r := s.next(t, 5*time.Second); r.GetAttempt() != 1 || r.GetId() != d.GetId() {
		t.Fatalf("replayed: %v", r)
	} else if err := ack(t, c, r); err != nil {
		t.Fatal(err)
	}

	// Results: an ack wakes a waiting GetResult (PUBLISH from Lua).
	kr, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "emb", Payload: []byte("q"), KeepResult: true})
	if err != nil {
		t.Fatal(err)
	}
	waited := make(chan *qbridgev1.GetResultResponse, 1)
	go func() {
		r, _ := c.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "emb", Id: kr.GetId(), Wait: durationpb.New(10 * time.Second)})
		waited <- r
	}()
	kd := s.next(t, 5*time.Second)
	if _, err := c.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{kd.GetAckToken()}, Results: map[string][]byte{kd.GetAckToken(): []byte("a")}}); err != nil {
		t.Fatal(err)
	}
	if r := <-waited; string(r.GetResult()) != "a" {
		t.Fatalf("result on the embedded engine: %v", r)
	}

	// Dedup and bounded queues.
	a, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "emb2", Payload: []byte("x"), DedupKey: "k"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "emb2", Payload: []byte("x"), DedupKey: "k"})
	if err != nil || !b.GetDuplicate() || b.GetId() != a.GetId() {
		t.Fatalf("dedup: %v %v", b, err)
	}
	if _, err := in.admin.UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: "emb2", Config: &qbridgev1.QueueConfig{MaxLength: 1}}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "emb2", Payload: []byte("y")})
	wantCode(t, err, codes.ResourceExhausted, "is full")
}
