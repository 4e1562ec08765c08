package client

import (
	"context"
	"errors"
	"io"
	"math"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// ConsumeOption configures Consume.
type ConsumeOption func(*qbridgev1.ConsumeRequest)

// WithMaxInFlight sets the credit window: the most deliveries the stream
// holds unsettled (and, with auto-ack, the most taken ahead of the client).
// 0 or less means the server's default (16); values above the server's cap
// (1024 by default) make the stream fail with INVALID_ARGUMENT.
func WithMaxInFlight(n int) ConsumeOption {
	return func(r *qbridgev1.ConsumeRequest) {
		r.MaxInFlight = clampUint32(n)
	}
}

// WithLease sets how long a delivery stays leased to this consumer before the
// server gives it to another one unless it is settled or its lease extended.
// 0 or less means the server's default (30s); the server accepts 1s to 12h by
// default.
func WithLease(d time.Duration) ConsumeOption {
	return func(r *qbridgev1.ConsumeRequest) { r.LeaseDuration = durationOrNil(d) }
}

// WithMaxMessages makes the stream take at most n messages in all (0: no
// limit); it stays open for their acks. Use it to take exactly n: without
// it, each ack frees credit and the server hands out the next message.
func WithMaxMessages(n int) ConsumeOption {
	return func(r *qbridgev1.ConsumeRequest) {
		if n > 0 && n <= math.MaxUint32 {
			r.MaxMessages = uint32(n)
		}
	}
}

// WithAutoAck makes the server remove messages when it takes them
// (at-most-once: a crash can lose them). Deliveries then carry no ack token
// and need no Ack.
func WithAutoAck() ConsumeOption {
	return func(r *qbridgev1.ConsumeRequest) { r.AutoAck = true }
}

// Consume opens a delivery stream on queue. Read it with Next and Close it
// when done: closing (or cancelling ctx) makes the server put every
// delivery that was not acked or nacked back at the head of the queue at
// once.
//
// The server reports a rejected request (a bad queue name or option, a
// server shutting down) on the stream, so such errors are returned by the
// first call to Next, not by Consume.
func (c *Client) Consume(ctx context.Context, queue string, opts ...ConsumeOption) (*Consumer, error) {
	return c.consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue}, opts)
}

// ConsumeQueues opens one delivery stream on several queues (the server
// accepts up to 16, each at most once) in strict priority order, highest
// first: every delivery comes from the first queue in the list that has a
// ready message, so a lower queue is served only while all higher ones are
// empty (or paused). Delivery.Queue tells which queue a delivery came from.
// The options apply to the stream as a whole: WithMaxInFlight bounds the
// deliveries held from all queues together.
//
// Otherwise it is like Consume; rejected requests are reported by the first
// Next, except an empty list, which ConsumeQueues rejects itself with
// INVALID_ARGUMENT.
func (c *Client) ConsumeQueues(ctx context.Context, queues []string, opts ...ConsumeOption) (*Consumer, error) {
	if len(queues) == 0 {
		return nil, status.Error(codes.InvalidArgument, "qbridge: ConsumeQueues needs at least one queue")
	}
	return c.consume(ctx, &qbridgev1.ConsumeRequest{Queues: queues}, opts)
}

func (c *Client) consume(ctx context.Context, req *qbridgev1.ConsumeRequest, opts []ConsumeOption) (*Consumer, error) {
	for _, o := range opts {
		o(req)
	}
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.rpc.Consume(sctx, req)
	if err != nil {
		cancel()
		return nil, ctxOr(ctx, "consumer", err)
	}
	return &Consumer{client: c, ctx: sctx, cancel: cancel, stream: stream}, nil
}

// Consumer is one Consume stream. Next may be called from several goroutines;
// each delivery is handed out once.
type Consumer struct {
	client *Client
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex // held by Next, including while it waits for the server
	stream grpc.ServerStreamingClient[qbridgev1.ConsumeResponse]
	buf    []*qbridgev1.Delivery // received, not yet handed out
	err    error                 // what Next returns once the stream ended
}

// Next returns the next delivery, waiting for one as long as needed. The
// server may send several deliveries at once; Next hands them out one at a
// time, in queue order.
//
// When the stream breaks, Next returns the gRPC status error it ended with
// (for example UNAVAILABLE when the server shuts down or the connection is
// lost): the Consumer does not reconnect; call Consume again. After Close,
// or once the context given to Consume ends, Next returns an error matching
// errors.Is(err, context.Canceled) (or context.DeadlineExceeded) and the
// corresponding status code, and deliveries received but not yet handed out
// are dropped (the server requeues them). Either way the stream is over:
// every later call returns the same error.
func (cs *Consumer) Next() (*Delivery, error) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for {
		if cs.err != nil {
			return nil, cs.err
		}
		if err := ctxEnded(cs.ctx); err != nil {
			cs.buf = nil
			cs.err = &ctxError{what: "consumer", err: err}
			return nil, cs.err
		}
		if len(cs.buf) > 0 {
			d := cs.buf[0]
			cs.buf[0] = nil
			cs.buf = cs.buf[1:]
			return cs.client.delivery(d), nil
		}
		resp, err := cs.stream.Recv()
		if err != nil {
			cs.err = streamErr(cs.ctx, "consumer", err, "qbridge: the server ended the Consume stream")
			cs.cancel() // the stream is over: release its context
			return nil, cs.err
		}
		cs.buf = resp.GetDeliveries()
	}
}

// Close ends the stream. The server then puts the deliveries this consumer
// did not settle back at the head of the queue at once, so acking them
// afterwards fails with FAILED_PRECONDITION. Close does not wait for the
// server and always returns nil; it may be called more than once and
// concurrently with Next, which it unblocks.
func (cs *Consumer) Close() error {
	cs.cancel()
	return nil
}

// Delivery is one message handed out by Consumer.Next.
type Delivery struct {
	// ID is the message id; it stays the same across redeliveries.
	ID string
	// Queue is the queue the message came from.
	Queue string
	// Payload is the message body.
	Payload []byte
	// Headers are the headers given at enqueue time (nil when none).
	Headers map[string]string
	// EnqueueTime is when the message was enqueued (millisecond precision).
	EnqueueTime time.Time
	// Attempt is 1 for the first delivery, 2 for the first redelivery, and
	// so on.
	Attempt int
	// AckToken identifies this delivery to Ack, Nack and ExtendLease. It is
	// empty for auto-ack consumers.
	AckToken string
	// LeaseDeadline is when the lease runs out unless extended; zero for
	// auto-ack consumers.
	LeaseDeadline time.Time
	// LastError is the error text of the latest Retry or DeadLetter of
	// this message that gave one (also kept when a dead letter is
	// replayed), or "" when there was none.
	LastError string
	// TaskType is the task type given at enqueue time (see WithTaskType),
	// or "" when none was.
	TaskType string
	// Shard is the shard of a sharded queue the message came from (0 for
	// an unsharded queue).
	Shard int

	client *Client
}

func (c *Client) delivery(d *qbridgev1.Delivery) *Delivery {
	return &Delivery{
		ID:            d.GetId(),
		Queue:         d.GetQueue(),
		Payload:       d.GetPayload(),
		Headers:       d.GetHeaders(),
		EnqueueTime:   timeOrZero(d.GetEnqueueTime()),
		Attempt:       int(d.GetAttempt()),
		AckToken:      d.GetAckToken(),
		LeaseDeadline: timeOrZero(d.GetLeaseDeadline()),
		LastError:     d.GetLastError(),
		TaskType:      d.GetTaskType(),
		Shard:         int(d.GetShard()),
		client:        c,
	}
}

func timeOrZero(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

// token returns the delivery's ack token, or an INVALID_ARGUMENT error when
// it has none (auto-ack, or a Delivery not made by Consumer.Next).
func (d *Delivery) token(op string) (string, error) {
	if d.AckToken == "" || d.client == nil {
		return "", status.Errorf(codes.InvalidArgument,
			"qbridge: cannot %s message %q: the delivery has no ack token (auto-ack consumers' deliveries need no settling)", op, d.ID)
	}
	return d.AckToken, nil
}

// Ack settles the delivery: the message is removed for good. It fails with
// FAILED_PRECONDITION when the lease expired (the message may have been
// delivered again) or the delivery was already settled.
func (d *Delivery) Ack(ctx context.Context) error {
	tok, err := d.token("ack")
	if err != nil {
		return err
	}
	_, err = d.client.rpc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{tok}})
	return err
}

// Nack gives the delivery back: with requeue the message goes back to the
// head of its queue and is delivered again at once with the same ID and
// Attempt+1; without, it is dropped for good. Fenced like Ack. A requeued
// message that has used up its retry policy's attempts is dead-lettered
// instead.
func (d *Delivery) Nack(ctx context.Context, requeue bool) error {
	action := qbridgev1.NackAction_NACK_ACTION_REQUEUE
	if !requeue {
		action = qbridgev1.NackAction_NACK_ACTION_DROP
	}
	return d.nack(ctx, "nack", &qbridgev1.NackRequest{Action: action})
}

// Retry gives the delivery back to be delivered again, with the same ID and
// Attempt+1, after the retry policy's backoff (see RetryPolicy) or the delay
// given with WithRetryDelay; while it waits, it counts as delayed. If it has
// used up the policy's MaxAttempts, it is dead-lettered instead.
//
// err says why processing failed: its text (cut to 4 KiB, the server's
// limit) becomes the redelivery's LastError and is kept in the dead letter;
// a nil err keeps the previous LastError. Fenced like Ack.
func (d *Delivery) Retry(ctx context.Context, err error, opts ...RetryOption) error {
	req := &qbridgev1.NackRequest{Action: qbridgev1.NackAction_NACK_ACTION_RETRY, Error: errorText(err)}
	for _, o := range opts {
		o(req)
	}
	return d.nack(ctx, "retry", req)
}

// DeadLetter moves the message to its queue's dead letters now, without
// further attempts: for a message that can never be processed. err says
// why, as for Retry; the dead letter (see AdminService.PeekMessages with
// MESSAGE_STATE_DEAD) keeps its text. Fenced like Ack.
func (d *Delivery) DeadLetter(ctx context.Context, err error) error {
	return d.nack(ctx, "dead-letter", &qbridgev1.NackRequest{
		Action: qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER,
		Error:  errorText(err),
	})
}

// nack sends req for the delivery's token.
func (d *Delivery) nack(ctx context.Context, op string, req *qbridgev1.NackRequest) error {
	tok, err := d.token(op)
	if err != nil {
		return err
	}
	req.AckTokens = []string{tok}
	_, err = d.client.rpc.Nack(ctx, req)
	return err
}

// ExtendLease moves the lease deadline to now + lease (0 or less: the
// server's default lease) and returns the new deadline. It does not update
// d.LeaseDeadline. Fenced like Ack.
func (d *Delivery) ExtendLease(ctx context.Context, lease time.Duration) (time.Time, error) {
	tok, err := d.token("extend the lease of")
	if err != nil {
		return time.Time{}, err
	}
	resp, err := d.client.rpc.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{
		AckTokens:     []string{tok},
		LeaseDuration: durationOrNil(lease),
	})
	if err != nil {
		return time.Time{}, err
	}
	return timeOrZero(resp.GetLeaseDeadline()), nil
}

// ctxError is what Next returns once the stream's context has ended (Close
// or the caller's ctx): it unwraps to the context error and carries the
// matching gRPC status, so both errors.Is(err, context.Canceled) and
// status.Code(err) == codes.Canceled hold.
type ctxError struct {
	what string // "consumer" or "subscription"
	err  error  // what ctxEnded returned
}

func (e *ctxError) Error() string { return "qbridge: " + e.what + " closed: " + e.err.Error() }

func (e *ctxError) Unwrap() error { return e.err }

// GRPCStatus lets status.Code and status.FromError see the code.
func (e *ctxError) GRPCStatus() *status.Status {
	return status.New(status.FromContextError(e.err).Code(), e.Error())
}

// streamErr is what Next reports for the error that ended a stream: the
// context's end if that is why, a status error for a clean end (which a
// qbridge server never does), else err unchanged.
func streamErr(ctx context.Context, what string, err error, endMsg string) error {
	if ctxErr := ctxEnded(ctx); ctxErr != nil {
		return &ctxError{what: what, err: ctxErr}
	}
	if errors.Is(err, io.EOF) {
		return status.Error(codes.Unavailable, endMsg)
	}
	return err
}

// ctxOr returns the ctxError for ctx if it has ended, else err.
func ctxOr(ctx context.Context, what string, err error) error {
	if ctxErr := ctxEnded(ctx); ctxErr != nil {
		return &ctxError{what: what, err: ctxErr}
	}
	return err
}

// ctxEnded returns ctx.Err(), or context.DeadlineExceeded when the deadline
// has passed but the context's timer has not fired yet. (grpc-go reports
// DEADLINE_EXCEEDED by comparing the deadline with the clock, so a stream
// can fail that way a moment before ctx.Err() turns non-nil.)
func ctxEnded(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded
	}
	return nil
}
