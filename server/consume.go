package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server/broker"
)

// Consume delivery design
//
// Each qbridge instance runs one dispatcher per queue that has Consume
// streams on it. The dispatcher is the only goroutine that takes messages
// from Redis for that queue on this instance:
//
//   - it asks each stream with credit (max_in_flight minus what it holds) for
//     up to that many messages with one claim script call, which moves them
//     from the ready list to the inflight hash atomically;
//   - the script reports how many remain, so the dispatcher serves further
//     streams only while there is something left;
//   - when the queue is empty it waits, with a blocking BLMOVE from the list
//     to itself (a wait that takes nothing) while the instance has blocking
//     connections to spare, and otherwise parked until a notification or
//     the idle poller says the queue has messages (see idle.go). Thousands
//     of idle streams on one queue cost one wait; thousands of idle queues
//     cost a bounded number of connections.
//
// A stream's goroutine sends what the dispatcher hands it. When the stream
// ends, for whatever reason, it requeues everything it still holds at the
// head of the queue (fenced by lease id, so a delivery that was already
// settled or reaped is left alone).

// Priorities: a stream may consume several queues in strict priority order.
// It is attached to the dispatcher of each, and whichever dispatcher serves
// it fills its credit from its queues in order, highest first, stopping at
// the dispatcher's own queue (lower ones are their own dispatchers' job,
// which likewise start from the top). Each claim is atomic on its queue; a
// per-stream lock keeps two dispatchers from filling one stream at once.

// leaseKey names a lease: lease ids are unique per queue.
type leaseKey struct{ queue, id string }

// consumer is the state of one Consume stream.
type consumer struct {
	id uint64
	// logical is the queues the stream asked for, in priority order; phys
	// the queues it takes from: the same, with each sharded queue replaced
	// by its shards (see shards.go). phys changes when a queue gains
	// shards; fair is true when the stream consumes one sharded queue.
	logical []string
	phys    atomic.Pointer[[]string]
	fair    atomic.Bool
	window  int
	lease   time.Duration
	autoAck bool
	inbox   chan []broker.Lease // capacity window: never blocks the dispatcher

	settled chan struct{} // capacity 1: signalled when held leases are forgotten
	failed  chan error    // capacity 1: the dispatcher cannot serve this stream

	fill sync.Mutex // held while a dispatcher claims for this stream

	mu     sync.Mutex
	held   map[leaseKey]time.Time // deadline of leases taken for this stream and not settled
	unsent int                    // auto-ack: popped, not yet sent
	closed bool
	// left is how many more messages the stream may take in all
	// (ConsumeRequest.max_messages); -1: no limit.
	left int
	// For a sharded queue's stream (fair): the shards that have messages
	// for the stream but found it full or had to wait their turn, and
	// when each shard last gave to it (see fairTake).
	wants  map[string]bool
	served map[string]uint64
	serves uint64
}

// queues returns the physical queues the stream takes from, highest
// priority first.
func (c *consumer) queues() []string { return *c.phys.Load() }

// setQueues sets the physical queues (see consumer.logical).
func (c *consumer) setQueues(phys []string, fair bool) {
	c.phys.Store(&phys)
	c.fair.Store(fair)
}

// Fair turns. The shards of a sharded queue share a stream: each shard's
// dispatcher fills it, at most ceil(window/shards) per take. A shard with
// messages that finds the stream full, or must wait its turn, says it wants
// the stream; while other shards want it, a shard takes only if it is the
// one that gave least recently (ties broken by name), and a shard that gives
// or turns out to be empty wakes the others that want. So when every shard
// has messages they take turns, and a shard that alone has messages still
// fills the whole window.

// fairTake returns how many messages the dispatcher of queue q may take
// for the stream now (0: none), and the dispatchers to wake: those whose
// turn comes first. mayHave tells whether q may have messages. For a
// stream that is not fair it returns the credit.
func (c *consumer) fairTake(q string, mayHave bool) (n int, wake []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n = c.creditLocked()
	if !c.fair.Load() {
		return n, nil
	}
	if n <= 0 {
		if mayHave {
			c.want(q)
		}
		return 0, nil
	}
	mine := c.served[q]
	for x, w := range c.wants {
		if w && x != q && (c.served[x] < mine || c.served[x] == mine && x < q) {
			wake = append(wake, x)
		}
	}
	if len(wake) > 0 {
		if mayHave {
			c.want(q)
		}
		return 0, wake
	}
	k := len(c.queues())
	return min(n, max(1, (c.window+k-1)/k)), nil
}

func (c *consumer) want(q string) {
	if c.wants == nil {
		c.wants = map[string]bool{}
	}
	c.wants[q] = true
}

// gaveFrom records that queue q gave to the stream, and returns the other
// queues that want it (their turn may have come).
func (c *consumer) gaveFrom(q string) (wake []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.fair.Load() {
		return nil
	}
	if c.served == nil {
		c.served = map[string]uint64{}
	}
	c.serves++
	c.served[q] = c.serves
	delete(c.wants, q)
	for x, w := range c.wants {
		if w {
			wake = append(wake, x)
		}
	}
	return wake
}

// unwant records that queue q has nothing for the stream (it is empty, or
// no longer one of the stream's queues), and returns the queues that may
// have been waiting for q's turn.
func (c *consumer) unwant(q string) (wake []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.wants[q] {
		return nil
	}
	delete(c.wants, q)
	for x, w := range c.wants {
		if w {
			wake = append(wake, x)
		}
	}
	return wake
}

// credit is how many more messages the stream may take.
func (c *consumer) credit() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.creditLocked()
}

func (c *consumer) creditLocked() int {
	if c.closed {
		return 0
	}
	n := c.window - len(c.held) - c.unsent
	if c.left >= 0 && c.left < n {
		n = c.left
	}
	return n
}

func (c *consumer) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (c *consumer) holding() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.held) + c.unsent
}

// give hands leases to the stream. It returns false when the stream has
// already ended; the caller then gives the messages back.
func (c *consumer) give(ls []broker.Lease) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	if c.left >= 0 {
		c.left -= len(ls)
	}
	if c.autoAck {
		c.unsent += len(ls)
	} else {
		for _, l := range ls {
			c.held[leaseKey{l.Queue, l.LeaseID}] = l.Deadline
		}
	}
	select {
	case c.inbox <- ls:
		return true
	default:
		// Cannot happen: credit bounds what is in the inbox.
		panic("qbridge: consumer inbox overflow")
	}
}

// forget drops leases that were settled, here or through another instance.
func (c *consumer) forget(queue string, leaseIDs ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, id := range leaseIDs {
		delete(c.held, leaseKey{queue, id})
	}
	select {
	case c.settled <- struct{}{}:
	default:
	}
}

func (c *consumer) extend(queue, leaseID string, deadline time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := leaseKey{queue, leaseID}
	if _, ok := c.held[k]; ok {
		c.held[k] = deadline
	}
}

// expire forgets leases whose deadline passed (the reaper handles them) and
// returns the next deadline, or zero.
func (c *consumer) expire(now time.Time) (next time.Time, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, d := range c.held {
		if !d.After(now) {
			delete(c.held, k)
			n++
		} else if next.IsZero() || d.Before(next) {
			next = d
		}
	}
	return next, n
}

// close marks the stream ended and returns what it must give back: the
// lease ids it sent, per queue in delivery order, and what it took but
// never sent (leases and auto-ack pops alike).
func (c *consumer) close() (held map[string][]string, unsent []broker.Lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for {
		select {
		case ls := <-c.inbox:
			unsent = append(unsent, ls...)
			for _, l := range ls {
				delete(c.held, leaseKey{l.Queue, l.LeaseID})
			}
			continue
		default:
		}
		break
	}
	held = map[string][]string{}
	for k := range c.held {
		held[k.queue] = append(held[k.queue], k.id)
	}
	for _, ids := range held {
		sortLeaseIDs(ids)
	}
	c.held = nil
	return held, unsent
}

// drainInbox takes back batches not yet sent, for a stream that stays open
// while the server drains.
func (c *consumer) drainInbox() (unsent []broker.Lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		select {
		case ls := <-c.inbox:
			if c.autoAck {
				c.unsent -= len(ls)
			} else {
				for _, l := range ls {
					delete(c.held, leaseKey{l.Queue, l.LeaseID})
				}
			}
			unsent = append(unsent, ls...)
		default:
			return unsent
		}
	}
}

// sortLeaseIDs orders decimal lease ids numerically (= delivery order).
func sortLeaseIDs(ids []string) {
	sort.Slice(ids, func(i, j int) bool {
		if len(ids[i]) != len(ids[j]) {
			return len(ids[i]) < len(ids[j])
		}
		return ids[i] < ids[j]
	})
}

// dispatcher takes messages from one queue for this instance's streams.
type dispatcher struct {
	s     *Server
	queue string
	kick  chan struct{} // capacity 1: "credit changed, look again"
	wake  chan struct{} // capacity 1: "the queue may have messages" (while parked)

	// consumers is guarded by s.mu.
	consumers []*consumer
	next      int
	// mayHave is false when the last take found the queue empty (used by
	// the dispatcher's goroutine only).
	mayHave bool
}

func (d *dispatcher) poke() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// attach registers c with the dispatcher of each of its queues, starting
// them as needed.
func (s *Server) attach(c *consumer) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.isDraining() {
		return errShuttingDown
	}
	s.consumers[c.id] = c
	// Under s.mu, so that a change of shards (reshard) either comes after
	// and sees c, or came before and is in what this reads.
	c.setQueues(s.physicalQueues(c.logical, c.id))
	for _, q := range c.queues() {
		s.attachLocked(c, q)
	}
	return nil
}

// attachLocked attaches c to the dispatcher of queue q, starting it if
// need be.
func (s *Server) attachLocked(c *consumer, q string) {
	d := s.dispatchers[q]
	if d == nil {
		d = &dispatcher{s: s, queue: q, kick: make(chan struct{}, 1), wake: make(chan struct{}, 1), mayHave: true}
		s.dispatchers[q] = d
		go d.run()
	}
	d.consumers = append(d.consumers, c)
	d.poke()
}

// detachLocked detaches c from the dispatcher of queue q.
func (s *Server) detachLocked(c *consumer, q string) {
	d := s.dispatchers[q]
	if d == nil {
		return
	}
	for i, x := range d.consumers {
		if x == c {
			d.consumers = append(d.consumers[:i], d.consumers[i+1:]...)
			break
		}
	}
	d.poke()
	s.pokeLocked(c.unwant(q))
}

// pokeLocked wakes the dispatchers of queues.
func (s *Server) pokeLocked(queues []string) {
	for _, q := range queues {
		if d := s.dispatchers[q]; d != nil {
			d.poke()
		}
	}
}

// reshard follows a change of queue's shards: the open streams on it take
// from its new shards too (or, if the queue was deleted and its shards
// forgotten, from shard 0 alone).
func (s *Server) reshard(queue string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.consumers {
		if !slices.Contains(c.logical, queue) || c.isClosed() {
			continue
		}
		if s.isDraining() {
			continue
		}
		old := c.queues()
		phys, fair := s.physicalQueues(c.logical, c.id)
		for _, q := range old {
			if !slices.Contains(phys, q) {
				s.detachLocked(c, q)
			}
		}
		c.setQueues(phys, fair)
		for _, q := range phys {
			if !slices.Contains(old, q) {
				s.attachLocked(c, q)
			}
		}
	}
}

// detach unregisters c; a dispatcher exits when its last stream is gone.
func (s *Server) detach(c *consumer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.consumers, c.id)
	s.undispatchLocked(c)
}

// undispatch stops giving c new messages, but keeps it reachable for the
// acks of what it holds (used while draining).
func (s *Server) undispatch(c *consumer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.undispatchLocked(c)
}

func (s *Server) undispatchLocked(c *consumer) {
	for _, q := range c.queues() {
		s.detachLocked(c, q)
	}
}

func (s *Server) kickQueue(q string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.dispatchers[q]; d != nil {
		d.poke()
	}
}

// hungry returns the streams with credit, starting after the one served
// first last time, or nil; ok is false when the dispatcher should exit.
func (d *dispatcher) hungry() (cs []*consumer, ok bool) {
	s := d.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(d.consumers) == 0 || s.isDraining() {
		if s.dispatchers[d.queue] == d {
			delete(s.dispatchers, d.queue)
		}
		return nil, false
	}
	n := len(d.consumers)
	d.next = (d.next + 1) % n
	for i := 0; i < n; i++ {
		c := d.consumers[(d.next+i)%n]
		k, wake := c.fairTake(d.queue, d.mayHave)
		if k > 0 {
			cs = append(cs, c)
		}
		s.pokeLocked(wake)
	}
	return cs, true
}

// emptied records that the dispatcher's queue had nothing left: no stream
// of it waits for its turn any more.
func (d *dispatcher) emptied() {
	s := d.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range d.consumers {
		s.pokeLocked(c.unwant(d.queue))
	}
}

// pausedRecheck is how often a paused queue's dispatcher looks again
// (besides being woken when the queue is resumed).
const pausedRecheck = time.Second

func (d *dispatcher) run() {
	s := d.s
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-s.draining:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := s.b.RegisterQueue(ctx, d.queue); err != nil {
		s.log.Warn("cannot register queue for lease reaping", "queue", d.queue, "err", err)
	}
	defer s.idleQueues.offerSlot() // any slot it held stays free now
	backoff := s.opts.claimRetryBackoff
	for {
		cs, ok := d.hungry()
		if !ok {
			return
		}
		if len(cs) == 0 {
			select {
			case <-d.kick:
			case <-ctx.Done():
			}
			continue
		}
		got, paused, err := d.serve(ctx, cs)
		if err == nil && paused {
			select {
			case <-d.kick:
			case <-time.After(pausedRecheck):
			case <-ctx.Done():
			}
			continue
		}
		if err == nil && !got {
			// The queue is empty: wait until it is not (see idle.go).
			err = d.waitReady(ctx)
			d.mayHave = true
		}
		if err != nil {
			if ctx.Err() != nil {
				continue
			}
			if errors.Is(err, broker.ErrWrongType) {
				// Retrying cannot help: end the queue's streams with the
				// reason.
				d.failAll(err)
				continue
			}
			s.log.Warn("cannot take messages from queue; retrying", "queue", d.queue, "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		backoff = s.opts.claimRetryBackoff
	}
}

// failAll ends every stream of the queue with err and stops serving them.
func (d *dispatcher) failAll(err error) {
	s := d.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range d.consumers {
		select {
		case c.failed <- err:
		default:
		}
	}
	d.consumers = nil
}

// serve fills the hungry streams while the queue has messages. It reports
// whether anything was taken, and whether the queue is paused. Streams on
// this queue alone are filled together, one take each in one pipelined
// round trip; streams with several queues are filled one by one, in
// priority order (fillFor).
func (d *dispatcher) serve(ctx context.Context, cs []*consumer) (got, paused bool, err error) {
	var single, multi []*consumer
	for _, c := range cs {
		if len(c.queues()) == 1 || c.fair.Load() {
			single = append(single, c)
		} else {
			multi = append(multi, c)
		}
	}
	if len(single) > 0 {
		g, remaining, p, err := d.fillMany(ctx, single)
		got = g
		if err != nil || p {
			return got, p, err
		}
		if remaining == 0 {
			return got, false, nil
		}
	}
	for _, c := range multi {
		g, remaining, p, err := d.fillFor(ctx, c)
		got = got || g
		if err != nil || p {
			return got, p, err
		}
		if remaining == 0 {
			break
		}
	}
	return got, false, nil
}

// fillMany takes messages from the dispatcher's queue for streams that
// consume only it, with one take per stream in one round trip. remaining
// is what the last take left in the queue.
func (d *dispatcher) fillMany(ctx context.Context, cs []*consumer) (got bool, remaining int64, paused bool, err error) {
	// A sharded queue's stream is filled by the dispatcher of each shard:
	// take the fill locks in one order (by stream id) everywhere, so that
	// two dispatchers never wait for each other.
	locked := slices.Clone(cs)
	slices.SortFunc(locked, func(a, b *consumer) int { return cmp.Compare(a.id, b.id) })
	for _, c := range locked {
		c.fill.Lock()
	}
	defer func() {
		for _, c := range locked {
			c.fill.Unlock()
		}
	}()
	takes := make([]*broker.Take, 0, len(cs))
	owners := make([]*consumer, 0, len(cs))
	var wake []string
	for _, c := range cs {
		n, w := c.fairTake(d.queue, true)
		wake = append(wake, w...)
		if n > 0 {
			takes = append(takes, &broker.Take{N: n, Lease: c.lease, AutoAck: c.autoAck})
			owners = append(owners, c)
		}
	}
	defer func() {
		if remaining >= 0 {
			d.mayHave = remaining > 0
		}
		if remaining == 0 {
			d.emptied()
		}
		for _, q := range wake {
			d.s.kickQueue(q)
		}
	}()
	if len(takes) == 0 {
		return false, -1, false, nil
	}
	d.s.b.TakeMany(ctx, d.queue, takes)
	remaining = -1
	for i, t := range takes {
		c := owners[i]
		switch {
		case errors.Is(t.Err, broker.ErrPaused):
			paused = true
			continue
		case t.Err != nil:
			if err == nil {
				err = t.Err
			}
			continue
		}
		remaining = t.Remaining
		if len(t.Leases) > 0 {
			got = true
			if !c.give(t.Leases) {
				d.s.giveBack(c, t.Leases)
			}
			wake = append(wake, c.gaveFrom(d.queue)...)
		}
	}
	if paused && err == nil {
		return got, 0, true, nil
	}
	return got, remaining, false, err
}

// fillFor takes messages for c from its queues in priority order, down to
// this dispatcher's queue. remaining is what is left in this dispatcher's
// queue (-1: not looked at); paused is true when that queue is paused.
func (d *dispatcher) fillFor(ctx context.Context, c *consumer) (got bool, remaining int64, paused bool, err error) {
	s := d.s
	c.fill.Lock()
	defer c.fill.Unlock()
	remaining = -1
	for _, q := range c.queues() {
		n := c.credit()
		if n <= 0 {
			return got, remaining, false, nil
		}
		var ls []broker.Lease
		var rem int64
		if c.autoAck {
			ls, rem, err = s.b.Pop(ctx, q, n)
		} else {
			ls, rem, err = s.b.Claim(ctx, q, n, c.lease)
		}
		switch {
		case errors.Is(err, broker.ErrPaused):
			if q == d.queue {
				return got, 0, true, nil
			}
			continue // a paused higher-priority queue is skipped
		case err != nil:
			return got, remaining, false, err
		}
		if len(ls) > 0 {
			got = true
			if !c.give(ls) {
				s.giveBack(c, ls)
			}
		}
		if q == d.queue {
			return got, rem, false, nil
		}
	}
	return got, remaining, false, nil
}

// giveBack returns messages taken for a stream that cannot send them (it
// ended, or the server drains): auto-ack pops go back to the head unchanged,
// leases are requeued.
func (s *Server) giveBack(c *consumer, ls []broker.Lease) {
	if len(ls) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.requeueTimeout)
	defer cancel()
	byQueue := map[string][]broker.Lease{}
	var order []string
	for _, l := range ls {
		if _, ok := byQueue[l.Queue]; !ok {
			order = append(order, l.Queue)
		}
		byQueue[l.Queue] = append(byQueue[l.Queue], l)
	}
	for _, q := range order {
		qls := byQueue[q]
		if c.autoAck {
			if err := s.b.PushBack(ctx, q, qls); err != nil {
				s.log.Error("LOST auto-ack messages: cannot push them back", "queue", q, "count", len(qls), "err", err)
			}
			continue
		}
		ids := make([]string, len(qls))
		for i, l := range qls {
			ids[i] = l.LeaseID
		}
		// Never sent: not an attempt. Back to the head, uncharged.
		if _, _, err := s.b.Nack(ctx, q, ids, broker.NackReturn, -1, ""); err != nil {
			s.log.Warn("cannot requeue; the lease reaper will", "queue", q, "count", len(ids), "err", err)
		}
	}
}

// Consume implements QueueService.Consume.
func (s *Server) Consume(req *qbridgev1.ConsumeRequest, stream qbridgev1.QueueService_ConsumeServer) error {
	queues, err := consumeQueues(req)
	if err != nil {
		return toStatus(err)
	}
	window := int(req.GetMaxInFlight())
	if window == 0 {
		window = s.opts.defaultInFlight
	}
	if window > s.opts.maxInFlight {
		return toStatus(invalidf("max_in_flight %d is above the limit %d (0 means the default, %d)", req.GetMaxInFlight(), s.opts.maxInFlight, s.opts.defaultInFlight))
	}
	lease, err := leaseFrom(req.GetLeaseDuration(), s.opts.defaultLease, s.opts.minLease, s.opts.maxLease)
	if err != nil {
		return toStatus(invalidError{err})
	}
	left := -1
	if req.GetMaxMessages() > 0 {
		left = int(req.GetMaxMessages())
	}
	c := &consumer{
		left:    left,
		id:      s.nextID.Add(1),
		logical: queues,
		window:  window,
		lease:   lease,
		autoAck: req.GetAutoAck(),
		inbox:   make(chan []broker.Lease, window),
		settled: make(chan struct{}, 1),
		failed:  make(chan error, 1),
		held:    map[leaseKey]time.Time{},
	}
	if err := s.attach(c); err != nil {
		return toStatus(err)
	}
	defer s.release(c)
	return toStatus(s.pump(stream, c))
}

// consumeQueues validates the queue or queues a Consume names.
func consumeQueues(req *qbridgev1.ConsumeRequest) ([]string, error) {
	queues := req.GetQueues()
	if len(queues) > 0 && req.GetQueue() != "" {
		return nil, invalidf("give queue or queues, not both")
	}
	if len(queues) == 0 {
		queues = []string{req.GetQueue()}
	}
	if len(queues) > maxQueues {
		return nil, invalidf("%d queues; the limit is %d per stream", len(queues), maxQueues)
	}
	seen := map[string]bool{}
	for i, q := range queues {
		if err := ValidateName("queue", q); err != nil {
			if len(queues) > 1 {
				return nil, invalidf("queues[%d]: %v", i, err)
			}
			return nil, invalidError{err}
		}
		if seen[q] {
			return nil, invalidf("queue %q is listed twice", q)
		}
		seen[q] = true
	}
	return queues, nil
}

// pump sends the stream's deliveries until the stream ends.
func (s *Server) pump(stream qbridgev1.QueueService_ConsumeServer, c *consumer) error {
	ctx := stream.Context()
	expiry := time.NewTimer(time.Hour)
	expiry.Stop()
	armed := false
	draining := s.draining
	kick := func() {
		for _, q := range c.queues() {
			s.kickQueue(q)
		}
	}
	for {
		select {
		case ls := <-c.inbox:
			if err := s.send(stream, c, ls); err != nil {
				// Auto-ack: whether the client got this batch cannot be
				// told, so it counts as delivered (at-most-once).
				// Otherwise the leases are held and release requeues them.
				if c.autoAck {
					c.mu.Lock()
					c.unsent -= len(ls)
					c.mu.Unlock()
				}
				return err
			}
			if c.autoAck {
				c.mu.Lock()
				c.unsent -= len(ls)
				c.mu.Unlock()
				kick()
			} else if !armed {
				expiry.Reset(time.Until(ls[0].Deadline) + 10*time.Millisecond)
				armed = true
			}
		case <-expiry.C:
			armed = false
			next, n := c.expire(time.Now())
			if n > 0 {
				kick()
			}
			if !next.IsZero() {
				expiry.Reset(time.Until(next) + 10*time.Millisecond)
				armed = true
			}
		case <-draining:
			// Stop taking work; hand back what was taken but not sent,
			// and end once nothing is held (or at stopStreams).
			draining = nil
			s.undispatch(c)
			c.fill.Lock() // wait for a fill in progress to land in the inbox
			c.fill.Unlock()
			s.giveBack(c, c.drainInbox())
		case err := <-c.failed:
			return err
		case <-c.settled:
			// Checked below: a draining stream ends once it holds nothing.
		case <-s.stopStreams:
			return errShuttingDown
		case <-ctx.Done():
			return ctx.Err()
		}
		if draining == nil && c.holding() == 0 {
			return errShuttingDown
		}
	}
}

// release ends a stream: everything it holds goes back to its queue now.
func (s *Server) release(c *consumer) {
	s.detach(c)
	c.fill.Lock() // a fill in progress sees the stream closed and gives back itself
	held, unsent := c.close()
	c.fill.Unlock()
	s.giveBack(c, unsent)
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.requeueTimeout)
	defer cancel()
	for q, ids := range held {
		if _, err := s.b.Requeue(ctx, q, ids); err != nil {
			s.log.Warn("cannot requeue the messages of an ended stream; the lease reaper will after their lease", "queue", q, "count", len(ids), "err", err)
			continue
		}
		s.log.Debug("stream ended; requeued its unacked messages", "queue", q, "count", len(ids))
		s.kickQueue(q)
	}
}

// send sends a batch in as many responses as it takes to keep each under
// the response size limit (a standard gRPC client refuses messages over
// 4 MiB by default). A single delivery always goes out alone if need be.
func (s *Server) send(stream qbridgev1.QueueService_ConsumeServer, c *consumer, ls []broker.Lease) error {
	ls = s.faultLose(c, ls)
	ds := s.deliveries(c, ls)
	for len(ds) > 0 {
		n, size := 0, 0
		for n < len(ds) {
			sz := proto.Size(ds[n]) + 8
			if n > 0 && size+sz > s.opts.maxResponseBytes {
				break
			}
			size += sz
			n++
		}
		if err := stream.Send(&qbridgev1.ConsumeResponse{Deliveries: ds[:n]}); err != nil {
			return err
		}
		ds = ds[n:]
	}
	return nil
}

func (s *Server) deliveries(c *consumer, ls []broker.Lease) []*qbridgev1.Delivery {
	out := make([]*qbridgev1.Delivery, len(ls))
	now := time.Now()
	for i, l := range ls {
		m := l.Message
		shard, _ := broker.ShardIndex(l.Queue)
		s.opts.observer.Delivered(broker.Logical(l.Queue), m.Deliveries, now.Sub(time.UnixMilli(m.EnqueuedAt)))
		d := &qbridgev1.Delivery{
			Id:          m.ID,
			Payload:     m.Payload,
			Headers:     m.Headers,
			EnqueueTime: timestamppb.New(time.UnixMilli(m.EnqueuedAt)),
			Attempt:     m.Deliveries,
			Queue:       broker.Logical(l.Queue),
			Shard:       uint32(shard),
			LastError:   m.LastError,
			TaskType:    m.TaskType,
		}
		if !c.autoAck {
			d.AckToken = ackToken{Queue: l.Queue, LeaseID: l.LeaseID, Instance: s.instance, Consumer: c.id}.String()
			d.LeaseDeadline = ts(l.Deadline)
		}
		out[i] = d
	}
	return out
}

// parseTokens validates a request's tokens and groups them by queue.
func parseTokens(tokens []string) (map[string][]ackToken, error) {
	if len(tokens) == 0 {
		return nil, invalidf("ack_tokens is empty; pass the ack_token of each delivery")
	}
	if len(tokens) > maxTokens {
		return nil, invalidf("%d ack tokens in one call; the limit is %d", len(tokens), maxTokens)
	}
	byQueue := map[string][]ackToken{}
	for i, s := range tokens {
		t, err := parseAckToken(s)
		if err != nil {
			return nil, invalidf("ack_tokens[%d]: %v", i, err)
		}
		t.raw = s
		byQueue[t.Queue] = append(byQueue[t.Queue], t)
	}
	return byQueue, nil
}

func leaseIDs(ts []ackToken) []string {
	ids := make([]string, len(ts))
	for i, t := range ts {
		ids[i] = t.LeaseID
	}
	return ids
}

// settleLocal updates the credit of the streams that hold the tokens: a
// stream no longer holds a token that was settled (all, when settled is
// true) or whose lease turned out to be gone (ok[i] false). Streams on this
// instance are updated directly; other instances are told on their control
// channel, so that a stream whose acks go through another instance (as with
// round-robin clients) does not wait for its leases to run out.
func (s *Server) settleLocal(ctx context.Context, ts []ackToken, ok []bool, settled bool) {
	remote := map[string][]string{}
	s.mu.Lock()
	for i, t := range ts {
		if !settled && (i >= len(ok) || ok[i]) {
			continue
		}
		if t.Instance != s.instance {
			remote[t.Instance] = append(remote[t.Instance], strconv.FormatUint(t.Consumer, 10)+" "+t.Queue+" "+t.LeaseID)
			continue
		}
		s.forgetLocked(t.Consumer, t.Queue, t.LeaseID)
	}
	s.mu.Unlock()
	for inst, lines := range remote {
		if _, err := s.b.Publish(ctx, controlPrefix+inst, []byte(strings.Join(lines, "\n"))); err != nil {
			s.log.Debug("cannot notify the instance holding a stream; its credit returns when the leases expire", "instance", inst, "err", err)
		}
	}
}

func (s *Server) forgetLocked(consumerID uint64, queue, leaseID string) {
	c := s.consumers[consumerID]
	if c == nil {
		return
	}
	c.forget(queue, leaseID)
	// The freed credit may be for any of the stream's queues: wake the
	// dispatcher of each (a priority stream's lower queues wait on theirs).
	for _, q := range c.queues() {
		if d := s.dispatchers[q]; d != nil {
			d.poke()
		}
	}
}

// internalPrefix starts the names of qbridge's own channels; the braces
// keep clients from publishing to them through qbridge. controlPrefix
// starts each instance's control channel.
const (
	internalPrefix = "{qbridge}:"
	controlPrefix  = internalPrefix + "instance:"
)

func (s *Server) controlChannel() string { return s.b.Keys().Channel(controlPrefix + s.instance) }

// applyControl handles a message on this instance's control channel: lines
// of "<consumer> <queue> <lease id>" for leases settled through another
// instance.
func (s *Server) applyControl(payload string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, line := range strings.Split(payload, "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		id, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		s.forgetLocked(id, f[1], f[2])
	}
}

// applyTokens runs op for each queue's tokens and reports how many were
// applied; stale tokens make a FAILED_PRECONDITION error that says so.
func (s *Server) applyTokens(ctx context.Context, verb string, settles bool, tokens []string,
	op func(ctx context.Context, queue string, ts []ackToken) ([]bool, error)) (int, error) {
	byQueue, err := parseTokens(tokens)
	if err != nil {
		return 0, err
	}
	done, stale := 0, 0
	var firstErr error
	for q, ts := range byQueue {
		ok, err := op(ctx, q, ts)
		if err != nil {
			firstErr = err
			continue
		}
		for _, v := range ok {
			if v {
				done++
			} else {
				stale++
			}
		}
		s.settleLocal(ctx, ts, ok, settles)
	}
	if firstErr != nil {
		if done > 0 {
			return done, fmt.Errorf("%d of %d %s applied, then: %w", done, len(tokens), verb, firstErr)
		}
		return 0, firstErr
	}
	if stale > 0 {
		return done, staleError{fmt.Sprintf("%d of %d ack tokens no longer hold a lease (it expired and the message was requeued or redelivered, or it was already settled); the other %d were %s", stale, len(tokens), done, verb)}
	}
	return done, nil
}

// Ack implements QueueService.Ack.
func (s *Server) Ack(ctx context.Context, req *qbridgev1.AckRequest) (*qbridgev1.AckResponse, error) {
	results := req.GetResults()
	if len(results) > 0 {
		listed := make(map[string]bool, len(req.GetAckTokens()))
		for _, t := range req.GetAckTokens() {
			listed[t] = true
		}
		for t, r := range results {
			if !listed[t] {
				return nil, toStatus(invalidf("results has a token that is not in ack_tokens (%.40q...)", t))
			}
			if len(r) > s.opts.maxPayload {
				return nil, toStatus(invalidf("a result is %d bytes; the limit is %d (qbridged --max-payload-bytes)", len(r), s.opts.maxPayload))
			}
		}
	}
	n, err := s.applyTokens(ctx, "acknowledged", true, req.GetAckTokens(), func(ctx context.Context, q string, ts []ackToken) ([]bool, error) {
		var res [][]byte
		if len(results) > 0 {
			res = make([][]byte, len(ts))
			for i, t := range ts {
				if r, ok := results[t.raw]; ok {
					res[i] = append([]byte{}, r...) // non-nil even when empty
				}
			}
		}
		if c := s.refillable(q, ts); c != nil {
			return s.ackRefill(ctx, c, q, ts, res)
		}
		return s.b.Ack(ctx, q, leaseIDs(ts), res)
	})
	if err != nil {
		return nil, toStatus(err)
	}
	return &qbridgev1.AckResponse{Acked: uint32(n)}, nil
}

// refillable returns the stream that holds all of ts when an ack of them
// may refill it in the same round trip (see ackRefill): a stream of this
// instance that consumes only queue, with leases (not auto-ack) and no
// max_messages, while the server is not draining. Otherwise nil.
func (s *Server) refillable(queue string, ts []ackToken) *consumer {
	if len(ts) == 0 || s.isDraining() {
		return nil
	}
	id := ts[0].Consumer
	for _, t := range ts {
		if t.Instance != s.instance || t.Consumer != id {
			return nil
		}
	}
	s.mu.Lock()
	c := s.consumers[id]
	s.mu.Unlock()
	if c == nil || c.autoAck || len(c.queues()) != 1 || c.queues()[0] != queue {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.left >= 0 {
		return nil
	}
	return c
}

// ackRefill acks ts for c and, in the same script, claims for c as many
// messages as the ack settled plus the credit c already had: the common
// cycle of a busy consumer (ack what it holds, get as many more) costs one
// Redis round trip instead of two, and no wait for the dispatcher. The
// stream's fill lock keeps the dispatcher from claiming for the same credit
// at the same time; the settled leases are forgotten by the caller
// (applyTokens), which restores the credit the claimed ones took.
func (s *Server) ackRefill(ctx context.Context, c *consumer, q string, ts []ackToken, res [][]byte) ([]bool, error) {
	c.fill.Lock()
	defer c.fill.Unlock()
	if s.isDraining() {
		// Draining began since refillable looked: take nothing more. (A
		// drain that begins after this look waits for the fill lock, then
		// takes back what this gives.)
		return s.b.Ack(ctx, q, leaseIDs(ts), res)
	}
	// The credit now, and what the ack can add to it: the leases of ts that
	// the stream still counts as held.
	extra := max(c.credit(), 0)
	c.mu.Lock()
	limit := extra
	for _, t := range ts {
		if _, ok := c.held[leaseKey{t.Queue, t.LeaseID}]; ok {
			limit++
		}
	}
	c.mu.Unlock()
	ok, ls, _, err := s.b.AckClaim(ctx, q, leaseIDs(ts), res, extra, limit, c.lease)
	if err != nil && ok == nil {
		return nil, err
	}
	if err != nil {
		s.log.Warn("acked, but the refill that came with the ack failed; the dispatcher will refill", "queue", q, "err", err)
	}
	if len(ls) > 0 && !c.give(ls) {
		s.giveBack(c, ls)
	}
	return ok, nil
}

// Nack implements QueueService.Nack.
func (s *Server) Nack(ctx context.Context, req *qbridgev1.NackRequest) (*qbridgev1.NackResponse, error) {
	if len(req.GetError()) > maxErrorText {
		return nil, toStatus(invalidf("error is %d bytes; the limit is %d", len(req.GetError()), maxErrorText))
	}
	delay := time.Duration(-1)
	if req.GetRetryDelay() != nil {
		d, err := durationIn("retry_delay", req.GetRetryDelay(), 0, maxDelay)
		if err != nil {
			return nil, toStatus(invalidError{err})
		}
		delay = d
	}
	var action broker.NackAction
	verb := "requeued"
	switch req.GetAction() {
	case qbridgev1.NackAction_NACK_ACTION_UNSPECIFIED, qbridgev1.NackAction_NACK_ACTION_REQUEUE:
		action = broker.NackRequeue
	case qbridgev1.NackAction_NACK_ACTION_RETRY:
		action, verb = broker.NackRetry, "retried"
	case qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER:
		action, verb = broker.NackDeadLetter, "dead-lettered"
	case qbridgev1.NackAction_NACK_ACTION_DROP:
		verb = "dropped"
	default:
		return nil, toStatus(invalidf("unknown action %d; use NACK_ACTION_REQUEUE, _RETRY, _DEAD_LETTER or _DROP", req.GetAction()))
	}
	if delay >= 0 && action != broker.NackRequeue && action != broker.NackRetry {
		return nil, toStatus(invalidf("retry_delay goes with NACK_ACTION_REQUEUE or NACK_ACTION_RETRY"))
	}
	op := func(ctx context.Context, q string, ts []ackToken) ([]bool, error) {
		ids := leaseIDs(ts)
		if action == "" {
			return s.b.Drop(ctx, q, ids, req.GetError())
		}
		ok, due, err := s.b.Nack(ctx, q, ids, action, delay, req.GetError())
		if err == nil && !due.IsZero() {
			s.noteDue(ctx, q, due)
		}
		return ok, err
	}
	n, err := s.applyTokens(ctx, verb, true, req.GetAckTokens(), op)
	if err != nil {
		return nil, toStatus(err)
	}
	return &qbridgev1.NackResponse{Nacked: uint32(n)}, nil
}

// ExtendLease implements QueueService.ExtendLease.
func (s *Server) ExtendLease(ctx context.Context, req *qbridgev1.ExtendLeaseRequest) (*qbridgev1.ExtendLeaseResponse, error) {
	lease, err := leaseFrom(req.GetLeaseDuration(), s.opts.defaultLease, s.opts.minLease, s.opts.maxLease)
	if err != nil {
		return nil, toStatus(invalidError{err})
	}
	var deadline time.Time
	_, err = s.applyTokens(ctx, "extended", false, req.GetAckTokens(), func(ctx context.Context, q string, ts []ackToken) ([]bool, error) {
		d, ok, err := s.b.Extend(ctx, q, leaseIDs(ts), lease)
		if err == nil {
			deadline = d
			s.extendLocal(ts, ok, d)
		}
		return ok, err
	})
	if err != nil {
		return nil, toStatus(err)
	}
	return &qbridgev1.ExtendLeaseResponse{LeaseDeadline: ts(deadline)}, nil
}

// extendLocal moves the local deadlines of this instance's streams for the
// leases that were extended, so that they do not count them as expired.
// The tokens name the stream that holds each lease.
func (s *Server) extendLocal(ts []ackToken, ok []bool, deadline time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, t := range ts {
		if i >= len(ok) || !ok[i] || t.Instance != s.instance {
			continue
		}
		if c := s.consumers[t.Consumer]; c != nil {
			c.extend(t.Queue, t.LeaseID, deadline)
		}
	}
}
