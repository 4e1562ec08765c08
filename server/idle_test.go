package server

// Tests of idle queues (idle.go): a bounded number of blocking BLMOVE slots,
// the other empty queues parked without a connection and woken by "ready"
// announcements or the poller.
//
// These tests are in package server, unlike the harness in harness_test.go
// (package server_test), because they read the idle state directly
// (idleQueues.counts and the parked set). They start their own small
// instance against a private redistest server, on loopback only.
//
// Most instances use a wait slice of an hour, so that the only ways a parked
// dispatcher can wake within a test are the ones under test (announcement,
// poller, kick), and a blocking wait only returns when Redis wakes it.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/broker"
)

// idleSrvName is the CLIENT SETNAME of every connection of the server's own
// Redis client, so CLIENT LIST can tell them from the test's.
const idleSrvName = "qbridge-idle-srv"

// idleInst is one in-process qbridge server on a loopback port.
type idleInst struct {
	s      *Server
	rdb    *redis.Client // the server's client
	plain  *redis.Client // the test's own client (legacy producer, CLIENT LIST, ...)
	client qbridgev1.QueueServiceClient
}

func startIdleInstance(t *testing.T, rs *redistest.Server, opts ...Option) *idleInst {
	t.Helper()
	ro := rs.ServiceOptions(0) // the least-privilege user qbridge runs as
	ro.MaxRetries, ro.DialTimeout, ro.ClientName = -1, time.Second, idleSrvName
	rdb := redis.NewClient(ro)
	b := broker.New(rdb)
	all := append([]Option{
		WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		WithReapInterval(100 * time.Millisecond),
		WithWaitSlice(time.Hour),
	}, opts...)
	s := New(b, all...)
	s.Start()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	qbridgev1.RegisterQueueServiceServer(gs, s)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	in := &idleInst{s: s, rdb: rdb, plain: rs.Client(t, 0), client: qbridgev1.NewQueueServiceClient(conn)}
	t.Cleanup(func() {
		s.StopStreams()
		gs.Stop()
		s.Close()
		_ = conn.Close()
		_ = rdb.Close()
	})
	// The events channel must be subscribed before anything relies on an
	// announcement.
	ctx := idleCtx(t, 10*time.Second)
	ch := b.Keys().Channel(eventsChannel)
	idleWaitFor(t, 10*time.Second, "the server subscribed to the events channel", func() bool {
		n, err := in.plain.PubSubNumSub(ctx, ch).Result()
		return err == nil && n[ch] >= 1
	})
	return in
}

func idleCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// idleWaitFor checks cond every few milliseconds until it holds, failing
// the test at the deadline.
func idleWaitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for: %s", within, what)
		}
		<-tick.C
	}
}

// idleState reads the blocking count and the parked queues at one instant.
func (in *idleInst) idleState() (blocking int, parked []string) {
	iq := in.s.idleQueues
	iq.mu.Lock()
	defer iq.mu.Unlock()
	for q := range iq.parked {
		parked = append(parked, q)
	}
	sort.Strings(parked)
	return in.s.opts.blockingWaits - iq.free, parked
}

// waitCounts waits until iq.counts() reports blocking and parked.
func (in *idleInst) waitCounts(t *testing.T, within time.Duration, blocking, parked int) {
	t.Helper()
	var b, p int
	deadline := time.Now().Add(within)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		b, p = in.s.idleQueues.counts()
		if b == blocking && p == parked {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: counts() = %d blocking, %d parked; want %d, %d", within, b, p, blocking, parked)
		}
		<-tick.C
	}
}

// waiting reads which of the instance's dispatchers are really waiting
// right now, from their goroutines' stacks: blocked in BLMOVE, or parked in
// waitReady's select. (counts() alone also includes a dispatcher that has
// just parked or taken a slot and is about to look at its queue again, for
// instance because of the kick left over from a stream attaching.)
func (in *idleInst) waiting() (blocked, parked []string) {
	byPtr := map[string]string{}
	in.s.mu.Lock()
	for q, d := range in.s.dispatchers {
		byPtr[fmt.Sprintf("%p", d)] = q
	}
	in.s.mu.Unlock()
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	const frame = "github.com/qbridge/qbridge/server.(*dispatcher).waitReady("
	for _, g := range strings.Split(string(buf), "\n\n") {
		i := strings.Index(g, frame)
		if i < 0 {
			continue
		}
		ptr, _, _ := strings.Cut(g[i+len(frame):], ",")
		q, ok := byPtr[strings.TrimSuffix(ptr, ")")]
		if !ok {
			continue
		}
		header, rest, _ := strings.Cut(g, "\n")
		_, state, _ := strings.Cut(header, "[")
		switch {
		case strings.HasPrefix(state, "select") && strings.HasPrefix(rest, frame):
			parked = append(parked, q)
		case strings.HasPrefix(state, "IO wait") && strings.Contains(g, "broker.(*Broker).WaitReady("):
			blocked = append(blocked, q)
		}
	}
	sort.Strings(blocked)
	sort.Strings(parked)
	return blocked, parked
}

// waitSettled waits until counts() reports blocking and parked and every
// one of those dispatchers is actually waiting (see waiting), and returns
// the queues blocked in Redis and the parked ones.
func (in *idleInst) waitSettled(t *testing.T, within time.Duration, blocking, parked int) (blockedQs, parkedQs []string) {
	t.Helper()
	in.waitCounts(t, within, blocking, parked)
	idleWaitFor(t, within, fmt.Sprintf("%d dispatchers blocked in BLMOVE and %d parked in select", blocking, parked), func() bool {
		b, p := in.s.idleQueues.counts()
		if b != blocking || p != parked {
			return false
		}
		blockedQs, parkedQs = in.waiting()
		_, iqParked := in.idleState()
		return len(blockedQs) == blocking && len(parkedQs) == parked && slices.Equal(parkedQs, iqParked)
	})
	return blockedQs, parkedQs
}

// dispatched lists the queues with a dispatcher.
func (in *idleInst) dispatched() []string {
	qs := in.s.dispatchedQueues()
	sort.Strings(qs)
	return qs
}

func (in *idleInst) enqueue(t *testing.T, queue, payload string) string {
	t.Helper()
	resp, err := in.client.Enqueue(idleCtx(t, 10*time.Second), &qbridgev1.EnqueueRequest{Queue: queue, Payload: []byte(payload)})
	if err != nil {
		t.Fatalf("enqueue to %s: %v", queue, err)
	}
	return resp.GetId()
}

// idleStream is a Consume stream with a reader goroutine feeding deliveries.
type idleStream struct {
	queue  string
	cancel context.CancelFunc
	ch     chan *qbridgev1.Delivery
	errc   chan error // the error that ended the stream, then closed
}

func (in *idleInst) consume(t *testing.T, queue string) *idleStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := in.client.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue})
	if err != nil {
		cancel()
		t.Fatalf("consume %s: %v", queue, err)
	}
	s := &idleStream{queue: queue, cancel: cancel, ch: make(chan *qbridgev1.Delivery, 1000), errc: make(chan error, 1)}
	go func() {
		for {
			resp, err := st.Recv()
			if err != nil {
				s.errc <- err
				close(s.errc)
				close(s.ch)
				return
			}
			for _, d := range resp.GetDeliveries() {
				s.ch <- d
			}
		}
	}()
	t.Cleanup(cancel)
	return s
}

// next waits for one delivery.
func (s *idleStream) next(t *testing.T, within time.Duration) *qbridgev1.Delivery {
	t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	select {
	case d, ok := <-s.ch:
		if !ok {
			t.Fatalf("stream on %s ended: %v", s.queue, <-s.errc)
		}
		return d
	case <-timer.C:
		t.Fatalf("stream on %s: no delivery within %v", s.queue, within)
	}
	return nil
}

// noneWithin asserts that nothing is delivered for d.
func (s *idleStream) noneWithin(t *testing.T, d time.Duration) {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case got, ok := <-s.ch:
		if !ok {
			t.Fatalf("stream on %s ended: %v", s.queue, <-s.errc)
		}
		t.Fatalf("stream on %s: unexpected delivery %q (payload %q) within %v", s.queue, got.GetId(), got.GetPayload(), d)
	case <-timer.C:
	}
}

// none asserts that nothing has been delivered so far.
func (s *idleStream) none(t *testing.T) {
	t.Helper()
	select {
	case got, ok := <-s.ch:
		if !ok {
			t.Fatalf("stream on %s ended: %v", s.queue, <-s.errc)
		}
		t.Fatalf("stream on %s: unexpected delivery %q (payload %q)", s.queue, got.GetId(), got.GetPayload())
	default:
	}
}

// end waits for the stream to end and returns why.
func (s *idleStream) end(t *testing.T, within time.Duration) error {
	t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	select {
	case err := <-s.errc:
		return err
	case <-timer.C:
		t.Fatalf("stream on %s still open after %v", s.queue, within)
	}
	return nil
}

func (s *idleStream) open() bool {
	select {
	case <-s.errc:
		return false
	default:
		return true
	}
}

func idleAck(t *testing.T, in *idleInst, d *qbridgev1.Delivery) {
	t.Helper()
	if _, err := in.client.Ack(idleCtx(t, 10*time.Second), &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
		t.Fatalf("ack %s: %v", d.GetId(), err)
	}
}

// onlyOther returns the element of two that is not x.
func onlyOther(two []string, x string) string {
	if two[0] == x {
		return two[1]
	}
	return two[0]
}

// 1. Parked queues are woken by qbridge's own enqueues through the "ready"
// announcement: the poller (1h) and the wait slice (1h) cannot be what
// delivers, and each stream gets exactly its own queue's message.
func TestIdleParkedQueuesWokenByEnqueue(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(1, time.Hour))
	const n = 50
	queues := make([]string, n)
	streams := make([]*idleStream, n)
	for i := range queues {
		queues[i] = fmt.Sprintf("idle-wake-%02d", i)
		streams[i] = in.consume(t, queues[i])
	}
	in.waitSettled(t, 20*time.Second, 1, n-1)

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, q := range queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("for " + q)}); err != nil {
				errs <- fmt.Errorf("enqueue to %s: %v", q, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i, s := range streams {
		d := s.next(t, 15*time.Second)
		if got, want := string(d.GetPayload()), "for "+queues[i]; got != want || d.GetQueue() != queues[i] {
			t.Fatalf("stream on %s got %q from queue %q; want %q", queues[i], got, d.GetQueue(), want)
		}
	}
	t.Logf("%d parked or blocked queues all delivered %v after the first enqueue", n, time.Since(start).Round(time.Millisecond))
	// Every dispatcher goes back to waiting, with the one slot still
	// taken, and nothing more arrives.
	in.waitSettled(t, 10*time.Second, 1, n-1)
	for _, s := range streams {
		s.none(t)
	}
}

// 2. A plain LPUSH (a legacy producer: no envelope, no announcement) to a
// parked queue is found by the poller, and delivered wrapped.
func TestIdleParkedPlainPushFoundByPoller(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(1, 50*time.Millisecond))
	streams := map[string]*idleStream{}
	for i := 0; i < 4; i++ {
		q := "idle-poll-" + strconv.Itoa(i)
		streams[q] = in.consume(t, q)
	}
	_, parked := in.waitSettled(t, 10*time.Second, 1, 3)
	p := parked[rand.IntN(len(parked))]
	ctx := idleCtx(t, 10*time.Second)
	start := time.Now()
	if err := in.plain.LPush(ctx, p, "legacy for "+p).Err(); err != nil {
		t.Fatal(err)
	}
	d := streams[p].next(t, 5*time.Second)
	t.Logf("plain LPUSH to parked %s delivered after %v", p, time.Since(start).Round(time.Millisecond))
	if string(d.GetPayload()) != "legacy for "+p || d.GetQueue() != p || !strings.HasPrefix(d.GetId(), "raw-") || d.GetAttempt() != 1 || d.GetAckToken() == "" {
		t.Fatalf("legacy element delivered as %v", d)
	}
	idleAck(t, in, d)
	if n := in.plain.LLen(ctx, p).Val(); n != 0 {
		t.Fatalf("%d elements left in %s", n, p)
	}
	for q, s := range streams {
		if q != p {
			s.none(t)
		}
	}
	in.waitSettled(t, 10*time.Second, 1, 3)
}

// 2b. The same plain LPUSH with the poller effectively off is not delivered:
// a plain push announces nothing, so it really was the poller above. A
// qbridge Enqueue to the queue afterwards then delivers both, the LPUSHed
// message first.
func TestIdleParkedPlainPushNotAnnounced(t *testing.T) {
	rs := redistest.Start(t)
	const slice = 3 * time.Second
	in := startIdleInstance(t, rs, WithIdleQueues(1, time.Hour), WithWaitSlice(slice))
	before := time.Now() // no dispatcher's wait slice can end before before+slice
	streams := map[string]*idleStream{}
	for i := 0; i < 4; i++ {
		q := "idle-quiet-" + strconv.Itoa(i)
		streams[q] = in.consume(t, q)
	}
	_, parked := in.waitSettled(t, 10*time.Second, 1, 3)
	p := parked[rand.IntN(len(parked))]
	ctx := idleCtx(t, 20*time.Second)
	if err := in.plain.LPush(ctx, p, "legacy for "+p).Err(); err != nil {
		t.Fatal(err)
	}
	streams[p].noneWithin(t, 500*time.Millisecond)
	if el := time.Since(before); el > slice-200*time.Millisecond {
		t.Fatalf("the quiet window ended %v after the streams started, too close to the %v wait slice to tell", el, slice)
	}
	enqueued := time.Now()
	id := in.enqueue(t, p, "qbridge for "+p)
	first := streams[p].next(t, slice+5*time.Second)
	latency := time.Since(enqueued)
	second := streams[p].next(t, 5*time.Second)
	if string(first.GetPayload()) != "legacy for "+p || string(second.GetPayload()) != "qbridge for "+p || second.GetId() != id {
		t.Fatalf("got %q then %q (id %s); want the LPUSHed message, then the enqueued one (id %s)",
			first.GetPayload(), second.GetPayload(), second.GetId(), id)
	}
	// Not asserted, reported: the enqueue found the list non-empty, so it
	// announced nothing either; what delivered both was the parked
	// dispatcher's wait slice ending.
	t.Logf("enqueue after the unannounced LPUSH delivered both after %v (wait slice %v, poll 1h)", latency.Round(time.Millisecond), slice)
	for q, s := range streams {
		if q != p {
			s.none(t)
		}
	}
}

// 3. An announcement lost with the pub/sub connection (CLIENT KILL TYPE
// pubsub) is made up for by the poller; so is a push that announces nothing
// (a plain RPUSH of a qbridge envelope).
func TestIdleParkedLostAnnouncementRecoveredByPoller(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(1, 50*time.Millisecond))
	streams := map[string]*idleStream{}
	for i := 0; i < 4; i++ {
		q := "idle-lost-" + strconv.Itoa(i)
		streams[q] = in.consume(t, q)
	}
	_, parked := in.waitSettled(t, 10*time.Second, 1, 3)
	ctx := idleCtx(t, 20*time.Second)

	// Kill the pub/sub connection, then enqueue at once.
	p := parked[0]
	killed, err := in.plain.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Int()
	if err != nil || killed < 1 {
		t.Fatalf("CLIENT KILL TYPE pubsub = %d, %v", killed, err)
	}
	// Whether go-redis had resubscribed yet is a race; either way the
	// delivery must come within the poll interval plus slack.
	subs, _ := in.plain.PubSubNumSub(ctx, in.s.b.Keys().Channel(eventsChannel)).Result()
	start := time.Now()
	id := in.enqueue(t, p, "after kill")
	d := streams[p].next(t, 5*time.Second)
	if d.GetId() != id || string(d.GetPayload()) != "after kill" {
		t.Fatalf("got %v; want id %s", d, id)
	}
	t.Logf("enqueue right after the pub/sub connection was killed (events subscribers just before: %d) delivered after %v",
		subs[in.s.b.Keys().Channel(eventsChannel)], time.Since(start).Round(time.Millisecond))

	// A qbridge envelope pushed with a plain RPUSH announces nothing: take
	// one from a queue nobody consumes and move it to another parked queue.
	_, parked = in.waitSettled(t, 10*time.Second, 1, 3)
	q := parked[len(parked)-1]
	srcID := in.enqueue(t, "idle-lost-src", "moved envelope")
	el, err := in.plain.LPop(ctx, "idle-lost-src").Result()
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := in.plain.RPush(ctx, q, el).Err(); err != nil {
		t.Fatal(err)
	}
	d = streams[q].next(t, 5*time.Second)
	if d.GetId() != srcID || string(d.GetPayload()) != "moved envelope" {
		t.Fatalf("RPUSHed envelope delivered as %v; want id %s", d, srcID)
	}
	t.Logf("plain RPUSH of an envelope to parked %s delivered after %v", q, time.Since(start).Round(time.Millisecond))
	for name, s := range streams {
		if name != p && name != q {
			s.none(t)
		}
	}
}

// clientInfo is one line of CLIENT LIST.
type clientInfo map[string]string

func clientList(t *testing.T, c *redis.Client) []clientInfo {
	t.Helper()
	out, err := c.ClientList(idleCtx(t, 10*time.Second)).Result()
	if err != nil {
		t.Fatal(err)
	}
	var list []clientInfo
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		ci := clientInfo{}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, "="); ok {
				ci[k] = v
			}
		}
		list = append(list, ci)
	}
	return list
}

// 4. Hundreds of idle queues on one instance cost the blocking slots, the
// pub/sub connection and the pools, not a connection each.
func TestIdleParkedConnectionsBounded(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(2, 100*time.Millisecond))
	const n = 300
	streams := make(map[string]*idleStream, n)
	for i := 0; i < n; i++ {
		q := fmt.Sprintf("idle-many-%03d", i)
		streams[q] = in.consume(t, q)
	}
	in.waitSettled(t, 30*time.Second, 2, n-2)
	ctx := idleCtx(t, 30*time.Second)
	idleWaitFor(t, 10*time.Second, "2 clients blocked in Redis", func() bool {
		info, err := in.plain.Info(ctx, "clients").Result()
		return err == nil && strings.Contains(info, "blocked_clients:2\r\n")
	})
	opt := in.rdb.Options()
	// Main pool, pipeline pool (ReadyLengths pipelines), pub/sub connection.
	pipelinePool := opt.PipelinePoolSize // 0: go-redis's default; negative: none
	if pipelinePool == 0 {
		pipelinePool = redis.DefaultPipelinePoolSize
	}
	bound := opt.PoolSize + max(pipelinePool, 0) + 1
	var total, blocked, blmove int
	for _, c := range clientList(t, in.plain) {
		if c["name"] != idleSrvName {
			continue
		}
		total++
		if strings.Contains(c["flags"], "b") {
			blocked++
		}
		if c["cmd"] == "blmove" {
			blmove++
		}
	}
	t.Logf("%d idle queues: %d server connections (bound %d: pool %d + pipeline pool %d + pub/sub), %d blocked, %d last ran BLMOVE",
		n, total, bound, opt.PoolSize, pipelinePool, blocked, blmove)
	if blocked != 2 || blmove > 2 {
		t.Fatalf("%d server connections blocked, %d ran BLMOVE; want 2 and at most 2", blocked, blmove)
	}
	if total > bound || total >= n/4 {
		t.Fatalf("%d server connections for %d idle queues; want at most %d", total, n, bound)
	}
	// Still served: one more message to a random one of them.
	qs := make([]string, 0, n)
	for q := range streams {
		qs = append(qs, q)
	}
	q := qs[rand.IntN(len(qs))]
	id := in.enqueue(t, q, "one more")
	if d := streams[q].next(t, 10*time.Second); d.GetId() != id || d.GetQueue() != q {
		t.Fatalf("got %v; want id %s from %s", d, id, q)
	}
}

// 5. The blocking slot: a plain LPUSH to the queue that holds it is
// delivered at once (BLMOVE wakes; nothing else could within the test), and
// once its dispatcher goes away the slot passes to the other queue at once
// (a dispatcher that goes away wakes a parked queue), so a plain LPUSH reaches that one
// too.
func TestIdleSlotHandover(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(1, time.Hour))
	ctx := idleCtx(t, 20*time.Second)
	streams := map[string]*idleStream{
		"idle-slot-a": in.consume(t, "idle-slot-a"),
		"idle-slot-b": in.consume(t, "idle-slot-b"),
	}
	blocked, parked := in.waitSettled(t, 10*time.Second, 1, 1)
	o, h := parked[0], blocked[0]

	if err := in.plain.LPush(ctx, h, "plain to holder").Err(); err != nil {
		t.Fatal(err)
	}
	d := streams[h].next(t, 5*time.Second)
	if string(d.GetPayload()) != "plain to holder" {
		t.Fatalf("holder %s got %q", h, d.GetPayload())
	}
	// Once served, the holder waits again: one of the two holds the slot,
	// the other parks.
	blocked, parked = in.waitSettled(t, 10*time.Second, 1, 1)
	h, o = blocked[0], parked[0]
	idleAck(t, in, d)

	// End the holder's stream. Its dispatcher sits in BLMOVE until a push
	// wakes it (the wait slice is an hour); then it finds no stream and
	// goes, and the slot it frees wakes the parked queue, which takes it.
	streams[h].cancel()
	streams[h].end(t, 5*time.Second)
	if err := in.plain.LPush(ctx, h, "wake the holder").Err(); err != nil {
		t.Fatal(err)
	}
	idleWaitFor(t, 10*time.Second, "only "+o+" dispatched", func() bool {
		ds := in.dispatched()
		return len(ds) == 1 && ds[0] == o
	})
	if blocked, _ := in.waitSettled(t, 10*time.Second, 1, 0); blocked[0] != o {
		t.Fatalf("blocked %v; want [%s]", blocked, o)
	}
	if n := in.plain.LLen(ctx, h).Val(); n != 1 {
		t.Fatalf("%s holds %d elements; want the 1 pushed after its stream ended", h, n)
	}
	// ...so a plain LPUSH, which the poller (1h) would not see in time,
	// reaches it at once.
	if err := in.plain.LPush(ctx, o, "plain to new holder").Err(); err != nil {
		t.Fatal(err)
	}
	if d := streams[o].next(t, 5*time.Second); string(d.GetPayload()) != "plain to new holder" {
		t.Fatalf("new holder %s got %q", o, d.GetPayload())
	}
}

// 5b. With a short wait slice the slot passes by itself: the queue left
// idle takes it within a couple of slices after the other's stream ends.
func TestIdleSlotHandoverBySlice(t *testing.T) {
	rs := redistest.Start(t)
	const slice = time.Second
	in := startIdleInstance(t, rs, WithIdleQueues(1, time.Hour), WithWaitSlice(slice))
	streams := map[string]*idleStream{
		"idle-slice-a": in.consume(t, "idle-slice-a"),
		"idle-slice-b": in.consume(t, "idle-slice-b"),
	}
	// End the stream of the queue holding the slot (at this instant; the
	// slot may change hands at a slice boundary, which only makes the
	// handover below come sooner).
	blocked, _ := in.waitSettled(t, 10*time.Second, 1, 1)
	holder := blocked[0]
	rest := onlyOther([]string{"idle-slice-a", "idle-slice-b"}, holder)
	streams[holder].cancel()
	streams[holder].end(t, 5*time.Second)
	start := time.Now()
	// The ended queue's dispatcher leaves within one slice (its blocking
	// wait or its parked timer ends); the slot it frees wakes the other,
	// which takes it.
	if blocked, _ := in.waitSettled(t, 2*slice+5*time.Second, 1, 0); blocked[0] != rest {
		t.Fatalf("blocked %v; want [%s]", blocked, rest)
	}
	idleWaitFor(t, 2*slice+5*time.Second, "only "+rest+" dispatched", func() bool {
		ds := in.dispatched()
		return len(ds) == 1 && ds[0] == rest
	})
	t.Logf("slot handed over from %s to %s %v after the stream ended (slice %v)", holder, rest, time.Since(start).Round(time.Millisecond), slice)
	// Holding it, the queue gets a plain LPUSH, which the poller (1h)
	// would not see in time.
	if err := in.plain.LPush(idleCtx(t, 10*time.Second), rest, "plain").Err(); err != nil {
		t.Fatal(err)
	}
	if d := streams[rest].next(t, 5*time.Second); string(d.GetPayload()) != "plain" {
		t.Fatalf("got %q", d.GetPayload())
	}
}

// 6. A stream that ends while its queue is parked takes its dispatcher
// with it at once (the kick wakes the parked wait), the queue is unparked,
// and nothing is left running.
func TestIdleParkedStreamEndUnparks(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(1, time.Hour))
	in.consume(t, "idle-end-holder") // takes the blocking slot
	in.waitSettled(t, 10*time.Second, 1, 0)
	snapshot := goleak.IgnoreCurrent()

	s := in.consume(t, "idle-end-parked")
	if _, parked := in.waitSettled(t, 10*time.Second, 1, 1); parked[0] != "idle-end-parked" {
		t.Fatalf("parked %v; want [idle-end-parked]", parked)
	}
	s.cancel()
	if err := s.end(t, 5*time.Second); status.Code(err) != codes.Canceled {
		t.Fatalf("stream ended with %v; want CANCELED", err)
	}
	// Far below the hour-long wait slice and poll.
	in.waitSettled(t, 5*time.Second, 1, 0)
	idleWaitFor(t, 5*time.Second, "the parked queue's dispatcher gone", func() bool {
		ds := in.dispatched()
		return len(ds) == 1 && ds[0] == "idle-end-holder"
	})
	deadline := time.Now().Add(5 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for goleak.Find(snapshot) != nil && time.Now().Before(deadline) {
		<-tick.C
	}
	goleak.VerifyNone(t, snapshot)
}

// 7. A parked queue whose key is overwritten with a string: the poller
// counts it as non-empty, its dispatcher finds out, and its streams end with
// FAILED_PRECONDITION. The other queue is untouched.
func TestIdleParkedWrongType(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(1, 50*time.Millisecond))
	ctx := idleCtx(t, 20*time.Second)
	streams := map[string]*idleStream{
		"idle-wt-a": in.consume(t, "idle-wt-a"),
		"idle-wt-b": in.consume(t, "idle-wt-b"),
	}
	_, parked := in.waitSettled(t, 10*time.Second, 1, 1)
	p := parked[0]
	other := onlyOther([]string{"idle-wt-a", "idle-wt-b"}, p)
	second := in.consume(t, p) // a second stream on the parked queue
	idleWaitFor(t, 5*time.Second, "two streams on "+p, func() bool {
		in.s.mu.Lock()
		defer in.s.mu.Unlock()
		d := in.s.dispatchers[p]
		return d != nil && len(d.consumers) == 2
	})
	// Attaching kicked the dispatcher: let it park again.
	if _, parked := in.waitSettled(t, 10*time.Second, 1, 1); parked[0] != p {
		t.Fatalf("parked %v; want [%s]", parked, p)
	}
	if err := in.plain.Set(ctx, p, "not a list", 0).Err(); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*idleStream{streams[p], second} {
		err := s.end(t, 5*time.Second)
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "not a list") {
			t.Fatalf("stream on %s ended with %v; want FAILED_PRECONDITION about the key not being a list", p, err)
		}
	}
	if blocked, _ := in.waitSettled(t, 5*time.Second, 1, 0); blocked[0] != other {
		t.Fatalf("blocked %v; want [%s]", blocked, other)
	}
	idleWaitFor(t, 5*time.Second, "only "+other+" dispatched", func() bool {
		ds := in.dispatched()
		return len(ds) == 1 && ds[0] == other
	})
	if !streams[other].open() {
		t.Fatalf("stream on %s ended: %v", other, <-streams[other].errc)
	}
	id := in.enqueue(t, other, "still served")
	if d := streams[other].next(t, 5*time.Second); d.GetId() != id {
		t.Fatalf("got %v; want id %s", d, id)
	}
}

// pushBeforePark is a go-redis hook on the server's client: once armed, right
// after the next script run on queue (the dispatcher's look at it) while the
// queue is not parked, it pushes an element with a plain RPUSH, which
// announces nothing. That is a push between the dispatcher's last look and
// its parking.
type pushBeforePark struct {
	in    *idleInst
	queue string
	armed atomic.Bool
	fired atomic.Bool
}

func (h *pushBeforePark) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *pushBeforePark) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		h.after(cmd)
		return err
	}
}

func (h *pushBeforePark) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		for _, cmd := range cmds {
			h.after(cmd)
		}
		return err
	}
}

func (h *pushBeforePark) after(cmd redis.Cmder) {
	if name := cmd.Name(); name != "evalsha" && name != "eval" {
		return
	}
	if args := cmd.Args(); cmd.Err() != nil || len(args) < 4 || fmt.Sprint(args[3]) != h.queue {
		return
	}
	iq := h.in.s.idleQueues
	iq.mu.Lock()
	_, parked := iq.parked[h.queue]
	iq.mu.Unlock()
	if parked || !h.armed.CompareAndSwap(true, false) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.in.plain.RPush(ctx, h.queue, "pushed before park").Err(); err == nil {
		h.fired.Store(true)
	}
}

// 8. A push that lands after the dispatcher found its queue empty but
// before it parked is not missed: parking looks at the length once more.
// Neither the poller nor the wait slice (an hour each) nor an announcement
// (a plain push makes none) could deliver it otherwise.
func TestIdleParkRechecksAfterParking(t *testing.T) {
	rs := redistest.Start(t)
	in := startIdleInstance(t, rs, WithIdleQueues(1, time.Hour), WithReapInterval(time.Hour))
	const q = "idle-recheck"
	in.consume(t, "idle-recheck-decoy") // holds the blocking slot
	in.waitSettled(t, 10*time.Second, 1, 0)
	first := in.consume(t, q)
	if _, parked := in.waitSettled(t, 10*time.Second, 1, 1); parked[0] != q {
		t.Fatalf("parked %v; want [%s]", parked, q)
	}
	h := &pushBeforePark{in: in, queue: q}
	in.rdb.AddHook(h)
	h.armed.Store(true)
	// A second stream kicks the parked dispatcher: it looks at the queue
	// (empty), the hook pushes, then it parks.
	second := in.consume(t, q)
	timer := time.NewTimer(5 * time.Second)
	defer timer.Stop()
	var d *qbridgev1.Delivery
	select {
	case d = <-first.ch:
	case d = <-second.ch:
	case <-timer.C:
		t.Fatalf("not delivered within 5s (hook fired: %v): a push just before parking was missed", h.fired.Load())
	}
	if !h.fired.Load() {
		t.Fatal("delivered, but the hook never pushed")
	}
	if d == nil || string(d.GetPayload()) != "pushed before park" {
		t.Fatalf("got %v", d)
	}
}
