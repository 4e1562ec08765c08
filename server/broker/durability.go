package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Durability of enqueues across a failover
//
// Redis replicates asynchronously: a master acknowledges a write before any
// replica has it, so an enqueue acknowledged by a master that dies right
// after can be lost when a replica is promoted. WithEnqueueReplicas closes
// that window: every coalesced flush of enqueues ends with WAIT n timeout,
// sent in the same pipeline right after the script runs, hence on the same
// connection (WAIT waits for the replication offset of the connection's own
// last write). A call is acknowledged only when the WAIT of the pipeline
// that ran its script counted n replicas; otherwise it fails with
// ErrNotReplicated, although the message is enqueued on the master.
//
// On Redis Cluster a pipeline of the cluster client is split per node and
// go-redis does not pipeline WAIT (it is an all-shards command there), so
// the flush instead groups the script runs by the master of their slot and
// sends one pipeline per node, on that node's own client, each ending with
// its WAIT. A run that the node redirects (MOVED or ASK: it did not run) is
// retried after the slot map is reloaded.

// ErrNotReplicated means an enqueue was written on the master but fewer
// replicas than WithEnqueueReplicas asks for acknowledged it in time. The
// message is enqueued; it may be lost if the master fails now. Errors of
// this kind are *NotReplicatedError.
var ErrNotReplicated = errors.New("not acknowledged by enough replicas")

// NotReplicatedError is the ErrNotReplicated of one enqueue.
type NotReplicatedError struct {
	Acked, Want int           // replicas that acknowledged, replicas asked for
	Timeout     time.Duration // how long WAIT waited
	// Err is set when the WAIT itself failed (Acked is then 0: unknown).
	Err error
}

func (e *NotReplicatedError) Error() string {
	const tail = ": it may be lost if the master fails now; retrying may duplicate it — use an id or dedup key"
	if e.Err != nil {
		return fmt.Sprintf("written on the master but its replication to %d replicas could not be confirmed (WAIT failed: %v)%s", e.Want, e.Err, tail)
	}
	return fmt.Sprintf("written on the master but acknowledged by only %d of %d replicas within %v%s", e.Acked, e.Want, e.Timeout, tail)
}

// Unwrap makes errors.Is(err, ErrNotReplicated) hold.
func (e *NotReplicatedError) Unwrap() error { return ErrNotReplicated }

// WithEnqueueReplicas makes Enqueue (EnqueueMany) acknowledge a message
// only after n replicas of the master that took it have it, waiting at
// most timeout (Redis WAIT, one per coalesced flush and node; see above).
// When fewer acknowledge in time the call fails with ErrNotReplicated: the
// message is enqueued on the master nonetheless. A failover keeps an
// acknowledged message as long as one of those replicas is promoted. n <= 0
// (the default) sends no WAIT; a timeout under 1ms is taken as 1ms (WAIT 0
// would wait forever). Publish is not covered.
func WithEnqueueReplicas(n int, timeout time.Duration) Option {
	return func(b *Broker) {
		b.dur.replicas = max(n, 0)
		b.dur.timeout = max(timeout, time.Millisecond).Truncate(time.Millisecond)
	}
}

// EnqueueReplicas returns the settings of WithEnqueueReplicas (0: off).
func (b *Broker) EnqueueReplicas() (n int, timeout time.Duration) {
	return b.dur.replicas, b.dur.timeout
}

// durability holds the WithEnqueueReplicas settings.
type durability struct {
	replicas int
	timeout  time.Duration

	mu sync.Mutex
	// clients are the clones (WithTimeout) of the clients the pipelines
	// with a WAIT go on, by client.
	clients map[*redis.Client]*redis.Client
}

// clientFor returns c with a read timeout long enough for a pipeline that
// ends with the WAIT: c's own plus the WAIT's (go-redis reads a pipeline's
// replies under one read deadline; were the WAIT to overrun it, the
// pipeline would be retried and its scripts run twice). The clone shares
// c's connection pool.
func (d *durability) clientFor(c *redis.Client) *redis.Client {
	rt := c.Options().ReadTimeout
	if rt <= 0 { // no read deadline at all
		return c
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if w, ok := d.clients[c]; ok {
		return w
	}
	if d.clients == nil || len(d.clients) >= 64 {
		// Cluster node clients change with the topology: forget old ones.
		d.clients = map[*redis.Client]*redis.Client{}
	}
	w := c.WithTimeout(rt + d.timeout)
	d.clients[c] = w
	return w
}

// replicaAck is what the WAIT after a script run answered.
type replicaAck struct {
	n   int64
	err error
}

// runManyWait is runMany followed by WAIT: the scripts and the WAIT go in
// one pipeline (one per node on Redis Cluster), and acks[i] is what the
// WAIT that followed runs[i] answered.
func (b *Broker) runManyWait(ctx context.Context, runs []scriptRun) []replicaAck {
	acks := make([]replicaAck, len(runs))
	if cc, ok := b.rdb.(*redis.ClusterClient); ok {
		b.runManyWaitCluster(ctx, cc, runs, acks)
		return acks
	}
	var c pipeliner = b.rdb
	if rc, ok := b.rdb.(*redis.Client); ok {
		c = b.dur.clientFor(rc)
	}
	todo := make([]int, len(runs))
	for i := range todo {
		todo[i] = i
	}
	for attempt := 0; attempt < 2 && len(todo) > 0; attempt++ {
		if attempt == 1 {
			// Redis lost its script cache (a restart or SCRIPT FLUSH): the
			// refused runs did not run. Load and send them again.
			if err := b.LoadScripts(ctx); err != nil {
				return acks // the NOSCRIPT errors stand
			}
		}
		b.pipelineWithWait(ctx, c, runs, todo, acks)
		todo = slices.DeleteFunc(todo, func(i int) bool { return !isNoScript(runs[i].err) })
	}
	return acks
}

// pipeliner is what runManyWait needs of a client.
type pipeliner interface {
	Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error)
}

// pipelineWithWait sends runs[i] for i in todo, then WAIT, in one pipeline
// on c (one connection).
func (b *Broker) pipelineWithWait(ctx context.Context, c pipeliner, runs []scriptRun, todo []int, acks []replicaAck) {
	var wait *redis.IntCmd
	_, _ = c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, i := range todo {
			runs[i].cmd = b.evalSha(ctx, p, runs[i].script, runs[i].queue, runs[i].args...)
		}
		wait = redis.NewIntCmd(ctx, "wait", b.dur.replicas, b.dur.timeout.Milliseconds())
		_ = p.Process(ctx, wait)
		return nil
	})
	for _, i := range todo {
		runs[i].err = runs[i].cmd.Err()
		if errors.Is(runs[i].err, redis.Nil) {
			runs[i].err = nil
		}
		acks[i] = replicaAck{n: wait.Val(), err: wait.Err()}
	}
}

// runManyWaitCluster is runManyWait on Redis Cluster: one pipeline per
// master that serves some of the runs, on that node's client, sent in
// parallel, each ending with its WAIT.
func (b *Broker) runManyWaitCluster(ctx context.Context, cc *redis.ClusterClient, runs []scriptRun, acks []replicaAck) {
	todo := make([]int, len(runs))
	for i := range todo {
		todo[i] = i
	}
	const attempts = 3
	for attempt := 0; attempt < attempts && len(todo) > 0; attempt++ {
		if attempt > 0 {
			if slices.ContainsFunc(todo, func(i int) bool { return isRedirect(runs[i].err) }) {
				reloadSlots(ctx, cc)
			}
			if slices.ContainsFunc(todo, func(i int) bool { return isNoScript(runs[i].err) }) {
				if err := b.LoadScripts(ctx); err != nil {
					break
				}
			}
		}
		byNode := map[*redis.Client][]int{}
		for _, i := range todo {
			node, err := cc.MasterForKey(ctx, b.keys.Ready(runs[i].queue))
			if err != nil {
				runs[i].cmd, runs[i].err = nil, err
				continue
			}
			byNode[node] = append(byNode[node], i)
		}
		var wg sync.WaitGroup
		for node, idx := range byNode {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b.pipelineWithWait(ctx, b.dur.clientFor(node), runs, idx, acks)
			}()
		}
		wg.Wait()
		todo = slices.DeleteFunc(todo, func(i int) bool { return !isNoScript(runs[i].err) && !isRedirect(runs[i].err) })
	}
	for _, i := range todo {
		if isRedirect(runs[i].err) {
			// Redirected on every attempt (a slot migrating): the script did
			// not run; retrying later is safe.
			runs[i].err = fmt.Errorf("%w: the queue's slot is moving between cluster nodes, nothing was written: %v", ErrUnavailable, runs[i].err)
		}
	}
}

// isRedirect reports a Redis Cluster redirection (the command did not run).
func isRedirect(err error) bool {
	return redis.HasErrorPrefix(err, "MOVED ") || redis.HasErrorPrefix(err, "ASK ")
}

// reloadSlots reloads the cluster client's slot map now. go-redis reloads
// it only in the background after a redirect its own commands meet; its
// ForEachMaster reloads it first, and a callback that does nothing opens no
// connection.
func reloadSlots(ctx context.Context, cc *redis.ClusterClient) {
	_ = cc.ForEachMaster(ctx, func(context.Context, *redis.Client) error { return nil })
}

// checkReplicated fails the calls of group that succeeded with
// ErrNotReplicated when ack counted fewer replicas than asked for.
func (b *Broker) checkReplicated(queue string, group []*enqueueCall, ack replicaAck) {
	if ack.err == nil && ack.n >= int64(b.dur.replicas) {
		return
	}
	e := &NotReplicatedError{Acked: int(ack.n), Want: b.dur.replicas, Timeout: b.dur.timeout, Err: ack.err}
	if ack.err != nil {
		e.Acked = 0
	}
	for _, c := range group {
		if c.err == nil {
			c.err = fmt.Errorf("enqueue to %q: %w", queue, e)
		}
	}
}
