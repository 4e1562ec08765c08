package chaos

// Cases 4, 5 and 6 of the fault-tolerance issue: Redis killed and restarted
// with its append-only file (4), Redis unreachable for a while (5), and a
// SIGTERM to one qbridged under load (6). Helpers of this file are named
// lc... (lifecycle).

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// ---- helpers: calls, confirmations, streams, process probes ----

// lcCall is one unary call as the client saw it.
type lcCall struct {
	start, end time.Time
	code       codes.Code
	peer       string // the server that answered, when known
}

// lcCalls records calls from many goroutines.
type lcCalls struct {
	mu    sync.Mutex
	calls []lcCall
}

func (c *lcCalls) add(x lcCall) {
	c.mu.Lock()
	c.calls = append(c.calls, x)
	c.mu.Unlock()
}

func (c *lcCalls) all() []lcCall {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]lcCall(nil), c.calls...)
}

// lcConfirms holds when each message's Enqueue returned OK (the ledger has
// no timestamps for that).
type lcConfirms struct {
	mu sync.Mutex
	at map[int]time.Time
}

func newLcConfirms() *lcConfirms { return &lcConfirms{at: map[int]time.Time{}} }

func (c *lcConfirms) set(n int, t time.Time) {
	c.mu.Lock()
	if _, ok := c.at[n]; !ok {
		c.at[n] = t
	}
	c.mu.Unlock()
}

func (c *lcConfirms) get(n int) (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.at[n]
	return t, ok
}

// between counts confirmations in [from, to].
func (c *lcConfirms) between(from, to time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := 0
	for _, t := range c.at {
		if !t.Before(from) && !t.After(to) {
			k++
		}
	}
	return k
}

// lcEnqueue sends one Enqueue of message n (dedup key n, keep_result) with
// its own deadline, and records it in l, calls and conf (either may be nil).
func lcEnqueue(ctx context.Context, qc qbridgev1.QueueServiceClient, l *ledger, queue string, n int, timeout time.Duration, calls *lcCalls, conf *lcConfirms) error {
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var p peer.Peer
	// Recorded before it is sent: a consumer may get the message before
	// this call returns, and the ledger counts a delivery of a message it
	// never saw sent as unexpected.
	l.sent(n, "", false)
	start := time.Now()
	r, err := qc.Enqueue(cctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: l.payload(n), DedupKey: strconv.Itoa(n), KeepResult: true}, grpc.Peer(&p))
	end := time.Now()
	l.sent(n, r.GetId(), err == nil)
	if err == nil && conf != nil {
		conf.set(n, end)
	}
	if calls != nil {
		c := lcCall{start: start, end: end, code: status.Code(err)}
		if p.Addr != nil {
			c.peer = p.Addr.String()
		}
		calls.add(c)
	}
	return err
}

// lcProducers runs conc goroutines that take message numbers from next and
// enqueue each (retrying it every 20 ms until it is confirmed or ctx ends)
// until stop is set. Wait on the returned group.
func lcProducers(ctx context.Context, conc int, stop *atomic.Bool, next *atomic.Int64, send func(n int) error) *sync.WaitGroup {
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() && ctx.Err() == nil {
				n := int(next.Add(1) - 1)
				for ctx.Err() == nil {
					if send(n) == nil {
						break
					}
					select {
					case <-ctx.Done():
					case <-time.After(20 * time.Millisecond): // retry delay
					}
				}
			}
		}()
	}
	return &wg
}

// lcEnd is how one Consume stream ended.
type lcEnd struct {
	at   time.Time
	code codes.Code
	msg  string
}

// lcStream is a Consume client whose stream ends are recorded.
type lcStream struct {
	mu      sync.Mutex
	opens   int
	ends    []lcEnd
	held    []int // deliveries deliberately left unacked
	ackErrs []string
	done    chan struct{}
}

// lcConsume consumes queue on qc until ctx ends, recording every delivery
// in l. With ack it acks each delivery on its own (on qc); without, it
// holds them. With reopen it opens a new stream 50 ms after one ends,
// otherwise it returns after the first stream ended.
func lcConsume(ctx context.Context, qc qbridgev1.QueueServiceClient, l *ledger, queue string, window int, lease time.Duration, ack, reopen bool) *lcStream {
	s := &lcStream{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for ctx.Err() == nil {
			req := &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: uint32(window)}
			if lease > 0 {
				req.LeaseDuration = durationpb(lease)
			}
			s.mu.Lock()
			s.opens++
			s.mu.Unlock()
			err := func() error {
				st, err := qc.Consume(ctx, req)
				if err != nil {
					return err
				}
				for {
					r, err := st.Recv()
					if err != nil {
						return err
					}
					for _, d := range r.GetDeliveries() {
						n := l.delivered(d)
						if !ack {
							s.mu.Lock()
							s.held = append(s.held, n)
							s.mu.Unlock()
							continue
						}
						actx, cancel := context.WithTimeout(ctx, 5*time.Second)
						_, err := qc.Ack(actx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}})
						cancel()
						if err == nil {
							l.ackedOK(n)
						} else if ctx.Err() == nil {
							s.mu.Lock()
							s.ackErrs = append(s.ackErrs, fmt.Sprintf("message %d: %v", n, err))
							s.mu.Unlock()
						}
					}
				}
			}()
			if ctx.Err() != nil {
				return
			}
			st := status.Convert(err)
			s.mu.Lock()
			s.ends = append(s.ends, lcEnd{at: time.Now(), code: st.Code(), msg: st.Message()})
			s.mu.Unlock()
			if !reopen {
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond): // reconnect delay
			}
		}
	}()
	return s
}

func (s *lcStream) snapshot() (opens int, ends []lcEnd, held []int, ackErrs []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.opens, append([]lcEnd(nil), s.ends...), append([]int(nil), s.held...), append([]string(nil), s.ackErrs...)
}

// lcSettled reports whether every message delivered so far was acked (no
// Ack reply is still on its way).
func lcSettled(l *ledger) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for n := range l.deliveries {
		if !l.acked[n] {
			return false
		}
	}
	return true
}

// lcDeliveredAt returns the first delivery time of message n.
func lcDeliveredAt(l *ledger, n int) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ts := l.deliveries[n]; len(ts) > 0 {
		return ts[0], true
	}
	return time.Time{}, false
}

// lcLost lists the confirmed messages that were neither acked nor had an
// Ack applied whose reply was lost (call after l.resolve).
func lcLost(l *ledger) []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	var lost []int
	for n := range l.confirmed {
		if !l.acked[n] && !l.replyLost[n] {
			lost = append(lost, n)
		}
	}
	sort.Ints(lost)
	return lost
}

// lcWaitDrained waits until queue holds nothing in Redis (ready, in
// flight, leased or delayed) and every delivery was acked in the ledger; it
// returns what was left if that did not happen within.
func lcWaitDrained(rdb *redis.Client, l *ledger, queue string, within time.Duration) (string, bool) {
	var last string
	ok := waitFor(within, func() bool {
		s, err := strays(context.Background(), rdb, queue)
		switch {
		case err != nil:
			last = err.Error()
		case s != "":
			last = s
		case !lcSettled(l):
			last = "some deliveries are not acked yet"
		default:
			return true
		}
		return false
	})
	return last, ok
}

// lcProc is what /proc says about a process.
type lcProc struct {
	rssKB, threads, fds int
}

func (p lcProc) String() string {
	return fmt.Sprintf("rss=%.1fMB threads=%d fds=%d", float64(p.rssKB)/1024, p.threads, p.fds)
}

// lcProbe reads RSS, threads and open descriptors (readProcStat).
func lcProbe(pid int) (lcProc, error) {
	st, err := readProcStat(pid)
	if err == nil && st.Threads == 0 {
		err = fmt.Errorf("no Threads in /proc/%d/status", pid)
	}
	return lcProc{rssKB: int(st.RSS >> 10), threads: st.Threads, fds: st.FDs}, err
}

// lcSampler probes a process periodically.
type lcSampler struct {
	mu      sync.Mutex
	samples []lcSample
	stop    chan struct{}
	done    chan struct{}
}

type lcSample struct {
	at time.Time
	lcProc
}

func lcStartSampler(pid int, every time.Duration) *lcSampler {
	s := &lcSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			if p, err := lcProbe(pid); err == nil {
				s.mu.Lock()
				s.samples = append(s.samples, lcSample{time.Now(), p})
				s.mu.Unlock()
			}
			select {
			case <-s.stop:
				return
			case <-tk.C:
			}
		}
	}()
	return s
}

func (s *lcSampler) Stop() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

// max returns the component-wise maximum of the samples in [from, to] and
// how many there were.
func (s *lcSampler) max(from, to time.Time) (lcProc, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var m lcProc
	k := 0
	for _, x := range s.samples {
		if x.at.Before(from) || x.at.After(to) {
			continue
		}
		k++
		m.rssKB, m.threads, m.fds = max(m.rssKB, x.rssKB), max(m.threads, x.threads), max(m.fds, x.fds)
	}
	return m, k
}

// lcHealthPoller checks a server's health every interval on its own
// connection and records when each status was first and last seen.
type lcHealthPoller struct {
	mu      sync.Mutex
	samples []lcHealthSample
	stop    chan struct{}
	done    chan struct{}
}

type lcHealthSample struct {
	at     time.Time
	status healthpb.HealthCheckResponse_ServingStatus
	err    error
}

func lcPollHealth(t testing.TB, addr string, every time.Duration) *lcHealthPoller {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithConnectParams(connectParams))
	if err != nil {
		t.Fatal(err)
	}
	hc := healthpb.NewHealthClient(cc)
	h := &lcHealthPoller{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		defer cc.Close()
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
			cancel()
			h.mu.Lock()
			h.samples = append(h.samples, lcHealthSample{time.Now(), r.GetStatus(), err})
			h.mu.Unlock()
			select {
			case <-h.stop:
				return
			case <-tk.C:
			}
		}
	}()
	t.Cleanup(h.Stop)
	return h
}

func (h *lcHealthPoller) Stop() {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	<-h.done
}

// first returns the first sample at or after from with status st.
func (h *lcHealthPoller) first(from time.Time, st healthpb.HealthCheckResponse_ServingStatus) (time.Time, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.samples {
		if !s.at.Before(from) && s.err == nil && s.status == st {
			return s.at, true
		}
	}
	return time.Time{}, false
}

// count counts the samples in [from, to) with status st (and answered).
func (h *lcHealthPoller) count(from, to time.Time, st healthpb.HealthCheckResponse_ServingStatus) (n, total int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.samples {
		if s.at.Before(from) || !s.at.Before(to) {
			continue
		}
		total++
		if s.err == nil && s.status == st {
			n++
		}
	}
	return n, total
}

// describe counts the samples in [from, to) by answer.
func (h *lcHealthPoller) describe(from, to time.Time) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := map[string]int{}
	var keys []string
	for _, s := range h.samples {
		if s.at.Before(from) || !s.at.Before(to) {
			continue
		}
		k := s.status.String()
		if s.err != nil {
			k = "error:" + status.Code(s.err).String()
		}
		if m[k] == 0 {
			keys = append(keys, k)
		}
		m[k]++
	}
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s:%d", k, m[k]))
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// lcGoroutineHeader starts each goroutine of a Go traceback.
var lcGoroutineHeader = regexp.MustCompile(`(?m)^goroutine [1-9][0-9]* [^\n]*\[`)

// lcGoroutines ends d with SIGQUIT (it must run with GOTRACEBACK=all) and
// counts the goroutines in the dump it writes to its log.
func lcGoroutines(d *daemon) (int, error) {
	off := int64(0)
	if fi, err := os.Stat(d.logf); err == nil {
		off = fi.Size()
	}
	d.signal(syscall.SIGQUIT)
	if _, ok := d.Wait(10 * time.Second); !ok {
		return 0, fmt.Errorf("qbridged did not exit on SIGQUIT")
	}
	f, err := os.Open(d.logf)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if _, err := f.Seek(off, 0); err != nil {
		return 0, err
	}
	var b strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		b.WriteString(sc.Text())
		b.WriteByte('\n')
	}
	n := len(lcGoroutineHeader.FindAllStringIndex(b.String(), -1))
	if n == 0 {
		return 0, fmt.Errorf("no goroutine dump in the log")
	}
	return n, nil
}

func lcCodes(calls []lcCall) string {
	m := map[codes.Code]int{}
	for _, c := range calls {
		m[c.code]++
	}
	var ks []int
	for k := range m {
		ks = append(ks, int(k))
	}
	sort.Ints(ks)
	var parts []string
	for _, k := range ks {
		parts = append(parts, fmt.Sprintf("%s:%d", codes.Code(k), m[codes.Code(k)]))
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func lcMs(d time.Duration) string { return d.Round(time.Millisecond).String() }

// ---- case 4: Redis killed (SIGKILL) and restarted with its AOF ----

// Case 4: producers enqueue under load; redis-server (AOF on) is killed
// with SIGKILL and restarted on the same port and directory, so it reloads
// its AOF, and qbridged reconnects by itself; the producers go on a little,
// then stop, and only then is everything consumed (so no Ack races the
// kill). With appendfsync always no confirmed message may be lost. With
// everysec the lost ones are counted, and each must have been confirmed
// within the last second before the kill.
func TestRedisKillAOFAlways(t *testing.T)   { lcRedisKill(t, "always") }
func TestRedisKillAOFEverysec(t *testing.T) { lcRedisKill(t, "everysec") }

func lcRedisKill(t *testing.T, fsync string) {
	const window = time.Second // what everysec may lose, per the issue
	rs := redistest.Start(t, redistest.WithAOF(), redistest.WithArgs("--appendfsync", fsync))
	rdb := rs.Client(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), pick(60*time.Second, 10*time.Minute))
	defer cancel()
	if got, err := rdb.ConfigGet(ctx, "appendfsync").Result(); err != nil || got["appendfsync"] != fsync {
		t.Fatalf("redis appendfsync = %v (%v), want %s", got, err, fsync)
	}
	version := lcInfoField(ctx, rdb, "server", "redis_version")
	waitaof := "supported"
	if err := rdb.Do(ctx, "WAITAOF", 1, 0, 100).Err(); err != nil {
		waitaof = "unsupported"
		if !strings.Contains(strings.ToLower(err.Error()), "unknown command") {
			waitaof = "error:" + err.Error()
		}
	}

	d := startDaemon(t, rs.URL(0))
	qc := queueClient(dial(t, d.Addr))
	queue := "chaos-aof-" + fsync
	l := newLedger("aof-" + fsync)
	conf := newLcConfirms()

	var stop atomic.Bool
	var next atomic.Int64
	pwg := lcProducers(ctx, pick(8, 16), &stop, &next, func(n int) error {
		return lcEnqueue(ctx, qc, l, queue, n, 2*time.Second, nil, conf)
	})
	tStart := time.Now()
	select { // the fault schedule: load first
	case <-time.After(pick(1500*time.Millisecond, 10*time.Second)):
	case <-ctx.Done():
	}
	delayedFsync := lcInfoField(ctx, rdb, "persistence", "aof_delayed_fsync")
	tKill := time.Now()
	rs.Kill(t)
	tDead := time.Now()
	confirmedAtKill := l.confirmedCount()
	rs.Restart(t)
	tUp := time.Now()

	// qbridged reconnects by itself: Enqueue is confirmed again.
	recovered := waitFor(5*time.Second, func() bool { return conf.between(tUp, time.Now().Add(time.Hour)) > 0 })
	firstOK := "never"
	if at := lcFirstAfter(conf, tDead); !at.IsZero() {
		firstOK = lcMs(at.Sub(tUp))
	}
	if !recovered {
		t.Errorf("no Enqueue was confirmed within 5s of Redis answering again (restart at +%v)", lcMs(tUp.Sub(tStart)))
	}
	select { // load after the restart
	case <-time.After(pick(500*time.Millisecond, 3*time.Second)):
	case <-ctx.Done():
	}
	stop.Store(true)
	pwg.Wait()
	afterRestart := conf.between(tUp, time.Now().Add(time.Hour))

	// Drain everything.
	cctx, stopConsumers := context.WithCancel(ctx)
	var cwg sync.WaitGroup
	for i := 0; i < 4; i++ {
		cwg.Add(1)
		go func() { defer cwg.Done(); consume(cctx, qc, l, queue, consumeOpts{window: 32}) }()
	}
	left, drained := lcWaitDrained(rdb, l, queue, pick(30*time.Second, 5*time.Minute))
	stopConsumers()
	cwg.Wait()
	if !drained {
		t.Errorf("the queue did not drain: %s", left)
	}

	inWindow := conf.between(tKill.Add(-window), tDead)
	extra := fmt.Sprintf("fsync=%s confirmed_at_kill=%d confirmed_last_%v=%d confirmed_after_restart=%d redis_down=%v first_ok_vs_restart=%v aof_delayed_fsync=%s redis=%s waitaof=%s",
		fsync, confirmedAtKill, window, inWindow, afterRestart, lcMs(tUp.Sub(tKill)), firstOK, delayedFsync, version, waitaof)
	if fsync == "always" {
		l.report(t, qc, queue, extra)
		checkNoStrays(t, rdb, queue)
		return
	}

	// everysec: losing the last second is allowed, anything older is not.
	rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
	l.resolve(rctx, qc, queue)
	rcancel()
	s := l.summarize()
	lost := lcLost(l)
	var outside []string
	oldest := time.Duration(0)
	l.mu.Lock()
	where := maps.Clone(l.where)
	l.mu.Unlock()
	for _, n := range lost {
		at, ok := conf.get(n)
		if !ok {
			outside = append(outside, fmt.Sprintf("%d: no confirmation time", n))
			continue
		}
		oldest = max(oldest, tKill.Sub(at))
		if at.Before(tKill.Add(-window)) {
			outside = append(outside, fmt.Sprintf("%d: confirmed %v before the kill (%s)", n, lcMs(tKill.Sub(at)), where[n]))
		}
	}
	summaryLine(t, fmt.Sprintf("CHAOS %-28s %s %s lost_oldest_before_kill=%v lost_outside_window=%d", t.Name(), s, extra, lcMs(oldest), len(outside)))
	if len(outside) > 0 {
		t.Errorf("everysec lost %d confirmed messages, %d of them confirmed more than %v before the kill:\n%s",
			len(lost), len(outside), window, strings.Join(outside[:min(10, len(outside))], "\n"))
	}
	if s.Lost > inWindow {
		t.Errorf("everysec lost %d confirmed messages; only %d were confirmed in the last %v before the kill", s.Lost, inWindow, window)
	}
	if s.Unexpected > 0 {
		t.Errorf("%d unexpected deliveries", s.Unexpected)
	}
	checkNoStrays(t, rdb, queue)
}

// lcInfoField returns one field of a Redis INFO section ("?" if absent).
func lcInfoField(ctx context.Context, rdb *redis.Client, section, field string) string {
	info, err := rdb.Info(ctx, section).Result()
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	return "?"
}

// lcFirstAfter returns the earliest confirmation at or after from.
func lcFirstAfter(c *lcConfirms, from time.Time) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	var first time.Time
	for _, t := range c.at {
		if !t.Before(from) && (first.IsZero() || t.Before(first)) {
			first = t
		}
	}
	return first
}

// ---- case 5: Redis unreachable ----

// Case 5: Redis becomes unreachable for a while (4 s; 30 s under
// CHAOS_FULL), either killed (connections refused; restarted on the same
// port and directory with its AOF) or suspended with SIGSTOP (connections
// hang; resumed with SIGCONT). Meanwhile: Enqueue calls with a 1 s deadline
// never return OK, and return UNAVAILABLE or, no later than their
// deadline, DEADLINE_EXCEEDED (the summary line counts each); health
// turns NOT_SERVING within 3 s and stays so; qbridged's RSS, threads and descriptors stay flat. When
// Redis is back, health is SERVING, Enqueue works and the Consume stream
// opened before the outage (or, if the server ended it with UNAVAILABLE, the
// client's reopened stream) gets a new message, each within 5 s. Then every
// confirmed message is consumed (lost = 0), and qbridged's goroutines are
// counted from a SIGQUIT dump.
func TestRedisOutageRefused(t *testing.T) { lcOutage(t, false) }
func TestRedisOutageHung(t *testing.T)    { lcOutage(t, true) }

func lcOutage(t *testing.T, hang bool) {
	const (
		callTimeout = time.Second
		recoverIn   = 5 * time.Second
		flipIn      = 3 * time.Second
	)
	outage := pick(4*time.Second, 30*time.Second)
	rs := redistest.Start(t, redistest.WithAOF())
	rdb := rs.Client(t, 0)
	d := startDaemonBin(t, daemonBin, []string{"GOTRACEBACK=all"}, rs.URL(0))
	qc := queueClient(dial(t, d.Addr))
	queue := "chaos-outage"
	l := newLedger("outage")
	ctx, cancel := context.WithTimeout(context.Background(), pick(90*time.Second, 10*time.Minute))
	defer cancel()

	samp := lcStartSampler(d.PID(), 100*time.Millisecond)
	defer samp.Stop()
	health := lcPollHealth(t, d.Addr, 100*time.Millisecond)

	// The stream opened before the outage; it acks everything, and opens a
	// new stream if the server ends it.
	sctx, stopStream := context.WithCancel(ctx)
	defer stopStream()
	stream := lcConsume(sctx, qc, l, queue, 16, 0, true, true)

	// Warm up, so that the baseline is the steady state.
	var next atomic.Int64
	pre := pick(200, 2000)
	produce(ctx, qc, l, queue, 0, pre, 4)
	next.Store(int64(pre))
	if !waitFor(20*time.Second, func() bool { return l.ackedCount() >= l.confirmedCount() }) {
		rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
		l.resolve(rctx, qc, queue)
		rcancel()
		left, _ := strays(ctx, rdb, queue)
		_, ends, _, ackErrs := stream.snapshot()
		l.mu.Lock()
		var open []string
		for n := range l.confirmed {
			if !l.acked[n] {
				open = append(open, fmt.Sprintf("%d (deliveries %d, ack reply lost %v, %s)", n, len(l.deliveries[n]), l.replyLost[n], l.where[n]))
			}
		}
		l.mu.Unlock()
		t.Fatalf("warm-up: %d of %d messages acked; unacked: %v; stream ends %v; ack errors %v; redis: %q", l.ackedCount(), l.confirmedCount(), open[:min(10, len(open))], ends, ackErrs, left)
	}
	base, nb := samp.max(time.Time{}, time.Now())
	if nb == 0 {
		t.Fatalf("no /proc sample of qbridged (pid %d)", d.PID())
	}
	if _, ok := health.first(time.Time{}, healthpb.HealthCheckResponse_SERVING); !ok {
		t.Fatal("health was never SERVING before the outage")
	}

	// The outage.
	pid := rs.PID()
	mode := "refused (SIGKILL, restart)"
	if hang {
		mode = "hung (SIGSTOP, SIGCONT)"
		t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) }) // before redistest kills it
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	} else {
		rs.Kill(t)
	}
	tDown := time.Now()

	var calls lcCalls
	var stopOut atomic.Bool
	var owg sync.WaitGroup
	for w := 0; w < 4; w++ {
		owg.Add(1)
		go func() {
			defer owg.Done()
			for !stopOut.Load() && ctx.Err() == nil {
				n := int(next.Add(1) - 1)
				if lcEnqueue(ctx, qc, l, queue, n, callTimeout, &calls, nil) != nil {
					select {
					case <-ctx.Done():
					case <-time.After(10 * time.Millisecond): // pacing
					}
				}
			}
		}()
	}
	// One call with a longer deadline: does it end before its deadline?
	var longCalls lcCalls
	owg.Add(1)
	go func() {
		defer owg.Done()
		n := int(next.Add(1) - 1)
		_ = lcEnqueue(ctx, qc, l, queue, n, 4*time.Second, &longCalls, nil)
	}()

	select { // the outage lasts this long
	case <-time.After(outage):
	case <-ctx.Done():
	}
	tBack := time.Now()
	if hang {
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	} else {
		rs.Restart(t)
	}
	tUp := time.Now() // Redis answers again
	stopOut.Store(true)

	// Enqueue works again.
	post := int(next.Add(1) - 1)
	var tOK time.Time
	for ctx.Err() == nil && time.Since(tUp) < 3*recoverIn {
		if lcEnqueue(ctx, qc, l, queue, post, callTimeout, nil, nil) == nil {
			tOK = time.Now()
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond): // retry delay
		}
	}
	// The stream (or its reopening) gets it.
	var tDel time.Time
	waitFor(3*recoverIn, func() bool { var ok bool; tDel, ok = lcDeliveredAt(l, post); return ok })
	// Health is SERVING again.
	waitFor(3*recoverIn, func() bool { _, ok := health.first(tBack, healthpb.HealthCheckResponse_SERVING); return ok })
	tServing, servingAgain := health.first(tBack, healthpb.HealthCheckResponse_SERVING)
	owg.Wait()

	// More load after the outage, then drain.
	from := int(next.Load())
	more := pick(200, 2000)
	next.Store(int64(from + more))
	produce(ctx, qc, l, queue, from, from+more, 4)
	left, drained := lcWaitDrained(rdb, l, queue, 30*time.Second)
	tEnd := time.Now()
	samp.Stop()
	health.Stop()
	stopStream()
	<-stream.done
	opens, ends, _, ackErrs := stream.snapshot()

	// Calls during the outage.
	var during []lcCall
	var bad []string
	var maxLat, lastDE time.Duration
	for _, c := range calls.all() {
		if c.start.Before(tDown) || !c.end.Before(tBack) {
			continue // started before it, or ended after Redis was back
		}
		during = append(during, c)
		maxLat = max(maxLat, c.end.Sub(c.start))
		switch {
		case c.code == codes.OK:
			bad = append(bad, fmt.Sprintf("Enqueue returned OK at +%v while Redis was down", lcMs(c.end.Sub(tDown))))
		case c.code == codes.Unavailable:
		case c.code == codes.DeadlineExceeded:
			// The call ran out of its deadline (bounded below); the
			// summary says for how long into the outage that happened.
			lastDE = max(lastDE, c.end.Sub(tDown))
		default:
			bad = append(bad, fmt.Sprintf("Enqueue returned %s at +%v while Redis was down (want UNAVAILABLE)", c.code, lcMs(c.end.Sub(tDown))))
		}
	}
	longCode := "none"
	for _, c := range longCalls.all() {
		longCode = fmt.Sprintf("%s after %v", c.code, lcMs(c.end.Sub(c.start)))
		if c.end.Before(tBack) && c.code != codes.Unavailable && c.code != codes.DeadlineExceeded {
			bad = append(bad, fmt.Sprintf("the Enqueue with a 4s deadline returned %s while Redis was down", c.code))
		}
		if c.end.Sub(c.start) > 4*time.Second+500*time.Millisecond {
			bad = append(bad, fmt.Sprintf("an Enqueue with a 4s deadline returned after %v", lcMs(c.end.Sub(c.start))))
		}
	}
	if maxLat > callTimeout+500*time.Millisecond {
		bad = append(bad, fmt.Sprintf("an Enqueue with a %v deadline returned after %v", callTimeout, lcMs(maxLat)))
	}
	if len(during) == 0 {
		t.Errorf("no Enqueue call ran during the outage")
	}
	// What was attempted during the outage and still arrived (after Redis
	// came back: an outcome the caller was told was unknown).
	landed := 0
	l.mu.Lock()
	for n := pre; n < int(next.Load()); n++ {
		if !l.confirmed[n] && len(l.deliveries[n]) > 0 {
			landed++
		}
	}
	l.mu.Unlock()

	// Health.
	tNS, flipped := health.first(tDown, healthpb.HealthCheckResponse_NOT_SERVING)
	var servingDuring, samplesDuring int
	if flipped {
		servingDuring, samplesDuring = health.count(tNS, tBack, healthpb.HealthCheckResponse_SERVING)
	}

	// Resources.
	peak, np := samp.max(tDown, tEnd)
	rssAllow := base.rssKB + max(base.rssKB*3/10, 20*1024)
	thrAllow := base.threads + max(base.threads/5, 4)
	fdAllow := base.fds + 32

	// The stream.
	var streamWas string
	switch {
	case len(ends) == 0:
		streamWas = "stayed open"
	default:
		var es []string
		for _, e := range ends {
			es = append(es, fmt.Sprintf("%s at +%v", e.code, lcMs(e.at.Sub(tDown))))
		}
		streamWas = fmt.Sprintf("ended %d times (%s), reopened", len(ends), strings.Join(es, "; "))
	}

	since := func(a time.Time) string {
		if a.IsZero() {
			return "never"
		}
		return lcMs(a.Sub(tUp))
	}
	nsAfter := "never"
	if flipped {
		nsAfter = lcMs(tNS.Sub(tDown))
	}
	extra := fmt.Sprintf("mode=%q outage=%v calls_during=%d codes=%s deadline_exceeded_until=+%v max_latency=%v long_call=%q landed_after_error=%d not_serving_after=%v health_during=%s health_serving_after_return=%v enqueue_ok_after_return=%v post_delivered_after_return=%v stream=%q base{%v} peak{%v} samples=%d",
		mode, outage, len(during), lcCodes(during), lcMs(lastDE), lcMs(maxLat), longCode, landed, nsAfter, health.describe(tDown, tBack),
		since(tServing), since(tOK), since(tDel), streamWas, base, peak, np)
	l.report(t, qc, queue, extra)
	checkNoStrays(t, rdb, queue)

	for _, b := range bad[:min(10, len(bad))] {
		t.Error(b)
	}
	if len(bad) > 10 {
		t.Errorf("... and %d more bad calls", len(bad)-10)
	}
	switch {
	case !flipped:
		t.Errorf("health never turned NOT_SERVING during the %v outage", outage)
	case tNS.Sub(tDown) > flipIn:
		t.Errorf("health turned NOT_SERVING %v after Redis went away; want within %v", lcMs(tNS.Sub(tDown)), flipIn)
	}
	if servingDuring > 0 {
		t.Errorf("health said SERVING %d times (of %d checks) while Redis was still down", servingDuring, samplesDuring)
	}
	if !servingAgain || tServing.Sub(tUp) > recoverIn {
		t.Errorf("health SERVING %s after Redis returned; want within %v", since(tServing), recoverIn)
	}
	if tOK.IsZero() || tOK.Sub(tUp) > recoverIn {
		t.Errorf("first Enqueue OK %s after Redis returned; want within %v", since(tOK), recoverIn)
	}
	if tDel.IsZero() || tDel.Sub(tUp) > recoverIn {
		t.Errorf("the Consume stream got a message enqueued after Redis returned %s after its return; want within %v (stream %s)", since(tDel), recoverIn, streamWas)
	}
	for _, e := range ends {
		if e.code != codes.Unavailable {
			t.Errorf("the Consume stream ended with %s (%s); want it kept open or ended with UNAVAILABLE", e.code, e.msg)
		}
	}
	if opens != len(ends)+1 {
		t.Logf("stream opened %d times, ended %d times", opens, len(ends))
	}
	for _, e := range ackErrs[:min(5, len(ackErrs))] {
		t.Errorf("Ack failed: %s", e)
	}
	if !drained {
		t.Errorf("the queue did not drain after the outage: %s", left)
	}
	if peak.rssKB > rssAllow {
		t.Errorf("qbridged RSS grew from %.1f MB to %.1f MB during the outage (allowed %.1f MB)", float64(base.rssKB)/1024, float64(peak.rssKB)/1024, float64(rssAllow)/1024)
	}
	if peak.threads > thrAllow {
		t.Errorf("qbridged threads grew from %d to %d during the outage (allowed %d)", base.threads, peak.threads, thrAllow)
	}
	if peak.fds > fdAllow {
		t.Errorf("qbridged open descriptors grew from %d to %d during the outage (allowed %d)", base.fds, peak.fds, fdAllow)
	}

	// Goroutines: qbridged has no endpoint for them; its SIGQUIT dump
	// counts them (this ends it).
	if n, err := lcGoroutines(d); err != nil {
		t.Errorf("goroutine dump: %v", err)
	} else {
		summaryLine(t, fmt.Sprintf("CHAOS %-28s goroutines_after_outage=%d failed_calls_during=%d", t.Name(), n, len(during)))
		if n > lcMaxGoroutines {
			t.Errorf("qbridged has %d goroutines after the outage and its recovery; a healthy one with one stream has far fewer (limit %d)", n, lcMaxGoroutines)
		}
	}
}

// lcMaxGoroutines bounds qbridged's goroutines with one Consume stream and
// a few client connections: 26 are counted after a 4 s or a 30 s outage
// and the recovery, while a goroutine left behind per failed call (about a
// hundred in 4 s) or per reconnection attempt would exceed it.
const lcMaxGoroutines = 100

// ---- case 6: SIGTERM to qbridged under load ----

// Case 6: two qbridged, A and B. Producers round-robin over both; four
// consumers read through B; on A two consumers ack every delivery and one
// holds its window unacked (leases of 60 s, so only the stream's end can
// return what it holds within the test). A gets SIGTERM. Asserted: A's
// health is NOT_SERVING before its held stream ends and before it exits,
// and its log shows NOT_SERVING, then draining, then the streams ended,
// then a graceful gRPC stop; every unary call either succeeded or, having
// ended after the SIGTERM, got UNAVAILABLE (no other error, and no failed
// Ack on A); every stream on A ended with UNAVAILABLE "shutting down"; A
// exits 0 within --drain-timeout + --shutdown-timeout (+ slack); the held
// messages come back at once (acked through B within 5 s of the stream
// end); and after the drain through B nothing is lost or left in Redis.
func TestSigtermUnderLoad(t *testing.T) {
	const (
		heldLease = 60 * time.Second
		window    = 4 // the holder's
		slack     = 5 * time.Second
	)
	drainTimeout, shutdownTimeout := pick(2*time.Second, 10*time.Second), pick(2*time.Second, 5*time.Second)
	rs := redistest.Start(t)
	rdb := rs.Client(t, 0)
	a := startDaemon(t, rs.URL(0), "--drain-timeout", drainTimeout.String(), "--shutdown-timeout", shutdownTimeout.String(), "--log-level", "info")
	b := startDaemon(t, rs.URL(0))
	qcA := queueClient(dial(t, a.Addr))
	qcB := queueClient(dial(t, b.Addr))
	qcAB := queueClient(dial(t, a.Addr, b.Addr))
	queue := "chaos-term"
	l := newLedger("term")
	ctx, cancel := context.WithTimeout(context.Background(), pick(90*time.Second, 10*time.Minute))
	defer cancel()

	bctx, stopB := context.WithCancel(ctx)
	defer stopB()
	var bwg sync.WaitGroup
	for i := 0; i < 4; i++ {
		bwg.Add(1)
		go func() { defer bwg.Done(); consume(bctx, qcB, l, queue, consumeOpts{window: 16}) }()
	}
	actx, stopA := context.WithCancel(ctx)
	defer stopA()
	ackers := []*lcStream{
		lcConsume(actx, qcA, l, queue, 16, heldLease, true, false),
		lcConsume(actx, qcA, l, queue, 16, heldLease, true, false),
	}
	holder := lcConsume(actx, qcA, l, queue, window, heldLease, false, false)

	var calls lcCalls
	var stop atomic.Bool
	var next atomic.Int64
	pwg := lcProducers(ctx, 4, &stop, &next, func(n int) error {
		return lcEnqueue(ctx, qcAB, l, queue, n, 2*time.Second, &calls, nil)
	})
	defer func() { stop.Store(true); pwg.Wait() }()
	aAcked := func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.acked) > 0
	}
	if !waitFor(10*time.Second, func() bool { _, _, held, _ := holder.snapshot(); return len(held) >= window && aAcked() }) {
		t.Fatal("the load did not start: the holder on A got no window, or nothing was acked")
	}
	health := lcPollHealth(t, a.Addr, 10*time.Millisecond)
	select { // load on both instances
	case <-time.After(pick(1500*time.Millisecond, 10*time.Second)):
	case <-ctx.Done():
	}
	if _, ok := health.first(time.Time{}, healthpb.HealthCheckResponse_SERVING); !ok {
		t.Fatal("A's health was never SERVING")
	}

	tTerm := time.Now()
	a.Term()
	exitErr, exited := a.Wait(drainTimeout + shutdownTimeout + slack)
	tExit := time.Now()
	health.Stop()
	for i, s := range append(ackers, holder) {
		select {
		case <-s.done: // it returns once its (only) stream ended
		case <-time.After(10 * time.Second):
			t.Errorf("stream %d on A still open 10s after A's exit", i)
		}
	}
	_, holderEnds, held, _ := holder.snapshot()

	// What the holder held comes back at once (not after its 60 s lease).
	var tHeldBack time.Time
	if waitFor(pick(15*time.Second, 30*time.Second), func() bool { return l.allAcked(held...) }) {
		tHeldBack = time.Now()
	}
	stop.Store(true)
	pwg.Wait()
	left, drained := lcWaitDrained(rdb, l, queue, pick(30*time.Second, 5*time.Minute))
	stopB()
	bwg.Wait()

	// Unary calls.
	var bad []string
	var afterTerm, unavailable int
	var inflight []lcCall
	var firstUnavailable time.Time
	for _, c := range calls.all() {
		if c.start.Before(tTerm) && c.end.After(tTerm) {
			inflight = append(inflight, c)
		}
		if !c.end.Before(tTerm) {
			afterTerm++
		}
		switch {
		case c.code == codes.OK:
		case c.code == codes.Unavailable && !c.end.Before(tTerm):
			unavailable++
			if firstUnavailable.IsZero() || c.end.Before(firstUnavailable) {
				firstUnavailable = c.end
			}
		default:
			bad = append(bad, fmt.Sprintf("Enqueue to %s got %s, ending at %v from the SIGTERM", c.peer, c.code, lcMs(c.end.Sub(tTerm))))
		}
	}

	// Streams on A.
	var firstEnd, holderEnd time.Time
	for i, s := range append(ackers, holder) {
		_, ends, _, ackErrs := s.snapshot()
		for _, e := range ackErrs {
			bad = append(bad, "Ack on A failed: "+e)
		}
		if len(ends) != 1 {
			bad = append(bad, fmt.Sprintf("stream %d on A ended %d times", i, len(ends)))
			continue
		}
		e := ends[0]
		if e.code != codes.Unavailable || !strings.Contains(e.msg, "shutting down") || e.at.Before(tTerm) {
			bad = append(bad, fmt.Sprintf("stream %d on A ended with %s %q at %v from the SIGTERM; want UNAVAILABLE \"shutting down\" after it", i, e.code, e.msg, lcMs(e.at.Sub(tTerm))))
		}
		if firstEnd.IsZero() || e.at.Before(firstEnd) {
			firstEnd = e.at
		}
	}
	if len(holderEnds) == 1 {
		holderEnd = holderEnds[0].at
	}

	// A's own account of the order.
	logText, _ := os.ReadFile(a.logf)
	order := []string{`msg="health set to NOT_SERVING"`, `msg="draining: new work refused`, `msg="drained; streams ended"`, `msg="gRPC server stopped"`}
	last := -1
	for _, m := range order {
		i := strings.Index(string(logText), m)
		if i < 0 || i < last {
			bad = append(bad, fmt.Sprintf("A's log lacks %q after the previous step (want %q in order)", m, order))
			break
		}
		last = i
	}
	hardStop := strings.Contains(string(logText), "calls still running after --shutdown-timeout")

	tNS, sawNS := health.first(tTerm, healthpb.HealthCheckResponse_NOT_SERVING)
	rel := func(x time.Time) string {
		if x.IsZero() {
			return "never"
		}
		return lcMs(x.Sub(tTerm))
	}
	extra := fmt.Sprintf("drain_timeout=%v shutdown_timeout=%v term→not_serving=%v term→first_unavailable=%v term→first_stream_end=%v term→held_stream_end=%v term→exit=%v exit=%v held=%d held_acked_via_B_after_end=%v calls=%d after_term=%d unavailable_after_term=%d inflight_at_term=%d%s hard_stop=%v",
		drainTimeout, shutdownTimeout, rel(tNS), rel(firstUnavailable), rel(firstEnd), rel(holderEnd), rel(tExit), exitErr, len(held),
		func() string {
			if tHeldBack.IsZero() || holderEnd.IsZero() {
				return "never"
			}
			return lcMs(tHeldBack.Sub(holderEnd))
		}(), len(calls.all()), afterTerm, unavailable, len(inflight), lcCodes(inflight), hardStop)
	l.report(t, qcB, queue, extra)
	checkNoStrays(t, rdb, queue)

	if !exited {
		t.Errorf("A did not exit within %v of SIGTERM (drain %v + shutdown %v + %v)", drainTimeout+shutdownTimeout+slack, drainTimeout, shutdownTimeout, slack)
	} else if exitErr != nil {
		t.Errorf("A exited with %v after SIGTERM; want exit 0", exitErr)
	}
	switch {
	case !sawNS:
		t.Errorf("A's health was never seen NOT_SERVING between the SIGTERM and its exit")
	case !holderEnd.IsZero() && !tNS.Before(holderEnd):
		t.Errorf("A's health turned NOT_SERVING %v after the SIGTERM, not before its held stream ended (%v)", rel(tNS), rel(holderEnd))
	case !tNS.Before(tExit):
		t.Errorf("A's health turned NOT_SERVING only at its exit")
	}
	if hardStop {
		t.Errorf("A hit --shutdown-timeout: calls were still running and were cut")
	}
	for _, x := range bad[:min(10, len(bad))] {
		t.Error(x)
	}
	if len(bad) > 10 {
		t.Errorf("... and %d more", len(bad)-10)
	}
	if len(held) < window {
		t.Errorf("the holder held %d messages, want %d", len(held), window)
	}
	if tHeldBack.IsZero() || holderEnd.IsZero() || tHeldBack.Sub(holderEnd) > 5*time.Second {
		t.Errorf("the %d messages held on A were not acked through B within 5s of their stream's end (lease %v): back %s after the SIGTERM", len(held), heldLease, rel(tHeldBack))
	}
	if !drained {
		t.Errorf("the queue did not drain through B: %s", left)
	}
}
