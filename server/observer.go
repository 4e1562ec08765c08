package server

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
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
// metrics and dashboard history, not for callers. A queue whose stats
// cannot be read (on Redis Cluster, one on a node that is down) is left
// out: the stats of the others come back with an error naming how many
// failed. Once a node turns out unreachable, its other queues are skipped,
// so that one dead node costs one timeout, not one per queue.
func (s *Server) Snapshot(ctx context.Context, max int) (stats []*qbridgev1.GetQueueStatsResponse, truncated bool, err error) {
	qs, err := s.queueNames(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("list queues: %w", err)
	}
	if max > 0 && len(qs) > max {
		qs, truncated = qs[:max], true
	}
	var firstErr error
	failed := 0
	down := map[string]bool{}
	for _, q := range qs {
		node := s.b.NodeOf(ctx, q)
		if node != "" && down[node] {
			failed++
			continue
		}
		st, err := s.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
		if err != nil {
			if ctx.Err() != nil {
				return stats, truncated, fmt.Errorf("stats of queue %q: %w", q, err)
			}
			if status.Code(err) == codes.Unavailable {
				down[node] = true
			}
			failed++
			if firstErr == nil {
				firstErr = fmt.Errorf("stats of queue %q: %w", q, err)
			}
			continue
		}
		stats = append(stats, st)
	}
	if failed > 0 {
		return stats, truncated, fmt.Errorf("the stats of %d of %d queues could not be read; first: %w", failed, len(qs), firstErr)
	}
	return stats, truncated, nil
}
