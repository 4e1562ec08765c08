package client

import (
	"context"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// Subscribe opens a pub/sub stream on exact channel names and glob patterns
// (as in Redis PSUBSCRIBE, e.g. "news.*"); at least one of either is needed.
//
// It returns once the server has confirmed the subscription, so every
// message published after Subscribe returns is received (delivery is
// at-most-once: a subscriber that reads too slowly is cut off with
// RESOURCE_EXHAUSTED). A rejected request (INVALID_ARGUMENT, UNAVAILABLE, ...)
// is returned by Subscribe itself. Close the Subscription when done.
func (c *Client) Subscribe(ctx context.Context, channels []string, patterns []string) (*Subscription, error) {
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.rpc.Subscribe(sctx, &qbridgev1.SubscribeRequest{Channels: channels, Patterns: patterns})
	if err != nil {
		cancel()
		return nil, ctxOr(ctx, "subscription", err)
	}
	first, err := stream.Recv()
	if err != nil {
		cancel()
		return nil, streamErr(ctx, "subscription", err, "qbridge: the server ended the Subscribe stream before confirming it")
	}
	if first.GetSubscribed() == nil {
		cancel()
		return nil, status.Errorf(codes.Internal,
			"qbridge: the first message of the Subscribe stream is %s, not the subscribed confirmation", eventName(first))
	}
	return &Subscription{ctx: sctx, cancel: cancel, stream: stream}, nil
}

func eventName(r *qbridgev1.SubscribeResponse) string {
	switch e := r.GetEvent().(type) {
	case nil:
		return "empty"
	case *qbridgev1.SubscribeResponse_Message:
		return "a published message"
	default:
		return fmt.Sprintf("%T", e)
	}
}

// Subscription is one Subscribe stream. Next may be called from several
// goroutines; each message is handed out once.
type Subscription struct {
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex // held by Next, including while it waits
	stream grpc.ServerStreamingClient[qbridgev1.SubscribeResponse]
	err    error // what Next returns once the stream ended
}

// PubSubMessage is one message received by a Subscription.
type PubSubMessage struct {
	// Channel is the channel the message was published on.
	Channel string
	// Pattern is the subscribed pattern that matched, or "" when the
	// message arrived through an exact channel subscription. A message
	// that matches both a channel and a pattern of the Subscription
	// arrives once for each.
	Pattern string
	// Payload is the published payload, unchanged.
	Payload []byte
}

// Next returns the next published message, waiting for one as long as
// needed.
//
// When the stream breaks, Next returns the gRPC status error it ended with
// (UNAVAILABLE when the server shuts down or the connection is lost,
// RESOURCE_EXHAUSTED when the subscriber read too slowly): the Subscription
// does not resubscribe. After Close, or once the context given to Subscribe
// ends, Next returns an error matching errors.Is(err, context.Canceled) (or
// context.DeadlineExceeded) and the corresponding status code. Either way
// the stream is over: every later call returns the same error.
func (s *Subscription) Next() (*PubSubMessage, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if s.err != nil {
			return nil, s.err
		}
		if err := ctxEnded(s.ctx); err != nil {
			s.err = &ctxError{what: "subscription", err: err}
			return nil, s.err
		}
		resp, err := s.stream.Recv()
		if err != nil {
			s.err = streamErr(s.ctx, "subscription", err, "qbridge: the server ended the Subscribe stream")
			s.cancel() // the stream is over: release its context
			return nil, s.err
		}
		if m := resp.GetMessage(); m != nil {
			return &PubSubMessage{Channel: m.GetChannel(), Pattern: m.GetPattern(), Payload: m.GetPayload()}, nil
		}
		// Another confirmation: nothing to hand out.
	}
}

// Close ends the subscription. It does not wait for the server and always
// returns nil; it may be called more than once and concurrently with Next,
// which it unblocks.
func (s *Subscription) Close() error {
	s.cancel()
	return nil
}
