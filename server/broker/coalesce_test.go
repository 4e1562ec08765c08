package broker

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const coalesceTestTimeout = 10 * time.Second

// testCtx is a context for one test, bounded so that a hang fails fast.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), coalesceTestTimeout)
	t.Cleanup(cancel)
	return ctx
}

// newTestBroker starts a private redis-server and returns a broker over it
// (as the least-privilege user qbridge runs as, with the scripts loaded)
// and a plain client (default user) on the same server.
func newTestBroker(t *testing.T, opts ...Option) (*Broker, *redis.Client) {
	t.Helper()
	srv := redistest.Start(t)
	rdb := srv.Client(t, 0)
	svc := redis.NewClient(srv.ServiceOptions(0))
	t.Cleanup(func() { _ = svc.Close() })
	b := New(svc, opts...)
	if err := b.LoadScripts(testCtx(t)); err != nil {
		t.Fatalf("LoadScripts: %v", err)
	}
	return b, rdb
}

// resetStats zeroes the command statistics of the private Redis.
func resetStats(t *testing.T, rdb *redis.Client) {
	t.Helper()
	if err := rdb.ConfigResetStat(testCtx(t)).Err(); err != nil {
		t.Fatalf("CONFIG RESETSTAT: %v", err)
	}
}

// cmdCalls returns how many times Redis ran cmd (lower case) since the last
// CONFIG RESETSTAT, from INFO commandstats.
func cmdCalls(t *testing.T, rdb *redis.Client, cmd string) int {
	t.Helper()
	info, err := rdb.Info(testCtx(t), "commandstats").Result()
	if err != nil {
		t.Fatalf("INFO commandstats: %v", err)
	}
	prefix := "cmdstat_" + cmd + ":"
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		for _, kv := range strings.Split(strings.TrimPrefix(line, prefix), ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok {
				n, err := strconv.Atoi(v)
				if err != nil {
					t.Fatalf("commandstats line %q: %v", line, err)
				}
				return n
			}
		}
		t.Fatalf("commandstats line %q has no calls=", line)
	}
	return 0
}

// msgs builds n messages with ids prefix-0, prefix-1, ... (payload = id).
func msgs(prefix string, n int) []NewMessage {
	out := make([]NewMessage, n)
	for i := range out {
		id := fmt.Sprintf("%s-%d", prefix, i)
		out[i] = NewMessage{ID: id, Payload: []byte(id)}
	}
	return out
}

// readyMessages decodes every element of queue's ready list.
func readyMessages(t *testing.T, b *Broker, rdb *redis.Client, queue string) []*Message {
	t.Helper()
	els, err := rdb.LRange(testCtx(t), b.Keys().Ready(queue), 0, -1).Result()
	if err != nil {
		t.Fatalf("LRANGE %s: %v", queue, err)
	}
	out := make([]*Message, len(els))
	for i, el := range els {
		m, err := decodeEnvelope([]byte(el))
		if err != nil {
			t.Fatalf("element %d of %s does not decode: %v (%q)", i, queue, err, el)
		}
		out[i] = m
	}
	return out
}

// readyIDs is the ids of queue's ready list, head first.
func readyIDs(t *testing.T, b *Broker, rdb *redis.Client, queue string) []string {
	t.Helper()
	var ids []string
	for _, m := range readyMessages(t, b, rdb, queue) {
		ids = append(ids, m.ID)
	}
	return ids
}

// delayedIDs is the ids of queue's delayed messages, earliest first.
func delayedIDs(t *testing.T, b *Broker, rdb *redis.Client, queue string) []string {
	t.Helper()
	ctx := testCtx(t)
	members, err := rdb.ZRange(ctx, b.Keys().Delayed(queue), 0, -1).Result()
	if err != nil {
		t.Fatalf("ZRANGE delayed of %s: %v", queue, err)
	}
	var ids []string
	for _, mem := range members {
		el, err := rdb.HGet(ctx, b.Keys().Scheduled(queue), mem).Result()
		if err != nil {
			t.Fatalf("HGET scheduled %s: %v", mem, err)
		}
		m, err := decodeEnvelope([]byte(el))
		if err != nil {
			t.Fatalf("scheduled %s does not decode: %v", mem, err)
		}
		ids = append(ids, m.ID)
	}
	return ids
}

// enqueuedCounter reads the "enqueued" counter of queue.
func enqueuedCounter(t *testing.T, b *Broker, rdb *redis.Client, queue string) int64 {
	t.Helper()
	s, err := rdb.HGet(testCtx(t), b.Keys().Counters(queue), "enqueued").Result()
	if errors.Is(err, redis.Nil) {
		return 0
	}
	if err != nil {
		t.Fatalf("HGET counters of %s: %v", queue, err)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("enqueued counter of %s = %q: %v", queue, s, err)
	}
	return n
}

// setMaxLength sets queue's max_length in its config hash (KEYS[9], read by
// policy() in the scripts).
func setMaxLength(t *testing.T, b *Broker, rdb *redis.Client, queue string, n int64) {
	t.Helper()
	if err := rdb.HSet(testCtx(t), b.Keys().Config(queue), "max_length", n).Err(); err != nil {
		t.Fatalf("HSET config of %s: %v", queue, err)
	}
}

// assertAllDone fails unless every call's done channel is closed.
func assertAllDone(t *testing.T, calls []*enqueueCall) {
	t.Helper()
	for i, c := range calls {
		select {
		case <-c.done:
		default:
			t.Errorf("call %d (%s): done not closed after flushEnqueues", i, c.queue)
		}
	}
}

// waitFor polls cond until it holds or the deadline passes. It is waiting
// on a condition, not a delay: every poll re-checks the state.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(coalesceTestTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(200 * time.Microsecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

// waitChan waits for ch to be closed (or to deliver) within the deadline.
func waitChan[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(coalesceTestTimeout):
		t.Fatalf("timed out waiting for %s", what)
	}
	var zero T
	return zero
}

// coalescerState reads pending length and active flushes under the lock.
func coalescerState[T any](c *coalescer[T]) (pending, active int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending), c.active
}

func pendingSnapshot[T any](c *coalescer[T]) []T {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.pending)
}

// flushGate wraps a flush function: it records every batch, and the first
// flush (or the first `hold` flushes) blocks until released, so that a test
// can keep the flush slots busy while more calls queue up.
type flushGate[T any] struct {
	inner   func([]T)
	hold    int32
	started atomic.Int32
	entered chan int // receives the index of each held flush as it starts
	release []chan struct{}
	opened  []sync.Once

	mu      sync.Mutex
	batches [][]T
}

// newFlushGate holds the first hold flushes; whatever is still held when
// the test ends is released then, so that a failing test leaves no
// goroutine blocked.
func newFlushGate[T any](t *testing.T, hold int, inner func([]T)) *flushGate[T] {
	g := &flushGate[T]{inner: inner, hold: int32(hold), entered: make(chan int, hold), opened: make([]sync.Once, hold)}
	for range hold {
		g.release = append(g.release, make(chan struct{}))
	}
	t.Cleanup(func() {
		for i := range hold {
			g.open(i)
		}
	})
	return g
}

// open releases held flush i.
func (g *flushGate[T]) open(i int) { g.opened[i].Do(func() { close(g.release[i]) }) }

func (g *flushGate[T]) flush(batch []T) {
	g.mu.Lock()
	g.batches = append(g.batches, slices.Clone(batch))
	g.mu.Unlock()
	if i := g.started.Add(1) - 1; i < g.hold {
		g.entered <- int(i)
		<-g.release[i]
	}
	if g.inner != nil {
		g.inner(batch)
	}
}

func (g *flushGate[T]) recorded() [][]T {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.batches)
}

// payloadOf decodes the payload of message i of an enqueue call.
func payloadOf(t *testing.T, c *enqueueCall, i int) string {
	t.Helper()
	m, err := decodeEnvelope(c.args[5*i].([]byte))
	if err != nil {
		t.Fatalf("envelope %d of call to %s: %v", i, c.queue, err)
	}
	return string(m.Payload)
}

// ---------------------------------------------------------------------------
// The generic coalescer
// ---------------------------------------------------------------------------

// TestCoalescerMergesWhileSlotBusy: with the only flush slot held, later
// calls wait in the FIFO and all go in the next flush, in submission order;
// the leader returns as soon as its own flush is done, handing the rest to
// another goroutine; the slot is given back afterwards.
func TestCoalescerMergesWhileSlotBusy(t *testing.T) {
	for _, tc := range []struct {
		name       string
		concurrent bool // submit the followers from many goroutines
	}{
		{"sequential followers", false},
		{"concurrent followers", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 50
			// Hold the first two flushes: the leader's, and the merged one,
			// so that we can see the leader return before the merged flush
			// ends.
			g := newFlushGate[int](t, 2, nil)
			c := newCoalescer(1, 1000, 1<<20, func(int) (int, int) { return 1, 8 }, g.flush)

			leaderDone := make(chan struct{})
			go func() {
				c.submit(0)
				close(leaderDone)
			}()
			if i := waitChan(t, "the leader's flush", g.entered); i != 0 {
				t.Fatalf("first held flush has index %d", i)
			}
			if p, a := coalescerState(c); p != 0 || a != 1 {
				t.Fatalf("during the leader's flush: pending %d active %d, want 0 and 1", p, a)
			}

			// Followers find no free slot: submit queues the call and
			// returns at once, without flushing (were it to flush, the gate
			// would hold it and the wait below would time out).
			followersDone := make(chan struct{})
			go func() {
				defer close(followersDone)
				if !tc.concurrent {
					for i := 1; i <= n; i++ {
						c.submit(i)
					}
					return
				}
				var wg sync.WaitGroup
				for i := 1; i <= n; i++ {
					wg.Go(func() { c.submit(i) })
				}
				wg.Wait()
			}()
			waitChan(t, "the followers' submits to return", followersDone)
			if p, a := coalescerState(c); p != n || a != 1 {
				t.Fatalf("with the slot busy: pending %d active %d, want %d and 1", p, a, n)
			}
			order := pendingSnapshot(c)
			if !tc.concurrent && !slices.Equal(order, seq(1, n)) {
				t.Fatalf("pending order %v, want 1..%d", order, n)
			}
			select {
			case <-leaderDone:
				t.Fatal("leader returned while its flush was still running")
			default:
			}

			g.open(0)
			if i := waitChan(t, "the merged flush", g.entered); i != 1 {
				t.Fatalf("second held flush has index %d", i)
			}
			// The merged flush is still blocked, yet the leader is back.
			waitChan(t, "the leader to return while the merged flush runs", leaderDone)
			if p, a := coalescerState(c); p != 0 || a != 1 {
				t.Fatalf("during the merged flush: pending %d active %d, want 0 and 1", p, a)
			}

			g.open(1)
			waitFor(t, "the slot to be given back", func() bool {
				p, a := coalescerState(c)
				return p == 0 && a == 0
			})
			got := g.recorded()
			want := [][]int{{0}, order}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("batches %v, want %v", got, want)
			}
			if got := sortedCopy(order); !slices.Equal(got, seq(1, n)) {
				t.Fatalf("merged flush holds %v, want each of 1..%d once", got, n)
			}

			// With the slot free again, a lone call flushes at once, alone.
			c.submit(n + 1)
			if got := g.recorded(); len(got) != 3 || !slices.Equal(got[2], []int{n + 1}) {
				t.Fatalf("after idle: batches %v, want a third batch [%d]", got, n+1)
			}
			if p, a := coalescerState(c); p != 0 || a != 0 {
				t.Fatalf("after a lone call: pending %d active %d, want 0 and 0", p, a)
			}
		})
	}
}

func seq(from, to int) []int {
	var out []int
	for i := from; i <= to; i++ {
		out = append(out, i)
	}
	return out
}

func sortedCopy(s []int) []int {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

// TestCoalescerTakeLimits: a batch takes calls in FIFO order while they fit
// maxItems and maxBytes; a single call always fits; an empty FIFO gives the
// slot back.
func TestCoalescerTakeLimits(t *testing.T) {
	type call struct{ id, items, bytes int }
	for _, tc := range []struct {
		name               string
		maxItems, maxBytes int
		calls              []call
		want               [][]int // ids per batch
	}{
		{"all fit", 10, 100, []call{{1, 3, 10}, {2, 3, 10}, {3, 4, 10}}, [][]int{{1, 2, 3}}},
		{"items split", 5, 100, []call{{1, 3, 1}, {2, 2, 1}, {3, 1, 1}, {4, 5, 1}}, [][]int{{1, 2}, {3}, {4}}},
		{"bytes split", 100, 10, []call{{1, 1, 6}, {2, 1, 4}, {3, 1, 5}, {4, 1, 5}, {5, 1, 1}}, [][]int{{1, 2}, {3, 4}, {5}}},
		{"oversized call goes alone", 4, 100, []call{{1, 9, 1}, {2, 1, 1}, {3, 9, 1}}, [][]int{{1}, {2}, {3}}},
		{"oversized bytes go alone", 100, 4, []call{{1, 1, 50}, {2, 1, 2}, {3, 1, 2}}, [][]int{{1}, {2, 3}}},
		{"no reordering to fill", 5, 100, []call{{1, 4, 1}, {2, 4, 1}, {3, 1, 1}}, [][]int{{1}, {2, 3}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCoalescer(1, tc.maxItems, tc.maxBytes, func(c call) (int, int) { return c.items, c.bytes }, func([]call) {})
			c.pending = slices.Clone(tc.calls)
			c.active = 1
			var got [][]int
			for range len(tc.calls) + 1 {
				batch := c.take()
				if batch == nil {
					break
				}
				var ids []int
				for _, b := range batch {
					ids = append(ids, b.id)
				}
				got = append(got, ids)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("batches %v, want %v", got, tc.want)
			}
			if len(c.pending) != 0 || c.active != 0 {
				t.Fatalf("after draining: pending %d active %d, want 0 and 0", len(c.pending), c.active)
			}
		})
	}
}

// TestCoalescerSlots: at most `slots` flushes run at once, every call is
// flushed exactly once, and the coalescer ends idle; slots < 1 means 1.
func TestCoalescerSlots(t *testing.T) {
	if c := newCoalescer(0, 1, 1, func(int) (int, int) { return 1, 1 }, func([]int) {}); c.slots != 1 {
		t.Fatalf("newCoalescer(0, ...).slots = %d, want 1", c.slots)
	}
	for _, slots := range []int{1, 2, 4} {
		t.Run(fmt.Sprintf("slots=%d", slots), func(t *testing.T) {
			const calls = 400
			var inFlight, maxInFlight atomic.Int32
			var mu sync.Mutex
			seen := make(map[int]int)
			var flushed sync.WaitGroup
			flushed.Add(calls)
			c := newCoalescer(slots, 7, 1<<20, func(int) (int, int) { return 1, 1 }, func(batch []int) {
				n := inFlight.Add(1)
				for {
					m := maxInFlight.Load()
					if n <= m || maxInFlight.CompareAndSwap(m, n) {
						break
					}
				}
				if len(batch) > 7 {
					t.Errorf("batch of %d exceeds maxItems 7", len(batch))
				}
				mu.Lock()
				for _, v := range batch {
					seen[v]++
				}
				mu.Unlock()
				inFlight.Add(-1)
				for range batch {
					flushed.Done()
				}
			})
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range calls {
				wg.Go(func() {
					<-start
					c.submit(i)
				})
			}
			close(start)
			wg.Wait()
			done := make(chan struct{})
			go func() { flushed.Wait(); close(done) }()
			waitChan(t, "every call to be flushed", done)
			waitFor(t, "the coalescer to go idle", func() bool {
				p, a := coalescerState(c)
				return p == 0 && a == 0
			})
			if m := maxInFlight.Load(); m > int32(slots) || m < 1 {
				t.Fatalf("%d flushes ran at once with %d slots", m, slots)
			}
			for i := range calls {
				if seen[i] != 1 {
					t.Fatalf("call %d flushed %d times", i, seen[i])
				}
			}
			if len(seen) != calls {
				t.Fatalf("%d distinct calls flushed, want %d", len(seen), calls)
			}
		})
	}
}

// TestCoalescerTwoSlotsFlushConcurrently: with two slots, two callers flush
// at the same time and a third waits for either.
func TestCoalescerTwoSlotsFlushConcurrently(t *testing.T) {
	g := newFlushGate[int](t, 2, nil)
	c := newCoalescer(2, 100, 1<<20, func(int) (int, int) { return 1, 1 }, g.flush)
	returned := make(chan int, 2)
	go func() { c.submit(1); returned <- 1 }()
	first := waitChan(t, "the first flush", g.entered)
	go func() { c.submit(2); returned <- 2 }()
	second := waitChan(t, "the second flush, concurrent with the first", g.entered)
	if first != 0 || second != 1 {
		t.Fatalf("held flushes %d, %d", first, second)
	}
	c.submit(3) // both slots busy: queued, returns at once
	if p, a := coalescerState(c); p != 1 || a != 2 {
		t.Fatalf("pending %d active %d, want 1 and 2", p, a)
	}
	g.open(1)
	if r := waitChan(t, "the second leader to return", returned); r != 2 {
		t.Fatalf("leader %d returned first; leader 1 is still held", r)
	}
	g.open(0)
	waitChan(t, "the first leader to return", returned)
	waitFor(t, "idle", func() bool { p, a := coalescerState(c); return p == 0 && a == 0 })
	got := g.recorded()
	if len(got) != 3 || !slices.Equal(got[2], []int{3}) {
		t.Fatalf("batches %v: want [1] and [2] then [3]", got)
	}
}

// ---------------------------------------------------------------------------
// EnqueueMany through the coalescer, on real Redis
// ---------------------------------------------------------------------------

// enqueueOutcome is what one concurrent EnqueueMany caller sent and got.
type enqueueOutcome struct {
	queue    string
	payloads []string
	res      EnqueueResult
	err      error
}

// checkEnqueueOutcomes checks that every message of every caller is in its
// queue exactly once (no cross-talk), that each caller's ids are the ids of
// its messages, that a caller's messages are contiguous and in order, and
// that exactly one caller per queue was told it created the queue.
func checkEnqueueOutcomes(t *testing.T, b *Broker, rdb *redis.Client, queues []string, outs []enqueueOutcome) {
	t.Helper()
	type where struct {
		queue string
		pos   int
		id    string
	}
	found := map[string]where{}
	total := 0
	for _, q := range queues {
		ms := readyMessages(t, b, rdb, q)
		total += len(ms)
		for pos, m := range ms {
			p := string(m.Payload)
			if prev, dup := found[p]; dup {
				t.Fatalf("payload %q is in %s at %d and in %s at %d", p, prev.queue, prev.pos, q, pos)
			}
			found[p] = where{q, pos, m.ID}
		}
		if got := enqueuedCounter(t, b, rdb, q); got != int64(len(ms)) {
			t.Errorf("queue %s: enqueued counter %d, list holds %d", q, got, len(ms))
		}
	}
	want := 0
	created := map[string]int{}
	for i, o := range outs {
		if o.err != nil {
			t.Fatalf("caller %d: %v", i, o.err)
		}
		want += len(o.payloads)
		if len(o.res.IDs) != len(o.payloads) || len(o.res.Duplicate) != len(o.payloads) {
			t.Fatalf("caller %d: %d ids and %d duplicate flags for %d messages", i, len(o.res.IDs), len(o.res.Duplicate), len(o.payloads))
		}
		if o.res.Created {
			created[o.queue]++
		}
		for j, p := range o.payloads {
			w, ok := found[p]
			if !ok {
				t.Fatalf("caller %d message %d (%q) is not in any queue", i, j, p)
			}
			if w.queue != o.queue {
				t.Fatalf("caller %d message %q: in queue %s, sent to %s", i, p, w.queue, o.queue)
			}
			if w.id != o.res.IDs[j] {
				t.Fatalf("caller %d message %q: stored id %s, returned id %s", i, p, w.id, o.res.IDs[j])
			}
			if o.res.Duplicate[j] {
				t.Fatalf("caller %d message %d reported duplicate", i, j)
			}
			if j > 0 && w.pos != found[o.payloads[j-1]].pos+1 {
				t.Fatalf("caller %d: message %d at %d, message %d at %d: a call's messages must be contiguous and in order",
					i, j-1, found[o.payloads[j-1]].pos, j, w.pos)
			}
		}
	}
	if total != want {
		t.Fatalf("queues hold %d messages, callers sent %d", total, want)
	}
	for _, q := range queues {
		if created[q] != 1 {
			t.Errorf("queue %s: %d callers told Created, want exactly 1", q, created[q])
		}
	}
}

// TestEnqueueManyCoalescedConcurrent: 64 concurrent EnqueueMany calls of 1..3
// messages to a mix of queues, through WithCoalescing(1). In the "gated"
// case the single flush slot is held by the first call while the other 63
// queue up, so the second flush merges all of them, deterministically:
// Redis then runs exactly 1 + (queues in that flush) EVALSHAs, and each
// queue's list holds the calls in FIFO order. Free-running cases check
// correctness under whatever merging happens.
func TestEnqueueManyCoalescedConcurrent(t *testing.T) {
	t.Parallel()
	queues := []string{"shared", "q1", "q2", "q3"}
	queueOf := func(i int) string {
		if i%2 == 0 {
			return "shared"
		}
		return queues[1+(i/2)%3]
	}
	for _, tc := range []struct {
		name  string
		slots int
		gated bool
	}{
		{"gated single slot", 1, true},
		{"free single slot", 1, false},
		{"free four slots", 4, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const callers = 64
			b, rdb := newTestBroker(t, WithCoalescing(tc.slots))
			var gate *flushGate[*enqueueCall]
			var co *coalescer[*enqueueCall]
			if tc.gated {
				gate = newFlushGate(t, 1, b.flushEnqueues)
				co = newCoalescer(1, 4096, 8<<20, enqueueCallSize, gate.flush)
				b.enqueues = co
			}
			resetStats(t, rdb)
			ctx := testCtx(t)

			outs := make([]enqueueOutcome, callers)
			call := func(i int) {
				n := 1 + i%3
				ms := make([]NewMessage, n)
				outs[i].queue = queueOf(i)
				for j := range ms {
					p := fmt.Sprintf("c%d-m%d", i, j)
					ms[j] = NewMessage{Payload: []byte(p)}
					outs[i].payloads = append(outs[i].payloads, p)
				}
				outs[i].res, outs[i].err = b.EnqueueMany(ctx, outs[i].queue, ms)
			}

			var wg sync.WaitGroup
			var order []int // gated: caller indices of the merged flush, FIFO
			if tc.gated {
				wg.Go(func() { call(0) })
				waitChan(t, "the first flush to start", gate.entered)
				for i := 1; i < callers; i++ {
					wg.Go(func() { call(i) })
				}
				waitFor(t, "63 calls to queue up behind the busy slot", func() bool {
					p, _ := coalescerState(co)
					return p == callers-1
				})
				for _, c := range pendingSnapshot(co) {
					var i, j int
					if _, err := fmt.Sscanf(payloadOf(t, c, 0), "c%d-m%d", &i, &j); err != nil {
						t.Fatalf("pending call payload: %v", err)
					}
					order = append(order, i)
				}
				gate.open(0)
			} else {
				start := make(chan struct{})
				for i := range callers {
					wg.Go(func() { <-start; call(i) })
				}
				close(start)
			}
			wg.Wait()
			checkEnqueueOutcomes(t, b, rdb, queues, outs)

			evalsha, eval := cmdCalls(t, rdb, "evalsha"), cmdCalls(t, rdb, "eval")
			if eval != 0 {
				t.Errorf("%d EVAL calls: scripts were loaded, every run should be an EVALSHA", eval)
			}
			if evalsha < 1 || evalsha > callers {
				t.Fatalf("%d EVALSHA for %d calls", evalsha, callers)
			}
			if !tc.gated {
				t.Logf("%d calls took %d script runs", callers, evalsha)
				return
			}

			// Gated: the exact batches, and one script run per queue per flush.
			batches := gate.recorded()
			if len(batches) != 2 || len(batches[0]) != 1 || len(batches[1]) != callers-1 {
				sizes := []int{}
				for _, bt := range batches {
					sizes = append(sizes, len(bt))
				}
				t.Fatalf("flush sizes %v, want [1 %d]", sizes, callers-1)
			}
			inMerged := map[string]bool{}
			for _, i := range order {
				inMerged[queueOf(i)] = true
			}
			if want := 1 + len(inMerged); evalsha != want {
				t.Fatalf("%d EVALSHA, want %d (1 for the first flush + 1 per queue of the merged flush): calls were not merged", evalsha, want)
			}
			waitFor(t, "the coalescer to go idle", func() bool { p, a := coalescerState(co); return p == 0 && a == 0 })

			// FIFO: each queue's list is its calls in the order they queued.
			for _, q := range queues {
				var want []string
				var firstCaller = -1
				for _, i := range append([]int{0}, order...) {
					if queueOf(i) != q {
						continue
					}
					if firstCaller < 0 {
						firstCaller = i
					}
					want = append(want, outs[i].payloads...)
				}
				var got []string
				for _, m := range readyMessages(t, b, rdb, q) {
					got = append(got, string(m.Payload))
				}
				if !slices.Equal(got, want) {
					t.Fatalf("queue %s holds %v, want FIFO order %v", q, got, want)
				}
				if !outs[firstCaller].res.Created {
					t.Errorf("queue %s: its first caller %d was not told Created", q, firstCaller)
				}
			}
		})
	}
}

// TestEnqueueManyPerProducerOrder: producers each enqueue a numbered
// sequence, one call at a time, concurrently with each other, to one queue;
// the list keeps each producer's order.
func TestEnqueueManyPerProducerOrder(t *testing.T) {
	t.Parallel()
	for _, slots := range []int{0, 1, 4} {
		t.Run(fmt.Sprintf("slots=%d", slots), func(t *testing.T) {
			t.Parallel()
			const producers, calls = 8, 30
			b, rdb := newTestBroker(t, WithCoalescing(slots))
			ctx := testCtx(t)
			start := make(chan struct{})
			errs := make(chan error, producers)
			var wg sync.WaitGroup
			for p := range producers {
				wg.Go(func() {
					<-start
					seqNo := 0
					for c := range calls {
						n := 1 + c%2 // alternate one and two messages per call
						ms := make([]NewMessage, n)
						for j := range ms {
							ms[j] = NewMessage{Payload: fmt.Appendf(nil, "p%d:%d", p, seqNo)}
							seqNo++
						}
						if _, err := b.EnqueueMany(ctx, "ordered", ms); err != nil {
							errs <- fmt.Errorf("producer %d call %d: %w", p, c, err)
							return
						}
					}
				})
			}
			close(start)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			next := make([]int, producers)
			for pos, m := range readyMessages(t, b, rdb, "ordered") {
				var p, n int
				if _, err := fmt.Sscanf(string(m.Payload), "p%d:%d", &p, &n); err != nil || p < 0 || p >= producers {
					t.Fatalf("element %d: payload %q", pos, m.Payload)
				}
				if n != next[p] {
					t.Fatalf("element %d: producer %d message %d, expected its message %d", pos, p, n, next[p])
				}
				next[p]++
			}
			perProducer := calls/2*1 + calls/2*2
			for p, n := range next {
				if n != perProducer {
					t.Fatalf("producer %d: %d messages in the list, want %d", p, n, perProducer)
				}
			}
		})
	}
}

// expectedResult is what one call of a merged flush should get.
type expectedResult struct {
	ok        bool
	full      *QueueFullError // when !ok
	created   bool
	duplicate []bool   // when ok (nil: none)
	ids       []string // when ok and set: the ids the call must report
}

func checkCallResults(t *testing.T, calls []*enqueueCall, want []expectedResult) {
	t.Helper()
	for i, c := range calls {
		w := want[i]
		if !w.ok {
			var qf *QueueFullError
			if !errors.As(c.err, &qf) {
				t.Errorf("call %d: err %v, want *QueueFullError", i, c.err)
				continue
			}
			if *qf != *w.full {
				t.Errorf("call %d: %+v, want %+v", i, *qf, *w.full)
			}
			continue
		}
		if c.err != nil {
			t.Errorf("call %d: unexpected error %v", i, c.err)
			continue
		}
		if c.res.Created != w.created {
			t.Errorf("call %d: Created %v, want %v", i, c.res.Created, w.created)
		}
		dup := w.duplicate
		if dup == nil {
			dup = make([]bool, c.n)
		}
		if !slices.Equal(c.res.Duplicate, dup) {
			t.Errorf("call %d: Duplicate %v, want %v", i, c.res.Duplicate, dup)
		}
		if w.ids != nil && !slices.Equal(c.res.IDs, w.ids) {
			t.Errorf("call %d: IDs %v, want %v", i, c.res.IDs, w.ids)
		}
	}
}

// TestFlushEnqueuesMaxLength: in one merged script run, each call is its own
// all-or-nothing group against the queue's max_length: a group that does not
// fit gets *QueueFullError and writes nothing, and later groups are still
// tried. Delayed messages count toward the length.
func TestFlushEnqueuesMaxLength(t *testing.T) {
	t.Parallel()
	type spec struct {
		prefix string
		n      int
		delay  time.Duration
	}
	for _, tc := range []struct {
		name     string
		max      int64
		prefill  int
		calls    []spec
		want     []expectedResult
		ready    []string // expected ready ids after the flush (after prefill)
		delayed  []string
		enqueued int64 // the counter, including the prefill
	}{
		{
			name: "3,3,2 into 5", max: 5,
			calls: []spec{{"a", 3, 0}, {"b", 3, 0}, {"c", 2, 0}},
			want: []expectedResult{
				{ok: true, created: true},
				{full: &QueueFullError{Queue: "q", Held: 3, Max: 5}},
				{ok: true},
			},
			ready: []string{"a-0", "a-1", "a-2", "c-0", "c-1"}, enqueued: 5,
		},
		{
			name: "2,2,2 into 5", max: 5,
			calls: []spec{{"a", 2, 0}, {"b", 2, 0}, {"c", 2, 0}},
			want: []expectedResult{
				{ok: true, created: true},
				{ok: true},
				{full: &QueueFullError{Queue: "q", Held: 4, Max: 5}},
			},
			ready: []string{"a-0", "a-1", "b-0", "b-1"}, enqueued: 4,
		},
		{
			name: "first group too big, second creates the queue", max: 5,
			calls: []spec{{"a", 6, 0}, {"b", 1, 0}},
			want: []expectedResult{
				{full: &QueueFullError{Queue: "q", Held: 0, Max: 5}},
				{ok: true, created: true},
			},
			ready: []string{"b-0"}, enqueued: 1,
		},
		{
			name: "prefilled queue", max: 5, prefill: 4,
			calls: []spec{{"a", 1, 0}, {"b", 1, 0}, {"c", 2, 0}},
			want: []expectedResult{
				{ok: true},
				{full: &QueueFullError{Queue: "q", Held: 5, Max: 5}},
				{full: &QueueFullError{Queue: "q", Held: 5, Max: 5}},
			},
			ready: []string{"pre-0", "pre-1", "pre-2", "pre-3", "a-0"}, enqueued: 5,
		},
		{
			name: "no limit, each call its own first due time", max: 0,
			calls: []spec{{"a", 1, time.Hour}, {"b", 2, 2 * time.Hour}, {"c", 1, 0}},
			want: []expectedResult{
				{ok: true, created: true},
				{ok: true},
				{ok: true},
			},
			ready: []string{"c-0"}, delayed: []string{"a-0", "b-0", "b-1"}, enqueued: 4,
		},
		{
			name: "delayed messages count", max: 5,
			calls: []spec{{"a", 2, time.Hour}, {"b", 3, 0}, {"c", 1, 0}, {"d", 1, time.Hour}},
			want: []expectedResult{
				{ok: true, created: true},
				{ok: true},
				{full: &QueueFullError{Queue: "q", Held: 5, Max: 5}},
				{full: &QueueFullError{Queue: "q", Held: 5, Max: 5}},
			},
			ready: []string{"b-0", "b-1", "b-2"}, delayed: []string{"a-0", "a-1"}, enqueued: 5,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t)
			ctx := testCtx(t)
			if tc.max > 0 {
				setMaxLength(t, b, rdb, "q", tc.max)
			}
			if tc.prefill > 0 {
				if _, err := b.EnqueueMany(ctx, "q", msgs("pre", tc.prefill)); err != nil {
					t.Fatalf("prefill: %v", err)
				}
			}
			var calls []*enqueueCall
			for _, s := range tc.calls {
				ms := msgs(s.prefix, s.n)
				for i := range ms {
					ms[i].Delay = s.delay
				}
				calls = append(calls, newEnqueueCall(ctx, "q", ms))
			}
			resetStats(t, rdb)
			b.flushEnqueues(calls)
			assertAllDone(t, calls)
			if n := cmdCalls(t, rdb, "evalsha"); n != 1 {
				t.Errorf("%d EVALSHA for one queue, want 1 (one merged script run)", n)
			}
			checkCallResults(t, calls, tc.want)
			for i, c := range calls {
				if c.err != nil {
					if len(c.res.IDs) != c.n {
						t.Errorf("call %d: ids slice changed on error", i)
					}
					continue
				}
				if tc.calls[i].delay > 0 {
					if c.res.FirstDue.IsZero() {
						t.Errorf("call %d: delayed messages but FirstDue is zero", i)
					} else if d := time.Until(c.res.FirstDue); d < tc.calls[i].delay-time.Minute || d > tc.calls[i].delay+time.Minute {
						t.Errorf("call %d: FirstDue %v is %v away, want about %v", i, c.res.FirstDue, d, tc.calls[i].delay)
					}
				} else if !c.res.FirstDue.IsZero() {
					t.Errorf("call %d: no delayed messages but FirstDue %v (another call's due time leaked in)", i, c.res.FirstDue)
				}
			}
			if got := readyIDs(t, b, rdb, "q"); !slices.Equal(got, tc.ready) {
				t.Errorf("ready list %v, want %v", got, tc.ready)
			}
			if got := delayedIDs(t, b, rdb, "q"); !slices.Equal(got, tc.delayed) {
				t.Errorf("delayed %v, want %v", got, tc.delayed)
			}
			if got := enqueuedCounter(t, b, rdb, "q"); got != tc.enqueued {
				t.Errorf("enqueued counter %d, want %d", got, tc.enqueued)
			}
		})
	}
}

// TestFlushEnqueuesDedupAcrossCalls: dedup keys are shared by the calls of
// one merged run, except that a call rejected as FULL leaves nothing
// behind, its dedup keys included.
func TestFlushEnqueuesDedupAcrossCalls(t *testing.T) {
	t.Parallel()
	type m struct{ id, key string }
	for _, tc := range []struct {
		name     string
		max      int64
		earlier  []m // enqueued in a flush of its own before
		calls    [][]m
		want     []expectedResult
		ready    []string
		dedup    map[string]string // dedup hash afterwards
		enqueued int64
	}{
		{
			name:  "second call duplicates the first",
			calls: [][]m{{{"a1", "k"}}, {{"b1", "k"}}},
			want: []expectedResult{
				{ok: true, created: true, ids: []string{"a1"}},
				{ok: true, duplicate: []bool{true}, ids: []string{"a1"}},
			},
			ready: []string{"a1"}, dedup: map[string]string{"k": "a1"}, enqueued: 1,
		},
		{
			name:  "rejected call's key is not remembered",
			max:   2,
			calls: [][]m{{{"a1", "k"}, {"a2", ""}, {"a3", ""}}, {{"b1", "k"}}},
			want: []expectedResult{
				{full: &QueueFullError{Queue: "q", Held: 0, Max: 2}},
				{ok: true, created: true, duplicate: []bool{false}, ids: []string{"b1"}},
			},
			ready: []string{"b1"}, dedup: map[string]string{"k": "b1"}, enqueued: 1,
		},
		{
			name:  "rejected call between two with the same key",
			max:   2,
			calls: [][]m{{{"a1", "k"}}, {{"b1", "j"}, {"b2", ""}}, {{"c1", "j"}, {"c2", "k"}}},
			want: []expectedResult{
				{ok: true, created: true},
				{full: &QueueFullError{Queue: "q", Held: 1, Max: 2}},
				{ok: true, duplicate: []bool{false, true}, ids: []string{"c1", "a1"}},
			},
			ready: []string{"a1", "c1"}, dedup: map[string]string{"k": "a1", "j": "c1"}, enqueued: 2,
		},
		{
			name:  "all-duplicate call fits a full queue",
			max:   1,
			calls: [][]m{{{"a1", "k"}}, {{"b1", "k"}}, {{"c1", ""}}},
			want: []expectedResult{
				{ok: true, created: true},
				{ok: true, duplicate: []bool{true}, ids: []string{"a1"}},
				{full: &QueueFullError{Queue: "q", Held: 1, Max: 1}},
			},
			ready: []string{"a1"}, dedup: map[string]string{"k": "a1"}, enqueued: 1,
		},
		{
			name:    "key remembered from an earlier flush",
			earlier: []m{{"e1", "k"}},
			calls:   [][]m{{{"a1", "k"}, {"a2", "x"}}, {{"b1", "x"}}},
			want: []expectedResult{
				{ok: true, duplicate: []bool{true, false}, ids: []string{"e1", "a2"}},
				{ok: true, duplicate: []bool{true}, ids: []string{"a2"}},
			},
			ready: []string{"e1", "a2"}, dedup: map[string]string{"k": "e1", "x": "a2"}, enqueued: 2,
		},
		{
			name:  "duplicate within one call",
			calls: [][]m{{{"a1", "k"}, {"a2", "k"}}, {{"b1", "k"}}},
			want: []expectedResult{
				{ok: true, created: true, duplicate: []bool{false, true}, ids: []string{"a1", "a1"}},
				{ok: true, duplicate: []bool{true}, ids: []string{"a1"}},
			},
			ready: []string{"a1"}, dedup: map[string]string{"k": "a1"}, enqueued: 1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t)
			ctx := testCtx(t)
			if tc.max > 0 {
				setMaxLength(t, b, rdb, "q", tc.max)
			}
			toMsgs := func(ms []m) []NewMessage {
				out := make([]NewMessage, len(ms))
				for i, x := range ms {
					out[i] = NewMessage{ID: x.id, Payload: []byte(x.id), DedupKey: x.key}
				}
				return out
			}
			if tc.earlier != nil {
				if _, err := b.EnqueueMany(ctx, "q", toMsgs(tc.earlier)); err != nil {
					t.Fatalf("earlier enqueue: %v", err)
				}
			}
			var calls []*enqueueCall
			for _, c := range tc.calls {
				calls = append(calls, newEnqueueCall(ctx, "q", toMsgs(c)))
			}
			b.flushEnqueues(calls)
			assertAllDone(t, calls)
			checkCallResults(t, calls, tc.want)
			if got := readyIDs(t, b, rdb, "q"); !slices.Equal(got, tc.ready) {
				t.Errorf("ready list %v, want %v", got, tc.ready)
			}
			got, err := rdb.HGetAll(ctx, b.Keys().Dedup("q")).Result()
			if err != nil {
				t.Fatalf("HGETALL dedup: %v", err)
			}
			if !reflect.DeepEqual(got, tc.dedup) {
				t.Errorf("dedup hash %v, want %v", got, tc.dedup)
			}
			keys, err := rdb.ZRange(ctx, b.Keys().DedupExpiry("q"), 0, -1).Result()
			if err != nil {
				t.Fatalf("ZRANGE dedupexp: %v", err)
			}
			var wantKeys []string
			for k := range tc.dedup {
				wantKeys = append(wantKeys, k)
			}
			slices.Sort(keys)
			slices.Sort(wantKeys)
			if !slices.Equal(keys, wantKeys) {
				t.Errorf("dedup expiry keys %v, want %v", keys, wantKeys)
			}
			if got := enqueuedCounter(t, b, rdb, "q"); got != tc.enqueued {
				t.Errorf("enqueued counter %d, want %d", got, tc.enqueued)
			}
		})
	}
}

// TestFlushEnqueuesWrongTypeIsolated: a queue whose ready key is not a list
// fails only the calls to that queue, in a multi-queue pipeline and alone.
func TestFlushEnqueuesWrongTypeIsolated(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		queues []string // per call
	}{
		{"bad queue among good ones", []string{"good1", "bad", "good2", "bad", "good1"}},
		{"bad queue first", []string{"bad", "good1"}},
		{"bad queue alone", []string{"bad", "bad"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t)
			ctx := testCtx(t)
			if err := rdb.Set(ctx, b.Keys().Ready("bad"), "not a list", 0).Err(); err != nil {
				t.Fatalf("SET: %v", err)
			}
			var calls []*enqueueCall
			want := map[string][]string{}
			for i, q := range tc.queues {
				ms := msgs(fmt.Sprintf("c%d", i), 2)
				calls = append(calls, newEnqueueCall(ctx, q, ms))
				if q != "bad" {
					want[q] = append(want[q], ms[0].ID, ms[1].ID)
				}
			}
			b.flushEnqueues(calls)
			assertAllDone(t, calls)
			for i, c := range calls {
				if c.queue == "bad" {
					if !errors.Is(c.err, ErrWrongType) {
						t.Errorf("call %d to bad: err %v, want ErrWrongType", i, c.err)
					}
				} else if c.err != nil {
					t.Errorf("call %d to %s: %v (only calls to the bad queue may fail)", i, c.queue, c.err)
				}
			}
			for q, ids := range want {
				if got := readyIDs(t, b, rdb, q); !slices.Equal(got, ids) {
					t.Errorf("queue %s holds %v, want %v", q, got, ids)
				}
			}
			if v, err := rdb.Get(ctx, b.Keys().Ready("bad")).Result(); err != nil || v != "not a list" {
				t.Errorf("bad key now %q, %v; want it untouched", v, err)
			}
			if n, err := rdb.Exists(ctx, b.Keys().Counters("bad")).Result(); err != nil || n != 0 {
				t.Errorf("bad queue's counters exist (%d, %v): a refused run must write nothing", n, err)
			}
		})
	}
}

// TestFlushEnqueuesNoScriptRecovery: after SCRIPT FLUSH, a flush to one or
// several queues still enqueues every call exactly once.
func TestFlushEnqueuesNoScriptRecovery(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		queues []string
	}{
		{"one queue", []string{"a", "a"}},
		{"two queues", []string{"a", "b", "a"}},
		{"three queues", []string{"a", "b", "c", "b", "c"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t)
			ctx := testCtx(t)
			if err := rdb.ScriptFlush(ctx).Err(); err != nil {
				t.Fatalf("SCRIPT FLUSH: %v", err)
			}
			var calls []*enqueueCall
			want := map[string][]string{}
			for i, q := range tc.queues {
				ms := msgs(fmt.Sprintf("c%d", i), 1+i%2)
				calls = append(calls, newEnqueueCall(ctx, q, ms))
				for _, m := range ms {
					want[q] = append(want[q], m.ID)
				}
			}
			b.flushEnqueues(calls)
			assertAllDone(t, calls)
			for i, c := range calls {
				if c.err != nil {
					t.Errorf("call %d to %s: %v", i, c.queue, c.err)
				}
			}
			for q, ids := range want {
				if got := readyIDs(t, b, rdb, q); !slices.Equal(got, ids) {
					t.Errorf("queue %s holds %v, want %v (each exactly once)", q, got, ids)
				}
				if got := enqueuedCounter(t, b, rdb, q); got != int64(len(ids)) {
					t.Errorf("queue %s: enqueued counter %d, want %d", q, got, len(ids))
				}
			}
			// And the next flush finds the scripts loaded.
			more := []*enqueueCall{newEnqueueCall(ctx, "a", msgs("again-a", 1)), newEnqueueCall(ctx, "b", msgs("again-b", 1))}
			b.flushEnqueues(more)
			for i, c := range more {
				if c.err != nil {
					t.Errorf("follow-up call %d: %v", i, c.err)
				}
			}
		})
	}
}

// TestEnqueueCancelledBeforeFlush: a caller whose context is already done
// when its flush runs gets the context's error and nothing of it is
// enqueued; the other calls of the flush go through.
func TestEnqueueCancelledBeforeFlush(t *testing.T) {
	t.Parallel()
	t.Run("merged flush", func(t *testing.T) {
		t.Parallel()
		b, rdb := newTestBroker(t)
		ctx := testCtx(t)
		dead, cancel := context.WithCancel(ctx)
		cancel()
		expired, cancel2 := context.WithDeadline(ctx, time.Now().Add(-time.Second))
		defer cancel2()
		calls := []*enqueueCall{
			newEnqueueCall(ctx, "q", msgs("ok1", 2)),
			newEnqueueCall(dead, "q", msgs("gone", 2)),
			newEnqueueCall(ctx, "r", msgs("ok2", 1)),
			newEnqueueCall(expired, "r", msgs("late", 1)),
			newEnqueueCall(ctx, "q", msgs("ok3", 1)),
		}
		b.flushEnqueues(calls)
		assertAllDone(t, calls)
		for i, want := range []error{nil, context.Canceled, nil, context.DeadlineExceeded, nil} {
			if want == nil {
				if calls[i].err != nil {
					t.Errorf("call %d: %v", i, calls[i].err)
				}
			} else if !errors.Is(calls[i].err, want) {
				t.Errorf("call %d: err %v, want %v", i, calls[i].err, want)
			}
		}
		if got, want := readyIDs(t, b, rdb, "q"), []string{"ok1-0", "ok1-1", "ok3-0"}; !slices.Equal(got, want) {
			t.Errorf("q holds %v, want %v", got, want)
		}
		if got, want := readyIDs(t, b, rdb, "r"), []string{"ok2-0"}; !slices.Equal(got, want) {
			t.Errorf("r holds %v, want %v", got, want)
		}
	})
	t.Run("every call cancelled", func(t *testing.T) {
		t.Parallel()
		b, rdb := newTestBroker(t)
		dead, cancel := context.WithCancel(context.Background())
		cancel()
		calls := []*enqueueCall{newEnqueueCall(dead, "q", msgs("x", 1)), newEnqueueCall(dead, "r", msgs("y", 1))}
		resetStats(t, rdb)
		b.flushEnqueues(calls)
		assertAllDone(t, calls)
		for i, c := range calls {
			if !errors.Is(c.err, context.Canceled) {
				t.Errorf("call %d: err %v, want context.Canceled", i, c.err)
			}
		}
		if n := cmdCalls(t, rdb, "evalsha") + cmdCalls(t, rdb, "eval"); n != 0 {
			t.Errorf("%d scripts ran for a flush of cancelled calls", n)
		}
	})
	for _, slots := range []int{0, 1} {
		t.Run(fmt.Sprintf("EnqueueMany slots=%d", slots), func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t, WithCoalescing(slots))
			dead, cancel := context.WithCancel(context.Background())
			cancel()
			_, err := b.EnqueueMany(dead, "q", msgs("gone", 3))
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("err %v, want context.Canceled", err)
			}
			if b.enqueues != nil {
				waitFor(t, "the coalescer to go idle", func() bool { p, a := coalescerState(b.enqueues); return p == 0 && a == 0 })
			}
			if got := readyIDs(t, b, rdb, "q"); len(got) != 0 {
				t.Fatalf("q holds %v after a cancelled enqueue", got)
			}
		})
	}
}

// TestEnqueueManyWithoutCoalescing: WithCoalescing(0) (and negative) turns
// merging off: every call runs its own script, and results are right.
func TestEnqueueManyWithoutCoalescing(t *testing.T) {
	t.Parallel()
	b0, _ := newTestBroker(t)
	if b0.enqueues == nil || b0.publishes == nil || b0.enqueues.slots != DefaultCoalescing || b0.publishes.slots != DefaultCoalescing {
		t.Fatalf("New without options: coalescing not set up with %d slots", DefaultCoalescing)
	}
	for _, slots := range []int{0, -1} {
		t.Run(fmt.Sprintf("slots=%d", slots), func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t, WithCoalescing(slots))
			if b.enqueues != nil || b.publishes != nil {
				t.Fatal("WithCoalescing off still set up a coalescer")
			}
			resetStats(t, rdb)
			ctx := testCtx(t)
			const callers = 24
			queues := []string{"x", "y", "z"}
			outs := make([]enqueueOutcome, callers)
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range callers {
				wg.Go(func() {
					<-start
					o := &outs[i]
					o.queue = queues[i%3]
					ms := make([]NewMessage, 1+i%3)
					for j := range ms {
						p := fmt.Sprintf("c%d-m%d", i, j)
						ms[j] = NewMessage{Payload: []byte(p)}
						o.payloads = append(o.payloads, p)
					}
					o.res, o.err = b.EnqueueMany(ctx, o.queue, ms)
				})
			}
			close(start)
			wg.Wait()
			checkEnqueueOutcomes(t, b, rdb, queues, outs)
			if n := cmdCalls(t, rdb, "evalsha"); n != callers {
				t.Fatalf("%d EVALSHA for %d uncoalesced calls, want one each", n, callers)
			}
			n, err := b.Publish(ctx, "nobody", []byte("x"))
			if err != nil || n != 0 {
				t.Fatalf("Publish without coalescing: %d, %v", n, err)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Publish through the coalescer
// ---------------------------------------------------------------------------

// subscribe subscribes to the broker channels names (prefixed) and waits
// for Redis to confirm every subscription.
func subscribe(t *testing.T, b *Broker, rdb *redis.Client, names ...string) *redis.PubSub {
	t.Helper()
	ctx := testCtx(t)
	var chans []string
	for _, n := range names {
		chans = append(chans, b.Keys().Channel(n))
	}
	ps := rdb.Subscribe(ctx, chans...)
	t.Cleanup(func() { _ = ps.Close() })
	for range chans {
		msg, err := ps.Receive(ctx)
		if err != nil {
			t.Fatalf("subscribe: %v", err)
		}
		if s, ok := msg.(*redis.Subscription); !ok || s.Kind != "subscribe" {
			t.Fatalf("subscribe: got %#v", msg)
		}
	}
	return ps
}

type received struct{ channel, payload string }

// receiveUntil reads messages until one carries payload sentinel, and
// returns those before it.
func receiveUntil(t *testing.T, ps *redis.PubSub, sentinel string) []received {
	t.Helper()
	ctx := testCtx(t)
	var out []received
	for {
		m, err := ps.ReceiveMessage(ctx)
		if err != nil {
			t.Fatalf("receive (after %d messages): %v", len(out), err)
		}
		if m.Payload == sentinel {
			return out
		}
		out = append(out, received{m.Channel, m.Payload})
	}
}

// TestPublishCoalesced: concurrent Publish calls to several channels, some
// subscribed: each gets its channel's receiver count, each message arrives
// once on its channel, and each publisher's order is kept. Gated: the merged
// flush is one pipeline of PUBLISHes in FIFO order.
func TestPublishCoalesced(t *testing.T) {
	t.Parallel()
	channels := []string{"ch0", "ch1", "ch2", "ch3", "ch4"}
	subscribed := map[string]bool{"ch0": true, "ch1": true, "ch2": true}
	for _, tc := range []struct {
		name  string
		slots int
		gated bool
	}{
		{"gated single slot", 1, true},
		{"free single slot", 1, false},
		{"free four slots", 4, false},
		{"not coalesced", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t, WithCoalescing(tc.slots), WithKeyPrefix("pfx:"))
			ps := subscribe(t, b, rdb, "ch0", "ch1", "ch2")
			ctx := testCtx(t)
			var gate *flushGate[*publishCall]
			var co *coalescer[*publishCall]
			if tc.gated {
				gate = newFlushGate(t, 1, b.flushPublishes)
				co = newCoalescer(1, 1024, 8<<20, publishCallSize, gate.flush)
				b.publishes = co
			}
			resetStats(t, rdb)

			const publishers, each = 15, 20
			type sent struct {
				channel, payload string
				n                int64
				err              error
			}
			results := make([][]sent, publishers+1) // [publishers] is the gated leader
			publish := func(p, k int, ch string) {
				payload := fmt.Sprintf("p%d:%d", p, k)
				n, err := b.Publish(ctx, ch, []byte(payload))
				results[p] = append(results[p], sent{ch, payload, n, err})
			}
			var wg sync.WaitGroup
			var fifo []string // gated: payloads of the merged flush, in order
			if tc.gated {
				wg.Go(func() { publish(publishers, 0, "ch0") })
				waitChan(t, "the first publish flush", gate.entered)
				for p := range publishers {
					wg.Go(func() { publish(p, 0, channels[p%len(channels)]) })
				}
				waitFor(t, "publishes to queue up behind the busy slot", func() bool {
					n, _ := coalescerState(co)
					return n == publishers
				})
				for _, c := range pendingSnapshot(co) {
					fifo = append(fifo, string(c.payload))
				}
				gate.open(0)
			} else {
				start := make(chan struct{})
				for p := range publishers {
					wg.Go(func() {
						<-start
						for k := range each {
							publish(p, k, channels[p%len(channels)])
						}
					})
				}
				close(start)
			}
			wg.Wait()
			published := cmdCalls(t, rdb, "publish")
			if n, err := rdb.Publish(ctx, b.Keys().Channel("ch0"), "END").Result(); err != nil || n != 1 {
				t.Fatalf("sentinel publish: %d, %v", n, err)
			}
			got := receiveUntil(t, ps, "END")

			total, wantReceived := 0, 0
			for p, rs := range results {
				for _, r := range rs {
					total++
					if r.err != nil {
						t.Fatalf("publisher %d %q: %v", p, r.payload, r.err)
					}
					want := int64(0)
					if subscribed[r.channel] {
						want = 1
						wantReceived++
					}
					if r.n != want {
						t.Errorf("publish %q to %s: %d receivers, want %d", r.payload, r.channel, r.n, want)
					}
				}
			}
			if published != total {
				t.Errorf("Redis ran %d PUBLISH for %d Publish calls", published, total)
			}
			// Exactly once, on the right channel, in each publisher's order.
			channelOf := map[string]string{}
			for _, rs := range results {
				for _, r := range rs {
					channelOf[r.payload] = r.channel
				}
			}
			seen := map[string]bool{}
			next := map[int]int{}
			for _, r := range got {
				if seen[r.payload] {
					t.Fatalf("%q received twice", r.payload)
				}
				seen[r.payload] = true
				ch, ok := channelOf[r.payload]
				if !ok {
					t.Fatalf("received unknown payload %q", r.payload)
				}
				if r.channel != b.Keys().Channel(ch) {
					t.Fatalf("%q arrived on %s, was published to %s", r.payload, r.channel, b.Keys().Channel(ch))
				}
				var p, k int
				if _, err := fmt.Sscanf(r.payload, "p%d:%d", &p, &k); err != nil {
					t.Fatalf("payload %q: %v", r.payload, err)
				}
				if k < next[p] {
					t.Fatalf("publisher %d: message %d arrived after %d", p, k, next[p]-1)
				}
				next[p] = k + 1
			}
			if len(got) != wantReceived {
				t.Fatalf("received %d messages, want %d", len(got), wantReceived)
			}
			if !tc.gated {
				return
			}
			batches := gate.recorded()
			if len(batches) != 2 || len(batches[0]) != 1 || len(batches[1]) != publishers {
				t.Fatalf("%d publish flushes, want [1 %d]", len(batches), publishers)
			}
			// The merged pipeline published in FIFO order.
			want := []string{fmt.Sprintf("p%d:0", publishers)}
			for _, p := range fifo {
				if subscribed[channelOf[p]] {
					want = append(want, p)
				}
			}
			var order []string
			for _, r := range got {
				order = append(order, r.payload)
			}
			if !slices.Equal(order, want) {
				t.Fatalf("received in order %v, want FIFO order %v", order, want)
			}
			waitFor(t, "the publish coalescer to go idle", func() bool { p, a := coalescerState(co); return p == 0 && a == 0 })
		})
	}
}

// TestPublishCancelledBeforeFlush: a Publish whose context is done before
// its flush is not published; the others of the flush are.
func TestPublishCancelledBeforeFlush(t *testing.T) {
	t.Parallel()
	b, rdb := newTestBroker(t, WithKeyPrefix("pfx:"))
	ps := subscribe(t, b, rdb, "ch")
	ctx := testCtx(t)
	dead, cancel := context.WithCancel(ctx)
	cancel()
	calls := []*publishCall{
		{ctx: ctx, channel: "ch", payload: []byte("one"), done: make(chan struct{})},
		{ctx: dead, channel: "ch", payload: []byte("gone"), done: make(chan struct{})},
		{ctx: ctx, channel: "other", payload: []byte("two"), done: make(chan struct{})},
		{ctx: ctx, channel: "ch", payload: []byte("three"), done: make(chan struct{})},
	}
	b.flushPublishes(calls)
	for i, c := range calls {
		select {
		case <-c.done:
		default:
			t.Errorf("call %d: done not closed", i)
		}
	}
	wantN := []int64{1, 0, 0, 1}
	for i, c := range calls {
		if i == 1 {
			if !errors.Is(c.err, context.Canceled) || c.n != 0 {
				t.Errorf("cancelled call: %d, %v; want 0 and context.Canceled", c.n, c.err)
			}
			continue
		}
		if c.err != nil || c.n != wantN[i] {
			t.Errorf("call %d: %d, %v; want %d", i, c.n, c.err, wantN[i])
		}
	}
	// All cancelled: nothing is sent.
	allDead := []*publishCall{{ctx: dead, channel: "ch", payload: []byte("gone2"), done: make(chan struct{})}}
	b.flushPublishes(allDead)
	if !errors.Is(allDead[0].err, context.Canceled) {
		t.Errorf("all-cancelled flush: %v", allDead[0].err)
	}
	// Through Publish itself.
	if _, err := b.Publish(dead, "ch", []byte("gone3")); !errors.Is(err, context.Canceled) {
		t.Errorf("Publish with a cancelled context: %v", err)
	}
	waitFor(t, "the publish coalescer to go idle", func() bool { p, a := coalescerState(b.publishes); return p == 0 && a == 0 })
	if err := rdb.Publish(ctx, b.Keys().Channel("ch"), "END").Err(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range receiveUntil(t, ps, "END") {
		got = append(got, r.payload)
	}
	if want := []string{"one", "three"}; !slices.Equal(got, want) {
		t.Fatalf("received %v, want %v", got, want)
	}
}

// TestParseEnqueueReply: replies that do not match the calls fail the calls
// they cannot serve, and no more.
func TestParseEnqueueReply(t *testing.T) {
	mk := func(n int) *enqueueCall {
		return &enqueueCall{n: n, res: EnqueueResult{IDs: make([]string, n), Duplicate: make([]bool, n)}}
	}
	for _, tc := range []struct {
		name    string
		sizes   []int
		out     []any
		wantErr []string // "" : ok; "FULL": QueueFullError; else substring
	}{
		{"ok, full, ok", []int{1, 2, 1}, []any{"OK", int64(1), int64(0), "", "FULL", int64(1), int64(2), "OK", int64(0), int64(0), "dup"}, []string{"", "FULL", ""}},
		{"empty reply", []int{1, 1}, []any{}, []string{"short reply", "short reply"}},
		{"short after first", []int{1, 1}, []any{"OK", int64(0), int64(0), ""}, []string{"", "short reply"}},
		{"truncated OK", []int{2, 1}, []any{"OK", int64(0), int64(0), ""}, []string{"short reply", "short reply"}},
		{"truncated FULL", []int{1, 1}, []any{"FULL", int64(3)}, []string{"short reply", "short reply"}},
		{"unexpected", []int{1, 1}, []any{"WHAT"}, []string{"unexpected reply", "short reply"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var group []*enqueueCall
			for _, n := range tc.sizes {
				group = append(group, mk(n))
			}
			parseEnqueueReply("q", tc.out, group)
			for i, c := range group {
				switch w := tc.wantErr[i]; w {
				case "":
					if c.err != nil {
						t.Errorf("call %d: %v", i, c.err)
					}
				case "FULL":
					var qf *QueueFullError
					if !errors.As(c.err, &qf) {
						t.Errorf("call %d: %v, want QueueFullError", i, c.err)
					}
				default:
					if c.err == nil || !strings.Contains(c.err.Error(), w) {
						t.Errorf("call %d: %v, want an error containing %q", i, c.err, w)
					}
				}
			}
			if tc.name == "ok, full, ok" {
				if !group[0].res.Created || group[2].res.Created {
					t.Errorf("Created flags %v %v, want true false", group[0].res.Created, group[2].res.Created)
				}
				if !group[2].res.Duplicate[0] || group[2].res.IDs[0] != "dup" {
					t.Errorf("call 2: %+v, want a duplicate of \"dup\"", group[2].res)
				}
				var qf *QueueFullError
				if errors.As(group[1].err, &qf) && (qf.Held != 1 || qf.Max != 2 || qf.Queue != "q") {
					t.Errorf("QueueFullError %+v", *qf)
				}
			}
		})
	}
}
