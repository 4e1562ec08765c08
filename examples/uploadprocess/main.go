// Command uploadprocess shows scenario 1, upload then process later: a web
// handler accepts an upload, stores it, enqueues a "process_file" job and
// answers 202 at once with the job's id; a pool of workers does the slow
// part and acks each job with its result, which GET /status/{id} shows.
//
//	POST /upload         multipart form field "file" (curl -F file=@x.txt),
//	                     or a raw body with ?name=x.txt; answers 202
//	                     {"id": ..., "status": "/status/<id>"}
//	GET  /status/{id}    where the job is (ready, in flight, succeeded, ...)
//	                     and its result; ?wait=10s waits for the result
//
// The job must not vanish if a worker dies halfway, and it does not: the
// workers (client.NewWorker) ack a job only after processing it. A worker
// that stops or crashes mid-job leaves it unacked, and qbridge delivers it
// again to another worker (at once when the worker's stream ends, else when
// its lease runs out), with the same id and the next attempt number.
//
// With qbridged running (make run), web app and workers in one process:
//
//	go run ./examples/uploadprocess
//	curl -F file=@README.md http://127.0.0.1:8080/upload
//	curl 'http://127.0.0.1:8080/status/<id>?wait=10s'
//
// or apart, sharing the upload directory. To watch a job survive a worker
// that dies halfway, start the web app and two worker processes, upload a
// file, and stop the worker that prints "processing" (Ctrl-C: after its
// shutdown timeout it gives the job back; kill -9: the job comes back when
// its connection drops, at worst when its lease runs out). The other worker
// then processes it, as attempt 2.
//
//	go run ./examples/uploadprocess -mode web
//	go run ./examples/uploadprocess -mode worker -work 20s -shutdown-timeout 2s   # in two terminals
//	curl -F file=@README.md http://127.0.0.1:8080/upload
package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "uploadprocess:", err)
		os.Exit(1)
	}
}

// processFile is the task type of the jobs.
const processFile = "process_file"

// Job is the payload of a process_file job.
type Job struct {
	Path string `json:"path"` // where the upload is stored
	Name string `json:"name"` // its name as uploaded
	Size int64  `json:"size"`
}

// Result is what processing a file returns (and writes to <path>.done).
type Result struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	Bytes  int64  `json:"bytes"`
	Lines  int    `json:"lines"`
	Words  int    `json:"words"`
	SHA256 string `json:"sha256"`
	Done   string `json:"done"`
}

type config struct {
	addr            string
	mode            string
	http            string
	dir             string
	queue           string
	workers         int
	work            time.Duration
	lease           time.Duration
	shutdownTimeout time.Duration
	maxUpload       int64
	duration        time.Duration
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg config
	fs := flag.NewFlagSet("uploadprocess", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.StringVar(&cfg.addr, "addr", envOr("QBRIDGE_ADDR", "127.0.0.1:7070"), "qbridged gRPC address (env QBRIDGE_ADDR)")
	fs.StringVar(&cfg.mode, "mode", "all", "web (the HTTP app), worker (the worker pool), or all (both in one process)")
	fs.StringVar(&cfg.http, "http", "127.0.0.1:8080", "web: the HTTP listen address")
	fs.StringVar(&cfg.dir, "dir", filepath.Join(os.TempDir(), "qbridge-uploads"), "where uploads are stored (web and workers must share it)")
	fs.StringVar(&cfg.queue, "queue", "task:upload:queue", "the job queue")
	fs.IntVar(&cfg.workers, "workers", 4, "worker: jobs processed at once")
	fs.DurationVar(&cfg.work, "work", time.Second, "worker: how long the slow part of a job takes")
	fs.DurationVar(&cfg.lease, "lease", 10*time.Second, "worker: job lease; a crashed worker's jobs come back after it (the worker extends it while it works)")
	fs.DurationVar(&cfg.shutdownTimeout, "shutdown-timeout", 10*time.Second, "worker: at Ctrl-C, how long running jobs may finish before they are given back")
	fs.Int64Var(&cfg.maxUpload, "max-upload", 32<<20, "web: largest upload, in bytes")
	fs.DurationVar(&cfg.duration, "duration", 0, "stop after this long (0: at Ctrl-C)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if cfg.mode != "all" && cfg.mode != "web" && cfg.mode != "worker" {
		return fmt.Errorf("unknown -mode %q: want web, worker or all", cfg.mode)
	}
	dir, err := filepath.Abs(cfg.dir)
	if err != nil {
		return err
	}
	cfg.dir = dir
	if err := os.MkdirAll(cfg.dir, 0o700); err != nil {
		return err
	}
	if cfg.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.duration)
		defer cancel()
	}
	out := &lockedWriter{w: stdout}

	c, err := client.Dial(cfg.addr)
	if err != nil {
		return err
	}
	defer c.Close()

	if cfg.mode == "worker" {
		fmt.Fprintf(out, "worker: %d workers consuming %s, files in %s\n", cfg.workers, cfg.queue, cfg.dir)
		return newWorker(c, cfg, out).Run(ctx)
	}
	if cfg.mode == "web" {
		return serveWeb(ctx, c, cfg, out)
	}

	// Both. The workers stop after the web app, so that they can still
	// finish the jobs it enqueued while stopping.
	fmt.Fprintf(out, "worker: %d workers consuming %s, files in %s\n", cfg.workers, cfg.queue, cfg.dir)
	wctx, stopWorkers := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWorkers()
	worked := make(chan error, 1)
	go func() { worked <- newWorker(c, cfg, out).Run(wctx) }()
	webErr := serveWeb(ctx, c, cfg, out)
	stopWorkers()
	return errors.Join(webErr, <-worked)
}

// ---- the web app ----

// serveWeb runs the HTTP app until ctx ends.
func serveWeb(ctx context.Context, c *client.Client, cfg config, out io.Writer) error {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) { upload(w, r, c, cfg, out) })
	mux.HandleFunc("GET /status/{id}", func(w http.ResponseWriter, r *http.Request) { jobStatus(w, r, c, cfg) })

	if err := loopbackOnly(cfg.http); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.http)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	url := "http://" + ln.Addr().String()
	fmt.Fprintf(out, "web: serving on %s (curl -F file=@README.md %s/upload)\n", url, url)
	select {
	case <-ctx.Done():
	case err := <-served:
		return err
	}
	// Let requests in progress finish, for a while.
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		// Still busy (or a client holds a connection it never sent a
		// request on): cut the rest off.
		fmt.Fprintf(out, "web: closing connections still open after 5s: %v\n", err)
		return srv.Close()
	}
	return nil
}

// upload stores the uploaded file, enqueues its job and answers 202 at
// once: the slow part is the workers' business.
func upload(w http.ResponseWriter, r *http.Request, c *client.Client, cfg config, out io.Writer) {
	r.Body = http.MaxBytesReader(w, r.Body, cfg.maxUpload)
	name, src, err := uploadedFile(r)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]any{"error": err.Error()})
		return
	}
	f, err := os.CreateTemp(cfg.dir, "*-"+safeName(name))
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, map[string]any{"error": err.Error()})
		return
	}
	size, err := io.Copy(f, src)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		code := http.StatusBadRequest
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			code = http.StatusRequestEntityTooLarge
		}
		writeJSON(w, code, map[string]any{"error": "storing the upload: " + err.Error()})
		return
	}

	payload, _ := json.Marshal(Job{Path: f.Name(), Name: name, Size: size})
	id, err := c.Enqueue(r.Context(), cfg.queue, payload,
		client.WithTaskType(processFile),
		client.WithKeepResult()) // so that /status also shows failures
	if err != nil {
		_ = os.Remove(f.Name())
		httpError(w, "enqueue", err)
		return
	}
	fmt.Fprintf(out, "web: stored %s (%d bytes) as %s, job %s\n", name, size, f.Name(), id)
	w.Header().Set("Location", "/status/"+id)
	writeJSON(w, http.StatusAccepted, map[string]any{"id": id, "name": name, "size": size, "status": "/status/" + id})
}

// uploadedFile returns the name and content of the upload: the form field
// "file" of a multipart request, else the body named by ?name=.
func uploadedFile(r *http.Request) (string, io.Reader, error) {
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt == "multipart/form-data" {
		mr, err := r.MultipartReader()
		if err != nil {
			return "", nil, err
		}
		for {
			part, err := mr.NextPart()
			if err != nil {
				return "", nil, errors.New(`no form field "file" in the upload`)
			}
			if part.FormName() == "file" {
				return cmp.Or(baseName(part.FileName()), "upload"), part, nil
			}
		}
	}
	return cmp.Or(baseName(r.URL.Query().Get("name")), "upload"), r.Body, nil
}

// baseName drops any directories from an uploaded file's name, as browsers
// do ("" stays "").
func baseName(name string) string {
	if name == "" {
		return ""
	}
	return filepath.Base(filepath.FromSlash(strings.ReplaceAll(name, `\`, "/")))
}

// safeName keeps the characters of name that are harmless in a file name.
func safeName(name string) string {
	name = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
			return r
		}
		return '_'
	}, filepath.Base(name))
	name = strings.TrimLeft(name, ".")
	return name[:min(len(name), 100)]
}

// jobStatus answers where a job is and, once it finished, its result.
func jobStatus(w http.ResponseWriter, r *http.Request, c *client.Client, cfg config) {
	ctx, id := r.Context(), r.PathValue("id")
	var res *client.Result
	if s := r.URL.Query().Get("wait"); s != "" {
		wait, err := time.ParseDuration(s)
		if err != nil || wait < 0 || wait > time.Minute {
			writeJSON(w, http.StatusBadRequest, map[string]any{"error": "wait: want a duration up to 1m, like 10s"})
			return
		}
		// Returns as soon as the job finishes (NOT_FOUND if it does not
		// within the wait).
		if res, err = c.GetResult(ctx, cfg.queue, id, wait); err != nil && status.Code(err) != codes.NotFound {
			httpError(w, "result", err)
			return
		}
	}
	info, err := c.GetMessage(ctx, cfg.queue, id)
	if status.Code(err) == codes.NotFound {
		writeJSON(w, http.StatusNotFound, map[string]any{"id": id, "error": "no such job"})
		return
	}
	if err != nil {
		httpError(w, "status", err)
		return
	}
	resp := map[string]any{"id": id, "state": info.State.String(), "deliveries": info.Deliveries}
	if info.TaskType != "" {
		resp["task_type"] = info.TaskType
	}
	if info.LastError != "" {
		resp["last_error"] = info.LastError
	}
	finished := info.State == client.MessageSucceeded || info.State == client.MessageFailed || info.State == client.MessageDead
	if finished && res == nil {
		if res, err = c.GetResult(ctx, cfg.queue, id, 0); err != nil && status.Code(err) != codes.NotFound {
			httpError(w, "result", err)
			return
		}
	}
	if res != nil {
		if json.Valid(res.Payload) {
			resp["result"] = json.RawMessage(res.Payload)
		} else if len(res.Payload) > 0 {
			resp["result"] = string(res.Payload)
		}
		if res.Error != "" {
			resp["error"] = res.Error
		}
		resp["attempts"] = res.Attempts
		resp["finished"] = res.FinishTime.Format(time.RFC3339Nano)
	}
	writeJSON(w, http.StatusOK, resp)
}

// httpError answers with the status matching a qbridge error.
func httpError(w http.ResponseWriter, what string, err error) {
	code := http.StatusInternalServerError
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted:
		code = http.StatusServiceUnavailable
	case codes.InvalidArgument:
		code = http.StatusBadRequest
	case codes.Canceled, codes.DeadlineExceeded:
		code = http.StatusGatewayTimeout
	}
	writeJSON(w, code, map[string]any{"error": what + ": " + status.Convert(err).Message()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// ---- the workers ----

// newWorker returns the worker pool: -workers process_file jobs at once.
func newWorker(c *client.Client, cfg config, out io.Writer) *client.Worker {
	p := &processor{dir: cfg.dir, work: cfg.work, out: out}
	mux := client.NewServeMux()
	mux.HandleFunc(processFile, p.process)
	return client.NewWorker(c, []string{cfg.queue}, mux,
		client.WithConcurrency(cfg.workers),
		client.WithWorkerLease(cfg.lease),
		client.WithShutdownTimeout(cfg.shutdownTimeout),
		client.WithWorkerLogger(slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelInfo}))))
}

// processor processes uploaded files.
type processor struct {
	dir  string
	work time.Duration
	out  io.Writer
}

// process is the process_file handler: after the slow part (-work), it
// counts the file's bytes, lines and words, writes them to <path>.done and
// returns them as the job's result. Running it twice for one job (a
// redelivery) does the same thing twice, harmlessly.
func (p *processor) process(ctx context.Context, t *client.Task) ([]byte, error) {
	var job Job
	if err := json.Unmarshal(t.Payload, &job); err != nil {
		return nil, fmt.Errorf("bad job %q: %v: %w", t.Payload, err, client.SkipRetry)
	}
	// Only files in the upload directory: never open any path a message
	// names.
	if rel, err := filepath.Rel(p.dir, filepath.Clean(job.Path)); err != nil || !filepath.IsLocal(rel) {
		return nil, fmt.Errorf("%q is not in %s: %w", job.Path, p.dir, client.SkipRetry)
	}
	fmt.Fprintf(p.out, "worker: %s %s (attempt %d): processing %s\n", t.Type, t.ID, t.Attempt, job.Name)

	// The slow part. The worker cancels ctx when it stops (after its
	// shutdown timeout) or loses the job: give up then, the job goes back
	// to the queue for another worker.
	timer := time.NewTimer(p.work)
	select {
	case <-timer.C:
	case <-ctx.Done():
		timer.Stop()
		fmt.Fprintf(p.out, "worker: %s %s: stopped halfway (%v); the job goes back to the queue\n", t.Type, t.ID, context.Cause(ctx))
		return nil, context.Cause(ctx)
	}

	data, err := os.ReadFile(job.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %w", err, client.SkipRetry)
	}
	if err != nil {
		return nil, err // retried after a backoff
	}
	sum := sha256.Sum256(data)
	res := Result{
		Name:   job.Name,
		Path:   job.Path,
		Bytes:  int64(len(data)),
		Lines:  bytes.Count(data, []byte("\n")),
		Words:  len(bytes.Fields(data)),
		SHA256: hex.EncodeToString(sum[:]),
		Done:   job.Path + ".done",
	}
	if len(data) > 0 && data[len(data)-1] != '\n' {
		res.Lines++ // a last line without a newline
	}
	body, err := json.Marshal(res)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(res.Done, append(body, '\n'), 0o600); err != nil {
		return nil, err
	}
	fmt.Fprintf(p.out, "worker: %s %s: done: %s has %d lines, %d words, %d bytes\n", t.Type, t.ID, job.Name, res.Lines, res.Words, res.Bytes)
	return body, nil
}

// loopbackOnly refuses a listen address that is not on the loopback
// interface: this example's endpoints have no authentication.
func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("-http %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("-http %q: the example listens on loopback only (127.0.0.1)", addr)
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// lockedWriter serialises writes: handlers and workers print concurrently.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
