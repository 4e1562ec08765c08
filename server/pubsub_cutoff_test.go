package server_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
)

// Regression (chaos suite, a subscriber that reads nothing): once its
// buffer overflows, the stream lets go of its Redis subscription and its
// buffer at once, though its handler is blocked sending to a client that
// does not read; when the client reads, it gets RESOURCE_EXHAUSTED.
func TestStalledSubscriberIsCutOffAtOnce(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{serverOpts: []server.Option{server.WithSubscriberBuffer(16, 1<<20)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cc, err := grpc.NewClient(in.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	st, err := qbridgev1.NewQueueServiceClient(cc).Subscribe(ctx, &qbridgev1.SubscribeRequest{Channels: []string{"stalled"}})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.GetSubscribed() == nil {
		t.Fatalf("first message: %v, %v; want the confirmation", r, err)
	}
	numsub := func() int64 {
		m, err := in.rdb.PubSubNumSub(ctx, "stalled").Result()
		if err != nil {
			return -1
		}
		return m["stalled"]
	}
	if n := numsub(); n != 1 {
		t.Fatalf("%d subscriptions to the channel; want 1", n)
	}
	// Far more than the gRPC windows and the buffer hold; the client reads
	// nothing meanwhile.
	payload := strings.Repeat("x", 1024)
	for i := 0; i < 400; i++ {
		if err := in.rdb.Publish(ctx, "stalled", payload).Err(); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for numsub() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the overflowed subscriber still holds its Redis subscription while its client reads nothing")
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
	// Reading now drains what was in flight, then the status.
	for {
		_, err := st.Recv()
		if err != nil {
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("stream ended with %v; want RESOURCE_EXHAUSTED", err)
			}
			break
		}
	}
}
