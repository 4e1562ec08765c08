package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// logCapture keeps what a Worker logs and shows it in the test's log until
// the test is over.
type logCapture struct {
	mu   sync.Mutex
	t    *testing.T
	buf  bytes.Buffer
	done bool
}

func (l *logCapture) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	if !l.done {
		l.t.Log("worker: " + strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (l *logCapture) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// waitLogged polls until the log contains s.
func (l *logCapture) waitLogged(t *testing.T, s string) {
	t.Helper()
	eventually(t, func() (bool, string) {
		return strings.Contains(l.String(), s), fmt.Sprintf("the worker to log %q", s)
	})
}

// workerLogger returns a debug-level logger for a Worker, and what it
// logged. Register it before starting the Worker (cleanups run in reverse).
func workerLogger(t *testing.T) (*slog.Logger, *logCapture) {
	l := &logCapture{t: t}
	t.Cleanup(func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.done = true
	})
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug})), l
}

// startWorker runs w until the returned stop is called (or the test ends);
// stop cancels Run's context and returns what Run returned.
func startWorker(t *testing.T, ctx context.Context, w *client.Worker) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { errc <- w.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			runErr, _ = within(t, "Worker.Run to return", func() (error, error) { return <-errc, nil })
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Worker.Run: %v", err)
		}
	})
	return stop
}

// newWorker makes a Worker that logs to the test.
func newWorker(t *testing.T, c *client.Client, queues []string, h client.Handler, opts ...client.WorkerOption) *client.Worker {
	l, _ := workerLogger(t)
	return client.NewWorker(c, queues, h, append([]client.WorkerOption{client.WithWorkerLogger(l)}, opts...)...)
}

// result waits for the outcome of message id, failing the test if there is
// none within waitTimeout.
func result(t *testing.T, ctx context.Context, c *client.Client, queue, id string) *client.Result {
	t.Helper()
	res, err := c.GetResult(ctx, queue, id, waitTimeout)
	if err != nil {
		t.Fatalf("GetResult(%q, %q, wait %v): %v", queue, id, waitTimeout, err)
	}
	return res
}

// wantResult asserts an outcome.
func wantResult(t *testing.T, res *client.Result, id string, state client.ResultState, payload, errText string, attempts int) {
	t.Helper()
	if res.ID != id || res.State != state || string(res.Payload) != payload || res.Error != errText || res.Attempts != attempts {
		t.Fatalf("result = {ID %q State %v Payload %q Error %q Attempts %d}; want {%q %v %q %q %d}",
			res.ID, res.State, res.Payload, res.Error, res.Attempts, id, state, payload, errText, attempts)
	}
	if res.FinishTime.IsZero() || time.Since(res.FinishTime) > time.Minute || time.Until(res.FinishTime) > time.Second {
		t.Errorf("FinishTime = %v; want about now", res.FinishTime)
	}
}

// setRetryPolicy sets the queue's retry policy through Admin.
func setRetryPolicy(t *testing.T, ctx context.Context, c *client.Client, queue string, maxAttempts int, minBackoff, maxBackoff time.Duration) {
	t.Helper()
	_, err := c.Admin().UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{
		Queue: queue,
		Config: &qbridgev1.QueueConfig{RetryPolicy: &qbridgev1.RetryPolicy{
			MaxAttempts: uint32(maxAttempts),
			MinBackoff:  durationpb.New(minBackoff),
			MaxBackoff:  durationpb.New(maxBackoff),
		}},
	})
	if err != nil {
		t.Fatalf("UpdateQueueConfig(%q): %v", queue, err)
	}
}

// runs counts handler executions per message id.
type runs struct {
	mu sync.Mutex
	n  map[string]int
}

func (r *runs) add(id string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == nil {
		r.n = map[string]int{}
	}
	r.n[id]++
	return r.n[id]
}

func (r *runs) get(id string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[id]
}

func TestWorkerDispatchesByTaskType(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "tasks"

	var mu sync.Mutex
	seen := map[string]client.Task{}
	handler := func(name string) client.HandlerFunc {
		return func(_ context.Context, task *client.Task) ([]byte, error) {
			mu.Lock()
			seen[task.ID] = *task
			mu.Unlock()
			return []byte(name + ":" + string(task.Payload)), nil
		}
	}
	mux := client.NewServeMux()
	mux.Handle("email", handler("email"))
	mux.HandleFunc("sms", handler("sms"))
	mux.HandleFallback(handler("fallback"))
	if h, ok := mux.Handler("fax"); !ok || h == nil {
		t.Errorf("Handler(fax) = %v, %v; want the fallback", h, ok)
	}
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, mux))

	headers := map[string]string{"trace": "t-1"}
	before := time.Now().Truncate(time.Millisecond)
	cases := []struct{ taskType, payload, want string }{
		{"email", "a", "email:a"},
		{"sms", "b", "sms:b"},
		{"fax", "c", "fallback:c"}, // no handler: the fallback
		{"", "d", "fallback:d"},    // no task type: the fallback
	}
	ids := make([]string, len(cases))
	for i, tc := range cases {
		ids[i] = enqueue(t, ctx, e.c, q, tc.payload, client.WithTaskType(tc.taskType), client.WithKeepResult(), client.WithHeaders(headers))
	}
	for i, tc := range cases {
		wantResult(t, result(t, ctx, e.c, q, ids[i]), ids[i], client.ResultSucceeded, tc.want, "", 1)
		mu.Lock()
		task := seen[ids[i]]
		mu.Unlock()
		if task.ID != ids[i] || task.Queue != q || task.Type != tc.taskType || string(task.Payload) != tc.payload ||
			task.Headers["trace"] != "t-1" || task.Attempt != 1 || task.LastError != "" ||
			task.EnqueueTime.Before(before) || time.Since(task.EnqueueTime) > time.Minute {
			t.Errorf("task %d = %+v; want {ID %q Queue %q Type %q Payload %q Headers %v Attempt 1, enqueued just now}",
				i, task, ids[i], q, tc.taskType, tc.payload, headers)
		}
	}

	// Call: a request/reply round trip through the same worker.
	res, err := e.c.Call(ctx, q, "sms", []byte("hello"))
	if err != nil {
		t.Fatalf("Call: %v", err)
	}
	if res.State != client.ResultSucceeded || string(res.Payload) != "sms:hello" || res.Attempts != 1 {
		t.Fatalf("Call = %+v; want succeeded with sms:hello", res)
	}

	// The per-task-type counters saw the types (the untyped message is
	// only in the totals).
	st := waitFor(t, ctx, e.c, q, "5 acked", func(st *client.QueueStats) bool { return st.Counters.Acked == 5 })
	if st.Dead != 0 || st.Ready != 0 || st.InFlight != 0 || st.Counters.Enqueued != 5 {
		t.Errorf("Stats = %+v; want everything acked", *st)
	}
	want := map[string]*qbridgev1.QueueCounters{
		"email": {Enqueued: 1, Acked: 1},
		"sms":   {Enqueued: 2, Acked: 2},
		"fax":   {Enqueued: 1, Acked: 1},
	}
	raw, err := e.c.Raw().GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil {
		t.Fatalf("GetQueueStats: %v", err)
	}
	if !maps.EqualFunc(raw.GetTaskTypes(), want, func(a, b *qbridgev1.QueueCounters) bool { return proto.Equal(a, b) }) {
		t.Errorf("GetQueueStats.task_types = %v; want %v", raw.GetTaskTypes(), want)
	}
}

func TestWorkerUnknownTaskTypeIsDeadLettered(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "unknown-types"
	var calls atomic.Int32
	mux := client.NewServeMux()
	mux.HandleFunc("known", func(context.Context, *client.Task) ([]byte, error) {
		calls.Add(1)
		return nil, nil
	})
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, mux))

	mystery := enqueue(t, ctx, e.c, q, "?", client.WithTaskType("mystery"), client.WithKeepResult())
	untyped := enqueue(t, ctx, e.c, q, "?", client.WithKeepResult())
	known := enqueue(t, ctx, e.c, q, "!", client.WithTaskType("known"), client.WithKeepResult())

	wantResult(t, result(t, ctx, e.c, q, mystery), mystery, client.ResultDead, "", `no handler for task type "mystery"`, 1)
	wantResult(t, result(t, ctx, e.c, q, untyped), untyped, client.ResultDead, "", `no handler for task type ""`, 1)
	wantResult(t, result(t, ctx, e.c, q, known), known, client.ResultSucceeded, "", "", 1)
	if n := calls.Load(); n != 1 {
		t.Errorf("the known handler ran %d times; want 1", n)
	}

	info, err := e.c.GetMessage(ctx, q, mystery)
	if err != nil {
		t.Fatalf("GetMessage: %v", err)
	}
	if info.ID != mystery || info.State != client.MessageDead || info.TaskType != "mystery" ||
		info.LastError != `no handler for task type "mystery"` || info.Deliveries != 1 {
		t.Errorf("GetMessage = %+v; want the dead letter, 1 delivery, with the error", *info)
	}
	if st := stats(t, ctx, e.c, q); st.Dead != 2 || st.Counters.DeadLettered != 2 {
		t.Errorf("Stats = %+v; want 2 dead letters", *st)
	}
}

func TestWorkerRetriesThenSucceeds(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "flaky"
	setRetryPolicy(t, ctx, e.c, q, 5, 5*time.Millisecond, 10*time.Millisecond)

	var mu sync.Mutex
	var attempts []int
	var lastErrors []string
	h := client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		mu.Lock()
		attempts = append(attempts, task.Attempt)
		lastErrors = append(lastErrors, task.LastError)
		mu.Unlock()
		if string(task.Payload) == "always" || task.Attempt < 3 {
			return nil, fmt.Errorf("boom %d", task.Attempt)
		}
		return []byte("ok"), nil
	})
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, h))

	id := enqueue(t, ctx, e.c, q, "twice", client.WithKeepResult())
	wantResult(t, result(t, ctx, e.c, q, id), id, client.ResultSucceeded, "ok", "", 3)
	mu.Lock()
	gotAttempts, gotErrors := slices.Clone(attempts), slices.Clone(lastErrors)
	attempts, lastErrors = nil, nil
	mu.Unlock()
	if !slices.Equal(gotAttempts, []int{1, 2, 3}) || !slices.Equal(gotErrors, []string{"", "boom 1", "boom 2"}) {
		t.Errorf("attempts %v with LastError %q; want [1 2 3] with [\"\" \"boom 1\" \"boom 2\"]", gotAttempts, gotErrors)
	}

	// One that never succeeds dies after its policy's attempts, with the
	// last error.
	id = enqueue(t, ctx, e.c, q, "always", client.WithKeepResult(), client.WithRetryPolicy(client.RetryPolicy{MaxAttempts: 3}))
	wantResult(t, result(t, ctx, e.c, q, id), id, client.ResultDead, "", "boom 3", 3)
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(attempts, []int{1, 2, 3}) {
		t.Errorf("attempts %v; want [1 2 3]", attempts)
	}
}

func TestWorkerSkipRetry(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "skip"
	setRetryPolicy(t, ctx, e.c, q, 5, 5*time.Millisecond, 10*time.Millisecond)
	var count runs
	h := client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		return nil, fmt.Errorf("invalid payload %q: %w", task.Payload, client.SkipRetry)
	})
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, h))

	id := enqueue(t, ctx, e.c, q, "garbage", client.WithKeepResult())
	wantResult(t, result(t, ctx, e.c, q, id), id, client.ResultDead, "", `invalid payload "garbage": skip retry`, 1)
	if n := count.get(id); n != 1 {
		t.Errorf("handler ran %d times; want 1", n)
	}
	dead := peek(t, ctx, e.c, q, qbridgev1.MessageState_MESSAGE_STATE_DEAD)
	if len(dead) != 1 || dead[0].GetId() != id || dead[0].GetLastError() != `invalid payload "garbage": skip retry` {
		t.Errorf("dead letters = %v; want %q with the error", dead, id)
	}

	// Call reports the death as a *TaskError, with the outcome.
	res, err := e.c.Call(ctx, q, "", []byte("junk"))
	var te *client.TaskError
	if !errors.As(err, &te) || te.Result != res || res.State != client.ResultDead ||
		res.Error != `invalid payload "junk": skip retry` || !strings.Contains(err.Error(), "skip retry") {
		t.Fatalf("Call of a failing task = %+v, %v; want the dead result and a *TaskError", res, err)
	}
}

func TestWorkerRecoversPanics(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "panicky"
	setRetryPolicy(t, ctx, e.c, q, 5, 5*time.Millisecond, 10*time.Millisecond)
	var mu sync.Mutex
	var lastErrors []string
	h := client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		mu.Lock()
		lastErrors = append(lastErrors, task.LastError)
		mu.Unlock()
		if task.Attempt == 1 {
			panic("kaboom " + string(task.Payload))
		}
		return []byte("survived"), nil
	})
	logger, logs := workerLogger(t)
	startWorker(t, ctx, client.NewWorker(e.c, []string{q}, h, client.WithWorkerLogger(logger), client.WithConcurrency(1)))

	for i := range 2 { // the worker keeps going after a panic
		id := enqueue(t, ctx, e.c, q, fmt.Sprint(i), client.WithKeepResult())
		wantResult(t, result(t, ctx, e.c, q, id), id, client.ResultSucceeded, "survived", "", 2)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"", "panic: kaboom 0", "", "panic: kaboom 1"}; !slices.Equal(lastErrors, want) {
		t.Errorf("LastError per attempt = %q; want %q", lastErrors, want)
	}
	out := logs.String()
	for _, want := range []string{"handler panicked", "kaboom 0", "worker_test.go", "runtime/debug.Stack"} {
		if !strings.Contains(out, want) {
			t.Errorf("the worker's log does not contain %q (want the panic and its stack)", want)
		}
	}
}

func TestWorkerExtendsLeases(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "slow"
	const work = 3 * time.Second // three leases
	var count runs
	var cancelled atomic.Bool
	h := client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		select {
		case <-time.After(work): // the work itself, not synchronisation
			return []byte("done"), nil
		case <-ctx.Done():
			cancelled.Store(true)
			return nil, context.Cause(ctx)
		}
	})
	// Two workers compete for the queue: whichever gets the task, the
	// other must not get it while the first works on it.
	for range 2 {
		startWorker(t, ctx, newWorker(t, e.c, []string{q}, h, client.WithWorkerLease(time.Second), client.WithConcurrency(2)))
	}
	start := time.Now()
	id := enqueue(t, ctx, e.c, q, "x", client.WithKeepResult())
	wantResult(t, result(t, ctx, e.c, q, id), id, client.ResultSucceeded, "done", "", 1)
	if took := time.Since(start); took < work {
		t.Fatalf("finished after %v; the handler takes %v", took, work)
	}
	if n := count.get(id); n != 1 || cancelled.Load() {
		t.Errorf("handler ran %d times (cancelled: %v); want once, not cancelled", n, cancelled.Load())
	}
	st := stats(t, ctx, e.c, q)
	if st.Counters.LeaseExpired != 0 || st.Counters.Acked != 1 || st.Counters.Nacked != 0 {
		t.Errorf("counters = %+v; want 1 ack and no lease expiry", st.Counters)
	}
}

func TestWorkerGracefulShutdown(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "shutdown"
	const n, conc = 6, 3

	var count runs
	started := make(chan *client.Task, 2*n)
	release := make(chan struct{})
	var cancelled atomic.Int32
	slow := client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		started <- task
		select {
		case <-release:
			return []byte("slow"), nil
		case <-ctx.Done():
			cancelled.Add(1)
			return nil, context.Cause(ctx)
		}
	})
	var ids []string
	for i := range n {
		ids = append(ids, enqueue(t, ctx, e.c, q, fmt.Sprint(i), client.WithKeepResult()))
	}

	logger, logs := workerLogger(t)
	stop1 := startWorker(t, ctx, client.NewWorker(e.c, []string{q}, slow,
		client.WithWorkerLogger(logger), client.WithConcurrency(conc), client.WithShutdownTimeout(time.Minute)))
	first := map[string]bool{}
	for range conc {
		task, _ := within(t, "a handler to start", func() (*client.Task, error) { return <-started, nil })
		first[task.ID] = true
	}
	// The credit is the concurrency: nothing more was taken.
	wantStats(t, ctx, e.c, q, n-conc, conc)

	// Stop: Run waits for the running handlers (not for the timeout).
	stopped := make(chan error, 1)
	go func() { stopped <- stop1() }()
	logs.waitLogged(t, "worker stopping")
	close(release)
	if err, _ := within(t, "Run to return", func() (error, error) { return <-stopped, nil }); err != nil {
		t.Fatalf("Run after a clean shutdown = %v; want nil", err)
	}
	if len(started) != 0 || cancelled.Load() != 0 {
		t.Fatalf("after the stop, %d more handlers started and %d were cancelled; want none", len(started), cancelled.Load())
	}
	// The running handlers' acks were sent before Run returned.
	for id := range first {
		res, err := e.c.GetResult(ctx, q, id, 0)
		if err != nil {
			t.Fatalf("GetResult(%q) right after Run returned: %v", id, err)
		}
		wantResult(t, res, id, client.ResultSucceeded, "slow", "", 1)
	}
	waitStats(t, ctx, e.c, q, n-conc, 0)

	// A later worker processes the rest, each once.
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		return []byte("later"), nil
	})))
	for _, id := range ids {
		res := result(t, ctx, e.c, q, id)
		want := "later"
		if first[id] {
			want = "slow"
		}
		if res.State != client.ResultSucceeded || string(res.Payload) != want || res.Attempts > 2 {
			t.Errorf("result of %s = %+v; want succeeded with %q", id, *res, want)
		}
		if c := count.get(id); c != 1 {
			t.Errorf("message %s ran %d times; want exactly once", id, c)
		}
	}
}

func TestWorkerShutdownTimeout(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "stubborn"
	const n, conc = 4, 2

	var count runs
	started := make(chan string, n)
	causes := make(chan error, n)
	stubborn := client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		started <- task.ID
		<-ctx.Done() // never finishes by itself
		causes <- context.Cause(ctx)
		return nil, ctx.Err()
	})
	var ids []string
	for i := range n {
		ids = append(ids, enqueue(t, ctx, e.c, q, fmt.Sprint(i), client.WithKeepResult()))
	}
	stop1 := startWorker(t, ctx, newWorker(t, e.c, []string{q}, stubborn,
		client.WithConcurrency(conc), client.WithShutdownTimeout(200*time.Millisecond)))
	abandoned := map[string]bool{}
	for range conc {
		id, _ := within(t, "a handler to start", func() (string, error) { return <-started, nil })
		abandoned[id] = true
	}
	if err := stop1(); err != nil {
		t.Fatalf("Run = %v; want nil", err)
	}
	for range conc {
		if cause := <-causes; !errors.Is(cause, client.ErrWorkerStopped) {
			t.Errorf("context.Cause of a handler cancelled at the shutdown timeout = %v; want ErrWorkerStopped", cause)
		}
	}
	// Everything is back in the queue (the abandoned tasks by the end of
	// the stream), nothing was settled.
	waitStats(t, ctx, e.c, q, n, 0)
	if st := stats(t, ctx, e.c, q); st.Counters.Acked != 0 || st.Counters.Nacked != 0 {
		t.Fatalf("counters = %+v; want no ack or nack", st.Counters)
	}

	startWorker(t, ctx, newWorker(t, e.c, []string{q}, client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		return []byte("done"), nil
	})))
	for _, id := range ids {
		res := result(t, ctx, e.c, q, id)
		wantRuns, wantAttempts := 1, 1
		if abandoned[id] {
			wantRuns, wantAttempts = 2, 2
		}
		if res.State != client.ResultSucceeded || res.Attempts != wantAttempts || count.get(id) != wantRuns {
			t.Errorf("message %s: %+v after %d runs; want succeeded at attempt %d after %d runs",
				id, *res, count.get(id), wantAttempts, wantRuns)
		}
	}
}

func TestWorkerConcurrencyLimit(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "limited"
	const n, conc = 20, 3

	var current, peak atomic.Int32
	started := make(chan struct{}, n)
	release := make(chan struct{})
	h := client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
		c := current.Add(1)
		defer current.Add(-1)
		for {
			p := peak.Load()
			if c <= p || peak.CompareAndSwap(p, c) {
				break
			}
		}
		started <- struct{}{}
		<-release
		return nil, nil
	})
	msgs := make([]client.Message, n)
	for i := range msgs {
		msgs[i] = client.Message{Payload: []byte(fmt.Sprint(i))}
	}
	if _, err := e.c.EnqueueBatch(ctx, q, msgs); err != nil {
		t.Fatalf("EnqueueBatch: %v", err)
	}
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, h, client.WithConcurrency(conc)))
	for range conc {
		within(t, "a handler to start", func() (struct{}, error) { return <-started, nil })
	}
	// conc handlers run, and the stream holds just as many.
	wantStats(t, ctx, e.c, q, n-conc, conc)
	if c := current.Load(); c != conc {
		t.Fatalf("%d handlers running; want %d", c, conc)
	}
	close(release)
	waitFor(t, ctx, e.c, q, "all acked", func(st *client.QueueStats) bool {
		return st.Counters.Acked == n && st.Ready == 0 && st.InFlight == 0
	})
	if p := peak.Load(); p != conc {
		t.Errorf("at most %d handlers ran at once; want %d", p, conc)
	}
}

func TestServeMuxMiddlewareOrder(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "middleware"

	var mu sync.Mutex
	var trace []string
	log := func(s string) {
		mu.Lock()
		trace = append(trace, s)
		mu.Unlock()
	}
	mw := func(name string) func(client.Handler) client.Handler {
		return func(next client.Handler) client.Handler {
			return client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
				log(name + ">" + task.Type)
				res, err := next.ProcessTask(ctx, task)
				log(fmt.Sprintf("<%s skip=%v", name, errors.Is(err, client.SkipRetry)))
				return res, err
			})
		}
	}
	mux := client.NewServeMux()
	mux.Use(mw("a"), mw("b"))
	mux.HandleFunc("t", func(_ context.Context, task *client.Task) ([]byte, error) {
		log("handler")
		return []byte("r"), nil
	})
	mux.Use(mw("c")) // applies to handlers registered before it too
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, mux, client.WithConcurrency(1)))

	id := enqueue(t, ctx, e.c, q, "", client.WithTaskType("t"), client.WithKeepResult())
	wantResult(t, result(t, ctx, e.c, q, id), id, client.ResultSucceeded, "r", "", 1)
	// Middleware also wraps the "no handler" failure.
	id = enqueue(t, ctx, e.c, q, "", client.WithTaskType("nope"), client.WithKeepResult())
	wantResult(t, result(t, ctx, e.c, q, id), id, client.ResultDead, "", `no handler for task type "nope"`, 1)

	mu.Lock()
	defer mu.Unlock()
	want := []string{
		"a>t", "b>t", "c>t", "handler", "<c skip=false", "<b skip=false", "<a skip=false",
		"a>nope", "b>nope", "c>nope", "<c skip=true", "<b skip=true", "<a skip=true",
	}
	if !slices.Equal(trace, want) {
		t.Errorf("trace = %q; want %q", trace, want)
	}
}

func TestServeMuxRegistration(t *testing.T) {
	mux := client.NewServeMux()
	h := client.HandlerFunc(func(context.Context, *client.Task) ([]byte, error) { return nil, nil })
	mux.Handle("a", h)
	if _, ok := mux.Handler("b"); ok {
		t.Errorf("Handler(b) found a handler; want none without a fallback")
	}
	for name, f := range map[string]func(){
		"duplicate":        func() { mux.Handle("a", h) },
		"nil handler":      func() { mux.Handle("c", nil) },
		"nil func":         func() { mux.HandleFunc("c", nil) },
		"second fallback":  func() { mux.HandleFallback(h); mux.Handle("", h) },
		"nil middleware":   func() { mux.Use(nil) },
		"nil fallback arg": func() { client.NewServeMux().HandleFallback(nil) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			f()
		}()
	}
	// The zero ServeMux works.
	var zero client.ServeMux
	_, err := zero.ProcessTask(context.Background(), &client.Task{Type: "x"})
	if !errors.Is(err, client.SkipRetry) || err.Error() != `no handler for task type "x"` {
		t.Errorf("zero ServeMux: %v; want the no-handler error", err)
	}
}

func TestResults(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "results"

	started := make(chan string, 1)
	release := make(chan struct{})
	mux := client.NewServeMux()
	mux.HandleFunc("upper", func(_ context.Context, task *client.Task) ([]byte, error) {
		return bytes.ToUpper(task.Payload), nil
	})
	mux.HandleFunc("gated", func(_ context.Context, task *client.Task) ([]byte, error) {
		started <- task.ID
		<-release
		return []byte("opened"), nil
	})

	// Call waits for a worker that is not there yet: at the deadline it
	// says which message it was waiting for.
	shortCtx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err := e.c.Call(shortCtx, q, "upper", []byte("later"))
	cancel()
	var pe *client.PendingError
	if !errors.As(err, &pe) || pe.ID == "" || pe.Queue != q || !errors.Is(err, context.DeadlineExceeded) ||
		status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("Call without a worker = %v; want a *PendingError with the id, matching DeadlineExceeded", err)
	}
	info, err := e.c.GetMessage(ctx, q, pe.ID)
	if err != nil || info.State != client.MessageReady || info.TaskType != "upper" || info.Deliveries != 0 {
		t.Fatalf("GetMessage of the pending message = %+v, %v; want ready, task type upper", info, err)
	}

	startWorker(t, ctx, newWorker(t, e.c, []string{q}, mux))
	res, err := e.c.WaitResult(ctx, q, pe.ID)
	if err != nil || string(res.Payload) != "LATER" {
		t.Fatalf("WaitResult of the pending message = %+v, %v; want LATER", res, err)
	}
	res, err = e.c.Call(ctx, q, "upper", []byte("hello"))
	if err != nil {
		t.Fatalf("Call: %v", err)
	}
	if res.State != client.ResultSucceeded || string(res.Payload) != "HELLO" || res.Attempts != 1 || res.ID == "" {
		t.Fatalf("Call = %+v; want succeeded with HELLO", *res)
	}

	// Before the ack: no result, GetResult without wait says NOT_FOUND at
	// once, with a wait it says so at the end of the wait.
	id := enqueue(t, ctx, e.c, q, "", client.WithTaskType("gated"), client.WithKeepResult())
	within(t, "the gated handler to start", func() (string, error) { return <-started, nil })
	_, err = e.c.GetResult(ctx, q, id, 0)
	wantCode(t, "GetResult before the ack", err, codes.NotFound)
	begin := time.Now()
	_, err = e.c.GetResult(ctx, q, id, 300*time.Millisecond)
	wantCode(t, "GetResult with a wait that runs out", err, codes.NotFound)
	if waited := time.Since(begin); waited < 300*time.Millisecond {
		t.Errorf("GetResult returned NOT_FOUND after %v; want after the 300ms wait", waited)
	}
	info, err = e.c.GetMessage(ctx, q, id)
	if err != nil || info.State != client.MessageInFlight || info.TaskType != "gated" || info.Deliveries != 1 {
		t.Fatalf("GetMessage while the handler runs = %+v, %v; want in flight, 1 delivery", info, err)
	}

	// A waiting GetResult returns as soon as the ack happens, not at the
	// end of its wait.
	const longWait = 30 * time.Second
	type outcome struct {
		res  *client.Result
		took time.Duration
	}
	got := make(chan outcome, 1)
	var getErr error
	go func() {
		begin := time.Now()
		var res *client.Result
		res, getErr = e.c.GetResult(ctx, q, id, longWait)
		got <- outcome{res, time.Since(begin)}
	}()
	close(release)
	o, _ := within(t, "GetResult with a wait", func() (outcome, error) { return <-got, nil })
	if getErr != nil {
		t.Fatalf("GetResult with a wait: %v", getErr)
	}
	wantResult(t, o.res, id, client.ResultSucceeded, "opened", "", 1)
	if o.took > 5*time.Second {
		t.Errorf("GetResult took %v; want it to return at the ack, well before its %v wait", o.took, longWait)
	}
	// After: at once, without wait.
	res, err = e.c.GetResult(ctx, q, id, 0)
	if err != nil {
		t.Fatalf("GetResult after the ack: %v", err)
	}
	wantResult(t, res, id, client.ResultSucceeded, "opened", "", 1)
	info, err = e.c.GetMessage(ctx, q, id)
	if err != nil || info.State != client.MessageSucceeded || info.Deliveries != 1 {
		t.Fatalf("GetMessage after the ack = %+v, %v; want succeeded", info, err)
	}
	_, err = e.c.GetMessage(ctx, q, "no-such-message")
	wantCode(t, "GetMessage of an unknown id", err, codes.NotFound)
}

func TestResultsOfPlainConsumers(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "plain"
	ids, err := e.c.EnqueueBatch(ctx, q, []client.Message{
		{Payload: []byte("a"), TaskType: "resize"},                   // acked with a result: kept
		{Payload: []byte("b"), TaskType: "resize", KeepResult: true}, // acked without one: kept, empty
		{Payload: []byte("c"), KeepResult: true},                     // dropped: failed
		{Payload: []byte("d")},                                       // acked without result: nothing kept
		{Payload: []byte("e")},                                       // acked with an empty result: kept
	})
	if err != nil {
		t.Fatalf("EnqueueBatch: %v", err)
	}
	cs := consume(t, ctx, e.c, q)
	var ds []*client.Delivery
	for range ids {
		ds = append(ds, next(t, cs))
	}
	for i, want := range []string{"resize", "resize", "", "", ""} {
		if ds[i].ID != ids[i] || ds[i].TaskType != want {
			t.Fatalf("delivery %d = {ID %q TaskType %q}; want {%q %q}", i, ds[i].ID, ds[i].TaskType, ids[i], want)
		}
	}
	if err := ds[0].AckResult(ctx, []byte("small.png")); err != nil {
		t.Fatalf("AckResult: %v", err)
	}
	if err := ds[1].Ack(ctx); err != nil {
		t.Fatalf("Ack: %v", err)
	}
	if err := ds[2].Nack(ctx, false); err != nil {
		t.Fatalf("Nack: %v", err)
	}
	if err := ds[3].Ack(ctx); err != nil {
		t.Fatalf("Ack: %v", err)
	}
	if err := ds[4].AckResult(ctx, nil); err != nil {
		t.Fatalf("AckResult(nil): %v", err)
	}
	wantResult(t, result(t, ctx, e.c, q, ids[0]), ids[0], client.ResultSucceeded, "small.png", "", 1)
	wantResult(t, result(t, ctx, e.c, q, ids[1]), ids[1], client.ResultSucceeded, "", "", 1)
	wantResult(t, result(t, ctx, e.c, q, ids[2]), ids[2], client.ResultFailed, "", "", 1)
	_, err = e.c.GetResult(ctx, q, ids[3], 0)
	wantCode(t, "GetResult of a message acked without result nor keep_result", err, codes.NotFound)
	wantResult(t, result(t, ctx, e.c, q, ids[4]), ids[4], client.ResultSucceeded, "", "", 1)
	if err := ds[0].AckResult(ctx, []byte("again")); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second AckResult = %v; want FAILED_PRECONDITION", err)
	}
	if st := stats(t, ctx, e.c, q); st.Counters.Acked != 4 {
		t.Errorf("counters = %+v; want 4 acks", st.Counters)
	}
}

func TestWorkerResultRefused(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "huge-results"
	var count runs
	h := client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		return bytes.Repeat([]byte("x"), 1<<20+1), nil // over the server's max payload
	})
	startWorker(t, ctx, newWorker(t, e.c, []string{q}, h))
	id := enqueue(t, ctx, e.c, q, "", client.WithKeepResult())
	res := result(t, ctx, e.c, q, id)
	// Retrying would fail the same way: the task is dead-lettered at once,
	// saying why.
	if res.State != client.ResultDead || res.Attempts != 1 || !strings.Contains(res.Error, "the server refused the task's result") ||
		!strings.Contains(res.Error, "limit") || count.get(id) != 1 {
		t.Errorf("result = %+v after %d runs; want dead at once with the server's reason", *res, count.get(id))
	}
}

// The server does not keep a finished message's task type: GetMessage of a
// message whose result is kept answers without it.
func TestGetMessageOfFinishedMessageHasItsTaskType(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "finished"
	id := enqueue(t, ctx, e.c, q, "", client.WithTaskType("report"), client.WithKeepResult())
	cs := consume(t, ctx, e.c, q)
	if err := next(t, cs).Ack(ctx); err != nil {
		t.Fatalf("Ack: %v", err)
	}
	info, err := e.c.GetMessage(ctx, q, id)
	if err != nil || info.State != client.MessageSucceeded || info.TaskType != "report" {
		t.Fatalf("GetMessage of a finished message = %+v, %v; want succeeded, task type report", info, err)
	}
}

func TestWorkerPriorityQueues(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	low := enqueue(t, ctx, e.c, "low", "l", client.WithKeepResult())
	high := enqueue(t, ctx, e.c, "high", "h", client.WithKeepResult())
	var mu sync.Mutex
	var order []string
	h := client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		mu.Lock()
		order = append(order, task.Queue+":"+string(task.Payload))
		mu.Unlock()
		return nil, nil
	})
	startWorker(t, ctx, newWorker(t, e.c, []string{"high", "low"}, h, client.WithConcurrency(1)))
	result(t, ctx, e.c, "low", low)
	result(t, ctx, e.c, "high", high)
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(order, []string{"high:h", "low:l"}) {
		t.Errorf("order = %q; want the high-priority queue first", order)
	}
}

func TestWorkerFatalStreamErrors(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	h := client.HandlerFunc(func(context.Context, *client.Task) ([]byte, error) { return nil, nil })
	for _, tc := range []struct {
		name string
		w    *client.Worker
		want codes.Code
	}{
		{"bad queue name", newWorker(t, e.c, []string{"no spaces"}, h), codes.InvalidArgument},
		{"concurrency above the server's cap", newWorker(t, e.c, []string{"q"}, h, client.WithConcurrency(5000)), codes.InvalidArgument},
		{"no queues", newWorker(t, e.c, nil, h), codes.InvalidArgument},
		{"nil handler", newWorker(t, e.c, []string{"q"}, nil), codes.InvalidArgument},
	} {
		err, _ := within(t, "Run of "+tc.name, func() (error, error) { return tc.w.Run(ctx), nil })
		wantCode(t, "Run with "+tc.name, err, tc.want)
	}

	// A cancelled context: nothing to do.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := newWorker(t, e.c, []string{"q"}, h).Run(cctx); err != nil {
		t.Errorf("Run with a cancelled context = %v; want nil", err)
	}
	// Not twice at once.
	w := newWorker(t, e.c, []string{"q"}, h)
	stop := startWorker(t, ctx, w)
	id := enqueue(t, ctx, e.c, "q", "x", client.WithKeepResult())
	result(t, ctx, e.c, "q", id) // the first Run is running
	err, _ := within(t, "a second Run", func() (error, error) { return w.Run(cctx), nil })
	wantCode(t, "a second concurrent Run", err, codes.FailedPrecondition)
	if err := stop(); err != nil {
		t.Errorf("Run = %v", err)
	}
}

func TestWorkerReconnects(t *testing.T) {
	// Reconnect at once when the server is back (gRPC's default backoff
	// starts at 1s).
	e := newEnv(t, client.WithDialOptions(grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, MaxDelay: 200 * time.Millisecond},
		MinConnectTimeout: time.Second,
	})))
	ctx := testCtx(t)
	const q = "resilient"

	var count runs
	started := make(chan string, 1)
	causes := make(chan error, 1)
	h := client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
		count.add(task.ID)
		if string(task.Payload) == "long" && task.Attempt == 1 {
			started <- task.ID
			<-ctx.Done() // runs across the restart
			causes <- context.Cause(ctx)
			return nil, ctx.Err()
		}
		return []byte("done " + string(task.Payload)), nil
	})
	logger, logs := workerLogger(t)
	stop := startWorker(t, ctx, client.NewWorker(e.c, []string{q}, h, client.WithWorkerLogger(logger),
		client.WithWorkerLease(time.Second), client.WithReconnectBackoff(10*time.Millisecond, 200*time.Millisecond)))

	before := enqueue(t, ctx, e.c, q, "before", client.WithKeepResult())
	wantResult(t, result(t, ctx, e.c, q, before), before, client.ResultSucceeded, "done before", "", 1)
	long := enqueue(t, ctx, e.c, q, "long", client.WithKeepResult())
	within(t, "the long handler to start", func() (string, error) { return <-started, nil })

	e.restartServer(t)

	// The worker reopens its stream and goes on with new tasks.
	var after string
	eventually(t, func() (bool, string) { // the client reconnects by itself
		var err error
		after, err = e.c.Enqueue(ctx, q, []byte("after"), client.WithKeepResult())
		return err == nil, fmt.Sprintf("Enqueue after the restart: %v", err)
	})
	wantResult(t, result(t, ctx, e.c, q, after), after, client.ResultSucceeded, "done after", "", 1)

	// The handler that ran across the restart kept running until the
	// worker learnt that the server had taken its task back (when the old
	// stream ended); the task ran again, on the new stream.
	cause, _ := within(t, "the long handler to be cancelled", func() (error, error) { return <-causes, nil })
	if !errors.Is(cause, client.ErrLeaseLost) {
		t.Errorf("context.Cause of the handler whose task was taken back = %v; want ErrLeaseLost", cause)
	}
	res := result(t, ctx, e.c, q, long)
	if res.State != client.ResultSucceeded || string(res.Payload) != "done long" || res.Attempts != 2 || count.get(long) != 2 {
		t.Errorf("long task: %+v after %d runs; want succeeded at attempt 2", *res, count.get(long))
	}
	if err := stop(); err != nil {
		t.Fatalf("Run = %v; want nil", err)
	}
	if out := logs.String(); !strings.Contains(out, "the Consume stream broke") || !strings.Contains(out, "the Consume stream works again") {
		t.Errorf("the worker's log does not tell about the broken and reopened stream")
	}
}

func TestWorkerStopsOnPermanentStreamError(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "doomed"
	started := make(chan string, 1)
	causes := make(chan error, 1)
	h := client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
		started <- task.ID
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return nil, ctx.Err()
	})
	w := newWorker(t, e.c, []string{q}, h, client.WithConcurrency(2))
	errc := make(chan error, 1)
	go func() { errc <- w.Run(ctx) }()
	enqueue(t, ctx, e.c, q, "x")
	within(t, "the handler to start", func() (string, error) { return <-started, nil })

	// The queue's key now holds a string: the server ends the stream with
	// FAILED_PRECONDITION, which reopening cannot cure.
	if err := e.rdb.Set(ctx, q, "not a list", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	err, _ := within(t, "Run to fail", func() (error, error) { return <-errc, nil })
	wantCode(t, "Run after the queue's key was overwritten", err, codes.FailedPrecondition)
	if cause := <-causes; !errors.Is(cause, client.ErrWorkerStopped) {
		t.Errorf("context.Cause of the running handler = %v; want ErrWorkerStopped", cause)
	}
}

func TestWorkerDoesNotReconnectWhileStopping(t *testing.T) {
	e := newEnv(t, client.WithDialOptions(grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, MaxDelay: 200 * time.Millisecond},
		MinConnectTimeout: time.Second,
	})))
	ctx := testCtx(t)
	const q = "stopping"
	started := make(chan string, 3)
	release := make(chan struct{})
	h := client.HandlerFunc(func(_ context.Context, task *client.Task) ([]byte, error) {
		started <- task.ID
		<-release
		return nil, nil
	})
	var ids []string
	for i := range 3 {
		ids = append(ids, enqueue(t, ctx, e.c, q, fmt.Sprint(i)))
	}
	logger, logs := workerLogger(t)
	stop := startWorker(t, ctx, client.NewWorker(e.c, []string{q}, h, client.WithWorkerLogger(logger),
		client.WithConcurrency(1), client.WithReconnectBackoff(time.Millisecond, 10*time.Millisecond)))
	if id, _ := within(t, "the handler to start", func() (string, error) { return <-started, nil }); id != ids[0] {
		t.Fatalf("first task %s; want %s", id, ids[0])
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	logs.waitLogged(t, "worker stopping")

	// The stream breaks while the handler still runs: the worker does not
	// open another one (it would only take tasks to give them back).
	e.restartServer(t)
	logs.waitLogged(t, "the Consume stream broke while the worker stops")
	close(release)
	if err, _ := within(t, "Run to return", func() (error, error) { return <-stopped, nil }); err != nil {
		t.Fatalf("Run = %v; want nil", err)
	}
	// The first task either went back with its stream (its ack came after
	// the old server requeued it) or was acked (the ack, through the new
	// server, reached Redis before the old server's requeue): both are
	// right, it is a race between the two servers. Either way it is in
	// exactly one place, and the others were never delivered.
	eventually(t, func() (bool, string) {
		ready, inFlight, err := e.c.QueueStats(ctx, q)
		return err == nil && inFlight == 0 && (ready == 3 || ready == 2), fmt.Sprintf("ready %d, in flight %d, %v", ready, inFlight, err)
	})
	for i, id := range ids {
		info, err := e.c.GetMessage(ctx, q, id)
		if i == 0 && status.Code(err) == codes.NotFound {
			continue // acked (without a kept result): gone
		}
		if err != nil {
			t.Fatalf("GetMessage(%s): %v", id, err)
		}
		want := 0
		if i == 0 {
			want = 1
		}
		if info.State != client.MessageReady || info.Deliveries != want {
			t.Errorf("message %d: %+v; want ready, delivered %d times", i, *info, want)
		}
	}
	if len(started) != 0 {
		t.Errorf("%d more handlers started", len(started))
	}
}
