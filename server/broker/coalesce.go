package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Coalescing
//
// Many callers enqueueing or publishing one message each would each cost a
// round trip (two syscalls on both ends) and, for enqueues, a script run.
// A coalescer merges concurrent calls instead: calls wait in one FIFO, and up
// to a few flushes at a time each send whatever is waiting in one pipeline.
// Enqueues to the same queue go as one script run in which each call is its
// own all-or-nothing group (see enqueueScript); different queues are
// separate script runs in the same pipeline.
//
// A caller that finds a flush slot free flushes at once, in its own
// goroutine, so a lone caller waits for nothing and low-load latency does
// not change; callers that arrive while every slot is busy go together in
// the next flush, whose leader hands further work to a short-lived
// goroutine once its own call is done. Each caller gets its own result and
// its own error: a full queue or a duplicate affects only the call it
// belongs to, and a Redis error only the calls of the script run that
// failed.

// coalescer batches calls of type T. The zero value is not usable; see
// newCoalescer.
type coalescer[T any] struct {
	slots    int // flushes in flight at most
	maxItems int // items per flush (a single call always fits)
	maxBytes int // bytes per flush (likewise)
	size     func(T) (items, bytes int)
	flush    func([]T)

	mu      sync.Mutex
	pending []T
	active  int
}

func newCoalescer[T any](slots, maxItems, maxBytes int, size func(T) (int, int), flush func([]T)) *coalescer[T] {
	return &coalescer[T]{slots: max(1, slots), maxItems: maxItems, maxBytes: maxBytes, size: size, flush: flush}
}

// submit queues call and, when a flush slot is free, flushes in the calling
// goroutine. The caller then waits for its call to be done by its own
// means.
func (c *coalescer[T]) submit(call T) {
	c.mu.Lock()
	c.pending = append(c.pending, call)
	lead := c.active < c.slots
	if lead {
		c.active++
	}
	c.mu.Unlock()
	if !lead {
		return
	}
	batch := c.take()
	if batch == nil {
		return
	}
	c.flush(batch)
	c.mu.Lock()
	more := len(c.pending) > 0
	if !more {
		c.active--
	}
	c.mu.Unlock()
	if more {
		go c.loop()
	}
}

// loop flushes until nothing is pending, then gives its slot back.
func (c *coalescer[T]) loop() {
	for {
		batch := c.take()
		if batch == nil {
			return
		}
		c.flush(batch)
	}
}

// take removes the next batch from the FIFO; when there is none it gives
// the caller's slot back and returns nil.
func (c *coalescer[T]) take() []T {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.pending) == 0 {
		c.active--
		return nil
	}
	n, items, bytes := 0, 0, 0
	for n < len(c.pending) {
		i, b := c.size(c.pending[n])
		if n > 0 && (items+i > c.maxItems || bytes+b > c.maxBytes) {
			break
		}
		items, bytes = items+i, bytes+b
		n++
	}
	batch := make([]T, n)
	copy(batch, c.pending[:n])
	clear(c.pending[:n])
	c.pending = c.pending[n:]
	if len(c.pending) == 0 {
		c.pending = nil // let the backing array go
	}
	return batch
}

// enqueueCall is one EnqueueMany waiting to be flushed.
type enqueueCall struct {
	ctx   context.Context
	queue string
	n     int
	bytes int
	args  []any // 5 per message, as enqueueScript takes them
	res   EnqueueResult
	err   error
	done  chan struct{}
}

func enqueueCallSize(c *enqueueCall) (int, int) { return c.n, c.bytes }

// flushEnqueues sends a batch of enqueue calls: one script run per queue,
// all in one pipeline.
func (b *Broker) flushEnqueues(calls []*enqueueCall) {
	defer func() {
		for _, c := range calls {
			close(c.done)
		}
	}()
	// Calls whose caller gave up are not sent: they are then not enqueued,
	// which is what the caller was told.
	byQueue := map[string][]*enqueueCall{}
	var order []string
	for _, c := range calls {
		if err := c.ctx.Err(); err != nil {
			c.err = wrap(err, "enqueue to %q", c.queue)
			continue
		}
		if _, ok := byQueue[c.queue]; !ok {
			order = append(order, c.queue)
		}
		byQueue[c.queue] = append(byQueue[c.queue], c)
	}
	if len(order) == 0 {
		return
	}
	ctx := context.Background()
	runs := make([]scriptRun, len(order))
	for i, q := range order {
		group := byQueue[q]
		n := 1
		for _, c := range group {
			n += 1 + len(c.args)
		}
		args := make([]any, 0, n)
		args = append(args, len(group))
		for _, c := range group {
			args = append(args, c.n)
			args = append(args, c.args...)
		}
		runs[i] = scriptRun{script: enqueueScript, queue: q, args: args}
	}
	var acks []replicaAck
	if b.dur.replicas > 0 {
		acks = b.runManyWait(ctx, runs) // the scripts, then WAIT (durability.go)
	} else {
		b.runMany(ctx, runs)
	}
	for i, q := range order {
		group := byQueue[q]
		if err := runs[i].err; err != nil {
			err = wrap(err, "enqueue to %q", q)
			for _, c := range group {
				c.err = err
			}
			continue
		}
		out, err := runs[i].cmd.Slice()
		if err != nil {
			err = wrap(err, "enqueue to %q", q)
			for _, c := range group {
				c.err = err
			}
			continue
		}
		parseEnqueueReply(q, out, group)
		if acks != nil {
			b.checkReplicated(q, group, acks[i])
		}
	}
}

// parseEnqueueReply hands each call its part of an enqueueScript reply.
func parseEnqueueReply(queue string, out []any, group []*enqueueCall) {
	at := 0
	for gi, c := range group {
		if at >= len(out) {
			for _, c := range group[gi:] {
				c.err = fmt.Errorf("enqueue to %q: short reply (%d values for %d calls)", queue, len(out), len(group))
			}
			return
		}
		switch out[at] {
		case "FULL":
			if at+3 > len(out) {
				c.err = fmt.Errorf("enqueue to %q: short reply", queue)
				at = len(out)
				continue
			}
			held, _ := out[at+1].(int64)
			limit, _ := out[at+2].(int64)
			c.err = &QueueFullError{Queue: queue, Held: held, Max: limit}
			at += 3
		case "OK":
			if at+3+c.n > len(out) {
				c.err = fmt.Errorf("enqueue to %q: short reply", queue)
				at = len(out)
				continue
			}
			created, _ := out[at+1].(int64)
			c.res.Created = created == 1
			if due, _ := out[at+2].(int64); due > 0 {
				c.res.FirstDue = time.UnixMilli(due)
			}
			for i := 0; i < c.n; i++ {
				if dup, _ := out[at+3+i].(string); dup != "" {
					c.res.IDs[i], c.res.Duplicate[i] = dup, true
				}
			}
			at += 3 + c.n
		default:
			c.err = fmt.Errorf("enqueue to %q: unexpected reply %v", queue, out[at])
			at = len(out)
		}
	}
}

// scriptRun is one queue script to run as part of runMany.
type scriptRun struct {
	script *redis.Script
	queue  string
	args   []any
	cmd    *redis.Cmd
	err    error
}

// runMany runs queue scripts in one round trip. A lone script runs as
// usual (go-redis loads it if Redis lost it); several go in a pipeline, and
// those that Redis refused because it lost its script cache (after a
// restart or SCRIPT FLUSH; they did not run) are sent again once the
// scripts are loaded.
func (b *Broker) runMany(ctx context.Context, runs []scriptRun) {
	if len(runs) == 1 {
		runs[0].cmd = b.run(ctx, runs[0].script, runs[0].queue, runs[0].args...)
		runs[0].err = runs[0].cmd.Err()
		return
	}
	for attempt := 0; attempt < 2; attempt++ {
		var todo []*scriptRun
		for i := range runs {
			if attempt == 0 || isNoScript(runs[i].err) {
				todo = append(todo, &runs[i])
			}
		}
		if len(todo) == 0 {
			return
		}
		if attempt == 1 {
			if err := b.LoadScripts(ctx); err != nil {
				return // the NOSCRIPT errors stand
			}
		}
		b.pipelineScripts(ctx, todo)
		for _, r := range todo {
			r.err = r.cmd.Err()
			if errors.Is(r.err, redis.Nil) {
				r.err = nil
			}
		}
	}
}

// pipelineScripts sends runs in a pipeline. On Redis Cluster it sends one
// pipeline per slot (those of different slots at once): when the first
// reply a node sends for a pipeline is retryable (TRYAGAIN while a slot
// migrates, say), go-redis sends all of that node's commands again, and
// the ones that had run would run twice (an enqueue stored twice). The
// commands of one slot fail alike, so a slot's pipeline is safe to resend.
func (b *Broker) pipelineScripts(ctx context.Context, runs []*scriptRun) {
	send := func(rs []*scriptRun) {
		_, _ = b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, r := range rs {
				r.cmd = b.evalSha(ctx, p, r.script, r.queue, r.args...)
			}
			return nil
		})
	}
	if _, ok := b.rdb.(*redis.ClusterClient); !ok {
		send(runs)
		return
	}
	bySlot := map[int][]*scriptRun{}
	var slots []int
	for _, r := range runs {
		sl := Slot(b.keys.Ready(r.queue))
		if _, ok := bySlot[sl]; !ok {
			slots = append(slots, sl)
		}
		bySlot[sl] = append(bySlot[sl], r)
	}
	if len(slots) == 1 {
		send(runs)
		return
	}
	var wg sync.WaitGroup
	for _, sl := range slots {
		wg.Go(func() { send(bySlot[sl]) })
	}
	wg.Wait()
}

func isNoScript(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT")
}

// enqueueCoalescing sets up the coalescer of EnqueueMany.
func (b *Broker) enqueueCoalescing(slots int) {
	if slots <= 0 {
		b.enqueues = nil
		return
	}
	b.enqueues = newCoalescer(slots, 4096, 8<<20, enqueueCallSize, b.flushEnqueues)
}

// publishCall is one Publish waiting to be flushed.
type publishCall struct {
	ctx     context.Context
	channel string
	payload []byte
	sharded bool // SPUBLISH (WithShardedChannels)
	n       int64
	err     error
	done    chan struct{}
}

func publishCallSize(c *publishCall) (int, int) { return 1, len(c.payload) }

// flushPublishes sends a batch of publishes in one pipeline, in the order
// they were made (PUBLISH, or SPUBLISH for a sharded channel).
func (b *Broker) flushPublishes(calls []*publishCall) {
	defer func() {
		for _, c := range calls {
			close(c.done)
		}
	}()
	ctx := context.Background()
	cmds := make([]*redis.IntCmd, len(calls))
	live := 0
	for _, c := range calls {
		if c.ctx.Err() == nil {
			live++
		}
	}
	if live == 0 {
		for _, c := range calls {
			c.err = wrap(c.ctx.Err(), "publish to %q", c.channel)
		}
		return
	}
	_, _ = b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, c := range calls {
			if c.ctx.Err() != nil {
				continue
			}
			if c.sharded {
				cmds[i] = p.SPublish(ctx, b.keys.Channel(c.channel), c.payload)
			} else {
				cmds[i] = p.Publish(ctx, b.keys.Channel(c.channel), c.payload)
			}
		}
		return nil
	})
	for i, c := range calls {
		if cmds[i] == nil {
			c.err = wrap(c.ctx.Err(), "publish to %q", c.channel)
			continue
		}
		c.n, c.err = cmds[i].Result()
		c.err = wrap(c.err, "publish to %q", c.channel)
	}
}

func (b *Broker) publishCoalescing(slots int) {
	if slots <= 0 {
		b.publishes = nil
		return
	}
	b.publishes = newCoalescer(slots, 1024, 8<<20, publishCallSize, b.flushPublishes)
}

// settleCall is one Ack or Drop on one queue waiting to be flushed.
// Calls with the same queue, counter and error text are merged into one
// settleScript run (their lease ids concatenated; each call gets back the
// flags of its own), as if they had run one after the other.
type settleCall struct {
	ctx              context.Context
	queue            string
	counter, errText string
	args             []any // pairs: lease id, result
	ok               []bool
	err              error
	done             chan struct{}
}

func settleCallSize(c *settleCall) (int, int) {
	n := 0
	for _, a := range c.args {
		if s, ok := a.(string); ok {
			n += len(s)
		}
	}
	return len(c.args) / 2, n
}

func (b *Broker) flushSettles(calls []*settleCall) {
	defer func() {
		for _, c := range calls {
			close(c.done)
		}
	}()
	type key struct{ queue, counter, errText string }
	groups := map[key][]*settleCall{}
	var order []key
	for _, c := range calls {
		if err := c.ctx.Err(); err != nil {
			c.err = wrap(err, "settle in %q", c.queue)
			continue
		}
		k := key{c.queue, c.counter, c.errText}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], c)
	}
	if len(order) == 0 {
		return
	}
	runs := make([]scriptRun, len(order))
	for i, k := range order {
		args := []any{k.counter, k.errText}
		for _, c := range groups[k] {
			args = append(args, c.args...)
		}
		runs[i] = scriptRun{script: settleScript, queue: k.queue, args: args}
	}
	b.runMany(context.Background(), runs)
	for i, k := range order {
		group := groups[k]
		err := runs[i].err
		var flagsOut []int64
		if err == nil {
			flagsOut, err = runs[i].cmd.Int64Slice()
		}
		want := 0
		for _, c := range group {
			want += len(c.args) / 2
		}
		if err == nil && len(flagsOut) != want {
			err = fmt.Errorf("%d flags for %d lease ids", len(flagsOut), want)
		}
		if err != nil {
			err = wrap(err, "settle in %q", k.queue)
			for _, c := range group {
				c.err = err
			}
			continue
		}
		at := 0
		for _, c := range group {
			n := len(c.args) / 2
			c.ok = flags(flagsOut[at : at+n])
			at += n
		}
	}
}

func (b *Broker) settleCoalescing(slots int) {
	if slots <= 0 {
		b.settles = nil
		return
	}
	b.settles = newCoalescer(slots, 4096, 8<<20, settleCallSize, b.flushSettles)
}
