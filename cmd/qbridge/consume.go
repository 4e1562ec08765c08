package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"

	"github.com/qbridge/qbridge/client"
)

type consumeOpts struct {
	count       int
	timeout     time.Duration
	noAck       bool
	exec        string
	result      bool
	concurrency int
	maxInFlight int
	lease       time.Duration
	deadCode    int
}

const consumeLong = `Consume takes messages from QUEUE (several queues: in strict priority order,
highest first; each message comes from the first queue that has one) and
prints each one: "ID<TAB>PAYLOAD" ("QUEUE<TAB>ID<TAB>PAYLOAD" with several
queues), or with --output json an object with every field of the delivery
(id, queue, payload, payload_base64, headers, task_type, attempt,
enqueue_time, lease_deadline, last_error).

Acknowledgement:
  default   each message is acked right after it was printed (at-least-once:
            a message printed but not acked - the command was killed, the
            connection broke - is delivered again, with attempt + 1).
  --no-ack  auto-ack, at-most-once, like a plain Redis BLPOP: the server
            removes each message when it hands it out; nothing is acked, and
            a message the server sent that was not printed is lost.

Stopping:
  --count N    stop after N messages (exit 0). The stream asks the server for
               exactly N (max_messages), so nothing more is taken.
  --timeout D  stop when no message arrives for D (an idle timeout, counted
               while the command is ready for more). Exit 5 when that
               happens before --count messages arrived (without --count:
               before any message arrived); exit 0 when some arrived and
               --count was not given (the queue was drained).
  Ctrl-C       stop (exit 130); messages received but not acked go back to
               the head of their queue at once.
  Note: this --timeout shadows the global one; unary calls (acks) then use
  QBRIDGE_TIMEOUT or the default 10s.

Running a command per message (--exec CMD): CMD runs with "sh -c", with the
payload on its stdin and these environment variables:
  QBRIDGE_ID, QBRIDGE_QUEUE, QBRIDGE_ATTEMPT (1 for the first delivery),
  QBRIDGE_TASK_TYPE, QBRIDGE_LAST_ERROR (the error of the previous attempt)
Its stdout goes to qbridge's stdout (with --concurrency above 1, in one
piece when it ends), or with --result becomes the result stored with the
ack (for 'qbridge result'); its stderr goes to qbridge's stderr, and its
last 4000 bytes are kept as the error text. The exit status
decides what happens to the message:
  0                      ack (with --result: ack with stdout as the result)
  --dead-letter-code     (default 100) dead-letter it now, with the error text
  any other (1, 75 =     retry: delivered again after the queue's backoff,
  EX_TEMPFAIL, killed    with attempt + 1 and the error text as last_error;
  by a signal, ...)      dead-lettered once the queue's max attempts are used
qbridge logs one line per message on stderr, extends the lease while CMD
runs, and runs up to --concurrency commands at once. On Ctrl-C the running
commands get SIGTERM and their messages go back to the queue unsettled.`

const consumeExample = `  qbridge consume jobs                          # print and ack until Ctrl-C
  qbridge consume critical default low          # priority order
  qbridge consume jobs --count 1 --timeout 60s  # wait at most 60s for one message
  qbridge -o json consume jobs --count 10 | jq -r .payload
  qbridge consume jobs --timeout 5s > backlog.txt   # drain: stop once idle for 5s
  qbridge consume jobs --no-ack                 # at-most-once, like BLPOP
  qbridge consume jobs --exec 'wc -c'           # payload on stdin
  qbridge consume jobs --exec ./handle.sh --concurrency 4 --lease 5m
  qbridge consume rpc --exec 'bc' --result      # stdout becomes the result`

func (a *app) consumeCmd() *cobra.Command {
	var o consumeOpts
	cmd := &cobra.Command{
		Use:               "consume QUEUE...",
		Short:             "Take messages from queues: print them, or run a command per message",
		Long:              consumeLong,
		Example:           consumeExample,
		Args:              cobra.MinimumNArgs(1),
		ValidArgsFunction: a.completeQueues,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.consume(args, &o)
		},
	}
	f := cmd.Flags()
	f.IntVarP(&o.count, "count", "n", 0, "stop after this many messages (0: no limit)")
	f.DurationVar(&o.timeout, "timeout", 0, "stop when no message arrives for this long (exit 5 if nothing came); 0: wait forever")
	f.BoolVar(&o.noAck, "no-ack", false, "auto-ack (at-most-once): the server removes messages as it hands them out")
	f.StringVar(&o.exec, "exec", "", "run this shell `command` per message, payload on stdin; its exit status acks, retries or dead-letters it")
	f.BoolVar(&o.result, "result", false, "with --exec: store the command's stdout as the message's result")
	f.IntVarP(&o.concurrency, "concurrency", "c", 1, "with --exec: commands to run at once")
	f.IntVar(&o.maxInFlight, "max-in-flight", 0, "deliveries the server may hand out ahead of acks (default: --concurrency)")
	f.DurationVar(&o.lease, "lease", 0, "lease of each delivery (default: the server's, 30s); extended while --exec runs")
	f.IntVar(&o.deadCode, "dead-letter-code", 100, "with --exec: the exit status that dead-letters the message")
	return cmd
}

func (o *consumeOpts) check() error {
	switch {
	case o.count < 0:
		return usageErrorf("--count %d: must not be negative", o.count)
	case o.timeout < 0:
		return usageErrorf("--timeout %v: must not be negative", o.timeout)
	case o.concurrency < 1:
		return usageErrorf("--concurrency %d: must be at least 1", o.concurrency)
	case o.maxInFlight < 0:
		return usageErrorf("--max-in-flight %d: must not be negative", o.maxInFlight)
	case o.exec == "" && o.result:
		return usageErrorf("--result needs --exec")
	case o.exec == "" && o.concurrency > 1:
		return usageErrorf("--concurrency needs --exec")
	case o.exec != "" && o.noAck:
		return usageErrorf("--no-ack cannot be combined with --exec: the command's outcome could not be reported")
	case o.deadCode < 1 || o.deadCode > 255:
		return usageErrorf("--dead-letter-code %d: use an exit status from 1 to 255", o.deadCode)
	}
	return nil
}

func (a *app) consume(queues []string, o *consumeOpts) error {
	if err := o.check(); err != nil {
		return err
	}
	c, err := a.client()
	if err != nil {
		return err
	}
	window := o.maxInFlight
	if window == 0 {
		window = o.concurrency
	}
	opts := []client.ConsumeOption{client.WithMaxInFlight(window)}
	if o.count > 0 {
		opts = append(opts, client.WithMaxMessages(o.count))
	}
	if o.lease > 0 {
		opts = append(opts, client.WithLease(o.lease))
	}
	if o.noAck {
		opts = append(opts, client.WithAutoAck())
	}
	sctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	var cs *client.Consumer
	if len(queues) == 1 {
		cs, err = c.Consume(sctx, queues[0], opts...)
	} else {
		cs, err = c.ConsumeQueues(sctx, queues, opts...)
	}
	if err != nil {
		return err
	}
	defer cs.Close()

	// The stream is read by one goroutine, so that waiting for a delivery
	// can be bounded (--timeout) and interrupted.
	deliveries := make(chan *client.Delivery)
	streamErr := make(chan error, 1)
	go func() {
		for {
			d, err := cs.Next()
			if err != nil {
				streamErr <- err
				return
			}
			select {
			case deliveries <- d:
			case <-sctx.Done():
				return
			}
		}
	}()

	var (
		withQueue = len(queues) > 1
		running   int // --exec commands running
		results   = make(chan error, o.concurrency)
		received  int
		timer     = time.NewTimer(time.Hour)
		armed     bool
	)
	timer.Stop()
	defer timer.Stop()
	// finish waits for the running commands.
	finish := func() {
		for ; running > 0; running-- {
			<-results
		}
	}
	handle := func(d *client.Delivery) error {
		received++
		if o.exec != "" {
			running++
			go func() { results <- a.execOne(d, o) }()
			return nil
		}
		if err := a.out.printDelivery(d, withQueue); err != nil {
			return usageErrorf("write the output: %v", err)
		}
		if o.noAck {
			return nil
		}
		ctx, cancel := a.rpcCtx()
		err := d.Ack(ctx)
		cancel()
		return a.settleFailed(d, "ack", err)
	}
	for {
		countDone := o.count > 0 && received >= o.count
		if countDone && running == 0 {
			return nil
		}
		in := deliveries
		if countDone || running >= o.concurrency {
			in = nil
		}
		var timeout <-chan time.Time
		switch {
		case o.timeout > 0 && in != nil:
			if !armed {
				timer.Reset(o.timeout)
				armed = true
			}
			timeout = timer.C
		case armed:
			timer.Stop()
			armed = false
		}
		select {
		case d := <-in:
			timer.Stop()
			armed = false
			if err := handle(d); err != nil {
				finish()
				return err
			}
		case err := <-results:
			running--
			if err != nil {
				finish()
				return err
			}
		case <-timeout:
			armed = false
			// A delivery that arrived at the same moment still counts.
			select {
			case d := <-deliveries:
				if err := handle(d); err != nil {
					finish()
					return err
				}
				continue
			default:
			}
			finish()
			switch {
			case o.count > 0:
				return timeoutErrorf("no message for %v: got %d of --count %d", o.timeout, received, o.count)
			case received == 0:
				return timeoutErrorf("no message within %v", o.timeout)
			}
			return nil
		case err := <-streamErr:
			finish()
			return err
		case <-a.ctx.Done():
			finish()
			return a.ctx.Err()
		}
	}
}

// settleFailed reports a failed ack or nack: a lost lease (the message will
// be delivered again) is a warning, anything else ends the command.
func (a *app) settleFailed(d *client.Delivery, what string, err error) error {
	if err == nil {
		return nil
	}
	if isCode(err, codes.FailedPrecondition) {
		fmt.Fprintf(a.stderr, "qbridge: %s of message %s failed; it will be delivered again: %s\n", what, d.ID, oneLine(err.Error()))
		return nil
	}
	return err
}
