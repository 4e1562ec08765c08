package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

const (
	directClientName = "qbench-direct"
	serverClientName = "qbench-srv"
)

// env is what every scenario runs against: one Redis, a direct go-redis
// client on it, and a qbridge server (in-process or remote) over it.
type env struct {
	cfg Config

	redisProc *RedisProc // nil with -redis-addr
	redisAddr string
	direct    *redis.Client

	// in-process server (nil with -qbridge-addr)
	srvRDB, srvBlocking *redis.Client
	srv                 *server.Server
	gs                  *grpc.Server
	served              chan error

	qbAddr string
	conns  []*grpc.ClientConn
	qc     qbridgev1.QueueServiceClient
	admin  qbridgev1.AdminServiceClient

	mu     sync.Mutex
	queues []string // qbridge queues used (deleted by flush with a remote qbridge)
	seq    int
}

func newEnv(ctx context.Context, cfg Config) (_ *env, err error) {
	e := &env{cfg: cfg}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if cfg.RedisAddr == "" {
		p, err := StartRedis(ctx)
		if err != nil {
			return nil, err
		}
		e.redisProc = p
		e.redisAddr = p.Addr
	} else {
		e.redisAddr = cfg.RedisAddr
	}
	e.direct = redis.NewClient(&redis.Options{Addr: e.redisAddr, DB: cfg.RedisDB, PoolSize: 256, ClientName: directClientName})
	if err := e.direct.Ping(ctx).Err(); err != nil {
		return nil, fmt.Errorf("redis %s: %w", e.redisAddr, err)
	}
	if cfg.QbridgeAddr == "" {
		// Mirror qbridged's defaults: a default main pool and a separate
		// pool for the blocking waits and pub/sub.
		e.srvRDB = redis.NewClient(&redis.Options{Addr: e.redisAddr, DB: cfg.RedisDB, ClientName: serverClientName})
		e.srvBlocking = redis.NewClient(&redis.Options{Addr: e.redisAddr, DB: cfg.RedisDB, PoolSize: server.DefaultBlockingWaits + 2, ClientName: serverClientName})
		b := broker.New(e.srvRDB, broker.WithKeyPrefix(cfg.KeyPrefix+"q:"), broker.WithBlockingClient(e.srvBlocking))
		if err := b.LoadScripts(ctx); err != nil {
			return nil, err
		}
		e.srv = server.New(b, server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
		e.srv.Start()
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		e.gs = grpc.NewServer()
		qbridgev1.RegisterQueueServiceServer(e.gs, e.srv)
		qbridgev1.RegisterAdminServiceServer(e.gs, e.srv.Admin())
		healthpb.RegisterHealthServer(e.gs, health.NewServer()) // as qbridged does
		e.served = make(chan error, 1)
		go func() { e.served <- e.gs.Serve(lis) }()
		e.qbAddr = lis.Addr().String()
	} else {
		e.qbAddr = cfg.QbridgeAddr
	}
	for i := 0; i < 8; i++ {
		cc, err := grpc.NewClient(e.qbAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, err
		}
		e.conns = append(e.conns, cc)
	}
	e.qc = qbridgev1.NewQueueServiceClient(e.conns[0])
	e.admin = qbridgev1.NewAdminServiceClient(e.conns[0])
	return e, nil
}

// qcN returns a client on the i-th connection (streams are spread).
func (e *env) qcN(i int) qbridgev1.QueueServiceClient {
	return qbridgev1.NewQueueServiceClient(e.conns[i%len(e.conns)])
}

// name returns a fresh name for a queue, key or channel of this run.
func (e *env) name(kind string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seq++
	return fmt.Sprintf("bench-%s-%d", kind, e.seq)
}

// qbQueue returns a fresh qbridge queue name.
func (e *env) qbQueue(kind string) string {
	n := e.name(kind)
	e.mu.Lock()
	e.queues = append(e.queues, n)
	e.mu.Unlock()
	return n
}

// directKey returns a fresh direct Redis key (or channel) name.
func (e *env) directKey(kind string) string { return e.cfg.KeyPrefix + "d:" + e.name(kind) }

// flush empties the benchmark's data: FLUSHDB on the harness's own
// redis-server; otherwise only the keys under the key prefix (and the
// qbridge queues this run used, through the admin API).
func (e *env) flush(ctx context.Context) error {
	if e.redisProc != nil {
		return e.direct.FlushAll(ctx).Err()
	}
	if e.cfg.QbridgeAddr != "" {
		e.mu.Lock()
		qs := e.queues
		e.queues = nil
		e.mu.Unlock()
		for _, q := range qs {
			_, _ = e.admin.DeleteQueue(ctx, &qbridgev1.DeleteQueueRequest{Queue: q, Force: true})
		}
	}
	iter := e.direct.Scan(ctx, 0, e.cfg.KeyPrefix+"*", 1000).Iterator()
	var batch []string
	for iter.Next(ctx) {
		if !strings.HasPrefix(iter.Val(), e.cfg.KeyPrefix) {
			continue
		}
		batch = append(batch, iter.Val())
		if len(batch) == 500 {
			if err := e.direct.Unlink(ctx, batch...).Err(); err != nil {
				return err
			}
			batch = batch[:0]
		}
	}
	if err := iter.Err(); err != nil {
		return err
	}
	if len(batch) > 0 {
		return e.direct.Unlink(ctx, batch...).Err()
	}
	return nil
}

// clientCounts returns the CLIENT LIST count of the Redis: all clients,
// the direct clients, and the in-process server's clients.
func (e *env) clientCounts(ctx context.Context) (total, direct, srv int, err error) {
	s, err := e.direct.ClientList(ctx).Result()
	if err != nil {
		return 0, 0, 0, err
	}
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		if line == "" {
			continue
		}
		total++
		switch {
		case strings.Contains(line, " name="+directClientName+" "):
			direct++
		case strings.Contains(line, " name="+serverClientName+" "):
			srv++
		}
	}
	return total, direct, srv, nil
}

func (e *env) close() {
	for _, c := range e.conns {
		_ = c.Close()
	}
	if e.gs != nil {
		e.gs.Stop()
		<-e.served
	}
	if e.srv != nil {
		e.srv.Close()
	}
	for _, c := range []*redis.Client{e.srvRDB, e.srvBlocking} {
		if c != nil {
			_ = c.Close()
		}
	}
	if e.direct != nil {
		if e.redisProc == nil && e.cfg.RedisAddr != "" {
			_ = e.flush(context.Background())
		}
		_ = e.direct.Close()
	}
	if e.redisProc != nil {
		e.redisProc.Stop()
	}
}

// waitFor polls cond until it is true or the timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}
