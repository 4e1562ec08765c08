package client_test

import (
	"fmt"
	"testing"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// TestShardedQueue: ordering keys keep one key's messages in order across a
// sharded queue, deliveries name their shard, and the stats count shards.
func TestShardedQueue(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "sharded"
	if _, err := e.c.Admin().UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: q, Config: &qbridgev1.QueueConfig{Shards: 4}}); err != nil {
		t.Fatal(err)
	}
	keys := []string{"a", "b", "c"}
	for i := 0; i < 5; i++ {
		for _, k := range keys {
			if _, err := e.c.Enqueue(ctx, q, []byte(fmt.Sprintf("%s%d", k, i)), client.WithOrderingKey(k)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := e.c.EnqueueBatch(ctx, q, []client.Message{{Payload: []byte("a5"), OrderingKey: "a"}, {Payload: []byte("b5"), OrderingKey: "b"}}); err != nil {
		t.Fatal(err)
	}
	st, err := e.c.Stats(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	shards, err := e.c.ShardStats(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, sh := range shards {
		sum += sh.Ready
	}
	if st.Shards != 4 || len(shards) != 4 || st.Ready != 17 || sum != 17 {
		t.Fatalf("stats: %d shards, %d ready; per shard %+v; want 4 shards, 17 ready", st.Shards, st.Ready, shards)
	}
	cs := consume(t, ctx, e.c, q, client.WithMaxInFlight(1))
	want := map[string]int{}
	shardOf := map[string]int{}
	for range 17 {
		d := next(t, cs)
		k, n := string(d.Payload[:1]), 0
		fmt.Sscan(string(d.Payload[1:]), &n)
		if n != want[k] {
			t.Fatalf("got %s; want %s%d next for key %s (per-key order lost)", d.Payload, k, want[k], k)
		}
		want[k]++
		if s, ok := shardOf[k]; ok && s != d.Shard {
			t.Fatalf("key %s came from shards %d and %d", k, s, d.Shard)
		}
		shardOf[k] = d.Shard
		if err := d.Ack(ctx); err != nil {
			t.Fatal(err)
		}
	}
}
