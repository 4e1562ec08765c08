package server

import (
	"context"
	"sync"
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

const (
	promoteBatch    = 1000
	promoterMaxIdle = time.Second
	sweepInterval   = 5 * time.Second
)

type promoter struct {
	s    *Server
	wake chan struct{} // capacity 1

	mu     sync.Mutex
	offset time.Duration // Redis clock minus local clock
}

func newPromoter(s *Server) *promoter {
	return &promoter{s: s, wake: make(chan struct{}, 1)}
}

// noteDue tells the promoters that queue has a message due at due.
func (s *Server) noteDue(ctx context.Context, queue string, due time.Time) {
	if err := s.b.NoteDue(ctx, queue, due); err != nil {
		s.log.Warn("cannot index a delayed message's due time; it is promoted at the next full check", "queue", queue, "err", err)
	}
	// Always wake the promoter: it may be in the middle of a pass that
	// read the index before this entry was written.
	select {
	case s.promoter.wake <- struct{}{}:
	default:
	}
}

func (p *promoter) run(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	lastSweep := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-p.wake:
		}
		if time.Since(lastSweep) >= sweepInterval {
			p.sweep(ctx)
			lastSweep = time.Now()
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
// and an instance that died in between left them unindexed.
func (p *promoter) sweep(ctx context.Context) {
	s := p.s
	qs, err := s.b.RegisteredQueues(ctx)
	if err != nil {
		return
	}
	for len(qs) > 0 {
		batch := qs[:min(len(qs), 500)]
		qs = qs[len(batch):]
		firsts, err := s.b.FirstDelayedMany(ctx, batch)
		if err != nil {
			return
		}
		for i, first := range firsts {
			if !first.IsZero() {
				_ = s.b.NoteDue(ctx, batch[i], first)
			}
		}
	}
}

// promoteDue promotes every queue whose earliest message is due and returns
// when to look again: the earliest due time left in the index, or zero.
func (p *promoter) promoteDue(ctx context.Context) time.Time {
	s := p.s
	failed := map[string]bool{} // queues whose promotion failed this round
	for {
		zs, err := s.b.NextDue(ctx, 32+len(failed))
		if err != nil {
			if ctx.Err() == nil {
				s.log.Debug("promoter: cannot read the due index", "err", err)
			}
			return time.Time{}
		}
		p.mu.Lock()
		now := time.Now().Add(p.offset)
		p.mu.Unlock()
		progressed := false
		for _, z := range zs {
			due := time.UnixMilli(int64(z.Score))
			q, _ := z.Member.(string)
			if failed[q] {
				continue
			}
			if due.After(now) {
				return due
			}
			if err := p.promoteQueue(ctx, q); err != nil {
				// Do not spin on a queue that cannot be promoted (Redis
				// down, or its key overwritten): look again in a while.
				failed[q] = true
				continue
			}
			progressed = true
		}
		if !progressed {
			if len(failed) > 0 {
				return now.Add(promoterMaxIdle)
			}
			return time.Time{}
		}
	}
}

// promoteQueue moves queue's due messages to its ready list and records
// its next due time.
func (p *promoter) promoteQueue(ctx context.Context, q string) error {
	s := p.s
	var next time.Time
	for {
		n, nx, redisNow, err := s.b.Promote(ctx, q, promoteBatch)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("promoter: cannot promote", "queue", q, "err", err)
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
	if err := s.b.SetDue(ctx, q, next); err != nil {
		return err
	}
	// Another instance may have scheduled an earlier message between the
	// promote script and SetDue: look again, and keep the earlier time.
	if first, err := s.b.FirstDelayed(ctx, q); err == nil && !first.IsZero() && (next.IsZero() || first.Before(next)) {
		_ = s.b.NoteDue(ctx, q, first)
	}
	return nil
}

// rateSampler keeps, for each known queue, samples of its counters over the
// last minute, from which enqueue and ack rates are computed. Every
// instance samples the same Redis counters, so all of them report the same
// rates.
type rateSampler struct {
	s        *Server
	interval time.Duration

	mu      sync.Mutex
	samples map[string][]rateSample
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
		return
	}
	if len(qs) > maxRatedQueues {
		qs = qs[:maxRatedQueues]
	}
	cs, err := r.s.b.ReadCounters(ctx, qs)
	if err != nil {
		return
	}
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	fresh := make(map[string][]rateSample, len(qs))
	for i, q := range qs {
		ss := append(r.samples[q], rateSample{at: now, enqueued: cs[i].Enqueued, ack: cs[i].Acked})
		for len(ss) > 1 && now.Sub(ss[1].at) >= rateWindow {
			ss = ss[1:]
		}
		fresh[q] = ss
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
