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
//			_ = d.Nack(ctx, true) // deliver again, with Attempt+1
//			continue
//		}
//		if err := d.Ack(ctx); err != nil {
//			log.Printf("ack %s: %v", d.ID, err)
//		}
//	}
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
	rpc  qbridgev1.QueueServiceClient
	conn *grpc.ClientConn // set when Dial made the connection: Close closes it
}

// Option configures Dial.
type Option func(*dialConfig)

type dialConfig struct {
	creds credentials.TransportCredentials
	extra []grpc.DialOption
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
// Defaults: insecure transport credentials, and keepalive pings every 20s
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
	return &Client{rpc: qbridgev1.NewQueueServiceClient(conn), conn: conn}, nil
}

// New returns a Client over an existing connection. The caller keeps
// ownership of conn: Client.Close does not close it.
func New(conn grpc.ClientConnInterface) *Client {
	return &Client{rpc: qbridgev1.NewQueueServiceClient(conn)}
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

// Enqueue appends one message to the tail of queue and returns its id: the
// one set with WithID, or the one the server assigned.
func (c *Client) Enqueue(ctx context.Context, queue string, payload []byte, opts ...EnqueueOption) (id string, err error) {
	req := &qbridgev1.EnqueueRequest{Queue: queue, Payload: payload}
	for _, o := range opts {
		o(req)
	}
	resp, err := c.rpc.Enqueue(ctx, req)
	if err != nil {
		return "", err
	}
	return resp.GetId(), nil
}

// Message is one message of EnqueueBatch.
type Message struct {
	// Payload is the message body. It may be empty.
	Payload []byte
	// Headers are optional application headers.
	Headers map[string]string
	// ID is an optional client-chosen id; empty means server-assigned.
	ID string
}

// EnqueueBatch appends msgs to queue atomically and in order: either all are
// enqueued or none is. It returns one id per message, in the same order. The
// server caps the batch size (1000 by default) and rejects an empty batch
// with INVALID_ARGUMENT.
func (c *Client) EnqueueBatch(ctx context.Context, queue string, msgs []Message) ([]string, error) {
	req := &qbridgev1.EnqueueBatchRequest{Queue: queue, Messages: make([]*qbridgev1.BatchMessage, len(msgs))}
	for i, m := range msgs {
		req.Messages[i] = &qbridgev1.BatchMessage{Payload: m.Payload, Headers: m.Headers, Id: m.ID}
	}
	resp, err := c.rpc.EnqueueBatch(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.GetIds(), nil
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
// empty.
func (c *Client) QueueStats(ctx context.Context, queue string) (ready, inFlight int64, err error) {
	resp, err := c.rpc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: queue})
	if err != nil {
		return 0, 0, err
	}
	return resp.GetReady(), resp.GetInFlight(), nil
}

// durationOrNil converts d, leaving the field unset (the server's default)
// when d is not positive.
func durationOrNil(d time.Duration) *durationpb.Duration {
	if d <= 0 {
		return nil
	}
	return durationpb.New(d)
}
