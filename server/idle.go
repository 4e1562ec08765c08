package server

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qbridge/qbridge/server/broker"
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
//
// On Redis Cluster a node may be down while the others serve their slots
// (cluster-require-full-coverage no). The poller's read is then partial
// (broker.PartialError): the queues that were read are woken as usual, and
// those that could not be read become suspect. Suspect queues are read
// apart, by one read at a time in the background, so that a node that
// takes seconds to fail (the client's dial retries; a dial timeout when
// its host does not answer) does not slow the polling of the others; a
// suspect queue that reads again is polled with the others. The failures
// are logged once per node per failureLogEvery.

type idleQueues struct {
	s *Server

	mu     sync.Mutex
	free   int                      // BLMOVE slots free
	parked map[string]chan struct{} // queue -> its dispatcher's wake channel
	first  chan struct{}            // capacity 1: a queue parked, the poller may start
	// suspect holds the parked queues whose length the poller last failed
	// to read; they are read apart (see poll).
	suspect map[string]bool

	suspectReading atomic.Bool // a read of the suspect queues is under way
	fails          failureLog
}

func newIdleQueues(s *Server) *idleQueues {
	return &idleQueues{s: s, free: s.opts.blockingWaits, parked: map[string]chan struct{}{}, first: make(chan struct{}, 1),
		suspect: map[string]bool{}}
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
	delete(iq.suspect, queue) // it parks again only after reading its length
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
	var background sync.WaitGroup // the read of the suspect queues
	defer background.Wait()
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
		var suspects []string
		for q := range iq.parked {
			if iq.suspect[q] {
				suspects = append(suspects, q)
			} else {
				queues = append(queues, q)
			}
		}
		iq.mu.Unlock()
		if len(suspects) > 0 && iq.suspectReading.CompareAndSwap(false, true) {
			background.Add(1)
			go func() {
				defer background.Done()
				defer iq.suspectReading.Store(false)
				iq.readLengths(ctx, suspects)
			}()
		}
		if len(queues) > 0 {
			iq.readLengths(ctx, queues)
		}
	}
}

// readLengths reads the lengths of parked queues, wakes those that are not
// empty, and marks those it could not read as suspect (and the others as
// not).
func (iq *idleQueues) readLengths(ctx context.Context, queues []string) {
	lens, err := iq.s.b.ReadyLengths(ctx, queues)
	if ctx.Err() != nil {
		return
	}
	var pe *broker.PartialError
	if err != nil {
		iq.fails.warn(iq.s.log, "idle poller: cannot read the length of parked queues; their consumers wait for announcements, and the poller tries again", err)
		if !errors.As(err, &pe) {
			return
		}
	}
	iq.mu.Lock()
	for i, q := range queues {
		if _, parked := iq.parked[q]; !parked {
			continue
		}
		if pe.Failed(i) {
			iq.suspect[q] = true
		} else {
			delete(iq.suspect, q)
		}
	}
	iq.mu.Unlock()
	for i, n := range lens {
		if n > 0 && !pe.Failed(i) {
			iq.wake(queues[i])
		}
	}
}

// failureLogEvery is how often failureLog logs the failures of one kind
// on one node.
const failureLogEvery = 30 * time.Second

// failureLog limits the logging of failures of background work that runs
// every tick over many queues (the idle poller, the promoter, the rates
// sampler): a Redis Cluster node that is down for minutes would otherwise
// log a line per queue per tick. Each kind of failure is logged at most
// once per failureLogEvery per node. The zero value is ready to use.
type failureLog struct {
	mu   sync.Mutex
	last map[string]time.Time // what + "\x00" + node -> when last logged
}

// allow reports whether what may be logged for node now, and if so
// records that it is.
func (l *failureLog) allow(what, node string) bool {
	key := what + "\x00" + node
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if at, ok := l.last[key]; ok && now.Sub(at) < failureLogEvery {
		return false
	}
	if l.last == nil {
		l.last = map[string]time.Time{}
	}
	for k, at := range l.last { // forget what no longer fails
		if now.Sub(at) >= failureLogEvery {
			delete(l.last, k)
		}
	}
	l.last[key] = now
	return true
}

// warn logs err, the failure of what: a *broker.PartialError once per node
// of its failures (how many queues failed there, and the first of them),
// any other error once. Cancellations are not logged.
func (l *failureLog) warn(log *slog.Logger, what string, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	var pe *broker.PartialError
	if !errors.As(err, &pe) {
		if l.allow(what, "") {
			log.Warn(what, "err", err, "repeats_logged_every", failureLogEvery)
		}
		return
	}
	count := map[string]int{}
	first := map[string]broker.QueueFailure{}
	for _, f := range pe.Failures {
		if count[f.Node] == 0 {
			first[f.Node] = f
		}
		count[f.Node]++
	}
	for _, node := range pe.Nodes() {
		if l.allow(what, node) {
			f := first[node]
			log.Warn(what, "redis_node", node, "queues", count[node], "of", pe.Total, "queue", f.Queue, "err", f.Err,
				"repeats_logged_every", failureLogEvery)
		}
	}
}

// warnQueue logs err, the failure of what on queue, once per node.
func (l *failureLog) warnQueue(log *slog.Logger, what, node, queue string, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	if l.allow(what, node) {
		log.Warn(what, "redis_node", node, "queue", queue, "err", err, "repeats_logged_every", failureLogEvery)
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
