package server

import (
	"context"
	"sync"
	"time"
)

// Idle queues
//
// A dispatcher whose queue is empty has to learn when it is not. Up to
// blockingWaits queues per instance wait in Redis with BLMOVE from the list
// to itself (see Broker.WaitReady): one blocked connection each, woken at
// once by any producer, a plain LPUSH included. Every other idle queue
// parks, holding no connection at all, and is woken by
//
//   - "ready <queue>" on the events channel, which qbridge's scripts publish
//     when they push to an empty ready list (so an Enqueue through any
//     instance to an empty queue wakes it within a pub/sub hop), and
//   - the poller, which reads the lengths of all parked queues every
//     idlePoll with pipelined LLENs, for pushes that publish nothing (a
//     plain LPUSH) and for announcements lost while the pub/sub connection
//     reconnected.
//
// So thousands of idle queues cost blockingWaits connections plus the
// shared pub/sub connection, and the price of going past blockingWaits is
// a wake-up within idlePoll for what publishes nothing: pushes by plain
// Redis clients, and pushes to a list that such a push already made
// non-empty. A dispatcher that goes away wakes one parked queue to take
// its slot, so that queues fed by plain clients get blocking waits as slots
// free up (a parked queue also looks for a free slot at the end of each
// wait slice).
//
// A queue parks before it checks its length once more, so a push between
// the dispatcher's last look and its parking is never missed: either the
// check sees it or the announcement (or the poller) finds the queue parked.

type idleQueues struct {
	s *Server

	mu     sync.Mutex
	free   int                      // BLMOVE slots free
	parked map[string]chan struct{} // queue -> its dispatcher's wake channel
	first  chan struct{}            // capacity 1: a queue parked, the poller may start
}

func newIdleQueues(s *Server) *idleQueues {
	return &idleQueues{s: s, free: s.opts.blockingWaits, parked: map[string]chan struct{}{}, first: make(chan struct{}, 1)}
}

func (iq *idleQueues) acquire() bool {
	iq.mu.Lock()
	defer iq.mu.Unlock()
	if iq.free > 0 {
		iq.free--
		return true
	}
	return false
}

func (iq *idleQueues) release() {
	iq.mu.Lock()
	iq.free++
	iq.mu.Unlock()
}

// offerSlot wakes one parked queue, if a slot is free, so that it may take
// it. A dispatcher that goes away calls it: its slot then stays free.
// (Releasing a slot at the end of each wait does not: the releaser takes it
// again at once, and waking a parked queue on every cycle of a busy queue
// would cost it a claim and a length check each time for nothing.)
func (iq *idleQueues) offerSlot() {
	iq.mu.Lock()
	var wake chan struct{}
	if iq.free > 0 {
		for _, ch := range iq.parked {
			wake = ch
			break
		}
	}
	iq.mu.Unlock()
	if wake != nil {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
}

func (iq *idleQueues) park(queue string, wake chan struct{}) {
	iq.mu.Lock()
	iq.parked[queue] = wake
	iq.mu.Unlock()
	select {
	case iq.first <- struct{}{}:
	default:
	}
}

func (iq *idleQueues) unpark(queue string) {
	iq.mu.Lock()
	delete(iq.parked, queue)
	iq.mu.Unlock()
}

// wake signals queue's dispatcher if it is parked.
func (iq *idleQueues) wake(queue string) {
	iq.mu.Lock()
	ch := iq.parked[queue]
	iq.mu.Unlock()
	if ch != nil {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// counts reports how many queues hold a blocking wait and how many
// are parked.
func (iq *idleQueues) counts() (blocking, parked int) {
	iq.mu.Lock()
	defer iq.mu.Unlock()
	return iq.s.opts.blockingWaits - iq.free, len(iq.parked)
}

// poll runs the poller until ctx ends.
func (iq *idleQueues) poll(ctx context.Context) {
	t := time.NewTicker(iq.s.opts.idlePoll)
	defer t.Stop()
	for {
		iq.mu.Lock()
		n := len(iq.parked)
		iq.mu.Unlock()
		if n == 0 {
			// Nothing to poll: sleep until something parks.
			select {
			case <-iq.first:
			case <-ctx.Done():
				return
			}
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
		iq.mu.Lock()
		queues := make([]string, 0, len(iq.parked))
		for q := range iq.parked {
			queues = append(queues, q)
		}
		iq.mu.Unlock()
		if len(queues) == 0 {
			continue
		}
		lens, err := iq.s.b.ReadyLengths(ctx, queues)
		if err != nil {
			if ctx.Err() == nil {
				iq.s.log.Debug("cannot poll idle queues; will again", "queues", len(queues), "err", err)
			}
			continue
		}
		for i, n := range lens {
			if n > 0 {
				iq.wake(queues[i])
			}
		}
	}
}

// waitReady returns when d's queue may have messages, something else
// needs the dispatcher's attention (its kick), or the wait slice ends.
func (d *dispatcher) waitReady(ctx context.Context) error {
	s := d.s
	iq := s.idleQueues
	if iq.acquire() {
		defer iq.release()
		_, err := s.b.WaitReady(ctx, d.queue, s.opts.waitSlice)
		return err
	}
	iq.park(d.queue, d.wake)
	defer iq.unpark(d.queue)
	// Drop a stale signal, then look once more now that a push will find
	// the queue parked.
	select {
	case <-d.wake:
	default:
	}
	lens, err := s.b.ReadyLengths(ctx, []string{d.queue})
	if err != nil {
		return err
	}
	if lens[0] > 0 {
		return nil
	}
	t := time.NewTimer(s.opts.waitSlice)
	defer t.Stop()
	select {
	case <-d.wake:
	case <-d.kick: // the dispatcher's loop looks at its streams again
	case <-t.C:
	case <-ctx.Done():
	}
	return nil
}
