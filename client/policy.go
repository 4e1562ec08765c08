package client

import (
	"math"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// WithDelay makes the message deliverable no earlier than d from now (the
// server accepts up to 365 days); until then it counts as delayed in
// QueueStats. 0 or less means no delay. Do not combine with WithDeliverAt:
// the server rejects a message with both with INVALID_ARGUMENT.
func WithDelay(d time.Duration) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.Delay = durationOrNil(d) }
}

// WithDeliverAt makes the message deliverable no earlier than t (at most 365
// days ahead; a time in the past means at once). The zero time means no
// schedule. The server keeps millisecond precision.
func WithDeliverAt(t time.Time) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.DeliverAt = timeOrNil(t) }
}

// WithDedupKey sets an idempotency key (same rules as a message id): while
// the queue's dedup window (10 minutes by default) has not passed since the
// first Enqueue with this key, another Enqueue with it enqueues nothing and
// returns the first message's id, with EnqueueResult.Duplicate set. This
// makes retrying a failed Enqueue safe.
func WithDedupKey(key string) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.DedupKey = key }
}

// WithTTL gives the message a time to live: once d has passed since it was
// enqueued, it is no longer delivered (nor redelivered after a Retry, Nack or
// expired lease); the server drops it, or dead-letters it when the queue's
// expired action says so, counting it in QueueCounters.Expired either way.
// 0 or less means it never expires; the server accepts 1ms to 365 days.
func WithTTL(d time.Duration) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.Ttl = durationOrNil(d) }
}

// WithRetryPolicy overrides the queue's retry policy for this message.
// Zero fields keep the queue's setting.
func WithRetryPolicy(p RetryPolicy) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.RetryPolicy = p.proto() }
}

// WithWaitForRoom makes Enqueue wait, until ctx's deadline, when the queue
// has a max length and is full, instead of failing at once with
// RESOURCE_EXHAUSTED. Give ctx a deadline: without one the call may wait
// forever.
func WithWaitForRoom() EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.WaitForRoom = true }
}

// RetryPolicy says how often a message is delivered before it is
// dead-lettered, and how long Delivery.Retry waits before delivering it
// again. Zero fields (and, for durations, negative ones) mean the queue's
// setting, or the server's default.
type RetryPolicy struct {
	// MaxAttempts is how many deliveries the message gets before it is
	// dead-lettered (the server accepts 1 to 1000). A Nack, a lease that
	// runs out and a Consume stream that ends with the message unsettled
	// all count.
	MaxAttempts int
	// MinBackoff is the backoff bound of the first retry; retry n waits a
	// random time between 10% and 100% of min(MaxBackoff,
	// MinBackoff*2^(n-1)).
	MinBackoff time.Duration
	// MaxBackoff caps the backoff bound.
	MaxBackoff time.Duration
}

// proto converts p; the zero policy is left unset.
func (p RetryPolicy) proto() *qbridgev1.RetryPolicy {
	if p == (RetryPolicy{}) {
		return nil
	}
	return &qbridgev1.RetryPolicy{
		MaxAttempts: clampUint32(p.MaxAttempts),
		MinBackoff:  durationOrNil(p.MinBackoff),
		MaxBackoff:  durationOrNil(p.MaxBackoff),
	}
}

// RetryOption configures Delivery.Retry.
type RetryOption func(*qbridgev1.NackRequest)

// WithRetryDelay delivers the message again d after the Retry (the server
// accepts up to 365 days) instead of after the retry policy's backoff; 0 or
// less means at once, at the head of the queue. The retry still counts as
// an attempt.
func WithRetryDelay(d time.Duration) RetryOption {
	return func(r *qbridgev1.NackRequest) { r.RetryDelay = durationpb.New(max(d, 0)) }
}

// maxErrorText is the server's limit on NackRequest.error, in bytes.
const maxErrorText = 4 << 10

// errorText is the text Retry and DeadLetter send for err: err.Error() made
// valid UTF-8 (a proto string must be) and cut to the server's limit at a
// character boundary; "" for a nil err.
func errorText(err error) string {
	if err == nil {
		return ""
	}
	s := strings.ToValidUTF8(err.Error(), "\uFFFD")
	if len(s) <= maxErrorText {
		return s
	}
	cut := maxErrorText
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// timeOrNil converts t, leaving the field unset when t is zero.
func timeOrNil(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// clampUint32 converts n, mapping n <= 0 to 0 (unset) and values above the
// uint32 range to its maximum (which the server then rejects as too large).
func clampUint32(n int) uint32 {
	switch {
	case n <= 0:
		return 0
	case uint64(n) > math.MaxUint32:
		return math.MaxUint32
	default:
		return uint32(n)
	}
}
