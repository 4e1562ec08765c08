// Package dashboard is the web dashboard that qbridged serves on its HTTP
// listener: a queue list with live depth and rates, a page per queue (a chart
// of depth and throughput over the last minutes, peeks at ready, delayed,
// in-flight and dead messages, replay and delete of dead letters, purge,
// pause and resume) and a live tail of a pub/sub channel.
//
// The UI is three hand-written files (index.html, app.js, app.css) embedded
// in the binary: no framework, no CDN, no build step. Everything it shows and
// does goes through the JSON API below.
//
// # Authorization
//
// The dashboard holds no privileges of its own. Every read and action of a
// user is a call to qbridged's own gRPC API (the conn given to New), with the
// request's Authorization header forwarded as the "authorization" metadata,
// so the dashboard obeys exactly the authorization of the gRPC API: a token
// sees the queues it administers (ListQueues), may act on those, and may tail
// the channels it may subscribe to. With WithAuthRequired the UI asks for a
// bearer token (kept in the tab's sessionStorage, never in a cookie) and the
// API answers 401 to requests without an Authorization header.
//
// The calls count against the caller's limits like any other gRPC call: one
// refresh of the queue list (the UI polls every 2 seconds) is a ListQueues
// call per 500 queues and a GetQueueStats call per queue. They reach qbridged
// from the dashboard's own connection, so callers without a principal
// (authentication off) share the per-address limits of that connection.
//
// The history of depth and throughput is the one exception to "everything
// through the gRPC API": a sampler (Run) reads the stats of all queues
// directly (server.(*Server).Snapshot) every interval. The history endpoint
// hands out a queue's samples only after a GetQueueStats call for that queue
// with the caller's credentials succeeded.
//
// Mutating endpoints take POST only, require Content-Type application/json
// (so a cross-site HTML form cannot send them; credentials travel in a
// header, not a cookie), refuse cross-origin requests that browsers mark as
// such, and read at most 256 KiB of body.
//
// # JSON API
//
// Errors are {"error": "<message>"}, the message being the gRPC status
// message where the error came from the gRPC API. The status codes map to HTTP
// as: UNAUTHENTICATED 401, PERMISSION_DENIED 403, INVALID_ARGUMENT 400,
// NOT_FOUND 404, FAILED_PRECONDITION 409, RESOURCE_EXHAUSTED 429 (with
// Retry-After when the status says when), UNAVAILABLE 503, DEADLINE_EXCEEDED
// 504, anything else 500. A POST without Content-Type application/json gets
// 415, a body over the limit 413, a wrong method 405.
//
//	GET  /api/info
//	     {"version": "...", "auth_required": true,
//	      "history": {"interval_seconds": 2, "samples": 300}, "max_queues": 100}
//	     Needs no token.
//
//	GET  /api/queues
//	     {"queues": [Queue...], "truncated": false}
//	     Every queue ListQueues shows the caller (paged through, at most
//	     1000), each with its GetQueueStats, in name order. Queue is:
//	     {"queue": "orders", "ready": 3, "in_flight": 1, "delayed": 0,
//	      "dead": 2, "oldest_ready_age_seconds": 12.5 (null when unknown),
//	      "enqueue_rate": 1.5, "ack_rate": 1.2, "paused": false,
//	      "counters": {"enqueued": 9, "acked": 4, "nacked": 1,
//	                   "lease_expired": 0, "dead_lettered": 2, "expired": 0},
//	      "task_types": {"resize": {...counters}}}   (only when there are any)
//
//	GET  /api/queues/{q}
//	     Queue (GetQueueStats).
//
//	GET  /api/queues/{q}/history
//	     {"queue": "orders", "interval_seconds": 2, "capacity": 300,
//	      "sampled": true, "samples": [{"time": "2026-...Z", "ready": 3,
//	      "in_flight": 1, "delayed": 0, "dead": 2, "enqueued": 9,
//	      "acked": 4}...]}
//	     Oldest first; "sampled" is false for a queue the sampler does not
//	     cover (beyond WithMaxQueues, or not yet seen). Throughput is the
//	     difference of the enqueued and acked totals over time.
//
//	GET  /api/queues/{q}/messages?state=ready|delayed|in_flight|dead&page_token=&page_size=
//	     {"queue": "orders", "state": "dead", "next_page_token": "",
//	      "messages": [Message...]}   (PeekMessages)
//	     Message is {"id", "state", "payload", "payload_encoding": "text" or
//	     "base64", "payload_bytes" (the full size), "payload_truncated",
//	     "headers", "task_type", "enqueue_time", "deliveries",
//	     "deliver_time" (delayed), "lease_deadline" (in flight),
//	     "expire_time", "last_error", "dead_time", "dead_reason" (dead)};
//	     empty fields are left out. Payloads are text when valid UTF-8, else
//	     base64, and cut to their first 4 KiB.
//
//	POST /api/queues/{q}/pause          {}  -> {"queue": "orders", "paused": true}
//	POST /api/queues/{q}/resume         {}  -> {"queue": "orders", "paused": false}
//	POST /api/queues/{q}/purge          {}  -> {"queue": "orders", "purged": 12}
//	POST /api/queues/{q}/dead/replay    {"ids": ["..."]} or {"all": true}
//	                                        -> {"queue": "orders", "replayed": 2}
//	POST /api/queues/{q}/dead/delete    {"ids": ["..."]} or {"all": true}
//	                                        -> {"queue": "orders", "deleted": 2}
//	     The bodies of pause, resume and purge may be empty.
//
//	GET  /api/channels/{c}/tail[?pattern=1]
//	     Server-Sent Events from a Subscribe stream on channel c (or on the
//	     glob pattern c). Events: "subscribed" {"channels": [...],
//	     "patterns": [...]} first, then "message" {"channel", "pattern",
//	     "payload", "payload_encoding", "payload_bytes",
//	     "payload_truncated", "time"} for each message published after it,
//	     and "error" {"error", "status"} if the stream fails after it began
//	     (before that, the error is an ordinary HTTP error response). The
//	     stream ends when the client goes away. An idle stream carries a
//	     comment every 15 seconds. (The UI reads it with fetch: EventSource
//	     cannot send an Authorization header.)
//
// Names in paths are path segments: escape "/" in a queue or channel name as
// %2F (JavaScript's encodeURIComponent does).
package dashboard

import (
	"context"
	"io/fs"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"google.golang.org/grpc"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// snapshotFunc is the signature of server.(*Server).Snapshot.
type snapshotFunc = func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error)

// Dashboard is the web dashboard: an http.Handler for the UI and its JSON
// API, and a history sampler (Run).
type Dashboard struct {
	queues   qbridgev1.QueueServiceClient
	admin    qbridgev1.AdminServiceClient
	snapshot snapshotFunc

	log          *slog.Logger
	authRequired bool
	interval     time.Duration
	samples      int
	maxQueues    int

	hist    *history
	static  *staticFiles
	handler http.Handler
	version string
}

// Option configures a Dashboard.
type Option func(*Dashboard)

// WithLogger sets where the dashboard logs (sampler failures, server-side
// API errors). Default: slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(d *Dashboard) {
		if l != nil {
			d.log = l
		}
	}
}

// WithAuthRequired makes the UI ask for a bearer token (kept in the tab's
// sessionStorage) and send it as "Authorization: Bearer" on every API call;
// API requests without an Authorization header are then answered 401. Set
// it when qbridged authenticates callers.
func WithAuthRequired(b bool) Option { return func(d *Dashboard) { d.authRequired = b } }

// WithHistory sets how often the sampler records the stats of every queue,
// and how many samples it keeps per queue. Default: every 2s, 300 samples
// (10 minutes). Values that are not positive keep the default.
func WithHistory(interval time.Duration, samples int) Option {
	return func(d *Dashboard) {
		if interval > 0 {
			d.interval = interval
		}
		if samples > 0 {
			d.samples = samples
		}
	}
}

// WithMaxQueues bounds how many queues (the first in name order) the sampler
// keeps history for. Default: 100. Values that are not positive keep the
// default.
func WithMaxQueues(n int) Option {
	return func(d *Dashboard) {
		if n > 0 {
			d.maxQueues = n
		}
	}
}

// New returns the dashboard. conn reaches this qbridged's own gRPC API
// (through its authorization); snapshot reads all queue stats directly
// (server.(*Server).Snapshot) for the history sampler.
func New(conn grpc.ClientConnInterface, snapshot func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error), opts ...Option) *Dashboard {
	d := &Dashboard{
		queues:    qbridgev1.NewQueueServiceClient(conn),
		admin:     qbridgev1.NewAdminServiceClient(conn),
		snapshot:  snapshot,
		log:       slog.Default(),
		interval:  2 * time.Second,
		samples:   300,
		maxQueues: 100,
		version:   buildVersion(),
	}
	for _, o := range opts {
		o(d)
	}
	d.hist = newHistory(d.samples)
	d.static = mustStatic()
	d.handler = d.routes()
	return d
}

// ServeHTTP serves the UI and the JSON API. Mount it at "/" of the HTTP
// listener. The tail endpoint streams for as long as the client stays, so
// the listener's http.Server should have no WriteTimeout, or the dashboard
// clears it for those responses where the ResponseWriter allows.
func (d *Dashboard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	d.handler.ServeHTTP(w, r)
}

// Run samples the stats of every queue (the first WithMaxQueues in name
// order) every interval, for the history endpoint, until ctx is done. Call
// it once, in a goroutine of its own.
func (d *Dashboard) Run(ctx context.Context) {
	t := time.NewTicker(d.interval)
	defer t.Stop()
	for {
		d.sampleOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sampleOnce records one sample of every queue the snapshot returns.
func (d *Dashboard) sampleOnce(ctx context.Context) {
	if d.snapshot == nil {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, max(d.interval, 10*time.Second))
	defer cancel()
	stats, truncated, err := d.snapshot(sctx, d.maxQueues)
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		if d.hist.failed(err) {
			d.log.Warn("dashboard: queue history sampling failed; the charts of the queues it could not read stop until it recovers", "err", err)
		}
		d.hist.recordPartial(time.Now(), stats) // the queues that could be read
		return
	}
	if d.hist.record(time.Now(), stats, truncated) {
		d.log.Info("dashboard: queue history sampling recovered")
	}
}

// buildVersion names the build from the main module's version, with the
// VCS revision when the binary was built with it.
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := info.Main.Version
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
	}
	return v
}

// uiFS is the embedded UI, rooted at its folder.
func uiFS() fs.FS {
	sub, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		panic(err) // the folder is embedded: cannot happen
	}
	return sub
}
