package server_test

import (
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/broker"
)

// waitCalls returns how many WAIT commands rdb's Redis ran (INFO
// commandstats).
func waitCalls(t *testing.T, rdb *redis.Client) int {
	t.Helper()
	info, err := rdb.Info(ctxT(t, 5*time.Second), "commandstats").Result()
	if err != nil {
		t.Fatalf("INFO commandstats: %v", err)
	}
	for _, line := range strings.Split(info, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_wait:")
		if !ok {
			continue
		}
		for _, kv := range strings.Split(rest, ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok {
				n, err := strconv.Atoi(v)
				if err != nil {
					t.Fatalf("commandstats %q: %v", line, err)
				}
				return n
			}
		}
	}
	return 0
}

// holds reports whether queue's ready list on rdb has an element with
// payload in it.
func holds(t *testing.T, rdb *redis.Client, queue, payload string) bool {
	t.Helper()
	els, err := rdb.LRange(ctxT(t, 5*time.Second), broker.NewKeys("").Ready(queue), 0, -1).Result()
	if err != nil {
		t.Fatalf("LRANGE %s on %s: %v", queue, rdb.Options().Addr, err)
	}
	for _, e := range els {
		if strings.Contains(e, payload) {
			return true
		}
	}
	return false
}

// TestEnqueueReplicasSentinel runs --enqueue-replicas on a master with one
// replica behind Sentinel, as the least-privilege user: an acknowledged
// enqueue is on the replica at once; with the replica stopped (SIGSTOP) an
// enqueue fails with UNAVAILABLE after the timeout although the message is
// enqueued on the master (and counted), and works again once the replica
// resumes; asking for two replicas of one fails likewise; the option off
// sends no WAIT.
func TestEnqueueReplicasSentinel(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	s := redistest.StartSentinel(t)
	master, replica := s.Data()[0], s.Data()[1]
	stopped := false
	t.Cleanup(func() { // before redistest's own cleanup kills it
		if stopped {
			_ = syscall.Kill(replica.PID(), syscall.SIGCONT)
		}
	})
	onMaster, onReplica := master.Client(t, 0), replica.Client(t, 0)
	tp := sentinelTopology(t, s)
	one := startOn(t, tp, []broker.Option{broker.WithEnqueueReplicas(1, timeout)})

	enqueue := func(in *topoInstance, q, payload string) error {
		_, err := in.client.Enqueue(ctxT(t, 10*time.Second), &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(payload)})
		return err
	}
	batch := func(in *topoInstance, q string, payloads ...string) error {
		req := &qbridgev1.EnqueueBatchRequest{Queue: q}
		for _, p := range payloads {
			req.Messages = append(req.Messages, &qbridgev1.BatchMessage{Payload: []byte(p)})
		}
		_, err := in.client.EnqueueBatch(ctxT(t, 10*time.Second), req)
		return err
	}
	wantNotReplicated := func(what string, err error, acked, want int) {
		t.Helper()
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("%s: %v; want UNAVAILABLE", what, err)
		}
		msg := status.Convert(err).Message()
		for _, part := range []string{"written on the master", "acknowledged by only " + strconv.Itoa(acked) + " of " + strconv.Itoa(want) + " replicas within 300ms", "retrying may duplicate it"} {
			if !strings.Contains(msg, part) {
				t.Errorf("%s: %q lacks %q", what, msg, part)
			}
		}
	}

	// Replica up: acknowledged means on the replica, read right away.
	before := waitCalls(t, onMaster)
	for i := range 3 {
		p := "up-" + strconv.Itoa(i)
		if err := enqueue(one, "dur", p); err != nil {
			t.Fatalf("enqueue %s with the replica up: %v", p, err)
		}
		if !holds(t, onReplica, "dur", p) {
			t.Fatalf("%s acknowledged but not on the replica", p)
		}
	}
	if err := batch(one, "dur", "up-b0", "up-b1"); err != nil {
		t.Fatalf("batch with the replica up: %v", err)
	}
	for _, p := range []string{"up-b0", "up-b1"} {
		if !holds(t, onReplica, "dur", p) {
			t.Fatalf("%s acknowledged but not on the replica", p)
		}
	}
	if n := waitCalls(t, onMaster) - before; n != 4 {
		t.Errorf("%d WAIT for 4 sequential enqueue calls, want 4", n)
	}

	// Replica stopped: UNAVAILABLE after the timeout, yet enqueued.
	if err := syscall.Kill(replica.PID(), syscall.SIGSTOP); err != nil {
		t.Fatalf("SIGSTOP the replica: %v", err)
	}
	stopped = true
	counted := fullStats(t, one.client, "dur").GetCounters().GetEnqueued()
	start := time.Now()
	err := enqueue(one, "dur", "stopped-0")
	took := time.Since(start)
	wantNotReplicated("enqueue with the replica stopped", err, 0, 1)
	if took < timeout || took > timeout+5*time.Second {
		t.Errorf("failed after %v; want about the timeout %v", took, timeout)
	}
	wantNotReplicated("batch with the replica stopped", batch(one, "dur", "stopped-b0", "stopped-b1"), 0, 1)
	for _, p := range []string{"stopped-0", "stopped-b0", "stopped-b1"} {
		if !holds(t, onMaster, "dur", p) {
			t.Errorf("%s failed as not replicated but is not on the master", p)
		}
	}
	if got := fullStats(t, one.client, "dur").GetCounters().GetEnqueued(); got != counted+3 {
		t.Errorf("enqueued counter %d, want %d: the unreplicated messages are enqueued", got, counted+3)
	}

	// Replica back: enqueues are acknowledged again (the first may still
	// time out while the replica catches up; each failed try waits the
	// timeout, so this is no busy loop).
	if err := syscall.Kill(replica.PID(), syscall.SIGCONT); err != nil {
		t.Fatalf("SIGCONT the replica: %v", err)
	}
	stopped = false
	deadline := time.Now().Add(15 * time.Second)
	for try := 0; ; try++ {
		p := "resumed-" + strconv.Itoa(try)
		err := enqueue(one, "dur", p)
		if err == nil {
			if !holds(t, onReplica, "dur", p) {
				t.Fatalf("%s acknowledged but not on the replica", p)
			}
			t.Logf("acknowledged again on try %d after SIGCONT", try+1)
			break
		}
		wantNotReplicated("enqueue right after SIGCONT", err, 0, 1)
		if time.Now().After(deadline) {
			t.Fatalf("enqueues still not acknowledged 15s after the replica resumed: %v", err)
		}
	}

	// Two replicas asked of one: fails likewise, telling how many did.
	two := startOn(t, tp, []broker.Option{broker.WithEnqueueReplicas(2, timeout)})
	wantNotReplicated("enqueue asking for 2 of 1 replicas", enqueue(two, "dur2", "two-0"), 1, 2)
	wantNotReplicated("batch asking for 2 of 1 replicas", batch(two, "dur2", "two-b0"), 1, 2)
	for _, p := range []string{"two-0", "two-b0"} {
		if !holds(t, onMaster, "dur2", p) {
			t.Errorf("%s is not on the master", p)
		}
	}

	// Off: no WAIT.
	off := startOn(t, tp, nil)
	zero := startOn(t, tp, []broker.Option{broker.WithEnqueueReplicas(0, timeout)})
	before = waitCalls(t, onMaster)
	for _, in := range []*topoInstance{off, zero} {
		if err := enqueue(in, "off", "off"); err != nil {
			t.Fatalf("enqueue without --enqueue-replicas: %v", err)
		}
		if err := batch(in, "off", "off-b0", "off-b1"); err != nil {
			t.Fatalf("batch without --enqueue-replicas: %v", err)
		}
	}
	if n := waitCalls(t, onMaster) - before; n != 0 {
		t.Errorf("%d WAIT with the option off, want 0", n)
	}
}
