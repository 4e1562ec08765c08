package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Task is one delivery as a Handler sees it.
type Task struct {
	// ID is the message id; it stays the same across attempts, so it can
	// serve as an idempotency key.
	ID string
	// Queue is the queue the message came from.
	Queue string
	// Type is the task type given at enqueue time (see WithTaskType), or
	// "" when none was.
	Type string
	// Payload is the message body.
	Payload []byte
	// Headers are the headers given at enqueue time (nil when none).
	Headers map[string]string
	// Attempt is 1 for the first delivery, 2 for the first retry, and so
	// on.
	Attempt int
	// EnqueueTime is when the message was enqueued.
	EnqueueTime time.Time
	// LastError is the error text of the previous failed attempt (what
	// its handler returned), or "" when there was none.
	LastError string
}

// newTask makes the Task of a delivery.
func newTask(d *Delivery) *Task {
	return &Task{
		ID:          d.ID,
		Queue:       d.Queue,
		Type:        d.TaskType,
		Payload:     d.Payload,
		Headers:     d.Headers,
		Attempt:     d.Attempt,
		EnqueueTime: d.EnqueueTime,
		LastError:   d.LastError,
	}
}

// A Handler processes tasks for a Worker.
//
// ProcessTask returns the task's result, or an error. On success the Worker
// acks the delivery, storing the result when it is not nil (see
// Delivery.AckResult and Client.GetResult). On error it gives the task back
// to be retried after the retry policy's backoff, with the error's text as
// the next attempt's Task.LastError; once the task has used up its
// attempts it is dead-lettered. An error that matches errors.Is(err,
// SkipRetry) dead-letters the task at once. A panic counts as a retryable
// error.
//
// ctx is cancelled when the task's lease is lost (context.Cause(ctx) is
// ErrLeaseLost: the task will be delivered again, so what the handler does
// from then on is wasted) or when the Worker stops before the handler
// returns (ErrWorkerStopped). Handlers should give up promptly then.
//
// Handlers run concurrently (see WithConcurrency); delivery is
// at-least-once, so a task may be processed more than once.
type Handler interface {
	ProcessTask(ctx context.Context, t *Task) ([]byte, error)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, t *Task) ([]byte, error)

// ProcessTask calls f(ctx, t).
func (f HandlerFunc) ProcessTask(ctx context.Context, t *Task) ([]byte, error) { return f(ctx, t) }

// SkipRetry, returned by a Handler (or wrapped, as in
// fmt.Errorf("bad payload: %w", client.SkipRetry)), means that retrying
// cannot help: the Worker dead-letters the task at once, with the error's
// text, instead of retrying it.
var SkipRetry = errors.New("skip retry")

// noHandlerError is what ServeMux returns for a task type it has no
// handler for: not worth retrying, with a text that says just that.
type noHandlerError struct{ taskType string }

func (e *noHandlerError) Error() string {
	return fmt.Sprintf("no handler for task type %q", e.taskType)
}

// Is makes the error match SkipRetry.
func (e *noHandlerError) Is(target error) bool { return target == SkipRetry }

// ServeMux is a Handler that dispatches each task to the handler
// registered for its Task.Type, in the spirit of http.ServeMux (with exact
// matches only). A task whose type has no handler, or that has no type, goes
// to the fallback handler (see HandleFallback); without one, it fails with
// an error matching SkipRetry (`no handler for task type "x"`), so the
// Worker dead-letters it with that text.
//
// Middleware added with Use wraps every dispatch, including to the fallback
// and the "no handler" failure.
//
// The zero value is an empty ServeMux ready to use. Its methods may be
// called concurrently, also while it serves.
type ServeMux struct {
	mu         sync.RWMutex
	handlers   map[string]Handler
	fallback   Handler
	middleware []func(Handler) Handler
}

// NewServeMux returns an empty ServeMux.
func NewServeMux() *ServeMux { return &ServeMux{} }

// Handle registers h for tasks of taskType; an empty taskType registers the
// fallback (as HandleFallback). It panics if h is nil or taskType already
// has a handler.
func (m *ServeMux) Handle(taskType string, h Handler) {
	if h == nil {
		panic(fmt.Sprintf("qbridge: ServeMux.Handle(%q): nil handler", taskType))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if taskType == "" {
		if m.fallback != nil {
			panic("qbridge: ServeMux: the fallback handler is already registered")
		}
		m.fallback = h
		return
	}
	if _, dup := m.handlers[taskType]; dup {
		panic(fmt.Sprintf("qbridge: ServeMux: task type %q already has a handler", taskType))
	}
	if m.handlers == nil {
		m.handlers = map[string]Handler{}
	}
	m.handlers[taskType] = h
}

// HandleFunc registers f for tasks of taskType, as Handle(taskType,
// HandlerFunc(f)).
func (m *ServeMux) HandleFunc(taskType string, f func(ctx context.Context, t *Task) ([]byte, error)) {
	if f == nil {
		panic(fmt.Sprintf("qbridge: ServeMux.HandleFunc(%q): nil handler", taskType))
	}
	m.Handle(taskType, HandlerFunc(f))
}

// HandleFallback registers h for tasks whose type has no handler and for
// tasks without a type. It panics if h is nil or a fallback is already
// registered.
func (m *ServeMux) HandleFallback(h Handler) { m.Handle("", h) }

// Use appends middleware. Each wraps a handler in another; they apply in
// the order given, the first one outermost: after Use(a, b), a task goes
// through a, then b, then the handler. It panics on a nil middleware.
func (m *ServeMux) Use(middleware ...func(Handler) Handler) {
	for i, mw := range middleware {
		if mw == nil {
			panic(fmt.Sprintf("qbridge: ServeMux.Use: middleware %d is nil", i))
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.middleware = append(m.middleware, middleware...)
}

// Handler returns the handler registered for taskType (the fallback when
// it has none, or when taskType is ""), without middleware; ok is false
// when there is neither.
func (m *ServeMux) Handler(taskType string) (h Handler, ok bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	h, _ = m.lookup(taskType)
	return h, h != nil
}

// lookup finds the handler of taskType; m.mu must be held.
func (m *ServeMux) lookup(taskType string) (Handler, bool) {
	if h, ok := m.handlers[taskType]; ok && taskType != "" {
		return h, true
	}
	return m.fallback, m.fallback != nil
}

// ProcessTask dispatches t to its handler, through the middleware.
func (m *ServeMux) ProcessTask(ctx context.Context, t *Task) ([]byte, error) {
	m.mu.RLock()
	h, ok := m.lookup(t.Type)
	mws := m.middleware
	m.mu.RUnlock()
	if !ok {
		h = noHandler
	}
	for i := len(mws) - 1; i >= 0; i-- {
		h = mws[i](h)
	}
	return h.ProcessTask(ctx, t)
}

// noHandler fails every task with a noHandlerError.
var noHandler = HandlerFunc(func(_ context.Context, t *Task) ([]byte, error) {
	return nil, &noHandlerError{taskType: t.Type}
})
