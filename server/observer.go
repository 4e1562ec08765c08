package server

import (
	"context"
	"fmt"
	"slices"
	"time"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server/broker"
)

// Observer is told of what one instance does, for metrics (package
// server/metrics implements it). Its methods are called on hot paths: they
// must be fast, never block, and be safe for concurrent use.
type Observer interface {
	// Delivered is called for each message sent to a Consume stream:
	// attempt is its delivery number (1 for the first), sinceEnqueue the
	// time from its enqueue (for delayed messages, the delay included) to
	// now.
	Delivered(queue string, attempt uint32, sinceEnqueue time.Duration)
	// Published is called for each successful Publish, with the number
	// of subscribers (on all instances) that received it.
	Published(receivers int64)
	// PubSubDelivered is called with the number of local Subscribe
	// streams a published message was queued to.
	PubSubDelivered(n int)
	// PubSubDropped is called when a local subscriber is cut off for
	// falling behind; the messages it had waiting are dropped.
	PubSubDropped(buffered int)
}

// WithObserver sets the Observer. Default: none.
func WithObserver(o Observer) Option { return func(opt *options) { opt.observer = o } }

type noObserver struct{}

func (noObserver) Delivered(string, uint32, time.Duration) {}
func (noObserver) Published(int64)                         {}
func (noObserver) PubSubDelivered(int)                     {}
func (noObserver) PubSubDropped(int)                       {}

// Snapshot returns the stats of the queues this Redis knows (those ListQueues
// lists), in name order, at most max of them (0: all), and whether there
// were more. It bypasses authorization: it is for this process's own
// metrics and dashboard history, not for callers.
func (s *Server) Snapshot(ctx context.Context, max int) (stats []*qbridgev1.GetQueueStatsResponse, truncated bool, err error) {
	phys, err := s.b.RegisteredQueues(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("list queues: %w", err)
	}
	qs := make([]string, 0, len(phys))
	for _, q := range phys {
		qs = append(qs, broker.Logical(q)) // a sharded queue's stats cover its shards
	}
	slices.Sort(qs)
	qs = slices.Compact(qs)
	if max > 0 && len(qs) > max {
		qs, truncated = qs[:max], true
	}
	for _, q := range qs {
		st, err := s.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
		if err != nil {
			return nil, truncated, fmt.Errorf("stats of queue %q: %w", q, err)
		}
		stats = append(stats, st)
	}
	return stats, truncated, nil
}
