package server_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// instance is one in-process qbridge server on a loopback port.
type instance struct {
	srv    *server.Server
	gs     *grpc.Server
	addr   string
	client qbridgev1.QueueServiceClient
	admin  qbridgev1.AdminServiceClient
	conn   *grpc.ClientConn
	rdb    *redis.Client // the test's own client (default user): inspection, legacy producers
	svc    *redis.Client // the server's client, as the least-privilege user qbridge runs as
}

type instanceConfig struct {
	db         int
	brokerOpts []broker.Option
	serverOpts []server.Option
}

// startInstance runs a qbridge server against rs and returns a client for it.
func startInstance(t *testing.T, rs *redistest.Server, cfg instanceConfig) *instance {
	t.Helper()
	ro := rs.ServiceOptions(cfg.db) // the least-privilege user qbridge runs as
	ro.MaxRetries, ro.DialTimeout = -1, time.Second
	svc := redis.NewClient(ro)
	rdb := redis.NewClient(&redis.Options{Addr: rs.Addr(), DB: cfg.db, MaxRetries: -1, DialTimeout: time.Second})
	b := broker.New(svc, cfg.brokerOpts...)
	opts := append([]server.Option{
		server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithReapInterval(100 * time.Millisecond),
		server.WithWaitSlice(time.Second),
	}, cfg.serverOpts...)
	srv := server.New(b, opts...)
	srv.Start()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	in := &instance{srv: srv, gs: gs, addr: lis.Addr().String(), client: qbridgev1.NewQueueServiceClient(conn),
		admin: qbridgev1.NewAdminServiceClient(conn), conn: conn, rdb: rdb, svc: svc}
	t.Cleanup(in.stop)
	return in
}

// stop ends the instance like a graceful shutdown with no drain time.
func (in *instance) stop() {
	in.srv.StopStreams()
	in.gs.Stop()
	in.srv.Close()
	_ = in.conn.Close()
	_ = in.rdb.Close()
	if in.svc != nil { // nil when the instance shares one client (embedded_test.go)
		_ = in.svc.Close()
	}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for: %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func enqueueN(t *testing.T, c qbridgev1.QueueServiceClient, queue string, n int) []string {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	var ids []string
	for len(ids) < n {
		batch := min(500, n-len(ids))
		msgs := make([]*qbridgev1.BatchMessage, batch)
		for i := range msgs {
			msgs[i] = &qbridgev1.BatchMessage{Payload: []byte("m" + itoa(len(ids)+i))}
		}
		resp, err := c.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: queue, Messages: msgs})
		if err != nil {
			t.Fatalf("enqueue batch: %v", err)
		}
		ids = append(ids, resp.GetIds()...)
	}
	return ids
}

// stream is a Consume stream with a reader goroutine feeding deliveries.
type stream struct {
	cancel context.CancelFunc
	ch     chan *qbridgev1.Delivery
	errc   chan error
}

func consume(t *testing.T, c qbridgev1.QueueServiceClient, req *qbridgev1.ConsumeRequest) *stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := c.Consume(ctx, req)
	if err != nil {
		cancel()
		t.Fatalf("consume: %v", err)
	}
	s := &stream{cancel: cancel, ch: make(chan *qbridgev1.Delivery, 100000), errc: make(chan error, 1)}
	go func() {
		for {
			resp, err := st.Recv()
			if err != nil {
				s.errc <- err
				close(s.ch)
				return
			}
			for _, d := range resp.GetDeliveries() {
				s.ch <- d
			}
		}
	}()
	t.Cleanup(cancel)
	return s
}

// next waits for one delivery.
func (s *stream) next(t *testing.T, within time.Duration) *qbridgev1.Delivery {
	t.Helper()
	select {
	case d, ok := <-s.ch:
		if !ok {
			t.Fatalf("stream ended: %v", <-s.errc)
		}
		return d
	case <-time.After(within):
		t.Fatalf("no delivery within %v", within)
	}
	return nil
}

// none asserts that nothing is delivered while the server has had the
// chance to: it round-trips a stats call first so a delivery already
// taken would be in the channel.
func (s *stream) none(t *testing.T) {
	t.Helper()
	select {
	case d := <-s.ch:
		t.Fatalf("unexpected delivery %s", d.GetId())
	default:
	}
}

func (s *stream) err(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case err := <-s.errc:
		return err
	case <-time.After(within):
		t.Fatalf("stream still open after %v", within)
	}
	return nil
}

func stats(t *testing.T, c qbridgev1.QueueServiceClient, q string) (ready, inflight int64) {
	t.Helper()
	r, err := c.GetQueueStats(ctxT(t, 5*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil {
		t.Fatalf("stats: %v", err)
	}
	return r.GetReady(), r.GetInFlight()
}

func ack(t *testing.T, c qbridgev1.QueueServiceClient, ds ...*qbridgev1.Delivery) error {
	t.Helper()
	toks := make([]string, len(ds))
	for i, d := range ds {
		toks[i] = d.GetAckToken()
	}
	_, err := c.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: toks})
	return err
}

func wantCode(t *testing.T, err error, code codes.Code, msgPart string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v, want code %v", err, code)
	}
	if msgPart != "" && !strings.Contains(status.Convert(err).Message(), msgPart) {
		t.Fatalf("message %q does not mention %q", status.Convert(err).Message(), msgPart)
	}
}

func lease(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

func itoa(i int) string { return strconv.Itoa(i) }

func ctxCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
