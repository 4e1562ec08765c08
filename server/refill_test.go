package server_test

// Tests of the two one-round-trip paths of Consume (consume.go):
//
//   - a queue's dispatcher fills every hungry single-queue stream with one
//     take each, in one pipelined round trip (dispatcher.fillMany,
//     Broker.TakeMany); priority streams still go through fillFor;
//   - an Ack whose tokens all belong to one eligible stream of this instance
//     settles them and claims the stream's next messages in the same script
//     (Server.refillable, Server.ackRefill, Broker.AckClaim).
//
// Whether an Ack took the refill path is seen from outside, on Redis: a
// MONITOR connection (rfMonitor) records every call of the ack-and-claim
// script, recognised by the shape of its arguments, with the lease ids it
// settled. The scripts are loaded before monitoring starts, so each call is
// one EVALSHA.
//
// Flow control is checked on the client side: a reader goroutine counts the
// deliveries a stream has received and not yet handed to an Ack, and an
// acker goroutine acks each response's deliveries in one Ack (see rfWorker).
// The count drops when the Ack is sent, not when it returns: an Ack may
// refill the stream before its reply arrives, which is the point.
//
// Helpers here are prefixed with "rf" so they cannot collide with helpers
// of other test files of the package.

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// ---------------------------------------------------------------------------
// Ack tokens, as the client sees them

// rfToken is an ack token's content. The wire form is documented in
// token.go: "v1." + base64url of queue, lease id, instance (each a uvarint
// length and bytes) and the consumer number (a uvarint).
type rfToken struct {
	queue, lease, instance string
	consumer               uint64
}

func rfParseToken(t *testing.T, tok string) rfToken {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(tok, "v1."))
	if err != nil || !strings.HasPrefix(tok, "v1.") {
		t.Fatalf("ack token %q is not v1 base64url: %v", tok, err)
	}
	var f [3]string
	for i := range f {
		n, k := binary.Uvarint(b)
		if k <= 0 || uint64(len(b)-k) < n {
			t.Fatalf("ack token %q is truncated", tok)
		}
		f[i], b = string(b[k:k+int(n)]), b[k+int(n):]
	}
	c, k := binary.Uvarint(b)
	if k <= 0 || k != len(b) {
		t.Fatalf("ack token %q has a bad consumer number", tok)
	}
	return rfToken{queue: f[0], lease: f[1], instance: f[2], consumer: c}
}

// rfLease names a lease: lease ids are unique per queue.
type rfLease struct{ queue, id string }

func rfLeaseOf(t *testing.T, d *qbridgev1.Delivery) rfLease {
	t.Helper()
	tk := rfParseToken(t, d.GetAckToken())
	return rfLease{tk.queue, tk.lease}
}

// ---------------------------------------------------------------------------
// Watching the ack-and-claim script on Redis

// rfMonitor reads Redis's MONITOR feed and keeps the calls of the
// ack-and-claim script (ackClaimScript), told from the other queue scripts
// by their arguments: 16 keys, then ARGV[11] EXTRA, ARGV[12] MAX and
// ARGV[13] lease ms (integers), then pairs of a lease id (an integer) and a
// result ("" or "=..."). No other script has that shape: the claim script
// has exactly two script-specific arguments, settle and nack start with a
// word, enqueue's third is an envelope.
type rfMonitor struct {
	conn net.Conn
	rdb  *redis.Client
	done chan struct{}
	n    atomic.Int64

	mu        sync.Mutex
	ackClaims []rfAckClaim
	marks     map[string]chan struct{}
	err       error
}

// rfAckClaim is one call of the ack-and-claim script.
type rfAckClaim struct {
	queue      string
	extra, max int
	leases     []string
}

// rfStartMonitor loads the scripts (so no call is a NOSCRIPT EVALSHA
// followed by an EVAL) and starts watching rs.
func rfStartMonitor(t *testing.T, rs *redistest.Server, rdb *redis.Client) *rfMonitor {
	t.Helper()
	if err := broker.New(rdb).LoadScripts(ctxT(t, 5*time.Second)); err != nil {
		t.Fatalf("load scripts: %v", err)
	}
	conn, err := net.DialTimeout("tcp", rs.Addr(), 5*time.Second)
	if err != nil {
		t.Fatalf("monitor: %v", err)
	}
	r := bufio.NewReaderSize(conn, 1<<20)
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("MONITOR\r\n")); err != nil {
		t.Fatalf("monitor: %v", err)
	}
	if line, err := r.ReadString('\n'); err != nil || line != "+OK\r\n" {
		t.Fatalf("monitor: got %q, %v", line, err)
	}
	_ = conn.SetDeadline(time.Time{})
	m := &rfMonitor{conn: conn, rdb: rdb, done: make(chan struct{}), marks: map[string]chan struct{}{}}
	go m.read(r)
	t.Cleanup(func() {
		_ = conn.Close()
		<-m.done
	})
	return m
}

func (m *rfMonitor) read(r *bufio.Reader) {
	defer close(m.done)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			m.mu.Lock()
			m.err = err
			m.mu.Unlock()
			return
		}
		i := strings.Index(line, "] ")
		if i < 0 {
			continue
		}
		args := rfUnquote(line[i+2:])
		if len(args) == 0 {
			continue
		}
		switch strings.ToLower(args[0]) {
		case "echo":
			if len(args) == 2 {
				m.mu.Lock()
				if ch := m.marks[args[1]]; ch != nil {
					close(ch)
					delete(m.marks, args[1])
				}
				m.mu.Unlock()
			}
		case "evalsha", "eval":
			if c, ok := rfAsAckClaim(args); ok {
				m.mu.Lock()
				m.ackClaims = append(m.ackClaims, c)
				m.mu.Unlock()
			}
		}
	}
}

func rfIsInt(s string) bool {
	_, err := strconv.ParseInt(s, 10, 64)
	return err == nil
}

func rfAsAckClaim(args []string) (rfAckClaim, bool) {
	if len(args) < 3 || args[2] != "16" || len(args) < 3+16 {
		return rfAckClaim{}, false
	}
	argv := args[3+16:]
	if len(argv) < 15 || (len(argv)-13)%2 != 0 {
		return rfAckClaim{}, false
	}
	for _, a := range argv[10:13] {
		if !rfIsInt(a) {
			return rfAckClaim{}, false
		}
	}
	c := rfAckClaim{queue: args[3]}
	c.extra, _ = strconv.Atoi(argv[10])
	c.max, _ = strconv.Atoi(argv[11])
	for i := 13; i+1 < len(argv); i += 2 {
		if !rfIsInt(argv[i]) || (argv[i+1] != "" && !strings.HasPrefix(argv[i+1], "=")) {
			return rfAckClaim{}, false
		}
		c.leases = append(c.leases, argv[i])
	}
	return c, true
}

// rfUnquote splits the arguments of a MONITOR line: quoted strings with
// the escapes of Redis's sdscatrepr.
func rfUnquote(s string) []string {
	var out []string
	for i := 0; i < len(s); {
		if s[i] != '"' {
			i++
			continue
		}
		i++
		var b []byte
		for i < len(s) && s[i] != '"' {
			if s[i] != '\\' || i+1 >= len(s) {
				b = append(b, s[i])
				i++
				continue
			}
			i++
			switch s[i] {
			case 'n':
				b = append(b, '\n')
			case 'r':
				b = append(b, '\r')
			case 't':
				b = append(b, '\t')
			case 'a':
				b = append(b, '\a')
			case 'b':
				b = append(b, '\b')
			case 'x':
				if i+2 < len(s) {
					if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
						b = append(b, byte(v))
						i += 2
						break
					}
				}
				b = append(b, 'x')
			default:
				b = append(b, s[i])
			}
			i++
		}
		i++
		out = append(out, string(b))
	}
	return out
}

// sync returns once the monitor has seen every command Redis ran before
// it: it sends a marker through Redis and waits for it in the feed.
func (m *rfMonitor) sync(t *testing.T) {
	t.Helper()
	mark := fmt.Sprintf("rf-mark-%d-%d", time.Now().UnixNano(), m.n.Add(1))
	ch := make(chan struct{})
	m.mu.Lock()
	m.marks[mark] = ch
	m.mu.Unlock()
	if err := m.rdb.Echo(ctxT(t, 5*time.Second), mark).Err(); err != nil {
		t.Fatalf("monitor marker: %v", err)
	}
	select {
	case <-ch:
	case <-m.done:
		t.Fatalf("monitor connection ended: %v", m.err)
	case <-time.After(10 * time.Second):
		t.Fatal("monitor did not see its marker within 10s")
	}
}

// calls returns the ack-and-claim calls on queue so far (after sync).
func (m *rfMonitor) calls(t *testing.T, queue string) []rfAckClaim {
	t.Helper()
	m.sync(t)
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []rfAckClaim
	for _, c := range m.ackClaims {
		if c.queue == queue {
			out = append(out, c)
		}
	}
	return out
}

// refilled returns how many ack-and-claim calls settled each lease of queue.
func (m *rfMonitor) refilled(t *testing.T, queue string) map[rfLease]int {
	t.Helper()
	out := map[rfLease]int{}
	for _, c := range m.calls(t, queue) {
		for _, id := range c.leases {
			out[rfLease{queue, id}]++
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// Streams driven by a reader and an acker

// rfRun is a set of Consume streams draining want messages; every message
// id is recorded, and a second delivery of one fails the test.
type rfRun struct {
	t      *testing.T
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	want   atomic.Int64

	settled atomic.Int64 // acked, or delivered to an auto-ack stream
	done    chan struct{}
	once    sync.Once
	recv    chan struct{} // capacity 1: something was received

	mu      sync.Mutex
	seen    map[string]int
	workers []*rfWorker
}

// rfWorker is one stream of an rfRun.
type rfWorker struct {
	name    string
	window  int64
	autoAck bool
	ackVia  qbridgev1.QueueServiceClient

	holding  atomic.Int64 // received, not yet handed to an Ack
	maxHeld  atomic.Int64
	received atomic.Int64
	ackCalls atomic.Int64

	mu  sync.Mutex
	got []*qbridgev1.Delivery // in the order received
}

func rfNewRun(t *testing.T, want int) *rfRun {
	ctx, cancel := context.WithCancel(context.Background())
	r := &rfRun{t: t, ctx: ctx, cancel: cancel, done: make(chan struct{}),
		recv: make(chan struct{}, 1), seen: map[string]int{}}
	r.want.Store(int64(want))
	t.Cleanup(r.stop)
	return r
}

// setWant changes how many messages the run waits for.
func (r *rfRun) setWant(n int) {
	r.want.Store(int64(n))
	r.settle(0)
}

// goFn runs f beside the streams; stop waits for it too.
func (r *rfRun) goFn(f func(ctx context.Context)) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		f(r.ctx)
	}()
}

// stop ends every stream and waits for the goroutines.
func (r *rfRun) stop() {
	r.cancel()
	r.wg.Wait()
}

func (r *rfRun) settle(n int) {
	if r.settled.Add(int64(n)) >= r.want.Load() {
		r.once.Do(func() { close(r.done) })
	}
}

func (r *rfRun) record(w *rfWorker, ds []*qbridgev1.Delivery) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range ds {
		r.seen[d.GetId()]++
		if n := r.seen[d.GetId()]; n > 1 {
			r.t.Errorf("%s: message %s delivered %d times (attempt %d); want exactly once", w.name, d.GetId(), n, d.GetAttempt())
		}
	}
	select {
	case r.recv <- struct{}{}:
	default:
	}
}

// add opens a stream on in whose deliveries are acked through ackVia (nil:
// auto-ack, or in). Acking starts once gate is closed (nil: at once).
func (r *rfRun) add(name string, in, ackVia *instance, req *qbridgev1.ConsumeRequest, gate <-chan struct{}) *rfWorker {
	r.t.Helper()
	return r.addWith(name, in, ackVia, req, gate, false)
}

// addWith is add; with parallel, each delivery is acked alone, in its own
// goroutine, so that Acks of one stream run concurrently.
func (r *rfRun) addWith(name string, in, ackVia *instance, req *qbridgev1.ConsumeRequest, gate <-chan struct{}, parallel bool) *rfWorker {
	t := r.t
	t.Helper()
	if ackVia == nil {
		ackVia = in
	}
	w := &rfWorker{name: name, window: int64(req.GetMaxInFlight()), autoAck: req.GetAutoAck(), ackVia: ackVia.client}
	st, err := in.client.Consume(r.ctx, req)
	if err != nil {
		t.Fatalf("%s: consume: %v", name, err)
	}
	r.mu.Lock()
	r.workers = append(r.workers, w)
	r.mu.Unlock()
	// Each entry is one response; a stream that keeps to its window has at
	// most window of them waiting.
	acks := make(chan []*qbridgev1.Delivery, 1024)
	r.wg.Add(2)
	go func() { // reader
		defer r.wg.Done()
		defer close(acks)
		for {
			resp, err := st.Recv()
			if err != nil {
				if r.ctx.Err() == nil {
					t.Errorf("%s: stream ended: %v", name, err)
				}
				return
			}
			ds := resp.GetDeliveries()
			w.received.Add(int64(len(ds)))
			if !w.autoAck {
				h := w.holding.Add(int64(len(ds)))
				for m := w.maxHeld.Load(); h > m && !w.maxHeld.CompareAndSwap(m, h); m = w.maxHeld.Load() {
				}
				if h > w.window {
					t.Errorf("%s: the client holds %d unacked deliveries; max_in_flight is %d", name, h, w.window)
				}
			}
			w.mu.Lock()
			w.got = append(w.got, ds...)
			w.mu.Unlock()
			r.record(w, ds)
			if w.autoAck {
				for _, d := range ds {
					if d.GetAckToken() != "" {
						t.Errorf("%s: auto-ack delivery %s has an ack token", name, d.GetId())
					}
				}
				r.settle(len(ds))
				continue
			}
			select {
			case acks <- ds:
			case <-r.ctx.Done():
				return
			}
		}
	}()
	go func() { // acker
		defer r.wg.Done()
		if w.autoAck {
			return
		}
		if gate != nil {
			select {
			case <-gate:
			case <-r.ctx.Done():
				return
			}
		}
		ackOne := func(ds []*qbridgev1.Delivery) {
			toks := make([]string, len(ds))
			for i, d := range ds {
				toks[i] = d.GetAckToken()
			}
			w.ackCalls.Add(1)
			resp, err := w.ackVia.Ack(r.ctx, &qbridgev1.AckRequest{AckTokens: toks})
			if err != nil {
				if r.ctx.Err() == nil {
					t.Errorf("%s: ack of %d: %v", name, len(toks), err)
				}
				return
			}
			if int(resp.GetAcked()) != len(toks) {
				t.Errorf("%s: acked %d of %d", name, resp.GetAcked(), len(toks))
			}
			r.settle(len(ds))
		}
		var inner sync.WaitGroup
		defer inner.Wait()
		for ds := range acks {
			// From here on the server may refill: the client no longer
			// counts these.
			w.holding.Add(-int64(len(ds)))
			if !parallel {
				ackOne(ds)
				continue
			}
			for _, d := range ds {
				inner.Add(1)
				go func() {
					defer inner.Done()
					ackOne([]*qbridgev1.Delivery{d})
				}()
			}
		}
	}()
	return w
}

// wait waits until want messages were settled.
func (r *rfRun) wait(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(within):
		var per []string
		r.mu.Lock()
		for _, w := range r.workers {
			per = append(per, fmt.Sprintf("%s: %d received, %d held", w.name, w.received.Load(), w.holding.Load()))
		}
		r.mu.Unlock()
		t.Fatalf("after %v: %d of %d settled (%s)", within, r.settled.Load(), r.want.Load(), strings.Join(per, "; "))
	}
}

// exactlyOnce checks that each of ids was delivered once and nothing else.
func (r *rfRun) exactlyOnce(t *testing.T, ids []string) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range ids {
		if r.seen[id] != 1 {
			t.Fatalf("message %s delivered %d times; want exactly once", id, r.seen[id])
		}
	}
	if len(r.seen) != len(ids) {
		t.Fatalf("%d distinct messages delivered; want %d", len(r.seen), len(ids))
	}
}

// quiet asserts that no stream of r receives anything during d (an
// assertion window, not synchronisation).
func (r *rfRun) quiet(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case <-r.recv:
	default:
	}
	select {
	case <-r.recv:
		t.Fatal("a delivery arrived during the quiet window")
	case <-time.After(d):
	}
}

func (w *rfWorker) deliveries() []*qbridgev1.Delivery {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*qbridgev1.Delivery(nil), w.got...)
}

// leases returns the leases of w's deliveries.
func (w *rfWorker) leases(t *testing.T) []rfLease {
	t.Helper()
	var out []rfLease
	for _, d := range w.deliveries() {
		out = append(out, rfLeaseOf(t, d))
	}
	return out
}

// rfQueue makes a queue name of a prefix and a subtest's name.
func rfQueue(prefix, name string) string {
	return prefix + "-" + strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, strings.ToLower(name))
}

func rfInFlightKey(q string) string { return "{" + q + "}:qb:inflight" }

// rfWantStats fails unless the queue's counts are exactly these now.
func rfWantStats(t *testing.T, c qbridgev1.QueueServiceClient, q string, ready, inFlight int64) {
	t.Helper()
	if r, f := stats(t, c, q); r != ready || f != inFlight {
		t.Fatalf("%s: %d ready, %d in flight; want %d, %d", q, r, f, ready, inFlight)
	}
}

// rfAckToks acks tokens in one call.
func rfAckToks(t *testing.T, c qbridgev1.QueueServiceClient, toks ...string) (*qbridgev1.AckResponse, error) {
	t.Helper()
	return c.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: toks})
}

func rfToks(ds ...*qbridgev1.Delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.GetAckToken()
	}
	return out
}

// rfTake receives n deliveries from s.
func rfTake(t *testing.T, s *stream, n int) []*qbridgev1.Delivery {
	t.Helper()
	out := make([]*qbridgev1.Delivery, n)
	for i := range out {
		out[i] = s.next(t, 10*time.Second)
	}
	return out
}

// ---------------------------------------------------------------------------
// 1. Flow control under ack-refill

// Streams ack each response's deliveries in one Ack, as fast as they can:
// what the client holds never exceeds max_in_flight, nor what Redis has in
// flight the sum of the windows; every message is delivered once and
// nothing is left. Acks on the instance of the stream take the refill path,
// every one of them; acks through another instance never do, and still
// return the credit. Variants: messages trickling in while the streams
// consume (refills and the dispatcher's fills compete for credit), and each
// delivery acked alone, concurrently (refills of one stream race).
func TestAckRefillFlowControl(t *testing.T) {
	rs := redistest.Start(t)
	mon := rfStartMonitor(t, rs, rs.Client(t, 0))
	const n, window = 500, 4
	// Each case has two fresh instances, x and y, so that their stream
	// numbers coincide: a token of y's stream 1 acked through x names a
	// stream x has too, and must still not refill it.
	type streamAt struct{ on, ackVia int }
	const x, y = 0, 1
	for _, tc := range []struct {
		name    string
		streams []streamAt
		window  int
		refill  bool // whether the acks are to take the refill path
		// trickle: the messages are enqueued a few at a time while the
		// streams consume, so that refills and the dispatcher's fills
		// (woken by each enqueue) compete for the same credit.
		trickle bool
		// parallel: each delivery is acked alone, concurrently, so that
		// refills of one stream race each other.
		parallel bool
	}{
		{"one stream", []streamAt{{x, x}}, window, true, false, false},
		{"three streams", []streamAt{{x, x}, {x, x}, {x, x}}, window, true, false, false},
		{"eight streams of two", []streamAt{{x, x}, {x, x}, {x, x}, {x, x}, {x, x}, {x, x}, {x, x}, {x, x}}, 2, true, false, false},
		{"acks through the other instance", []streamAt{{x, y}, {y, x}, {x, y}, {y, x}}, window, false, false, false},
		{"one stream, trickle", []streamAt{{x, x}}, window, true, true, false},
		{"three streams, trickle", []streamAt{{x, x}, {x, x}, {x, x}}, window, true, true, false},
		{"one stream, parallel acks", []streamAt{{x, x}}, 8, true, false, true},
		{"two streams, parallel acks, trickle", []streamAt{{x, x}, {x, x}}, 8, true, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ins := []*instance{startInstance(t, rs, instanceConfig{}), startInstance(t, rs, instanceConfig{})}
			a := ins[x]
			q := rfQueue("rf-flow", tc.name)
			n := n
			if tc.trickle || tc.parallel {
				n = 300 // slower per message; as many races
			}
			var ids []string
			if !tc.trickle {
				ids = enqueueN(t, a.client, q, n)
			}
			run := rfNewRun(t, n)
			var ws []*rfWorker
			for i, s := range tc.streams {
				ws = append(ws, run.addWith(fmt.Sprintf("stream %d", i), ins[s.on], ins[s.ackVia],
					&qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: uint32(tc.window), LeaseDuration: lease(time.Minute)}, nil, tc.parallel))
			}
			if tc.trickle {
				// Not the run's context: the last enqueue must not be
				// cancelled by the end of the run it fed.
				ctx := ctxT(t, 30*time.Second)
				run.goFn(func(context.Context) {
					for i := 0; len(ids) < n; i++ {
						msgs := make([]*qbridgev1.BatchMessage, min(1+i%3, n-len(ids)))
						for j := range msgs {
							msgs[j] = &qbridgev1.BatchMessage{Payload: []byte("t" + itoa(len(ids)+j))}
						}
						r, err := a.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
						if err != nil {
							t.Errorf("enqueue: %v", err)
							return
						}
						ids = append(ids, r.GetIds()...) // read after run.stop
					}
				})
			}
			// Redis side: never more in flight than the windows allow.
			limit := int64(tc.window * len(tc.streams))
			var maxFlight atomic.Int64
			run.goFn(func(ctx context.Context) {
				tick := time.NewTicker(time.Millisecond) // a sampling rate, not synchronisation
				defer tick.Stop()
				for {
					select {
					case <-run.done:
						return
					case <-ctx.Done():
						return
					case <-tick.C:
					}
					f, err := a.rdb.HLen(ctx, rfInFlightKey(q)).Result()
					if err != nil {
						if ctx.Err() == nil {
							t.Errorf("sample in flight: %v", err)
						}
						return
					}
					if f > maxFlight.Load() {
						maxFlight.Store(f)
					}
				}
			})
			start := time.Now()
			run.wait(t, 30*time.Second)
			elapsed := time.Since(start)
			run.stop()
			run.exactlyOnce(t, ids)
			if m := maxFlight.Load(); m > limit {
				t.Fatalf("Redis had %d in flight at once; the windows allow %d", m, limit)
			}
			rfWantStats(t, a.client, q, 0, 0)
			refilled := mon.refilled(t, q)
			busy := 0
			for _, w := range ws {
				if m := w.maxHeld.Load(); m > int64(tc.window) {
					t.Fatalf("%s held up to %d; max_in_flight is %d", w.name, m, tc.window)
				}
				if w.received.Load() > 0 {
					busy++
				}
				for _, l := range w.leases(t) {
					got, want := refilled[l], 0
					if tc.refill {
						want = 1
					}
					if got != want {
						t.Fatalf("%s: lease %s settled by %d ack-and-claim calls; want %d", w.name, l.id, got, want)
					}
				}
			}
			if len(tc.streams) > 1 && busy < 2 {
				t.Fatalf("only %d of %d streams got work", busy, len(tc.streams))
			}
			t.Logf("%d messages in %v; %d ack-and-claim calls; most in flight at once %d (limit %d)",
				n, elapsed.Round(time.Millisecond), len(mon.calls(t, q)), maxFlight.Load(), limit)
		})
	}
}

// ---------------------------------------------------------------------------
// 2. Pause

// An ack-refill on a paused queue settles and claims nothing; nothing is
// delivered while paused; after ResumeQueue delivery goes on to the end.
func TestAckRefillRespectsPause(t *testing.T) {
	t.Parallel() // mostly waiting: overlaps with the others' work
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	mon := rfStartMonitor(t, rs, in.rdb)
	const n, window = 40, 4
	for _, streams := range []int{1, 3} {
		t.Run(fmt.Sprintf("%d streams", streams), func(t *testing.T) {
			t.Parallel() // mostly waiting out the quiet window
			ctx := ctxT(t, 30*time.Second)
			q := fmt.Sprintf("rf-pause-%d", streams)
			ids := enqueueN(t, in.client, q, n)
			run := rfNewRun(t, n)
			gate := make(chan struct{})
			var ws []*rfWorker
			for i := range streams {
				ws = append(ws, run.add(fmt.Sprintf("stream %d", i), in, in,
					&qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: window, LeaseDuration: lease(time.Minute)}, gate))
			}
			held := int64(streams * window)
			eventually(t, 10*time.Second, "every stream holds a full window", func() bool {
				for _, w := range ws {
					if w.holding.Load() != window {
						return false
					}
				}
				return true
			})
			rfWantStats(t, in.client, q, n-held, held)
			if _, err := in.admin.PauseQueue(ctx, &qbridgev1.PauseQueueRequest{Queue: q}); err != nil {
				t.Fatal(err)
			}
			before := len(mon.calls(t, q))
			close(gate) // every stream acks all it holds
			eventually(t, 10*time.Second, "the held deliveries acked", func() bool { return run.settled.Load() == held })
			// The refill ran inside each Ack: had it claimed, it would show now.
			rfWantStats(t, in.client, q, n-held, 0)
			acks := int64(0)
			for _, w := range ws {
				acks += w.ackCalls.Load()
			}
			if calls := mon.calls(t, q)[before:]; int64(len(calls)) != acks {
				t.Fatalf("%d ack-and-claim calls for %d Acks while paused; want one each", len(calls), acks)
			}
			// Longer than a paused dispatcher's periodic look (1s).
			run.quiet(t, 1200*time.Millisecond)
			rfWantStats(t, in.client, q, n-held, 0)
			if _, err := in.admin.ResumeQueue(ctx, &qbridgev1.ResumeQueueRequest{Queue: q}); err != nil {
				t.Fatal(err)
			}
			run.wait(t, 20*time.Second)
			run.stop()
			run.exactlyOnce(t, ids)
			rfWantStats(t, in.client, q, 0, 0)
			for _, w := range ws {
				if m := w.maxHeld.Load(); m > window {
					t.Fatalf("%s held up to %d; max_in_flight is %d", w.name, m, window)
				}
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 3. max_messages

// A stream with max_messages N takes exactly N in all, however it acks:
// its acks never take the refill path (which does not count against N).
func TestAckRefillNotForMaxMessages(t *testing.T) {
	t.Parallel() // mostly waiting: overlaps with the others' work
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	mon := rfStartMonitor(t, rs, in.rdb)
	const n = 30
	for _, tc := range []struct {
		name   string
		max    int
		window int
	}{
		{"one, window four", 1, 4},
		{"five, window two", 5, 2},
		{"ten, window three", 10, 3},
		{"window larger than max", 3, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // mostly waiting out the quiet window
			q := rfQueue("rf-max", tc.name)
			enqueueN(t, in.client, q, n)
			run := rfNewRun(t, tc.max)
			w := run.add("limited", in, in, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: uint32(tc.window),
				MaxMessages: uint32(tc.max), LeaseDuration: lease(time.Minute)}, nil)
			run.wait(t, 10*time.Second)
			// A refill would have claimed inside the last Ack.
			rfWantStats(t, in.client, q, int64(n-tc.max), 0)
			run.quiet(t, 200*time.Millisecond)
			rfWantStats(t, in.client, q, int64(n-tc.max), 0)
			if got := w.received.Load(); got != int64(tc.max) {
				t.Fatalf("received %d; max_messages is %d", got, tc.max)
			}
			if m := w.maxHeld.Load(); m > int64(tc.window) {
				t.Fatalf("held up to %d; max_in_flight is %d", m, tc.window)
			}
			if calls := mon.calls(t, q); len(calls) != 0 {
				t.Fatalf("%d acks of a max_messages stream took the refill path: %+v", len(calls), calls)
			}
		})
	}

	// Beside an unlimited stream on the same queue, which refills on every
	// ack and drains the rest.
	t.Run("beside an unlimited stream", func(t *testing.T) {
		const q, max, total = "rf-max-beside", 6, 200
		ids := enqueueN(t, in.client, q, total)
		run := rfNewRun(t, total)
		lim := run.add("limited", in, in, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4, MaxMessages: max, LeaseDuration: lease(time.Minute)}, nil)
		free := run.add("unlimited", in, in, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4, LeaseDuration: lease(time.Minute)}, nil)
		run.wait(t, 20*time.Second)
		run.stop()
		run.exactlyOnce(t, ids)
		rfWantStats(t, in.client, q, 0, 0)
		if got := lim.received.Load(); got > max {
			t.Fatalf("the limited stream received %d; max_messages is %d", got, max)
		}
		refilled := mon.refilled(t, q)
		for _, l := range lim.leases(t) {
			if refilled[l] != 0 {
				t.Fatalf("the limited stream's lease %s was settled by an ack-and-claim call", l.id)
			}
		}
		for _, l := range free.leases(t) {
			if refilled[l] != 1 {
				t.Fatalf("the unlimited stream's lease %s was settled by %d ack-and-claim calls; want 1", l.id, refilled[l])
			}
		}
		t.Logf("limited stream: %d, unlimited: %d", lim.received.Load(), free.received.Load())
	})
}

// ---------------------------------------------------------------------------
// 4. Priority streams beside single-queue streams

// Priority streams over [hi lo] and single-queue streams on lo drain both
// queues together: every message once; each priority stream gets its hi
// messages in order and all of them before any lo message (strict priority:
// a fill takes from hi first, and hi has no other consumers); the single
// streams refill on ack, the priority streams never do. Then credit freed
// by settling a lo delivery of a priority stream goes to hi first (the
// property of TestPriorityOrderAndPreemption), while single streams refill
// beside it.
func TestFillManyWithPriorityStreams(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	mon := rfStartMonitor(t, rs, a.rdb)
	const nHi, nLo = 20, 300
	var ids []string
	for i := range nHi {
		ids = append(ids, admEnqueue(t, a.client, &qbridgev1.EnqueueRequest{Queue: "hi", Payload: []byte(fmt.Sprintf("hi-%03d", i))}).GetId())
	}
	msgs := make([]*qbridgev1.BatchMessage, nLo)
	for i := range msgs {
		msgs[i] = &qbridgev1.BatchMessage{Payload: []byte(fmt.Sprintf("lo-%03d", i))}
	}
	r, err := a.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: "lo", Messages: msgs})
	if err != nil {
		t.Fatal(err)
	}
	ids = append(ids, r.GetIds()...)

	run := rfNewRun(t, nHi+nLo)
	lz := lease(time.Minute)
	prio := []*rfWorker{
		run.add("priority w1", a, a, &qbridgev1.ConsumeRequest{Queues: []string{"hi", "lo"}, MaxInFlight: 1, LeaseDuration: lz}, nil),
		run.add("priority w3", a, a, &qbridgev1.ConsumeRequest{Queues: []string{"hi", "lo"}, MaxInFlight: 3, LeaseDuration: lz}, nil),
		run.add("priority on b", b, b, &qbridgev1.ConsumeRequest{Queues: []string{"hi", "lo"}, MaxInFlight: 2, LeaseDuration: lz}, nil),
	}
	single := []*rfWorker{
		run.add("single 1", a, a, &qbridgev1.ConsumeRequest{Queue: "lo", MaxInFlight: 4, LeaseDuration: lz}, nil),
		run.add("single 2", a, a, &qbridgev1.ConsumeRequest{Queue: "lo", MaxInFlight: 4, LeaseDuration: lz}, nil),
		run.add("single on b", b, b, &qbridgev1.ConsumeRequest{Queue: "lo", MaxInFlight: 4, LeaseDuration: lz}, nil),
	}
	run.wait(t, 30*time.Second)
	run.stop()
	run.exactlyOnce(t, ids)
	for _, q := range []string{"hi", "lo"} {
		rfWantStats(t, a.client, q, 0, 0)
	}
	refilled := map[string]map[rfLease]int{"hi": mon.refilled(t, "hi"), "lo": mon.refilled(t, "lo")}
	for i, w := range append(append([]*rfWorker{}, prio...), single...) {
		if m := w.maxHeld.Load(); m > w.window {
			t.Fatalf("%s held up to %d; max_in_flight is %d", w.name, m, w.window)
		}
		isPrio := i < len(prio)
		lastHi, sawLo := -1, false
		for _, d := range w.deliveries() {
			q, idx, _ := strings.Cut(string(d.GetPayload()), "-")
			if d.GetQueue() != q {
				t.Fatalf("%s: %q came from %s", w.name, d.GetPayload(), d.GetQueue())
			}
			l := rfLeaseOf(t, d)
			switch {
			case isPrio && refilled[q][l] != 0:
				t.Fatalf("%s: an ack of a priority stream took the refill path (%s)", w.name, d.GetPayload())
			case !isPrio && refilled[q][l] != 1:
				t.Fatalf("%s: %s was settled by %d ack-and-claim calls; want 1", w.name, d.GetPayload(), refilled[q][l])
			case !isPrio && q != "lo":
				t.Fatalf("%s consumes lo only but got %q", w.name, d.GetPayload())
			}
			if q == "lo" {
				sawLo = true
				continue
			}
			if sawLo {
				t.Fatalf("%s got %q after a lo message: hi was not empty when lo was taken (order %v)", w.name, d.GetPayload(), rfPayloads(w.deliveries()))
			}
			if i, _ := strconv.Atoi(idx); i <= lastHi {
				t.Fatalf("%s got hi out of order: %v", w.name, rfPayloads(w.deliveries()))
			} else {
				lastHi = i
			}
		}
	}

	// Preemption beside refilling single streams.
	t.Run("preemption", func(t *testing.T) {
		// Queues of its own: the streams above may still be leaving.
		const hi, lo, more = "hi2", "lo2", 40
		enqueueN(t, a.client, lo, more)
		p := consume(t, a.client, &qbridgev1.ConsumeRequest{Queues: []string{hi, lo}, MaxInFlight: 1, LeaseDuration: lz})
		s1 := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: lo, MaxInFlight: 2, LeaseDuration: lz})
		s2 := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: lo, MaxInFlight: 2, LeaseDuration: lz})
		seen := map[string]bool{}
		note := func(ds ...*qbridgev1.Delivery) []*qbridgev1.Delivery {
			t.Helper()
			for _, d := range ds {
				if seen[d.GetId()] {
					t.Fatalf("%q delivered twice", d.GetPayload())
				}
				seen[d.GetId()] = true
			}
			return ds
		}
		held := note(p.next(t, 10*time.Second))[0]
		h1, h2 := note(rfTake(t, s1, 2)...), note(rfTake(t, s2, 2)...)
		if held.GetQueue() != lo {
			t.Fatalf("the priority stream got %q from %s; hi is empty", held.GetPayload(), held.GetQueue())
		}
		for round := range 3 {
			urgent := fmt.Sprintf("urgent-%d", round)
			admEnqueue(t, a.client, &qbridgev1.EnqueueRequest{Queue: hi, Payload: []byte(urgent)})
			if err := ack(t, a.client, h1...); err != nil {
				t.Fatal(err)
			}
			h1 = note(rfTake(t, s1, 2)...)
			// The stream is full while urgent waits; settling its lo
			// delivery frees the credit, which goes to hi first.
			if err := ack(t, a.client, held); err != nil {
				t.Fatal(err)
			}
			d := note(p.next(t, 10*time.Second))[0]
			if string(d.GetPayload()) != urgent || d.GetQueue() != hi {
				t.Fatalf("round %d: after settling %q got %q from %s; want %q from %s", round, held.GetPayload(), d.GetPayload(), d.GetQueue(), urgent, hi)
			}
			if err := ack(t, a.client, d); err != nil {
				t.Fatal(err)
			}
			held = note(p.next(t, 10*time.Second))[0]
			if held.GetQueue() != lo {
				t.Fatalf("round %d: after the urgent message got %q from %s; want %s", round, held.GetPayload(), held.GetQueue(), lo)
			}
			if err := ack(t, a.client, h2...); err != nil {
				t.Fatal(err)
			}
			h2 = note(rfTake(t, s2, 2)...)
		}
		p.none(t)
		s1.none(t)
		s2.none(t)
		rfWantStats(t, a.client, hi, 0, 0)
		n := int64(len(seen) - 3) // less the urgent ones
		rfWantStats(t, a.client, lo, more-n, 5)
	})
}

func rfPayloads(ds []*qbridgev1.Delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = string(d.GetPayload())
	}
	return out
}

// ---------------------------------------------------------------------------
// 5. One Ack, tokens of two streams

// An Ack that carries the tokens of two streams settles both; when they
// share the queue it cannot refill one stream for the other's credit, so
// it takes the plain path (tokens of different queues are separate groups,
// each of one stream, and refill each). Either way both streams keep
// receiving, never above their window, every message once.
func TestAckRefillTokensOfTwoStreams(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	mon := rfStartMonitor(t, rs, a.rdb)
	const window, rounds = 3, 8
	for _, tc := range []struct {
		name          string
		q1, q2        string
		on2           *instance // where the second stream is
		refillsPerAck int       // ack-and-claim calls per Ack
		ackVia        *instance
	}{
		{"same queue", "rf-two", "rf-two", a, 0, a},
		{"same queue, streams on two instances", "rf-two-x", "rf-two-x", b, 0, a},
		{"different queues", "rf-two-q1", "rf-two-q2", a, 2, a},
	} {
		t.Run(tc.name, func(t *testing.T) {
			per := window * rounds
			var ids []string
			if tc.q1 == tc.q2 {
				ids = enqueueN(t, a.client, tc.q1, 2*per)
			} else {
				ids = append(enqueueN(t, a.client, tc.q1, per), enqueueN(t, a.client, tc.q2, per)...)
			}
			s1 := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: tc.q1, MaxInFlight: window, LeaseDuration: lease(time.Minute)})
			s2 := consume(t, tc.on2.client, &qbridgev1.ConsumeRequest{Queue: tc.q2, MaxInFlight: window, LeaseDuration: lease(time.Minute)})
			before := len(mon.calls(t, tc.q1))
			if tc.q2 != tc.q1 {
				before += len(mon.calls(t, tc.q2))
			}
			seen := map[string]int{}
			for round := range rounds {
				d1, d2 := rfTake(t, s1, window), rfTake(t, s2, window)
				// Both windows are full: nothing more may come.
				_, f := stats(t, a.client, tc.q1)
				if tc.q2 != tc.q1 {
					_, f2 := stats(t, a.client, tc.q2)
					f += f2
				}
				if f != 2*window {
					t.Fatalf("round %d: %d in flight; want the two windows, %d", round, f, 2*window)
				}
				s1.none(t)
				s2.none(t)
				var toks []string
				for i := range window { // interleaved
					toks = append(toks, d1[i].GetAckToken(), d2[i].GetAckToken())
					seen[d1[i].GetId()]++
					seen[d2[i].GetId()]++
				}
				resp, err := rfAckToks(t, tc.ackVia.client, toks...)
				if err != nil || resp.GetAcked() != uint32(2*window) {
					t.Fatalf("round %d: ack of both streams' tokens = %v, %v; want %d acked", round, resp, err, 2*window)
				}
			}
			for _, id := range ids {
				if seen[id] != 1 {
					t.Fatalf("message %s delivered %d times; want once", id, seen[id])
				}
			}
			rfWantStats(t, a.client, tc.q1, 0, 0)
			rfWantStats(t, a.client, tc.q2, 0, 0)
			after := len(mon.calls(t, tc.q1))
			if tc.q2 != tc.q1 {
				after += len(mon.calls(t, tc.q2))
			}
			if got, want := after-before, tc.refillsPerAck*rounds; got != want {
				t.Fatalf("%d ack-and-claim calls for %d Acks; want %d", got, rounds, want)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 6. Stale tokens

// Stale tokens in an ack-refill make the Ack FAILED_PRECONDITION, as on the
// plain path, and never make the stream take more than its window: the
// refill claims only the credit the stream had plus what the ack freed of
// the leases it still counted as held.
func TestAckRefillStaleTokens(t *testing.T) {
	t.Parallel() // mostly waiting: overlaps with the others' work
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	mon := rfStartMonitor(t, rs, in.rdb)

	t.Run("acked twice", func(t *testing.T) {
		const q, n, window = "rf-stale-twice", 40, 4
		ids := enqueueN(t, in.client, q, n)
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: window, LeaseDuration: lease(time.Minute)})
		seen := map[string]int{}
		var held []*qbridgev1.Delivery // delivered, not acked
		take := func(k int) {
			t.Helper()
			for _, d := range rfTake(t, s, k) {
				seen[d.GetId()]++
				held = append(held, d)
			}
		}
		drop := func(ds ...*qbridgev1.Delivery) {
			for _, d := range ds {
				for i, h := range held {
					if h == d {
						held = append(held[:i], held[i+1:]...)
						break
					}
				}
			}
		}
		take(window)
		first := append([]*qbridgev1.Delivery(nil), held...)
		if r, err := rfAckToks(t, in.client, rfToks(first...)...); err != nil || r.GetAcked() != window {
			t.Fatalf("first ack = %v, %v", r, err)
		}
		drop(first...)
		// The refill came with the ack: counted at once.
		rfWantStats(t, in.client, q, n-2*window, window)
		take(window)
		second := append([]*qbridgev1.Delivery(nil), held...)
		s.none(t)

		ready := int64(n - 2*window)
		for _, st := range []struct {
			name    string
			toks    []string
			msg     string
			settles []*qbridgev1.Delivery // the tokens that still held a lease
		}{
			{"the same tokens again", rfToks(first...), "4 of 4 ack tokens no longer hold a lease", nil},
			{"one token twice in one call", rfToks(second[0], second[0]), "1 of 2 ack tokens", second[:1]},
			{"a stale and a fresh token", rfToks(first[1], second[1]), "1 of 2 ack tokens", second[1:2]},
		} {
			calls := len(mon.calls(t, q))
			_, err := rfAckToks(t, in.client, st.toks...)
			wantCode(t, err, codes.FailedPrecondition, st.msg)
			if got := len(mon.calls(t, q)) - calls; got != 1 {
				t.Fatalf("%s: %d ack-and-claim calls; want 1 (the refill path)", st.name, got)
			}
			drop(st.settles...)
			ready -= int64(len(st.settles))
			// Refilled by exactly what the ack freed, inside the Ack.
			rfWantStats(t, in.client, q, ready, window)
			take(len(st.settles))
			s.none(t)
		}
		// Drain the rest: each ack refills the window from what is left.
		for len(held) > 0 {
			if r, err := rfAckToks(t, in.client, rfToks(held...)...); err != nil || int(r.GetAcked()) != len(held) {
				t.Fatalf("ack of %d = %v, %v", len(held), r, err)
			}
			held = nil
			k := min(window, n-len(seen))
			rfWantStats(t, in.client, q, int64(n-len(seen)-k), int64(k))
			take(k)
		}
		s.none(t)
		rfWantStats(t, in.client, q, 0, 0)
		for _, id := range ids {
			if seen[id] != 1 {
				t.Fatalf("message %s delivered %d times; want once", id, seen[id])
			}
		}
	})

	t.Run("expired and redelivered", func(t *testing.T) {
		t.Parallel() // mostly waiting for the lease to run out
		const q, window = "rf-stale-expired", 2
		ids := enqueueN(t, in.client, q, window)
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: window, LeaseDuration: lease(time.Second)})
		old := rfTake(t, s, window)
		// Not acked: the leases run out, the reaper requeues, the stream
		// gets the same messages again with new tokens.
		again := make([]*qbridgev1.Delivery, window)
		for i := range again {
			again[i] = s.next(t, 10*time.Second)
			if again[i].GetId() != ids[i] || again[i].GetAttempt() != 2 {
				t.Fatalf("redelivery %d: %s attempt %d; want %s attempt 2", i, again[i].GetId(), again[i].GetAttempt(), ids[i])
			}
		}
		if _, err := in.client.ExtendLease(ctxT(t, 5*time.Second), &qbridgev1.ExtendLeaseRequest{AckTokens: rfToks(again...), LeaseDuration: lease(time.Minute)}); err != nil {
			t.Fatalf("extend the redeliveries: %v", err)
		}
		more := enqueueN(t, in.client, q, 10)
		rfWantStats(t, in.client, q, 10, window)
		calls := len(mon.calls(t, q))
		_, err := rfAckToks(t, in.client, rfToks(old...)...)
		wantCode(t, err, codes.FailedPrecondition, "2 of 2 ack tokens no longer hold a lease")
		if got := len(mon.calls(t, q)) - calls; got != 1 {
			t.Fatalf("%d ack-and-claim calls for the stale ack; want 1", got)
		}
		rfWantStats(t, in.client, q, 10, window)
		s.none(t)
		// The current tokens refill as usual.
		if r, err := rfAckToks(t, in.client, rfToks(again...)...); err != nil || r.GetAcked() != window {
			t.Fatalf("ack of the redeliveries = %v, %v", r, err)
		}
		rfWantStats(t, in.client, q, 10-window, window)
		for i := range window {
			if d := s.next(t, 10*time.Second); d.GetId() != more[i] {
				t.Fatalf("after the ack got %s; want %s", d.GetId(), more[i])
			}
		}
		s.none(t)
	})

	// The stream forgets a lease when it runs out, and takes new messages
	// for the credit; with no reaper the expired lease is still in flight
	// in Redis, so acking it settles it. That settles nothing the stream
	// counted: the refill must claim nothing (it may claim the credit plus
	// what it settled only up to the credit plus the tokens still held).
	t.Run("expired, not yet reaped", func(t *testing.T) {
		t.Parallel() // mostly waiting for the lease to run out
		rs := redistest.Start(t)
		in := startInstance(t, rs, instanceConfig{serverOpts: []server.Option{server.WithReapInterval(time.Hour)}})
		mon := rfStartMonitor(t, rs, in.rdb)
		const q, n, window = "rf-stale-unreaped", 10, 2
		ids := enqueueN(t, in.client, q, n)
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: window, LeaseDuration: lease(time.Second)})
		old := rfTake(t, s, window)
		// The stream's own expiry frees its window: the next two come.
		fresh := rfTake(t, s, window)
		for i, d := range fresh {
			if d.GetId() != ids[window+i] || d.GetAttempt() != 1 {
				t.Fatalf("after the leases ran out got %s attempt %d; want %s attempt 1", d.GetId(), d.GetAttempt(), ids[window+i])
			}
		}
		if _, err := in.client.ExtendLease(ctxT(t, 5*time.Second), &qbridgev1.ExtendLeaseRequest{AckTokens: rfToks(fresh...), LeaseDuration: lease(time.Minute)}); err != nil {
			t.Fatalf("extend: %v", err)
		}
		rfWantStats(t, in.client, q, n-2*window, 2*window) // the old ones are not reaped
		calls := len(mon.calls(t, q))
		if r, err := rfAckToks(t, in.client, rfToks(old...)...); err != nil || r.GetAcked() != window {
			t.Fatalf("ack of the expired, unreaped leases = %v, %v; want %d acked", r, err, window)
		}
		if got := mon.calls(t, q)[calls:]; len(got) != 1 {
			t.Fatalf("ack-and-claim calls %+v; want one (the refill path)", got)
		}
		rfWantStats(t, in.client, q, n-2*window, window)
		s.none(t)
		if r, err := rfAckToks(t, in.client, rfToks(fresh...)...); err != nil || r.GetAcked() != window {
			t.Fatalf("ack of the current leases = %v, %v", r, err)
		}
		rfWantStats(t, in.client, q, n-3*window, window)
		for i := range window {
			if d := s.next(t, 10*time.Second); d.GetId() != ids[2*window+i] {
				t.Fatalf("got %s; want %s", d.GetId(), ids[2*window+i])
			}
		}
		s.none(t)
	})
}

// ---------------------------------------------------------------------------
// 7. Auto-ack and lease streams on one queue

// Auto-ack streams (pops) and lease streams (claims, refilled on ack) share
// a queue, on two instances: the dispatcher's one round trip mixes pops and
// claims; every message is delivered exactly once, and nothing is left.
func TestFillManyAutoAckAndLeases(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	mon := rfStartMonitor(t, rs, a.rdb)
	const q, bulk, window = "rf-mixed", 500, 4
	lz := lease(time.Minute)

	// The lease streams first, their acks held back: once each holds a full
	// window, all are attached. Then the auto-ack streams, until each has
	// had something. Only then the bulk, so that all compete for it.
	type at struct {
		name   string
		on     *instance
		window uint32
	}
	leaseStreams := []at{{"lease a1", a, window}, {"lease a2", a, window}, {"lease b", b, window}}
	autoStreams := []at{{"auto a", a, 4}, {"auto b", b, 8}}
	warm := len(leaseStreams) * window
	ids := enqueueN(t, a.client, q, warm)
	run := rfNewRun(t, 1<<30) // want is set below
	gate := make(chan struct{})
	var lw, aw []*rfWorker
	for _, s := range leaseStreams {
		lw = append(lw, run.add(s.name, s.on, s.on, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: s.window, LeaseDuration: lz}, gate))
	}
	eventually(t, 10*time.Second, "every lease stream holds a full window", func() bool {
		for _, w := range lw {
			if w.holding.Load() != window {
				return false
			}
		}
		return true
	})
	for _, s := range autoStreams {
		aw = append(aw, run.add(s.name, s.on, nil, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: s.window, AutoAck: true}, nil))
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ready := true
		for _, w := range aw {
			ready = ready && w.received.Load() > 0
		}
		if ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the auto-ack streams did not all get a message within 10s")
		}
		had := run.settled.Load()
		ids = append(ids, enqueueN(t, a.client, q, 1)...)
		eventually(t, 5*time.Second, "the message popped", func() bool { return run.settled.Load() > had })
	}
	run.setWant(len(ids) + bulk)
	close(gate)
	ids = append(ids, enqueueN(t, b.client, q, bulk)...)
	run.wait(t, 30*time.Second)
	run.stop()
	run.exactlyOnce(t, ids)
	rfWantStats(t, a.client, q, 0, 0)
	refilled := mon.refilled(t, q)
	var perAuto, perLease []int64
	for _, w := range aw {
		perAuto = append(perAuto, w.received.Load())
	}
	for _, w := range lw {
		if m := w.maxHeld.Load(); m > window {
			t.Fatalf("%s held up to %d; max_in_flight is %d", w.name, m, window)
		}
		for _, d := range w.deliveries() {
			if d.GetAckToken() == "" {
				t.Fatalf("%s: lease delivery %s has no ack token", w.name, d.GetId())
			}
			if l := rfLeaseOf(t, d); refilled[l] != 1 {
				t.Fatalf("%s: lease %s settled by %d ack-and-claim calls; want 1", w.name, l.id, refilled[l])
			}
		}
		perLease = append(perLease, w.received.Load())
	}
	for _, w := range aw {
		for _, d := range w.deliveries() {
			if d.GetAttempt() != 1 {
				t.Fatalf("%s: auto-ack delivery %s is attempt %d", w.name, d.GetId(), d.GetAttempt())
			}
		}
	}
	t.Logf("auto-ack streams got %v, lease streams %v", perAuto, perLease)
}

// ---------------------------------------------------------------------------
// Script cache lost mid-run

// The dispatcher's takes for several streams go to Redis as EVALSHAs in one
// pipeline; when Redis has lost its script cache (SCRIPT FLUSH, a restart)
// they are refused with NOSCRIPT and sent again once the scripts are
// loaded. Auto-ack streams and streams acked through the other instance
// (so that every fill is the dispatcher's) drain a queue while the cache is
// flushed twice: every message once, nothing left.
func TestTakeManyAfterScriptFlush(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	const q, n = "rf-flush", 600
	ids := enqueueN(t, a.client, q, n)
	run := rfNewRun(t, n)
	lz := lease(time.Minute)
	var ws []*rfWorker
	for i, s := range []struct{ on, via *instance }{{a, b}, {a, b}, {b, a}} {
		ws = append(ws, run.add(fmt.Sprintf("lease %d", i), s.on, s.via, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 3, LeaseDuration: lz}, nil))
	}
	for i, on := range []*instance{a, a, b} {
		ws = append(ws, run.add(fmt.Sprintf("auto %d", i), on, nil, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 2, AutoAck: true}, nil))
	}
	for _, at := range []int64{n / 3, 2 * n / 3} {
		eventually(t, 20*time.Second, fmt.Sprintf("%d settled", at), func() bool { return run.settled.Load() >= at })
		if err := a.rdb.ScriptFlush(ctxT(t, 5*time.Second)).Err(); err != nil {
			t.Fatal(err)
		}
	}
	run.wait(t, 30*time.Second)
	run.stop()
	run.exactlyOnce(t, ids)
	rfWantStats(t, a.client, q, 0, 0)
	var per []int64
	for _, w := range ws {
		if !w.autoAck && w.maxHeld.Load() > w.window {
			t.Fatalf("%s held up to %d; max_in_flight is %d", w.name, w.maxHeld.Load(), w.window)
		}
		per = append(per, w.received.Load())
	}
	t.Logf("per stream: %v", per)
}

// ---------------------------------------------------------------------------
// Results on the refill path

// An Ack that refills carries the results of its tokens like a plain Ack:
// each is kept, an empty one included, and a token without one keeps none.
func TestAckRefillKeepsResults(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	mon := rfStartMonitor(t, rs, in.rdb)
	const q = "rf-results"
	ids := enqueueN(t, in.client, q, 6)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 3, LeaseDuration: lease(time.Minute)})
	ds := rfTake(t, s, 3)
	res := map[string][]byte{ds[0].GetAckToken(): []byte("four"), ds[1].GetAckToken(): {}}
	ctx := ctxT(t, 10*time.Second)
	if r, err := in.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: rfToks(ds...), Results: res}); err != nil || r.GetAcked() != 3 {
		t.Fatalf("ack with results = %v, %v", r, err)
	}
	if calls := mon.calls(t, q); len(calls) != 1 {
		t.Fatalf("%d ack-and-claim calls; want 1", len(calls))
	}
	rfWantStats(t, in.client, q, 0, 3)
	for i, want := range []string{"four", ""} {
		r, err := in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: q, Id: ids[i]})
		if err != nil || r.GetState() != qbridgev1.ResultState_RESULT_STATE_SUCCEEDED || string(r.GetResult()) != want {
			t.Fatalf("result of %s = %v, %v; want %q", ids[i], r, err, want)
		}
	}
	_, err := in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: q, Id: ids[2]})
	wantCode(t, err, codes.NotFound, "no result")
	for i, d := range rfTake(t, s, 3) {
		if d.GetId() != ids[3+i] {
			t.Fatalf("refill %d is %s; want %s", i, d.GetId(), ids[3+i])
		}
	}
}
