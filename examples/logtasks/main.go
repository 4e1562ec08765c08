// Command logtasks shows scenario 6, a small task framework, and scenario 8,
// "but what was the result?". Jobs are {task_type, params} records: the
// producer enqueues generate_log_file and parse_log_file tasks with JSON
// params, a worker runs the handler registered for each type (a
// client.ServeMux behind client.NewWorker), and the producer reads back what
// each task returned:
//
//   - generate_log_file {"lines": N} writes N log lines with random levels to
//     a file in the worker's directory and returns {"path", "lines",
//     "levels"}. The producer calls it request/reply with Client.Call.
//   - parse_log_file {"path": ...} counts the lines per level (INFO, WARN,
//     ERROR) and returns them as JSON. The producer enqueues it with
//     WithKeepResult and fetches the outcome with GetResult, waiting for it.
//
// The producer checks that each parse counted what the generate wrote. A
// task that cannot succeed (bad params, a missing file) fails with
// client.SkipRetry and is dead-lettered at once; the producer sees that as a
// *client.TaskError.
//
// With qbridged running (make run):
//
//	go run ./examples/logtasks                          # worker and producer in one process
//	go run ./examples/logtasks -count 10 -lines 5000
//
// or in two terminals (same machine: the worker's files are read back by
// path):
//
//	go run ./examples/logtasks -mode worker -dir /tmp/logs
//	go run ./examples/logtasks -mode producer -count 5
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/qbridge/qbridge/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "logtasks:", err)
		os.Exit(1)
	}
}

// The task types, and the queue they go through.
const (
	generateLogFile = "generate_log_file"
	parseLogFile    = "parse_log_file"
)

// GenerateParams are the params of a generate_log_file task.
type GenerateParams struct {
	Lines int `json:"lines"`
}

// ParseParams are the params of a parse_log_file task.
type ParseParams struct {
	Path string `json:"path"`
}

// LogFile is what both tasks return: a log file and its lines per level.
type LogFile struct {
	Path   string         `json:"path"`
	Lines  int            `json:"lines"`
	Levels map[string]int `json:"levels"`
}

type config struct {
	addr        string
	mode        string
	queue       string
	count       int
	lines       int
	dir         string
	concurrency int
	duration    time.Duration
	timeout     time.Duration
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg config
	fs := flag.NewFlagSet("logtasks", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.StringVar(&cfg.addr, "addr", envOr("QBRIDGE_ADDR", "127.0.0.1:7070"), "qbridged gRPC address (env QBRIDGE_ADDR)")
	fs.StringVar(&cfg.mode, "mode", "both", "producer, worker, or both in one process")
	fs.StringVar(&cfg.queue, "queue", "task:logtasks:queue", "the task queue")
	fs.IntVar(&cfg.count, "count", 3, "producer: how many log files to generate and parse")
	fs.IntVar(&cfg.lines, "lines", 1000, "producer: lines per log file")
	fs.StringVar(&cfg.dir, "dir", "", "worker: where log files are written (default: a new temporary directory, removed at exit)")
	fs.IntVar(&cfg.concurrency, "concurrency", 4, "worker: tasks handled at once")
	fs.DurationVar(&cfg.duration, "duration", 0, "worker: stop after this long (0: at Ctrl-C)")
	fs.DurationVar(&cfg.timeout, "timeout", 30*time.Second, "producer: how long to wait for each result")
	if err := fs.Parse(args); err != nil {
		return err
	}
	out := &lockedWriter{w: stdout}

	c, err := client.Dial(cfg.addr)
	if err != nil {
		return err
	}
	defer c.Close()

	switch cfg.mode {
	case "producer":
		return produce(ctx, c, cfg, out)
	case "worker":
		if cfg.duration > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, cfg.duration)
			defer cancel()
		}
		return work(ctx, c, cfg, out, nil)
	case "both":
		wctx, stopWorker := context.WithCancel(ctx)
		defer stopWorker()
		started := make(chan struct{})
		worked := make(chan error, 1)
		go func() { worked <- work(wctx, c, cfg, out, started) }()
		select {
		case <-started:
		case err := <-worked:
			return err
		}
		err := produce(ctx, c, cfg, out)
		stopWorker()
		return errors.Join(err, <-worked)
	}
	return fmt.Errorf("unknown -mode %q: want producer, worker or both", cfg.mode)
}

// produce generates and parses -count log files, one after the other, and
// checks what the tasks returned.
func produce(ctx context.Context, c *client.Client, cfg config, out io.Writer) error {
	for i := 1; i <= cfg.count; i++ {
		// Request/reply: Call enqueues the task (with WithKeepResult) and
		// waits for its outcome.
		params, _ := json.Marshal(GenerateParams{Lines: cfg.lines})
		cctx, cancel := context.WithTimeout(ctx, cfg.timeout)
		res, err := c.Call(cctx, cfg.queue, generateLogFile, params)
		cancel()
		if err != nil {
			return fmt.Errorf("%s: %w", generateLogFile, err)
		}
		var generated LogFile
		if err := json.Unmarshal(res.Payload, &generated); err != nil {
			return fmt.Errorf("%s returned %q: %w", generateLogFile, res.Payload, err)
		}
		fmt.Fprintf(out, "producer: %s %s -> %s (attempts %d)\n", generateLogFile, params, res.Payload, res.Attempts)

		// Fire and forget, then ask for the result: Enqueue with
		// WithKeepResult, and GetResult waits (without polling) until the
		// worker acked the task.
		params, _ = json.Marshal(ParseParams{Path: generated.Path})
		id, err := c.Enqueue(ctx, cfg.queue, params, client.WithTaskType(parseLogFile), client.WithKeepResult())
		if err != nil {
			return fmt.Errorf("enqueue %s: %w", parseLogFile, err)
		}
		res, err = c.GetResult(ctx, cfg.queue, id, min(cfg.timeout, 5*time.Minute))
		if err != nil {
			return fmt.Errorf("result of %s %s: %w", parseLogFile, id, err)
		}
		if res.State != client.ResultSucceeded {
			return fmt.Errorf("%s %s %s: %s", parseLogFile, id, res.State, res.Error)
		}
		var parsed LogFile
		if err := json.Unmarshal(res.Payload, &parsed); err != nil {
			return fmt.Errorf("%s returned %q: %w", parseLogFile, res.Payload, err)
		}
		fmt.Fprintf(out, "producer: %s %s -> %s (attempts %d)\n", parseLogFile, params, res.Payload, res.Attempts)

		if parsed.Lines != generated.Lines || !sameLevels(parsed.Levels, generated.Levels) {
			return fmt.Errorf("%s counted %d lines %v in %s; %s wrote %d lines %v",
				parseLogFile, parsed.Lines, parsed.Levels, generated.Path, generateLogFile, generated.Lines, generated.Levels)
		}
	}
	fmt.Fprintf(out, "producer: %d log files generated and parsed; every parse matches its generate\n", cfg.count)
	return nil
}

func sameLevels(a, b map[string]int) bool {
	for _, l := range levels {
		if a[l] != b[l] {
			return false
		}
	}
	return true
}

// work runs the worker until ctx ends. started, if not nil, is closed once
// the handlers are registered and the worker is about to consume.
func work(ctx context.Context, c *client.Client, cfg config, out io.Writer, started chan<- struct{}) error {
	dir := cfg.dir
	if dir == "" {
		d, err := os.MkdirTemp("", "logtasks-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	h := &handlers{dir: dir, out: out}

	// One handler per task type; a task of any other type is dead-lettered
	// by the ServeMux ("no handler for task type").
	mux := client.NewServeMux()
	mux.HandleFunc(generateLogFile, h.generate)
	mux.HandleFunc(parseLogFile, h.parse)

	w := client.NewWorker(c, []string{cfg.queue}, mux,
		client.WithConcurrency(cfg.concurrency),
		client.WithWorkerLogger(slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	fmt.Fprintf(out, "worker: consuming %s (%s, %s), log files in %s\n", cfg.queue, generateLogFile, parseLogFile, dir)
	if started != nil {
		close(started)
	}
	return w.Run(ctx)
}

// levels are the log levels generated and counted.
var levels = []string{"INFO", "WARN", "ERROR"}

// handlers are the task handlers of the worker.
type handlers struct {
	dir string // where log files go; parse reads only files in it
	out io.Writer
}

// generate writes the lines of a generate_log_file task to <dir>/<task
// id>.log. A retried task rewrites the same file, so retries are harmless.
func (h *handlers) generate(ctx context.Context, t *client.Task) ([]byte, error) {
	var p GenerateParams
	if err := json.Unmarshal(t.Payload, &p); err != nil {
		return nil, fmt.Errorf("bad params %q: %v: %w", t.Payload, err, client.SkipRetry)
	}
	if p.Lines < 0 || p.Lines > 10_000_000 {
		return nil, fmt.Errorf("lines = %d, want 0 to 10000000: %w", p.Lines, client.SkipRetry)
	}
	path := filepath.Join(h.dir, t.ID+".log")
	f, err := os.Create(path)
	if err != nil {
		return nil, err // maybe a full disk: worth a retry
	}
	defer f.Close()
	res := LogFile{Path: path, Lines: p.Lines, Levels: map[string]int{}}
	bw := bufio.NewWriter(f)
	now := time.Now().UTC()
	for i := range p.Lines {
		if i%1000 == 0 && ctx.Err() != nil {
			return nil, context.Cause(ctx) // the worker stops, or lost the task
		}
		level := levels[0]
		switch r := rand.IntN(10); {
		case r == 0:
			level = levels[2]
		case r < 3:
			level = levels[1]
		}
		res.Levels[level]++
		fmt.Fprintf(bw, "%s %-5s request %d handled in %dms\n",
			now.Add(time.Duration(i)*time.Millisecond).Format(time.RFC3339Nano), level, i+1, rand.IntN(500))
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	fmt.Fprintf(h.out, "worker: %s %s: wrote %d lines to %s\n", t.Type, t.ID, p.Lines, path)
	return json.Marshal(res)
}

// parse counts the lines per level of the file of a parse_log_file task.
func (h *handlers) parse(ctx context.Context, t *client.Task) ([]byte, error) {
	var p ParseParams
	if err := json.Unmarshal(t.Payload, &p); err != nil {
		return nil, fmt.Errorf("bad params %q: %v: %w", t.Payload, err, client.SkipRetry)
	}
	// Read only the files this worker wrote: a task queue that opens any
	// path it is sent is a way into the machine.
	if rel, err := filepath.Rel(h.dir, filepath.Clean(p.Path)); err != nil || !filepath.IsLocal(rel) {
		return nil, fmt.Errorf("%q is not a file in %s: %w", p.Path, h.dir, client.SkipRetry)
	}
	f, err := os.Open(p.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %w", err, client.SkipRetry)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	res := LogFile{Path: p.Path, Levels: map[string]int{}}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if res.Lines%1000 == 0 && ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		res.Lines++
		// "<time> <LEVEL> ...": the level is the second field.
		fields := strings.Fields(sc.Text())
		if len(fields) > 1 {
			res.Levels[fields[1]]++
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	fmt.Fprintf(h.out, "worker: %s %s: %s has %d lines: INFO %d, WARN %d, ERROR %d\n",
		t.Type, t.ID, p.Path, res.Lines, res.Levels["INFO"], res.Levels["WARN"], res.Levels["ERROR"])
	return json.Marshal(res)
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// lockedWriter serialises writes: handlers run concurrently.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
