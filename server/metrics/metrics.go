// Package metrics exposes the Prometheus metrics of one qbridged.
//
// New builds them over a registry; Handler serves that registry (mount it
// at /metrics). The service feeds them through Observer (install it with
// server.WithObserver), GRPCServerOptions and InitializeGRPC (the gRPC
// server), and AddRedisPool (its go-redis clients). Per-queue state is read
// from Redis at scrape time through the snapshot function given to New.
//
// The metric names and labels below are a public contract: dashboards and
// alerts depend on them (deploy/grafana/qbridge-dashboard.json uses them, and
// a test checks that it uses no other).
//
// # Per queue, read from Redis at each scrape
//
// At most WithMaxQueues queues (default 100) are exported per scrape: the
// first ones in name order. Every value is cluster-wide, read from Redis, so
// every instance exports the same ones; aggregate them with max (or query a
// single instance), never with sum. If the snapshot fails (Redis down, or
// slower than WithScrapeTimeout), the scrape still succeeds:
// qbridge_redis_up is 0, qbridge_scrape_errors_total grows, and the
// qbridge_queue_* series and qbridge_queues_truncated are left out.
//
//	qbridge_queue_ready                      gauge     {queue}         messages waiting to be delivered
//	qbridge_queue_in_flight                  gauge     {queue}         messages delivered and not yet acked, nacked or expired
//	qbridge_queue_delayed                    gauge     {queue}         messages waiting for their delivery time
//	qbridge_queue_dead                       gauge     {queue}         dead letters
//	qbridge_queue_oldest_ready_age_seconds   gauge     {queue}         age of the message at the head of the queue (0 when empty or unknown)
//	qbridge_queue_paused                     gauge     {queue}         1 if the queue is paused, else 0
//	qbridge_queue_consumers                  gauge     {queue}         open Consume streams on the queue, over all instances
//	qbridge_queue_messages_total             counter   {queue,event}   the queue's event totals kept in Redis (events below)
//	qbridge_queues_truncated                 gauge     {}              1 if more queues exist than WithMaxQueues lets through, else 0
//	qbridge_redis_up                         gauge     {}              1 if this scrape's snapshot of the queues succeeded, else 0
//	qbridge_scrape_errors_total              counter   {}              snapshots of the queues that failed
//
// qbridge_queue_messages_total has the totals of GetQueueStatsResponse.counters,
// with event enqueued, acked, nacked (dead-lettering nacks included),
// lease_expired, dead_lettered or expired. It is a counter of cluster-wide
// totals: the same value on every instance, and it goes back to 0 when the
// queue is deleted.
//
// # Instance-local, fed by the Observer
//
// These count what this process did. The queue label takes at most
// WithMaxQueues distinct values, the first queues this instance delivers
// from; deliveries from any further queue (and from a queue actually named
// "_other") are counted under queue="_other".
//
//	qbridge_delivered_total                  counter   {queue}         messages sent to Consume streams
//	qbridge_redelivered_total                counter   {queue}         of those, the ones delivered again (attempt > 1)
//	qbridge_delivery_latency_seconds         histogram {queue}         time from enqueue (delay included) to delivery; buckets 1ms to 1h
//	qbridge_pubsub_published_total           counter   {}              successful Publish calls
//	qbridge_pubsub_receivers_total           counter   {}              sum of the receivers (on all instances) Publish reported
//	qbridge_pubsub_delivered_total           counter   {}              messages queued to local Subscribe streams
//	qbridge_pubsub_dropped_total             counter   {}              messages dropped with local subscribers cut off for falling behind
//	qbridge_pubsub_subscribers_cut_off_total counter   {}              local subscribers cut off for falling behind
//
// # Redis connection pools (AddRedisPool)
//
//	qbridge_redis_pool_connections           gauge     {pool,state}    connections; state is idle or total
//	qbridge_redis_pool_hits_total            counter   {pool}          free connection found in the pool
//	qbridge_redis_pool_misses_total          counter   {pool}          no free connection in the pool: a new one was dialed
//	qbridge_redis_pool_timeouts_total        counter   {pool}          waits for a connection that timed out
//
// # gRPC (go-grpc-middleware providers/prometheus)
//
// grpc_type is unary, client_stream, server_stream or bidi_stream.
//
//	grpc_server_started_total                counter   {grpc_type,grpc_service,grpc_method}           RPCs started
//	grpc_server_handled_total                counter   {grpc_type,grpc_service,grpc_method,grpc_code} RPCs completed, by status code
//	grpc_server_msg_received_total           counter   {grpc_type,grpc_service,grpc_method}           stream messages received
//	grpc_server_msg_sent_total               counter   {grpc_type,grpc_service,grpc_method}           stream messages sent
//	grpc_server_handling_seconds             histogram {grpc_type,grpc_service,grpc_method}           time to handle an RPC (for a stream: its lifetime); buckets 0.5ms to 60s
//
// With the default registry, the Go runtime (go_*) and process (process_*)
// collectors are exported too.
package metrics

import (
	"context"
	"fmt"
	"net/http"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server"
)

// Defaults of the options.
const (
	defaultMaxQueues     = 100
	defaultScrapeTimeout = 5 * time.Second
)

// otherQueue is the queue label under which the Observer counts the queues
// past the WithMaxQueues cap.
const otherQueue = "_other"

// snapshotFunc returns the stats of at most max queues and whether there
// were more; (*server.Server).Snapshot is one.
type snapshotFunc = func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error)

// Metrics holds the metrics of one qbridged.
type Metrics struct {
	reg      *prometheus.Registry
	queues   *queueCollector
	observer *observer
	pools    *poolCollector
	grpc     *grpcprom.ServerMetrics
}

type config struct {
	maxQueues     int
	registry      *prometheus.Registry
	scrapeTimeout time.Duration
}

// Option configures Metrics.
type Option func(*config)

// WithMaxQueues caps the queues exported per scrape, and the distinct queue
// label values of the Observer's series (see the package doc). Default: 100.
// n must be at least 1 (New panics otherwise).
func WithMaxQueues(n int) Option { return func(c *config) { c.maxQueues = n } }

// WithRegistry registers the metrics in r instead of a new registry. New
// adds no Go or process collectors to r, and panics if r already holds
// metrics of the same names.
// Default: a new registry (not prometheus.DefaultRegisterer) with the Go and
// process collectors.
func WithRegistry(r *prometheus.Registry) Option { return func(c *config) { c.registry = r } }

// WithScrapeTimeout bounds the Redis work of one scrape (the snapshot of
// the queues); past it the scrape reports qbridge_redis_up 0 and no queue
// series. Default: 5s. d must be positive (New panics otherwise).
func WithScrapeTimeout(d time.Duration) Option { return func(c *config) { c.scrapeTimeout = d } }

// New returns the metrics of one qbridged. snapshot returns per-queue stats:
// (*server.Server).Snapshot fits.
func New(snapshot func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error), opts ...Option) *Metrics {
	c := config{maxQueues: defaultMaxQueues, scrapeTimeout: defaultScrapeTimeout}
	for _, o := range opts {
		o(&c)
	}
	if c.maxQueues < 1 {
		panic(fmt.Sprintf("metrics: WithMaxQueues(%d): the cap must be at least 1", c.maxQueues))
	}
	if c.scrapeTimeout <= 0 {
		panic(fmt.Sprintf("metrics: WithScrapeTimeout(%v): the timeout must be positive", c.scrapeTimeout))
	}
	if snapshot == nil {
		panic("metrics: New: snapshot is nil")
	}
	reg := c.registry
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	m := &Metrics{
		reg:      reg,
		queues:   newQueueCollector(snapshot, c.maxQueues, c.scrapeTimeout),
		observer: newObserver(c.maxQueues),
		pools:    newPoolCollector(),
		grpc: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramBuckets([]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}),
		)),
	}
	reg.MustRegister(m.queues, m.observer, m.pools, m.grpc)
	return m
}

// Observer returns the server.Observer that feeds the instance-local
// series; give it to server.New with server.WithObserver.
func (m *Metrics) Observer() server.Observer { return m.observer }

// GRPCServerOptions returns the options that install the gRPC metrics
// interceptors (a unary and a stream one, as ChainUnaryInterceptor and
// ChainStreamInterceptor, so they may come after other interceptors: calls
// that an earlier interceptor rejects are then not counted).
func (m *Metrics) GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(m.grpc.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(m.grpc.StreamServerInterceptor()),
	}
}

// InitializeGRPC creates the per-method gRPC series, at 0, for every method
// registered on s so far: call it after registering the services.
func (m *Metrics) InitializeGRPC(s *grpc.Server) { m.grpc.InitializeMetrics(s) }

// AddRedisPool exports the stats of a go-redis connection pool with the
// label pool=name; stats is called at each scrape (e.g. client.PoolStats).
// It panics if a pool of that name was already added.
func (m *Metrics) AddRedisPool(name string, stats func() *redis.PoolStats) {
	m.pools.add(name, stats)
}

// Handler returns the HTTP handler that serves the metrics in the
// Prometheus exposition formats; mount it at /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}
