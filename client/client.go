// Package client is the Go client of qbridge, a gRPC service that turns
// Redis into acknowledged work queues and pub/sub channels.
//
// It wraps the generated qbridge.v1 stubs with plain Go types: payloads are
// []byte, times are time.Time, durations are time.Duration, and the
// server-streaming calls become iterators (Consumer.Next, Subscription.Next)
// that hand out one item per call.
//
// A typical worker:
//
//	c, err := client.Dial("localhost:7070")
//	if err != nil {
//		return err
//	}
//	defer c.Close()
//
//	id, err := c.Enqueue(ctx, "emails", []byte(`{"to":"a@example.com"}`),
//		client.WithHeaders(map[string]string{"content-type": "application/json"}))
//	if err != nil {
//		return err
//	}
//	log.Printf("enqueued %s", id)
//
//	cs, err := c.Consume(ctx, "emails", client.WithMaxInFlight(8), client.WithLease(time.Minute))
//	if err != nil {
//		return err
//	}
//	defer cs.Close()
//	for {
//		d, err := cs.Next()
//		if err != nil {
//			return err // the stream broke (see status.Code(err)) or ctx ended
//		}
//		if err := send(d.Payload); err != nil {
//			_ = d.Retry(ctx, err) // deliver again after a backoff, with Attempt+1
//			continue
//		}
//		if err := d.Ack(ctx); err != nil {
//			log.Printf("ack %s: %v", d.ID, err)
//		}
//	}
//
// # Delivery policies
//
// Enqueue options schedule a message (WithDelay, WithDeliverAt), make an
// Enqueue idempotent (WithDedupKey; EnqueueResult reports duplicates), let
// it expire (WithTTL), override the queue's retry policy (WithRetryPolicy),
// or wait for room in a bounded queue (WithWaitForRoom); Message carries the
// same settings for EnqueueBatch. A consumer settles a delivery with Ack,
// Retry (again after a backoff, recording the error), DeadLetter, or Nack.
// A message that has used up its attempts is dead-lettered; Admin gives the
// AdminService client to inspect and replay dead letters. ConsumeQueues
// consumes several queues in priority order, and Stats describes a queue.
//
// # Tasks, workers and results
//
// A message may carry a task type (WithTaskType) and ask for its outcome to
// be kept (WithKeepResult). Worker runs a Handler over a Consume stream,
// in the spirit of net/http: ServeMux dispatches on the task type, a
// handler's result is stored with the ack (Delivery.AckResult), its error
// retries the task or, wrapping SkipRetry, dead-letters it; the Worker
// extends leases while handlers run, reconnects when the stream breaks and
// shuts down gracefully. GetResult (optionally waiting) and GetMessage tell
// what became of a message; Call enqueues a task and waits for its result.
//
// # Errors
//
// Every error that comes from the server is the gRPC status error returned by
// grpc-go, unchanged, so status.Code(err) and status.Convert(err).Message()
// give the code and the server's explanation (INVALID_ARGUMENT for a bad
// name, FAILED_PRECONDITION for an expired ack token, UNAVAILABLE when the
// server or Redis is unavailable, ...). Errors the client detects itself are
// status errors too. When a Consumer or Subscription ends because its
// context was cancelled or it was closed, Next returns an error that matches
// both errors.Is(err, context.Canceled) and status.Code(err) ==
// codes.Canceled (DeadlineExceeded likewise).
//
// # Connection keepalive
//
// Dial enables client keepalive pings every 20s, also without active
// streams, so that a Consume or Subscribe stream over a dead connection fails
// instead of hanging. The server must allow that: its
// keepalive.EnforcementPolicy needs MinTime <= 20s and PermitWithoutStream,
// or it closes the connection with "too_many_pings" (ENHANCE_YOUR_CALM).
//
// # Tracing
//
// When the context of an enqueue carries an OpenTelemetry span, the
// message gets its W3C trace context in the traceparent (and tracestate)
// header, unless it has one; a Worker starts a "process <queue>" consumer
// span linked to it for each handler call, from the global OpenTelemetry
// tracer provider (a no-op unless the program installs one).
package client

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// Keepalive settings used by Dial.
const (
	keepaliveTime    = 20 * time.Second
	keepaliveTimeout = 10 * time.Second
)

// Client is a qbridge client. It is safe for concurrent use by many
// goroutines; one Client (one connection) is meant to be shared.
type Client struct {
	rpc   qbridgev1.QueueServiceClient
	admin qbridgev1.AdminServiceClient
	conn  *grpc.ClientConn // set when Dial made the connection: Close closes it
}

// Option configures Dial.
type Option func(*dialConfig)

type dialConfig struct {
	creds credentials.TransportCredentials
	extra []grpc.DialOption
	err   error // from an option that could not be applied
}

// WithTransportCredentials sets the transport credentials, e.g.
// credentials.NewTLS(cfg). Default: insecure (plaintext).
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(c *dialConfig) { c.creds = creds }
}

// WithDialOptions adds gRPC dial options. They are applied after Dial's own
// (credentials and keepalive), so they can override them.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *dialConfig) { c.extra = append(c.extra, opts...) }
}

// Dial creates a Client for the qbridge server at target (any gRPC target,
// e.g. "localhost:7070" or "dns:///qbridge.internal:7070"). Like
// grpc.NewClient, which it uses, it does not connect yet: the connection is
// made by the first call, and connection errors are reported by the calls.
//
// Defaults: insecure transport credentials (see WithTLS and WithToken), and keepalive pings every 20s
// (10s timeout) also while no stream is open. gRPC's default 4 MiB limit on
// received messages applies; for a server that accepts payloads close to or
// above that (qbridged --max-payload-bytes), raise it with
// WithDialOptions(grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(n))).
// Close the Client when done.
func Dial(target string, opts ...Option) (*Client, error) {
	cfg := dialConfig{creds: insecure.NewCredentials()}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.err != nil {
		return nil, cfg.err
	}
	dopts := []grpc.DialOption{
		grpc.WithTransportCredentials(cfg.creds),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:                keepaliveTime,
			Timeout:             keepaliveTimeout,
			PermitWithoutStream: true,
		}),
	}
	dopts = append(dopts, cfg.extra...)
	conn, err := grpc.NewClient(target, dopts...)
	if err != nil {
		return nil, err
	}
	c := New(conn)
	c.conn = conn
	return c, nil
}

// New returns a Client over an existing connection. The caller keeps
// ownership of conn: Client.Close does not close it.
func New(conn grpc.ClientConnInterface) *Client {
	return &Client{rpc: tracingRPC{qbridgev1.NewQueueServiceClient(conn)}, admin: qbridgev1.NewAdminServiceClient(conn)}
}

// Close closes the connection if Dial made it (ending every Consumer and
// Subscription of this Client); for a Client made by New it does nothing.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// Raw returns the generated gRPC client, for what this package does not
// wrap (call options, per-call metadata, ...).
func (c *Client) Raw() qbridgev1.QueueServiceClient { return c.rpc }

// Admin returns the generated client of qbridge.v1.AdminService (listing,
// peeking, purging, pausing and configuring queues, replaying dead letters)
// over the same connection. Its errors are gRPC status errors too; the
// server may permission it apart from QueueService.
func (c *Client) Admin() qbridgev1.AdminServiceClient { return c.admin }

// EnqueueOption configures Enqueue.
type EnqueueOption func(*qbridgev1.EnqueueRequest)

// WithHeaders attaches application headers to the message; they are
// delivered unchanged in Delivery.Headers.
func WithHeaders(h map[string]string) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.Headers = h }
}

// WithID sets the message id (1-128 bytes of printable ASCII without
// spaces) instead of letting the server assign a UUIDv7.
func WithID(id string) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.Id = id }
}

// WithOrderingKey routes the message, on a sharded queue, to the shard its
// key picks: messages with the same key are delivered in the order they were
// enqueued, like on an unsharded queue. Unsharded queues ignore it.
func WithOrderingKey(key string) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.OrderingKey = key }
}

// Enqueue appends one message to the tail of queue (or schedules it, see
// WithDelay) and returns its id: the one set with WithID, or the one the
// server assigned. When WithDedupKey matched an earlier message, nothing is
// enqueued and the earlier message's id is returned without error; use
// EnqueueResult to tell the two apart.
func (c *Client) Enqueue(ctx context.Context, queue string, payload []byte, opts ...EnqueueOption) (id string, err error) {
	res, err := c.EnqueueResult(ctx, queue, payload, opts...)
	return res.ID, err
}

// EnqueueResult reports what an Enqueue did.
type EnqueueResult struct {
	// ID is the message id: the one given with WithID (or Message.ID), the
	// one the server assigned, or, for a duplicate, the id of the earlier
	// message with the same dedup key.
	ID string
	// Duplicate is true when the dedup key matched an earlier message that
	// is still remembered (see WithDedupKey): nothing was enqueued.
	Duplicate bool
}

// EnqueueResult is Enqueue that also reports whether the message was a
// duplicate (see WithDedupKey).
func (c *Client) EnqueueResult(ctx context.Context, queue string, payload []byte, opts ...EnqueueOption) (EnqueueResult, error) {
	req := &qbridgev1.EnqueueRequest{Queue: queue, Payload: payload}
	for _, o := range opts {
		o(req)
	}
	resp, err := c.rpc.Enqueue(ctx, req)
	if err != nil {
		return EnqueueResult{}, err
	}
	return EnqueueResult{ID: resp.GetId(), Duplicate: resp.GetDuplicate()}, nil
}

// Message is one message of EnqueueBatch. The zero value of each optional
// field leaves it unset, like not passing the corresponding EnqueueOption.
type Message struct {
	// Payload is the message body. It may be empty.
	Payload []byte
	// Headers are optional application headers.
	Headers map[string]string
	// ID is an optional client-chosen id; empty means server-assigned.
	ID string
	// Delay defers delivery by this long, as WithDelay (0 or less: none).
	Delay time.Duration
	// DeliverAt defers delivery until this time, as WithDeliverAt (zero:
	// none). At most one of Delay and DeliverAt.
	DeliverAt time.Time
	// DedupKey is an optional idempotency key, as WithDedupKey.
	DedupKey string
	// TTL is how long the message may wait for delivery, as WithTTL (0 or
	// less: forever).
	TTL time.Duration
	// RetryPolicy overrides the queue's retry policy for this message, as
	// WithRetryPolicy (zero: the queue's policy).
	RetryPolicy RetryPolicy
	// TaskType is the message's task type, as WithTaskType ("": none).
	TaskType string
	// KeepResult keeps the message's outcome for GetResult, as
	// WithKeepResult.
	KeepResult bool
	// OrderingKey picks the message's shard on a sharded queue, as
	// WithOrderingKey ("": none).
	OrderingKey string
}

func (m *Message) proto() *qbridgev1.BatchMessage {
	return &qbridgev1.BatchMessage{
		Payload:     m.Payload,
		Headers:     m.Headers,
		Id:          m.ID,
		Delay:       durationOrNil(m.Delay),
		DeliverAt:   timeOrNil(m.DeliverAt),
		DedupKey:    m.DedupKey,
		Ttl:         durationOrNil(m.TTL),
		RetryPolicy: m.RetryPolicy.proto(),
		TaskType:    m.TaskType,
		KeepResult:  m.KeepResult,
		OrderingKey: m.OrderingKey,
	}
}

// EnqueueBatchOption configures EnqueueBatch and EnqueueBatchResult.
type EnqueueBatchOption func(*qbridgev1.EnqueueBatchRequest)

// WithBatchWaitForRoom is WithWaitForRoom for a batch: when the queue has a
// max length and the whole batch does not fit, the call waits for room
// (until ctx's deadline) instead of failing with RESOURCE_EXHAUSTED.
func WithBatchWaitForRoom() EnqueueBatchOption {
	return func(r *qbridgev1.EnqueueBatchRequest) { r.WaitForRoom = true }
}

// EnqueueBatch appends msgs to queue atomically and in order: either all are
// enqueued or none is. It returns one id per message, in the same order
// (for a message whose dedup key matched, the earlier message's id; see
// EnqueueBatchResult). The server caps the batch size (1000 by default) and
// rejects an empty batch with INVALID_ARGUMENT.
func (c *Client) EnqueueBatch(ctx context.Context, queue string, msgs []Message, opts ...EnqueueBatchOption) ([]string, error) {
	resp, err := c.enqueueBatch(ctx, queue, msgs, opts)
	if err != nil {
		return nil, err
	}
	return resp.GetIds(), nil
}

// EnqueueBatchResult is EnqueueBatch that also reports, for each message in
// order, whether it was a duplicate (see WithDedupKey). A dedup key given
// twice in one batch makes the second message a duplicate of the first.
func (c *Client) EnqueueBatchResult(ctx context.Context, queue string, msgs []Message, opts ...EnqueueBatchOption) ([]EnqueueResult, error) {
	resp, err := c.enqueueBatch(ctx, queue, msgs, opts)
	if err != nil {
		return nil, err
	}
	ids, dups := resp.GetIds(), resp.GetDuplicate()
	out := make([]EnqueueResult, len(ids))
	for i, id := range ids {
		out[i] = EnqueueResult{ID: id, Duplicate: i < len(dups) && dups[i]}
	}
	return out, nil
}

func (c *Client) enqueueBatch(ctx context.Context, queue string, msgs []Message, opts []EnqueueBatchOption) (*qbridgev1.EnqueueBatchResponse, error) {
	req := &qbridgev1.EnqueueBatchRequest{Queue: queue, Messages: make([]*qbridgev1.BatchMessage, len(msgs))}
	for i := range msgs {
		req.Messages[i] = msgs[i].proto()
	}
	for _, o := range opts {
		o(req)
	}
	return c.rpc.EnqueueBatch(ctx, req)
}

// Ack settles deliveries by their ack tokens (Delivery.AckToken, from any
// queues, at most 1000 per call): each message is removed for good. Ack with
// no tokens does nothing.
//
// A token whose lease expired is rejected with FAILED_PRECONDITION; the other
// tokens of the call are still acknowledged.
func (c *Client) Ack(ctx context.Context, tokens ...string) error {
	if len(tokens) == 0 {
		return nil
	}
	_, err := c.rpc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: tokens})
	return err
}

// Publish sends payload to channel and returns how many Redis-level
// subscriptions received it (see PublishResponse.receivers: each qbridge
// instance counts once per matching channel or pattern).
func (c *Client) Publish(ctx context.Context, channel string, payload []byte) (receivers int64, err error) {
	resp, err := c.rpc.Publish(ctx, &qbridgev1.PublishRequest{Channel: channel, Payload: payload})
	if err != nil {
		return 0, err
	}
	return resp.GetReceivers(), nil
}

// QueueStats reports how many messages queue holds ready for delivery and
// in flight (delivered, not yet settled or expired). An unknown queue is
// empty. Stats reports more.
func (c *Client) QueueStats(ctx context.Context, queue string) (ready, inFlight int64, err error) {
	st, err := c.Stats(ctx, queue)
	if err != nil {
		return 0, 0, err
	}
	return st.Ready, st.InFlight, nil
}

// QueueStats describes a queue at one moment, as Client.Stats reports it.
type QueueStats struct {
	// Queue is the queue's name.
	Queue string
	// Ready is how many messages wait to be delivered.
	Ready int64
	// InFlight is how many messages are delivered and not yet acked,
	// nacked or expired.
	InFlight int64
	// Delayed is how many messages wait for their delivery time (delayed,
	// scheduled, or retrying after a backoff).
	Delayed int64
	// Dead is how many dead letters the queue holds.
	Dead int64
	// OldestReadyAge is how long the message at the head of the queue has
	// been waiting; 0 when the queue is empty or its head was pushed by a
	// plain Redis client.
	OldestReadyAge time.Duration
	// EnqueueRate is messages enqueued per second over about the last
	// minute (0 until the server has watched the queue for a few seconds).
	EnqueueRate float64
	// AckRate is deliveries acked per second over about the last minute.
	AckRate float64
	// Paused tells whether the queue is paused (see AdminService.PauseQueue).
	Paused bool
	// Consumers is how many Consume streams are open on the queue, over
	// all qbridge instances (each reports about once a second).
	Consumers int64
	// Counters are the queue's event totals.
	Counters QueueCounters
	// Shards is how many shards a sharded queue has (0 for an unsharded
	// queue); ShardStats tells each one's figures.
	Shards int
}

// ShardStats describes one shard of a sharded queue.
type ShardStats struct {
	// Shard is the shard's number, from 0.
	Shard int
	// List is the shard's Redis list (without the server's key prefix).
	List string
	// Ready, InFlight, Delayed and Dead are as in QueueStats.
	Ready, InFlight, Delayed, Dead int64
}

// QueueCounters are a queue's event totals since its counters began.
type QueueCounters struct {
	// Enqueued counts messages enqueued through qbridge, duplicates
	// excluded.
	Enqueued int64
	// Acked counts deliveries acked.
	Acked int64
	// Nacked counts deliveries nacked (any action).
	Nacked int64
	// LeaseExpired counts deliveries whose lease ran out.
	LeaseExpired int64
	// DeadLettered counts messages moved to the dead letters.
	DeadLettered int64
	// Expired counts messages dropped or dead-lettered because their TTL
	// passed.
	Expired int64
}

// Stats describes queue: its message counts by state, the age of its oldest
// ready message, its enqueue and ack rates, whether it is paused, and its
// counters. An unknown queue is empty.
func (c *Client) Stats(ctx context.Context, queue string) (*QueueStats, error) {
	resp, err := c.rpc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: queue})
	if err != nil {
		return nil, err
	}
	ct := resp.GetCounters()
	return &QueueStats{
		Shards:         len(resp.GetShards()),
		Queue:          resp.GetQueue(),
		Ready:          resp.GetReady(),
		InFlight:       resp.GetInFlight(),
		Delayed:        resp.GetDelayed(),
		Dead:           resp.GetDead(),
		OldestReadyAge: resp.GetOldestReadyAge().AsDuration(), // 0 when unset
		EnqueueRate:    resp.GetEnqueueRate(),
		AckRate:        resp.GetAckRate(),
		Paused:         resp.GetPaused(),
		Consumers:      resp.GetConsumers(),
		Counters: QueueCounters{
			Enqueued:     ct.GetEnqueued(),
			Acked:        ct.GetAcked(),
			Nacked:       ct.GetNacked(),
			LeaseExpired: ct.GetLeaseExpired(),
			DeadLettered: ct.GetDeadLettered(),
			Expired:      ct.GetExpired(),
		},
	}, nil
}

// ShardStats returns the figures of each shard of a sharded queue (nil for
// an unsharded queue); Stats has their totals.
func (c *Client) ShardStats(ctx context.Context, queue string) ([]ShardStats, error) {
	resp, err := c.rpc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: queue})
	if err != nil {
		return nil, err
	}
	var out []ShardStats
	for _, sh := range resp.GetShards() {
		out = append(out, ShardStats{Shard: int(sh.GetShard()), List: sh.GetList(),
			Ready: sh.GetReady(), InFlight: sh.GetInFlight(), Delayed: sh.GetDelayed(), Dead: sh.GetDead()})
	}
	return out, nil
}

// durationOrNil converts d, leaving the field unset (the server's default)
// when d is not positive.
func durationOrNil(d time.Duration) *durationpb.Duration {
	if d <= 0 {
		return nil
	}
	return durationpb.New(d)
}
