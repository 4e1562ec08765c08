package server_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// Partial availability on Redis Cluster: one master of three is SIGKILLed
// and has no replica, on a cluster whose nodes run with
// cluster-require-full-coverage no, so that the other two keep serving
// their slots. The queues on the two healthy masters must keep working,
// those on the dead one fail with UNAVAILABLE, and everything works again
// once the node is back.
//
// The two global keys are in slots of their own: P qbridge:queues (the
// queue set) and P qbridge:due (the due index of delayed messages), and the
// instance's shared pub/sub connection goes to the node of the slot of
// "{qbridge}", where qbridge's own channels are. Each subtest kills another
// node: one that holds none of these, the node of the due index, and the
// node of the queue set. (With the empty prefix and three masters,
// qbridge:queues and "{qbridge}" share a node.)

// partialIdlePoll is the idle poll interval of the instance under test.
const partialIdlePoll = 100 * time.Millisecond

func TestPartialAvailability(t *testing.T) {
	t.Parallel()
	keys := broker.NewKeys("")
	for _, tc := range []struct {
		name string
		// victim picks the node to kill, or -1 when no node fits.
		victim func(queuesNode, dueNode, pubsubNode int) int
	}{
		{"a node without global keys", func(qn, dn, pn int) int {
			for i := 0; i < redistest.ClusterSize; i++ {
				if i != qn && i != dn && i != pn {
					return i
				}
			}
			return -1
		}},
		{"the node of the due index", func(_, dn, _ int) int { return dn }},
		{"the node of the queue set", func(qn, _, _ int) int { return qn }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := redistest.StartCluster(t, redistest.WithArgs("--cluster-require-full-coverage", "no"), redistest.WithAOF())
			qn, dn, pn := c.MasterOf(t, keys.Queues()), c.MasterOf(t, keys.Due()), c.MasterOf(t, "{qbridge}:events")
			victim := tc.victim(qn, dn, pn)
			if victim < 0 {
				t.Skipf("every node holds a global key (queue set on %d, due index on %d, pub/sub on %d)", qn, dn, pn)
			}
			t.Logf("queue set on node %d, due index on node %d, qbridge's pub/sub channels on node %d; killing node %d", qn, dn, pn, victim)
			runPartial(t, c, victim, victim == qn)
		})
	}
}

func runPartial(t *testing.T, c *redistest.Cluster, victim int, queueSetDead bool) {
	tp := &topology{name: "cluster", admin: c.Client(t), cluster: c}
	admin := tp.admin
	qs := tp.spread(t, "partial", redistest.ClusterSize) // one queue per node
	var deadQ string
	var healthy []string
	for _, q := range qs {
		if c.MasterOf(t, q) == victim {
			deadQ = q
		} else {
			healthy = append(healthy, q)
		}
	}
	if deadQ == "" || len(healthy) != redistest.ClusterSize-1 {
		t.Fatalf("queues %v: none or several on node %d", qs, victim)
	}
	heldQ := queueOnNode(t, c, "partial-held", victim)
	deadAddr := c.Node(victim).Addr()

	watch := newParkWatch()
	logs := &logCapture{}
	in := startPartial(t, c, watch, logs)

	// Every queue works, and then its consumer stream is parked: no
	// blocking waits, a wait slice of a minute, so that only the
	// announcements and the idle poller can wake it.
	streams := map[string]*stream{}
	for _, q := range qs {
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Minute)})
		streams[q] = s
		id := enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("before")})
		d := s.next(t, 10*time.Second)
		if d.GetId() != id {
			t.Fatalf("%s: got %v, want %s", q, d, id)
		}
		watch.mark(q)
		if err := ack(t, in.client, d); err != nil {
			t.Fatalf("%s: ack: %v", q, err)
		}
	}
	// A message of the node to kill, delivered and held across the outage.
	held := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: heldQ, MaxInFlight: 1, LeaseDuration: lease(2 * time.Minute)})
	heldID := enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: heldQ, Payload: []byte("held")})
	heldD := held.next(t, 10*time.Second)
	if heldD.GetId() != heldID {
		t.Fatalf("%s: got %v, want %s", heldQ, heldD, heldID)
	}
	for _, q := range qs {
		watch.waitParked(t, q, 10*time.Second)
	}
	// A message of a healthy node whose lease runs out during the outage:
	// the lease reaper must requeue it, even when the queue set's node is
	// the dead one.
	leaseQ := queueOnNode(t, c, "partial-lease", c.MasterOf(t, healthy[0]))
	leaser := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: leaseQ, MaxInFlight: 1, LeaseDuration: lease(time.Second)})
	leaseID := enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: leaseQ, Payload: []byte("lease")})
	if d := leaser.next(t, 10*time.Second); d.GetId() != leaseID || d.GetAttempt() != 1 {
		t.Fatalf("%s: got %v, want %s", leaseQ, d, leaseID)
	}
	// Delayed messages on every queue, due after the kill.
	for _, q := range qs {
		enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("delayed before"), Delay: durationpb.New(2 * time.Second)})
	}

	killedAt := time.Now()
	c.Kill(t, victim)

	// A plain LPUSH announces nothing: only the idle poller finds it,
	// while the dead node's queue is parked too.
	for _, q := range healthy {
		if err := admin.LPush(ctxT(t, 5*time.Second), q, "plain push").Err(); err != nil {
			t.Fatalf("LPUSH %s: %v", q, err)
		}
	}
	const bound = 15 * time.Second
	for _, q := range healthy {
		took := receiveAll(t, in.client, streams[q], bound, "plain push", "delayed before")
		t.Logf("%s (healthy): plain push and the delayed message delivered %v after the kill", q, took.Sub(killedAt).Round(time.Millisecond))
	}
	if d := leaser.next(t, bound); d.GetId() != leaseID || d.GetAttempt() != 2 {
		t.Errorf("%s: after its lease ran out got %v; want %s again (attempt 2)", leaseQ, d, leaseID)
	} else {
		t.Logf("%s (healthy): lease expired and redelivered %v after the kill", leaseQ, time.Since(killedAt).Round(time.Millisecond))
		if err := ack(t, in.client, d); err != nil {
			t.Errorf("%s: ack: %v", leaseQ, err)
		}
	}
	// The health check (qbridged pings with a 1 s timeout, and refuses
	// enqueues while it fails) passes: the other masters answer.
	pctx, pcancel := context.WithTimeout(context.Background(), time.Second)
	if err := in.srv.Ping(pctx); err != nil {
		t.Errorf("health ping with one master down: %v; want success (the other masters serve their queues)", err)
	}
	pcancel()
	// The metrics' and dashboard's snapshot has the healthy queues, and
	// says that the others could not be read.
	stats, _, err := in.srv.Snapshot(ctxT(t, 30*time.Second), 0)
	if !queueSetDead {
		got := map[string]bool{}
		for _, st := range stats {
			got[st.GetQueue()] = true
		}
		for _, q := range healthy {
			if !got[q] {
				t.Errorf("the snapshot lacks healthy queue %s (it has %d queues; err %v)", q, len(stats), err)
			}
		}
		if got[deadQ] || err == nil || !strings.Contains(err.Error(), "could not be read") {
			t.Errorf("snapshot with a dead node: has %s: %v, err %v; want it left out and an error saying so", deadQ, got[deadQ], err)
		}
	} else if err == nil {
		t.Errorf("snapshot with the queue set's node dead: no error")
	}
	// Enqueue, delayed enqueue, consume and ack through qbridge.
	for _, q := range healthy {
		start := time.Now()
		enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("after")})
		enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("delayed after"), Delay: durationpb.New(time.Second)})
		took := receiveAll(t, in.client, streams[q], bound, "after", "delayed after")
		t.Logf("%s (healthy): enqueue, delayed enqueue (1s) and acks done in %v", q, took.Sub(start).Round(time.Millisecond))
		if r := fullStats(t, in.client, q); r.GetReady() != 0 || r.GetInFlight() != 0 || r.GetDelayed() != 0 || r.GetCounters().GetAcked() != 5 {
			t.Errorf("%s: stats %v", q, r)
		}
	}

	// The dead node's queues: UNAVAILABLE, naming the node.
	unavailable := func(what string, err error) {
		t.Helper()
		msg := status.Convert(err).Message()
		if status.Code(err) != codes.Unavailable || !strings.Contains(msg, deadAddr) {
			t.Errorf("%s on the dead node's queue: %v; want UNAVAILABLE naming %s", what, err, deadAddr)
		}
		t.Logf("%s on the dead node's queue: %v", what, err)
	}
	_, err = in.client.Enqueue(ctxT(t, 20*time.Second), &qbridgev1.EnqueueRequest{Queue: deadQ, Payload: []byte("lost")})
	unavailable("Enqueue", err)
	_, err = in.client.GetQueueStats(ctxT(t, 20*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: deadQ})
	unavailable("GetQueueStats", err)
	_, err = in.client.Ack(ctxT(t, 20*time.Second), &qbridgev1.AckRequest{AckTokens: []string{heldD.GetAckToken()}})
	unavailable("Ack", err)

	// ListQueues reads the queue set only: it works while its node is
	// alive (and what it costs when it is not is logged).
	_, err = in.admin.ListQueues(ctxT(t, 20*time.Second), &qbridgev1.ListQueuesRequest{})
	if queueSetDead {
		t.Logf("ListQueues with the node of the queue set dead: %v", err)
	} else if err != nil {
		t.Errorf("ListQueues with the node of the queue set alive: %v", err)
	}

	// The failures of the background reads over many queues (the idle
	// poller, the promoter, the rates) are logged once per node and kind,
	// not per queue per tick.
	outage := time.Since(killedAt).Round(time.Second)
	for msg, n := range logs.counts(slog.LevelWarn, "") {
		t.Logf("logged %d times during the outage of %v: %q", n, outage, msg)
		background := false
		for _, p := range []string{"idle poller:", "promoter:", "rates:", "cannot index a delayed message", "lease reaper"} {
			background = background || strings.HasPrefix(msg, p)
		}
		if background && n > 1 {
			t.Errorf("%q logged %d times during the outage of %v", msg, n, outage)
		}
	}

	// Back: the held message is acked, the dead node's stream, parked
	// since before the kill, gets new messages, and the healthy queues
	// keep working.
	c.Restart(t, victim)
	backAt := time.Now()
	t.Logf("node %d back %v after the kill", victim, backAt.Sub(killedAt).Round(time.Millisecond))
	eventually(t, bound, "the held message acked after the restart", func() bool {
		r, err := in.client.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: []string{heldD.GetAckToken()}})
		return err == nil && r.GetAcked() == 1
	})
	t.Logf("the message held across the outage acked %v after the restart", time.Since(backAt).Round(time.Millisecond))
	for _, q := range qs {
		eventually(t, bound, q+" takes enqueues again", func() bool {
			_, err := in.client.Enqueue(ctxT(t, 5*time.Second), &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("back")})
			return err == nil
		})
		enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("delayed back"), Delay: durationpb.New(time.Second)})
	}
	t.Logf("every queue takes enqueues %v after the restart", time.Since(backAt).Round(time.Millisecond))
	for _, q := range qs {
		if q == deadQ { // and the one due during the outage
			receiveAll(t, in.client, streams[q], bound, "back", "delayed back", "delayed before")
		} else {
			receiveAll(t, in.client, streams[q], bound, "back", "delayed back")
		}
	}
	t.Logf("every queue delivered and promoted (1s delay) %v after the restart", time.Since(backAt).Round(time.Millisecond))
}

// queueOnNode returns a queue name starting with base whose keys are on
// cluster node i.
func queueOnNode(t *testing.T, c *redistest.Cluster, base string, i int) string {
	t.Helper()
	for n := 0; n < 10000; n++ {
		q := fmt.Sprintf("%s-%d", base, n)
		if c.MasterOf(t, broker.NewKeys("").Ready(q)) == i {
			return q
		}
	}
	t.Fatalf("no queue %s-N on node %d", base, i)
	return ""
}

// receiveAll receives one delivery per payload (in any order) on s within
// d, acks each, and returns when the last came.
func receiveAll(t *testing.T, c qbridgev1.QueueServiceClient, s *stream, d time.Duration, payloads ...string) time.Time {
	t.Helper()
	want := slices.Clone(payloads)
	deadline := time.After(d)
	for len(want) > 0 {
		select {
		case dl, ok := <-s.ch:
			if !ok {
				t.Fatalf("stream ended: %v", <-s.errc)
			}
			i := slices.Index(want, string(dl.GetPayload()))
			if i < 0 {
				t.Fatalf("%s: unexpected delivery %q (%s); still waiting for %q", dl.GetQueue(), dl.GetPayload(), dl.GetId(), want)
			}
			want = slices.Delete(want, i, i+1)
			if err := ack(t, c, dl); err != nil {
				t.Fatalf("%s: ack %q: %v", dl.GetQueue(), dl.GetPayload(), err)
			}
		case <-deadline:
			t.Fatalf("not delivered within %v: %q", d, want)
		}
	}
	return time.Now()
}

// startPartial runs a qbridge instance on c like qbridged's: cluster
// clients as the service user with a slot map reloaded every second. Its
// idle queues all park (no blocking waits) and are polled every
// partialIdlePoll; a parked dispatcher's wait slice is a minute. watch sees
// the main client's pipelines, logs what the server logs.
func startPartial(t *testing.T, c *redistest.Cluster, watch *parkWatch, logs *logCapture) *topoInstance {
	t.Helper()
	mk := func(pool int) *redis.ClusterClient {
		o := c.ServiceOptions()
		o.DialTimeout = time.Second
		o.ContextTimeoutEnabled = true
		o.DisableIdentity = true // no CLIENT SETINFO: the ACL does not allow it
		o.PoolSize = pool
		o.ClusterStateReloadInterval = failoverReloadInterval
		return redis.NewClusterClient(o)
	}
	main := mk(0)
	main.AddHook(watch)
	return serveOn(t, main, mk(server.DefaultBlockingWaits+2), nil,
		server.WithIdleQueues(0, partialIdlePoll), server.WithWaitSlice(time.Minute),
		server.WithLogger(slog.New(logs)))
}

// parkWatch tells when a queue's dispatcher is parked: a parked dispatcher
// reads its queue's length (LLEN in a pipeline) once after parking, and
// the idle poller reads only parked queues, so a pipelined LLEN of the
// queue that read 0 and began after mark (called when the dispatcher can
// be neither parked nor about to read the length, e.g. while its only
// consumer holds a message) means the dispatcher is parked, and stays so
// until something wakes it.
type parkWatch struct {
	tick atomic.Int64

	mu     sync.Mutex
	marked map[string]int64
	parked map[string]bool
}

func newParkWatch() *parkWatch {
	return &parkWatch{marked: map[string]int64{}, parked: map[string]bool{}}
}

func (w *parkWatch) mark(queue string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.marked[queue] = w.tick.Add(1)
	w.parked[queue] = false
}

func (w *parkWatch) waitParked(t *testing.T, queue string, within time.Duration) {
	t.Helper()
	eventually(t, within, queue+" parked", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.parked[queue]
	})
}

func (w *parkWatch) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (w *parkWatch) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (w *parkWatch) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		began := w.tick.Load()
		err := next(ctx, cmds)
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, c := range cmds {
			ic, ok := c.(*redis.IntCmd)
			if !ok || c.Name() != "llen" || len(c.Args()) != 2 || ic.Err() != nil || ic.Val() != 0 {
				continue
			}
			q, _ := c.Args()[1].(string) // the empty prefix: the key is the queue
			if m, ok := w.marked[q]; ok && began >= m {
				w.parked[q] = true
			}
		}
		return err
	}
}

// logCapture is a slog.Handler that keeps every record.
type logCapture struct {
	mu   sync.Mutex
	recs []capturedLog
}

type capturedLog struct {
	level slog.Level
	msg   string
	text  string // the message and every attribute
}

func (l *logCapture) Enabled(context.Context, slog.Level) bool { return true }
func (l *logCapture) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	l.mu.Lock()
	l.recs = append(l.recs, capturedLog{level: r.Level, msg: r.Message, text: b.String()})
	l.mu.Unlock()
	return nil
}
func (l *logCapture) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logCapture) WithGroup(string) slog.Handler      { return l }

// counts returns how many records of at least level mention part, per
// message.
func (l *logCapture) counts(level slog.Level, part string) map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for _, r := range l.recs {
		if r.level >= level && strings.Contains(r.text, part) {
			out[r.msg]++
		}
	}
	return out
}
