package server_test

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// TestShardedStreamsFilledByEveryShard has several streams on one sharded
// queue, so that each shard's dispatcher fills the same streams: a
// regression test for the dispatchers taking the streams' fill locks in
// different orders and deadlocking after the first batches.
func TestShardedStreamsFilledByEveryShard(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 30*time.Second)
	q := "busy"
	if _, err := in.admin.UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: q, Config: &qbridgev1.QueueConfig{Shards: 6}}); err != nil {
		t.Fatal(err)
	}
	var ss []*stream
	for i := 0; i < 4; i++ {
		ss = append(ss, consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1024}))
	}
	total := 0
	for round := 0; round < 10; round++ {
		var msgs []*qbridgev1.BatchMessage
		for i := 0; i < 200; i++ {
			msgs = append(msgs, &qbridgev1.BatchMessage{Payload: []byte(fmt.Sprint(round, i))})
		}
		if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs}); err != nil {
			t.Fatal(err)
		}
		total += 200
	}
	got := 0
	seen := map[string]bool{}
	deadline := time.After(15 * time.Second)
	cases := make([]reflect.SelectCase, len(ss)+1)
	for i, s := range ss {
		cases[i] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(s.ch)}
	}
	cases[len(ss)] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(deadline)}
	for got < total {
		i, v, ok := reflect.Select(cases)
		if i == len(ss) {
			break
		}
		if !ok {
			t.Fatalf("stream %d ended: %v", i, <-ss[i].errc)
		}
		d := v.Interface().(*qbridgev1.Delivery)
		if seen[d.GetId()] {
			t.Fatalf("message %s delivered twice", d.GetId())
		}
		seen[d.GetId()] = true
		got++
		if err := ack(t, in.client, d); err != nil {
			t.Fatal(err)
		}
	}
	if got < total {
		t.Fatalf("got %d of %d; stats %v", got, total, admStats(t, in.client, q))
	}
}
