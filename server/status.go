package server

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/server/broker"
)

// errShuttingDown is returned for new work while the server drains.
var errShuttingDown = errors.New("qbridge is shutting down; retry on another instance")

// invalid marks a request error (INVALID_ARGUMENT).
type invalidError struct{ err error }

func (e invalidError) Error() string { return e.err.Error() }
func (e invalidError) Unwrap() error { return e.err }

func invalidf(format string, args ...any) error {
	return invalidError{fmt.Errorf(format, args...)}
}

// staleError means some ack tokens no longer hold a lease.
type staleError struct{ msg string }

func (e staleError) Error() string { return e.msg }

// toStatus turns an internal error into the gRPC status the client sees.
// It is the one place where that mapping happens.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var inv invalidError
	var stale staleError
	var full *broker.QueueFullError
	var busy *broker.InFlightError
	var nf notFoundError
	var shrink *broker.ShrinkError
	switch {
	case errors.As(err, &shrink):
		return status.Error(codes.FailedPrecondition, err.Error()+"; to have fewer shards, move the messages to a new queue")
	case errors.As(err, &inv):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.As(err, &nf):
		return status.Error(codes.NotFound, err.Error())
	case errors.As(err, &full):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.As(err, &busy):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.As(err, &stale):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, broker.ErrNotReplicated):
		// The message is enqueued on the master; the error says so.
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, errShuttingDown):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, broker.ErrUnavailable):
		return status.Error(codes.Unavailable, err.Error()+" (qbridge retries; the call can be retried)")
	case errors.Is(err, broker.ErrWrongType):
		return status.Error(codes.FailedPrecondition, err.Error()+"; the queue name is used by a Redis key that is not a list")
	case broker.IsACLDenied(err):
		return status.Error(codes.FailedPrecondition, "Redis refused a command to qbridge's Redis user: "+err.Error()+"; give the user the ACL that qbridged --print-redis-acl prints")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// wrapUnavailable marks a Redis connection failure outside the broker.
func wrapUnavailable(err error) error {
	return fmt.Errorf("%w: %v", broker.ErrUnavailable, err)
}

// notFoundError means an admin call named a queue qbridge does not know.
type notFoundError struct{ queue string }

func (e notFoundError) Error() string {
	return fmt.Sprintf("queue %q not found: it was never enqueued to or consumed through qbridge, and no Redis list of that name exists", e.queue)
}
