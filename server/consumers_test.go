package server_test

import (
	"testing"
	"time"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// GetQueueStats counts the open Consume streams of a queue over all
// instances: streams of a priority stream count on each of their queues,
// an ended stream stops counting, and an instance that stops takes its
// streams out at once.
func TestStatsCountConsumers(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	consumers := func(q string) int64 {
		st, err := a.client.GetQueueStats(ctxT(t, 5*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: q})
		if err != nil {
			t.Fatal(err)
		}
		return st.GetConsumers()
	}
	want := func(q string, n int64) {
		t.Helper()
		eventually(t, 10*time.Second, q+" to count its consumers", func() bool { return consumers(q) == n })
	}
	if n := consumers("cq"); n != 0 {
		t.Fatalf("consumers of an unconsumed queue: %d", n)
	}
	s1 := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: "cq"})
	s2 := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: "cq"})
	s3 := consume(t, b.client, &qbridgev1.ConsumeRequest{Queues: []string{"cq", "cq-low"}})
	want("cq", 3)
	want("cq-low", 1)

	s1.cancel()
	want("cq", 2)
	_ = s2
	_ = s3
	b.stop()
	want("cq", 1)
	want("cq-low", 0)
}
