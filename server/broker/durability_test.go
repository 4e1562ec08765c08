package broker

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/redistest"
)

// notReplicated returns err's *NotReplicatedError, failing t when err is
// not one.
func notReplicated(t *testing.T, what string, err error) *NotReplicatedError {
	t.Helper()
	var nre *NotReplicatedError
	if !errors.Is(err, ErrNotReplicated) || !errors.As(err, &nre) {
		t.Fatalf("%s: %v; want ErrNotReplicated", what, err)
	}
	if !strings.Contains(err.Error(), "written on the master") || !strings.Contains(err.Error(), "dedup key") {
		t.Errorf("%s: %q does not say that the message is on the master and how to retry", what, err)
	}
	return nre
}

// TestEnqueueReplicasWithoutReplicas: on a Redis with no replica, an
// enqueue asking for one waits the timeout and fails with ErrNotReplicated,
// and the message is enqueued nonetheless; each flush sends one WAIT right
// after its scripts (several queues included, and after a lost script
// cache), and the option off sends none.
func TestEnqueueReplicasWithoutReplicas(t *testing.T) {
	t.Parallel()
	const timeout = 100 * time.Millisecond
	srv := redistest.Start(t)
	rdb := srv.Client(t, 0)
	mk := func(opts ...Option) *Broker {
		svc := redis.NewClient(srv.ServiceOptions(0))
		t.Cleanup(func() { _ = svc.Close() })
		b := New(svc, opts...)
		if err := b.LoadScripts(testCtx(t)); err != nil {
			t.Fatalf("LoadScripts: %v", err)
		}
		return b
	}
	b := mk(WithEnqueueReplicas(1, timeout))
	if n, d := b.EnqueueReplicas(); n != 1 || d != timeout {
		t.Fatalf("EnqueueReplicas() = %d, %v", n, d)
	}
	ctx := testCtx(t)

	// One call, through EnqueueMany.
	resetStats(t, rdb)
	start := time.Now()
	res, err := b.EnqueueMany(ctx, "solo", msgs("solo", 2))
	took := time.Since(start)
	nre := notReplicated(t, "EnqueueMany", err)
	if nre.Acked != 0 || nre.Want != 1 || nre.Timeout != timeout || nre.Err != nil {
		t.Errorf("error %+v; want 0 of 1 within %v", nre, timeout)
	}
	if want := "acknowledged by only 0 of 1 replicas within 100ms"; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q lacks %q", err, want)
	}
	if took < timeout {
		t.Errorf("failed after %v, before WAIT's timeout %v", took, timeout)
	}
	if !slices.Equal(res.IDs, []string{"solo-0", "solo-1"}) {
		t.Errorf("result ids %v", res.IDs)
	}
	if got := readyIDs(t, b, rdb, "solo"); !slices.Equal(got, []string{"solo-0", "solo-1"}) {
		t.Errorf("ready list %v: the messages must be enqueued although not replicated", got)
	}
	if got := enqueuedCounter(t, b, rdb, "solo"); got != 2 {
		t.Errorf("enqueued counter %d, want 2", got)
	}
	if n := cmdCalls(t, rdb, "wait"); n != 1 {
		t.Errorf("%d WAIT, want 1", n)
	}

	// One flush of three queues: one pipeline, one WAIT, every call fails
	// alike; a full queue keeps its own error (nothing of it was written).
	setMaxLength(t, b, rdb, "full", 1)
	if _, err := b.EnqueueMany(ctx, "full", msgs("fill", 1)); !errors.Is(err, ErrNotReplicated) {
		t.Fatalf("filling the bounded queue: %v", err)
	}
	resetStats(t, rdb)
	calls := []*enqueueCall{
		newEnqueueCall(ctx, "a", msgs("a", 1)), newEnqueueCall(ctx, "b", msgs("b", 2)),
		newEnqueueCall(ctx, "a", msgs("a2", 1)), newEnqueueCall(ctx, "full", msgs("over", 1)),
	}
	b.flushEnqueues(calls)
	assertAllDone(t, calls)
	for i, c := range calls[:3] {
		notReplicated(t, fmt.Sprintf("call %d to %s", i, c.queue), c.err)
	}
	var full *QueueFullError
	if !errors.As(calls[3].err, &full) {
		t.Errorf("call to the full queue: %v; want QueueFullError", calls[3].err)
	}
	if n := cmdCalls(t, rdb, "wait"); n != 1 {
		t.Errorf("%d WAIT for one flush, want 1", n)
	}
	if n := cmdCalls(t, rdb, "evalsha"); n != 3 {
		t.Errorf("%d EVALSHA for one flush of three queues, want 3", n)
	}
	if got := readyIDs(t, b, rdb, "a"); !slices.Equal(got, []string{"a-0", "a2-0"}) {
		t.Errorf("queue a holds %v", got)
	}
	if got := readyIDs(t, b, rdb, "b"); !slices.Equal(got, []string{"b-0", "b-1"}) {
		t.Errorf("queue b holds %v", got)
	}

	// A lost script cache: the refused runs are sent again, with a WAIT of
	// their own, and run once.
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatalf("SCRIPT FLUSH: %v", err)
	}
	resetStats(t, rdb)
	calls = []*enqueueCall{newEnqueueCall(ctx, "c", msgs("c", 1)), newEnqueueCall(ctx, "d", msgs("d", 1))}
	b.flushEnqueues(calls)
	for i, c := range calls {
		notReplicated(t, fmt.Sprintf("call %d after SCRIPT FLUSH", i), c.err)
	}
	if n := cmdCalls(t, rdb, "wait"); n != 2 {
		t.Errorf("%d WAIT, want 2 (one per pipeline)", n)
	}
	for _, q := range []string{"c", "d"} {
		if got := readyIDs(t, b, rdb, q); !slices.Equal(got, []string{q + "-0"}) {
			t.Errorf("queue %s holds %v, want its message once", q, got)
		}
	}

	// Off: no WAIT at all, coalesced or not.
	for _, off := range []*Broker{mk(), mk(WithEnqueueReplicas(0, time.Second)), mk(WithCoalescing(0))} {
		resetStats(t, rdb)
		if _, err := off.EnqueueMany(ctx, "off", msgs("off", 1)); err != nil {
			t.Fatalf("EnqueueMany without replicas asked: %v", err)
		}
		calls := []*enqueueCall{newEnqueueCall(ctx, "off", msgs("off-a", 1)), newEnqueueCall(ctx, "off2", msgs("off-b", 1))}
		off.flushEnqueues(calls)
		for _, c := range calls {
			if c.err != nil {
				t.Fatalf("flush without replicas asked: %v", c.err)
			}
		}
		if n := cmdCalls(t, rdb, "wait"); n != 0 {
			t.Errorf("%d WAIT with the option off, want 0", n)
		}
	}
}

// TestEnqueueReplicasCluster: on Redis Cluster, a flush whose queues are on
// two of the three masters sends WAIT to exactly those two (on the
// connection of their scripts: one pipeline per node), and each call gets
// its own node's answer.
func TestEnqueueReplicasCluster(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	cc := redis.NewClusterClient(c.ServiceOptions())
	t.Cleanup(func() { _ = cc.Close() })
	b := New(cc, WithEnqueueReplicas(1, 50*time.Millisecond))
	ctx := testCtx(t)
	if err := b.LoadScripts(ctx); err != nil {
		t.Fatalf("LoadScripts: %v", err)
	}
	// Two queues on one node, one on another; the third node gets nothing.
	byNode := map[int][]string{}
	for i := 0; len(byNode[0]) < 2 || len(byNode[1]) < 1; i++ {
		q := fmt.Sprintf("cq%d", i)
		n := c.NodeOf(t, b.Keys().Ready(q))
		if n < 2 {
			byNode[n] = append(byNode[n], q)
		}
	}
	queues := []string{byNode[0][0], byNode[0][1], byNode[1][0]}
	admins := make([]*redis.Client, redistest.ClusterSize)
	for i := range admins {
		admins[i] = c.Node(i).Client(t, 0)
	}
	flush := func(round string) {
		t.Helper()
		for _, a := range admins {
			resetStats(t, a)
		}
		var calls []*enqueueCall
		for _, q := range queues {
			calls = append(calls, newEnqueueCall(ctx, q, msgs(round+q, 1)))
		}
		b.flushEnqueues(calls)
		assertAllDone(t, calls)
		for _, call := range calls {
			if nre := notReplicated(t, round+": call to "+call.queue, call.err); nre.Acked != 0 || nre.Want != 1 {
				t.Errorf("%s: %+v; want 0 of 1", round, nre)
			}
		}
		for n, want := range []int{1, 1, 0} {
			if got := cmdCalls(t, admins[n], "wait"); got != want {
				t.Errorf("%s: node %d got %d WAIT, want %d", round, n, got, want)
			}
		}
		for n, want := range []int{2, 1, 0} {
			if got := cmdCalls(t, admins[n], "evalsha"); got < want {
				t.Errorf("%s: node %d ran %d EVALSHA, want %d", round, n, got, want)
			}
		}
		for _, q := range queues {
			n := c.NodeOf(t, b.Keys().Ready(q))
			els, err := admins[n].LRange(ctx, b.Keys().Ready(q), 0, -1).Result()
			if err != nil || !slices.ContainsFunc(els, func(e string) bool { return strings.Contains(e, round+q+"-0") }) {
				t.Errorf("%s: queue %s on node %d holds %d elements (%v); want its message", round, q, n, len(els), err)
			}
		}
	}
	flush("first-")
	// Every node loses its scripts: each run is refused, then sent again
	// with a WAIT of its own.
	for _, a := range admins {
		if err := a.ScriptFlush(ctx).Err(); err != nil {
			t.Fatalf("SCRIPT FLUSH: %v", err)
		}
	}
	for _, a := range admins {
		resetStats(t, a)
	}
	var calls []*enqueueCall
	for _, q := range queues {
		calls = append(calls, newEnqueueCall(ctx, q, msgs("noscript-"+q, 1)))
	}
	b.flushEnqueues(calls)
	for _, call := range calls {
		notReplicated(t, "after SCRIPT FLUSH: call to "+call.queue, call.err)
	}
	for n, want := range []int{2, 2, 0} {
		if got := cmdCalls(t, admins[n], "wait"); got != want {
			t.Errorf("after SCRIPT FLUSH: node %d got %d WAIT, want %d", n, got, want)
		}
	}
	flush("again-")

	// A slot moves to another node behind the client's back: the node
	// answers MOVED (the script did not run), the slot map is reloaded and
	// the run goes, with its WAIT, to the new owner, once.
	var q string
	for i := 0; q == ""; i++ {
		if cand := fmt.Sprintf("moving%d", i); c.NodeOf(t, b.Keys().Ready(cand)) == 0 {
			q = cand
		}
	}
	slot := keySlot(b.Keys().Ready(q))
	target, err := admins[1].ClusterMyID(ctx).Result()
	if err != nil {
		t.Fatalf("CLUSTER MYID: %v", err)
	}
	for _, n := range []int{1, 0, 2} {
		if err := admins[n].Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", target).Err(); err != nil {
			t.Fatalf("CLUSTER SETSLOT %d NODE on node %d: %v", slot, n, err)
		}
	}
	for _, a := range admins {
		resetStats(t, a)
	}
	_, err = b.EnqueueMany(ctx, q, msgs(q, 1))
	notReplicated(t, "enqueue to a moved slot", err)
	if got := readyIDs(t, b, admins[1], q); !slices.Equal(got, []string{q + "-0"}) {
		t.Errorf("the new owner holds %v of %s, want its message once", got, q)
	}
	if n := cmdCalls(t, admins[1], "wait"); n != 1 {
		t.Errorf("the new owner got %d WAIT, want 1", n)
	}
	// The old owner refused the script and ran the WAIT of that first
	// pipeline: the redirect was met, not avoided by a fresh slot map.
	if n := cmdCalls(t, admins[0], "wait"); n != 1 {
		t.Errorf("the old owner got %d WAIT, want 1 (the pipeline it redirected)", n)
	}
}

// BenchmarkEnqueueWait compares enqueues with and without WAIT 1 on a
// master with one replica (StartSentinel), for one caller and for 64
// concurrent ones (whose calls the coalescer merges: one WAIT per flush).
//
//	go test -run x -bench EnqueueWait -benchtime 2s ./server/broker
func BenchmarkEnqueueWait(b *testing.B) {
	s := redistest.StartSentinel(b)
	mk := func(opts ...Option) *Broker {
		c := redis.NewFailoverClient(s.ServiceOptions())
		b.Cleanup(func() { _ = c.Close() })
		br := New(c, opts...)
		if err := br.LoadScripts(context.Background()); err != nil {
			b.Fatalf("LoadScripts: %v", err)
		}
		return br
	}
	payload := make([]byte, 100)
	for _, mode := range []struct {
		name string
		br   *Broker
	}{
		{"nowait", mk()},
		{"wait1", mk(WithEnqueueReplicas(1, time.Second))},
	} {
		b.Run("callers=1/"+mode.name, func(b *testing.B) {
			ctx := context.Background()
			m := []NewMessage{{Payload: payload}}
			for b.Loop() {
				if _, err := mode.br.EnqueueMany(ctx, "bench-"+mode.name, m); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("callers=64/"+mode.name, func(b *testing.B) {
			ctx := context.Background()
			b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
			b.RunParallel(func(pb *testing.PB) {
				m := []NewMessage{{Payload: payload}}
				for pb.Next() {
					if _, err := mode.br.EnqueueMany(ctx, "bench-par-"+mode.name, m); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
