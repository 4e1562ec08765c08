package server_test

import (
	"testing"
	"time"

	"go.uber.org/goleak"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
)

// Streams that end leave nothing behind: no stream goroutine, no dispatcher
// for a queue nobody consumes, no reader for a subscription nobody holds.
func TestStreamsDoNotLeakGoroutines(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{serverOpts: []server.Option{server.WithWaitSlice(time.Second)}})
	// Warm up the client connection and the pub/sub connection so that
	// their long-lived goroutines exist before the snapshot.
	stats(t, in.client, "warm")
	warm := subscribe(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"warm"}})
	_ = warm
	snapshot := goleak.IgnoreCurrent()

	enqueueN(t, in.client, "leak-a", 10)
	var streams []*stream
	for i := 0; i < 4; i++ {
		q := "leak-a"
		if i%2 == 1 {
			q = "leak-b"
		}
		streams = append(streams, consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 2}))
	}
	streams[0].next(t, 5*time.Second)
	subs := []*qbridgev1.SubscribeRequest{{Channels: []string{"x", "y"}}, {Patterns: []string{"z*"}}}
	var cancels []func()
	for _, req := range subs {
		ctx, cancel := ctxCancel()
		st, err := in.client.Subscribe(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
		cancels = append(cancels, cancel)
	}
	for _, s := range streams {
		s.cancel()
		s.err(t, 5*time.Second)
	}
	for _, c := range cancels {
		c()
	}
	eventually(t, 5*time.Second, "held messages requeued", func() bool {
		r, f := stats(t, in.client, "leak-a")
		return r == 10 && f == 0
	})
	// A queue's dispatcher ends once its blocking wait in Redis returns:
	// within one wait slice (go-redis rounds blocking timeouts up to 1s).
	deadline := time.Now().Add(3 * time.Second)
	for goleak.Find(snapshot) != nil && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	goleak.VerifyNone(t, snapshot)
}
