package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Exit codes. They are part of the command's interface (scripts test them)
// and documented in `qbridge --help` (exitCodesHelp): keep them stable.
const (
	exitOK          = 0   // success
	exitUsage       = 1   // bad command line, or a local problem (unreadable file, ...)
	exitServer      = 2   // the server answered with an error
	exitUnavailable = 3   // cannot connect, or the server answered UNAVAILABLE
	exitNotFound    = 4   // the server answered NOT_FOUND
	exitTimeout     = 5   // consume --timeout / result --wait passed with nothing
	exitInterrupted = 130 // SIGINT (Ctrl-C) or SIGTERM
)

const exitCodesHelp = `Exit codes:
  0    success
  1    usage error (unknown command or flag, bad arguments), or a local
       problem such as an unreadable --file
  2    the server returned an error; one line on stderr:
         qbridge: <Code>: <message>      e.g. qbridge: InvalidArgument: queue name ...
  3    cannot connect to the server, or it answered Unavailable
  4    not found: the server answered NotFound (unknown queue in an admin
       command, unknown message, no result yet)
  5    nothing arrived in time: consume --timeout or result --wait passed
  130  interrupted (Ctrl-C or SIGTERM), also for the commands that run until
       interrupted (consume, subscribe, stats --watch); they stop cleanly first`

// exitError ends the command with a given exit code. msg, when not empty,
// is printed as "qbridge: <msg>".
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

// usageErrorf is an exit-1 error: a bad command line or a local problem.
func usageErrorf(format string, args ...any) error {
	return &exitError{code: exitUsage, msg: fmt.Sprintf(format, args...)}
}

// timeoutErrorf is an exit-5 error: nothing arrived in time.
func timeoutErrorf(format string, args ...any) error {
	return &exitError{code: exitTimeout, msg: fmt.Sprintf(format, args...)}
}

// usageError marks errors that cobra reports for a bad command line, so
// that the hint to --help is printed with them.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

// statusLine returns the one line that reports a gRPC error and its exit
// code. addr is the server address, to name it when it cannot be reached.
func statusLine(err error, addr string) (line string, code int) {
	st, ok := status.FromError(err)
	if !ok {
		return oneLine(err.Error()), exitUsage
	}
	msg := oneLine(strings.TrimPrefix(st.Message(), "qbridge: "))
	switch st.Code() {
	case codes.Unavailable:
		if m, ok := connectFailure(msg); ok {
			return fmt.Sprintf("%s: cannot connect to %s: %s", st.Code(), addr, m), exitUnavailable
		}
		return fmt.Sprintf("%s: %s", st.Code(), msg), exitUnavailable
	case codes.DeadlineExceeded:
		// Deadline passed while grpc-go was still connecting: a
		// connection problem, not a slow server.
		if strings.Contains(msg, "waiting for connections to become ready") {
			return fmt.Sprintf("%s: cannot connect to %s within the timeout (--timeout)", codes.Unavailable, addr), exitUnavailable
		}
		if m, ok := strings.CutPrefix(msg, "latest balancer error: "); ok {
			if m2, ok := connectFailure(m); ok {
				m = m2
			}
			return fmt.Sprintf("%s: cannot connect to %s: %s", codes.Unavailable, addr, m), exitUnavailable
		}
	case codes.NotFound:
		return fmt.Sprintf("%s: %s", st.Code(), msg), exitNotFound
	}
	return fmt.Sprintf("%s: %s", st.Code(), msg), exitServer
}

// connectFailure recognises grpc-go's messages for a connection that could
// not be made and returns the underlying cause, e.g. "dial tcp
// 127.0.0.1:1: connect: connection refused".
func connectFailure(msg string) (string, bool) {
	rest, ok := strings.CutPrefix(msg, "connection error: desc = ")
	if !ok {
		if strings.HasPrefix(msg, "name resolver error: ") || strings.Contains(msg, "produced zero addresses") {
			return msg, true
		}
		return "", false
	}
	if s, err := strconv.Unquote(rest); err == nil {
		rest = s
	}
	rest = strings.TrimPrefix(rest, "transport: ")
	rest = strings.TrimPrefix(rest, "Error while dialing: ")
	rest = strings.TrimPrefix(rest, "Error while dialing ")
	return rest, true
}

// oneLine joins the lines of s with "; ".
func oneLine(s string) string {
	s = strings.TrimSpace(s)
	return strings.Join(strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' }), "; ")
}

// isCode reports whether err is a gRPC status error with code c.
func isCode(err error, c codes.Code) bool {
	if err == nil {
		return false
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return false
	}
	return status.Code(err) == c
}
