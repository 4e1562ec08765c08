package broker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/redis/go-redis/v9"
)

// Sentinel errors. Errors returned by Broker wrap one of these (or the
// underlying Redis error) together with what was being done.
var (
	// ErrUnavailable means Redis could not be reached or the connection
	// broke. Retrying later may succeed.
	ErrUnavailable = errors.New("redis unavailable")
	// ErrWrongType means a queue's key holds something other than a list.
	ErrWrongType = errors.New("key holds the wrong kind of value")
)

// wrap adds context to err and classifies it. It returns nil for nil.
func wrap(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	what := fmt.Sprintf(format, args...)
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%s: %w", what, err)
	case strings.Contains(err.Error(), "WRONGTYPE"):
		return fmt.Errorf("%s: %w (%v)", what, ErrWrongType, err)
	case isConnError(err):
		return fmt.Errorf("%s: %w: %v", what, ErrUnavailable, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func isConnError(err error) bool {
	var ne net.Error
	var oe *net.OpError
	switch {
	case errors.Is(err, redis.ErrClosed), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.As(err, &ne), errors.As(err, &oe):
		return true
	}
	if isRedirect(err) {
		// go-redis ran out of attempts following a slot that moves
		// (resharding, failover): nothing ran, and a retry can succeed.
		return true
	}
	msg := err.Error()
	for _, s := range []string{"connection pool timeout", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "connection refused", "broken pipe", "i/o timeout"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// IsACLDenied reports whether Redis refused a command because qbridge's
// Redis user lacks the permission (NOPERM): a misconfigured ACL, see
// package redisacl.
func IsACLDenied(err error) bool { return redis.HasErrorPrefix(err, "NOPERM") }
