package auth_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionalpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/internal/testcerts"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/auth"
	"github.com/qbridge/qbridge/server/broker"
)

// ---- harness ---------------------------------------------------------------

// logBuffer collects the guard's log output; the server writes it from
// many goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lines returns the log lines containing every one of parts.
func (l *logBuffer) lines(parts ...string) []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		ok := line != ""
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// testServer is an in-process qbridge server behind the guard, on TLS on a
// loopback port, wired like qbridged's newGRPCServer (guard interceptors
// after any others), with health and reflection.
type testServer struct {
	addr string
	ca   *testcerts.CA
	logs *logBuffer
}

func startServer(t *testing.T, rs *redistest.Server, db int, cfg auth.Config, clientAuth tls.ClientAuthType) *testServer {
	t.Helper()
	logs := &logBuffer{}
	guard, err := auth.New(cfg, auth.WithLogger(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	if err != nil {
		t.Fatalf("auth.New: %v", err)
	}
	ro := rs.ServiceOptions(db)
	ro.MaxRetries, ro.DialTimeout = -1, time.Second
	svc := redis.NewClient(ro)
	srv := server.New(broker.New(svc),
		server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithReapInterval(100*time.Millisecond),
		server.WithWaitSlice(time.Second),
	)
	srv.Start()

	ca := testcerts.NewCA(t, "auth test CA")
	pair := ca.Server(t, "qbridged")
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{pair.TLS},
		ClientCAs:    ca.Pool(),
		ClientAuth:   clientAuth,
		MinVersion:   tls.VersionTLS12,
	})
	gs := grpc.NewServer(grpc.Creds(creds),
		grpc.ChainUnaryInterceptor(guard.UnaryInterceptors()...),
		grpc.ChainStreamInterceptor(guard.StreamInterceptors()...))
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	healthpb.RegisterHealthServer(gs, health.NewServer())
	reflection.Register(gs)
	gs.RegisterService(&extraService, struct{}{})

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = gs.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.StopStreams()
		gs.Stop()
		<-served
		srv.Close()
		_ = svc.Close()
	})
	return &testServer{addr: lis.Addr().String(), ca: ca, logs: logs}
}

// extraService is a service the guard knows nothing about.
var extraService = grpc.ServiceDesc{
	ServiceName: "qbridge.test.Extra",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{MethodName: "Do", Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		in := new(emptypb.Empty)
		if err := dec(in); err != nil {
			return nil, err
		}
		h := func(context.Context, any) (any, error) { return &emptypb.Empty{}, nil }
		if interceptor == nil {
			return h(ctx, in)
		}
		return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: extraMethod}, h)
	}}},
}

const extraMethod = "/qbridge.test.Extra/Do"

func callExtra(ctx context.Context, c *client) error {
	return c.conn.Invoke(ctx, extraMethod, &emptypb.Empty{}, &emptypb.Empty{})
}

// issueClient issues a client certificate from tmpl (for the SANs
// testcerts.CA.Client does not make).
func issueClient(t *testing.T, ca *testcerts.CA, tmpl *x509.Certificate) *testcerts.Pair {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return &testcerts.Pair{TLS: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}}
}

// authorization is per-RPC credentials sending a fixed authorization value.
type authorization string

func (a authorization) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": string(a)}, nil
}

func (authorization) RequireTransportSecurity() bool { return true }

type client struct {
	conn   *grpc.ClientConn
	q      qbridgev1.QueueServiceClient
	a      qbridgev1.AdminServiceClient
	health healthpb.HealthClient
}

type dialConfig struct {
	authz     string // the authorization metadata value; "" sends none
	cert      *testcerts.Pair
	plaintext bool
}

func bearer(token string) dialConfig { return dialConfig{authz: "Bearer " + token} }

// dial connects to the server with its own connection; it is closed at
// cleanup.
func (s *testServer) dial(t *testing.T, dc dialConfig) *client {
	t.Helper()
	var opts []grpc.DialOption
	if dc.plaintext {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		tc := &tls.Config{RootCAs: s.ca.Pool(), MinVersion: tls.VersionTLS12}
		if dc.cert != nil {
			// Always present it, even when the server's list of
			// acceptable CAs does not name its issuer (a forged one).
			tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &dc.cert.TLS, nil }
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	}
	if dc.authz != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(authorization(dc.authz)))
	}
	conn, err := grpc.NewClient(s.addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &client{conn: conn, q: qbridgev1.NewQueueServiceClient(conn), a: qbridgev1.NewAdminServiceClient(conn), health: healthpb.NewHealthClient(conn)}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t *testing.T, err error, code codes.Code, msgParts ...string) {
	t.Helper()
	if got := status.Code(err); got != code {
		t.Fatalf("got %v (%v), want code %v", got, err, code)
	}
	msg := status.Convert(err).Message()
	for _, p := range msgParts {
		if !strings.Contains(msg, p) {
			t.Fatalf("%v message %q does not mention %q", code, msg, p)
		}
	}
}

// wantUnavailable checks for a connection failure whose message has one of
// the reasons (the TLS alert when the client read it; a reset connection
// is an acceptable way to learn of it too).
func wantUnavailable(t *testing.T, err error, reasons ...string) {
	t.Helper()
	wantCode(t, err, codes.Unavailable)
	msg := status.Convert(err).Message()
	for _, r := range append(reasons, "connection reset by peer", "broken pipe") {
		if strings.Contains(msg, r) {
			return
		}
	}
	t.Fatalf("UNAVAILABLE message %q gives none of the reasons %q", msg, reasons)
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for: %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (c *client) enqueue(t *testing.T, queue string, payload string) error {
	t.Helper()
	_, err := c.q.Enqueue(ctxT(t, 5*time.Second), &qbridgev1.EnqueueRequest{Queue: queue, Payload: []byte(payload)})
	return err
}

func mustEnqueue(t *testing.T, c *client, queue string) {
	t.Helper()
	if err := c.enqueue(t, queue, "m"); err != nil {
		t.Fatalf("enqueue to %s: %v", queue, err)
	}
}

// consumer is a Consume stream with a reader goroutine; it is cancelled at
// cleanup.
type consumer struct {
	cancel context.CancelFunc
	ch     chan *qbridgev1.Delivery
	errc   chan error
}

func (c *client) consume(t *testing.T, req *qbridgev1.ConsumeRequest) *consumer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	st, err := c.q.Consume(ctx, req)
	if err != nil {
		t.Fatalf("consume: %v", err)
	}
	s := &consumer{cancel: cancel, ch: make(chan *qbridgev1.Delivery, 100), errc: make(chan error, 1)}
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
	return s
}

func (s *consumer) next(t *testing.T, within time.Duration) *qbridgev1.Delivery {
	t.Helper()
	select {
	case d, ok := <-s.ch:
		if !ok {
			t.Fatalf("consume stream ended: %v", <-s.errc)
		}
		return d
	case <-time.After(within):
		t.Fatalf("no delivery within %v", within)
	}
	return nil
}

// failure waits for the stream to end and returns its error.
func (s *consumer) failure(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case err := <-s.errc:
		return err
	case <-time.After(within):
		t.Fatalf("consume stream still open after %v", within)
	}
	return nil
}

// subscribe opens a Subscribe stream and returns it with its first event
// or error; the stream is cancelled at cleanup (and by the returned
// cancel).
func (c *client) subscribe(t *testing.T, req *qbridgev1.SubscribeRequest) (qbridgev1.QueueService_SubscribeClient, context.CancelFunc, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	st, err := c.q.Subscribe(ctx, req)
	if err != nil {
		return nil, cancel, err
	}
	first, err := st.Recv()
	if err != nil {
		return nil, cancel, err
	}
	if first.GetSubscribed() == nil {
		t.Fatalf("first Subscribe event is %v, want Subscribed", first)
	}
	return st, cancel, nil
}

func (c *client) mustSubscribe(t *testing.T, req *qbridgev1.SubscribeRequest) (qbridgev1.QueueService_SubscribeClient, context.CancelFunc) {
	t.Helper()
	st, cancel, err := c.subscribe(t, req)
	if err != nil {
		t.Fatalf("subscribe %v: %v", req, err)
	}
	return st, cancel
}

func retryDelay(t *testing.T, err error) time.Duration {
	t.Helper()
	for _, d := range status.Convert(err).Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.GetRetryDelay().AsDuration()
		}
	}
	t.Fatalf("%v has no google.rpc.RetryInfo detail (details: %v)", err, status.Convert(err).Details())
	return 0
}

// listServicesAlpha is listServices over the v1alpha reflection service.
func listServicesAlpha(ctx context.Context, conn *grpc.ClientConn) ([]string, error) {
	st, err := reflectionalpha.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	defer func() { _ = st.CloseSend() }()
	if err := st.Send(&reflectionalpha.ServerReflectionRequest{
		MessageRequest: &reflectionalpha.ServerReflectionRequest_ListServices{ListServices: "*"},
	}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	resp, err := st.Recv()
	if err != nil {
		return nil, err
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names, nil
}

func listServices(ctx context.Context, conn *grpc.ClientConn) ([]string, error) {
	st, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	defer func() { _ = st.CloseSend() }()
	if err := st.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{ListServices: "*"},
	}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	resp, err := st.Recv()
	if err != nil {
		return nil, err
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names, nil
}

// ---- the main configuration ---------------------------------------------

const (
	tokRoot     = "qbt_root_7hQ2xV9pL4mN8kR1sT6wY3zB5cD0fG"
	tokAlice    = "qbt_alice_Kp3Rt7Yw2Qe9Ui5Oa1Sd6Fg8Hj4Lz0X"
	tokBob      = "qbt_bob_Mn5Bv8Cx2Za7Lk3Jh9Gf4Ds1Aq6Wr0Ty"
	tokOps      = "qbt_ops_Pl9Ok8Ij7Uh6Yg5Tf4Rd3Es2Wa1Qz0Xc"
	tokLimited  = "qbt_limited_Vb4Nm7Qw2Er9Ty5Ui1Op6As8Df3Gh"
	tokFree     = "qbt_free_Jk2Lz5Xc8Vb1Nm4Qw7Er0Ty3Ui6Op9As"
	tokBytes    = "qbt_bytes_Df5Gh8Jk1Lz4Xc7Vb0Nm3Qw6Er9Ty2U"
	tokStreamer = "qbt_streamer_Io4Pa7Sd0Fg3Hj6Kl9Zx2Cv5Bn8M"
	tokUnknown  = "qbt_unknown_Zq1Xw2Ce3Vr4Bt5Ny6Mu7Ki8Lo9P"
	basicCred   = "Basic YWxpY2U6czNjcjN0LXBhc3N3b3Jk"
)

var allTokens = []string{tokRoot, tokAlice, tokBob, tokOps, tokLimited, tokFree, tokBytes, tokStreamer, tokUnknown, "YWxpY2U6czNjcjN0LXBhc3N3b3Jk"}

var everything = []auth.Permission{auth.Produce, auth.Consume, auth.Admin, auth.Publish, auth.Subscribe}

func hashes(tokens ...string) []string {
	var hs []string
	for _, t := range tokens {
		hs = append(hs, auth.HashToken(t))
	}
	return hs
}

func mainConfig() auth.Config {
	return auth.Config{
		MaxMessageBytes: 4096,
		Principals: []auth.Principal{
			{Name: "root", TokenHashes: hashes(tokRoot), Grants: []auth.Grant{{Queues: []string{"*"}, Channels: []string{"*"}, Allow: everything}}},
			{Name: "alice", TokenHashes: hashes(tokAlice), Grants: []auth.Grant{
				{Queues: []string{"orders.a"}, Allow: []auth.Permission{auth.Produce, auth.Consume}},
				{Channels: []string{"news.*"}, Allow: []auth.Permission{auth.Subscribe}},
				{Channels: []string{"alerts"}, Allow: []auth.Permission{auth.Publish}},
			}},
			{Name: "bob", TokenHashes: hashes(tokBob), Grants: []auth.Grant{{Queues: []string{"jobs.*"}, Allow: []auth.Permission{auth.Produce, auth.Consume}}}},
			{Name: "ops", TokenHashes: hashes(tokOps), Grants: []auth.Grant{{Queues: []string{"orders.*"}, Allow: []auth.Permission{auth.Admin}}}},
			{Name: "worker", CertNames: []string{"worker-1"}, Grants: []auth.Grant{{Queues: []string{"orders.a"}, Allow: []auth.Permission{auth.Consume}}}},
			{Name: "svc", CertNames: []string{"spiffe://example.org/svc", "svc@example.org"}, Grants: []auth.Grant{{Queues: []string{"orders.a"}, Allow: []auth.Permission{auth.Consume}}}},
			{Name: "limited", TokenHashes: hashes(tokLimited), Grants: []auth.Grant{{Queues: []string{"rate.a"}, Allow: []auth.Permission{auth.Produce}}},
				Limits: auth.Limits{RequestsPerSecond: 5, RequestBurst: 5}},
			{Name: "free", TokenHashes: hashes(tokFree), Grants: []auth.Grant{{Queues: []string{"rate.b"}, Allow: []auth.Permission{auth.Produce}}}},
			{Name: "bytes", TokenHashes: hashes(tokBytes), Grants: []auth.Grant{{Queues: []string{"rate.c"}, Allow: []auth.Permission{auth.Produce}}},
				Limits: auth.Limits{BytesPerSecond: 100}},
			{Name: "streamer", TokenHashes: hashes(tokStreamer), Grants: []auth.Grant{{Queues: []string{"streams.q"}, Channels: []string{"streams.*"}, Allow: []auth.Permission{auth.Consume, auth.Subscribe}}},
				Limits: auth.Limits{MaxStreams: 2}},
		},
	}
}

// ---- tests ----------------------------------------------------------------

func TestGuard(t *testing.T) {
	rs := redistest.Start(t)
	s := startServer(t, rs, 0, mainConfig(), tls.VerifyClientCertIfGiven)
	root := s.dial(t, bearer(tokRoot))
	alice := s.dial(t, bearer(tokAlice))
	bob := s.dial(t, bearer(tokBob))
	ops := s.dial(t, bearer(tokOps))
	anon := s.dial(t, dialConfig{})

	t.Cleanup(func() {
		// Whatever happened, no credential reaches the log.
		logs := s.logs.String()
		for _, tok := range allTokens {
			if strings.Contains(logs, tok) {
				t.Errorf("the guard's log contains the credential %q:\n%s", tok, logs)
			}
		}
	})

	t.Run("no token is unauthenticated", func(t *testing.T) {
		err := anon.enqueue(t, "orders.a", "x")
		wantCode(t, err, codes.Unauthenticated, "requires authentication", "authorization: Bearer <token>", "client certificate")
		if len(s.logs.lines("unauthenticated call: no credentials", "method=/qbridge.v1.QueueService/Enqueue")) == 0 {
			t.Fatalf("no log of the unauthenticated call:\n%s", s.logs)
		}
	})

	t.Run("malformed authorization is unauthenticated", func(t *testing.T) {
		c := s.dial(t, dialConfig{authz: basicCred})
		wantCode(t, c.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "'Bearer <token>'")
		for _, v := range []string{"Bearer", "Bearer ", "Token " + tokAlice, tokAlice} {
			c := s.dial(t, dialConfig{authz: v})
			wantCode(t, c.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "'Bearer <token>'")
		}
		if len(s.logs.lines("authorization metadata is not a bearer token")) == 0 {
			t.Fatalf("no log of the malformed authorization:\n%s", s.logs)
		}
	})

	t.Run("unknown token is unauthenticated", func(t *testing.T) {
		c := s.dial(t, bearer(tokUnknown))
		wantCode(t, c.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "bearer token is not one this server knows")
		// A hash configured as if it were the token is not a token.
		c = s.dial(t, bearer(auth.HashToken(tokAlice)))
		wantCode(t, c.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "bearer token is not one this server knows")
		lines := s.logs.lines("unknown bearer token")
		if len(lines) == 0 {
			t.Fatalf("no log of the unknown token:\n%s", s.logs)
		}
		for _, l := range lines {
			if strings.Contains(l, tokUnknown) || strings.Contains(l, "qbt_") {
				t.Fatalf("the UNAUTHENTICATED log line carries the token: %s", l)
			}
		}
	})

	t.Run("scheme is case-insensitive", func(t *testing.T) {
		c := s.dial(t, dialConfig{authz: "bearer " + tokAlice})
		if err := c.enqueue(t, "orders.a", "x"); err != nil {
			t.Fatalf("lower-case bearer: %v", err)
		}
	})

	t.Run("queue grants", func(t *testing.T) {
		if err := alice.enqueue(t, "orders.a", "hello"); err != nil {
			t.Fatalf("alice enqueue to orders.a: %v", err)
		}
		wantCode(t, alice.enqueue(t, "orders.b", "x"), codes.PermissionDenied,
			`principal "alice"`, "/qbridge.v1.QueueService/Enqueue", `no produce permission on queue "orders.b"`)
		_, err := alice.q.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: "jobs.1", Messages: []*qbridgev1.BatchMessage{{Payload: []byte("x")}}})
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, `"jobs.1"`)
		err = alice.consume(t, &qbridgev1.ConsumeRequest{Queue: "orders.b"}).failure(t, 5*time.Second)
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, "/qbridge.v1.QueueService/Consume", `no consume permission on queue "orders.b"`)
		// Not even a prefix of the granted name.
		err = alice.consume(t, &qbridgev1.ConsumeRequest{Queue: "orders"}).failure(t, 5*time.Second)
		wantCode(t, err, codes.PermissionDenied, `"orders"`)
		// Nothing reached the queues that were denied.
		r, err := root.q.GetQueueStats(ctxT(t, 5*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: "orders.b"})
		if err == nil && r.GetReady() != 0 {
			t.Fatalf("orders.b has %d ready messages after denied enqueues", r.GetReady())
		}
	})

	t.Run("priority consume needs every queue", func(t *testing.T) {
		err := alice.consume(t, &qbridgev1.ConsumeRequest{Queues: []string{"orders.a", "jobs.1"}}).failure(t, 5*time.Second)
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, `queue "jobs.1"`)
		mustEnqueue(t, bob, "jobs.2")
		st := bob.consume(t, &qbridgev1.ConsumeRequest{Queues: []string{"jobs.1", "jobs.2"}, AutoAck: true})
		if d := st.next(t, 10*time.Second); d.GetQueue() != "jobs.2" {
			t.Fatalf("bob's priority consume delivered from %q, want jobs.2", d.GetQueue())
		}
		st.cancel()
	})

	t.Run("ack tokens of another queue", func(t *testing.T) {
		mustEnqueue(t, bob, "jobs.1")
		bobs := bob.consume(t, &qbridgev1.ConsumeRequest{Queue: "jobs.1", MaxInFlight: 1})
		d := bobs.next(t, 10*time.Second)
		mustEnqueue(t, alice, "orders.a")
		as := alice.consume(t, &qbridgev1.ConsumeRequest{Queue: "orders.a", MaxInFlight: 1})
		ad := as.next(t, 10*time.Second)

		ctx := ctxT(t, 5*time.Second)
		_, err := alice.q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}})
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, "/qbridge.v1.QueueService/Ack", `no consume permission on queue "jobs.1"`)
		_, err = alice.q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{ad.GetAckToken(), d.GetAckToken()}})
		wantCode(t, err, codes.PermissionDenied, `queue "jobs.1"`)
		_, err = alice.q.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_DROP})
		wantCode(t, err, codes.PermissionDenied, "/qbridge.v1.QueueService/Nack", `queue "jobs.1"`)
		_, err = alice.q.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{AckTokens: []string{d.GetAckToken()}})
		wantCode(t, err, codes.PermissionDenied, "/qbridge.v1.QueueService/ExtendLease", `queue "jobs.1"`)
		// A malformed token names no queue: the handler rejects it.
		_, err = alice.q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{"v1.!!"}})
		wantCode(t, err, codes.InvalidArgument, "malformed ack token")

		// None of that touched bob's lease; bob and alice settle their own.
		stats, err := root.q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "jobs.1"})
		if err != nil || stats.GetInFlight() != 1 {
			t.Fatalf("jobs.1 in flight after alice's denied calls: %d, %v; want 1", stats.GetInFlight(), err)
		}
		if r, err := bob.q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}}); err != nil || r.GetAcked() != 1 {
			t.Fatalf("bob's own ack: %v, %v", r, err)
		}
		if r, err := alice.q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{ad.GetAckToken()}}); err != nil || r.GetAcked() != 1 {
			t.Fatalf("alice's own ack: %v, %v", r, err)
		}
	})

	t.Run("publish and subscribe grants", func(t *testing.T) {
		ctx := ctxT(t, 5*time.Second)
		if _, err := alice.q.Publish(ctx, &qbridgev1.PublishRequest{Channel: "alerts", Payload: []byte("x")}); err != nil {
			t.Fatalf("alice publish to alerts: %v", err)
		}
		_, _, err := alice.subscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"alerts"}})
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, "/qbridge.v1.QueueService/Subscribe", `no subscribe permission on channel "alerts"`)
		_, err = alice.q.Publish(ctx, &qbridgev1.PublishRequest{Channel: "news.sport", Payload: []byte("x")})
		wantCode(t, err, codes.PermissionDenied, `no publish permission on channel "news.sport"`)

		for _, req := range []*qbridgev1.SubscribeRequest{
			{Patterns: []string{"news.*"}},
			{Patterns: []string{"news.sport.?"}},
			{Patterns: []string{"news.[ab]*"}},
			{Channels: []string{"news.sport"}, Patterns: []string{"news.eu.*"}},
		} {
			_, cancel := alice.mustSubscribe(t, req)
			cancel()
		}
		for _, pat := range []string{"n*", "*", "new?", "news*", "?ews.sport", "[n]ews.*", "news"} {
			_, _, err := alice.subscribe(t, &qbridgev1.SubscribeRequest{Patterns: []string{pat}})
			wantCode(t, err, codes.PermissionDenied, `principal "alice"`, `no subscribe permission on channel pattern "`+pat+`"`)
		}
		// One denied name denies the whole stream.
		_, _, err = alice.subscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"news.sport", "sports"}})
		wantCode(t, err, codes.PermissionDenied, `channel "sports"`)

		// An allowed pattern delivers.
		st, cancel := alice.mustSubscribe(t, &qbridgev1.SubscribeRequest{Patterns: []string{"news.*"}})
		defer cancel()
		if _, err := root.q.Publish(ctx, &qbridgev1.PublishRequest{Channel: "news.sport", Payload: []byte("goal")}); err != nil {
			t.Fatal(err)
		}
		m, err := st.Recv()
		if err != nil || string(m.GetMessage().GetPayload()) != "goal" {
			t.Fatalf("subscribed alice got %v, %v", m, err)
		}
	})

	t.Run("admin calls", func(t *testing.T) {
		mustEnqueue(t, root, "orders.admin")
		ctx := ctxT(t, 5*time.Second)
		_, err := alice.a.PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: "orders.admin"})
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, "/qbridge.v1.AdminService/PurgeQueue", `no admin permission on queue "orders.admin"`)
		_, err = alice.a.PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{Queue: "orders.a"})
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, "/qbridge.v1.AdminService/PeekMessages", `no admin permission on queue "orders.a"`)
		_, err = alice.a.UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: "orders.a", Config: &qbridgev1.QueueConfig{MaxLength: 10}})
		wantCode(t, err, codes.PermissionDenied, "/qbridge.v1.AdminService/UpdateQueueConfig")
		_, err = ops.a.PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: "jobs.1"})
		wantCode(t, err, codes.PermissionDenied, `principal "ops"`, `queue "jobs.1"`)

		peek, err := ops.a.PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{Queue: "orders.admin", State: qbridgev1.MessageState_MESSAGE_STATE_READY})
		if err != nil || len(peek.GetMessages()) != 1 {
			t.Fatalf("ops peek orders.admin: %v, %v", peek, err)
		}
		up, err := ops.a.UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: "orders.admin", Config: &qbridgev1.QueueConfig{MaxLength: 1000}})
		if err != nil || up.GetConfig().GetMaxLength() != 1000 {
			t.Fatalf("ops update config: %v, %v", up, err)
		}
		pr, err := ops.a.PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: "orders.admin"})
		if err != nil || pr.GetPurged() != 1 {
			t.Fatalf("ops purge: %v, %v", pr, err)
		}
		// ops administers, but may not produce.
		wantCode(t, ops.enqueue(t, "orders.admin", "x"), codes.PermissionDenied, `principal "ops"`, `no produce permission`)
	})

	t.Run("list queues is filtered", func(t *testing.T) {
		for _, q := range []string{"orders.a", "orders.list", "jobs.1", "ordersx", "other"} {
			mustEnqueue(t, root, q)
		}
		ctx := ctxT(t, 5*time.Second)
		all, err := root.a.ListQueues(ctx, &qbridgev1.ListQueuesRequest{PageSize: 1000})
		if err != nil {
			t.Fatal(err)
		}
		var want []string
		for _, q := range all.GetQueues() {
			if strings.HasPrefix(q, "orders.") {
				want = append(want, q)
			}
		}
		for _, q := range []string{"orders.a", "orders.list", "jobs.1", "ordersx", "other"} {
			if !slices.Contains(all.GetQueues(), q) {
				t.Fatalf("root's ListQueues %v lacks %s", all.GetQueues(), q)
			}
		}
		got, err := ops.a.ListQueues(ctx, &qbridgev1.ListQueuesRequest{PageSize: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got.GetQueues(), want) || len(want) < 2 {
			t.Fatalf("ops' ListQueues = %v, want %v", got.GetQueues(), want)
		}
		_, err = alice.a.ListQueues(ctx, &qbridgev1.ListQueuesRequest{})
		wantCode(t, err, codes.PermissionDenied, `principal "alice"`, "no admin permission on any queue")

		// Paging through one queue at a time gives the same list.
		var paged []string
		for tok, pages := "", 0; ; pages++ {
			if pages > 100 {
				t.Fatal("ListQueues paging does not end")
			}
			r, err := ops.a.ListQueues(ctx, &qbridgev1.ListQueuesRequest{PageSize: 1, PageToken: tok})
			if err != nil {
				t.Fatalf("ops' ListQueues page %d: %v", pages, err)
			}
			paged = append(paged, r.GetQueues()...)
			if tok = r.GetNextPageToken(); tok == "" {
				break
			}
		}
		if !slices.Equal(paged, want) {
			t.Fatalf("ops' ListQueues one page at a time = %v, want %v", paged, want)
		}
	})

	t.Run("list queues page tokens reveal no other queue", func(t *testing.T) {
		// The response filter hides the queues ops may not administer;
		// the page tokens it is handed must not name them either.
		for _, q := range []string{"jobs.1", "orders.list", "ordersx"} {
			mustEnqueue(t, root, q)
		}
		ctx := ctxT(t, 5*time.Second)
		for tok, pages := "", 0; pages < 100; pages++ {
			r, err := ops.a.ListQueues(ctx, &qbridgev1.ListQueuesRequest{PageSize: 1, PageToken: tok})
			if err != nil {
				t.Fatalf("ops' ListQueues: %v", err)
			}
			if tok = r.GetNextPageToken(); tok == "" {
				break
			}
			_, enc, _ := strings.Cut(tok, ".")
			if b, err := base64.RawURLEncoding.DecodeString(enc); err == nil && !strings.HasPrefix(string(b), "orders.") {
				t.Errorf("ops (admin of orders.*) got page %d with queues %v and next_page_token %q, which decodes to the queue name %q it may not see", pages, r.GetQueues(), tok, b)
			}
		}
	})

	t.Run("queue stats with any queue permission", func(t *testing.T) {
		mustEnqueue(t, root, "orders.a")
		worker := s.dial(t, dialConfig{cert: s.ca.Client(t, "worker-1")})
		ctx := ctxT(t, 5*time.Second)
		for name, c := range map[string]*client{"alice (produce, consume)": alice, "ops (admin)": ops, "worker (consume)": worker} {
			if _, err := c.q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "orders.a"}); err != nil {
				t.Errorf("%s: stats of orders.a: %v", name, err)
			}
		}
		_, err := bob.q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "orders.a"})
		wantCode(t, err, codes.PermissionDenied, `principal "bob"`, `produce or consume or admin permission on queue "orders.a"`)
		_, err = ops.q.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "orders.a", Id: "x"})
		wantCode(t, err, codes.PermissionDenied, `principal "ops"`, `produce or consume permission`)
	})

	t.Run("health and reflection need credentials", func(t *testing.T) {
		ctx := ctxT(t, 5*time.Second)
		_, err := anon.health.Check(ctx, &healthpb.HealthCheckRequest{})
		wantCode(t, err, codes.Unauthenticated, "requires authentication")
		_, err = listServices(ctx, anon.conn)
		wantCode(t, err, codes.Unauthenticated, "requires authentication")
		_, err = listServicesAlpha(ctx, anon.conn)
		wantCode(t, err, codes.Unauthenticated, "requires authentication")

		r, err := bob.health.Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health check with a token: %v, %v", r, err)
		}
		names, err := listServices(ctx, bob.conn)
		if err != nil || !slices.Contains(names, "qbridge.v1.QueueService") {
			t.Fatalf("reflection with a token: %v, %v", names, err)
		}
		names, err = listServicesAlpha(ctx, bob.conn)
		if err != nil || !slices.Contains(names, "qbridge.v1.QueueService") {
			t.Fatalf("v1alpha reflection with a token: %v, %v", names, err)
		}
	})

	t.Run("unknown methods are denied", func(t *testing.T) {
		ctx := ctxT(t, 5*time.Second)
		wantCode(t, callExtra(ctx, root), codes.PermissionDenied, `principal "root"`, extraMethod, "not covered by qbridge's authorization")
		wantCode(t, callExtra(ctx, anon), codes.Unauthenticated, "requires authentication")
	})

	t.Run("client certificates", func(t *testing.T) {
		mustEnqueue(t, root, "orders.a")
		byCN := s.dial(t, dialConfig{cert: s.ca.Client(t, "worker-1")})
		bySAN := s.dial(t, dialConfig{cert: s.ca.Client(t, "host-17.example", "other.example", "worker-1")})
		for name, c := range map[string]*client{"common name": byCN, "DNS SAN": bySAN} {
			ctx := ctxT(t, 10*time.Second)
			if _, err := c.q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "orders.a"}); err != nil {
				t.Fatalf("%s: worker stats: %v", name, err)
			}
			// It is "worker", which may consume but not produce.
			wantCode(t, c.enqueue(t, "orders.a", "x"), codes.PermissionDenied, `principal "worker"`, `no produce permission on queue "orders.a"`)
		}
		st := byCN.consume(t, &qbridgev1.ConsumeRequest{Queue: "orders.a", AutoAck: true})
		st.next(t, 10*time.Second)
		st.cancel()

		spiffe, _ := url.Parse("spiffe://example.org/svc")
		for name, tmpl := range map[string]*x509.Certificate{
			"URI SAN":    {Subject: pkix.Name{CommonName: "svc-7"}, URIs: []*url.URL{spiffe}},
			"e-mail SAN": {EmailAddresses: []string{"other@example.org", "svc@example.org"}},
		} {
			c := s.dial(t, dialConfig{cert: issueClient(t, s.ca, tmpl)})
			if _, err := c.q.GetQueueStats(ctxT(t, 10*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: "orders.a"}); err != nil {
				t.Fatalf("%s: svc stats: %v", name, err)
			}
			wantCode(t, c.enqueue(t, "orders.a", "x"), codes.PermissionDenied, `principal "svc"`)
		}
		nameless := s.dial(t, dialConfig{cert: issueClient(t, s.ca, &x509.Certificate{})})
		wantCode(t, nameless.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "client certificate")

		stranger := s.dial(t, dialConfig{cert: s.ca.Client(t, "stranger", "stranger.example")})
		wantCode(t, stranger.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "client certificate")
		// A certificate from another CA is not verified: no handshake.
		// (The impostor CA even has the real one's name.)
		other := testcerts.NewCA(t, "auth test CA")
		forged := s.dial(t, dialConfig{cert: other.Client(t, "worker-1")})
		wantUnavailable(t, forged.enqueue(t, "orders.a", "x"), "tls: unknown certificate authority")
		// A token still works next to an unknown certificate.
		both := s.dial(t, dialConfig{cert: s.ca.Client(t, "stranger"), authz: "Bearer " + tokAlice})
		if err := both.enqueue(t, "orders.a", "x"); err != nil {
			t.Fatalf("token with an unknown certificate: %v", err)
		}
	})

	t.Run("plaintext client", func(t *testing.T) {
		c := s.dial(t, dialConfig{plaintext: true})
		wantUnavailable(t, c.enqueue(t, "orders.a", "x"), "error reading server preface")
	})

	t.Run("request rate", func(t *testing.T) {
		limited := s.dial(t, bearer(tokLimited))
		free := s.dial(t, bearer(tokFree))
		const n = 20
		type result struct {
			who string
			err error
		}
		results := make(chan result, 2*n)
		var wg sync.WaitGroup
		for range n {
			wg.Add(2)
			go func() { defer wg.Done(); results <- result{"limited", limited.enqueue(t, "rate.a", "x")} }()
			go func() { defer wg.Done(); results <- result{"free", free.enqueue(t, "rate.b", "x")} }()
		}
		wg.Wait()
		close(results)
		var ok, exhausted int
		for r := range results {
			switch {
			case r.who == "free":
				if r.err != nil {
					t.Errorf("the unlimited principal got %v", r.err)
				}
			case r.err == nil:
				ok++
			default:
				wantCode(t, r.err, codes.ResourceExhausted, `principal "limited" is over its request rate of 5/s (burst 5)`, "retry in")
				if d := retryDelay(t, r.err); d <= 0 || d > time.Second {
					t.Errorf("RetryInfo delay %v; want in (0, 1s] at 5 requests/s", d)
				}
				exhausted++
			}
		}
		if exhausted == 0 || ok < 5 {
			t.Fatalf("limited principal: %d ok, %d RESOURCE_EXHAUSTED of %d; want at least the burst of 5 ok and some exhausted", ok, exhausted, n)
		}
		// The bucket refills.
		eventually(t, 5*time.Second, "the limited principal may enqueue again", func() bool {
			return limited.enqueue(t, "rate.a", "x") == nil
		})
	})

	t.Run("byte rate", func(t *testing.T) {
		c := s.dial(t, bearer(tokBytes))
		big := strings.Repeat("b", 3000)
		if err := c.enqueue(t, "rate.c", big); err != nil {
			t.Fatalf("first large enqueue: %v", err)
		}
		err := c.enqueue(t, "rate.c", big)
		wantCode(t, err, codes.ResourceExhausted, `principal "bytes" is over its byte rate of 100 bytes/s`)
		if d := retryDelay(t, err); d < 10*time.Second || d > 40*time.Second {
			t.Errorf("RetryInfo delay %v; want about the 20s that 2000 more bytes take at 100 bytes/s", d)
		}
		// What is left of the burst still takes a small request.
		if err := c.enqueue(t, "rate.c", "small"); err != nil {
			t.Fatalf("small enqueue after the refusal: %v", err)
		}
	})

	t.Run("stream limit", func(t *testing.T) {
		c := s.dial(t, bearer(tokStreamer))
		_, cancel1 := c.mustSubscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"streams.x"}})
		_, cancel2 := c.mustSubscribe(t, &qbridgev1.SubscribeRequest{Patterns: []string{"streams.*"}})
		_, _, err := c.subscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"streams.y"}})
		wantCode(t, err, codes.ResourceExhausted, `principal "streamer" already has 2 streams open`)
		err = c.consume(t, &qbridgev1.ConsumeRequest{Queue: "streams.q"}).failure(t, 5*time.Second)
		wantCode(t, err, codes.ResourceExhausted, `principal "streamer" already has 2 streams open`)
		// Across connections too.
		c2 := s.dial(t, bearer(tokStreamer))
		_, _, err = c2.subscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"streams.y"}})
		wantCode(t, err, codes.ResourceExhausted, "already has 2 streams open")
		// Others are not affected.
		_, cancelA := alice.mustSubscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"news.x"}})
		cancelA()

		cancel1()
		eventually(t, 10*time.Second, "a stream slot frees up after one stream ends", func() bool {
			_, cancel, err := c.subscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"streams.y"}})
			if err != nil {
				cancel()
				if status.Code(err) != codes.ResourceExhausted {
					t.Fatalf("while waiting for a free slot: %v", err)
				}
				return false
			}
			return true
		})
		cancel2()
	})

	t.Run("denials are logged with the principal", func(t *testing.T) {
		wantCode(t, alice.enqueue(t, "secret.queue", "x"), codes.PermissionDenied)
		lines := s.logs.lines("permission denied", "principal=alice", "method=/qbridge.v1.QueueService/Enqueue", "secret.queue")
		if len(lines) == 0 {
			t.Fatalf("no log line of alice's denial:\n%s", s.logs)
		}
		if !strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], "peer=127.0.0.1:") {
			t.Fatalf("denial log line lacks the level or the peer: %s", lines[0])
		}
		for _, tok := range allTokens {
			if strings.Contains(lines[0], tok) {
				t.Fatalf("denial log line carries a token: %s", lines[0])
			}
		}
		worker := s.dial(t, dialConfig{cert: s.ca.Client(t, "worker-1")})
		wantCode(t, worker.enqueue(t, "orders.a", "x"), codes.PermissionDenied, `principal "worker"`)
		if len(s.logs.lines("permission denied", "principal=worker")) == 0 {
			t.Fatalf("no denial logged for the certificate principal:\n%s", s.logs)
		}
	})
}

// TestGuardPublicHealthAndReflection checks the public health and reflection
// settings: callers without credentials may use them, and nothing else.
func TestGuardPublicHealthAndReflection(t *testing.T) {
	rs := redistest.Start(t)
	cfg := mainConfig()
	cfg.PublicHealth, cfg.PublicReflection = true, true
	s := startServer(t, rs, 0, cfg, tls.VerifyClientCertIfGiven)
	anon := s.dial(t, dialConfig{})
	ctx := ctxT(t, 10*time.Second)

	r, err := anon.health.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("public health check: %v, %v", r, err)
	}
	w, err := anon.health.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("public health watch: %v, %v", r, err)
	}
	names, err := listServices(ctx, anon.conn)
	if err != nil || !slices.Contains(names, "qbridge.v1.AdminService") || !slices.Contains(names, "grpc.health.v1.Health") {
		t.Fatalf("public reflection: %v, %v", names, err)
	}
	if names, err := listServicesAlpha(ctx, anon.conn); err != nil || !slices.Contains(names, "qbridge.v1.QueueService") {
		t.Fatalf("public v1alpha reflection: %v, %v", names, err)
	}
	wantCode(t, callExtra(ctx, anon), codes.Unauthenticated, "requires authentication")
	// Public infrastructure opens nothing else.
	wantCode(t, anon.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "requires authentication")
	_, err = anon.a.ListQueues(ctx, &qbridgev1.ListQueuesRequest{})
	wantCode(t, err, codes.Unauthenticated, "requires authentication")
	err = anon.consume(t, &qbridgev1.ConsumeRequest{Queue: "orders.a"}).failure(t, 5*time.Second)
	wantCode(t, err, codes.Unauthenticated, "requires authentication")
	// Bad credentials are not waved through as "no credentials".
	bad := s.dial(t, bearer(tokUnknown))
	_, err = bad.health.Check(ctx, &healthpb.HealthCheckRequest{})
	wantCode(t, err, codes.Unauthenticated, "bearer token is not one this server knows")

	// Only health public: reflection is not.
	cfg.PublicReflection = false
	s2 := startServer(t, rs, 1, cfg, tls.VerifyClientCertIfGiven)
	anon2 := s2.dial(t, dialConfig{})
	if _, err := anon2.health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("public health check: %v", err)
	}
	_, err = listServices(ctx, anon2.conn)
	wantCode(t, err, codes.Unauthenticated, "requires authentication")

	// Only reflection public: health is not.
	cfg.PublicHealth, cfg.PublicReflection = false, true
	s3 := startServer(t, rs, 2, cfg, tls.VerifyClientCertIfGiven)
	anon3 := s3.dial(t, dialConfig{})
	_, err = anon3.health.Check(ctx, &healthpb.HealthCheckRequest{})
	wantCode(t, err, codes.Unauthenticated, "requires authentication")
	if _, err := listServices(ctx, anon3.conn); err != nil {
		t.Fatalf("public reflection: %v", err)
	}
}

// TestGuardRequireClientCert runs the server with RequireAndVerifyClientCert.
func TestGuardRequireClientCert(t *testing.T) {
	rs := redistest.Start(t)
	s := startServer(t, rs, 0, mainConfig(), tls.RequireAndVerifyClientCert)
	ctx := ctxT(t, 10*time.Second)

	worker := s.dial(t, dialConfig{cert: s.ca.Client(t, "worker-1")})
	if _, err := worker.q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "orders.a"}); err != nil {
		t.Fatalf("worker with its certificate: %v", err)
	}
	// No certificate: the handshake fails, token or not.
	noCert := s.dial(t, bearer(tokRoot))
	wantUnavailable(t, noCert.enqueue(t, "orders.a", "x"), "tls: certificate required")
	plain := s.dial(t, dialConfig{plaintext: true})
	wantUnavailable(t, plain.enqueue(t, "orders.a", "x"), "error reading server preface")
	// A verified certificate that names no principal, with a token: the
	// token's principal.
	tokenAndCert := s.dial(t, dialConfig{cert: s.ca.Client(t, "stranger"), authz: "Bearer " + tokRoot})
	if err := tokenAndCert.enqueue(t, "orders.a", "x"); err != nil {
		t.Fatalf("root's token over a stranger's certificate: %v", err)
	}
	stranger := s.dial(t, dialConfig{cert: s.ca.Client(t, "stranger")})
	wantCode(t, stranger.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "client certificate")

	// A server that takes any certificate without verifying it: the name
	// in an unverified certificate identifies nobody.
	anyCert := startServer(t, rs, 1, mainConfig(), tls.RequireAnyClientCert)
	impostor := anyCert.dial(t, dialConfig{cert: testcerts.NewCA(t, "impostor CA").Client(t, "worker-1")})
	wantCode(t, impostor.enqueue(t, "orders.a", "x"), codes.Unauthenticated, "client certificate")
	_, err := impostor.q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "orders.a"})
	wantCode(t, err, codes.Unauthenticated, "client certificate")
}

// TestGuardAuthenticationOff checks that a Config without principals lets
// every caller do everything.
func TestGuardAuthenticationOff(t *testing.T) {
	rs := redistest.Start(t)
	s := startServer(t, rs, 0, auth.Config{MaxMessageBytes: 4096}, tls.VerifyClientCertIfGiven)
	ctx := ctxT(t, 10*time.Second)
	for name, dc := range map[string]dialConfig{
		"no credentials":          {},
		"unknown token":           bearer(tokUnknown),
		"malformed authorization": {authz: basicCred},
		"certificate":             {cert: s.ca.Client(t, "anyone")},
	} {
		t.Run(name, func(t *testing.T) {
			c := s.dial(t, dc)
			q := "free." + strings.ReplaceAll(name, " ", "-")
			if err := c.enqueue(t, q, "x"); err != nil {
				t.Fatalf("enqueue: %v", err)
			}
			st := c.consume(t, &qbridgev1.ConsumeRequest{Queue: q})
			d := st.next(t, 10*time.Second)
			if _, err := c.q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
				t.Fatalf("ack: %v", err)
			}
			st.cancel()
			if _, err := c.q.Publish(ctx, &qbridgev1.PublishRequest{Channel: "any", Payload: []byte("x")}); err != nil {
				t.Fatalf("publish: %v", err)
			}
			_, cancel := c.mustSubscribe(t, &qbridgev1.SubscribeRequest{Patterns: []string{"*"}})
			cancel()
			list, err := c.a.ListQueues(ctx, &qbridgev1.ListQueuesRequest{})
			if err != nil || !slices.Contains(list.GetQueues(), q) {
				t.Fatalf("list queues: %v, %v", list, err)
			}
			if _, err := c.a.PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: q}); err != nil {
				t.Fatalf("purge: %v", err)
			}
			if _, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
				t.Fatalf("health: %v", err)
			}
			if _, err := listServices(ctx, c.conn); err != nil {
				t.Fatalf("reflection: %v", err)
			}
			if err := callExtra(ctx, c); err != nil {
				t.Fatalf("a method the guard does not know: %v", err)
			}
		})
	}
}

// TestGuardAnonymousLimits checks that, with authentication off, the
// default limits apply per client IP.
func TestGuardAnonymousLimits(t *testing.T) {
	rs := redistest.Start(t)
	s := startServer(t, rs, 0, auth.Config{Defaults: auth.Limits{MaxStreams: 1, RequestsPerSecond: 1000}}, tls.VerifyClientCertIfGiven)
	c1 := s.dial(t, dialConfig{})
	c2 := s.dial(t, dialConfig{})
	_, cancel := c1.mustSubscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"x"}})
	_, _, err := c2.subscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"y"}})
	wantCode(t, err, codes.ResourceExhausted, `principal "anonymous" already has 1 streams open`)
	cancel()
	eventually(t, 10*time.Second, "the anonymous stream slot frees up", func() bool {
		_, cancel, err := c2.subscribe(t, &qbridgev1.SubscribeRequest{Channels: []string{"y"}})
		if err != nil {
			cancel()
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("while waiting for a free slot: %v", err)
			}
			return false
		}
		return true
	})
}
