package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// Worker defaults.
const (
	// DefaultConcurrency is how many handlers a Worker runs at once unless
	// WithConcurrency says otherwise.
	DefaultConcurrency = 8
	// DefaultShutdownTimeout is how long a stopping Worker waits for its
	// running handlers unless WithShutdownTimeout says otherwise.
	DefaultShutdownTimeout = 10 * time.Second
	// DefaultReconnectMin and DefaultReconnectMax bound the backoff
	// between attempts to reopen a broken Consume stream unless
	// WithReconnectBackoff says otherwise.
	DefaultReconnectMin = 100 * time.Millisecond
	DefaultReconnectMax = 5 * time.Second
)

const (
	// rpcTimeout bounds each Ack, Nack and ExtendLease call of a Worker.
	rpcTimeout = 10 * time.Second
	// settleRetryLimit bounds how long a Worker retries an Ack or Nack
	// that fails with UNAVAILABLE (also bounded by the lease).
	settleRetryLimit = time.Minute
	// abandonGrace is how long a stopping Worker waits for the handlers
	// it cancelled at the shutdown deadline before Run returns without
	// them.
	abandonGrace = 2 * time.Second
	// healthyStream is how long a Consume stream must have lived (if it
	// delivered nothing) for its end to reset the reconnect backoff.
	healthyStream = time.Second
	// minLease is the server's smallest lease, used to bound the lease a
	// Worker infers from a delivery's deadline.
	minLease = time.Second
	// inferredLeaseFallback is the lease assumed when the one inferred
	// from a delivery's deadline makes no sense (clock skew).
	inferredLeaseFallback = 30 * time.Second
)

// Errors a Worker cancels a handler's context with; context.Cause(ctx)
// tells them apart.
var (
	// ErrLeaseLost: the server no longer leases the task to this worker
	// (the lease ran out, or the Consume stream ended); it will be, or has
	// been, delivered again, so finishing the handler is wasted effort
	// and its outcome is not reported.
	ErrLeaseLost = errors.New("qbridge: the task's lease was lost")
	// ErrWorkerStopped: the Worker stopped before the handler returned
	// (its shutdown timeout passed, or its Consume stream failed for
	// good); the task goes back to its queue with the end of the stream.
	ErrWorkerStopped = errors.New("qbridge: the worker stopped")
)

// WorkerOption configures NewWorker.
type WorkerOption func(*workerConfig)

type workerConfig struct {
	concurrency     int
	lease           time.Duration
	shutdownTimeout time.Duration
	logger          *slog.Logger
	minBackoff      time.Duration
	maxBackoff      time.Duration
}

// WithConcurrency sets how many handlers run at once (default
// DefaultConcurrency; 0 or less means the default). It is also the
// Consume stream's credit window (max in flight), so it may not exceed the
// server's cap (1024 by default): Run fails with INVALID_ARGUMENT then.
func WithConcurrency(n int) WorkerOption {
	return func(c *workerConfig) { c.concurrency = n }
}

// WithWorkerLease sets the lease of each delivery (the server accepts 1s to
// 12h by default; 0 or less means the server's default, 30s). The Worker
// extends the lease of every task it holds every third of it, so a handler
// may run for longer than its lease; a shorter lease makes a crashed
// worker's tasks come back sooner.
func WithWorkerLease(d time.Duration) WorkerOption {
	return func(c *workerConfig) { c.lease = d }
}

// WithShutdownTimeout sets how long Run waits, after its context ends, for
// running handlers to finish (default DefaultShutdownTimeout; 0 or less
// means the default). Handlers still running then have their context
// cancelled (cause ErrWorkerStopped) and their tasks go back to the queue.
func WithShutdownTimeout(d time.Duration) WorkerOption {
	return func(c *workerConfig) { c.shutdownTimeout = d }
}

// WithWorkerLogger sets the logger the Worker reports to: broken streams
// and reconnects, failed tasks, panics (with their stack), settlements
// that failed, lost leases. Default: slog.Default().
func WithWorkerLogger(l *slog.Logger) WorkerOption {
	return func(c *workerConfig) { c.logger = l }
}

// WithReconnectBackoff sets the backoff between attempts to reopen a
// broken Consume stream: it starts at minDelay and doubles up to maxDelay
// (each wait is randomly between half and all of it), and starts over once
// a stream works again. Defaults: DefaultReconnectMin, DefaultReconnectMax;
// values of 0 or less keep the default.
func WithReconnectBackoff(minDelay, maxDelay time.Duration) WorkerOption {
	return func(c *workerConfig) { c.minBackoff, c.maxBackoff = minDelay, maxDelay }
}

// Worker runs a Handler over the deliveries of one Consume stream, in the
// spirit of http.Server: see NewWorker and Run.
type Worker struct {
	c       *Client
	queues  []string
	h       Handler
	cfg     workerConfig
	running atomic.Bool
}

// NewWorker returns a Worker that consumes queues (several in strict
// priority order, highest first, as ConsumeQueues; at most 16) through c
// and hands each delivery to h as a Task. Nothing happens until Run.
//
// Per task: on success the delivery is acked, with the handler's result if
// it is not nil (see Delivery.AckResult); on an error matching SkipRetry it
// is dead-lettered at once with the error's text; on any other error, or a
// panic, it is given back to be retried after the retry policy's backoff
// with the error's text (the server dead-letters it once it has used up its
// attempts).
func NewWorker(c *Client, queues []string, h Handler, opts ...WorkerOption) *Worker {
	cfg := workerConfig{}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.concurrency <= 0 {
		cfg.concurrency = DefaultConcurrency
	}
	if cfg.shutdownTimeout <= 0 {
		cfg.shutdownTimeout = DefaultShutdownTimeout
	}
	if cfg.logger == nil {
		cfg.logger = slog.Default()
	}
	if cfg.minBackoff <= 0 {
		cfg.minBackoff = DefaultReconnectMin
	}
	if cfg.maxBackoff <= 0 {
		cfg.maxBackoff = DefaultReconnectMax
	}
	cfg.maxBackoff = max(cfg.maxBackoff, cfg.minBackoff)
	return &Worker{c: c, queues: append([]string(nil), queues...), h: h, cfg: cfg}
}

// Run processes tasks until ctx ends, then shuts down gracefully, and
// returns nil; or it returns the error that ended the Consume stream for
// good.
//
// It opens one Consume stream whose credit window is the concurrency, and
// runs up to that many handlers at once. While a task is held, its lease is
// extended every third of the lease; if the server says the lease is lost,
// the handler's context is cancelled (cause ErrLeaseLost) and its outcome is
// not reported. Handlers get a context that carries ctx's values but not its
// cancellation.
//
// When the stream breaks (UNAVAILABLE when the server restarts or the
// connection is lost, and any other error not listed below), Run reopens it
// with a backoff (see WithReconnectBackoff) and goes on; handlers already
// running go on too and settle their tasks as usual (the server may have
// taken the tasks back when the stream ended: such settlements fail with
// FAILED_PRECONDITION and are logged). A stream that fails with
// INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION
// or UNIMPLEMENTED cannot work on retry: Run cancels running handlers
// (cause ErrWorkerStopped), waits briefly for them, and returns that
// status error unchanged.
//
// Graceful shutdown, when ctx ends: Run stops starting tasks but keeps the
// stream open, so the tasks of running handlers stay leased to it. Tasks
// received but not started are given back to the head of their queue at
// once. Running handlers may finish, for up to the shutdown timeout (see
// WithShutdownTimeout); their acks and nacks are sent together once the
// last one is done, because every settlement would make room for the
// server to send another delivery that could only be given back again.
// Handlers still running at the timeout have their context cancelled
// (cause ErrWorkerStopped). Then Run closes the stream, which puts every
// task it still holds back on its queue at once (at the head; like any
// redelivery this counts as an attempt), waits up to 2s for cancelled
// handlers to return, and returns nil.
//
// Tracing: each handler runs in a span "process <queue>" (kind consumer)
// from OpenTelemetry's global tracer provider, a no-op unless the
// application installed one: the root of a trace of its own (not a child
// of a span in ctx), linked to the producer's span when the message's
// headers carry a W3C traceparent (Enqueue adds one from the caller's
// span, and a tracing qbridged from its own), with the messaging.*
// attributes of the queue, message id and attempt; a handler's error (or
// panic) marks the span as failed. The handler's context carries the
// span, so spans the handler starts are its children.
//
// Run may be called again after it returned, but not concurrently.
func (w *Worker) Run(ctx context.Context) error {
	switch {
	case w.c == nil:
		return status.Error(codes.InvalidArgument, "qbridge: NewWorker was given a nil Client")
	case w.h == nil:
		return status.Error(codes.InvalidArgument, "qbridge: NewWorker was given a nil Handler")
	case len(w.queues) == 0:
		return status.Error(codes.InvalidArgument, "qbridge: NewWorker needs at least one queue")
	}
	if !w.running.CompareAndSwap(false, true) {
		return status.Error(codes.FailedPrecondition, "qbridge: Worker.Run is already running")
	}
	defer w.running.Store(false)
	if ctx.Err() != nil {
		return nil
	}
	r := &run{
		w:          w,
		log:        w.cfg.logger.With("queues", w.queues),
		ctx:        ctx,
		base:       context.WithoutCancel(ctx),
		deliveries: make(chan received),
		ended:      make(chan int),
		fatal:      make(chan error, 1),
		readerDone: make(chan struct{}),
		finished:   make(chan *job),
		settled:    make(chan struct{}),
		exited:     make(chan struct{}),
		stop:       make(chan struct{}),
		drainCh:    make(chan struct{}),
		running:    map[*job]struct{}{},
	}
	return r.main()
}

// run is the state of one Worker.Run.
//
// Goroutines: the main loop (Run's own) owns the task lists and decides;
// the reader owns the Consume stream (reopening it when it breaks) and
// passes deliveries to the main loop; each held task has a keeper
// extending its lease; each started task has a handler goroutine; each
// settlement (ack or nack) has its own goroutine.
type run struct {
	w    *Worker
	log  *slog.Logger
	ctx  context.Context // Run's: its end starts the shutdown
	base context.Context // Run's values without its cancellation

	deliveries chan received // reader -> main loop
	ended      chan int      // reader -> main loop: stream number n broke
	fatal      chan error    // reader -> main loop: the stream failed for good
	readerDone chan struct{} // closed when the reader returns
	finished   chan *job     // handler -> main loop
	settled    chan struct{} // settlement -> main loop
	exited     chan struct{} // closed when the main loop returns

	streamMu     sync.Mutex
	streamClosed bool               // no stream may be opened any more
	cancelStream context.CancelFunc // ends the current stream
	stop         chan struct{}      // closed with streamClosed
	drainCh      chan struct{}      // closed when the shutdown begins

	bg sync.WaitGroup // keepers and settlements

	// Owned by the main loop.
	draining bool
	pending  []*job            // received, not started
	running  map[*job]struct{} // handlers started, not returned
	deferred []*job            // finished while draining, not settled yet
	settling int               // settlement goroutines not done
}

// received is a delivery from the reader, with the number of the stream
// it came on.
type received struct {
	d      *Delivery
	stream int
}

// job is one held delivery.
type job struct {
	d        *Delivery
	stream   int             // the number of the stream it came on
	ctx      context.Context // the handler's
	cancel   context.CancelCauseFunc
	stopKeep context.CancelFunc // ends the keeper
	deadline atomic.Int64       // the lease deadline, in Unix nanoseconds

	lost      atomic.Bool // the server said the lease is gone
	abandoned atomic.Bool // the worker stopped without it; do not settle

	// Set by the handler goroutine before it reports to the main loop.
	result []byte
	err    error
}

func (j *job) leaseDeadline() time.Time { return time.Unix(0, j.deadline.Load()) }

// release frees what the job holds (its keeper and contexts).
func (j *job) release() {
	j.stopKeep()
	j.cancel(context.Canceled)
}

// logAttrs describes a delivery in log records.
func logAttrs(d *Delivery, more ...any) []any {
	return append([]any{"queue", d.Queue, "id", d.ID, "task_type", d.TaskType, "attempt", d.Attempt}, more...)
}

// main is the main loop.
func (r *run) main() error {
	defer close(r.exited)
	go r.read()

	var (
		ctxDone    = r.ctx.Done()
		readerDone = r.readerDone
		shutdown   *time.Timer
		deadline   <-chan time.Time // the shutdown timeout
		grace      <-chan time.Time // waiting for abandoned handlers
		flushed    bool             // deferred settlements sent
		closed     bool             // the stream is closed
		fatalErr   error
	)
	defer func() {
		if shutdown != nil {
			shutdown.Stop()
		}
	}()
loop:
	for {
		if r.draining {
			if !flushed && r.active() == 0 {
				r.flush()
				flushed = true
			}
			if flushed && !closed && r.settling == 0 {
				r.closeStream()
				closed = true
				t := time.NewTimer(abandonGrace)
				defer t.Stop()
				grace = t.C
			}
			if closed && readerDone == nil && len(r.running) == 0 {
				break loop
			}
		}
		select {
		case rd := <-r.deliveries:
			if r.draining {
				// Not started, nor given back: that would make room for
				// another delivery. The end of the stream requeues it.
				r.log.Debug("delivery received while stopping; the end of the stream gives it back", logAttrs(rd.d)...)
				continue
			}
			r.accept(rd)
			r.dispatch()
		case n := <-r.ended:
			r.dropPending(n)
		case <-ctxDone:
			ctxDone = nil
			r.log.Info("worker stopping", "running", len(r.running), "not_started", len(r.pending),
				"timeout", r.w.cfg.shutdownTimeout)
			r.startDraining()
			r.requeuePending()
			shutdown = time.NewTimer(r.w.cfg.shutdownTimeout)
			deadline = shutdown.C
		case <-deadline:
			deadline = nil
			r.abandon("the shutdown timeout passed")
		case err := <-r.fatal:
			fatalErr = err
			ctxDone, deadline = nil, nil
			r.startDraining()
			r.log.Error("the Consume stream failed; the worker stops", "err", err)
			// The stream is over: the server took back every task it
			// held, so there is nothing left to settle.
			for _, j := range r.pending {
				j.release()
			}
			for _, j := range r.deferred {
				j.release()
			}
			r.pending, r.deferred = nil, nil
			r.abandon("the Consume stream failed")
		case j := <-r.finished:
			delete(r.running, j)
			r.finish(j)
			r.dispatch()
		case <-r.settled:
			r.settling--
		case <-readerDone:
			readerDone = nil
		case <-grace:
			r.log.Warn("handlers did not return in time after their context was cancelled; leaving them behind",
				"count", len(r.running), "grace", abandonGrace)
			break loop
		}
	}
	r.closeStream() // in case a fatal error came while no stream was open
	r.bg.Wait()
	if fatalErr == nil {
		r.log.Info("worker stopped")
	}
	return fatalErr
}

// startDraining stops starting tasks, and the reader from reopening a
// broken stream (it would only take tasks to give them back).
func (r *run) startDraining() {
	if !r.draining {
		r.draining = true
		close(r.drainCh)
	}
}

// active counts the handlers running that were not abandoned.
func (r *run) active() int {
	n := 0
	for j := range r.running {
		if !j.abandoned.Load() {
			n++
		}
	}
	return n
}

// accept takes a new delivery: it is pending, and its lease kept.
func (r *run) accept(rd received) {
	d := rd.d
	hctx, cancel := context.WithCancelCause(r.base)
	kctx, stopKeep := context.WithCancel(r.base)
	j := &job{d: d, stream: rd.stream, ctx: hctx, cancel: cancel, stopKeep: stopKeep}
	j.deadline.Store(d.LeaseDeadline.UnixNano())
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		r.keep(kctx, j)
	}()
	r.pending = append(r.pending, j)
}

// dropPending forgets the tasks not started that came on the broken stream
// number n. The server took them back when the stream ended (or will when
// their lease runs out, if it could not): starting them could only run
// them twice.
func (r *run) dropPending(n int) {
	kept := r.pending[:0]
	for _, j := range r.pending {
		if j.stream == n {
			r.log.Debug("dropping a task not started: its stream broke", logAttrs(j.d)...)
			j.release()
			continue
		}
		kept = append(kept, j)
	}
	clear(r.pending[len(kept):])
	r.pending = kept
}

// dispatch starts pending tasks while there is room.
func (r *run) dispatch() {
	for !r.draining && len(r.running) < r.w.cfg.concurrency && len(r.pending) > 0 {
		j := r.pending[0]
		r.pending[0] = nil
		r.pending = r.pending[1:]
		if j.lost.Load() {
			j.release() // redelivered by now; reported by the keeper
			continue
		}
		r.running[j] = struct{}{}
		go r.process(j)
	}
}

// process runs the handler of j and reports to the main loop.
func (r *run) process(j *job) {
	j.result, j.err = r.call(j)
	select {
	case r.finished <- j:
	case <-r.exited: // abandoned, and Run has returned
		j.release()
	}
}

// call runs the handler in its span (see startProcessSpan), turning a
// panic into an error.
func (r *run) call(j *job) (result []byte, err error) {
	ctx, span := startProcessSpan(j.ctx, j.d)
	defer func() { endProcessSpan(span, err) }() // runs after the recover below
	defer func() {
		if p := recover(); p != nil {
			r.log.Error("handler panicked; the task will be retried",
				logAttrs(j.d, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))...)
			result, err = nil, fmt.Errorf("panic: %v", p)
		}
	}()
	return r.w.h.ProcessTask(ctx, newTask(j.d))
}

// finish handles a task whose handler returned.
func (r *run) finish(j *job) {
	switch {
	case j.abandoned.Load():
		j.release() // the end of the stream gives it back
	case j.lost.Load():
		r.log.Warn("the task's lease was lost while its handler ran; its outcome is dropped (it is delivered again)",
			logAttrs(j.d, "handler_err", j.err)...)
		j.release()
	case r.draining:
		r.deferred = append(r.deferred, j) // its lease is still kept
	default:
		r.startSettle(j)
	}
}

// flush settles the tasks that finished while draining.
func (r *run) flush() {
	for _, j := range r.deferred {
		if j.lost.Load() {
			r.log.Warn("the task's lease was lost before its outcome was reported; it is delivered again", logAttrs(j.d)...)
			j.release()
			continue
		}
		r.startSettle(j)
	}
	r.deferred = nil
}

// abandon cancels the running handlers: their outcome will not be
// reported, their tasks go back with the end of the stream.
func (r *run) abandon(why string) {
	for j := range r.running {
		if j.abandoned.Swap(true) {
			continue
		}
		r.log.Warn("cancelling a running handler: "+why+"; the task goes back to the queue", logAttrs(j.d)...)
		j.stopKeep()
		j.cancel(ErrWorkerStopped)
	}
}

// requeuePending gives the tasks received but not started back to the head
// of their queues, at once.
func (r *run) requeuePending() {
	if len(r.pending) == 0 {
		return
	}
	jobs := r.pending
	r.pending = nil
	r.settling++
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		defer r.notifySettled()
		tokens := make([]string, 0, len(jobs))
		for _, j := range jobs {
			j.stopKeep()
			if !j.lost.Load() {
				tokens = append(tokens, j.d.AckToken)
			}
		}
		for len(tokens) > 0 {
			n := min(len(tokens), 1000) // the server's limit per call
			ctx, cancel := context.WithTimeout(r.base, rpcTimeout)
			_, err := r.w.c.rpc.Nack(ctx, &qbridgev1.NackRequest{
				AckTokens: tokens[:n],
				Action:    qbridgev1.NackAction_NACK_ACTION_REQUEUE,
			})
			cancel()
			if err != nil {
				r.log.Warn("cannot give back the tasks not started; the end of the stream will", "count", n, "err", err)
			}
			tokens = tokens[n:]
		}
		for _, j := range jobs {
			j.release()
		}
	}()
}

// startSettle acks or nacks j in the background.
func (r *run) startSettle(j *job) {
	r.settling++
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		defer r.notifySettled()
		r.settle(j)
		j.release()
	}()
}

func (r *run) notifySettled() {
	select {
	case r.settled <- struct{}{}:
	case <-r.exited:
	}
}

// settle reports the outcome of j's handler to the server.
func (r *run) settle(j *job) {
	d := j.d
	var (
		what string
		do   func(context.Context) error
	)
	switch {
	case j.err == nil && j.result != nil:
		what, do = "ack", func(ctx context.Context) error { return d.AckResult(ctx, j.result) }
	case j.err == nil:
		what, do = "ack", d.Ack
	case errors.Is(j.err, SkipRetry):
		what, do = "dead-letter", func(ctx context.Context) error { return d.DeadLetter(ctx, j.err) }
		r.log.Error("task failed; not retrying it (dead letter)", logAttrs(d, "err", j.err)...)
	default:
		what, do = "retry", func(ctx context.Context) error { return d.Retry(ctx, j.err) }
		r.log.Warn("task failed; it will be retried", logAttrs(d, "err", j.err)...)
	}
	err := r.try(j, do)
	if err != nil && what == "ack" && j.result != nil && status.Code(err) == codes.InvalidArgument {
		// The server refused the result (too big?): the task would fail
		// the same way however often it ran.
		refused := fmt.Errorf("the server refused the task's result: %s", status.Convert(err).Message())
		r.log.Error("cannot store the task's result; dead-lettering it", logAttrs(d, "err", err)...)
		what = "dead-letter"
		err = r.try(j, func(ctx context.Context) error { return d.DeadLetter(ctx, refused) })
	}
	switch {
	case err == nil:
		r.log.Debug("task settled", logAttrs(d, "outcome", what)...)
	case status.Code(err) == codes.FailedPrecondition:
		r.log.Warn("cannot "+what+" the task: its lease was lost (it is, or will be, delivered again)", logAttrs(d, "err", err)...)
	default:
		r.log.Error("cannot "+what+" the task; it will be delivered again once its lease runs out", logAttrs(d, "err", err)...)
	}
}

// try calls do, again while it fails with UNAVAILABLE (the server may be
// restarting) and the lease may still be valid.
func (r *run) try(j *job, do func(context.Context) error) error {
	start := time.Now()
	backoff := r.w.cfg.minBackoff
	for {
		ctx, cancel := context.WithTimeout(r.base, rpcTimeout)
		err := do(ctx)
		cancel()
		if err == nil || status.Code(err) != codes.Unavailable || j.abandoned.Load() {
			return err
		}
		wait := jitter(backoff)
		if time.Now().Add(wait).After(j.leaseDeadline()) || time.Since(start)+wait > settleRetryLimit {
			return err
		}
		time.Sleep(wait)
		backoff = min(2*backoff, r.w.cfg.maxBackoff)
	}
}

// keep extends j's lease every third of the lease until ctx ends. When the
// server says the lease is gone, it marks j lost and cancels its handler.
func (r *run) keep(ctx context.Context, j *job) {
	lease := r.w.cfg.lease
	interval := func() time.Duration {
		l := lease
		if l <= 0 {
			// The server's default: infer it from the deadline it gave.
			l = time.Until(j.leaseDeadline())
			if l < minLease || l > 12*time.Hour {
				l = min(inferredLeaseFallback, max(l, minLease))
			}
		}
		return l / 3
	}
	t := time.NewTimer(interval())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		actx, cancel := context.WithTimeout(ctx, rpcTimeout)
		dl, err := j.d.ExtendLease(actx, lease)
		cancel()
		switch {
		case err == nil:
			j.deadline.Store(dl.UnixNano())
			t.Reset(interval())
		case ctx.Err() != nil:
			return
		case status.Code(err) == codes.FailedPrecondition:
			j.lost.Store(true)
			j.cancel(ErrLeaseLost)
			r.log.Warn("the task's lease was lost (it is delivered again); cancelling its handler if it runs",
				logAttrs(j.d, "err", err)...)
			return
		default:
			retry := min(time.Second, interval())
			r.log.Warn("cannot extend the task's lease; retrying", logAttrs(j.d, "err", err, "retry_in", retry)...)
			t.Reset(retry)
		}
	}
}

// read runs the Consume stream, reopening it when it breaks, until the
// stream is closed or fails for good.
func (r *run) read() {
	defer close(r.readerDone)
	backoff := r.w.cfg.minBackoff
	for attempt := 0; ; attempt++ {
		if attempt > 0 && r.isDraining() {
			<-r.stop // the main loop closes the stream once it is done
			return
		}
		cs, cancel, err := r.openStream()
		if cs == nil && err == nil {
			return // closed
		}
		opened := time.Now()
		got := false
		if err == nil {
			for {
				var d *Delivery
				d, err = cs.Next()
				if err != nil {
					break
				}
				if !got && attempt > 0 {
					r.log.Info("the Consume stream works again")
				}
				got = true
				select {
				case r.deliveries <- received{d: d, stream: attempt}:
				case <-r.exited:
					cancel()
					return
				}
			}
		}
		cancel()
		if r.stopped() {
			return
		}
		if permanent(err) {
			r.fatal <- err
			return
		}
		if got {
			select {
			case r.ended <- attempt:
			case <-r.exited:
				return
			}
		}
		if r.isDraining() {
			r.log.Warn("the Consume stream broke while the worker stops", "err", err)
			<-r.stop // the main loop closes the stream once it is done
			return
		}
		if got || time.Since(opened) >= healthyStream {
			backoff = r.w.cfg.minBackoff
		}
		wait := jitter(backoff)
		r.log.Warn("the Consume stream broke; reopening it", "err", err, "retry_in", wait)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-r.stop:
			t.Stop()
			return
		case <-r.drainCh:
			t.Stop()
			<-r.stop
			return
		}
		backoff = min(2*backoff, r.w.cfg.maxBackoff)
	}
}

// openStream opens a Consume stream, unless the stream was closed for good
// (nil, nil, nil). cancel ends the stream.
func (r *run) openStream() (cs *Consumer, cancel context.CancelFunc, err error) {
	r.streamMu.Lock()
	if r.streamClosed {
		r.streamMu.Unlock()
		return nil, nil, nil
	}
	ctx, cancel := context.WithCancel(r.base)
	r.cancelStream = cancel
	r.streamMu.Unlock()

	opts := []ConsumeOption{WithMaxInFlight(r.w.cfg.concurrency), WithLease(r.w.cfg.lease)}
	if len(r.w.queues) == 1 {
		cs, err = r.w.c.Consume(ctx, r.w.queues[0], opts...)
	} else {
		cs, err = r.w.c.ConsumeQueues(ctx, r.w.queues, opts...)
	}
	return cs, cancel, err
}

// closeStream ends the current stream and keeps new ones from opening.
func (r *run) closeStream() {
	r.streamMu.Lock()
	defer r.streamMu.Unlock()
	if r.streamClosed {
		return
	}
	r.streamClosed = true
	if r.cancelStream != nil {
		r.cancelStream()
	}
	close(r.stop)
}

func (r *run) isDraining() bool {
	select {
	case <-r.drainCh:
		return true
	default:
		return false
	}
}

func (r *run) stopped() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

// permanent reports whether a Consume stream that failed with err would
// fail the same way if reopened.
func permanent(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.PermissionDenied, codes.Unauthenticated,
		codes.FailedPrecondition, codes.Unimplemented:
		return true
	}
	return false
}

// jitter returns a random duration between d/2 and d.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}
