package broker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Partial results
//
// On Redis Cluster the reads that cover many queues at once (ReadyLengths,
// ReadCounters, FirstDelayedMany) are pipelines that the client splits per
// node. When a node is down (a master without a replica, or before its
// replica is promoted, on a cluster that runs with
// cluster-require-full-coverage no), the commands sent to it fail and those
// sent to the others succeed: go-redis sets each command's own error (for a
// node that refuses connections, the dial error, after its retries), and
// the pipeline's error is merely the first of them in command order. These
// reads therefore return every value they could read, with a
// *PartialError naming the queues they could not.

// PartialError is the error of a read over many queues of which some could
// not be read. The values returned with it are valid at every index not in
// Failures (and zero at those in it). It is returned whenever at least one
// queue failed, all of them included (then Failed holds for every index),
// so a caller that only checks err != nil sees a failure as before;
// errors.As gets the details, and errors.Is looks into every queue's
// error (ErrUnavailable, context.Canceled, ...).
type PartialError struct {
	// Op is what was being done, e.g. "read queue lengths".
	Op string
	// Total is the number of queues read.
	Total int
	// Failures are the queues that could not be read, in index order.
	Failures []QueueFailure
}

// QueueFailure is one queue a batch read could not read.
type QueueFailure struct {
	// Index is the queue's position in the queues given to the read.
	Index int
	Queue string
	// Node is the address of the Redis Cluster master that serves the
	// queue's slot, as the client's slot map has it; empty when not on
	// Redis Cluster (or the map is not known).
	Node string
	// Err is the queue's error, classified like every broker error
	// (ErrUnavailable for a node that cannot be reached).
	Err error
}

func (e *PartialError) Error() string {
	if len(e.Failures) == 0 {
		return e.Op + ": no queue failed"
	}
	var named []string
	for _, n := range e.Nodes() {
		if n != "" {
			named = append(named, n)
		}
	}
	where := ""
	if len(named) > 0 {
		where = ", on Redis node " + strings.Join(named, ", ")
	}
	return fmt.Sprintf("%s: %d of %d queues could not be read%s; the first: %v", e.Op, len(e.Failures), e.Total, where, e.Failures[0].Err)
}

// Unwrap returns the error of every failed queue.
func (e *PartialError) Unwrap() []error {
	out := make([]error, len(e.Failures))
	for i, f := range e.Failures {
		out[i] = f.Err
	}
	return out
}

// Failed reports whether the queue at index i could not be read.
func (e *PartialError) Failed(i int) bool {
	if e == nil {
		return false
	}
	j := sort.Search(len(e.Failures), func(j int) bool { return e.Failures[j].Index >= i })
	return j < len(e.Failures) && e.Failures[j].Index == i
}

// Nodes returns the distinct nodes of the failures, sorted ("" among them
// for failures of no known node).
func (e *PartialError) Nodes() []string {
	seen := map[string]bool{}
	var out []string
	for _, f := range e.Failures {
		if !seen[f.Node] {
			seen[f.Node] = true
			out = append(out, f.Node)
		}
	}
	sort.Strings(out)
	return out
}

// partial collects the failures of a batch read over queues, where errOf(i)
// is the raw error of queue i's command (nil: read), and returns nil or a
// *PartialError. Commands that returned redis.Nil were read.
func (b *Broker) partial(ctx context.Context, op string, queues []string, errOf func(i int) error) error {
	var pe *PartialError
	for i, q := range queues {
		err := errOf(i)
		if err == nil || errors.Is(err, redis.Nil) {
			continue
		}
		if pe == nil {
			pe = &PartialError{Op: op, Total: len(queues)}
		}
		pe.Failures = append(pe.Failures, QueueFailure{Index: i, Queue: q, Node: b.NodeOf(ctx, q), Err: wrap(err, "queue %q", q)})
	}
	if pe == nil {
		return nil
	}
	return pe
}

// NodeOf returns the address of the Redis Cluster master that serves
// queue's slot according to the client's slot map (no round trip once
// the map is loaded), or "" when not on Redis Cluster or the map cannot
// be had. For grouping failures by node, e.g. in logs.
func (b *Broker) NodeOf(ctx context.Context, queue string) string {
	cc, ok := b.rdb.(*redis.ClusterClient)
	if !ok {
		return ""
	}
	c, err := cc.MasterForKey(ctx, b.keys.Ready(queue))
	if err != nil {
		return ""
	}
	return c.Options().Addr
}

// Unreachable reports whether err means that a Redis node could not be
// reached at all (connection refused or timed out, or broken), as opposed
// to a node that answered with an error, even one that says to retry
// (TRYAGAIN, LOADING, MASTERDOWN, CLUSTERDOWN). Every attempt on an
// unreachable node costs the client's dial retries (or timeouts), so work
// that loops over many queues does better to leave its queues alone for a
// while.
func Unreachable(err error) bool {
	if !errors.Is(err, ErrUnavailable) {
		return false
	}
	msg := err.Error()
	for _, s := range []string{"TRYAGAIN", "LOADING", "MASTERDOWN", "CLUSTERDOWN"} {
		if strings.Contains(msg, s) {
			return false
		}
	}
	return true
}
