package chaos

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	durationpbpkg "google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// connectParams make clients retry a lost server quickly (the default
// backoff grows to two minutes).
var connectParams = grpc.ConnectParams{
	Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond},
	MinConnectTimeout: time.Second,
}

func durationpb(d time.Duration) *durationpbpkg.Duration { return durationpbpkg.New(d) }

// ledger records what clients were told, per message, and checks it like a
// total-queue checker. Messages are numbered; a payload is "<case>:<n>".
type ledger struct {
	name string

	mu         sync.Mutex
	attempted  map[int]bool // an Enqueue was sent (its outcome may be unknown)
	confirmed  map[int]bool // an Enqueue returned OK
	deliveries map[int][]time.Time
	attempts   map[int]uint32 // highest attempt number seen
	acked      map[int]bool   // an Ack returned it as acknowledged
	ids        map[int]string // message id, from the Enqueue that confirmed it
	// replyLost are messages whose Ack failed on the client's side but was
	// applied (GetResult says SUCCEEDED): a lost reply, not a lost message.
	replyLost  map[int]bool
	ackErr     map[int]bool   // an Ack of it returned an error
	where      map[int]string // where each lost message is, per GetMessage
	unexpected []string
}

func newLedger(name string) *ledger {
	return &ledger{name: name, attempted: map[int]bool{}, confirmed: map[int]bool{}, deliveries: map[int][]time.Time{},
		attempts: map[int]uint32{}, acked: map[int]bool{}, ids: map[int]string{}, replyLost: map[int]bool{}, ackErr: map[int]bool{}, where: map[int]string{}}
}

func (l *ledger) payload(n int) []byte { return []byte(l.name + ":" + strconv.Itoa(n)) }

// parse returns the number of a payload of this ledger, or -1.
func (l *ledger) parse(p []byte) int {
	s, ok := strings.CutPrefix(string(p), l.name+":")
	if !ok {
		return -1
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return -1
	}
	return n
}

func (l *ledger) sent(n int, id string, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.attempted[n] = true
	if ok {
		l.confirmed[n] = true
		l.ids[n] = id
	}
}

// resolve asks the service about each confirmed message no Ack confirmed:
// for those a client was given and whose Ack returned an error, GetResult
// tells whether the Ack was applied though its reply was lost (messages are
// enqueued with keep_result); GetMessage tells where the others are. A
// message that finished without a client ever getting it stays lost.
func (l *ledger) resolve(ctx context.Context, qc qbridgev1.QueueServiceClient, queue string) {
	l.mu.Lock()
	var open []int
	for n := range l.confirmed {
		if !l.acked[n] && !l.replyLost[n] {
			open = append(open, n)
		}
	}
	l.mu.Unlock()
	for _, n := range open {
		l.mu.Lock()
		id := l.ids[n]
		l.mu.Unlock()
		l.mu.Lock()
		tried := l.ackErr[n] && len(l.deliveries[n]) > 0
		l.mu.Unlock()
		r, err := qc.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: queue, Id: id})
		if tried && err == nil && r.GetState() == qbridgev1.ResultState_RESULT_STATE_SUCCEEDED {
			l.mu.Lock()
			l.replyLost[n] = true
			l.mu.Unlock()
			continue
		}
		where := "GetResult: " + fmt.Sprint(err)
		if err == nil {
			where = "result " + r.GetState().String()
		}
		if m, err := qc.GetMessage(ctx, &qbridgev1.GetMessageRequest{Queue: queue, Id: id}); err == nil {
			where += fmt.Sprintf(", message %s after %d deliveries", m.GetState(), m.GetDeliveries())
		} else {
			where += ", GetMessage: " + err.Error()
		}
		l.mu.Lock()
		l.where[n] = where
		l.mu.Unlock()
	}
}

// delivered records a delivery; it returns the message number (-1 for a
// payload this ledger never sent, which is recorded as unexpected).
func (l *ledger) delivered(d *qbridgev1.Delivery) int {
	n := l.parse(d.GetPayload())
	l.mu.Lock()
	defer l.mu.Unlock()
	if n < 0 || !l.attempted[n] {
		l.unexpected = append(l.unexpected, fmt.Sprintf("%.60q", d.GetPayload()))
		return -1
	}
	l.deliveries[n] = append(l.deliveries[n], time.Now())
	l.attempts[n] = max(l.attempts[n], d.GetAttempt())
	return n
}

func (l *ledger) ackFailed(n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n >= 0 {
		l.ackErr[n] = true
	}
}

func (l *ledger) ackedOK(ns ...int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, n := range ns {
		if n >= 0 {
			l.acked[n] = true
		}
	}
}

// ackedCount is how many distinct confirmed messages were acked.
func (l *ledger) ackedCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for m := range l.confirmed {
		if l.acked[m] {
			n++
		}
	}
	return n
}

func (l *ledger) confirmedCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.confirmed)
}

// summary is one case's result line.
type summary struct {
	Sent, Confirmed, Acked, AckReplyLost, Lost, Duplicates, Unexpected int
	MaxRedelivery                                                      time.Duration
	Lost1                                                              []int
}

func (s summary) String() string {
	return fmt.Sprintf("sent=%d confirmed=%d acked=%d (ack reply lost %d) lost=%d duplicates=%d unexpected=%d max_redelivery_delay=%v",
		s.Sent, s.Confirmed, s.Acked, s.AckReplyLost, s.Lost, s.Duplicates, s.Unexpected, s.MaxRedelivery.Round(time.Millisecond))
}

// summarize checks the ledger: lost are confirmed enqueues never acked;
// duplicates are deliveries beyond the first; the redelivery delay is the
// longest time between two deliveries of one message.
func (l *ledger) summarize() summary {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := summary{Sent: len(l.attempted), Confirmed: len(l.confirmed), Unexpected: len(l.unexpected)}
	for n := range l.confirmed {
		if l.acked[n] {
			s.Acked++
		} else if l.replyLost[n] {
			s.Acked++
			s.AckReplyLost++
		} else {
			s.Lost++
			if len(s.Lost1) < 10 {
				s.Lost1 = append(s.Lost1, n)
			}
		}
	}
	sort.Ints(s.Lost1)
	for _, ts := range l.deliveries {
		if len(ts) > 1 {
			s.Duplicates += len(ts) - 1
			for i := 1; i < len(ts); i++ {
				s.MaxRedelivery = max(s.MaxRedelivery, ts[i].Sub(ts[i-1]))
			}
		}
	}
	return s
}

// report resolves unconfirmed acks (see resolve), logs the case's summary
// line and fails the test when a confirmed message was lost or something
// unexpected was delivered.
func (l *ledger) report(t testing.TB, qc qbridgev1.QueueServiceClient, queue, extra string) summary {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l.resolve(ctx, qc, queue)
	s := l.summarize()
	line := fmt.Sprintf("CHAOS %-28s %s", t.Name(), s)
	if extra != "" {
		line += " " + extra
	}
	summaryLine(t, line)
	if s.Lost > 0 {
		l.mu.Lock()
		var where []string
		for _, n := range s.Lost1 {
			where = append(where, fmt.Sprintf("%d: %s", n, l.where[n]))
		}
		l.mu.Unlock()
		t.Errorf("LOST %d confirmed messages; first:\n%s", s.Lost, strings.Join(where, "\n"))
	}
	if s.Unexpected > 0 {
		l.mu.Lock()
		t.Errorf("%d unexpected deliveries, e.g. %v", s.Unexpected, l.unexpected[:min(5, len(l.unexpected))])
		l.mu.Unlock()
	}
	return s
}

// summaryLine logs a case's summary line and appends it to $CHAOS_SUMMARY
// (make chaos collects them there).
func summaryLine(t testing.TB, line string) {
	t.Helper()
	t.Log(line)
	if f := os.Getenv("CHAOS_SUMMARY"); f != "" {
		if fh, err := os.OpenFile(f, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
			fmt.Fprintln(fh, line)
			fh.Close()
		}
	}
}

// allAcked reports whether an Ack confirmed each of ns.
func (l *ledger) allAcked(ns ...int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, n := range ns {
		if !l.acked[n] {
			return false
		}
	}
	return true
}

// strays reads Redis (the documented key layout, not qbridge's code) and
// reports what a drained queue should not hold: ready, in-flight, leased or
// delayed entries.
func strays(ctx context.Context, rdb *redis.Client, queue string) (string, error) {
	tag := "{" + queue + "}:qb:"
	p := rdb.Pipeline()
	ready := p.LLen(ctx, queue)
	inflight := p.HLen(ctx, tag+"inflight")
	leases := p.ZCard(ctx, tag+"leases")
	delayed := p.ZCard(ctx, tag+"delayed")
	if _, err := p.Exec(ctx); err != nil {
		return "", err
	}
	if ready.Val()+inflight.Val()+leases.Val()+delayed.Val() == 0 {
		return "", nil
	}
	return fmt.Sprintf("queue %s holds ready=%d inflight=%d leases=%d delayed=%d", queue, ready.Val(), inflight.Val(), leases.Val(), delayed.Val()), nil
}

// checkNoStrays fails the test if the queue holds anything.
func checkNoStrays(t testing.TB, rdb *redis.Client, queue string) {
	t.Helper()
	var last string
	ok := waitFor(10*time.Second, func() bool {
		s, err := strays(context.Background(), rdb, queue)
		if err != nil {
			last = err.Error()
			return false
		}
		last = s
		return s == ""
	})
	if !ok {
		t.Errorf("strays after the run: %s", last)
	}
}

// ---- load ----

// produce enqueues messages from..to-1 of l to queue from conc goroutines.
// Each message is retried on error until ctx ends; the dedup key (the
// message number) keeps a retry whose first try did land from enqueueing
// twice. It returns when all are confirmed or ctx ends.
func produce(ctx context.Context, qc qbridgev1.QueueServiceClient, l *ledger, queue string, from, to, conc int) {
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n := int(next.Add(1) - 1)
				if n >= to {
					return
				}
				for ctx.Err() == nil {
					// Attempted before the call: a fast consumer may get the
					// message before Enqueue returns.
					l.sent(n, "", false)
					cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
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
}

// consumer settings.
type consumeOpts struct {
	window int
	lease  time.Duration
	// onDelivery, when set, runs for each delivery before it is acked; it
	// returns false to leave the message unacked.
	onDelivery func(d *qbridgev1.Delivery) bool
}

// consume reads queue and acks every delivery, reopening the stream
// whenever it ends, until ctx ends.
func consume(ctx context.Context, qc qbridgev1.QueueServiceClient, l *ledger, queue string, o consumeOpts) {
	for ctx.Err() == nil {
		req := &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: uint32(o.window)}
		if o.lease > 0 {
			req.LeaseDuration = durationpb(o.lease)
		}
		st, err := qc.Consume(ctx, req)
		if err == nil {
			err = consumeStream(ctx, qc, l, st, o)
		}
		if ctx.Err() != nil {
			return
		}
		_ = err
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond): // reconnect delay
		}
	}
}

func consumeStream(ctx context.Context, qc qbridgev1.QueueServiceClient, l *ledger, st qbridgev1.QueueService_ConsumeClient, o consumeOpts) error {
	for {
		r, err := st.Recv()
		if err != nil {
			return err
		}
		// Each delivery is acked on its own, so that every Ack's outcome
		// belongs to one message (a batch with a stale token fails as a
		// whole without saying which were applied).
		for _, d := range r.GetDeliveries() {
			n := l.delivered(d)
			if o.onDelivery != nil && !o.onDelivery(d) {
				continue
			}
			actx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := qc.Ack(actx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}})
			cancel()
			if err == nil {
				l.ackedOK(n)
			} else {
				l.ackFailed(n)
				if errors.Is(ctx.Err(), context.Canceled) {
					return ctx.Err()
				}
			}
		}
	}
}
