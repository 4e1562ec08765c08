package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server/broker"
)

// Results design
//
// The ack and nack scripts store a message's outcome in its queue's results
// hash (with a retention) and PUBLISH its id on the queue's results channel,
// in the same script. A GetResult that has to wait subscribes to that
// channel through the shared pub/sub connection (reference-counted like any
// Subscribe), waits for the confirmation, reads the hash once more (closing
// the race with an ack that came in between), then sleeps until the id is
// announced or the wait runs out. Nothing polls.

// resultWaiters maps queue+"\x00"+id to the channels of calls waiting for
// that result.
type resultWaiters struct {
	mu sync.Mutex
	m  map[string]map[chan struct{}]struct{}
}

func (w *resultWaiters) add(key string) chan struct{} {
	ch := make(chan struct{}, 1)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[string]map[chan struct{}]struct{}{}
	}
	if w.m[key] == nil {
		w.m[key] = map[chan struct{}]struct{}{}
	}
	w.m[key][ch] = struct{}{}
	return ch
}

func (w *resultWaiters) remove(key string, ch chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.m[key], ch)
	if len(w.m[key]) == 0 {
		delete(w.m, key)
	}
}

func (w *resultWaiters) notify(key string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for ch := range w.m[key] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

const resultsChannelPrefix = internalPrefix + "results:"

// applyResultNotice wakes the calls waiting for a result announced on a
// results channel (its Redis name, prefix included).
func (s *Server) applyResultNotice(channel, id string) {
	queue := strings.TrimPrefix(channel, s.b.Keys().Channel(resultsChannelPrefix))
	s.waiters.notify(queue + "\x00" + id)
}

func resultResponse(r *broker.Result) *qbridgev1.GetResultResponse {
	resp := &qbridgev1.GetResultResponse{Id: r.ID, Result: r.Payload, Error: r.Error, FinishTime: ts(r.Finished), Attempts: r.Attempts}
	switch r.State {
	case broker.Succeeded:
		resp.State = qbridgev1.ResultState_RESULT_STATE_SUCCEEDED
	case broker.Failed:
		resp.State = qbridgev1.ResultState_RESULT_STATE_FAILED
	case broker.Dead:
		resp.State = qbridgev1.ResultState_RESULT_STATE_DEAD
	}
	return resp
}

// GetResult implements QueueService.GetResult.
func (s *Server) GetResult(ctx context.Context, req *qbridgev1.GetResultRequest) (*qbridgev1.GetResultResponse, error) {
	q, id := req.GetQueue(), req.GetId()
	if err := validateQueueAndID(q, id); err != nil {
		return nil, toStatus(err)
	}
	wait, err := durationIn("wait", req.GetWait(), 0, maxResultWait)
	if err != nil {
		return nil, toStatus(invalidError{err})
	}
	r, err := s.getResult(ctx, q, id)
	if err == nil {
		return resultResponse(r), nil
	}
	if !errors.Is(err, broker.ErrNoResult) {
		return nil, toStatus(err)
	}
	notYet := status.Errorf(codes.NotFound, "no result for message %q in queue %q yet: it is still queued or in flight, was acked without a result and without keep_result, or its result expired", id, q)
	if wait == 0 {
		return nil, notYet
	}
	if s.isDraining() {
		return nil, toStatus(errShuttingDown)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	key := q + "\x00" + id
	ch := s.waiters.add(key)
	defer s.waiters.remove(key, ch)
	sub := &subscriber{
		channels: []string{s.b.Keys().ResultsChannel(q)},
		msgs:     make(chan *qbridgev1.PubSubMessage, 1),
		ready:    make(chan struct{}),
		overflow: make(chan struct{}),
	}
	if err := s.hub.add(wctx, sub); err != nil {
		return nil, toStatus(wrapUnavailable(err))
	}
	defer s.hub.remove(sub)
	select {
	case <-sub.ready:
	case <-wctx.Done():
		return nil, waitEnded(ctx, notYet)
	}
	for {
		r, err := s.getResult(ctx, q, id)
		if err == nil {
			return resultResponse(r), nil
		}
		if !errors.Is(err, broker.ErrNoResult) {
			return nil, toStatus(err)
		}
		select {
		case <-ch:
		case <-wctx.Done():
			return nil, waitEnded(ctx, notYet)
		case <-s.draining:
			return nil, toStatus(errShuttingDown)
		}
	}
}

// waitEnded is the error of a wait that ran out: the caller's own deadline
// or cancellation, or else "no result yet".
func waitEnded(ctx context.Context, notYet error) error {
	if ctx.Err() != nil {
		return toStatus(ctx.Err())
	}
	return notYet
}

// validateQueueAndID checks the queue and message id a lookup names.
func validateQueueAndID(queue, id string) error {
	if err := ValidateName("queue", queue); err != nil {
		return invalidError{err}
	}
	if id == "" {
		return invalidf("id is empty; give the id Enqueue returned")
	}
	if err := validateID(id); err != nil {
		return invalidError{err}
	}
	return nil
}

// GetMessage implements QueueService.GetMessage.
func (s *Server) GetMessage(ctx context.Context, req *qbridgev1.GetMessageRequest) (*qbridgev1.GetMessageResponse, error) {
	q, id := req.GetQueue(), req.GetId()
	if err := validateQueueAndID(q, id); err != nil {
		return nil, toStatus(err)
	}
	loc, err := s.findMessage(ctx, q, id)
	if errors.Is(err, broker.ErrNoResult) {
		return nil, status.Error(codes.NotFound, fmt.Sprintf("message %q is not in queue %q: never enqueued there, or finished without keeping its result, or its result expired", id, q))
	}
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &qbridgev1.GetMessageResponse{Id: id}
	if m := loc.Message; m != nil {
		resp.Deliveries, resp.TaskType, resp.LastError = m.Deliveries, m.TaskType, m.LastError
	}
	switch loc.State {
	case broker.StateReady:
		resp.State = qbridgev1.MessageState_MESSAGE_STATE_READY
	case broker.StateDelayed:
		resp.State = qbridgev1.MessageState_MESSAGE_STATE_DELAYED
	case broker.StateInFlight:
		resp.State = qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT
	case broker.StateDead:
		resp.State = qbridgev1.MessageState_MESSAGE_STATE_DEAD
	default:
		r := loc.Result
		resp.Deliveries, resp.LastError, resp.TaskType = r.Attempts, r.Error, r.TaskType
		switch r.State {
		case broker.Succeeded:
			resp.State = qbridgev1.MessageState_MESSAGE_STATE_SUCCEEDED
		case broker.Failed:
			resp.State = qbridgev1.MessageState_MESSAGE_STATE_FAILED
		default:
			resp.State = qbridgev1.MessageState_MESSAGE_STATE_DEAD
		}
	}
	return resp, nil
}

// getResult looks up message id's result in each shard of queue (the only
// one, for an unsharded queue).
func (s *Server) getResult(ctx context.Context, queue, id string) (*broker.Result, error) {
	for _, q := range s.shardsOf(queue) {
		r, err := s.b.GetResult(ctx, q, id)
		if !errors.Is(err, broker.ErrNoResult) {
			return r, err
		}
	}
	return nil, broker.ErrNoResult
}

// findMessage looks message id up in each shard of queue.
func (s *Server) findMessage(ctx context.Context, queue, id string) (*broker.Located, error) {
	for _, q := range s.shardsOf(queue) {
		loc, err := s.b.FindMessage(ctx, q, id)
		if !errors.Is(err, broker.ErrNoResult) {
			return loc, err
		}
	}
	return nil, broker.ErrNoResult
}
