package main

import (
	"testing"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// TestShardedChannelsFlag: --sharded-channels reaches the broker: a
// Subscribe to a matching channel is an SSUBSCRIBE on Redis, Publish an
// SPUBLISH that counts it, and other channels stay classic.
func TestShardedChannelsFlag(t *testing.T) {
	rs := redistest.Start(t)
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--redis-url", rs.URL(0), "--plaintext", "--sharded-channels", "prices.*"}, nil)
	q := qbridgev1.NewQueueServiceClient(dial(t, d.addr))
	ctx := rpcCtx(t)
	admin := rs.Client(t, 0)
	for _, ch := range []string{"prices.eur", "news"} {
		sub, err := q.Subscribe(ctx, &qbridgev1.SubscribeRequest{Channels: []string{ch}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sub.Recv(); err != nil { // Subscribed
			t.Fatalf("subscribe %s: %v", ch, err)
		}
		sharded, err := admin.PubSubShardNumSub(ctx, ch).Result()
		if err != nil {
			t.Fatal(err)
		}
		classic, err := admin.PubSubNumSub(ctx, ch).Result()
		if err != nil {
			t.Fatal(err)
		}
		want := map[bool][2]int64{true: {1, 0}, false: {0, 1}}[ch == "prices.eur"]
		if got := [2]int64{sharded[ch], classic[ch]}; got != want {
			t.Errorf("%s: SHARDNUMSUB %d, NUMSUB %d; want %v", ch, got[0], got[1], want)
		}
		r, err := q.Publish(ctx, &qbridgev1.PublishRequest{Channel: ch, Payload: []byte("x")})
		if err != nil || r.GetReceivers() != 1 {
			t.Errorf("publish %s: %v receivers, %v; want 1", ch, r.GetReceivers(), err)
		}
		m, err := sub.Recv()
		if err != nil || string(m.GetMessage().GetPayload()) != "x" {
			t.Errorf("%s: got %v, %v", ch, m, err)
		}
	}
}
