package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"

	"github.com/qbridge/qbridge/client"
)

const (
	// errTailBytes is how much of a command's stderr becomes the error
	// text of a retry or dead letter (the server keeps at most 4 KiB).
	errTailBytes = 4000
	// killGrace is how long a command gets after SIGTERM (on Ctrl-C)
	// before it is killed.
	killGrace = 5 * time.Second
)

// execOne runs the --exec command for d and settles d by its exit status.
// It returns an error only when the command cannot go on (the command
// could not be started, the server is unreachable).
func (a *app) execOne(d *client.Delivery, o *consumeOpts) error {
	ctx := a.ctx
	cmd := exec.CommandContext(ctx, "sh", "-c", o.exec)
	cmd.Stdin = bytes.NewReader(d.Payload)
	cmd.Env = append(os.Environ(),
		"QBRIDGE_ID="+d.ID,
		"QBRIDGE_QUEUE="+d.Queue,
		"QBRIDGE_ATTEMPT="+strconv.Itoa(d.Attempt),
		"QBRIDGE_TASK_TYPE="+d.TaskType,
		"QBRIDGE_LAST_ERROR="+d.LastError,
	)
	// On Ctrl-C (ctx ends) the command and everything it started get
	// SIGTERM, and are killed killGrace later if still running.
	terminateGroup(cmd)
	cmd.WaitDelay = killGrace
	// stdout: the result (--result); else qbridge's stdout, streamed when
	// one command runs at a time, written in one piece when it ends
	// otherwise, so that the outputs of commands do not mix.
	var result bytes.Buffer
	switch {
	case o.result, o.concurrency > 1:
		cmd.Stdout = &result
	default:
		cmd.Stdout = a.syncStdout()
	}
	tail := &tailBuffer{max: errTailBytes}
	cmd.Stderr = io.MultiWriter(a.syncStderr(), tail)

	stopExtending := a.keepLease(d, o.lease)
	err := cmd.Run()
	stopExtending()
	if !o.result && result.Len() > 0 {
		_, _ = a.syncStdout().Write(result.Bytes())
	}
	if ctx.Err() != nil {
		// Interrupted: leave the message unsettled; the end of the stream
		// puts it back on the queue.
		return nil
	}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		return usageErrorf("--exec: %v", err)
	}
	code := 0
	status := "exit 0"
	if exitErr != nil {
		code = exitErr.ExitCode() // -1 when killed by a signal
		status = exitErr.String()
	}
	errText := tail.String()
	if errText == "" && code != 0 {
		errText = "command failed: " + status
	}

	sctx, cancel := a.rpcCtx()
	defer cancel()
	var what, outcome string
	switch {
	case code == 0 && o.result:
		what, outcome = "ack", "acked with a result"
		err = d.AckResult(sctx, result.Bytes())
		if isCode(err, codes.InvalidArgument) {
			// The result is not acceptable (too large): it never will be.
			errText = "the command's result was rejected: " + oneLine(err.Error())
			what, outcome = "dead-letter", "dead-lettered: "+errText
			err = d.DeadLetter(sctx, errors.New(errText))
		}
	case code == 0:
		what, outcome = "ack", "acked"
		err = d.Ack(sctx)
	case code == o.deadCode:
		what, outcome = "dead-letter", status+", dead-lettered: "+truncate(oneLine(errText), 200)
		err = d.DeadLetter(sctx, errors.New(errText))
	default:
		what, outcome = "retry", status+", to be retried: "+truncate(oneLine(errText), 200)
		err = d.Retry(sctx, errors.New(errText))
	}
	if err == nil {
		fmt.Fprintf(a.syncStderr(), "qbridge: %s %s attempt %d: %s\n", d.Queue, d.ID, d.Attempt, outcome)
	}
	return a.settleFailed(d, what, err)
}

// keepLease extends d's lease every third of it until the returned function
// is called. lease is the --lease flag (0: the server's default, inferred
// from the delivery's deadline).
func (a *app) keepLease(d *client.Delivery, lease time.Duration) (stop func()) {
	period := lease
	if period <= 0 {
		period = time.Until(d.LeaseDeadline).Round(time.Second)
		if period < time.Second || period > 12*time.Hour {
			period = 30 * time.Second
		}
	}
	period /= 3
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-a.ctx.Done():
				return
			case <-t.C:
				ctx, cancel := a.rpcCtx()
				_, err := d.ExtendLease(ctx, lease)
				cancel()
				if err != nil && a.ctx.Err() == nil {
					fmt.Fprintf(a.syncStderr(), "qbridge: cannot extend the lease of message %s: %s\n", d.ID, oneLine(err.Error()))
					if isCode(err, codes.FailedPrecondition) {
						return // lost for good
					}
				}
			}
		}
	}()
	return func() {
		close(quit)
		<-done
	}
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu   sync.Mutex
	max  int
	buf  []byte
	lost bool // bytes were dropped from the front
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.lost = true
	}
	return len(p), nil
}

// String returns the kept bytes, trimmed of surrounding white space; when
// bytes were dropped, it starts at a line (or at least a character)
// boundary.
func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.buf
	if t.lost {
		if i := bytes.IndexByte(b, '\n'); i >= 0 && i < len(b)-1 {
			b = b[i+1:]
		}
		for len(b) > 0 && !utf8.RuneStart(b[0]) {
			b = b[1:]
		}
	}
	return strings.TrimSpace(string(b))
}

// syncWriter serialises writes to w (commands running at once share
// qbridge's stdout and stderr).
type syncWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (s syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (a *app) syncStdout() io.Writer { return syncWriter{&a.stdoutMu, a.stdout} }
func (a *app) syncStderr() io.Writer { return syncWriter{&a.stderrMu, a.stderr} }
