package client

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// WithTaskType sets the message's task type (1-128 bytes, the characters of
// a queue name): workers dispatch on it (see ServeMux) and the queue's stats
// are broken down by it. "" leaves the message without a task type.
func WithTaskType(taskType string) EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.TaskType = taskType }
}

// WithKeepResult makes the server keep the message's outcome for GetResult
// (for its result retention, 24h by default): the result it is acked with,
// or the error it failed or died with. Without it, only an ack that carries
// a result (Delivery.AckResult) leaves an outcome behind.
func WithKeepResult() EnqueueOption {
	return func(r *qbridgev1.EnqueueRequest) { r.KeepResult = true }
}

// AckResult settles the delivery like Ack and stores result as the
// message's outcome, for GetResult under the message's id (an empty or nil
// result is stored as an empty one). The result may be at most the server's
// max payload size (1 MiB by default): a bigger one fails with
// INVALID_ARGUMENT and the delivery stays unsettled. Fenced like Ack.
func (d *Delivery) AckResult(ctx context.Context, result []byte) error {
	tok, err := d.token("ack")
	if err != nil {
		return err
	}
	if result == nil {
		result = []byte{}
	}
	_, err = d.client.rpc.Ack(ctx, &qbridgev1.AckRequest{
		AckTokens: []string{tok},
		Results:   map[string][]byte{tok: result},
	})
	return err
}

// ResultState is how a message finished.
type ResultState int

// The outcomes GetResult reports.
const (
	// ResultSucceeded: the message was acked (with or without a result).
	ResultSucceeded ResultState = ResultState(qbridgev1.ResultState_RESULT_STATE_SUCCEEDED)
	// ResultFailed: the message was dropped (Delivery.Nack without
	// requeue).
	ResultFailed ResultState = ResultState(qbridgev1.ResultState_RESULT_STATE_FAILED)
	// ResultDead: the message was dead-lettered (its attempts used up,
	// Delivery.DeadLetter, or its TTL passed with the dead-letter expired
	// action).
	ResultDead ResultState = ResultState(qbridgev1.ResultState_RESULT_STATE_DEAD)
)

// String returns "succeeded", "failed", "dead", or "ResultState(n)".
func (s ResultState) String() string {
	switch s {
	case ResultSucceeded:
		return "succeeded"
	case ResultFailed:
		return "failed"
	case ResultDead:
		return "dead"
	}
	return fmt.Sprintf("ResultState(%d)", int(s))
}

// Result is the outcome of a message, as GetResult reports it.
type Result struct {
	// ID is the message id.
	ID string
	// State is how the message finished.
	State ResultState
	// Payload is the result the consumer acked the message with (see
	// Delivery.AckResult and Handler); empty when it gave none.
	Payload []byte
	// Error is the error text the message failed or died with (see
	// Delivery.Retry and Delivery.DeadLetter); "" for a success.
	Error string
	// FinishTime is when the message finished.
	FinishTime time.Time
	// Attempts is how many times the message was delivered.
	Attempts int
}

// GetResult returns the outcome of the message id of queue: see Result. It
// is kept for the server's result retention (24h by default) for messages
// enqueued with WithKeepResult and for any message acked with a result.
//
// With wait > 0 (at most 5 minutes; ctx's deadline also applies), the call
// waits up to that long for the outcome, and returns as soon as it is
// recorded. A message without an outcome (unknown, not finished yet, or
// finished without keeping one) gives a NOT_FOUND status error, also at the
// end of a wait.
func (c *Client) GetResult(ctx context.Context, queue, id string, wait time.Duration) (*Result, error) {
	resp, err := c.rpc.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: queue, Id: id, Wait: durationOrNil(wait)})
	if err != nil {
		return nil, err
	}
	return &Result{
		ID:         resp.GetId(),
		State:      ResultState(resp.GetState()),
		Payload:    resp.GetResult(),
		Error:      resp.GetError(),
		FinishTime: timeOrZero(resp.GetFinishTime()),
		Attempts:   int(resp.GetAttempts()),
	}, nil
}

// MessageState is where a message is, as GetMessage reports it.
type MessageState int

// The states GetMessage reports.
const (
	// MessageReady: in the queue, waiting for a consumer.
	MessageReady MessageState = MessageState(qbridgev1.MessageState_MESSAGE_STATE_READY)
	// MessageDelayed: waiting for its delivery time (delayed, scheduled,
	// or retrying after a backoff).
	MessageDelayed MessageState = MessageState(qbridgev1.MessageState_MESSAGE_STATE_DELAYED)
	// MessageInFlight: delivered and not yet settled.
	MessageInFlight MessageState = MessageState(qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT)
	// MessageDead: in the queue's dead letters.
	MessageDead MessageState = MessageState(qbridgev1.MessageState_MESSAGE_STATE_DEAD)
	// MessageSucceeded: acked, and its outcome is kept.
	MessageSucceeded MessageState = MessageState(qbridgev1.MessageState_MESSAGE_STATE_SUCCEEDED)
	// MessageFailed: dropped by a Nack, and its outcome is kept.
	MessageFailed MessageState = MessageState(qbridgev1.MessageState_MESSAGE_STATE_FAILED)
)

// String returns "ready", "delayed", "in flight", "dead", "succeeded",
// "failed", or "MessageState(n)".
func (s MessageState) String() string {
	switch s {
	case MessageReady:
		return "ready"
	case MessageDelayed:
		return "delayed"
	case MessageInFlight:
		return "in flight"
	case MessageDead:
		return "dead"
	case MessageSucceeded:
		return "succeeded"
	case MessageFailed:
		return "failed"
	}
	return fmt.Sprintf("MessageState(%d)", int(s))
}

// MessageInfo tells where a message is, as GetMessage reports it.
type MessageInfo struct {
	// ID is the message id.
	ID string
	// State is where the message is.
	State MessageState
	// Deliveries is how many times it has been delivered so far.
	Deliveries int
	// TaskType is its task type ("" when it has none).
	TaskType string
	// LastError is the error text of its latest Retry or DeadLetter, if
	// any.
	LastError string
}

// GetMessage finds the message id in queue and tells where it is. It
// searches the queue, so it takes time proportional to the queue's size:
// meant for people and tools, not hot paths. An unknown id (or a finished
// message whose outcome is not kept) gives a NOT_FOUND status error.
func (c *Client) GetMessage(ctx context.Context, queue, id string) (*MessageInfo, error) {
	resp, err := c.rpc.GetMessage(ctx, &qbridgev1.GetMessageRequest{Queue: queue, Id: id})
	if err != nil {
		return nil, err
	}
	return &MessageInfo{
		ID:         resp.GetId(),
		State:      MessageState(resp.GetState()),
		Deliveries: int(resp.GetDeliveries()),
		TaskType:   resp.GetTaskType(),
		LastError:  resp.GetLastError(),
	}, nil
}

// callWaitChunk is the longest wait of one GetResult call made by
// WaitResult (the server accepts up to 5 minutes).
const callWaitChunk = time.Minute

// Call is a request/reply round trip over a queue: it enqueues payload as a
// task of taskType (with WithKeepResult; opts may add others, e.g.
// WithDedupKey to make the Call safe to retry) and waits, until ctx ends,
// for its outcome (see WaitResult). Give ctx a deadline: without one Call
// waits as long as it takes.
//
// When the task succeeded, Call returns its Result (Payload is the
// handler's result) and a nil error. When it failed or died, Call returns
// its Result and a *TaskError. When ctx ends first, it returns a
// *PendingError naming the message, whose outcome can still be fetched
// later with GetResult or WaitResult. Errors of the Enqueue itself are
// returned as they are.
func (c *Client) Call(ctx context.Context, queue, taskType string, payload []byte, opts ...EnqueueOption) (*Result, error) {
	opts = append(opts[:len(opts):len(opts)], WithTaskType(taskType), WithKeepResult())
	id, err := c.Enqueue(ctx, queue, payload, opts...)
	if err != nil {
		return nil, err
	}
	return c.WaitResult(ctx, queue, id)
}

// WaitResult waits until the message id of queue has an outcome, or ctx
// ends, calling GetResult with waits of at most a minute (each woken by the
// outcome as soon as it is recorded). NOT_FOUND at the end of a wait means
// "not yet", and UNAVAILABLE (a server restarting) is retried after a short
// backoff; the message must have been enqueued with WithKeepResult for a
// failure or death to be seen. Results and errors are as for Call.
func (c *Client) WaitResult(ctx context.Context, queue, id string) (*Result, error) {
	backoff := DefaultReconnectMin
	for {
		wait := callWaitChunk
		if dl, ok := ctx.Deadline(); ok {
			wait = min(wait, time.Until(dl))
		}
		if err := ctxEnded(ctx); err != nil || wait <= 0 {
			if err == nil {
				err = context.DeadlineExceeded
			}
			return nil, &PendingError{Queue: queue, ID: id, Err: err}
		}
		start := time.Now()
		res, err := c.GetResult(ctx, queue, id, wait)
		if err == nil {
			if res.State != ResultSucceeded {
				return res, &TaskError{Queue: queue, Result: res}
			}
			return res, nil
		}
		if ctxErr := ctxEnded(ctx); ctxErr != nil {
			return nil, &PendingError{Queue: queue, ID: id, Err: ctxErr}
		}
		var pause time.Duration
		switch status.Code(err) {
		case codes.NotFound:
			// Not yet. A NOT_FOUND that came back well before the wait
			// was over should not happen; pause a little so that it
			// cannot turn this loop into a busy one.
			if time.Since(start) < wait/2 {
				pause = min(100*time.Millisecond, wait/2)
			}
			backoff = DefaultReconnectMin
		case codes.Unavailable:
			// The server restarts or shuts down: ask again (another
			// instance may answer), after a backoff.
			pause = jitter(backoff)
			backoff = min(2*backoff, 2*time.Second)
		default:
			return nil, err
		}
		if pause > 0 {
			t := time.NewTimer(pause)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
		}
	}
}

// TaskError is the error Call and WaitResult return for a message that
// failed or died; Result tells how, and Result.Error why.
type TaskError struct {
	// Queue is the message's queue.
	Queue string
	// Result is the message's outcome (State ResultFailed or ResultDead).
	Result *Result
}

// Error says which task failed or died, after how many attempts, and why.
func (e *TaskError) Error() string {
	return fmt.Sprintf("qbridge: task %q of queue %q %s after %d attempt(s): %s",
		e.Result.ID, e.Queue, e.Result.State, e.Result.Attempts, e.Result.Error)
}

// PendingError is the error Call and WaitResult return when ctx ends before
// the message has an outcome. The message is enqueued all the same: its
// outcome may still be fetched with GetResult or WaitResult. It matches
// errors.Is(err, context.DeadlineExceeded) (or context.Canceled), and
// status.Code gives the corresponding gRPC code.
type PendingError struct {
	// Queue and ID name the message.
	Queue, ID string
	// Err is why the wait ended: ctx's error.
	Err error
}

// Error names the message and says why the wait ended.
func (e *PendingError) Error() string {
	return fmt.Sprintf("qbridge: no outcome yet for message %q of queue %q: %v", e.ID, e.Queue, e.Err)
}

// Unwrap returns Err.
func (e *PendingError) Unwrap() error { return e.Err }

// GRPCStatus lets status.Code and status.FromError see the code matching
// Err (DEADLINE_EXCEEDED or CANCELLED).
func (e *PendingError) GRPCStatus() *status.Status {
	return status.New(status.FromContextError(e.Err).Code(), e.Error())
}
