// Package server implements qbridge.v1.QueueService over a broker.Broker:
// request validation, the Consume dispatchers, the pub/sub hub, and the one
// place where internal errors become gRPC status codes (toStatus).
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server/broker"
)

// Server is the QueueService implementation.
type Server struct {
	qbridgev1.UnimplementedQueueServiceServer

	b        *broker.Broker
	opts     options
	log      *slog.Logger
	instance string // random id of this process, carried in ack tokens

	mu          sync.Mutex
	dispatchers map[string]*dispatcher
	consumers   map[uint64]*consumer
	nextID      atomic.Uint64

	hub      *hub
	promoter *promoter
	rates    *rateSampler
	// idleQueues holds the waits of dispatchers whose queue is empty.
	idleQueues *idleQueues
	// redisDown holds why Redis was last found unreachable (nil: it
	// answers); see SetRedisDown.
	redisDown atomic.Pointer[error]
	known     sync.Map // queues registered in Redis by this process
	shards    shardTable
	waiters   resultWaiters

	draining    chan struct{} // closed: refuse new work, stop claiming
	stopStreams chan struct{} // closed: end every stream now
	drainOnce   sync.Once
	stopOnce    sync.Once
	bg          sync.WaitGroup
	bgCancel    context.CancelFunc
}

var _ qbridgev1.QueueServiceServer = (*Server)(nil)

// options holds the Server settings; see the With... functions for defaults.
type options struct {
	logger            *slog.Logger
	maxPayload        int
	maxBatch          int
	defaultInFlight   int
	maxInFlight       int
	defaultLease      time.Duration
	minLease          time.Duration
	maxLease          time.Duration
	reapInterval      time.Duration
	waitSlice         time.Duration
	subscriberBuffer  int
	subscriberBytes   int
	maxResponseBytes  int
	requeueTimeout    time.Duration
	claimRetryBackoff time.Duration
	blockingWaits     int
	idlePoll          time.Duration
	observer          Observer
}

// Option configures a Server.
type Option func(*options)

// WithLogger sets the logger. Default: slog.Default().
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithMaxPayload caps the payload size of one message. Default: 1 MiB.
func WithMaxPayload(n int) Option { return func(o *options) { o.maxPayload = n } }

// WithMaxBatch caps the messages in one EnqueueBatch. Default: 1000.
func WithMaxBatch(n int) Option { return func(o *options) { o.maxBatch = n } }

// WithMaxInFlight caps ConsumeRequest.max_in_flight. Default: 1024. The
// default window, when a request leaves it 0, is 16.
func WithMaxInFlight(n int) Option { return func(o *options) { o.maxInFlight = n } }

// WithLeaseBounds sets the default lease and the accepted range.
// Default: 30s, within [1s, 12h].
func WithLeaseBounds(def, min, max time.Duration) Option {
	return func(o *options) { o.defaultLease, o.minLease, o.maxLease = def, min, max }
}

// WithReapInterval sets how often expired leases are looked for. Default: 1s.
func WithReapInterval(d time.Duration) Option { return func(o *options) { o.reapInterval = d } }

// WithWaitSlice sets how long one blocking wait on an empty queue lasts
// before it is re-issued (also the longest a queue's waiter outlives its last
// consumer). Default: 5s.
func WithWaitSlice(d time.Duration) Option { return func(o *options) { o.waitSlice = d } }

// WithSubscriberBuffer bounds what one Subscribe stream may have waiting to
// be sent, in messages and payload bytes; past either, the stream ends with
// RESOURCE_EXHAUSTED. Default: 1024 messages, 8 MiB.
func WithSubscriberBuffer(msgs, bytes int) Option {
	return func(o *options) { o.subscriberBuffer, o.subscriberBytes = msgs, bytes }
}

// WithMaxResponseBytes caps the size of one ConsumeResponse; a batch of
// deliveries is split to stay under it. Default: 3 MiB, below the 4 MiB a
// standard gRPC client accepts by default. A single delivery larger than
// this is still sent (clients must then raise their receive limit).
func WithMaxResponseBytes(n int) Option { return func(o *options) { o.maxResponseBytes = n } }

// DefaultBlockingWaits is the default of WithIdleQueues.
const DefaultBlockingWaits = 24

// WithIdleQueues bounds how many empty queues at once wait in Redis with a
// blocking command (one connection each: size the blocking client's pool
// to at least this plus two, for pub/sub). The others park, woken by
// qbridge's own "ready" announcements and by a poll of their lengths every
// poll interval (see idle.go). Default: 24 and 250ms.
func WithIdleQueues(blockingWaits int, poll time.Duration) Option {
	return func(o *options) { o.blockingWaits, o.idlePoll = blockingWaits, poll }
}

func defaultOptions() options {
	return options{
		logger:            slog.Default(),
		observer:          noObserver{},
		maxPayload:        1 << 20,
		maxBatch:          1000,
		defaultInFlight:   16,
		maxInFlight:       1024,
		defaultLease:      30 * time.Second,
		minLease:          time.Second,
		maxLease:          12 * time.Hour,
		reapInterval:      time.Second,
		waitSlice:         5 * time.Second,
		subscriberBuffer:  1024,
		subscriberBytes:   8 << 20,
		maxResponseBytes:  3 << 20,
		requeueTimeout:    10 * time.Second,
		claimRetryBackoff: 100 * time.Millisecond,
		blockingWaits:     DefaultBlockingWaits,
		idlePoll:          250 * time.Millisecond,
	}
}

// New returns a Server over b. Call Start before serving and Shutdown when
// done.
func New(b *broker.Broker, opts ...Option) *Server {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	s := &Server{
		b:           b,
		opts:        o,
		log:         o.logger,
		instance:    hex.EncodeToString(rnd[:]),
		dispatchers: map[string]*dispatcher{},
		consumers:   map[uint64]*consumer{},
		draining:    make(chan struct{}),
		stopStreams: make(chan struct{}),
	}
	s.hub = newHub(s)
	s.promoter = newPromoter(s)
	s.rates = newRateSampler(s)
	s.idleQueues = newIdleQueues(s)
	return s
}

// Start runs the background work: the lease reaper and the pub/sub hub.
func (s *Server) Start() {
	ctx, cancel := context.WithCancel(context.Background())
	s.bgCancel = cancel
	s.hub.open(ctx) // before returning, so a Subscribe right after Start works
	lctx, lcancel := context.WithTimeout(ctx, 2*time.Second)
	if err := s.loadShards(lctx); err != nil {
		s.log.Warn("cannot load the shard table; sharded queues use shard 0 alone until it loads", "err", err)
	}
	lcancel()
	s.bg.Add(6)
	go func() { defer s.bg.Done(); s.shardLoop(ctx) }()
	go func() { defer s.bg.Done(); s.idleQueues.poll(ctx) }()
	go func() { defer s.bg.Done(); s.reapLoop(ctx) }()
	go func() { defer s.bg.Done(); s.hub.run(ctx) }()
	go func() { defer s.bg.Done(); s.promoter.run(ctx) }()
	go func() { defer s.bg.Done(); s.rates.run(ctx) }()
}

// Drain begins a graceful shutdown: new Enqueue, Publish, Consume and
// Subscribe calls get UNAVAILABLE, no more messages are taken from Redis,
// messages taken but not yet sent go back, and Subscribe streams end. Ack,
// Nack and ExtendLease keep working so that consumers can settle what they
// hold. Drain then waits, until ctx ends, for Consume streams to have nothing
// in flight, and ends every stream that is left (its unacked messages go back
// to their queues at once).
func (s *Server) Drain(ctx context.Context) {
	s.drainOnce.Do(func() { close(s.draining) })
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !s.idle() {
		select {
		case <-ctx.Done():
			s.StopStreams()
			return
		case <-t.C:
		}
	}
	s.StopStreams()
}

// StopStreams ends every open stream at once.
func (s *Server) StopStreams() {
	s.drainOnce.Do(func() { close(s.draining) })
	s.stopOnce.Do(func() { close(s.stopStreams) })
}

// Close stops the background work. Call it after the gRPC server stopped.
func (s *Server) Close() {
	s.StopStreams()
	if s.bgCancel != nil {
		s.bgCancel()
	}
	s.bg.Wait()
}

func (s *Server) isDraining() bool {
	select {
	case <-s.draining:
		return true
	default:
		return false
	}
}

// idle reports whether no Consume stream holds unsettled deliveries.
func (s *Server) idle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.consumers {
		if c.holding() > 0 {
			return false
		}
	}
	return true
}

// Ping checks Redis; the daemon's health service uses it.
func (s *Server) Ping(ctx context.Context) error { return s.b.Ping(ctx) }

// SetRedisDown records the outcome of a health check of Redis: while err is
// not nil, Enqueue, EnqueueBatch and Publish fail at once with UNAVAILABLE
// instead of waiting on a Redis that does not answer (a hung Redis would
// otherwise hold each call until its deadline). Nil clears it.
func (s *Server) SetRedisDown(err error) {
	if err == nil {
		s.redisDown.Store(nil)
		return
	}
	s.redisDown.Store(&err)
}

// unreachable returns an UNAVAILABLE-mapped error while Redis is known to
// be down.
func (s *Server) unreachable() error {
	if p := s.redisDown.Load(); p != nil {
		return fmt.Errorf("%w: Redis did not answer the last health check (%v); retry later or on another instance", broker.ErrUnavailable, *p)
	}
	return nil
}

// Enqueue implements QueueService.Enqueue.
func (s *Server) Enqueue(ctx context.Context, req *qbridgev1.EnqueueRequest) (*qbridgev1.EnqueueResponse, error) {
	res, err := s.enqueue(ctx, req.GetQueue(), req.GetWaitForRoom(), []*qbridgev1.BatchMessage{{
		Payload: req.GetPayload(), Headers: req.GetHeaders(), Id: req.GetId(),
		Delay: req.GetDelay(), DeliverAt: req.GetDeliverAt(), DedupKey: req.GetDedupKey(),
		Ttl: req.GetTtl(), RetryPolicy: req.GetRetryPolicy(), TaskType: req.GetTaskType(), KeepResult: req.GetKeepResult(),
		OrderingKey: req.GetOrderingKey(),
	}})
	if err != nil {
		return nil, toStatus(err)
	}
	return &qbridgev1.EnqueueResponse{Id: res.IDs[0], Duplicate: res.Duplicate[0]}, nil
}

// EnqueueBatch implements QueueService.EnqueueBatch.
func (s *Server) EnqueueBatch(ctx context.Context, req *qbridgev1.EnqueueBatchRequest) (*qbridgev1.EnqueueBatchResponse, error) {
	if len(req.GetMessages()) == 0 {
		return nil, toStatus(invalidf("messages is empty; send at least one"))
	}
	if len(req.GetMessages()) > s.opts.maxBatch {
		return nil, toStatus(invalidf("%d messages in one batch; the limit is %d", len(req.GetMessages()), s.opts.maxBatch))
	}
	res, err := s.enqueue(ctx, req.GetQueue(), req.GetWaitForRoom(), req.GetMessages())
	if err != nil {
		return nil, toStatus(err)
	}
	return &qbridgev1.EnqueueBatchResponse{Ids: res.IDs, Duplicate: res.Duplicate}, nil
}

func (s *Server) enqueue(ctx context.Context, queue string, waitForRoom bool, msgs []*qbridgev1.BatchMessage) (broker.EnqueueResult, error) {
	var res broker.EnqueueResult
	if err := ValidateName("queue", queue); err != nil {
		return res, invalidError{err}
	}
	if s.isDraining() {
		return res, errShuttingDown
	}
	if err := s.unreachable(); err != nil {
		return res, err
	}
	raw := s.b.IsRaw(queue)
	out := make([]broker.NewMessage, len(msgs))
	var orderingKeys []string
	for i, m := range msgs {
		where := ""
		if len(msgs) > 1 {
			where = "messages[" + itoa(i) + "]: "
		}
		nm, err := s.newMessage(m, raw, queue)
		if err != nil {
			return res, invalidf("%s%v", where, err)
		}
		out[i] = nm
		if k := m.GetOrderingKey(); k != "" {
			if err := validateID(k); err != nil {
				return res, invalidf("%sordering_key: %v", where, strings.Replace(err.Error(), "message id", "key", 1))
			}
			if orderingKeys == nil {
				orderingKeys = make([]string, len(msgs))
			}
			orderingKeys[i] = k
		}
	}
	shards := s.shardsOf(queue)
	if len(shards) == 1 {
		return s.enqueueTo(ctx, queue, waitForRoom, out)
	}
	if orderingKeys == nil {
		orderingKeys = make([]string, len(msgs))
	}
	return s.enqueueSharded(ctx, shards, waitForRoom, orderingKeys, out)
}

// enqueueTo enqueues msgs on one physical queue (a queue, or one shard of
// a sharded queue), waiting for room if asked to.
func (s *Server) enqueueTo(ctx context.Context, queue string, waitForRoom bool, out []broker.NewMessage) (broker.EnqueueResult, error) {
	var res broker.EnqueueResult
	s.registerQueue(ctx, queue)
	backoff := 5 * time.Millisecond
	for {
		var err error
		res, err = s.b.EnqueueMany(ctx, queue, out)
		// Not replicated in time (--enqueue-replicas) still means written
		// on the master: register and index it like a success.
		written := err == nil || errors.Is(err, broker.ErrNotReplicated)
		if written && res.Created {
			// New, or deleted (through any instance) and recreated: make
			// sure it is registered whatever this process remembers.
			s.known.Delete(queue)
			s.registerQueue(ctx, queue)
		}
		var full *broker.QueueFullError
		if errors.As(err, &full) && !waitForRoom {
			return res, fmt.Errorf("%w; retry later, or set wait_for_room to wait for consumers to make room", err)
		}
		if !errors.As(err, &full) {
			if written && !res.FirstDue.IsZero() {
				s.noteDue(ctx, queue, res.FirstDue)
			}
			return res, err
		}
		// Wait for room: consumers taking messages make some. Retry with
		// a capped backoff until the call's deadline.
		select {
		case <-ctx.Done():
			return res, fmt.Errorf("%w; waited for room until the call's deadline", err)
		case <-s.draining:
			return res, errShuttingDown
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 100*time.Millisecond)
	}
}

// newMessage validates one message of an Enqueue and converts it.
func (s *Server) newMessage(m *qbridgev1.BatchMessage, raw bool, queue string) (broker.NewMessage, error) {
	var nm broker.NewMessage
	if len(m.GetPayload()) > s.opts.maxPayload {
		return nm, fmt.Errorf("payload is %d bytes; the limit is %d (qbridged --max-payload-bytes)", len(m.GetPayload()), s.opts.maxPayload)
	}
	if err := validateID(m.GetId()); err != nil {
		return nm, err
	}
	if err := validateHeaders(m.GetHeaders()); err != nil {
		return nm, err
	}
	if raw {
		// A raw-mode list holds bare payloads: nothing else survives.
		// Trace context headers, which clients add by themselves when
		// tracing, are dropped rather than refused: tracing is best effort.
		switch {
		case hasOtherHeaders(m.GetHeaders(), traceHeaders):
			return nm, fmt.Errorf("queue %q is in raw mode (plain Redis consumers read it), which cannot store headers", queue)
		case m.GetTtl() != nil:
			return nm, fmt.Errorf("queue %q is in raw mode (plain Redis consumers read it), which cannot store a ttl", queue)
		case m.GetRetryPolicy() != nil:
			return nm, fmt.Errorf("queue %q is in raw mode (plain Redis consumers read it), which cannot store a retry policy; set it on the queue", queue)
		case m.GetTaskType() != "" || m.GetKeepResult():
			return nm, fmt.Errorf("queue %q is in raw mode (plain Redis consumers read it), which cannot store a task type or keep_result", queue)
		}
	}
	if t := m.GetTaskType(); t != "" {
		if err := ValidateName("task_type", t); err != nil {
			return nm, err
		}
		if len(t) > maxTaskType {
			return nm, fmt.Errorf("task_type is %d bytes; the limit is %d", len(t), maxTaskType)
		}
	}
	if k := m.GetDedupKey(); k != "" {
		if err := validateID(k); err != nil {
			return nm, fmt.Errorf("dedup_key: %v", strings.Replace(err.Error(), "message id", "key", 1))
		}
	}
	delay, err := durationIn("delay", m.GetDelay(), 0, maxDelay)
	if err != nil {
		return nm, err
	}
	if m.GetDeliverAt() != nil {
		if m.GetDelay() != nil {
			return nm, fmt.Errorf("give delay or deliver_at, not both")
		}
		if err := m.GetDeliverAt().CheckValid(); err != nil {
			return nm, fmt.Errorf("deliver_at: %v", err)
		}
		at := m.GetDeliverAt().AsTime()
		if time.Until(at) > maxDelay {
			return nm, fmt.Errorf("deliver_at %s is more than %v away", at.Format(time.RFC3339), maxDelay)
		}
		nm.DeliverAt = at
	}
	ttl, err := durationIn("ttl", m.GetTtl(), time.Millisecond, maxDelay)
	if err != nil {
		return nm, err
	}
	rp, err := retryPolicy(m.GetRetryPolicy())
	if err != nil {
		return nm, err
	}
	nm.ID, nm.Headers, nm.Payload, nm.Delay, nm.TTL, nm.DedupKey = m.GetId(), m.GetHeaders(), m.GetPayload(), delay, ttl, m.GetDedupKey()
	if raw {
		nm.Headers = nil // only trace context can be here (see above); a raw list keeps none
	}
	nm.TaskType, nm.KeepResult = m.GetTaskType(), m.GetKeepResult()
	nm.MaxAttempts, nm.BackoffMin, nm.BackoffMax = rp.MaxAttempts, rp.BackoffMin, rp.BackoffMax
	return nm, nil
}

// dispatchedQueues lists the queues with a dispatcher on this instance.
func (s *Server) dispatchedQueues() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	qs := make([]string, 0, len(s.dispatchers))
	for q := range s.dispatchers {
		qs = append(qs, q)
	}
	return qs
}

// heartbeat tells Redis how many Consume streams this instance has open on
// each queue (GetQueueStats sums them over instances). Entries live for a
// few reap intervals, so those of a crashed instance fade by themselves.
func (s *Server) heartbeat(ctx context.Context, reported map[string]bool) {
	counts := map[string]int{}
	s.mu.Lock()
	for q, d := range s.dispatchers {
		counts[q] = len(d.consumers)
	}
	s.mu.Unlock()
	for q := range reported {
		if _, ok := counts[q]; !ok {
			counts[q] = 0
		}
	}
	if err := s.b.Heartbeat(ctx, s.instance, counts, 3*s.opts.reapInterval+5*time.Second); err != nil {
		if ctx.Err() == nil {
			s.log.Debug("consumer heartbeat failed", "err", err)
		}
		return
	}
	for q, n := range counts {
		if n > 0 {
			reported[q] = true
		} else {
			delete(reported, q)
		}
	}
}

// registerQueue records a queue in the known set once per process.
func (s *Server) registerQueue(ctx context.Context, queue string) {
	if _, seen := s.known.Load(queue); seen {
		return
	}
	if err := s.b.RegisterQueue(ctx, queue); err == nil {
		s.known.Store(queue, struct{}{})
	}
}

// Publish implements QueueService.Publish.
func (s *Server) Publish(ctx context.Context, req *qbridgev1.PublishRequest) (*qbridgev1.PublishResponse, error) {
	if err := ValidateName("channel", req.GetChannel()); err != nil {
		return nil, toStatus(invalidError{err})
	}
	if len(req.GetPayload()) > s.opts.maxPayload {
		return nil, toStatus(invalidf("payload is %d bytes; the limit is %d (qbridged --max-payload-bytes)", len(req.GetPayload()), s.opts.maxPayload))
	}
	if s.isDraining() {
		return nil, toStatus(errShuttingDown)
	}
	if err := s.unreachable(); err != nil {
		return nil, toStatus(err)
	}
	n, err := s.b.Publish(ctx, req.GetChannel(), req.GetPayload())
	if err != nil {
		return nil, toStatus(err)
	}
	s.opts.observer.Published(n)
	return &qbridgev1.PublishResponse{Receivers: n}, nil
}

// GetQueueStats implements QueueService.GetQueueStats.
func (s *Server) GetQueueStats(ctx context.Context, req *qbridgev1.GetQueueStatsRequest) (*qbridgev1.GetQueueStatsResponse, error) {
	queue := req.GetQueue()
	if err := ValidateName("queue", queue); err != nil {
		return nil, toStatus(invalidError{err})
	}
	shards := s.shardsOf(queue)
	resp := &qbridgev1.GetQueueStatsResponse{Queue: queue, Counters: &qbridgev1.QueueCounters{}}
	// Each shard is read in its own round trips; the shards at once.
	stats := make([]broker.Stats, len(shards))
	typeCounts := make([]map[string]broker.Counters, len(shards))
	errs := make([]error, len(shards))
	read := func(i int) {
		if stats[i], errs[i] = s.b.Stats(ctx, shards[i]); errs[i] == nil {
			typeCounts[i], errs[i] = s.b.TypeCounters(ctx, shards[i], maxStatsTaskTypes)
		}
	}
	if len(shards) == 1 {
		read(0)
	} else {
		var wg sync.WaitGroup
		for i := range shards {
			wg.Go(func() { read(i) })
		}
		wg.Wait()
	}
	for _, err := range errs {
		if err != nil {
			return nil, toStatus(err) // the first shard's failure says enough
		}
	}
	var oldest time.Time
	types := map[string]*qbridgev1.QueueCounters{}
	for i, q := range shards {
		st := stats[i]
		c := st.Counters
		resp.Ready += st.Ready
		resp.InFlight += st.InFlight
		resp.Delayed += st.Delayed
		resp.Dead += st.Dead
		// Every stream on a sharded queue takes from each shard, and is
		// counted on each.
		resp.Consumers = max(resp.Consumers, st.Consumers)
		if i == 0 {
			resp.Paused = st.Paused // pause and resume apply to every shard
		}
		addCounters(resp.Counters, c)
		if t := st.OldestEnqueuedAt; !t.IsZero() && (oldest.IsZero() || t.Before(oldest)) {
			oldest = t
		}
		enq, ack := s.rates.rates(q, c)
		resp.EnqueueRate += enq
		resp.AckRate += ack
		for t, c := range typeCounts[i] {
			if types[t] == nil {
				if len(types) >= maxStatsTaskTypes {
					continue
				}
				types[t] = &qbridgev1.QueueCounters{}
			}
			addCounters(types[t], broker.Counters{Enqueued: c.Enqueued, Acked: c.Acked, Nacked: c.Nacked, DeadLettered: c.DeadLettered})
		}
		if len(shards) > 1 {
			resp.Shards = append(resp.Shards, &qbridgev1.ShardStats{
				Shard: uint32(i), List: q, Ready: st.Ready, InFlight: st.InFlight, Delayed: st.Delayed, Dead: st.Dead,
			})
		}
	}
	if !oldest.IsZero() {
		resp.OldestReadyAge = durationpb.New(max(0, time.Since(oldest)))
	}
	if len(types) > 0 {
		resp.TaskTypes = types
	}
	return resp, nil
}

func addCounters(to *qbridgev1.QueueCounters, c broker.Counters) {
	to.Enqueued += c.Enqueued
	to.Acked += c.Acked
	to.Nacked += c.Nacked
	to.LeaseExpired += c.LeaseExpired
	to.DeadLettered += c.DeadLettered
	to.Expired += c.Expired
}

// reapLoop requeues messages whose lease expired, for every queue that has
// ever had a consumer, on every tick. Each run is one script per queue that
// does O(expired) work.
func (s *Server) reapLoop(ctx context.Context) {
	t := time.NewTicker(s.opts.reapInterval)
	defer t.Stop()
	reported := map[string]bool{} // queues with a heartbeat of ours in Redis
	defer func() {
		// Leaving: take our entries out at once rather than letting them
		// expire (best effort).
		counts := map[string]int{}
		for q := range reported {
			counts[q] = 0
		}
		hctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.b.Heartbeat(hctx, s.instance, counts, 0)
	}()
	var known []string // the queue set as last read
	var fails failureLog
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.heartbeat(ctx, reported)
		qs, err := s.b.RegisteredQueues(ctx)
		if err != nil {
			// On Redis Cluster the set lives on one node: while it is
			// down, reap the queues last seen (and those consumed here).
			if ctx.Err() == nil && fails.allow("lease reaper: cannot list queues", s.b.NodeOf(ctx, s.b.Keys().Queues())) {
				s.log.Warn("lease reaper: cannot list the queues; reaping those it knew", "err", err)
			}
			qs = slices.Clone(known)
		} else {
			known = qs
		}
		// Queues consumed here are reaped too, registered or not: a queue
		// deleted while consumed is unlisted until it is enqueued to or a
		// new stream consumes it, but a plain LPUSH may refill it and its
		// deliveries still need their leases watched. (Re-registering it
		// here would undo the delete for every admin call.)
		for _, q := range s.dispatchedQueues() {
			if !slices.Contains(qs, q) {
				qs = append(qs, q)
			}
		}
		down := map[string]bool{} // unreachable nodes: their other queues wait for the next tick
		for _, q := range qs {
			node := s.b.NodeOf(ctx, q)
			if down[node] {
				continue
			}
			for {
				n, err := s.b.ReapExpired(ctx, q, 500)
				if err != nil {
					if broker.Unreachable(err) {
						down[node] = true
					}
					if ctx.Err() == nil && fails.allow("lease reaper failed", node) {
						s.log.Warn("lease reaper failed (logged once per node every 30s)", "queue", q, "node", node, "err", err)
					}
					break
				}
				if n > 0 {
					s.log.Info("requeued messages whose lease expired", "queue", q, "count", n)
					s.kickQueue(q)
				}
				if n < 500 {
					break
				}
			}
		}
	}
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func itoa(i int) string {
	const digits = "0123456789"
	if i < 10 {
		return digits[i : i+1]
	}
	return itoa(i/10) + digits[i%10:i%10+1]
}

// traceHeaders are the W3C trace context headers tracing puts in messages.
var traceHeaders = []string{"traceparent", "tracestate"}

// hasOtherHeaders reports whether h has a header not in except.
func hasOtherHeaders(h map[string]string, except []string) bool {
	for k := range h {
		if !slices.Contains(except, k) {
			return true
		}
	}
	return false
}
