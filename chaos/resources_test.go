package chaos

// Resource cases of the fault-tolerance issue: a slow subscriber (case 7),
// random client cancellations (case 10), oversized and compressed payloads
// (case 11) and a soak run (case 12). They watch qbridged from outside:
// its memory and threads in /proc/<pid>/status, its open descriptors in
// /proc/<pid>/fd, and its Redis connections in CLIENT LIST of the private
// redis-server (every client there that is not named resClientName is the
// daemon's). Helpers of this file are prefixed with res.

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"regexp"
	"runtime"
	"slices"
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
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

const resMiBytes = 1 << 20

// ---- process resources (/proc) ----

func resMustStat(t testing.TB, d *daemon) procStat {
	t.Helper()
	s, err := readProcStat(d.PID())
	if err != nil {
		t.Fatalf("reading qbridged's /proc status: %v", err)
	}
	return s
}

// resClientConns counts the established TCP connections pid holds on its
// listening port (its sockets in /proc/<pid>/fd matched with
// /proc/<pid>/net/tcp): the gRPC clients it serves.
func resClientConns(pid int, addr string) (int, error) {
	_, portS, _ := strings.Cut(addr, ":")
	port, err := strconv.Atoi(portS)
	if err != nil {
		return 0, err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, err
	}
	mine := map[string]bool{}
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil {
			if inode, ok := strings.CutPrefix(l, "socket:["); ok {
				mine[strings.TrimSuffix(inode, "]")] = true
			}
		}
	}
	n := 0
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 10 || fs[3] != "01" || !mine[fs[9]] { // 01: ESTABLISHED
				continue
			}
			_, lp, _ := strings.Cut(fs[1], ":")
			if p, err := strconv.ParseInt(lp, 16, 32); err == nil && int(p) == port {
				n++
			}
		}
	}
	return n, nil
}

// resResetPeak resets VmHWM of pid to its current RSS (clear_refs 5); it
// reports whether the kernel allowed it.
func resResetPeak(pid int) bool {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0) == nil
}

func resMiB(b int64) string { return fmt.Sprintf("%.1fMiB", float64(b)/resMiBytes) }

// resSampler reads a process's /proc status every few milliseconds in the
// background and keeps the maxima and, per window (see window), the mean
// RSS.
type resSampler struct {
	pid  int
	stop chan struct{}
	done chan struct{}

	mu       sync.Mutex
	max      procStat
	last     procStat
	winSum   float64
	winN     int
	winMax   int64
	failures int
}

func resStartSampler(t testing.TB, d *daemon, every time.Duration) *resSampler {
	s := &resSampler{pid: d.PID(), stop: make(chan struct{}), done: make(chan struct{})}
	s.sample()
	go func() {
		defer close(s.done)
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tk.C: // the sampling period
				s.sample()
			}
		}
	}()
	t.Cleanup(func() { s.Stop() })
	return s
}

func (s *resSampler) sample() {
	st, err := readProcStat(s.pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.failures++
		return
	}
	s.last = st
	s.max.RSS = max(s.max.RSS, st.RSS)
	s.max.HWM = max(s.max.HWM, st.HWM)
	s.max.Threads = max(s.max.Threads, st.Threads)
	s.max.FDs = max(s.max.FDs, st.FDs)
	s.winSum += float64(st.RSS)
	s.winN++
	s.winMax = max(s.winMax, st.RSS)
}

// Stop ends sampling (idempotent) and returns the maxima.
func (s *resSampler) Stop() procStat {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.max
}

// Max returns the maxima so far: the peak is the larger of the sampled
// VmRSS and the kernel's VmHWM.
func (s *resSampler) Max() procStat {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.max
}

// window returns the mean and the largest RSS sampled since the previous
// call, the latest sample, and starts a new window.
func (s *resSampler) window() (mean, peak int64, last procStat) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.winN > 0 {
		mean = int64(s.winSum / float64(s.winN))
	}
	peak, last = s.winMax, s.last
	s.winSum, s.winN, s.winMax = 0, 0, 0
	return mean, peak, last
}

// peak is the highest RSS the process reached: its VmHWM (exact, kept by
// the kernel) or, if larger, the highest sample.
func (st procStat) peak() int64 { return max(st.RSS, st.HWM) }

// ---- Redis connections (CLIENT LIST) ----

// resClientName names every Redis connection of this file's own clients,
// so that all other clients of the private redis-server are the daemon's.
const resClientName = "chaos-res"

func resRedis(t testing.TB, rs *redistest.Server) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: rs.Addr(), ClientName: resClientName, PoolSize: 4})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// resConns counts the daemon's Redis connections.
type resConns struct {
	Total   int
	Blocked int // in a blocking command (flags b): a blocking wait
	PubSub  int // in pub/sub mode (flags P)
	Subs    int // channels subscribed, over all of them
	PSubs   int // patterns subscribed
}

func (c resConns) String() string {
	return fmt.Sprintf("total=%d blocked=%d pubsub=%d (sub=%d psub=%d)", c.Total, c.Blocked, c.PubSub, c.Subs, c.PSubs)
}

func resDaemonConns(ctx context.Context, rdb *redis.Client) (resConns, error) {
	var c resConns
	list, err := rdb.ClientList(ctx).Result()
	if err != nil {
		return c, err
	}
	for _, line := range strings.Split(strings.TrimSpace(list), "\n") {
		kv := map[string]string{}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, "="); ok {
				kv[k] = v
			}
		}
		if kv["name"] == resClientName || kv["id"] == "" {
			continue
		}
		c.Total++
		if strings.Contains(kv["flags"], "b") {
			c.Blocked++
		}
		if strings.Contains(kv["flags"], "P") {
			c.PubSub++
		}
		sub, _ := strconv.Atoi(kv["sub"])
		psub, _ := strconv.Atoi(kv["psub"])
		c.Subs += sub
		c.PSubs += psub
	}
	return c, nil
}

// ---- reporting ----

// resSummary logs one CHAOS line (and appends it to $CHAOS_SUMMARY, like
// ledger.report).
func resSummary(t testing.TB, format string, args ...any) {
	t.Helper()
	summaryLine(t, fmt.Sprintf("CHAOS %-28s ", t.Name())+fmt.Sprintf(format, args...))
}

// resCodes tallies the status codes of calls, per RPC.
type resCodes struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *resCodes) add(rpc string, err error) codes.Code {
	code := status.Code(err)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]int{}
	}
	c.m[rpc+"/"+code.String()]++
	return code
}

func (c *resCodes) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ks []string
	for k, n := range c.m {
		ks = append(ks, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(ks)
	return strings.Join(ks, " ")
}

func (c *resCodes) count(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[key]
}

// total is the number of calls of rpc (all codes).
func (c *resCodes) total(rpc string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for k, v := range c.m {
		if strings.HasPrefix(k, rpc+"/") {
			n += v
		}
	}
	return n
}

// unexpected lists the tallies whose code is not allowed for their RPC.
func (c *resCodes) unexpected(allowed map[string][]codes.Code) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var bad []string
	for k, n := range c.m {
		rpc, code, _ := strings.Cut(k, "/")
		ok := false
		for _, a := range allowed[rpc] {
			if a.String() == code {
				ok = true
			}
		}
		if !ok {
			bad = append(bad, fmt.Sprintf("%s=%d", k, n))
		}
	}
	sort.Strings(bad)
	return bad
}

// resPercentile returns the p-th percentile (0..1) of ds (sorted in place).
func resPercentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := int(math.Ceil(p*float64(len(ds)))) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}

// ---- load ----

// resPacedProduce enqueues messages of l, numbered from first on, to queue
// at rate per second in all from conc goroutines until ctx ends. A message
// is retried with its dedup key until confirmed or ctx ends. onSend, if
// set, is told when each message's first Enqueue starts. It returns how
// many messages it took numbers for.
func resPacedProduce(ctx context.Context, qc qbridgev1.QueueServiceClient, l *ledger, queue string, first int, rate float64, conc int, onSend func(n int, at time.Time)) int {
	period := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tm := time.NewTimer(0)
			defer tm.Stop()
			for {
				k := next.Add(1) - 1
				if wait := time.Until(start.Add(time.Duration(k) * period)); wait > 0 {
					tm.Reset(wait)
					select {
					case <-ctx.Done():
						return
					case <-tm.C: // pacing
					}
				}
				if ctx.Err() != nil {
					return
				}
				n := first + int(k)
				if onSend != nil {
					onSend(n, time.Now())
				}
				// Attempted before the call: a consumer may receive the
				// message before the Enqueue's reply arrives.
				l.sent(n, "", false)
				for ctx.Err() == nil {
					cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					r, err := qc.Enqueue(cctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: l.payload(n), DedupKey: strconv.Itoa(n), KeepResult: true})
					cancel()
					l.sent(n, r.GetId(), err == nil)
					if err == nil {
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
	wg.Wait()
	return int(next.Load())
}

// resDrain consumes queue on qc until Redis holds nothing of the queue
// (also what unconfirmed enqueues did write), or within passes. It reports
// whether that happened.
func resDrain(qc qbridgev1.QueueServiceClient, rdb *redis.Client, l *ledger, queue string, within time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	cctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); consume(cctx, qc, l, queue, consumeOpts{window: 32, lease: 5 * time.Second}) }()
	}
	// Redis holding nothing of the queue is the end: every message was
	// settled. (Counting acks is not: an Ack cancelled as its consumer
	// stopped may have been applied; report resolves those.)
	ok := waitFor(within, func() bool {
		s, err := strays(ctx, rdb, queue)
		return err == nil && s == ""
	})
	stop()
	wg.Wait()
	return ok
}

// resWaitErr waits for a stream reader's final error.
func resWaitErr(ch <-chan error, within time.Duration) (error, bool) {
	select {
	case err := <-ch:
		return err, true
	case <-time.After(within):
		return nil, false
	}
}

// ==== Case 7: a slow subscriber ====

// resSubSeen is what one subscriber received: per publisher, the sequence
// numbers in arrival order.
type resSubSeen struct {
	mu   sync.Mutex
	seqs map[int][]int
	n    int
	bad  []string
}

func (s *resSubSeen) add(payload []byte) {
	head, _, _ := bytes.Cut(payload, []byte("|"))
	ps, is, ok := strings.Cut(string(head), ":")
	p, err1 := strconv.Atoi(ps)
	i, err2 := strconv.Atoi(is)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !ok || err1 != nil || err2 != nil {
		s.bad = append(s.bad, fmt.Sprintf("%.40q", payload))
		return
	}
	if s.seqs == nil {
		s.seqs = map[int][]int{}
	}
	s.seqs[p] = append(s.seqs[p], i)
	s.n++
}

func (s *resSubSeen) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// check verifies per publisher: strictly increasing (in order, no
// duplicate) and, if complete, containing every confirmed number.
// confirmed[p] is the set of p's publishes that returned OK; unknown ones
// (failed calls) may or may not be there.
func (s *resSubSeen) check(confirmed []map[int]bool, complete bool) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	problems := append([]string(nil), s.bad...)
	for p, seq := range s.seqs {
		for j := 1; j < len(seq); j++ {
			if seq[j] <= seq[j-1] {
				problems = append(problems, fmt.Sprintf("publisher %d: %d arrived after %d (out of order or duplicate)", p, seq[j], seq[j-1]))
				break
			}
		}
	}
	if complete {
		for p, conf := range confirmed {
			got := map[int]bool{}
			for _, i := range s.seqs[p] {
				got[i] = true
			}
			missing := 0
			first := -1
			for i := range conf {
				if !got[i] {
					missing++
					if first < 0 || i < first {
						first = i
					}
				}
			}
			if missing > 0 {
				problems = append(problems, fmt.Sprintf("publisher %d: %d confirmed publishes never arrived (first %d)", p, missing, first))
			}
		}
	}
	return problems
}

// Case 7: one fast and two slow Subscribe streams on a channel (one reads
// a message a second, one reads nothing) while 2 KiB messages are
// published at 10k msg/s (as fast as the fast one reads, if slower) for a
// bounded time. The slow streams must end with RESOURCE_EXHAUSTED (the
// daemon's --subscriber-buffer, 3072 messages, bounds what is waiting for
// them); qbridged must let go of the stalled one once it is cut off, even
// though it reads nothing (its subscription leaves Redis within 5 s); the
// fast one must receive every confirmed publish exactly once and in order
// per publisher; and qbridged's RSS must stay below a cap that is far
// less than what unbounded buffers would hold.
func TestSlowSubscriber(t *testing.T) {
	const (
		channel    = "chaos-slow-sub"
		payloadLen = 2048
		// 10k msg/s in all: up to 1k/s through qbridge's Publish, the rest
		// with pipelined PUBLISH straight to Redis, which reaches Subscribe
		// streams all the same (as the proto documents) and keeps the rate
		// when this test process is slow (-race, a loaded machine).
		rpcPublishers, rpcRate     = 2, 1000 // msg/s
		redisPublishers, redisRate = 3, 9000
		// buffer leaves the fast subscriber ~0.3 s of slack at full rate,
		// enough for a reader descheduled on a loaded machine (1024 was
		// not: on a machine running three other test suites the fast one
		// was cut off too); the slow ones overflow it all the same.
		buffer = 3072
		// rssCap bounds qbridged's RSS growth over its idle baseline: the
		// two slow streams may hold 2 x 3072 x 2 KiB in their buffers plus
		// their gRPC windows, the fast one as much again, plus the garbage
		// of the fan-out. An unbounded buffer holds everything published
		// (60 MiB per slow stream at full rate in the short run).
		rssCap = 48 * resMiBytes
	)
	runFor := pick(3*time.Second, 30*time.Second)
	rs := redistest.Start(t)
	d := startDaemon(t, rs.URL(0), "--subscriber-buffer", strconv.Itoa(buffer))

	// Separate connections: the publishers', the fast subscriber's (a
	// large fixed receive window, so that a reader descheduled for a
	// moment on a loaded machine is not itself too slow: the window, not
	// the server's buffer, absorbs it) and one per slow subscriber (the
	// smallest window, so their reading speed reaches the server at once).
	pub := queueClient(dial(t, d.Addr))
	newConn := func(window int32) qbridgev1.QueueServiceClient {
		cc, err := grpc.NewClient(d.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithInitialWindowSize(window), grpc.WithInitialConnWindowSize(window))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cc.Close() })
		return queueClient(cc)
	}
	fastC, slowC, stalledC := newConn(16*resMiBytes), newConn(64<<10), newConn(64<<10)

	ctx, cancel := context.WithTimeout(context.Background(), runFor+60*time.Second)
	defer cancel()
	subscribe := func(qc qbridgev1.QueueServiceClient, channels ...string) qbridgev1.QueueService_SubscribeClient {
		st, err := qc.Subscribe(ctx, &qbridgev1.SubscribeRequest{Channels: channels})
		if err != nil {
			t.Fatal(err)
		}
		r, err := st.Recv()
		if err != nil || r.GetSubscribed() == nil {
			t.Fatalf("want the subscribed confirmation first, got %v, %v", r, err)
		}
		return st
	}
	// The stalled stream also subscribes a channel of its own: when
	// qbridged lets go of the stream, that subscription leaves Redis,
	// which CLIENT LIST shows.
	fastSt, slowSt := subscribe(fastC, channel), subscribe(slowC, channel)
	stalledSt := subscribe(stalledC, channel, channel+"-stalled")
	rdb := resRedis(t, rs)
	var subs resConns
	if !waitFor(5*time.Second, func() bool {
		c, err := resDaemonConns(ctx, rdb)
		subs = c
		return err == nil && c.Subs >= 4 // qbridged's own 2, the 2 channels
	}) {
		t.Fatalf("qbridged's subscriptions in Redis: %s; want 4 channels", subs)
	}
	baseSubs := subs.Subs

	base := resMustStat(t, d)
	peakReset := resResetPeak(d.PID())
	sampler := resStartSampler(t, d, 20*time.Millisecond)

	var fast, slow, stalled resSubSeen
	fastErr, slowErr, stalledErr := make(chan error, 1), make(chan error, 1), make(chan error, 1)
	published := make(chan struct{}) // closed when the publishers are done
	go func() {
		for {
			r, err := fastSt.Recv()
			if err != nil {
				fastErr <- err
				return
			}
			fast.add(r.GetMessage().GetPayload())
		}
	}()
	// The slow reader takes one message a second while publishing lasts,
	// then reads what is left as fast as it can: the status comes after
	// the messages already on their way.
	go func() {
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		for {
			select {
			case <-published:
			case <-tk.C: // the slow reader's pace
			}
			r, err := slowSt.Recv()
			if err != nil {
				slowErr <- err
				return
			}
			slow.add(r.GetMessage().GetPayload())
		}
	}()
	stalledGo := make(chan struct{}) // closed when the stalled reader may read
	go func() {
		<-stalledGo // reads nothing before
		for {
			r, err := stalledSt.Recv()
			if err != nil {
				stalledErr <- err
				return
			}
			stalled.add(r.GetMessage().GetPayload())
		}
	}()

	pad := bytes.Repeat([]byte("x"), payloadLen)
	payloadOf := func(p, i int) []byte {
		head := fmt.Sprintf("%d:%d|", p, i)
		return append([]byte(head), pad[:payloadLen-len(head)]...)
	}
	publishers := rpcPublishers + redisPublishers
	confirmed := make([]map[int]bool, publishers)
	failed := make([]int, publishers)
	direct := redis.NewClient(&redis.Options{Addr: rs.Addr(), ClientName: resClientName, PoolSize: redisPublishers})
	defer direct.Close()
	// The fast subscriber is one that keeps up: publishers hold back
	// while it is more than maxLag messages behind, so that a CPU-starved
	// test process (-race, a loaded machine) does not turn it into a slow
	// one (it may fall behind by its window, 8192 messages, plus the
	// server's buffer before it is cut off). The slow ones fall behind by
	// more than the buffer whatever the rate.
	const maxLag = 4096
	var issued atomic.Int64
	start := time.Now()
	pctx, stopPub := context.WithTimeout(ctx, runFor)
	holdBack := func() bool {
		tm := time.NewTimer(0)
		defer tm.Stop()
		for issued.Load()-int64(fast.count()) > maxLag {
			tm.Reset(time.Millisecond)
			select {
			case <-pctx.Done():
				return false
			case <-tm.C: // poll interval
			}
		}
		return pctx.Err() == nil
	}
	var wg sync.WaitGroup
	for p := 0; p < publishers; p++ {
		confirmed[p] = map[int]bool{}
		wg.Add(1)
		if p >= rpcPublishers {
			// A plain Redis publisher: every 5 ms, one pipeline of PUBLISH
			// for the messages due by then (in order on one connection).
			go func() {
				defer wg.Done()
				period := time.Second * redisPublishers / redisRate
				tk := time.NewTicker(5 * time.Millisecond)
				defer tk.Stop()
				next := 0
				for {
					select {
					case <-pctx.Done():
						return
					case <-tk.C: // pacing
					}
					due := min(int(time.Since(start)/period)+1, next+500)
					if due <= next {
						continue
					}
					if !holdBack() {
						return
					}
					issued.Add(int64(due - next))
					pl := direct.Pipeline()
					cmds := make([]*redis.IntCmd, 0, due-next)
					for i := next; i < due; i++ {
						cmds = append(cmds, pl.Publish(ctx, channel, payloadOf(p, i)))
					}
					_, _ = pl.Exec(ctx)
					for j, c := range cmds {
						if c.Err() == nil {
							confirmed[p][next+j] = true
						} else {
							failed[p]++
						}
					}
					next = due
				}
			}()
			continue
		}
		go func() { // a client of qbridge's Publish, paced
			defer wg.Done()
			period := time.Second * rpcPublishers / rpcRate
			tm := time.NewTimer(0)
			defer tm.Stop()
			for i := 0; ; i++ {
				if wait := time.Until(start.Add(time.Duration(i) * period)); wait > 0 {
					tm.Reset(wait)
					select {
					case <-pctx.Done():
					case <-tm.C: // pacing
					}
				}
				if !holdBack() {
					return
				}
				issued.Add(1)
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := pub.Publish(cctx, &qbridgev1.PublishRequest{Channel: channel, Payload: payloadOf(p, i)})
				cancel()
				if err == nil {
					confirmed[p][i] = true
				} else {
					failed[p]++
				}
			}
		}()
	}
	wg.Wait()
	stopPub()
	elapsed := time.Since(start)
	close(published)
	total, nfailed, viaRPC := 0, 0, 0
	for p := range confirmed {
		total += len(confirmed[p])
		nfailed += failed[p]
		if p < rpcPublishers {
			viaRPC += len(confirmed[p])
		}
	}

	// The stalled stream overflowed long ago (if more than its buffer and
	// its gRPC windows were published): qbridged must have let go of it,
	// though its reader has read nothing, dropping its subscription and
	// its buffer. Only then does the reader read, to see the status.
	overflowed := total > buffer+2*(64<<10)/payloadLen+16
	var stalledLeft resConns
	stalledReleased := waitFor(5*time.Second, func() bool {
		c, err := resDaemonConns(ctx, rdb)
		stalledLeft = c
		return err == nil && c.Subs < baseSubs
	})
	close(stalledGo)

	// The fast subscriber gets everything (or fails).
	fastDone := waitFor(30*time.Second, func() bool {
		select {
		case err := <-fastErr:
			fastErr <- err
			return true
		default:
		}
		return fast.count() >= total
	})
	slowEnd, slowOK := resWaitErr(slowErr, 30*time.Second)
	stalledEnd, stalledOK := resWaitErr(stalledErr, 30*time.Second)
	peak := sampler.Stop()
	after := resMustStat(t, d)
	if peakReset {
		peak.HWM = after.HWM
	}
	var fastEnd error // before cancel, which ends the fast stream too
	select {
	case fastEnd = <-fastErr:
	default:
	}
	cancel()
	growth := peak.peak() - base.RSS
	resSummary(t, "published=%d (%.0f msg/s of %dB, %d through qbridge, %d failed) fast_received=%d slow_received=%d slow_end=%s stalled_released_unread=%v stalled_received=%d stalled_end=%s rss_base=%s rss_peak=%s (+%s, cap +%s) rss_after=%s threads=%d->%d",
		total, float64(total)/elapsed.Seconds(), payloadLen, viaRPC, nfailed, fast.count(),
		slow.count(), status.Code(slowEnd), stalledReleased, stalled.count(), status.Code(stalledEnd),
		resMiB(base.RSS), resMiB(peak.peak()), resMiB(growth), resMiB(rssCap), resMiB(after.RSS), base.Threads, after.Threads)

	if nfailed > 0 {
		t.Errorf("%d publishes failed", nfailed)
	}
	if fastEnd != nil {
		t.Errorf("the fast subscriber's stream ended: %v", fastEnd)
	}
	if !fastDone {
		t.Errorf("the fast subscriber got %d of %d confirmed publishes within 30s", fast.count(), total)
	}
	if probs := fast.check(confirmed, true); len(probs) > 0 {
		t.Errorf("fast subscriber: %s", strings.Join(probs[:min(len(probs), 10)], "; "))
	}
	for _, s := range []struct {
		name string
		seen *resSubSeen
		err  error
		ok   bool
	}{{"slow (1 msg/s)", &slow, slowEnd, slowOK}, {"stalled (reads nothing)", &stalled, stalledEnd, stalledOK}} {
		switch {
		case !s.ok:
			t.Errorf("the %s subscriber's stream did not end within 30s after publishing stopped (it got %d messages)", s.name, s.seen.count())
		case status.Code(s.err) != codes.ResourceExhausted:
			t.Errorf("the %s subscriber's stream ended with %v; want RESOURCE_EXHAUSTED", s.name, s.err)
		}
		if probs := s.seen.check(nil, false); len(probs) > 0 {
			t.Errorf("%s subscriber: %s", s.name, strings.Join(probs[:min(len(probs), 10)], "; "))
		}
		if s.seen.count() >= total {
			t.Errorf("the %s subscriber received all %d messages: it was not slow enough for the test to mean anything", s.name, total)
		}
	}
	switch {
	case !overflowed:
		t.Logf("note: only %d messages were published, too few to overflow the stalled stream: its release was not checked", total)
	case !stalledReleased:
		t.Errorf("the stalled subscriber's stream overflowed its buffer during publishing, yet 5s after publishing stopped qbridged still holds it "+
			"(its subscription to %s-stalled is still in Redis: %s): a subscriber that is cut off but reads nothing keeps its stream, "+
			"its goroutine and its buffer (up to %d messages or 8 MiB) for as long as its connection lives", channel, stalledLeft, buffer)
	}
	if growth > rssCap {
		t.Errorf("qbridged's RSS grew by %s (from %s to a peak of %s); the cap is %s", resMiB(growth), resMiB(base.RSS), resMiB(peak.peak()), resMiB(rssCap))
	}
	if 2*total*payloadLen <= rssCap {
		t.Logf("note: only %s were published, so the RSS cap could not tell bounded buffers of the two slow streams from unbounded ones in this run", resMiB(int64(total*payloadLen)))
	}
}

// ==== Case 10: random client cancellations ====

// resRandomCtx returns a context that ends after a random 1 ms - 1 s
// (log-uniform, so that calls cancelled before, during and after the
// server's work are all common). Half end by a deadline, which the server
// also learns from grpc-timeout; half by an explicit cancel, which it
// learns only from the RST_STREAM.
func resRandomCtx(parent context.Context) (context.Context, context.CancelFunc) {
	d := time.Duration(float64(time.Millisecond) * math.Pow(1000, rand.Float64()))
	if rand.IntN(2) == 0 {
		return context.WithTimeout(parent, d)
	}
	ctx, cancel := context.WithCancel(parent)
	tm := time.AfterFunc(d, cancel)
	return ctx, func() { tm.Stop(); cancel() }
}

// resGoroutineDump ends d with SIGQUIT (GOTRACEBACK=all in its environment
// makes the Go runtime print every goroutine to its log) and returns the
// goroutine stacks it printed.
func resGoroutineDump(t testing.TB, d *daemon) []string {
	t.Helper()
	before, _ := os.ReadFile(d.logf)
	d.signal(syscall.SIGQUIT)
	if _, ok := d.Wait(10 * time.Second); !ok {
		t.Fatalf("qbridged did not exit on SIGQUIT within 10s")
	}
	b, err := os.ReadFile(d.logf)
	if err != nil {
		t.Fatal(err)
	}
	b = b[min(len(before), len(b)):]
	var stacks []string
	// "goroutine 7 gp=0x... m=nil [select]:"; goroutine 0 is the
	// signal handler's own stack.
	for _, part := range regexp.MustCompile(`(?m)^goroutine `).Split(string(b), -1)[1:] {
		if regexp.MustCompile(`^[1-9]\d* .*\[`).MatchString(part) {
			stacks = append(stacks, "goroutine "+part)
		}
	}
	return stacks
}

// Case 10: for a while, goroutines call Enqueue, Consume, Ack, Publish and
// Subscribe, each call with a random deadline or cancellation between
// 1 ms and 1 s. Then a clean consumer drains the queue: no confirmed
// enqueue may be lost. Afterwards qbridged must hold no more than it did
// before the storm: no blocking wait and no subscription beyond its own
// in Redis, no extra Redis connection beyond what its pools had grown to
// under normal load, no gRPC connection left (descriptors), a flat thread
// count and RSS.
//
// Goroutines cannot be read from outside a running daemon (it has no
// pprof endpoint), so the live checks use threads, descriptors and Redis
// connections. At the very end the daemon is stopped with SIGQUIT, whose
// goroutine dump must show no RPC handler or stream goroutine left and a
// total bounded far below the number of cancelled calls.
func TestRandomCancellations(t *testing.T) {
	const (
		queue   = "chaos-cancel"
		channel = "chaos-cancel"
	)
	runFor := pick(5*time.Second, 60*time.Second)
	rs := redistest.Start(t)
	// --max-attempts 1000: every cancelled stream counts as a delivery
	// attempt; the retry policy is not what this case is about.
	// --wait-slice 1s: a queue's blocking wait ends within 1s of its last
	// consumer leaving, so the connection check settles quickly.
	d := startDaemonBin(t, daemonBin, []string{"GOTRACEBACK=all"}, rs.URL(0),
		"--reap-interval", "200ms", "--wait-slice", "1s", "--max-attempts", "1000")
	rdb := resRedis(t, rs)
	l := newLedger("cancel")
	bg := context.Background()

	// Warm up every kind of call without cancellation, at the storm's
	// concurrency, so that what qbridged creates lazily (the pub/sub
	// connection, its Redis pools, gRPC buffers) exists before the
	// baseline is taken.
	{
		wcc := dial(t, d.Addr)
		wq := queueClient(wcc)
		wl := newLedger("warm")
		wctx, wcancel := context.WithTimeout(bg, 30*time.Second)
		var wg sync.WaitGroup
		sctx, stopSub := context.WithCancel(wctx)
		for i := 0; i < 2; i++ {
			st, err := wq.Subscribe(sctx, &qbridgev1.SubscribeRequest{Channels: []string{channel}})
			if err == nil {
				_, err = st.Recv()
			}
			if err != nil {
				t.Fatalf("warm-up subscribe: %v", err)
			}
		}
		pctx, stopPub := context.WithTimeout(wctx, time.Second)
		for i := 0; i < 2; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for pctx.Err() == nil {
					_, _ = wq.Publish(pctx, &qbridgev1.PublishRequest{Channel: channel, Payload: []byte("warm")})
				}
			}()
		}
		produce(wctx, wq, wl, queue+"-warm", 0, 1000, 4)
		wg.Wait()
		stopPub()
		stopSub()
		if !resDrain(wq, rdb, wl, queue+"-warm", 20*time.Second) {
			t.Fatalf("the warm-up queue did not drain")
		}
		wcancel()
		_ = wcc.Close()
	}
	var base resConns
	if !waitFor(15*time.Second, func() bool {
		c, err := resDaemonConns(bg, rdb)
		base = c
		clients, err2 := resClientConns(d.PID(), d.Addr)
		return err == nil && err2 == nil && c.PubSub == 1 && c.Blocked == 0 && clients == 0
	}) {
		t.Fatalf("qbridged's connections did not settle after the warm-up: Redis %s", base)
	}
	baseStat := resMustStat(t, d)
	sampler := resStartSampler(t, d, 50*time.Millisecond)

	// The storm, on two connections.
	var calls resCodes
	ccs := []*grpc.ClientConn{dial(t, d.Addr), dial(t, d.Addr)}
	client := func(i int) qbridgev1.QueueServiceClient { return queueClient(ccs[i%len(ccs)]) }
	lctx, stopLoad := context.WithTimeout(bg, runFor)
	defer stopLoad()
	var wg sync.WaitGroup
	// every runs f every period (a new call each time, whatever the last
	// one did) until the storm ends.
	every := func(period time.Duration, f func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tk := time.NewTicker(period)
			defer tk.Stop()
			for {
				select {
				case <-lctx.Done():
					return
				case <-tk.C: // the call rate
				}
				f()
			}
		}()
	}
	var nextMsg atomic.Int64
	for w := 0; w < 4; w++ {
		qc := client(w)
		every(10*time.Millisecond, func() { // Enqueue: 100/s per goroutine
			n := int(nextMsg.Add(1) - 1)
			l.sent(n, "", false) // attempted (it may be delivered before the reply)
			ctx, cancel := resRandomCtx(lctx)
			r, err := qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: l.payload(n), DedupKey: strconv.Itoa(n), KeepResult: true})
			cancel()
			calls.add("Enqueue", err)
			l.sent(n, r.GetId(), err == nil)
		})
	}
	for w := 0; w < 4; w++ {
		qc := client(w)
		every(5*time.Millisecond, func() { // Consume streams, each delivery acked with its own random deadline
			sctx, scancel := resRandomCtx(lctx)
			defer scancel()
			st, err := qc.Consume(sctx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: 8, LeaseDuration: durationpb(2 * time.Second)})
			if err != nil {
				calls.add("Consume", err)
				return
			}
			for {
				r, err := st.Recv()
				if err != nil {
					calls.add("Consume", err)
					return
				}
				for _, dl := range r.GetDeliveries() {
					n := l.delivered(dl)
					actx, acancel := resRandomCtx(lctx)
					_, err := qc.Ack(actx, &qbridgev1.AckRequest{AckTokens: []string{dl.GetAckToken()}})
					acancel()
					calls.add("Ack", err)
					if err == nil {
						l.ackedOK(n)
					} else {
						l.ackFailed(n) // it may still have been applied: report asks GetResult
					}
				}
			}
		})
	}
	for w := 0; w < 2; w++ {
		qc := client(w)
		every(2*time.Millisecond, func() {
			ctx, cancel := resRandomCtx(lctx)
			_, err := qc.Publish(ctx, &qbridgev1.PublishRequest{Channel: channel, Payload: []byte("storm")})
			cancel()
			calls.add("Publish", err)
		})
	}
	for w := 0; w < 4; w++ {
		qc := client(w)
		req := &qbridgev1.SubscribeRequest{Channels: []string{channel}}
		if w%2 == 1 {
			req = &qbridgev1.SubscribeRequest{Patterns: []string{channel + "*"}}
		}
		every(5*time.Millisecond, func() {
			ctx, cancel := resRandomCtx(lctx)
			defer cancel()
			st, err := qc.Subscribe(ctx, req)
			if err != nil {
				calls.add("Subscribe", err)
				return
			}
			for {
				if _, err := st.Recv(); err != nil {
					calls.add("Subscribe", err)
					return
				}
			}
		})
	}
	wg.Wait()
	for _, cc := range ccs {
		_ = cc.Close()
	}
	stormPeak := sampler.Max()

	// A clean consumer drains; nothing confirmed may be lost.
	dcc, err := grpc.NewClient(d.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	dq := queueClient(dcc)
	drained := resDrain(dq, rdb, l, queue, 60*time.Second)
	if !drained {
		t.Errorf("the queue did not drain within 60s after the storm")
	}

	// Resources settle back. The daemon's Redis pools keep idle
	// connections (go-redis closes them after 30 idle minutes), so the
	// total may exceed the warm-up's by what the storm's concurrency
	// needed, up to the pools' sizes; what must come back exactly is what
	// is in use: no blocking wait, the one pub/sub connection with only
	// qbridged's own subscriptions.
	var after resConns
	settled := waitFor(20*time.Second, func() bool {
		c, err := resDaemonConns(bg, rdb)
		after = c
		return err == nil && c.Blocked == 0 && c.PubSub == base.PubSub && c.Subs == base.Subs && c.PSubs == base.PSubs
	})
	_ = dcc.Close()
	checkNoStrays(t, rdb, queue)
	// Every client has gone: qbridged serves no connection, and its
	// descriptors beyond its Redis connections (the listener, the
	// runtime's own) are as many as before.
	var afterStat procStat
	var clients int
	fdsSettled := waitFor(10*time.Second, func() bool {
		st, err := readProcStat(d.PID())
		afterStat = st
		c, err2 := resDaemonConns(bg, rdb)
		n, err3 := resClientConns(d.PID(), d.Addr)
		clients = n
		return err == nil && err2 == nil && err3 == nil && n == 0 && st.FDs-c.Total <= baseStat.FDs-base.Total
	})
	peak := sampler.Stop()
	stacks := resGoroutineDump(t, d)
	var handlers []string
	for _, s := range stacks {
		if strings.Contains(s, "_QueueService_") || strings.Contains(s, "server.(*Server).Consume") || strings.Contains(s, "server.(*Server).Subscribe") || strings.Contains(s, "server.(*Server).pump") {
			handlers = append(handlers, strings.Join(strings.SplitN(s, "\n", 4)[:3], " | "))
		}
	}
	nCalls := calls.total("Enqueue") + calls.total("Consume") + calls.total("Ack") + calls.total("Publish") + calls.total("Subscribe")
	// Go threads are not returned to the OS; a leak of one per call, or of
	// a goroutine per call, would show as thousands.
	const threadSlack, goroutineCap = 32, 200
	t.Logf("calls: %s", calls.String())
	// The ledger's report asks the service (GetResult, GetMessage) about
	// unsettled messages: start qbridged again on the same Redis.
	d.Start()
	rq := queueClient(dial(t, d.Addr))
	sum := l.report(t, rq, queue, fmt.Sprintf("calls=%d in %v; redis_conns=%d->%d (%s) threads=%d->%d (storm peak %d) fds=%d->%d rss=%s->%s (peak %s) goroutines_at_end=%d handlers_left=%d",
		nCalls, runFor, base.Total, after.Total, after, baseStat.Threads, afterStat.Threads, stormPeak.Threads,
		baseStat.FDs, afterStat.FDs, resMiB(baseStat.RSS), resMiB(afterStat.RSS), resMiB(peak.peak()), len(stacks), len(handlers)))

	allowed := map[string][]codes.Code{
		"Enqueue":   {codes.OK, codes.Canceled, codes.DeadlineExceeded},
		"Consume":   {codes.Canceled, codes.DeadlineExceeded},
		"Ack":       {codes.OK, codes.Canceled, codes.DeadlineExceeded, codes.FailedPrecondition},
		"Publish":   {codes.OK, codes.Canceled, codes.DeadlineExceeded},
		"Subscribe": {codes.Canceled, codes.DeadlineExceeded},
	}
	if bad := calls.unexpected(allowed); len(bad) > 0 {
		t.Errorf("calls ended with codes a cancellation does not explain: %s", strings.Join(bad, " "))
	}
	if sum.Confirmed == 0 || calls.total("Consume") == 0 || calls.total("Subscribe") == 0 {
		t.Errorf("the storm did too little to mean anything: %s", calls.String())
	}
	if !settled {
		t.Errorf("qbridged's Redis connections did not settle within 20s: %s; before the storm %s", after, base)
	}
	// What qbridged's go-redis pools keep idle: the command client 10 per
	// CPU (PoolSize) + 10 (PipelinePoolSize), the blocking client
	// --blocking-waits + 2 (24 + 2) + 10, and the pub/sub connection.
	if limit := 10*resCPUs() + 10 + 26 + 10 + 1; after.Total > limit {
		t.Errorf("qbridged holds %d Redis connections after the storm (%d before): more than its pools keep (%d)", after.Total, base.Total, limit)
	}
	if !fdsSettled {
		t.Errorf("qbridged still serves %d client connections, and holds %d descriptors besides its %d Redis connections (%d before the storm): connections or files leaked",
			clients, afterStat.FDs-after.Total, after.Total, baseStat.FDs-base.Total)
	}
	if afterStat.Threads > baseStat.Threads+threadSlack {
		t.Errorf("qbridged has %d threads after the storm, %d before", afterStat.Threads, baseStat.Threads)
	}
	if afterStat.RSS > baseStat.RSS+64*resMiBytes {
		t.Errorf("qbridged's RSS is %s after the storm, %s before", resMiB(afterStat.RSS), resMiB(baseStat.RSS))
	}
	if len(handlers) > 0 {
		t.Errorf("%d RPC handler goroutines were still running after every client had gone, e.g.:\n%s", len(handlers), strings.Join(handlers[:min(5, len(handlers))], "\n"))
	}
	if len(stacks) > goroutineCap {
		t.Errorf("qbridged had %d goroutines at the end (cap %d) after %d calls", len(stacks), goroutineCap, nCalls)
	}
}

// resCPUs is the daemon's GOMAXPROCS: this machine's CPUs, as for the
// test process (the same cgroup), unless GOMAXPROCS is set.
func resCPUs() int {
	if n, err := strconv.Atoi(os.Getenv("GOMAXPROCS")); err == nil && n > 0 {
		return n
	}
	return runtime.NumCPU()
}

// ==== Case 11: oversized and compressed payloads ====

// Case 11: while a normal producer/consumer pair moves messages, other
// clients send 10 MiB Enqueue and Publish payloads (the default limit is
// 1 MiB), 32 MiB ones (past the 16 MiB gRPC receive limit qbridged sets)
// and gzip-compressed requests whose payload is 64 MiB of zeros (64 KiB
// on the wire; 20 MiB in the short run). Each is rejected with the
// documented code, the message names the limit, nothing is enqueued,
// qbridged's RSS stays below a cap, and the pair keeps working with
// nothing lost.
func TestOversizedPayloads(t *testing.T) {
	const (
		queue    = "chaos-big-ok"
		bigQueue = "chaos-big"
		channel  = "chaos-big"
		limit    = 1 << 20 // --max-payload-bytes default
		// qbridged's gRPC receive limit for that payload limit
		// (maxRecvMsgSize in cmd/qbridged/config.go).
		recvLimit = 16 << 20
		// rssCap bounds RSS growth over the baseline. At most two 10 MiB
		// requests are in the server at once; gRPC holds each as received
		// frames and as the assembled message, proto.Unmarshal copies the
		// payload, and the Go collector lets the heap reach twice what is
		// live, and its buffer pools keep freed buffers for a cycle: about
		// 50 MiB for a lone 10 MiB request, 130-150 MiB measured for two
		// at a time, however many rounds. Keeping what is rejected (the
		// short run sends 368 MiB, the full one 2.8 GiB) or inflating the
		// bombs breaks it.
		rssCap = 192 * resMiBytes
	)
	rounds := pick(6, 50)
	rs := redistest.Start(t)
	d := startDaemon(t, rs.URL(0))
	rdb := resRedis(t, rs)

	// The normal pair, on its own connection.
	pair := queueClient(dial(t, d.Addr))
	l := newLedger("big-ok")
	pctx, stopPair := context.WithCancel(context.Background())
	defer stopPair()
	var pwg sync.WaitGroup
	pwg.Add(2)
	go func() {
		defer pwg.Done()
		resPacedProduce(pctx, pair, l, queue, 0, 200, 2, nil)
	}()
	go func() {
		defer pwg.Done()
		consume(pctx, pair, l, queue, consumeOpts{window: 16, lease: 5 * time.Second})
	}()
	if !waitFor(10*time.Second, func() bool { return l.ackedCount() >= 50 }) {
		t.Fatalf("the normal pair did not get going: %d acked", l.ackedCount())
	}
	base := resMustStat(t, d)
	peakReset := resResetPeak(d.PID())
	sampler := resStartSampler(t, d, 10*time.Millisecond)
	ackedBefore := l.ackedCount()

	// The attackers, on their own connection (client-side send limits are
	// unlimited by default; the receive limit is the server's).
	big := queueClient(dial(t, d.Addr))
	var calls resCodes
	var msgMu sync.Mutex
	msgs := map[string]string{} // rpc/code -> one message
	record := func(rpc string, err error) {
		code := calls.add(rpc, err)
		msgMu.Lock()
		if _, ok := msgs[rpc+"/"+code.String()]; !ok && err != nil {
			msgs[rpc+"/"+code.String()] = status.Convert(err).Message()
		}
		msgMu.Unlock()
	}
	payload10 := bytes.Repeat([]byte("A"), 10*resMiBytes)
	payload32 := bytes.Repeat([]byte("B"), 32*resMiBytes)
	// The bomb: 64 MiB of zeros, 64 KiB gzipped. The short run sends
	// 20 MiB ones (still past the receive limit): compressing is this
	// test's own cost, and slow under -race.
	bombSize := pick(20*resMiBytes, 64*resMiBytes)
	zeros := make([]byte, bombSize)
	call := func(f func(ctx context.Context) error) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return f(ctx)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				record("Enqueue10MiB", call(func(ctx context.Context) error {
					_, err := big.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: bigQueue, Payload: payload10})
					return err
				}))
				record("Publish10MiB", call(func(ctx context.Context) error {
					_, err := big.Publish(ctx, &qbridgev1.PublishRequest{Channel: channel, Payload: payload10})
					return err
				}))
				if i%4 == 0 {
					record("Enqueue32MiB", call(func(ctx context.Context) error {
						_, err := big.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: bigQueue, Payload: payload32})
						return err
					}))
				}
			}
		}()
	}
	wg.Wait()
	sizesTime := time.Since(start)
	sizePeak := sampler.Max()
	if peakReset {
		if st, err := readProcStat(d.PID()); err == nil {
			sizePeak.HWM = st.HWM
		}
	}
	// The compression bombs, one at a time.
	for i := 0; i < pick(1, 4); i++ {
		record("EnqueueGzip", call(func(ctx context.Context) error {
			_, err := big.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: bigQueue, Payload: zeros}, grpc.UseCompressor(gzip.Name))
			return err
		}))
		record("PublishGzip", call(func(ctx context.Context) error {
			_, err := big.Publish(ctx, &qbridgev1.PublishRequest{Channel: channel, Payload: zeros}, grpc.UseCompressor(gzip.Name))
			return err
		}))
	}
	attackTime := time.Since(start)
	t.Logf("sizes phase %v, gzip phase %v", sizesTime, attackTime-sizesTime)
	ackedDuring := l.ackedCount() - ackedBefore

	// Let the pair run on a moment after the attack (progress, not time:
	// 50 more acks), then stop producing and drain.
	ackedAfterAttack := l.ackedCount()
	pairOK := waitFor(10*time.Second, func() bool { return l.ackedCount() >= ackedAfterAttack+50 })
	stopPair()
	pwg.Wait()
	if !resDrain(pair, rdb, l, queue, 30*time.Second) {
		t.Errorf("the normal pair's queue did not drain")
	}
	peak := sampler.Stop()
	after := resMustStat(t, d)
	if peakReset {
		peak.HWM = after.HWM
	}
	qs, err := pair.GetQueueStats(context.Background(), &qbridgev1.GetQueueStatsRequest{Queue: bigQueue})
	if err != nil {
		t.Fatal(err)
	}
	growth := peak.peak() - base.RSS
	gzipCode := "none"
	for _, c := range []codes.Code{codes.ResourceExhausted, codes.Unimplemented, codes.InvalidArgument, codes.OK} {
		if calls.count("EnqueueGzip/"+c.String()) > 0 {
			gzipCode = c.String()
			break
		}
	}
	l.report(t, pair, queue, fmt.Sprintf("attacks: %s in %v; gzip bomb (%s of zeros)=%s; pair acked %d during the attacks; rss_base=%s rss_peak=%s (+%s, cap +%s; sizes phase peak %s) rss_after=%s",
		calls.String(), attackTime.Round(time.Millisecond), resMiB(int64(bombSize)), gzipCode, ackedDuring, resMiB(base.RSS), resMiB(peak.peak()), resMiB(growth), resMiB(rssCap), resMiB(sizePeak.peak()), resMiB(after.RSS)))
	for k, m := range msgs {
		t.Logf("%s: %q", k, m)
	}
	checkNoStrays(t, rdb, queue)

	want := map[string][]codes.Code{
		// README "Names and limits": a payload over --max-payload-bytes is
		// INVALID_ARGUMENT.
		"Enqueue10MiB": {codes.InvalidArgument},
		"Publish10MiB": {codes.InvalidArgument},
		// Past the gRPC receive limit: gRPC's RESOURCE_EXHAUSTED.
		"Enqueue32MiB": {codes.ResourceExhausted},
		// A server that accepts gzip stops inflating at its receive limit
		// (RESOURCE_EXHAUSTED); one that does not register gzip refuses
		// the request unread (UNIMPLEMENTED). Both are safe.
		"EnqueueGzip": {codes.ResourceExhausted, codes.Unimplemented},
		"PublishGzip": {codes.ResourceExhausted, codes.Unimplemented},
	}
	if bad := calls.unexpected(want); len(bad) > 0 {
		t.Errorf("oversized requests got unexpected codes: %s (messages: %v)", strings.Join(bad, " "), msgs)
	}
	for k, m := range msgs {
		switch {
		case strings.HasSuffix(k, "/"+codes.InvalidArgument.String()) && !strings.Contains(m, strconv.Itoa(limit)):
			t.Errorf("%s: the message does not name the limit %d: %q", k, limit, m)
		case strings.HasSuffix(k, "/"+codes.ResourceExhausted.String()) && !strings.Contains(m, strconv.Itoa(recvLimit)):
			t.Errorf("%s: the message does not name the limit %d: %q", k, recvLimit, m)
		}
	}
	if gzipCode == codes.Unimplemented.String() {
		t.Logf("note: qbridged does not accept gzip-compressed requests at all (UNIMPLEMENTED), so a compression bomb never reaches a decompressor")
	}
	if qs.GetReady()+qs.GetInFlight() != 0 {
		t.Errorf("an oversized enqueue landed: %s holds ready=%d in_flight=%d", bigQueue, qs.GetReady(), qs.GetInFlight())
	}
	if growth > rssCap {
		t.Errorf("qbridged's RSS grew by %s (from %s to a peak of %s); the cap is %s", resMiB(growth), resMiB(base.RSS), resMiB(peak.peak()), resMiB(rssCap))
	}
	if after.RSS > base.RSS+rssCap {
		t.Errorf("qbridged's RSS is %s after the attacks (%s before)", resMiB(after.RSS), resMiB(base.RSS))
	}
	if ackedDuring == 0 {
		t.Errorf("the normal pair acked nothing while the oversized requests were sent (%v)", attackTime)
	}
	if !pairOK {
		t.Errorf("the normal pair did not go on after the attacks")
	}
}

// ==== Case 12: soak ====

// Case 12: a steady paced load (500 msg/s enqueue -> consume -> ack) for
// CHAOS_SOAK (e.g. 30m; sampled each minute) or, without it, 10 s sampled
// every 2 s. Each interval prints a CHAOS line with the p50/p99 latency
// from Enqueue to first delivery, the throughput and RSS. After a warm-up
// interval, the mean RSS of the last third of the intervals must not
// exceed that of the first third by more than 20% + 4 MiB; nothing may be
// lost; every interval must deliver.
func TestSoak(t *testing.T) {
	const (
		queue     = "chaos-soak"
		rate      = 500.0
		consumers = 4 // each acks one delivery at a time
	)
	dur, interval := 10*time.Second, 2*time.Second
	if v := os.Getenv("CHAOS_SOAK"); v != "" {
		var err error
		if dur, err = time.ParseDuration(v); err != nil || dur <= 0 {
			t.Fatalf("CHAOS_SOAK=%q: want a duration such as 30m", v)
		}
		interval = time.Minute
		if dl, ok := t.Deadline(); ok && time.Until(dl) < dur+2*time.Minute {
			t.Fatalf("CHAOS_SOAK=%v does not fit in the test timeout (%v left); run with -timeout", dur, time.Until(dl).Round(time.Second))
		}
	}
	nIntervals := max(3, int(dur/interval))
	rs := redistest.Start(t)
	d := startDaemon(t, rs.URL(0))
	rdb := resRedis(t, rs)
	qc := queueClient(dial(t, d.Addr))
	l := newLedger("soak")

	var lat struct {
		sync.Mutex
		sentAt map[int]time.Time
		cur    []time.Duration
	}
	lat.sentAt = map[int]time.Time{}
	onSend := func(n int, at time.Time) {
		lat.Lock()
		lat.sentAt[n] = at
		lat.Unlock()
	}
	onDelivery := func(dl *qbridgev1.Delivery) bool {
		now := time.Now()
		n := l.parse(dl.GetPayload())
		lat.Lock()
		if at, ok := lat.sentAt[n]; ok && dl.GetAttempt() == 1 {
			lat.cur = append(lat.cur, now.Sub(at))
			delete(lat.sentAt, n)
		}
		lat.Unlock()
		return true
	}

	sampler := resStartSampler(t, d, max(interval/20, 100*time.Millisecond))
	_, _, _ = sampler.window()
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1 + consumers)
	go func() { defer wg.Done(); resPacedProduce(ctx, qc, l, queue, 0, rate, 4, onSend) }()
	for i := 0; i < consumers; i++ {
		go func() {
			defer wg.Done()
			consume(ctx, qc, l, queue, consumeOpts{window: 16, lease: 10 * time.Second, onDelivery: onDelivery})
		}()
	}

	type point struct {
		rss, peak int64
		p50, p99  time.Duration
		n         int
		threads   int
	}
	var points []point
	tk := time.NewTicker(interval)
	start := time.Now()
	for i := 1; i <= nIntervals; i++ {
		<-tk.C // the sampling interval
		lat.Lock()
		ls := lat.cur
		lat.cur = nil
		lat.Unlock()
		mean, pk, last := sampler.window()
		p := point{rss: mean, peak: pk, p50: resPercentile(ls, 0.50), p99: resPercentile(ls, 0.99), n: len(ls), threads: last.Threads}
		points = append(points, p)
		resSummary(t, "interval=%d/%d t=%v delivered=%d (%.0f msg/s) p50=%v p99=%v rss_mean=%s rss_max=%s threads=%d",
			i, nIntervals, time.Since(start).Round(time.Second), p.n, float64(p.n)/interval.Seconds(),
			p.p50.Round(10*time.Microsecond), p.p99.Round(10*time.Microsecond), resMiB(p.rss), resMiB(p.peak), p.threads)
	}
	tk.Stop()
	stop()
	wg.Wait()
	sampler.Stop()
	if !resDrain(qc, rdb, l, queue, 30*time.Second) {
		t.Errorf("the queue did not drain after the soak")
	}

	// Trend: skip the first (warm-up) interval, compare thirds.
	rest := points[1:]
	k := max(1, len(rest)/3)
	meanRSS := func(ps []point) int64 {
		var s int64
		for _, p := range ps {
			s += p.rss
		}
		return s / int64(len(ps))
	}
	first, last := meanRSS(rest[:k]), meanRSS(rest[len(rest)-k:])
	var worstP99 time.Duration
	for _, p := range points {
		worstP99 = max(worstP99, p.p99)
	}
	bound := int64(float64(first)*1.2) + 4*resMiBytes
	l.report(t, qc, queue, fmt.Sprintf("soak=%v intervals=%d rss_first_third=%s rss_last_third=%s (bound %s) worst_p99=%v",
		dur, nIntervals, resMiB(first), resMiB(last), resMiB(bound), worstP99.Round(10*time.Microsecond)))
	checkNoStrays(t, rdb, queue)
	if last > bound {
		t.Errorf("qbridged's RSS trends up: the last third's mean is %s, the first third's %s (bound %s)", resMiB(last), resMiB(first), resMiB(bound))
	}
	// The load ran: something in every interval, and a fifth of the paced
	// rate in all (the latency lines show how well the machine kept up;
	// a CPU-starved -race run falls far behind the pace).
	delivered := 0
	for i, p := range points {
		delivered += p.n
		if p.n == 0 {
			t.Errorf("interval %d delivered nothing", i+1)
		}
	}
	if want := 0.2 * rate * time.Duration(nIntervals*int(interval)).Seconds(); float64(delivered) < want {
		t.Errorf("%d messages delivered in %d intervals, under a fifth of the paced %v msg/s", delivered, nIntervals, rate)
	}
}
