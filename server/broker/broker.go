package broker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// Broker runs qbridge's operations against Redis.
type Broker struct {
	rdb      redis.UniversalClient
	blocking redis.UniversalClient
	keys     Keys
	isRaw    func(queue string) bool
}

// Option configures a Broker.
type Option func(*Broker)

// WithKeyPrefix prefixes every key and channel name. Default: none.
func WithKeyPrefix(p string) Option { return func(b *Broker) { b.keys = NewKeys(p) } }

// WithRawQueues marks queues whose ready list holds bare payloads, so that
// plain Redis consumers (BLPOP) can read what qbridge enqueues. See
// EnqueueMany for what raw mode gives up. Default: no queue is raw.
func WithRawQueues(isRaw func(queue string) bool) Option {
	return func(b *Broker) { b.isRaw = isRaw }
}

// WithBlockingClient sets a separate client for blocking waits, so that
// queues waiting for messages never starve the pool of ordinary commands.
// Default: the main client.
func WithBlockingClient(c redis.UniversalClient) Option {
	return func(b *Broker) { b.blocking = c }
}

// New returns a Broker over rdb (a single node, Sentinel or Cluster client).
func New(rdb redis.UniversalClient, opts ...Option) *Broker {
	b := &Broker{rdb: rdb, isRaw: func(string) bool { return false }}
	for _, o := range opts {
		o(b)
	}
	if b.blocking == nil {
		b.blocking = rdb
	}
	return b
}

// Keys returns the key layout in use.
func (b *Broker) Keys() Keys { return b.keys }

// IsRaw reports whether queue is in raw mode.
func (b *Broker) IsRaw(queue string) bool { return b.isRaw(queue) }

// Ping checks that Redis answers.
func (b *Broker) Ping(ctx context.Context) error {
	return wrap(b.rdb.Ping(ctx).Err(), "ping")
}

// LoadScripts loads every Lua script into the Redis script cache.
func (b *Broker) LoadScripts(ctx context.Context) error {
	for _, s := range allScripts {
		if err := s.Load(ctx, b.rdb).Err(); err != nil {
			return wrap(err, "load scripts")
		}
	}
	return nil
}

// NewMessage is a message to enqueue.
type NewMessage struct {
	ID      string // empty: a UUIDv7 is assigned
	Headers map[string]string
	Payload []byte
}

// EnqueueMany appends msgs to the tail of queue in one RPUSH, so a batch is
// all or nothing, and returns their ids.
//
// In raw mode the list elements are the bare payloads: a plain BLPOP reads
// them unchanged, but headers and ids are not stored (the ids returned are
// informational) and the enqueue time becomes the time of first delivery.
func (b *Broker) EnqueueMany(ctx context.Context, queue string, msgs []NewMessage) ([]string, error) {
	ids := make([]string, len(msgs))
	els := make([]any, len(msgs))
	raw := b.isRaw(queue)
	now := time.Now().UnixMilli()
	for i, m := range msgs {
		ids[i] = m.ID
		if ids[i] == "" {
			ids[i] = newID()
		}
		if raw {
			els[i] = m.Payload
			continue
		}
		els[i] = encodeEnvelope(&Message{ID: ids[i], EnqueuedAt: now, Headers: m.Headers, Payload: m.Payload})
	}
	if err := b.rdb.RPush(ctx, b.keys.Ready(queue), els...).Err(); err != nil {
		return nil, wrap(err, "enqueue to %q", queue)
	}
	return ids, nil
}

func newID() string {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.NewString()
	}
	return id.String()
}

// Lease is one message taken by a consumer.
type Lease struct {
	LeaseID  string // empty for auto-ack pops
	Deadline time.Time
	Message  *Message
	// element is the list element as it was popped (auto-ack only), for
	// PushBack.
	element string
}

// Claim leases up to n messages from the head of queue for lease, and
// reports how many remain ready. It never blocks: use WaitReady when the
// queue is empty.
func (b *Broker) Claim(ctx context.Context, queue string, n int, lease time.Duration) ([]Lease, int64, error) {
	k := b.keys
	res, err := claimScript.Run(ctx, b.rdb,
		[]string{k.Ready(queue), k.InFlight(queue), k.Leases(queue), k.Seq(queue)},
		n, lease.Milliseconds()).Slice()
	if err != nil {
		return nil, 0, wrap(err, "claim from %q", queue)
	}
	if len(res) < 2 {
		return nil, 0, fmt.Errorf("claim from %q: short reply %v", queue, res)
	}
	remaining, _ := res[0].(int64)
	deadlineMs, _ := res[1].(int64)
	deadline := time.UnixMilli(deadlineMs)
	out := make([]Lease, 0, (len(res)-2)/2)
	for i := 2; i+1 < len(res); i += 2 {
		lid, _ := res[i].(string)
		el, _ := res[i+1].(string)
		m, err := decodeEnvelope([]byte(el))
		if err != nil {
			// Cannot happen for elements the script wrote; keep the
			// message deliverable rather than losing it.
			m = &Message{ID: "raw-" + lid, Deliveries: 1, EnqueuedAt: time.Now().UnixMilli(), Payload: []byte(el)}
		}
		out = append(out, Lease{LeaseID: lid, Deadline: deadline, Message: m})
	}
	return out, remaining, nil
}

// Pop removes up to n messages from the head of queue for an auto-ack
// consumer and reports how many remain ready.
func (b *Broker) Pop(ctx context.Context, queue string, n int) ([]Lease, int64, error) {
	res, err := popScript.Run(ctx, b.rdb, []string{b.keys.Ready(queue)}, n).Slice()
	if err != nil {
		return nil, 0, wrap(err, "pop from %q", queue)
	}
	if len(res) < 1 {
		return nil, 0, fmt.Errorf("pop from %q: short reply %v", queue, res)
	}
	remaining, _ := res[0].(int64)
	now := time.Now().UnixMilli()
	out := make([]Lease, 0, len(res)-1)
	for _, r := range res[1:] {
		el, _ := r.(string)
		m, err := decodeEnvelope([]byte(el))
		if err != nil {
			m = &Message{ID: newID(), EnqueuedAt: now, Payload: []byte(el)}
		}
		m.Deliveries++
		out = append(out, Lease{Message: m, element: el})
	}
	return out, remaining, nil
}

// PushBack returns auto-ack pops that never reached a client to the head of
// queue, in their original order, unchanged.
func (b *Broker) PushBack(ctx context.Context, queue string, ls []Lease) error {
	if len(ls) == 0 {
		return nil
	}
	els := make([]any, 0, len(ls))
	for i := len(ls) - 1; i >= 0; i-- {
		els = append(els, ls[i].element)
	}
	return wrap(b.rdb.LPush(ctx, b.keys.Ready(queue), els...).Err(), "push back to %q", queue)
}

// WaitReady blocks until queue has a ready message or timeout passes, without
// taking anything: it is BLMOVE from the list to itself, head to head, which
// leaves the list unchanged. It reports whether the queue is non-empty.
func (b *Broker) WaitReady(ctx context.Context, queue string, timeout time.Duration) (bool, error) {
	k := b.keys.Ready(queue)
	err := b.blocking.BLMove(ctx, k, k, "LEFT", "LEFT", timeout).Err()
	if errors.Is(err, redis.Nil) {
		return false, nil
	}
	if err != nil {
		return false, wrap(err, "wait on %q", queue)
	}
	return true, nil
}

// Settle removes leases for good (ack, or nack with drop). ok[i] tells
// whether leaseIDs[i] was still held.
func (b *Broker) Settle(ctx context.Context, queue string, leaseIDs []string) (ok []bool, err error) {
	k := b.keys
	res, err := settleScript.Run(ctx, b.rdb, []string{k.InFlight(queue), k.Leases(queue)}, strArgs(leaseIDs)...).Int64Slice()
	if err != nil {
		return nil, wrap(err, "settle in %q", queue)
	}
	return flags(res), nil
}

// Requeue puts leased messages back at the head of queue (oldest delivery
// first, so order is kept). ok[i] tells whether leaseIDs[i] was still held.
func (b *Broker) Requeue(ctx context.Context, queue string, leaseIDs []string) (ok []bool, err error) {
	k := b.keys
	args := append([]any{rawFlag(b.isRaw(queue))}, strArgs(leaseIDs)...)
	res, err := requeueScript.Run(ctx, b.rdb, []string{k.Ready(queue), k.InFlight(queue), k.Leases(queue)}, args...).Int64Slice()
	if err != nil {
		return nil, wrap(err, "requeue in %q", queue)
	}
	return flags(res), nil
}

// Extend moves the deadlines of held leases to now + lease.
func (b *Broker) Extend(ctx context.Context, queue string, leaseIDs []string, lease time.Duration) (deadline time.Time, ok []bool, err error) {
	args := append([]any{lease.Milliseconds()}, strArgs(leaseIDs)...)
	res, err := extendScript.Run(ctx, b.rdb, []string{b.keys.Leases(queue)}, args...).Int64Slice()
	if err != nil {
		return time.Time{}, nil, wrap(err, "extend leases in %q", queue)
	}
	if len(res) < 1 {
		return time.Time{}, nil, fmt.Errorf("extend leases in %q: empty reply", queue)
	}
	return time.UnixMilli(res[0]), flags(res[1:]), nil
}

// ReapExpired requeues up to limit messages of queue whose lease has run out
// and returns how many it requeued.
func (b *Broker) ReapExpired(ctx context.Context, queue string, limit int) (int64, error) {
	k := b.keys
	n, err := reapScript.Run(ctx, b.rdb, []string{k.Ready(queue), k.InFlight(queue), k.Leases(queue)},
		rawFlag(b.isRaw(queue)), limit).Int64()
	return n, wrap(err, "reap %q", queue)
}

// RegisterQueue records queue in the set the reaper walks.
func (b *Broker) RegisterQueue(ctx context.Context, queue string) error {
	return wrap(b.rdb.SAdd(ctx, b.keys.Queues(), queue).Err(), "register %q", queue)
}

// RegisteredQueues lists the queues the reaper walks.
func (b *Broker) RegisteredQueues(ctx context.Context) ([]string, error) {
	qs, err := b.rdb.SMembers(ctx, b.keys.Queues()).Result()
	return qs, wrap(err, "list queues")
}

// Stats holds a queue's counts.
type Stats struct {
	Ready    int64
	InFlight int64
}

// Stats counts the ready and in-flight messages of queue.
func (b *Broker) Stats(ctx context.Context, queue string) (Stats, error) {
	var ready *redis.IntCmd
	var inflight *redis.IntCmd
	_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		ready = p.LLen(ctx, b.keys.Ready(queue))
		inflight = p.HLen(ctx, b.keys.InFlight(queue))
		return nil
	})
	if err != nil {
		return Stats{}, wrap(err, "stats of %q", queue)
	}
	return Stats{Ready: ready.Val(), InFlight: inflight.Val()}, nil
}

// Publish sends payload on channel and returns what Redis PUBLISH returns.
func (b *Broker) Publish(ctx context.Context, channel string, payload []byte) (int64, error) {
	n, err := b.rdb.Publish(ctx, b.keys.Channel(channel), payload).Result()
	return n, wrap(err, "publish to %q", channel)
}

// PubSub opens the connection that Subscribe streams share.
func (b *Broker) PubSub(ctx context.Context) *redis.PubSub {
	return b.blocking.Subscribe(ctx)
}

func strArgs(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

func flags(res []int64) []bool {
	out := make([]bool, len(res))
	for i, r := range res {
		out[i] = r == 1
	}
	return out
}

func rawFlag(raw bool) string {
	if raw {
		return "1"
	}
	return "0"
}
