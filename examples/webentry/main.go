// Command webentry shows scenario 7, a web entry point: a small web app
// with one endpoint that enqueues a random job and one that publishes a
// random message, load-tested like siege (10 concurrent clients, 5 rounds
// each) while a listener prints what it gets. It keeps the names users
// already have (scenario 11): the queue task:prodcons:queue and the channel
// task:pubsub:channel.
//
//	GET /prodcons   enqueue a random job (a number, as legacy producers push
//	                it) onto task:prodcons:queue; answers 202 with its id
//	GET /pubsub     publish a random message on task:pubsub:channel; answers
//	                with the number of receivers
//
// With qbridged running (make run), in one command (web app, listener and
// load test in one process; it stops once the listener got everything):
//
//	go run ./examples/webentry
//
// or in three terminals:
//
//	go run ./examples/webentry -mode listen          # consume and subscribe, print
//	go run ./examples/webentry -mode web             # http://127.0.0.1:8080
//	go run ./examples/webentry -mode load            # 10 clients x 5 rounds
//
// (siege -c 10 -r 5 http://127.0.0.1:8080/prodcons works against -mode web
// too.) The listener takes jobs through the worker framework
// (client.NewWorker), so each job is acked after it was printed and reaches
// exactly one listener; start several to share the load.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "webentry:", err)
		os.Exit(1)
	}
}

type config struct {
	addr        string
	mode        string
	http        string
	url         string
	queue       string
	channel     string
	clients     int
	rounds      int
	jobs        int
	messages    int
	concurrency int
	duration    time.Duration
	wait        time.Duration
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	var cfg config
	fs := flag.NewFlagSet("webentry", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.StringVar(&cfg.addr, "addr", envOr("QBRIDGE_ADDR", "127.0.0.1:7070"), "qbridged gRPC address (env QBRIDGE_ADDR)")
	fs.StringVar(&cfg.mode, "mode", "all", "web (the HTTP app), listen (print jobs and messages), load (siege-like load test), or all three in one process")
	fs.StringVar(&cfg.http, "http", "127.0.0.1:8080", "web: the HTTP listen address (all: 127.0.0.1:0)")
	fs.StringVar(&cfg.url, "url", "http://127.0.0.1:8080", "load: the web app's base URL")
	fs.StringVar(&cfg.queue, "queue", "task:prodcons:queue", "the queue /prodcons enqueues onto")
	fs.StringVar(&cfg.channel, "channel", "task:pubsub:channel", "the channel /pubsub publishes on")
	fs.IntVar(&cfg.clients, "clients", 10, "load: concurrent clients")
	fs.IntVar(&cfg.rounds, "rounds", 5, "load: rounds per client (each round hits /prodcons and /pubsub)")
	fs.IntVar(&cfg.jobs, "jobs", 0, "listen: stop after this many jobs (and -messages); 0: no limit")
	fs.IntVar(&cfg.messages, "messages", 0, "listen: stop after this many messages (and -jobs); 0: no limit")
	fs.IntVar(&cfg.concurrency, "concurrency", 4, "listen: jobs handled at once")
	fs.DurationVar(&cfg.duration, "duration", 0, "web, listen: stop after this long (0: at Ctrl-C)")
	fs.DurationVar(&cfg.wait, "wait", 10*time.Second, "all: how long the listener gets to receive everything after the load test")
	if err := fs.Parse(args); err != nil {
		return err
	}
	out := &lockedWriter{w: stdout}
	if cfg.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.duration)
		defer cancel()
	}

	if cfg.mode == "load" {
		return load(ctx, cfg, cfg.url, out)
	}
	c, err := client.Dial(cfg.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	switch cfg.mode {
	case "web":
		return serveWeb(ctx, c, cfg, out, nil)
	case "listen":
		return listen(ctx, c, cfg, out, nil)
	case "all":
		return all(ctx, c, cfg, out)
	}
	return fmt.Errorf("unknown -mode %q: want web, listen, load or all", cfg.mode)
}

// all runs the listener, then the web app, then the load test against it,
// and stops once the listener got every job and message (or -wait passed).
func all(ctx context.Context, c *client.Client, cfg config, out io.Writer) error {
	n := cfg.clients * cfg.rounds
	cfg.jobs, cfg.messages = n, n
	if cfg.http == "127.0.0.1:8080" {
		cfg.http = "127.0.0.1:0" // any free port: nothing else needs to find it
	}

	lctx, stopListener := context.WithCancel(ctx)
	defer stopListener()
	subscribed := make(chan struct{})
	listened := make(chan error, 1)
	go func() { listened <- listen(lctx, c, cfg, out, subscribed) }()
	select {
	case <-subscribed: // publishing now reaches it
	case err := <-listened:
		return err
	}

	wctx, stopWeb := context.WithCancel(ctx)
	defer stopWeb()
	ready := make(chan string, 1)
	served := make(chan error, 1)
	go func() { served <- serveWeb(wctx, c, cfg, out, ready) }()
	var url string
	select {
	case url = <-ready:
	case err := <-served:
		return err
	}

	loadErr := load(ctx, cfg, url, out)
	stopWeb()
	webErr := <-served

	// The listener stops by itself once it got n jobs and n messages.
	timer := time.NewTimer(cfg.wait)
	defer timer.Stop()
	var listenErr error
	select {
	case listenErr = <-listened:
	case <-timer.C:
		stopListener()
		listenErr = <-listened
		if listenErr == nil {
			listenErr = fmt.Errorf("the listener did not get all %d jobs and %d messages within %v", n, n, cfg.wait)
		}
	}
	return errors.Join(loadErr, webErr, listenErr)
}

// serveWeb runs the web app until ctx ends. ready, if not nil, receives its
// base URL once it listens.
func serveWeb(ctx context.Context, c *client.Client, cfg config, out io.Writer, ready chan<- string) error {
	var seq atomic.Int64 // makes every published message unique
	mux := http.NewServeMux()
	mux.HandleFunc("/prodcons", func(w http.ResponseWriter, r *http.Request) {
		job := rand.IntN(100) + 1
		id, err := c.Enqueue(r.Context(), cfg.queue, []byte(strconv.Itoa(job)))
		if err != nil {
			httpError(w, "enqueue", err)
			return
		}
		writeJSON(w, http.StatusAccepted, map[string]any{"id": id, "queue": cfg.queue, "job": job})
	})
	mux.HandleFunc("/pubsub", func(w http.ResponseWriter, r *http.Request) {
		msg := fmt.Sprintf("random message %d-%d", seq.Add(1), rand.IntN(1_000_000))
		n, err := c.Publish(r.Context(), cfg.channel, []byte(msg))
		if err != nil {
			httpError(w, "publish", err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"channel": cfg.channel, "message": msg, "receivers": n})
	})

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
	fmt.Fprintf(out, "web: serving on %s (GET /prodcons, GET /pubsub)\n", url)
	if ready != nil {
		ready <- url
	}
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

// listen subscribes to the channel, then consumes the queue, printing
// what arrives, until ctx ends or it got -jobs jobs and -messages
// messages. subscribed, if not nil, is closed once the subscription is
// confirmed: from then on every published message reaches it.
func listen(ctx context.Context, c *client.Client, cfg config, out io.Writer, subscribed chan<- struct{}) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var jobs, messages atomic.Int64
	reached := func(n *atomic.Int64, limit int) bool { return limit <= 0 || n.Load() >= int64(limit) }
	checkDone := func() {
		if (cfg.jobs > 0 || cfg.messages > 0) && reached(&jobs, cfg.jobs) && reached(&messages, cfg.messages) {
			cancel()
		}
	}

	sub, err := c.Subscribe(ctx, []string{cfg.channel}, nil)
	if err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	defer sub.Close()
	fmt.Fprintf(out, "listen: subscribed to %s, consuming %s\n", cfg.channel, cfg.queue)
	if subscribed != nil {
		close(subscribed)
	}

	var wg sync.WaitGroup
	var subErr error
	wg.Go(func() {
		for {
			m, err := sub.Next()
			if err != nil {
				if ctx.Err() == nil {
					subErr = fmt.Errorf("subscription: %w", err)
					cancel()
				}
				return
			}
			fmt.Fprintf(out, "listen: message on %s: %s\n", m.Channel, m.Payload)
			messages.Add(1)
			checkDone()
		}
	})

	// The worker acks each job once its handler returned: a listener that
	// dies while printing does not lose the job.
	h := client.HandlerFunc(func(_ context.Context, t *client.Task) ([]byte, error) {
		fmt.Fprintf(out, "listen: job %s from %s: %s (attempt %d)\n", t.ID, t.Queue, t.Payload, t.Attempt)
		jobs.Add(1)
		checkDone()
		return nil, nil
	})
	w := client.NewWorker(c, []string{cfg.queue}, h,
		client.WithConcurrency(cfg.concurrency),
		client.WithWorkerLogger(slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	workErr := w.Run(ctx)
	cancel()
	_ = sub.Close()
	wg.Wait()
	fmt.Fprintf(out, "listen: got %d jobs and %d messages\n", jobs.Load(), messages.Load())
	return errors.Join(workErr, subErr)
}

// load is a tiny siege: each of -clients concurrent clients runs -rounds
// rounds of GET /prodcons and GET /pubsub, printing every response.
func load(ctx context.Context, cfg config, base string, out io.Writer) error {
	hc := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: cfg.clients},
	}
	defer hc.CloseIdleConnections()
	var ok, failed atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for cl := 1; cl <= cfg.clients; cl++ {
		wg.Go(func() {
			for round := 1; round <= cfg.rounds; round++ {
				for _, path := range []string{"/prodcons", "/pubsub"} {
					code, body, err := get(ctx, hc, base+path)
					if err != nil {
						failed.Add(1)
						fmt.Fprintf(out, "load: client %d round %d GET %s -> error: %v\n", cl, round, path, err)
						continue
					}
					if code >= 300 {
						failed.Add(1)
						fmt.Fprintf(out, "load: client %d round %d GET %s -> %d %s\n", cl, round, path, code, body)
						continue
					}
					ok.Add(1)
					fmt.Fprintf(out, "load: client %d round %d GET %s -> %d %s\n", cl, round, path, code, body)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	total := ok.Load() + failed.Load()
	fmt.Fprintf(out, "load: %d requests, %d ok, %d failed in %v (%.0f requests/s)\n",
		total, ok.Load(), failed.Load(), elapsed.Round(time.Millisecond), float64(total)/elapsed.Seconds())
	if failed.Load() > 0 {
		return fmt.Errorf("%d of %d requests failed", failed.Load(), total)
	}
	return nil
}

func get(ctx context.Context, hc *http.Client, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	return resp.StatusCode, string(trimNewline(body)), err
}

func trimNewline(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
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

// lockedWriter serialises writes: handlers and clients print concurrently.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
