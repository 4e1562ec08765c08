package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// Sharded pub/sub
//
// Channels the broker calls sharded (broker.WithShardedChannels) are
// subscribed with SSUBSCRIBE, on connections of their own: a shard group
// per hash slot on Redis Cluster (SSUBSCRIBE takes the channels of one slot,
// and the connection goes to the master of that slot), and one group for
// every sharded channel elsewhere. A group exists while a stream holds one
// of its channels; it keeps a reference count per channel like the shared
// connection (the last stream to leave a channel sends SUNSUBSCRIBE; when
// the last leaves the group, its connection is closed).
//
// Each group has a runner goroutine, the only one to write to its
// connection, and a reader goroutine per connection. Commands are queued
// under the hub's lock in the same critical section that registers what
// they are for, and the runner sends them in that order, outside the lock
// (dialling a node never holds up the hub). Redis answers the commands of
// one connection in order, one reply per channel named (or one error for
// the whole command), so the reader matches every reply to the command at
// the head of the group's sent list, and with it to the streams it
// confirms. As on the shared connection, every stream that joins sends its
// own SSUBSCRIBE, even for channels already subscribed, so that it becomes
// ready exactly when its subscriptions took effect (see pubsub.go).
//
// Whatever does not match is something Redis did by itself: a SUNSUBSCRIBE
// for a channel still held means its slot left the node (a slot migration,
// or the node became a replica). Then, and when the connection breaks, a
// reply says MOVED (or another error that retrying cures) or the health
// check's PING goes unanswered, the runner replaces the connection: it
// re-reads the slot map (Redis Cluster), opens a new connection and
// subscribes every channel of the group in one SSUBSCRIBE, whose replies
// also confirm the streams still waiting for a confirmation the old
// connection never gave. Streams that were already receiving carry on
// (messages published while there was no subscription are lost, as with
// any pub/sub outage); streams still waiting end with UNAVAILABLE when
// the new connection cannot be opened, and one whose SSUBSCRIBE Redis
// refuses for good (NOPERM, an unknown command) ends with that error.

// shardHealthEvery is how often a sharded connection that received nothing
// is pinged; no reply, nor anything else, within the next interval
// replaces it (what go-redis's channel does for the shared connection).
const shardHealthEvery = 10 * time.Second

// shardCmd is one command on a sharded connection.
type shardCmd struct {
	kind  string // "ssubscribe", "sunsubscribe" or "ping"
	names []string
	next  int // replies received: names[next] is the next one expected
	// waiters, for ssubscribe: per channel, the streams its confirmation
	// counts for.
	waiters map[string][]*subscriber
}

// shardGroup is one sharded connection and the channels on it.
type shardGroup struct {
	slot  int
	refs  map[string]*subRef // the channels held, by Redis name
	queue []*shardCmd        // to be sent by the runner, in order
	sent  []*shardCmd        // sent and not fully answered, oldest first
	gen   int                // connections opened; readers of older ones stop
	// broken: the connection is to be replaced (at first: opened), not
	// before retryAt.
	broken   bool
	retryAt  time.Time
	attempts int  // failures since the last good reply
	closed   bool // nobody holds a channel any more: the runner ends
	active   bool // something arrived since the last health check
	pinged   bool // the health check's PING is unanswered
	wake     chan struct{}
}

func (g *shardGroup) poke() {
	select {
	case g.wake <- struct{}{}:
	default:
	}
}

// addShardedLocked registers sub's sharded channels and queues its
// SSUBSCRIBE per group; each distinct channel is one more confirmation sub
// waits for.
func (h *hub) addShardedLocked(sub *subscriber) {
	byGroup := map[int][]string{}
	for _, c := range sub.schannels {
		slot := h.s.b.ShardedSlot(c)
		if !slices.Contains(byGroup[slot], c) {
			byGroup[slot] = append(byGroup[slot], c)
		}
	}
	for slot, names := range byGroup {
		g := h.groups[slot]
		if g == nil {
			g = &shardGroup{slot: slot, refs: map[string]*subRef{}, broken: true, wake: make(chan struct{}, 1)}
			h.groups[slot] = g
			h.wg.Add(1)
			go h.runShard(g)
		}
		cmd := &shardCmd{kind: "ssubscribe", names: names, waiters: make(map[string][]*subscriber, len(names))}
		for _, n := range names {
			r := g.refs[n]
			if r == nil {
				r = &subRef{members: map[*subscriber]struct{}{}}
				g.refs[n] = r
			}
			r.members[sub] = struct{}{}
			cmd.waiters[n] = []*subscriber{sub}
			sub.waiting++
		}
		g.queue = append(g.queue, cmd)
		g.poke()
	}
}

// removeShardedLocked lets go of sub's sharded channels: SUNSUBSCRIBE for
// those nobody else holds, or the whole connection when its group is left
// empty.
func (h *hub) removeShardedLocked(sub *subscriber) {
	gone := map[*shardGroup][]string{}
	for _, c := range sub.schannels {
		g := h.groups[h.s.b.ShardedSlot(c)]
		if g == nil {
			continue
		}
		r := g.refs[c]
		if r == nil {
			continue
		}
		delete(r.members, sub)
		if len(r.members) > 0 {
			continue
		}
		delete(g.refs, c)
		gone[g] = append(gone[g], c)
	}
	for g, names := range gone {
		if len(g.refs) == 0 {
			h.closeGroupLocked(g)
			continue
		}
		g.queue = append(g.queue, &shardCmd{kind: "sunsubscribe", names: names})
		g.poke()
	}
}

func (h *hub) closeGroupLocked(g *shardGroup) {
	g.closed = true
	if h.groups[g.slot] == g {
		delete(h.groups, g.slot)
	}
	g.poke()
}

// closeShards ends every group and waits for their goroutines.
func (h *hub) closeShards() {
	h.mu.Lock()
	h.closed = true
	for _, g := range h.groups {
		h.closeGroupLocked(g)
	}
	h.mu.Unlock()
	h.wg.Wait()
}

// runShard is g's runner: it opens (and replaces) g's connection, sends
// what is queued, and checks the connection's health, until g is closed.
func (h *hub) runShard(g *shardGroup) {
	defer h.wg.Done()
	tick := time.NewTicker(shardHealthEvery)
	defer tick.Stop()
	var ps *redis.PubSub // the current connection
	defer func() {
		if ps != nil {
			_ = ps.Close()
		}
	}()
	for {
		h.mu.Lock()
		if g.closed || h.closed {
			h.mu.Unlock()
			return
		}
		if g.broken {
			if wait := time.Until(g.retryAt); wait > 0 {
				h.mu.Unlock()
				if !h.pause(g, wait) {
					return
				}
				continue
			}
			base, gen := h.rebuildLocked(g)
			h.mu.Unlock()
			if ps != nil {
				_ = ps.Close()
				ps = nil
			}
			if gen > 1 {
				h.reloadSlots() // replacing a connection: the slot may have a new master
			}
			nps := h.s.b.ShardedPubSub(h.ctx)
			err := nps.SSubscribe(h.ctx, base.names...) // dials the slot's master
			h.mu.Lock()
			if err != nil {
				_ = nps.Close()
				g.broken = true
				h.retryLaterLocked(g)
				if h.ctx.Err() == nil {
					h.s.log.Warn("cannot open a sharded pub/sub connection; retrying", "slot", g.slot, "err", err)
				}
				// Streams still waiting for their confirmation end now;
				// those already receiving wait for the next attempt.
				h.failWaitersLocked(g, wrapUnavailable(fmt.Errorf("cannot subscribe to sharded channels: %v", err)))
				h.mu.Unlock()
				continue
			}
			ps = nps
			g.active, g.pinged = true, false
			h.wg.Add(1)
			go h.readShard(g, nps, gen)
			h.mu.Unlock()
			continue
		}
		if len(g.queue) > 0 {
			cmds := g.queue
			g.queue = nil
			g.sent = append(g.sent, cmds...) // before sending: replies may come at once
			gen := g.gen
			h.mu.Unlock()
			var err error
			for _, c := range cmds {
				if err = h.sendShard(ps, c); err != nil {
					break
				}
			}
			if err != nil {
				h.mu.Lock()
				if g.gen == gen {
					g.broken = true
				}
				h.mu.Unlock()
			}
			continue
		}
		h.mu.Unlock()
		select {
		case <-g.wake:
		case <-tick.C:
			h.mu.Lock()
			h.healthLocked(g)
			h.mu.Unlock()
		case <-h.ctx.Done():
			return
		}
	}
}

// reloadSlots re-reads the slot map of a Redis Cluster client, unless it
// was re-read just now (when many groups lost their node at once, one
// reload serves them all).
func (h *hub) reloadSlots() {
	h.reloadMu.Lock()
	defer h.reloadMu.Unlock()
	if time.Since(h.reloaded) < 250*time.Millisecond {
		return
	}
	ctx, cancel := context.WithTimeout(h.ctx, 5*time.Second)
	defer cancel()
	h.s.b.ReloadSlots(ctx)
	h.reloaded = time.Now()
}

// pause waits for d, or until g is poked; false when the hub is stopping.
func (h *hub) pause(g *shardGroup, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-g.wake:
	case <-h.ctx.Done():
		return false
	}
	return true
}

func (h *hub) sendShard(ps *redis.PubSub, c *shardCmd) error {
	switch c.kind {
	case "ssubscribe":
		return ps.SSubscribe(h.ctx, c.names...)
	case "sunsubscribe":
		return ps.SUnsubscribe(h.ctx, c.names...)
	default:
		return ps.Ping(h.ctx)
	}
}

// rebuildLocked starts a new connection of g: one SSUBSCRIBE of every
// channel g holds, waited for by every stream that still waits for a
// confirmation on g. It replaces what was sent or queued.
func (h *hub) rebuildLocked(g *shardGroup) (*shardCmd, int) {
	base := &shardCmd{kind: "ssubscribe", waiters: map[string][]*subscriber{}}
	for n := range g.refs {
		base.names = append(base.names, n)
	}
	slices.Sort(base.names)
	collect := func(cmds []*shardCmd) {
		for _, c := range cmds {
			for n, ws := range c.waiters {
				r := g.refs[n]
				if r == nil {
					continue
				}
				for _, s := range ws {
					if _, ok := r.members[s]; ok {
						base.waiters[n] = append(base.waiters[n], s)
					}
				}
			}
		}
	}
	collect(g.sent)
	collect(g.queue)
	g.sent, g.queue = []*shardCmd{base}, nil
	g.broken = false
	g.gen++
	return base, g.gen
}

// retryLaterLocked backs off g's next connection attempt: 50 ms after the
// first failure, doubling up to 2 s.
func (h *hub) retryLaterLocked(g *shardGroup) {
	g.attempts++
	g.retryAt = time.Now().Add(min(2*time.Second, 50*time.Millisecond<<min(g.attempts-1, 6)))
}

// failWaitersLocked ends every stream that still waits for a confirmation
// on g.
func (h *hub) failWaitersLocked(g *shardGroup, err error) {
	var subs []*subscriber
	for _, cmds := range [][]*shardCmd{g.sent, g.queue} {
		for _, c := range cmds {
			for _, ws := range c.waiters {
				subs = append(subs, ws...)
			}
		}
	}
	for _, s := range subs {
		h.failLocked(s, err)
	}
}

// healthLocked is the health check of g's connection.
func (h *hub) healthLocked(g *shardGroup) {
	switch {
	case g.broken || g.closed:
	case g.active:
		g.active, g.pinged = false, false
	case g.pinged:
		h.s.log.Warn("sharded pub/sub connection does not answer; replacing it", "slot", g.slot)
		g.broken = true
		g.poke()
	default:
		g.pinged = true
		g.queue = append(g.queue, &shardCmd{kind: "ping"})
		g.poke()
	}
}

// readShard reads connection gen of g until it breaks or is replaced.
func (h *hub) readShard(g *shardGroup, ps *redis.PubSub, gen int) {
	defer h.wg.Done()
	for {
		m, err := ps.Receive(context.Background())
		h.mu.Lock()
		if g.gen != gen || g.closed {
			h.mu.Unlock()
			return
		}
		g.active = true
		if err != nil {
			h.shardErrorLocked(g, err)
		} else {
			switch m := m.(type) {
			case *redis.Subscription:
				h.shardReplyLocked(g, m.Kind, m.Channel)
			case *redis.Pong:
				h.shardReplyLocked(g, "ping", "")
			case *redis.Message:
				if r := g.refs[m.Channel]; r != nil {
					h.deliverLocked(r, &qbridgev1.PubSubMessage{Channel: h.s.b.Keys().StripChannel(m.Channel), Payload: []byte(m.Payload)})
				}
			}
		}
		stop := g.broken || g.closed
		if g.broken {
			g.poke()
		}
		h.mu.Unlock()
		if stop {
			return
		}
	}
}

// shardReplyLocked matches a confirmation (or PONG) to the command at the
// head of g's sent list.
func (h *hub) shardReplyLocked(g *shardGroup, kind, name string) {
	var head *shardCmd
	if len(g.sent) > 0 {
		head = g.sent[0]
	}
	switch {
	case head != nil && head.kind == "ping" && kind == "ping":
		g.sent = g.sent[1:]
		return
	case head != nil && head.kind == kind && head.next < len(head.names) && head.names[head.next] == name:
	case kind == "sunsubscribe" && g.refs[name] == nil:
		return // nothing held is lost
	case kind == "sunsubscribe":
		h.s.log.Info("Redis ended a sharded subscription (its slot moved); subscribing again", "channel", name, "slot", g.slot)
		g.broken = true
		return
	default:
		h.s.log.Warn("unexpected reply on a sharded pub/sub connection; replacing it", "kind", kind, "channel", name, "slot", g.slot)
		g.broken = true
		h.retryLaterLocked(g)
		return
	}
	head.next++
	if kind == "ssubscribe" {
		for _, s := range head.waiters[name] {
			h.confirmLocked(s)
		}
		delete(head.waiters, name)
		g.attempts = 0
	}
	if head.next == len(head.names) {
		g.sent = g.sent[1:]
	}
}

// shardErrorLocked handles an error from g's connection: an error reply
// answers the command at the head of the sent list; anything else means
// the connection broke.
func (h *hub) shardErrorLocked(g *shardGroup, err error) {
	var re redis.Error
	if !errors.As(err, &re) || len(g.sent) == 0 {
		if h.ctx.Err() == nil {
			h.s.log.Info("sharded pub/sub connection lost; reconnecting", "slot", g.slot, "err", err)
		}
		g.broken = true
		return
	}
	msg := err.Error()
	for _, p := range []string{"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY"} {
		if strings.HasPrefix(msg, p) {
			// The command did not run; a new connection, after the slot
			// map is read again, will do it (and keeps its waiters).
			h.s.log.Info("sharded pub/sub command refused for now; reconnecting", "slot", g.slot, "err", err)
			g.broken = true
			h.retryLaterLocked(g)
			return
		}
	}
	head := g.sent[0]
	g.sent = g.sent[1:] // one error stands for every reply of its command
	if head.kind != "ssubscribe" {
		h.s.log.Warn("sharded pub/sub command failed", "command", head.kind, "slot", g.slot, "err", err)
		return
	}
	var names []string
	for _, n := range head.names {
		names = append(names, h.s.b.Keys().StripChannel(n))
	}
	ferr := fmt.Errorf("Redis refused SSUBSCRIBE %s: %w", strings.Join(names, " "), err)
	if strings.Contains(msg, "unknown command") {
		ferr = status.Errorf(codes.FailedPrecondition, "%v: sharded channels need Redis 7 or later", ferr)
	}
	for _, ws := range head.waiters {
		for _, s := range ws {
			h.failLocked(s, ferr)
		}
	}
}
