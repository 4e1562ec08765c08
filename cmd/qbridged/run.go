package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/auth"
	"github.com/qbridge/qbridge/server/broker"
	"github.com/qbridge/qbridge/server/broker/redisacl"
	"github.com/qbridge/qbridge/server/dashboard"
	"github.com/qbridge/qbridge/server/metrics"
	"github.com/qbridge/qbridge/server/tracing"
)

const (
	// healthInterval is how often Redis is pinged for the health service.
	healthInterval = time.Second
	// pingTimeout bounds one health ping.
	pingTimeout = time.Second
	// loadScriptsTimeout bounds the script preload at startup.
	loadScriptsTimeout = 3 * time.Second
	// keepaliveMinTime is the shortest client ping interval tolerated.
	keepaliveMinTime = 5 * time.Second

	embeddedWarning = "EMBEDDED IN-MEMORY ENGINE: nothing is durable, all messages are lost when qbridged stops; for production set --redis-url / QBRIDGE_REDIS_URL (with --tls-cert/--tls-key, or --plaintext)"
	// panicMessage is what a client sees when a handler panicked.
	panicMessage = "internal error; see qbridged logs"
)

// queueServiceName is the health service name of QueueService.
var (
	queueServiceName = qbridgev1.QueueService_ServiceDesc.ServiceName
	adminServiceName = qbridgev1.AdminService_ServiceDesc.ServiceName
)

// run is qbridged: it parses its configuration, serves until ctx is done,
// then shuts down gracefully. It returns nil after a shutdown caused by ctx
// (and after --help), an error when qbridged cannot start or stops on its
// own.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		writeHelp(stdout)
		return nil
	}
	if err != nil {
		return err
	}
	if cfg.PrintRedisACL {
		printRedisACL(stdout, cfg)
		return nil
	}
	log := newLogger(cfg, stderr)
	redisLog.Store(log)

	// Redis: the configured one, or an embedded engine.
	var opts *redis.UniversalOptions
	if cfg.RedisURL == "" {
		mr := miniredis.NewMiniRedis()
		if err := mr.StartAddr("127.0.0.1:0"); err != nil {
			return fmt.Errorf("start the embedded in-memory engine: %w", err)
		}
		defer func() {
			mr.Close()
			log.Info("embedded in-memory engine stopped")
		}()
		log.Warn(embeddedWarning, "engine_addr", mr.Addr())
		opts = &redis.UniversalOptions{Addrs: []string{mr.Addr()}, DB: max(cfg.RedisDB, 0), ContextTimeoutEnabled: true}
	} else {
		if opts, err = cfg.redisOptions(); err != nil {
			return err
		}
		log.Info("using Redis", "url", redactURL(cfg.RedisURL), "topology", topologyName(opts), "db", opts.DB)
	}
	blockingOpts := *opts
	// One connection per blocking wait, the shared pub/sub connection, and
	// one to spare (per node, on Redis Cluster).
	blockingOpts.PoolSize = cfg.BlockingWaits + 2
	rdb := newRedisClient(opts)
	blocking := newRedisClient(&blockingOpts)
	defer func() {
		_ = blocking.Close()
		_ = rdb.Close()
		log.Info("Redis clients closed")
	}()

	b := broker.New(rdb,
		broker.WithKeyPrefix(cfg.KeyPrefix),
		broker.WithRawQueues(cfg.rawQueueSet()),
		broker.WithShardedChannels(cfg.ShardedChannels...),
		broker.WithBlockingClient(blocking),
		broker.WithDefaults(broker.Policy{
			MaxAttempts:       cfg.MaxAttempts,
			BackoffMin:        cfg.RetryBackoffMin,
			BackoffMax:        cfg.RetryBackoffMax,
			MaxLength:         int64(cfg.MaxLength),
			ExpiredDeadLetter: cfg.ExpiredAction == "dead-letter",
			DedupWindow:       cfg.DedupWindow,
		}),
		broker.WithResultRetention(cfg.ResultRetention),
		broker.WithCoalescing(cfg.Coalescing),
		broker.WithEnqueueReplicas(cfg.EnqueueReplicas, cfg.ReplicasTimeout),
	)
	loadCtx, cancelLoad := context.WithTimeout(ctx, loadScriptsTimeout)
	if err := b.LoadScripts(loadCtx); err != nil {
		// Not fatal: scripts are sent again (EVAL) when Redis lacks them,
		// and the service recovers by itself when Redis comes back.
		log.Warn("cannot preload Lua scripts into Redis; starting anyway, requests fail with UNAVAILABLE until Redis answers", "err", err)
	}
	cancelLoad()

	// Metrics read queue stats through srv, which needs the metrics'
	// observer: hence the late binding.
	var srv *server.Server
	mtr := metrics.New(func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error) {
		return srv.Snapshot(ctx, max)
	}, metrics.WithMaxQueues(cfg.MetricsMaxQueues))
	mtr.AddRedisPool("main", rdb.PoolStats)
	mtr.AddRedisPool("blocking", blocking.PoolStats)
	srv = server.New(b,
		server.WithObserver(mtr.Observer()),
		server.WithLogger(log),
		server.WithMaxPayload(cfg.MaxPayloadBytes),
		server.WithMaxBatch(cfg.MaxBatch),
		server.WithMaxInFlight(cfg.MaxInFlight),
		server.WithLeaseBounds(cfg.DefaultLease, minLease, maxLease),
		server.WithReapInterval(cfg.ReapInterval),
		server.WithWaitSlice(cfg.WaitSlice),
		server.WithSubscriberBuffer(cfg.SubscriberBuffer, 8<<20),
		server.WithIdleQueues(cfg.BlockingWaits, cfg.IdlePoll),
	)
	srv.Start()
	defer func() {
		srv.Close()
		log.Info("queue service stopped")
	}()

	var creds []grpc.ServerOption
	if cfg.TLSCert != "" {
		files, err := newTLSFiles(cfg, log)
		if err != nil {
			return err
		}
		creds = append(creds, grpc.Creds(credentials.NewTLS(files.config())))
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		hupCtx, stopHup := context.WithCancel(context.Background())
		defer stopHup()
		go func() {
			for {
				select {
				case <-hup:
					files.reload()
				case <-hupCtx.Done():
					return
				}
			}
		}()
	}
	guard, err := auth.New(cfg.authConfig(), auth.WithLogger(log))
	if err != nil {
		return fmt.Errorf("authentication settings: %w", err)
	}
	switch {
	case guard.Enabled():
		log.Info("authentication on: callers need a bearer token or a client certificate of a configured principal", "principals", len(cfg.Principals), "public_health", cfg.PublicHealth, "public_reflection", cfg.PublicReflection)
		if cfg.TLSCert == "" {
			log.Warn("bearer tokens are sent in plaintext (no --tls-cert): anyone on the network path can read and reuse them")
		}
	case cfg.RedisURL == "":
		log.Info("authentication off: every caller may do everything (development mode)")
	default:
		log.Warn("AUTHENTICATION OFF: every caller may do everything; define principals in a --config file for production")
	}
	traceOpts, stopTracing, err := tracing.Setup(ctx, tracing.Config{
		Endpoint:    cfg.OTLPEndpoint,
		Protocol:    cfg.OTLPProtocol,
		Insecure:    cfg.OTLPInsecure,
		SampleRatio: cfg.TraceSampleRatio,
		ServiceName: "qbridged",
	}, tracing.WithRawQueues(cfg.rawQueueSet()))
	if err != nil {
		return fmt.Errorf("tracing (--otlp-endpoint): %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := stopTracing(sctx); err != nil {
			log.Warn("could not flush traces", "err", err)
		}
	}()
	if cfg.OTLPEndpoint != "" {
		log.Info("tracing on", "otlp_endpoint", cfg.OTLPEndpoint, "protocol", cfg.OTLPProtocol, "sample_ratio", cfg.TraceSampleRatio)
	}
	// Metrics and tracing first in the chain, so that every call is seen,
	// refused ones included.
	gopts := append(append(mtr.GRPCServerOptions(), traceOpts...), creds...)
	gs := newGRPCServer(cfg, log, guard, gopts...)
	defer gs.Stop() // a no-op after the graceful stop below
	hs := health.NewServer()
	register := func(g *grpc.Server) {
		qbridgev1.RegisterQueueServiceServer(g, srv)
		qbridgev1.RegisterAdminServiceServer(g, srv.Admin())
		healthpb.RegisterHealthServer(g, hs)
		reflection.Register(g)
	}
	register(gs)
	mtr.InitializeGRPC(gs)

	// The dashboard calls this same API, through the same authorization,
	// over an in-memory connection to a twin of gs without TLS.
	var internal *grpc.Server
	var internalConn *grpc.ClientConn
	if cfg.HTTPListen != "" && cfg.Dashboard {
		internal = newGRPCServer(cfg, log, guard)
		register(internal)
		bl := bufconn.Listen(1 << 20)
		go func() { _ = internal.Serve(bl) }()
		defer internal.Stop()
		internalConn, err = grpc.NewClient("passthrough:///qbridged-internal",
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return bl.DialContext(ctx) }),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(cfg.maxRecvMsgSize())))
		if err != nil {
			return fmt.Errorf("dashboard connection: %w", err)
		}
		defer internalConn.Close()
	}

	// Health follows Redis. The first check runs before serving, so the
	// status is right from the first request.
	hctx, stopHealth := context.WithCancel(context.Background())
	ready := &readiness{}
	ready.set(false, "starting")
	hw := &healthWatch{srv: srv, hs: hs, log: log, ready: ready}
	hw.check(hctx)
	healthDone := make(chan struct{})
	go func() {
		defer close(healthDone)
		hw.loop(hctx)
	}()
	defer func() {
		stopHealth()
		<-healthDone
	}()

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s (--listen): %w", cfg.Listen, err)
	}
	security := "plaintext"
	switch {
	case cfg.TLSClientCA != "":
		security = "mutual TLS"
	case cfg.TLSCert != "":
		security = "TLS"
	}
	log.Info("qbridge listening", "grpc", ln.Addr().String(), "transport", security)
	serveErr := make(chan error, 1)
	go func() { serveErr <- gs.Serve(ln) }()

	var hsrv *httpServer
	if cfg.HTTPListen != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /healthz", ready.healthz)
		mux.HandleFunc("GET /readyz", ready.readyz)
		mux.Handle("GET /metrics", mtr.Handler())
		var endpoints []any
		if internalConn != nil {
			dash := dashboard.New(internalConn, srv.Snapshot,
				dashboard.WithLogger(log),
				dashboard.WithAuthRequired(guard.Enabled()),
				dashboard.WithMaxQueues(cfg.MetricsMaxQueues))
			dctx, stopDash := context.WithCancel(context.Background())
			dashDone := make(chan struct{})
			go func() {
				defer close(dashDone)
				dash.Run(dctx)
			}()
			defer func() {
				stopDash()
				<-dashDone
			}()
			mux.Handle("/", dash)
		}
		if hsrv, err = startHTTP(cfg.HTTPListen, mux, log); err != nil {
			gs.Stop()
			return err
		}
		base := "http://" + hsrv.addr()
		endpoints = append(endpoints, "http", hsrv.addr(), "health", base+"/healthz", "ready", base+"/readyz", "metrics", base+"/metrics")
		if internalConn != nil {
			endpoints = append(endpoints, "dashboard", base+"/")
		}
		log.Info("HTTP listening", endpoints...)
	}

	var runErr error
	serving := true
	select {
	case <-ctx.Done():
		log.Info("shutting down", "cause", context.Cause(ctx))
	case err := <-serveErr:
		// Serve only returns early on a listener failure.
		serving = false
		runErr = fmt.Errorf("gRPC server stopped: %w", err)
		log.Error("gRPC server stopped unexpectedly; shutting down", "err", err)
	}

	// 1. Tell load balancers to go elsewhere.
	stopHealth()
	<-healthDone
	hs.Shutdown()
	ready.set(false, "shutting down")
	log.Info("health set to NOT_SERVING")

	// 2. Stop taking work, let consumers settle what they hold, then end
	// the streams; their unacked messages go back to their queues.
	log.Info("draining: new work refused, waiting for consumers to ack", "drain_timeout", cfg.DrainTimeout)
	start := time.Now()
	dctx, cancelDrain := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	srv.Drain(dctx)
	cancelDrain()
	log.Info("drained; streams ended", "took", time.Since(start).Round(time.Millisecond))

	// 3. Let the remaining calls finish, up to --shutdown-timeout.
	stopped := make(chan struct{})
	go func() {
		gs.GracefulStop()
		close(stopped)
	}()
	t := time.NewTimer(cfg.ShutdownTimeout)
	select {
	case <-stopped:
		log.Info("gRPC server stopped")
	case <-t.C:
		log.Warn("calls still running after --shutdown-timeout; closing their connections", "shutdown_timeout", cfg.ShutdownTimeout)
		gs.Stop()
		<-stopped
	}
	t.Stop()
	if serving {
		<-serveErr
	}
	if hsrv != nil {
		hsrv.stop(time.Second)
		log.Info("HTTP server stopped")
	}

	// 4. The deferred steps: queue service, Redis clients, embedded engine.
	return runErr
}

// redisLog is where redisLogger sends go-redis' internal messages: the
// logger of the latest run.
var redisLog atomic.Pointer[slog.Logger]

// redisLogger adapts go-redis' internal logging (a redis.SetLogger target,
// installed by main) to slog. Its messages, mostly failed dials while Redis
// is down, are logged at debug level: health transitions and the queue
// service already report unreachable Redis once, at warn level.
type redisLogger struct{}

func (redisLogger) Printf(ctx context.Context, format string, v ...any) {
	if l := redisLog.Load(); l != nil {
		l.DebugContext(ctx, fmt.Sprintf(format, v...), "source", "go-redis")
	}
}

// newLogger returns the slog logger cfg asks for, writing to w.
func newLogger(cfg *Config, w io.Writer) *slog.Logger {
	ho := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
}

// newGRPCServer returns the gRPC server with keepalive, message size limits
// and the interceptor chain.
func newGRPCServer(cfg *Config, log *slog.Logger, guard *auth.Guard, extra ...grpc.ServerOption) *grpc.Server {
	unary, stream := interceptors(log)
	// The guard comes after logging and panic recovery, so that denials
	// are logged as calls too.
	unary = append(unary, guard.UnaryInterceptors()...)
	stream = append(stream, guard.StreamInterceptors()...)
	if cfg.MaxConcStreams > 0 {
		extra = append(extra, grpc.MaxConcurrentStreams(uint32(cfg.MaxConcStreams)))
	}
	return grpc.NewServer(append(extra, []grpc.ServerOption{
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    cfg.KeepaliveTime,
			Timeout: cfg.KeepaliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             keepaliveMinTime,
			PermitWithoutStream: true,
		}),
		grpc.MaxRecvMsgSize(cfg.maxRecvMsgSize()),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	}...)...)
}

// interceptors returns the one chain used for unary and streaming calls,
// outermost first: call logging, then panic recovery (innermost, so that a
// recovered panic is logged as the INTERNAL error the client sees).
func interceptors(log *slog.Logger) ([]grpc.UnaryServerInterceptor, []grpc.StreamServerInterceptor) {
	logger := logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		log.Log(ctx, slog.Level(lvl), msg, fields...)
	})
	logOpts := []logging.Option{
		logging.WithLogOnEvents(logging.FinishCall),
		logging.WithLevels(callLevel),
		// Who called, on which queue or channel: filled in by the guard
		// during the call (never a credential; payloads are never logged).
		logging.WithFieldsFromContext(func(ctx context.Context) logging.Fields { return auth.CallFields(ctx) }),
	}
	recoverOpts := []recovery.Option{
		recovery.WithRecoveryHandlerContext(func(ctx context.Context, p any) error {
			log.ErrorContext(ctx, "panic in gRPC handler", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			return status.Error(codes.Internal, panicMessage)
		}),
	}
	return []grpc.UnaryServerInterceptor{
			auth.CallInfoUnary,
			logging.UnaryServerInterceptor(logger, logOpts...),
			recovery.UnaryServerInterceptor(recoverOpts...),
		}, []grpc.StreamServerInterceptor{
			auth.CallInfoStream,
			logging.StreamServerInterceptor(logger, logOpts...),
			recovery.StreamServerInterceptor(recoverOpts...),
		}
}

// callLevel is the log level of a finished call. Successful calls and
// streams the client ended are routine (debug: a busy queue makes many);
// the rest follow the library's server defaults.
func callLevel(c codes.Code) logging.Level {
	switch c {
	case codes.OK, codes.Canceled:
		return logging.LevelDebug
	}
	return logging.DefaultServerCodeToLevel(c)
}

// healthWatch sets the health status from Redis reachability.
type healthWatch struct {
	srv *server.Server
	hs  *health.Server
	log *slog.Logger

	known   bool
	serving bool
	ready   *readiness
}

func (h *healthWatch) loop(ctx context.Context) {
	t := time.NewTicker(healthInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			h.check(ctx)
		}
	}
}

// check pings Redis once and updates the status, logging transitions.
func (h *healthWatch) check(ctx context.Context) {
	pctx, cancel := context.WithTimeout(ctx, pingTimeout)
	err := h.srv.Ping(pctx)
	cancel()
	if ctx.Err() != nil {
		return
	}
	serving := err == nil
	h.srv.SetRedisDown(err)
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	h.hs.SetServingStatus("", st)
	h.hs.SetServingStatus(queueServiceName, st)
	h.hs.SetServingStatus(adminServiceName, st)
	if h.ready != nil {
		reason := ""
		if err != nil {
			reason = "Redis unreachable: " + err.Error()
		}
		h.ready.set(serving, reason)
	}
	if h.known && h.serving == serving {
		return
	}
	switch {
	case serving && h.known:
		h.log.Info("Redis reachable again; health SERVING")
	case serving:
		h.log.Info("Redis reachable; health SERVING")
	default:
		h.log.Warn("Redis unreachable; health NOT_SERVING until it answers", "err", err)
	}
	h.known, h.serving = true, serving
}

// printRedisACL writes the ACL of the Redis user qbridged needs, for
// redis-cli and for an ACL file, with a placeholder for the password.
func printRedisACL(w io.Writer, cfg *Config) {
	user := cfg.RedisUsername
	if user == "" {
		user = "qbridge"
	}
	args, line := redisacl.SetUser(user, "PASSWORD", cfg.KeyPrefix), redisacl.ConfigLine(user, "PASSWORD", cfg.KeyPrefix)
	where := ""
	if o, err := redisTopology(cfg.RedisURL); err == nil && o.IsClusterMode {
		// Every node of a Redis Cluster, with what the cluster client asks.
		args, line = redisacl.ClusterSetUser(user, "PASSWORD", cfg.KeyPrefix), redisacl.ClusterConfigLine(user, "PASSWORD", cfg.KeyPrefix)
		where = " on every node of the Redis Cluster"
	}
	words := make([]string, len(args))
	for i, a := range args {
		words[i] = fmt.Sprint(a)
	}
	fmt.Fprintf(w, "# Least-privilege Redis ACL for qbridged (key prefix %q)%s; replace PASSWORD.\n", cfg.KeyPrefix, where)
	fmt.Fprintf(w, "# With redis-cli:\n%s\n", strings.Join(words, " "))
	fmt.Fprintf(w, "# Or as a line of an ACL file (aclfile) or redis.conf:\n%s\n", line)
}
