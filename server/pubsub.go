package server

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// Pub/sub design
//
// All Subscribe streams of an instance share one Redis pub/sub connection.
// The hub keeps a reference count per channel and per pattern; the last
// stream to leave one sends UNSUBSCRIBE/PUNSUBSCRIBE.
//
// Every stream that joins sends its own SUBSCRIBE/PSUBSCRIBE for all its
// names, even those already subscribed: Redis confirms each again, in order
// with the messages on the connection. Confirmations are matched to the
// joining streams first in, first out, per name. A stream becomes ready
// when all of its confirmations have arrived, and only then receives
// messages: whatever arrives before was published before its subscription
// took effect, whatever arrives after was published after. So "everything
// published after the confirmation arrives, nothing published before it
// does" holds exactly, even when a message to an already-subscribed
// channel is still on its way when a stream joins.
//
// Each stream has a bounded buffer; the hub never waits for a slow stream,
// it cuts it off.
//
// Sharded channels (broker.WithShardedChannels) are subscribed with
// SSUBSCRIBE on connections of their own, one per hash slot on Redis
// Cluster (see shardedpubsub.go); their confirmations count towards a
// stream's readiness like the others. Redis never delivers a sharded
// channel's messages to a pattern: patterns stay on the shared connection
// and see classic channels only.

// subscriber is one Subscribe stream.
type subscriber struct {
	channels  []string // Redis names (prefixed)
	patterns  []string
	schannels []string // sharded channels (shardedpubsub.go)

	msgs     chan *qbridgev1.PubSubMessage
	ready    chan struct{} // closed when all subscriptions are confirmed
	overflow chan struct{} // closed when the buffer overflowed
	fail     chan struct{} // closed when a subscription failed (failErr)

	// guarded by hub.mu
	bytes       int
	waiting     int // subscriptions not yet confirmed
	readyClosed bool
	overflowed  bool
	failed      bool
	failErr     error
}

// subRef is one channel or pattern subscribed on the shared connection.
type subRef struct {
	members map[*subscriber]struct{}
}

type hub struct {
	s *Server

	mu    sync.Mutex
	ps    *redis.PubSub
	chans map[string]*subRef
	pats  map[string]*subRef
	// pending holds, per "c:"+name or "p:"+name, the streams whose
	// SUBSCRIBE for that name is not yet confirmed, in the order sent.
	pending map[string][]*subscriber

	// Sharded channels (shardedpubsub.go): a group per slot, whose
	// goroutines wg counts; ctx is the hub's (set by open), closed is set
	// when run ends.
	groups map[int]*shardGroup
	wg     sync.WaitGroup
	ctx    context.Context
	closed bool
	// reloaded is when the slot map was last re-read (guarded by
	// reloadMu, held while re-reading).
	reloadMu sync.Mutex
	reloaded time.Time
}

func newHub(s *Server) *hub {
	return &hub{s: s, chans: map[string]*subRef{}, pats: map[string]*subRef{}, pending: map[string][]*subscriber{},
		groups: map[int]*shardGroup{}}
}

// open creates the shared connection and subscribes the instance's control
// channel; go-redis keeps it subscribed across reconnects even if this
// first attempt fails.
func (h *hub) open(ctx context.Context) {
	ps := h.s.b.PubSub(ctx)
	if err := ps.Subscribe(ctx, h.s.controlChannel(), h.s.b.Keys().Channel(eventsChannel)); err != nil {
		h.s.log.Warn("cannot subscribe to the control channel yet; will on reconnect", "err", err)
	}
	h.mu.Lock()
	h.ps = ps
	h.ctx = ctx
	h.mu.Unlock()
}

// run fans messages out until ctx ends.
func (h *hub) run(ctx context.Context) {
	h.mu.Lock()
	ps := h.ps
	h.mu.Unlock()
	defer ps.Close()
	defer h.closeShards()
	ch := ps.ChannelWithSubscriptions(redis.WithChannelSize(1024), redis.WithChannelHealthCheckInterval(10*time.Second))
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-ch:
			if !ok {
				return
			}
			switch m := m.(type) {
			case *redis.Subscription:
				h.confirmed(m)
			case *redis.Message:
				h.fanOut(m)
			}
		}
	}
}

func (h *hub) confirmed(m *redis.Subscription) {
	var key string
	switch m.Kind {
	case "subscribe":
		key = "c:" + m.Channel
	case "psubscribe":
		key = "p:" + m.Channel
	default:
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	q := h.pending[key]
	if len(q) == 0 {
		return // a resubscription after a reconnect, or our own channels
	}
	sub := q[0]
	if len(q) == 1 {
		delete(h.pending, key)
	} else {
		h.pending[key] = q[1:]
	}
	h.confirmLocked(sub)
}

// confirmLocked counts one confirmation of sub's; the last makes it ready
// (unless a subscription of its failed: it then never becomes ready).
func (h *hub) confirmLocked(sub *subscriber) {
	if sub.failed {
		return
	}
	sub.waiting--
	if sub.waiting == 0 && !sub.readyClosed {
		sub.readyClosed = true
		close(sub.ready)
	}
}

func (h *hub) fanOut(m *redis.Message) {
	keys := h.s.b.Keys()
	if strings.HasPrefix(m.Channel, keys.Channel(internalPrefix)) {
		if m.Pattern == "" {
			switch {
			case m.Channel == h.s.controlChannel():
				h.s.applyControl(m.Payload)
			case m.Channel == keys.Channel(eventsChannel):
				h.s.applyEvent(m.Payload)
			case strings.HasPrefix(m.Channel, keys.Channel(resultsChannelPrefix)):
				h.s.applyResultNotice(m.Channel, m.Payload)
			}
		}
		return // never shown to Subscribe streams
	}
	msg := &qbridgev1.PubSubMessage{Channel: keys.StripChannel(m.Channel), Payload: []byte(m.Payload)}
	h.mu.Lock()
	defer h.mu.Unlock()
	var r *subRef
	if m.Pattern != "" {
		msg.Pattern = keys.StripChannel(m.Pattern)
		r = h.pats[m.Pattern]
	} else {
		r = h.chans[m.Channel]
	}
	if r == nil {
		return
	}
	h.deliverLocked(r, msg)
}

// deliverLocked queues msg for the ready streams of r.
func (h *hub) deliverLocked(r *subRef, msg *qbridgev1.PubSubMessage) {
	queued := 0
	for sub := range r.members {
		if sub.overflowed || sub.failed || !sub.readyClosed {
			continue // not subscribed yet: this was published before
		}
		if sub.bytes+len(msg.Payload) > h.s.opts.subscriberBytes && len(sub.msgs) > 0 {
			h.cutOffLocked(sub)
			continue
		}
		select {
		case sub.msgs <- msg:
			sub.bytes += len(msg.Payload)
			queued++
		default:
			h.cutOffLocked(sub)
		}
	}
	if queued > 0 {
		h.s.opts.observer.PubSubDelivered(queued)
	}
}

// cutOffLocked ends a subscriber that overflowed its buffer. It lets go of
// everything at once: its subscriptions (UNSUBSCRIBE when it was the last
// on a name) and its buffered messages, even while its stream is blocked
// sending to a client that reads nothing; the stream then ends with
// RESOURCE_EXHAUSTED when its handler gets to it.
func (h *hub) cutOffLocked(sub *subscriber) {
	// What it had waiting, and the message that did not fit.
	h.s.opts.observer.PubSubDropped(len(sub.msgs) + 1)
	sub.overflowed = true
	close(sub.overflow)
	h.removeLocked(sub) // removing while fanOut ranges over members is fine
	for {
		select {
		case <-sub.msgs:
			continue
		default:
		}
		break
	}
	sub.bytes = 0
}

// failLocked ends sub because one of its subscriptions failed (err): it
// lets go of all of them, and its stream ends with err.
func (h *hub) failLocked(sub *subscriber, err error) {
	if sub.failed || sub.overflowed {
		return
	}
	sub.failed, sub.failErr = true, err
	close(sub.fail)
	h.removeLocked(sub)
}

// add registers sub and sends its SUBSCRIBE and PSUBSCRIBE.
func (h *hub) add(ctx context.Context, sub *subscriber) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ps == nil || h.closed {
		return fmt.Errorf("pub/sub connection not started")
	}
	join := func(name, kind string, refs map[string]*subRef) {
		r := refs[name]
		if r == nil {
			r = &subRef{members: map[*subscriber]struct{}{}}
			refs[name] = r
		}
		r.members[sub] = struct{}{}
		h.pending[kind+name] = append(h.pending[kind+name], sub)
		sub.waiting++
	}
	for _, c := range sub.channels {
		join(c, "c:", h.chans)
	}
	for _, p := range sub.patterns {
		join(p, "p:", h.pats)
	}
	// If sending fails, no confirmation comes for what was not sent: take
	// this stream's entries (the last ones) back off the pending queues.
	rollback := func(kind string, names []string) {
		for _, n := range names {
			if q := h.pending[kind+n]; len(q) > 0 && q[len(q)-1] == sub {
				if len(q) == 1 {
					delete(h.pending, kind+n)
				} else {
					h.pending[kind+n] = q[:len(q)-1]
				}
			}
		}
	}
	if len(sub.channels) > 0 {
		if err := h.ps.Subscribe(ctx, sub.channels...); err != nil {
			rollback("c:", sub.channels)
			rollback("p:", sub.patterns)
			h.removeLocked(sub)
			return fmt.Errorf("subscribe: %w", err)
		}
	}
	if len(sub.patterns) > 0 {
		if err := h.ps.PSubscribe(ctx, sub.patterns...); err != nil {
			rollback("p:", sub.patterns)
			h.removeLocked(sub)
			return fmt.Errorf("psubscribe: %w", err)
		}
	}
	// Last: it cannot fail here (the runners send, and report failures
	// through sub.fail).
	h.addShardedLocked(sub)
	return nil
}

// remove unregisters sub and drops subscriptions nobody needs any more.
func (h *hub) remove(sub *subscriber) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.removeLocked(sub)
}

func (h *hub) removeLocked(sub *subscriber) {
	ctx := context.Background()
	var goneChans, gonePats []string
	leave := func(name string, refs map[string]*subRef) bool {
		r := refs[name]
		if r == nil {
			return false
		}
		delete(r.members, sub)
		if len(r.members) > 0 {
			return false
		}
		delete(refs, name)
		return true
	}
	for _, c := range sub.channels {
		if leave(c, h.chans) {
			goneChans = append(goneChans, c)
		}
	}
	for _, p := range sub.patterns {
		if leave(p, h.pats) {
			gonePats = append(gonePats, p)
		}
	}
	h.removeShardedLocked(sub)
	if h.ps == nil {
		return
	}
	if len(goneChans) > 0 {
		if err := h.ps.Unsubscribe(ctx, goneChans...); err != nil {
			h.s.log.Debug("unsubscribe failed", "err", err)
		}
	}
	if len(gonePats) > 0 {
		if err := h.ps.PUnsubscribe(ctx, gonePats...); err != nil {
			h.s.log.Debug("punsubscribe failed", "err", err)
		}
	}
}

// Subscribe implements QueueService.Subscribe.
func (s *Server) Subscribe(req *qbridgev1.SubscribeRequest, stream qbridgev1.QueueService_SubscribeServer) error {
	n := len(req.GetChannels()) + len(req.GetPatterns())
	if n == 0 {
		return toStatus(invalidf("no channels or patterns; give at least one"))
	}
	if n > maxSubscribe {
		return toStatus(invalidf("%d channels and patterns; the limit is %d per stream", n, maxSubscribe))
	}
	keys := s.b.Keys()
	sub := &subscriber{
		msgs:     make(chan *qbridgev1.PubSubMessage, s.opts.subscriberBuffer),
		ready:    make(chan struct{}),
		overflow: make(chan struct{}),
		fail:     make(chan struct{}),
	}
	for _, c := range req.GetChannels() {
		if err := ValidateName("channel", c); err != nil {
			return toStatus(invalidError{err})
		}
		if s.b.IsSharded(c) {
			sub.schannels = append(sub.schannels, keys.Channel(c))
		} else {
			sub.channels = append(sub.channels, keys.Channel(c))
		}
	}
	for _, p := range req.GetPatterns() {
		if err := ValidatePattern(p); err != nil {
			return toStatus(invalidError{err})
		}
		sub.patterns = append(sub.patterns, keys.Channel(p))
	}
	if s.isDraining() {
		return toStatus(errShuttingDown)
	}
	ctx := stream.Context()
	if err := s.hub.add(ctx, sub); err != nil {
		return toStatus(fmt.Errorf("%w", wrapUnavailable(err)))
	}
	defer s.hub.remove(sub)

	select {
	case <-sub.ready:
	case <-sub.fail:
		return toStatus(sub.failErr)
	case <-ctx.Done():
		return toStatus(ctx.Err())
	case <-s.draining:
		return toStatus(errShuttingDown)
	}
	if err := stream.Send(&qbridgev1.SubscribeResponse{Event: &qbridgev1.SubscribeResponse_Subscribed{
		Subscribed: &qbridgev1.Subscribed{Channels: req.GetChannels(), Patterns: req.GetPatterns()},
	}}); err != nil {
		return err
	}
	for {
		select {
		case m := <-sub.msgs:
			s.hub.mu.Lock()
			if sub.overflowed {
				s.hub.mu.Unlock()
				continue // cut off: the overflow case ends the stream
			}
			sub.bytes -= len(m.Payload)
			s.hub.mu.Unlock()
			if err := stream.Send(&qbridgev1.SubscribeResponse{Event: &qbridgev1.SubscribeResponse_Message{Message: m}}); err != nil {
				return err
			}
		case <-sub.fail:
			return toStatus(sub.failErr)
		case <-sub.overflow:
			return status.Errorf(codes.ResourceExhausted,
				"subscriber too slow: more than %d messages or %d bytes waiting to be sent; messages were dropped and the stream is closed. Read faster, or resubscribe",
				s.opts.subscriberBuffer, s.opts.subscriberBytes)
		case <-ctx.Done():
			return toStatus(ctx.Err())
		case <-s.draining:
			return toStatus(errShuttingDown)
		}
	}
}
