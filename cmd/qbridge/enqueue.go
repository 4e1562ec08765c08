package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/qbridge/qbridge/client"
)

const (
	defaultBatchSize = 500
	// pipeLinger is how long a partial batch read from a pipe or file waits
	// for more lines before it is sent (input from a terminal is sent as
	// soon as no more is ready).
	pipeLinger = 100 * time.Millisecond
)

type enqueueOpts struct {
	headers     []string
	id          string
	delay       time.Duration
	at          string
	dedupKey    string
	taskType    string
	orderingKey string
	ttl         time.Duration
	keepResult  bool
	waitForRoom bool
	file        string
	whole       bool
	batchSize   int
}

func (a *app) enqueueCmd() *cobra.Command {
	var o enqueueOpts
	cmd := &cobra.Command{
		Use:   "enqueue QUEUE [PAYLOAD]",
		Short: "Add messages to a queue",
		Long: `Enqueue adds messages to the tail of QUEUE and prints the id of each (with
--output json, one {"queue", "id", "duplicate"} object per message).

The payload is PAYLOAD; without it, each line read from stdin (or from
--file) is one message: empty lines are skipped and the line ending is not
part of the payload. With --whole, the whole input is one message instead.

Lines go out with the batch RPC (EnqueueBatch, all or none per batch), in
batches of up to --batch-size. Lines typed at a terminal are sent as soon as
they are entered; lines from a pipe within 100ms. When stderr is a
terminal and the input is not, a progress bar with the rate is shown there.
If a batch fails, the messages of earlier batches stay enqueued (their ids
were printed) and the command stops with the error.

The options apply to every message; --id and --dedup-key only to a single
message (PAYLOAD or --whole).`,
		Example: `  qbridge enqueue jobs 'hello'
  qbridge enqueue jobs '{"n": 1}' --header content-type=application/json --task-type parse
  qbridge enqueue reports 'daily' --delay 30s
  qbridge enqueue reports 'nightly' --at 2030-01-02T03:00:00Z
  qbridge enqueue orders 'order 42' --dedup-key order-42 --ttl 1h
  qbridge enqueue rpc '2+2' --id job-7 --task-type add --keep-result
  seq 100000 | qbridge enqueue numbers > ids.txt
  qbridge enqueue jobs --file lines.txt
  qbridge enqueue blobs --file image.png --whole
  qbridge enqueue jobs          # then type one message per line; Ctrl-D ends`,
		Args:              cobra.RangeArgs(1, 2),
		ValidArgsFunction: a.completeQueue,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.enqueue(args, &o)
		},
	}
	f := cmd.Flags()
	f.StringArrayVarP(&o.headers, "header", "H", nil, "header `key=value` of every message (repeatable)")
	f.StringVar(&o.id, "id", "", "message id (default: one the server assigns); single message only")
	f.DurationVar(&o.delay, "delay", 0, "deliver no earlier than this long from now, e.g. 30s, 2h")
	f.StringVar(&o.at, "at", "", "deliver no earlier than this `time` (RFC 3339, e.g. 2030-01-02T03:00:00Z)")
	f.StringVar(&o.dedupKey, "dedup-key", "", "idempotency key: a repeat within the queue's dedup window enqueues nothing; single message only")
	f.StringVar(&o.taskType, "task-type", "", "task type workers dispatch on")
	f.StringVar(&o.orderingKey, "ordering-key", "", "on a sharded queue, messages with the same key go to one shard and keep their order")
	f.DurationVar(&o.ttl, "ttl", 0, "drop (or dead-letter) the message if it is not delivered within this time")
	f.BoolVar(&o.keepResult, "keep-result", false, "keep the message's outcome for `qbridge result`")
	f.BoolVar(&o.waitForRoom, "wait-for-room", false, "when the queue is bounded and full, wait for room (up to --timeout) instead of failing")
	f.StringVarP(&o.file, "file", "f", "", "read the messages from this `file` (- for stdin) instead of stdin")
	f.BoolVar(&o.whole, "whole", false, "the whole input (file or stdin) is one message")
	f.IntVar(&o.batchSize, "batch-size", defaultBatchSize, "most messages per EnqueueBatch call (the server's limit is 1000 by default)")
	return cmd
}

// message returns the message template the flags describe (without
// payload).
func (o *enqueueOpts) message() (client.Message, error) {
	m := client.Message{ID: o.id, Delay: o.delay, DedupKey: o.dedupKey, TTL: o.ttl, TaskType: o.taskType, KeepResult: o.keepResult, OrderingKey: o.orderingKey}
	if o.delay < 0 {
		return m, usageErrorf("--delay %v: must not be negative", o.delay)
	}
	if o.ttl < 0 {
		return m, usageErrorf("--ttl %v: must not be negative", o.ttl)
	}
	if o.at != "" {
		if o.delay > 0 {
			return m, usageErrorf("give --delay or --at, not both")
		}
		t, err := time.Parse(time.RFC3339, o.at)
		if err != nil {
			return m, usageErrorf("--at %q: not an RFC 3339 time like 2030-01-02T03:00:00Z or 2030-01-02T04:00:00+01:00", o.at)
		}
		m.DeliverAt = t
	}
	for _, h := range o.headers {
		k, v, ok := strings.Cut(h, "=")
		if !ok || k == "" {
			return m, usageErrorf("--header %q: use key=value", h)
		}
		if m.Headers == nil {
			m.Headers = map[string]string{}
		}
		m.Headers[k] = v
	}
	return m, nil
}

// options turns the template into Enqueue options.
func enqueueOptions(m client.Message, waitForRoom bool) []client.EnqueueOption {
	var opts []client.EnqueueOption
	if m.Headers != nil {
		opts = append(opts, client.WithHeaders(m.Headers))
	}
	if m.ID != "" {
		opts = append(opts, client.WithID(m.ID))
	}
	if m.Delay > 0 {
		opts = append(opts, client.WithDelay(m.Delay))
	}
	if !m.DeliverAt.IsZero() {
		opts = append(opts, client.WithDeliverAt(m.DeliverAt))
	}
	if m.DedupKey != "" {
		opts = append(opts, client.WithDedupKey(m.DedupKey))
	}
	if m.TTL > 0 {
		opts = append(opts, client.WithTTL(m.TTL))
	}
	if m.TaskType != "" {
		opts = append(opts, client.WithTaskType(m.TaskType))
	}
	if m.KeepResult {
		opts = append(opts, client.WithKeepResult())
	}
	if m.OrderingKey != "" {
		opts = append(opts, client.WithOrderingKey(m.OrderingKey))
	}
	if waitForRoom {
		opts = append(opts, client.WithWaitForRoom())
	}
	return opts
}

func (a *app) enqueue(args []string, o *enqueueOpts) error {
	queue := args[0]
	tmpl, err := o.message()
	if err != nil {
		return err
	}
	if o.batchSize < 1 {
		return usageErrorf("--batch-size %d: must be at least 1", o.batchSize)
	}
	if len(args) == 2 && (o.file != "" || o.whole) {
		return usageErrorf("give PAYLOAD or --file/--whole, not both")
	}
	single := len(args) == 2 || o.whole
	if !single && (o.id != "" || o.dedupKey != "") {
		return usageErrorf("--id and --dedup-key name a single message: give PAYLOAD or --whole (reading lines, every message would get the same one)")
	}

	// The input.
	var in io.Reader = a.stdin
	inTTY := isTTY(a.stdin)
	var size int64 = -1 // bytes to read, when known
	if o.file != "" && o.file != "-" {
		f, err := os.Open(o.file)
		if err != nil {
			return usageErrorf("--file: %v", err)
		}
		defer f.Close()
		in, inTTY = f, isTTY(f)
	}
	if f, ok := in.(*os.File); ok && !inTTY {
		if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
			if pos, err := f.Seek(0, io.SeekCurrent); err == nil {
				size = fi.Size() - pos
			}
		}
	}

	c, err := a.client()
	if err != nil {
		return err
	}
	if single {
		payload := []byte{}
		if len(args) == 2 {
			payload = []byte(args[1])
		} else {
			if payload, err = io.ReadAll(in); err != nil {
				return usageErrorf("read the input: %v", err)
			}
		}
		ctx, cancel := a.rpcCtx()
		defer cancel()
		res, err := c.EnqueueResult(ctx, queue, payload, enqueueOptions(tmpl, o.waitForRoom)...)
		if err != nil {
			return err
		}
		return a.out.printEnqueued(queue, res, a.stderr)
	}

	linger := pipeLinger
	if inTTY {
		linger = 0
	}
	var prog *progress
	if isTTY(a.stderr) && !inTTY {
		prog = newProgress(a.stderr, queue, size, termWidth(a.stderr, 80), isTTY(a.stdout))
		prog.start()
		defer prog.stop()
	}
	b := &batcher{a: a, c: c, queue: queue, tmpl: tmpl, waitForRoom: o.waitForRoom, max: o.batchSize, prog: prog}
	return b.run(in, linger)
}

// batcher sends lines as EnqueueBatch calls.
type batcher struct {
	a           *app
	c           *client.Client
	queue       string
	tmpl        client.Message
	waitForRoom bool
	max         int
	prog        *progress

	batch     []client.Message
	batchRead int64 // input bytes of the lines in batch
	firstLine int   // input line number of batch[0]
	sent      int   // messages enqueued so far
}

type inputLine struct {
	payload []byte
	n       int64 // bytes of input it took, with the line end
	lineNo  int
}

// run reads lines from in and enqueues them until the input ends (nil
// error), a call fails, or the command is interrupted.
func (b *batcher) run(in io.Reader, linger time.Duration) error {
	lines := make(chan inputLine, b.max)
	readErr := make(chan error, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		defer close(lines)
		br := bufio.NewReaderSize(in, 64<<10)
		lineNo := 0
		var skipped int64 // bytes of skipped empty lines, counted with the next
		for {
			raw, err := br.ReadBytes('\n')
			if len(raw) > 0 {
				lineNo++
				p := bytes.TrimSuffix(bytes.TrimSuffix(raw, []byte("\n")), []byte("\r"))
				if len(p) == 0 {
					skipped += int64(len(raw))
				} else {
					select {
					case lines <- inputLine{payload: p, n: int64(len(raw)) + skipped, lineNo: lineNo}:
						skipped = 0
					case <-done:
						return
					}
				}
			}
			if err != nil {
				if err != io.EOF {
					readErr <- err
				}
				return
			}
		}
	}()

	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		var (
			l  inputLine
			ok bool
		)
		switch {
		case len(b.batch) == 0:
			select {
			case l, ok = <-lines:
			case <-b.a.ctx.Done():
				return b.a.ctx.Err()
			}
		case linger == 0:
			select {
			case l, ok = <-lines:
			default:
				if err := b.flush(); err != nil {
					return err
				}
				continue
			}
		default:
			select {
			case l, ok = <-lines:
			case <-timer.C:
				if err := b.flush(); err != nil {
					return err
				}
				continue
			case <-b.a.ctx.Done():
				// Send what was read: those lines were taken from the
				// input, and the ids tell the person what went in.
				if err := b.flush(); err != nil {
					return err
				}
				return b.a.ctx.Err()
			}
		}
		if !ok {
			if err := b.flush(); err != nil {
				return err
			}
			select {
			case err := <-readErr:
				return usageErrorf("read the input (line %d): %v", b.firstLine, err)
			default:
			}
			return nil
		}
		if len(b.batch) == 0 {
			b.firstLine = l.lineNo
			if linger > 0 {
				timer.Reset(linger)
			}
		}
		m := b.tmpl
		m.Payload = l.payload
		b.batch = append(b.batch, m)
		b.batchRead += l.n
		if len(b.batch) >= b.max {
			if err := b.flush(); err != nil {
				return err
			}
		}
	}
}

// flush sends the batch. The call is not cancelled by an interrupt (only
// bounded by --timeout), so that the ids printed are exactly what was
// enqueued.
func (b *batcher) flush() error {
	if len(b.batch) == 0 {
		return nil
	}
	var opts []client.EnqueueBatchOption
	if b.waitForRoom {
		opts = append(opts, client.WithBatchWaitForRoom())
	}
	ctx, cancel := b.a.timeoutCtx(context.WithoutCancel(b.a.ctx), 0)
	res, err := b.c.EnqueueBatchResult(ctx, b.queue, b.batch, opts...)
	cancel()
	if err != nil {
		if b.sent > 0 {
			fmt.Fprintf(b.a.stderr, "qbridge: %d messages were enqueued; the batch of input lines %d onwards (%d messages) was not\n",
				b.sent, b.firstLine, len(b.batch))
		}
		return err
	}
	print := func() error { return b.a.out.printEnqueuedBatch(b.queue, res, b.a.stderr) }
	if b.prog != nil {
		err = b.prog.around(print)
	} else {
		err = print()
	}
	if err != nil {
		return err
	}
	b.sent += len(res)
	if b.prog != nil {
		b.prog.add(int64(len(res)), b.batchRead)
	}
	b.batch = b.batch[:0]
	b.batchRead = 0
	return nil
}
