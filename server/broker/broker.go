package broker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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
	sharded  *channelMatcher // WithShardedChannels (pubsub.go); nil: none
	defaults Policy
	// resultRetention is how long kept results live.
	resultRetention time.Duration
	// enqueues and publishes merge concurrent calls (nil: off).
	enqueues  *coalescer[*enqueueCall]
	publishes *coalescer[*publishCall]
	settles   *coalescer[*settleCall]
	// dur is WithEnqueueReplicas (durability.go).
	dur durability
}

// Policy is a queue policy. As server defaults every field is used; in a
// queue's stored config, zero fields mean "the server default".
type Policy struct {
	// MaxAttempts is how many deliveries a message gets before it is
	// dead-lettered. Default 25.
	MaxAttempts int
	// BackoffMin and BackoffMax bound the retry backoff: retry n waits a
	// random time in [10%, 100%] of min(BackoffMax, BackoffMin*2^(n-1)).
	// Defaults 1s and 10m.
	BackoffMin, BackoffMax time.Duration
	// MaxLength caps ready + delayed messages; 0 means no limit. Default 0.
	MaxLength int64
	// ExpiredDeadLetter dead-letters messages whose ttl passed instead of
	// dropping them. Default false.
	ExpiredDeadLetter bool
	// DedupWindow is how long a dedup key is remembered. Default 10m.
	DedupWindow time.Duration
}

// DefaultPolicy is the policy a server uses unless configured otherwise.
var DefaultPolicy = Policy{MaxAttempts: 25, BackoffMin: time.Second, BackoffMax: 10 * time.Minute, DedupWindow: 10 * time.Minute}

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

// WithBlockingClient sets a separate client for blocking waits and pub/sub,
// so that queues waiting for messages never starve the pool of ordinary
// commands. Default: the main client.
func WithBlockingClient(c redis.UniversalClient) Option {
	return func(b *Broker) { b.blocking = c }
}

// WithDefaults sets the server-wide default queue policy. Default:
// DefaultPolicy.
func WithDefaults(p Policy) Option { return func(b *Broker) { b.defaults = p } }

// WithResultRetention sets how long message results are kept. Default 24h.
func WithResultRetention(d time.Duration) Option { return func(b *Broker) { b.resultRetention = d } }

// WithCoalescing sets how many pipelines of merged calls of each kind
// (enqueues, publishes, acks and drops) may be in flight at once (see
// coalesce.go); 0 sends every call on its own. Default 4.
func WithCoalescing(slots int) Option {
	return func(b *Broker) {
		b.enqueueCoalescing(slots)
		b.publishCoalescing(slots)
		b.settleCoalescing(slots)
	}
}

// DefaultCoalescing is the default of WithCoalescing.
const DefaultCoalescing = 4

// New returns a Broker over rdb (a single node, Sentinel or Cluster client).
func New(rdb redis.UniversalClient, opts ...Option) *Broker {
	b := &Broker{rdb: rdb, isRaw: func(string) bool { return false }, defaults: DefaultPolicy, resultRetention: 24 * time.Hour}
	WithCoalescing(DefaultCoalescing)(b)
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

// IsRaw reports whether queue (or the queue of shard queue) is in raw mode.
func (b *Broker) IsRaw(queue string) bool { return b.isRaw(Logical(queue)) }

// Defaults returns the server-wide default policy.
func (b *Broker) Defaults() Policy { return b.defaults }

// Ping checks that Redis answers. On Redis Cluster it pings every master
// and succeeds when any answers: with one master down the queues of the
// others keep working (see partial.go), and the instance should keep
// serving them rather than refuse every call.
func (b *Broker) Ping(ctx context.Context) error {
	cc, ok := b.rdb.(*redis.ClusterClient)
	if !ok {
		return wrap(b.rdb.Ping(ctx).Err(), "ping")
	}
	var up atomic.Int32
	var mu sync.Mutex
	var firstErr error
	err := cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
		if err := c.Ping(ctx).Err(); err != nil {
			mu.Lock()
			if firstErr == nil {
				firstErr = fmt.Errorf("master %s: %w", c.Options().Addr, err)
			}
			mu.Unlock()
			return nil
		}
		up.Add(1)
		return nil
	})
	if up.Load() > 0 {
		return nil
	}
	if firstErr == nil {
		firstErr = err
	}
	if firstErr == nil {
		firstErr = errors.New("the cluster reports no master")
	}
	return wrap(firstErr, "ping")
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

// run runs a queue script with the standard KEYS and ARGV prefix.
func (b *Broker) run(ctx context.Context, s *redis.Script, queue string, args ...any) *redis.Cmd {
	return s.Run(ctx, b.rdb, b.keys.script(queue), b.argv(queue, args)...)
}

// evalSha queues a queue script on a pipeline (no NOSCRIPT fallback; see
// runMany).
func (b *Broker) evalSha(ctx context.Context, p redis.Pipeliner, s *redis.Script, queue string, args ...any) *redis.Cmd {
	return s.EvalSha(ctx, p, b.keys.script(queue), b.argv(queue, args)...)
}

// argv is the standard ARGV prefix of queue's scripts followed by args.
func (b *Broker) argv(queue string, args []any) []any {
	d := b.defaults
	expired := "drop"
	if d.ExpiredDeadLetter {
		expired = "dead"
	}
	raw := "0"
	if b.IsRaw(queue) {
		raw = "1"
	}
	argv := make([]any, 0, 10+len(args))
	argv = append(argv, raw, d.MaxAttempts, d.BackoffMin.Milliseconds(), d.BackoffMax.Milliseconds(),
		expired, rand.Int32N(1<<30)+1, d.DedupWindow.Milliseconds(), d.MaxLength,
		b.resultRetention.Milliseconds(), b.keys.ResultsChannel(Logical(queue)))
	return append(argv, args...)
}

// NewMessage is a message to enqueue.
type NewMessage struct {
	ID        string // empty: a UUIDv7 is assigned
	Headers   map[string]string
	Payload   []byte
	Delay     time.Duration // deliver no earlier than now + Delay
	DeliverAt time.Time     // or no earlier than this (zero: unset)
	TTL       time.Duration // 0: never expires
	DedupKey  string
	TaskType  string
	// KeepResult keeps the message's outcome for GetResult.
	KeepResult bool
	// Retry policy overrides (0: the queue's policy).
	MaxAttempts            int
	BackoffMin, BackoffMax time.Duration
}

// EnqueueResult reports an EnqueueMany.
type EnqueueResult struct {
	IDs []string
	// Duplicate[i] is true when message i matched a remembered dedup key;
	// IDs[i] is then the id of the earlier message.
	Duplicate []bool
	// FirstDue is the earliest due time of the messages that were delayed
	// (zero when none was).
	FirstDue time.Time
	// Created is true when this enqueue created the queue's bookkeeping: the
	// queue is new, or was deleted and is being recreated.
	Created bool
}

// QueueFullError means a bounded queue has no room for the messages.
type QueueFullError struct {
	Queue     string
	Held, Max int64
}

func (e *QueueFullError) Error() string {
	if q := Logical(e.Queue); q != e.Queue {
		i, _ := ShardIndex(e.Queue)
		return fmt.Sprintf("shard %d of queue %q is full: it holds %d of at most %d messages (ready and delayed; max_length bounds each shard)", i, q, e.Held, e.Max)
	}
	return fmt.Sprintf("queue %q is full: it holds %d of at most %d messages (ready and delayed)", e.Queue, e.Held, e.Max)
}

// EnqueueMany appends msgs to the tail of queue (or schedules the delayed
// ones), all or nothing, and returns their ids. Concurrent calls are merged
// into shared round trips (see coalesce.go); each keeps its own outcome.
//
// In raw mode the list elements are the bare payloads: a plain BLPOP reads
// them unchanged, but headers and ids are not stored (the ids returned are
// informational) and the enqueue time becomes the time of first delivery.
// A delayed message is stored as an envelope until it is due.
func (b *Broker) EnqueueMany(ctx context.Context, queue string, msgs []NewMessage) (EnqueueResult, error) {
	c := newEnqueueCall(ctx, queue, msgs)
	if b.enqueues == nil {
		b.flushEnqueues([]*enqueueCall{c})
	} else {
		b.enqueues.submit(c)
	}
	select {
	case <-c.done:
	case <-ctx.Done():
		// Sent or not, the outcome is no longer the caller's to see.
		return EnqueueResult{}, wrap(ctx.Err(), "enqueue to %q", queue)
	}
	return c.res, c.err
}

// newEnqueueCall encodes msgs into a call for the enqueue coalescer,
// assigning ids where none is given.
func newEnqueueCall(ctx context.Context, queue string, msgs []NewMessage) *enqueueCall {
	c := &enqueueCall{
		ctx: ctx, queue: queue, n: len(msgs), done: make(chan struct{}),
		res:  EnqueueResult{IDs: make([]string, len(msgs)), Duplicate: make([]bool, len(msgs))},
		args: make([]any, 0, 5*len(msgs)),
	}
	now := time.Now().UnixMilli()
	for i, m := range msgs {
		c.res.IDs[i] = m.ID
		if c.res.IDs[i] == "" {
			c.res.IDs[i] = newID()
		}
		el := encodeEnvelope(&Message{
			ID: c.res.IDs[i], EnqueuedAt: now, Headers: m.Headers, Payload: m.Payload, TaskType: m.TaskType, KeepResult: m.KeepResult,
			MaxAttempts: uint16(m.MaxAttempts), BackoffMin: uint32(m.BackoffMin.Milliseconds()), BackoffMax: uint32(m.BackoffMax.Milliseconds()),
		})
		var at int64
		if !m.DeliverAt.IsZero() {
			at = m.DeliverAt.UnixMilli()
		}
		c.bytes += len(el)
		c.args = append(c.args, el, m.Delay.Milliseconds(), at, m.TTL.Milliseconds(), m.DedupKey)
	}
	return c
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
	Queue    string
	LeaseID  string // empty for auto-ack pops
	Deadline time.Time
	Message  *Message
	// element is the list element as it was popped (auto-ack only), for
	// PushBack.
	element string
}

// ErrPaused means the queue is paused: nothing is delivered from it.
var ErrPaused = errors.New("queue is paused")

// Claim leases up to n messages from the head of queue for lease, and
// reports how many remain ready. It never blocks: use WaitReady when the
// queue is empty. A paused queue gives ErrPaused.
func (b *Broker) Claim(ctx context.Context, queue string, n int, lease time.Duration) ([]Lease, int64, error) {
	res, err := b.run(ctx, claimScript, queue, n, lease.Milliseconds()).Slice()
	if err != nil {
		return nil, 0, wrap(err, "claim from %q", queue)
	}
	return parseClaim(queue, res)
}

func parseClaim(queue string, res []any) ([]Lease, int64, error) {
	if len(res) < 2 {
		return nil, 0, fmt.Errorf("claim from %q: short reply %v", queue, res)
	}
	remaining, _ := res[0].(int64)
	if remaining < 0 {
		return nil, 0, ErrPaused
	}
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
		out = append(out, Lease{Queue: queue, LeaseID: lid, Deadline: deadline, Message: m})
	}
	return out, remaining, nil
}

// Pop removes up to n messages from the head of queue for an auto-ack
// consumer and reports how many remain ready. A paused queue gives ErrPaused.
func (b *Broker) Pop(ctx context.Context, queue string, n int) ([]Lease, int64, error) {
	res, err := b.run(ctx, popScript, queue, n).Slice()
	if err != nil {
		return nil, 0, wrap(err, "pop from %q", queue)
	}
	return parsePop(queue, res)
}

func parsePop(queue string, res []any) ([]Lease, int64, error) {
	if len(res) < 1 {
		return nil, 0, fmt.Errorf("pop from %q: short reply %v", queue, res)
	}
	remaining, _ := res[0].(int64)
	if remaining < 0 {
		return nil, 0, ErrPaused
	}
	now := time.Now().UnixMilli()
	out := make([]Lease, 0, len(res)-1)
	for _, r := range res[1:] {
		el, _ := r.(string)
		m, err := decodeEnvelope([]byte(el))
		if err != nil {
			m = &Message{ID: newID(), EnqueuedAt: now, Payload: []byte(el)}
		}
		m.Deliveries++
		out = append(out, Lease{Queue: queue, Message: m, element: el})
	}
	return out, remaining, nil
}

// Take is one claim (or, with AutoAck, pop) of up to N messages, for
// TakeMany.
type Take struct {
	N       int
	Lease   time.Duration
	AutoAck bool
	// Results.
	Leases    []Lease
	Remaining int64
	Err       error
}

// TakeMany runs several claims and pops on one queue in one round trip, in
// order (each sees what the ones before it left). Each take has its own
// result; a paused queue gives each ErrPaused.
func (b *Broker) TakeMany(ctx context.Context, queue string, takes []*Take) {
	runs := make([]scriptRun, len(takes))
	for i, t := range takes {
		if t.AutoAck {
			runs[i] = scriptRun{script: popScript, queue: queue, args: []any{t.N}}
		} else {
			runs[i] = scriptRun{script: claimScript, queue: queue, args: []any{t.N, t.Lease.Milliseconds()}}
		}
	}
	b.runMany(ctx, runs)
	for i, t := range takes {
		verb := "claim from %q"
		if t.AutoAck {
			verb = "pop from %q"
		}
		if runs[i].err != nil {
			t.Err = wrap(runs[i].err, verb, queue)
			continue
		}
		res, err := runs[i].cmd.Slice()
		if err != nil {
			t.Err = wrap(err, verb, queue)
			continue
		}
		if t.AutoAck {
			t.Leases, t.Remaining, t.Err = parsePop(queue, res)
		} else {
			t.Leases, t.Remaining, t.Err = parseClaim(queue, res)
		}
	}
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
	// The pop counted them as acked: take that back (per-task-type totals
	// keep the small overcount of such rare returns).
	_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.LPush(ctx, b.keys.Ready(queue), els...)
		p.HIncrBy(ctx, b.keys.Counters(queue), "acked", -int64(len(ls)))
		return nil
	})
	return wrap(err, "push back to %q", queue)
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

// ReadyLengths returns the length of each queue's ready list, pipelined in
// chunks of 1000 (one round trip per chunk). A key that holds something
// other than a list counts as length 1. Queues that cannot be read (on
// Redis Cluster, those of a node that is down) are reported by a
// *PartialError (see partial.go); the lengths of the others are returned
// with it.
func (b *Broker) ReadyLengths(ctx context.Context, queues []string) ([]int64, error) {
	out := make([]int64, len(queues))
	errs := make([]error, len(queues))
	for start := 0; start < len(queues); start += 1000 {
		chunk := queues[start:min(start+1000, len(queues))]
		cmds := make([]*redis.IntCmd, len(chunk))
		_, _ = b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, q := range chunk {
				cmds[i] = p.LLen(ctx, b.keys.Ready(q))
			}
			return nil
		})
		for i, c := range cmds {
			if err := c.Err(); err != nil {
				if errors.Is(wrap(err, ""), ErrWrongType) {
					out[start+i] = 1 // not a list: let its dispatcher find out
					continue
				}
				errs[start+i] = err
				continue
			}
			out[start+i] = c.Val()
		}
	}
	return out, b.partial(ctx, "read queue lengths", queues, func(i int) error { return errs[i] })
}

// Ack settles leases for good. results[i], when non-nil, is kept as the
// result of leaseIDs[i]'s message (results may be nil). ok[i] tells whether
// leaseIDs[i] was still held.
func (b *Broker) Ack(ctx context.Context, queue string, leaseIDs []string, results [][]byte) (ok []bool, err error) {
	return b.settle(ctx, queue, "acked", "", leaseIDs, results)
}

// AckClaim acks leaseIDs like Ack and, in the same script, claims extra
// plus as many messages as it settled, at most limit, for lease (like
// Claim): one round trip for a consumer that acks and wants as many more.
// A paused queue claims nothing (no error). remaining is what is left ready
// (-1: paused).
func (b *Broker) AckClaim(ctx context.Context, queue string, leaseIDs []string, results [][]byte, extra, limit int, lease time.Duration) (ok []bool, leases []Lease, remaining int64, err error) {
	args := make([]any, 0, 3+2*len(leaseIDs))
	args = append(args, extra, limit, lease.Milliseconds())
	for i, id := range leaseIDs {
		res := ""
		if i < len(results) && results[i] != nil {
			res = "=" + string(results[i])
		}
		args = append(args, id, res)
	}
	out, err := b.run(ctx, ackClaimScript, queue, args...).Slice()
	if err != nil {
		return nil, nil, 0, wrap(err, "ack and claim in %q", queue)
	}
	if len(out) < 1 {
		return nil, nil, 0, fmt.Errorf("ack and claim in %q: empty reply", queue)
	}
	k, _ := out[0].(int64)
	if int(k) != len(leaseIDs) || len(out) < 1+int(k) {
		return nil, nil, 0, fmt.Errorf("ack and claim in %q: unexpected reply %v", queue, out)
	}
	ok = make([]bool, k)
	for i := range ok {
		v, _ := out[1+i].(int64)
		ok[i] = v == 1
	}
	leases, remaining, err = parseClaim(queue, out[1+k:])
	if errors.Is(err, ErrPaused) {
		return ok, nil, -1, nil
	}
	return ok, leases, remaining, err
}

// Drop removes leased messages for good (a Nack that drops); errText is
// kept as their failure when they asked for their result.
func (b *Broker) Drop(ctx context.Context, queue string, leaseIDs []string, errText string) (ok []bool, err error) {
	return b.settle(ctx, queue, "nacked", errText, leaseIDs, nil)
}

func (b *Broker) settle(ctx context.Context, queue, counter, errText string, leaseIDs []string, results [][]byte) ([]bool, error) {
	c := &settleCall{ctx: ctx, queue: queue, counter: counter, errText: errText, args: make([]any, 0, 2*len(leaseIDs)), done: make(chan struct{})}
	for i, id := range leaseIDs {
		res := ""
		if i < len(results) && results[i] != nil {
			res = "=" + string(results[i])
		}
		c.args = append(c.args, id, res)
	}
	if b.settles == nil {
		b.flushSettles([]*settleCall{c})
	} else {
		b.settles.submit(c)
	}
	select {
	case <-c.done:
		return c.ok, c.err
	case <-ctx.Done():
		return nil, wrap(ctx.Err(), "settle in %q", queue)
	}
}

// NackAction says what Nack does with a message.
type NackAction string

// Nack actions; see nackScript.
const (
	NackRequeue    NackAction = "requeue" // at once, or after the given delay
	NackRetry      NackAction = "retry"   // after the policy's backoff, or the given delay
	NackDeadLetter NackAction = "dead"    // to the dead letters
	NackStreamEnd  NackAction = "end"     // a stream ended: requeue, not counted as a nack
	NackReturn     NackAction = "return"  // taken but never sent: requeue, the delivery uncounted
)

// Nack gives leased messages back (oldest delivery first, so order is
// kept). delay < 0 means none given. Whatever is to be delivered again but
// used up its attempts is dead-lettered. ok[i] tells whether leaseIDs[i] was
// still held; firstDue is the earliest due time of messages it scheduled.
func (b *Broker) Nack(ctx context.Context, queue string, leaseIDs []string, action NackAction, delay time.Duration, errText string) (ok []bool, firstDue time.Time, err error) {
	d := int64(-1)
	if delay >= 0 {
		d = delay.Milliseconds()
	}
	args := append([]any{string(action), d, errText}, strArgs(leaseIDs)...)
	res, err := b.run(ctx, nackScript, queue, args...).Int64Slice()
	if err != nil {
		return nil, time.Time{}, wrap(err, "nack in %q", queue)
	}
	if len(res) < 1 {
		return nil, time.Time{}, fmt.Errorf("nack in %q: empty reply", queue)
	}
	if res[0] > 0 {
		firstDue = time.UnixMilli(res[0])
	}
	return flags(res[1:]), firstDue, nil
}

// Requeue puts leased messages back at the head of queue because their
// stream ended (dead-lettering those out of attempts).
func (b *Broker) Requeue(ctx context.Context, queue string, leaseIDs []string) (ok []bool, err error) {
	ok, _, err = b.Nack(ctx, queue, leaseIDs, NackStreamEnd, -1, "")
	return ok, err
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

// ReapExpired handles up to limit messages of queue whose lease has run out
// and returns how many it handled.
func (b *Broker) ReapExpired(ctx context.Context, queue string, limit int) (int64, error) {
	n, err := b.run(ctx, reapScript, queue, limit).Int64()
	return n, wrap(err, "reap %q", queue)
}

// Promote moves up to limit due delayed messages of queue to its ready list.
// It returns how many it moved, when the next one is due (zero: none), and
// Redis's clock.
func (b *Broker) Promote(ctx context.Context, queue string, limit int) (n int64, next, redisNow time.Time, err error) {
	res, err := b.run(ctx, promoteScript, queue, limit).Int64Slice()
	if err != nil {
		return 0, time.Time{}, time.Time{}, wrap(err, "promote in %q", queue)
	}
	if len(res) != 3 {
		return 0, time.Time{}, time.Time{}, fmt.Errorf("promote in %q: unexpected reply %v", queue, res)
	}
	if res[1] > 0 {
		next = time.UnixMilli(res[1])
	}
	return res[0], next, time.UnixMilli(res[2]), nil
}

// NoteDue records in the global due index that queue has a message due at
// due (keeping an earlier time already recorded).
func (b *Broker) NoteDue(ctx context.Context, queue string, due time.Time) error {
	err := b.rdb.ZAddLT(ctx, b.keys.Due(), redis.Z{Score: float64(due.UnixMilli()), Member: queue}).Err()
	return wrap(err, "note due time of %q", queue)
}

// SetDue records queue's next due time in the global index exactly (zero
// removes it).
func (b *Broker) SetDue(ctx context.Context, queue string, next time.Time) error {
	var err error
	if next.IsZero() {
		err = b.rdb.ZRem(ctx, b.keys.Due(), queue).Err()
	} else {
		err = b.rdb.ZAdd(ctx, b.keys.Due(), redis.Z{Score: float64(next.UnixMilli()), Member: queue}).Err()
	}
	return wrap(err, "set due time of %q", queue)
}

// NextDue returns up to n queues with the earliest due times.
func (b *Broker) NextDue(ctx context.Context, n int) ([]redis.Z, error) {
	zs, err := b.rdb.ZRangeWithScores(ctx, b.keys.Due(), 0, int64(n-1)).Result()
	return zs, wrap(err, "read due index")
}

// FirstDelayed returns the due time of queue's earliest delayed message
// (zero: none).
func (b *Broker) FirstDelayed(ctx context.Context, queue string) (time.Time, error) {
	zs, err := b.rdb.ZRangeWithScores(ctx, b.keys.Delayed(queue), 0, 0).Result()
	if err != nil || len(zs) == 0 {
		return time.Time{}, wrap(err, "read delayed of %q", queue)
	}
	return time.UnixMilli(int64(zs[0].Score)), nil
}

// FirstDelayedMany returns the due time of each queue's earliest delayed
// message (zero: none), in one round trip. Queues that cannot be read are
// reported by a *PartialError (see partial.go); the due times of the
// others are returned with it.
func (b *Broker) FirstDelayedMany(ctx context.Context, queues []string) ([]time.Time, error) {
	cmds := make([]*redis.ZSliceCmd, len(queues))
	_, _ = b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, q := range queues {
			cmds[i] = p.ZRangeWithScores(ctx, b.keys.Delayed(q), 0, 0)
		}
		return nil
	})
	out := make([]time.Time, len(queues))
	for i, c := range cmds {
		if c.Err() != nil {
			continue
		}
		if zs := c.Val(); len(zs) > 0 {
			out[i] = time.UnixMilli(int64(zs[0].Score))
		}
	}
	return out, b.partial(ctx, "read delayed messages", queues, func(i int) error { return cmds[i].Err() })
}

// RegisterQueue records queues in the set of known queues.
func (b *Broker) RegisterQueue(ctx context.Context, queues ...string) error {
	if len(queues) == 0 {
		return nil
	}
	return wrap(b.rdb.SAdd(ctx, b.keys.Queues(), strArgs(queues)...).Err(), "register %v", queues)
}

// RegisteredQueues lists the known queues.
func (b *Broker) RegisteredQueues(ctx context.Context) ([]string, error) {
	qs, err := b.rdb.SMembers(ctx, b.keys.Queues()).Result()
	return qs, wrap(err, "list queues")
}

// Known reports whether qbridge knows queue: registered, or a list, config
// or dead letters of that name exist.
func (b *Broker) Known(ctx context.Context, queue string) (bool, error) {
	var member *redis.BoolCmd
	var exists *redis.IntCmd
	_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		member = p.SIsMember(ctx, b.keys.Queues(), queue)
		exists = p.Exists(ctx, b.keys.Ready(queue), b.keys.Config(queue), b.keys.DeadIndex(queue), b.keys.Delayed(queue))
		return nil
	})
	if err != nil {
		return false, wrap(err, "look up %q", queue)
	}
	return member.Val() || exists.Val() > 0, nil
}

// Counters are a queue's event totals.
type Counters struct {
	Enqueued, Acked, Nacked, LeaseExpired, DeadLettered, Expired int64
}

// Stats holds a queue's counts.
type Stats struct {
	Ready, InFlight, Delayed, Dead int64
	// OldestEnqueuedAt is the enqueue time of the head of the ready list
	// (zero when empty or pushed by a plain client).
	OldestEnqueuedAt time.Time
	Paused           bool
	Counters         Counters
	// Consumers is the number of open Consume streams on the queue, over
	// all instances (as of their last heartbeat).
	Consumers int64
}

// Stats reads the counts of queue in one round trip.
func (b *Broker) Stats(ctx context.Context, queue string) (Stats, error) {
	k := b.keys
	var ready, inflight, delayed, dead, paused *redis.IntCmd
	var head *redis.StringCmd
	var counters *redis.SliceCmd
	var consumers *redis.MapStringStringCmd
	var now *redis.TimeCmd
	_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		ready = p.LLen(ctx, k.Ready(queue))
		inflight = p.HLen(ctx, k.InFlight(queue))
		delayed = p.ZCard(ctx, k.Delayed(queue))
		dead = p.ZCard(ctx, k.DeadIndex(queue))
		paused = p.Exists(ctx, k.Paused(queue))
		head = p.LIndex(ctx, k.Ready(queue), 0)
		counters = p.HMGet(ctx, k.Counters(queue), counterFields...)
		consumers = p.HGetAll(ctx, k.Consumers(queue))
		now = p.Time(ctx)
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return Stats{}, wrap(err, "stats of %q", queue)
	}
	st := Stats{Ready: ready.Val(), InFlight: inflight.Val(), Delayed: delayed.Val(), Dead: dead.Val(), Paused: paused.Val() > 0}
	if h := head.Val(); h != "" {
		if m, err := decodeEnvelope([]byte(h)); err == nil && m.EnqueuedAt > 0 {
			st.OldestEnqueuedAt = time.UnixMilli(m.EnqueuedAt)
		}
	}
	st.Counters = parseCounters(counters.Val())
	st.Consumers = liveConsumers(consumers.Val(), now.Val())
	return st, nil
}

// liveConsumers sums the heartbeats (count:expiry ms) not expired at now.
func liveConsumers(h map[string]string, now time.Time) int64 {
	var n int64
	for _, v := range h {
		c, exp, ok := strings.Cut(v, ":")
		if !ok {
			continue
		}
		cn, err1 := strconv.ParseInt(c, 10, 64)
		en, err2 := strconv.ParseInt(exp, 10, 64)
		if err1 == nil && err2 == nil && en >= now.UnixMilli() {
			n += cn
		}
	}
	return n
}

// Heartbeat records, for each queue in counts, how many Consume streams
// instance has open on it, valid for ttl (a count of 0 removes the
// instance's entry). One pipelined round trip.
func (b *Broker) Heartbeat(ctx context.Context, instance string, counts map[string]int, ttl time.Duration) error {
	if len(counts) == 0 {
		return nil
	}
	_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for q, n := range counts {
			heartbeatScript.EvalSha(ctx, p, []string{b.keys.Consumers(q)}, instance, n, ttl.Milliseconds())
		}
		return nil
	})
	if err != nil && isNoScript(err) {
		// Scripts were flushed: Run in a pipeline cannot fall back to EVAL
		// by itself; load it and try once more.
		if lerr := heartbeatScript.Load(ctx, b.rdb).Err(); lerr == nil {
			_, err = b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				for q, n := range counts {
					heartbeatScript.EvalSha(ctx, p, []string{b.keys.Consumers(q)}, instance, n, ttl.Milliseconds())
				}
				return nil
			})
		}
	}
	return wrap(err, "consumer heartbeat")
}

var counterFields = []string{"enqueued", "acked", "nacked", "lease_expired", "dead_lettered", "expired"}

func parseCounters(vals []any) Counters {
	n := func(i int) int64 {
		if i >= len(vals) {
			return 0
		}
		s, _ := vals[i].(string)
		var v int64
		_, _ = fmt.Sscan(s, &v)
		return v
	}
	return Counters{Enqueued: n(0), Acked: n(1), Nacked: n(2), LeaseExpired: n(3), DeadLettered: n(4), Expired: n(5)}
}

// ReadCounters reads the counters of many queues in one round trip.
// Queues that cannot be read are reported by a *PartialError (see
// partial.go); the counters of the others are returned with it.
func (b *Broker) ReadCounters(ctx context.Context, queues []string) ([]Counters, error) {
	cmds := make([]*redis.SliceCmd, len(queues))
	_, _ = b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, q := range queues {
			cmds[i] = p.HMGet(ctx, b.keys.Counters(q), counterFields...)
		}
		return nil
	})
	out := make([]Counters, len(queues))
	for i, c := range cmds {
		if c.Err() == nil {
			out[i] = parseCounters(c.Val())
		}
	}
	return out, b.partial(ctx, "read counters", queues, func(i int) error { return cmds[i].Err() })
}

// Publish sends payload on channel and returns what Redis PUBLISH returns
// (SPUBLISH for a sharded channel, see pubsub.go). Concurrent calls are
// merged into shared pipelines, in the order they were made (see
// coalesce.go).
func (b *Broker) Publish(ctx context.Context, channel string, payload []byte) (int64, error) {
	sharded := b.IsSharded(channel)
	if b.publishes == nil {
		var cmd *redis.IntCmd
		if sharded {
			cmd = b.rdb.SPublish(ctx, b.keys.Channel(channel), payload)
		} else {
			cmd = b.rdb.Publish(ctx, b.keys.Channel(channel), payload)
		}
		n, err := cmd.Result()
		return n, wrap(err, "publish to %q", channel)
	}
	c := &publishCall{ctx: ctx, channel: channel, payload: payload, sharded: sharded, done: make(chan struct{})}
	b.publishes.submit(c)
	select {
	case <-c.done:
		return c.n, c.err
	case <-ctx.Done():
		return 0, wrap(ctx.Err(), "publish to %q", channel)
	}
}

// PubSub opens the connection that Subscribe streams share for classic
// channels and patterns (sharded channels: ShardedPubSub).
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
