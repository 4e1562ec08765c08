package server

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qbridge/qbridge/server/broker"
)

// Delayed delivery design
//
// Delayed messages wait in their queue's delayed zset. A global index
// (qbridge:due) holds each queue's earliest due time. Every instance runs
// one promoter: it sleeps until the earliest time in the index (or until
// this instance schedules something, or at most a second), then runs the
// promote script for each queue that is due. The script moves due
// messages to the ready list atomically and in due order, so several
// instances promoting at once never promote a message twice, and the work is
// O(due). The instance that scheduled a message always knows its due time
// at once; others find it in the index within a second. Writing the index is
// a separate step from scheduling (the keys live in different cluster
// slots), so every few seconds each promoter also sweeps the known queues and
// puts back any queue with delayed messages that the index lacks (its
// scheduler died between the two steps).
//
// On Redis Cluster the index is one key on one node, and that node may be
// down while the others serve their slots (cluster-require-full-coverage
// no). So each promoter also keeps the due times it knows of itself: those
// of the messages it scheduled and those its sweeps found (the sweep reads
// every queue's earliest delayed message, and goes on with the queues it
// could read when some cannot be). It promotes from these as well as from
// the index: while the index cannot be reached, delayed messages of the
// queues on healthy nodes are still promoted, those scheduled through this
// instance on time and the others within a sweep. The sweep lists the
// queues from the queue set (qbridge:queues), another single key: when it
// cannot be read, it sweeps the queues this instance knows (registered or
// consumed here, or with a due time it knows).
//
// An attempt on a node that is down costs the client's dial retries
// (seconds; a dial timeout each when its host does not answer), which
// would hold up the promotion of every other queue. So once the index, or
// a queue of a node, failed to be reached, the promoter leaves the index,
// or that node's queues, alone until a sweep finds it back (or downRetry
// passed). Sweeps run beside the promotion and take the slow attempts:
// each one tries the index again while it is down, and a node whose
// queues it could read is back; the first sweep after the index is back
// indexes again whatever it lacks. Failures are logged once per node per
// failureLogEvery.

const (
	promoteBatch    = 1000
	promoterMaxIdle = time.Second
	sweepInterval   = 5 * time.Second
	// downRetry is how long at most the promoter leaves the due index,
	// or the queues of a Redis Cluster node, alone after they could not
	// be reached (a sweep that finds them back ends it sooner).
	downRetry = time.Minute
)

// errNodeDown is what promoteQueue returns for a queue whose node could
// not be reached and has not been found back yet.
var errNodeDown = errors.New("its Redis node could not be reached; it is tried again at the next sweep")

type promoter struct {
	s    *Server
	wake chan struct{} // capacity 1

	mu     sync.Mutex
	offset time.Duration // Redis clock minus local clock
	// local is the due time of each queue's earliest delayed message as
	// far as this instance knows: from its own schedules (noteDue), its
	// sweeps and its promotions. It may be early (a stale entry costs one
	// promote script that moves nothing); it is dropped when the queue
	// has no delayed message left.
	local map[string]time.Time
	// indexDownUntil is set when the due index could not be reached:
	// until then (or a sweep finds it back) promotions neither read nor
	// write it.
	indexDownUntil time.Time
	// nodeDownUntil holds, for each Redis Cluster node that could not be
	// reached, until when the promoter skips its queues (or a sweep finds
	// it back).
	nodeDownUntil map[string]time.Time

	sweeping atomic.Bool // a sweep is under way
	fails    failureLog
}

func newPromoter(s *Server) *promoter {
	return &promoter{s: s, wake: make(chan struct{}, 1), local: map[string]time.Time{}, nodeDownUntil: map[string]time.Time{}}
}

// noteDue tells the promoters that queue has a message due at due.
func (s *Server) noteDue(ctx context.Context, queue string, due time.Time) {
	p := s.promoter
	p.remember(queue, due)
	if !p.indexDown() {
		if err := s.b.NoteDue(ctx, queue, due); err != nil {
			p.indexFailed(err)
			p.fails.warnQueue(s.log, "cannot index a delayed message's due time; this instance promotes it, and the others find it at their next sweep", "", queue, err)
		}
	}
	// Always wake the promoter: it may be in the middle of a pass that
	// read the index before this entry was written.
	p.poke()
}

// poke wakes the promoter.
func (p *promoter) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// remember records that queue has a message due at due (keeping an
// earlier time already known).
func (p *promoter) remember(queue string, due time.Time) {
	if due.IsZero() {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if at, ok := p.local[queue]; !ok || due.Before(at) {
		p.local[queue] = due
	}
}

// setLocal records queue's next due time exactly (zero: none).
func (p *promoter) setLocal(queue string, next time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if next.IsZero() {
		delete(p.local, queue)
	} else {
		p.local[queue] = next
	}
}

// indexDown reports whether the due index is left alone.
func (p *promoter) indexDown() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return time.Now().Before(p.indexDownUntil)
}

// indexFailed records a failure of the due index, if err says that its
// node could not be reached.
func (p *promoter) indexFailed(err error) {
	if !broker.Unreachable(err) {
		return
	}
	p.mu.Lock()
	p.indexDownUntil = time.Now().Add(downRetry)
	p.mu.Unlock()
}

// indexBack records that the due index answered.
func (p *promoter) indexBack() {
	p.mu.Lock()
	p.indexDownUntil = time.Time{}
	p.mu.Unlock()
}

// nodeDown reports whether the queues of Redis Cluster node are left
// alone.
func (p *promoter) nodeDown(node string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	until, ok := p.nodeDownUntil[node]
	if ok && !time.Now().Before(until) {
		delete(p.nodeDownUntil, node)
		return false
	}
	return ok
}

// nodeFailed records a failure of a queue of node, if err says that it
// could not be reached.
func (p *promoter) nodeFailed(node string, err error) {
	if node == "" || !broker.Unreachable(err) {
		return
	}
	p.mu.Lock()
	p.nodeDownUntil[node] = time.Now().Add(downRetry)
	p.mu.Unlock()
}

// nodesBack records that the nodes of queues, all read just now, answer.
func (p *promoter) nodesBack(ctx context.Context, queues []string) {
	p.mu.Lock()
	down := len(p.nodeDownUntil)
	p.mu.Unlock()
	if down == 0 {
		return
	}
	back := map[string]bool{}
	for _, q := range queues {
		back[p.s.b.NodeOf(ctx, q)] = true
	}
	p.mu.Lock()
	for node := range back {
		delete(p.nodeDownUntil, node)
	}
	p.mu.Unlock()
}

// now returns the current time on Redis's clock, as far as known.
func (p *promoter) now() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return time.Now().Add(p.offset)
}

func (p *promoter) run(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	var sweeps sync.WaitGroup
	defer sweeps.Wait()
	lastSweep := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-p.wake:
		}
		if time.Since(lastSweep) >= sweepInterval && p.sweeping.CompareAndSwap(false, true) {
			lastSweep = time.Now()
			sweeps.Add(1)
			go func() {
				defer sweeps.Done()
				defer p.sweeping.Store(false)
				p.sweep(ctx)
				p.poke() // act on what it found
			}()
		}
		// The index is authoritative (noteDue writes it before waking us),
		// so what promoteDue returns is the next thing to do.
		next := p.promoteDue(ctx)
		p.mu.Lock()
		offset := p.offset
		p.mu.Unlock()
		sleep := promoterMaxIdle
		if !next.IsZero() {
			sleep = min(sleep, max(0, time.Until(next.Add(-offset))))
		}
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		t.Reset(sleep)
	}
}

// sweep puts back into the due index every known queue that has delayed
// messages: the index entry is written after the messages are scheduled,
// and an instance that died in between left them unindexed. It also
// refreshes the local due times.
func (p *promoter) sweep(ctx context.Context) {
	s := p.s
	if p.indexDown() {
		// Try the index again here, not in the promotion.
		if _, err := s.b.NextDue(ctx, 1); err == nil {
			p.indexBack()
		} else {
			p.indexFailed(err)
		}
	}
	qs, err := s.b.RegisteredQueues(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		p.fails.warnQueue(s.log, "promoter: cannot list the queues to sweep; sweeping the queues this instance knows", "", "", err)
		qs = p.knownQueues()
	}
	for len(qs) > 0 {
		batch := qs[:min(len(qs), 500)]
		qs = qs[len(batch):]
		firsts, err := s.b.FirstDelayedMany(ctx, batch)
		var pe *broker.PartialError
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			p.fails.warn(s.log, "promoter: cannot read the delayed messages of some queues; they are promoted once they can be read", err)
			if !errors.As(err, &pe) {
				continue
			}
			for _, f := range pe.Failures {
				p.nodeFailed(f.Node, f.Err)
			}
		}
		read := make([]string, 0, len(batch))
		for i, first := range firsts {
			if pe.Failed(i) {
				continue
			}
			read = append(read, batch[i])
			if first.IsZero() {
				p.setLocal(batch[i], first)
				continue
			}
			p.remember(batch[i], first)
			if !p.indexDown() {
				if err := s.b.NoteDue(ctx, batch[i], first); err != nil {
					p.indexFailed(err)
				}
			}
		}
		p.nodesBack(ctx, read)
	}
}

// knownQueues lists the queues this instance knows without asking Redis:
// registered or consumed here, or with a due time it knows.
func (p *promoter) knownQueues() []string {
	s := p.s
	seen := map[string]bool{}
	var qs []string
	add := func(q string) {
		if !seen[q] {
			seen[q] = true
			qs = append(qs, q)
		}
	}
	s.known.Range(func(k, _ any) bool {
		if q, ok := k.(string); ok {
			add(q)
		}
		return true
	})
	for _, q := range s.dispatchedQueues() {
		add(q)
	}
	p.mu.Lock()
	local := make([]string, 0, len(p.local))
	for q := range p.local {
		local = append(local, q)
	}
	p.mu.Unlock()
	for _, q := range local {
		add(q)
	}
	return qs
}

// promoteDue promotes every queue whose earliest message is due, from the
// index and from the local due times, and returns when to look again: the
// earliest due time left, or zero.
func (p *promoter) promoteDue(ctx context.Context) time.Time {
	failed := map[string]bool{} // queues whose promotion failed this round
	indexUp := !p.indexDown()
	var next time.Time
	if indexUp {
		next, indexUp = p.promoteIndexed(ctx, failed)
	}
	// What this instance knows besides: all there is while the index is
	// down; otherwise, usually nothing that the index did not have.
	if ln := p.promoteLocal(ctx, failed, indexUp); !ln.IsZero() && (next.IsZero() || ln.Before(next)) {
		next = ln
	}
	if len(failed) > 0 {
		// Do not spin on queues that cannot be promoted (their node down,
		// or a key overwritten): look again in a while.
		if retry := p.now().Add(promoterMaxIdle); next.IsZero() || retry.Before(next) {
			next = retry
		}
	}
	return next
}

// promoteIndexed promotes the due queues of the index and returns the
// earliest due time left in it (zero: none), and false if the index could
// not be read.
func (p *promoter) promoteIndexed(ctx context.Context, failed map[string]bool) (time.Time, bool) {
	s := p.s
	for {
		zs, err := s.b.NextDue(ctx, 32+len(failed))
		if err != nil {
			if ctx.Err() == nil {
				p.indexFailed(err)
				p.fails.warnQueue(s.log, "promoter: cannot read the due index; promoting the delayed messages this instance knows of", "", "", err)
			}
			return time.Time{}, false
		}
		now := p.now()
		progressed := false
		for _, z := range zs {
			due := time.UnixMilli(int64(z.Score))
			q, _ := z.Member.(string)
			if failed[q] {
				continue
			}
			if due.After(now) {
				return due, true
			}
			if err := p.promoteQueue(ctx, q, true); err != nil {
				failed[q] = true
				if p.indexDown() { // SetDue could not reach it
					return time.Time{}, false
				}
				continue
			}
			progressed = true
		}
		if !progressed {
			return time.Time{}, true
		}
	}
}

// promoteLocal promotes the due queues of the local due times (but those
// that failed this round) and returns the earliest local due time left.
// indexed tells whether to record the outcome in the due index.
func (p *promoter) promoteLocal(ctx context.Context, failed map[string]bool, indexed bool) time.Time {
	now := p.now()
	var due []string
	p.mu.Lock()
	for q, at := range p.local {
		if !failed[q] && !at.After(now) {
			due = append(due, q)
		}
	}
	p.mu.Unlock()
	for _, q := range due {
		if err := p.promoteQueue(ctx, q, indexed && !p.indexDown()); err != nil {
			failed[q] = true
		}
	}
	var next time.Time
	p.mu.Lock()
	defer p.mu.Unlock()
	for q, at := range p.local {
		if !failed[q] && (next.IsZero() || at.Before(next)) {
			next = at
		}
	}
	return next
}

// promoteQueue moves queue's due messages to its ready list and records
// its next due time, locally and, when indexed, in the due index.
func (p *promoter) promoteQueue(ctx context.Context, q string, indexed bool) error {
	s := p.s
	node := s.b.NodeOf(ctx, q)
	if node != "" && p.nodeDown(node) {
		return errNodeDown
	}
	var next time.Time
	for {
		n, nx, redisNow, err := s.b.Promote(ctx, q, promoteBatch)
		if err != nil {
			if ctx.Err() == nil {
				p.nodeFailed(node, err)
				p.fails.warnQueue(s.log, "promoter: cannot promote delayed messages; the queues of this node are tried again once a sweep reads them", node, q, err)
			}
			return err
		}
		p.mu.Lock()
		p.offset = time.Until(redisNow)
		p.mu.Unlock()
		next = nx
		if n < promoteBatch {
			break
		}
	}
	p.setLocal(q, next)
	if !indexed {
		return nil
	}
	if err := s.b.SetDue(ctx, q, next); err != nil {
		p.indexFailed(err)
		return err
	}
	// Another instance may have scheduled an earlier message between the
	// promote script and SetDue: look again, and keep the earlier time.
	if first, err := s.b.FirstDelayed(ctx, q); err == nil && !first.IsZero() && (next.IsZero() || first.Before(next)) {
		_ = s.b.NoteDue(ctx, q, first)
		p.remember(q, first)
	}
	return nil
}

// rateSampler keeps, for each known queue, samples of its counters over the
// last minute, from which enqueue and ack rates are computed. Every
// instance samples the same Redis counters, so all of them report the same
// rates. When some queues cannot be read (on Redis Cluster, those of a node
// that is down) the others are sampled and theirs keep their samples, aging
// out of the window; when the queue set cannot be read, the queues sampled
// so far are.
type rateSampler struct {
	s        *Server
	interval time.Duration

	mu      sync.Mutex
	samples map[string][]rateSample
	fails   failureLog
}

type rateSample struct {
	at            time.Time
	enqueued, ack int64
}

const (
	rateWindow     = time.Minute
	maxRatedQueues = 10000
)

func newRateSampler(s *Server) *rateSampler {
	return &rateSampler{s: s, interval: 5 * time.Second, samples: map[string][]rateSample{}}
}

func (r *rateSampler) run(ctx context.Context) {
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for i := 1; ; i++ {
		r.sample(ctx)
		if i%12 == 0 {
			// About once a minute, forget which queues this process has
			// registered, in case a "forget" event was missed: the next
			// use of each registers it again.
			r.s.known.Clear()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (r *rateSampler) sample(ctx context.Context) {
	qs, err := r.s.b.RegisteredQueues(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		// The queue set's node is down: sample the queues sampled so far.
		r.fails.warnQueue(r.s.log, "rates: cannot list the queues; sampling those sampled so far", "", "", err)
		r.mu.Lock()
		qs = make([]string, 0, len(r.samples))
		for q := range r.samples {
			qs = append(qs, q)
		}
		r.mu.Unlock()
	}
	if len(qs) > maxRatedQueues {
		qs = qs[:maxRatedQueues]
	}
	cs, err := r.s.b.ReadCounters(ctx, qs)
	var pe *broker.PartialError
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		// Queues of a node that is down keep their samples, aging out of
		// the window; the others are sampled.
		r.fails.warn(r.s.log, "rates: cannot read the counters of some queues", err)
		if !errors.As(err, &pe) {
			return
		}
	}
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	fresh := make(map[string][]rateSample, len(qs))
	for i, q := range qs {
		ss := r.samples[q]
		if !pe.Failed(i) {
			ss = append(ss, rateSample{at: now, enqueued: cs[i].Enqueued, ack: cs[i].Acked})
		}
		for len(ss) > 1 && now.Sub(ss[1].at) >= rateWindow {
			ss = ss[1:]
		}
		if len(ss) > 0 {
			fresh[q] = ss
		}
	}
	r.samples = fresh
}

// rates returns the enqueue and ack rates of queue per second over about
// the last minute, ending with the current counters c.
func (r *rateSampler) rates(queue string, c broker.Counters) (enq, ack float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ss := r.samples[queue]
	if len(ss) == 0 {
		return 0, 0
	}
	first := ss[0]
	dt := time.Since(first.at).Seconds()
	if dt < 1 {
		return 0, 0
	}
	return float64(c.Enqueued-first.enqueued) / dt, float64(c.Acked-first.ack) / dt
}
