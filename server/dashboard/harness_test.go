package dashboard_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/auth"
	"github.com/qbridge/qbridge/server/broker"
	"github.com/qbridge/qbridge/server/dashboard"
)

// Bearer tokens of the test principals.
const (
	adminToken    = "qbt_test_admin_0123456789abcdef0123456789abcdef"
	producerToken = "qbt_test_producer_0123456789abcdef0123456789ab"
	teamToken     = "qbt_test_team_0123456789abcdef0123456789abcdef0"
	limitedToken  = "qbt_test_limited_0123456789abcdef0123456789abc"
)

// principals: "ops" may do everything; "orders-api" only produces to
// orders; "team-a" administers team-a.* only; "limited" administers
// everything at one request per 1000 seconds.
func principals() []auth.Principal {
	return []auth.Principal{
		{Name: "ops", TokenHashes: []string{auth.HashToken(adminToken)}, Grants: []auth.Grant{
			{Queues: []string{"*"}, Allow: []auth.Permission{auth.Admin, auth.Produce, auth.Consume}},
			{Channels: []string{"*"}, Allow: []auth.Permission{auth.Publish, auth.Subscribe}},
		}},
		{Name: "orders-api", TokenHashes: []string{auth.HashToken(producerToken)}, Grants: []auth.Grant{
			{Queues: []string{"orders", "orders.*"}, Allow: []auth.Permission{auth.Produce}},
			{Channels: []string{"orders.*"}, Allow: []auth.Permission{auth.Publish}},
		}},
		{Name: "team-a", TokenHashes: []string{auth.HashToken(teamToken)}, Grants: []auth.Grant{
			{Queues: []string{"team-a.*"}, Allow: []auth.Permission{auth.Admin}},
		}},
		{Name: "limited", TokenHashes: []string{auth.HashToken(limitedToken)}, Limits: auth.Limits{RequestsPerSecond: 0.001, RequestBurst: 1},
			Grants: []auth.Grant{{Queues: []string{"*"}, Allow: []auth.Permission{auth.Admin}}}},
	}
}

type envConfig struct {
	auth      bool // install the guard with principals(); else authentication is off
	interval  time.Duration
	samples   int
	maxQueues int
}

// env is a qbridge server on a private redis-server, its gRPC API on a
// loopback port behind the authorization guard, and the dashboard on an
// httptest server.
type env struct {
	t      *testing.T
	srv    *server.Server
	rdb    *redis.Client // the test's own client (default user)
	queues qbridgev1.QueueServiceClient
	admin  qbridgev1.AdminServiceClient
	dash   *dashboard.Dashboard
	url    string
	http   *http.Client
}

func startEnv(t *testing.T, cfg envConfig) *env {
	t.Helper()
	rs := redistest.Start(t)
	ro := rs.ServiceOptions(0) // qbridge runs as the least-privilege ACL user
	ro.MaxRetries, ro.DialTimeout = -1, time.Second
	svc := redis.NewClient(ro)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := server.New(broker.New(svc), server.WithLogger(quiet), server.WithReapInterval(100*time.Millisecond), server.WithWaitSlice(time.Second))
	srv.Start()

	var acfg auth.Config
	if cfg.auth {
		acfg.Principals = principals()
	}
	guard, err := auth.New(acfg, auth.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.ChainUnaryInterceptor(guard.UnaryInterceptors()...), grpc.ChainStreamInterceptor(guard.StreamInterceptors()...))
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = gs.Serve(lis) }()

	// The dashboard's own connection carries no credentials: it forwards
	// the caller's.
	dconn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	// The test's connection acts as "ops".
	withToken := func(ctx context.Context) context.Context {
		if md, ok := metadata.FromOutgoingContext(ctx); ok && len(md.Get("authorization")) > 0 {
			return ctx
		}
		return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+adminToken)
	}
	tconn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(withToken(ctx), method, req, reply, cc, opts...)
		}),
		grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			return streamer(withToken(ctx), desc, cc, method, opts...)
		}))
	if err != nil {
		t.Fatal(err)
	}

	opts := []dashboard.Option{dashboard.WithLogger(quiet), dashboard.WithAuthRequired(cfg.auth)}
	if cfg.interval > 0 || cfg.samples > 0 {
		opts = append(opts, dashboard.WithHistory(cfg.interval, cfg.samples))
	}
	if cfg.maxQueues > 0 {
		opts = append(opts, dashboard.WithMaxQueues(cfg.maxQueues))
	}
	dash := dashboard.New(dconn, srv.Snapshot, opts...)
	runCtx, stopRun := context.WithCancel(context.Background())
	var runWG sync.WaitGroup
	runWG.Add(1)
	go func() { defer runWG.Done(); dash.Run(runCtx) }()

	hs := httptest.NewServer(dash) // listens on 127.0.0.1
	t.Cleanup(func() {
		stopRun()
		runWG.Wait()
		srv.StopStreams()
		gs.Stop() // ends the Subscribe streams of any tail still open
		<-served
		hs.Close()
		srv.Close()
		_ = dconn.Close()
		_ = tconn.Close()
		_ = svc.Close()
	})
	return &env{
		t: t, srv: srv, rdb: rs.Client(t, 0),
		queues: qbridgev1.NewQueueServiceClient(tconn), admin: qbridgev1.NewAdminServiceClient(tconn),
		dash: dash, url: hs.URL, http: &http.Client{Timeout: 15 * time.Second},
	}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// response is an HTTP response of the API, read whole.
type response struct {
	code   int
	header http.Header
	body   []byte
}

// do sends a request to the dashboard. token "" sends no Authorization;
// a body is sent as application/json unless contentType says otherwise.
func (e *env) do(method, path, token string, body any, contentType ...string) response {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequestWithContext(ctxT(e.t, 15*time.Second), method, e.url+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if len(contentType) > 0 {
		if contentType[0] != "" {
			req.Header.Set("Content-Type", contentType[0])
		}
	} else if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := e.http.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return response{code: resp.StatusCode, header: resp.Header, body: b}
}

// volatileKeys are JSON fields whose values depend on timing: wantJSON
// accepts any non-null value for them where the expectation says "<v>".
var volatileKeys = map[string]bool{
	"enqueue_rate": true, "ack_rate": true, "oldest_ready_age_seconds": true, "version": true,
	"enqueue_time": true, "deliver_time": true, "lease_deadline": true, "dead_time": true, "expire_time": true, "time": true,
	"next_page_token": true,
	"consumers":       true, // heartbeats every reap interval (exact counts: server TestStatsCountConsumers)
}

// blur replaces the non-null values of volatile keys with "<v>", after
// checking that they have a plausible type.
func blur(t *testing.T, v any) any {
	t.Helper()
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			if volatileKeys[k] && val != nil {
				switch k {
				case "enqueue_rate", "ack_rate", "oldest_ready_age_seconds", "consumers":
					if f, ok := val.(float64); !ok || f < 0 {
						t.Errorf("%s = %v: want a number >= 0", k, val)
					}
				case "next_page_token", "version":
					if s, ok := val.(string); !ok || s == "" {
						// An empty page token is a real value: keep it.
						x[k] = val
						continue
					}
				default:
					s, ok := val.(string)
					if _, err := time.Parse(time.RFC3339Nano, s); !ok || err != nil {
						t.Errorf("%s = %v: want an RFC 3339 time", k, val)
					}
				}
				x[k] = "<v>"
				continue
			}
			x[k] = blur(t, val)
		}
		return x
	case []any:
		for i := range x {
			x[i] = blur(t, x[i])
		}
		return x
	}
	return v
}

// wantJSON checks that r has the status and exactly the JSON body want
// (volatile fields written "<v>").
func wantJSON(t *testing.T, r response, code int, want string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("status %d, want %d; body: %s", r.code, code, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json; charset=utf-8" {
		t.Errorf("Content-Type %q", ct)
	}
	var got, exp any
	if err := json.Unmarshal(r.body, &got); err != nil {
		t.Fatalf("body is not JSON: %v: %s", err, r.body)
	}
	if err := json.Unmarshal([]byte(want), &exp); err != nil {
		t.Fatalf("bad expectation: %v: %s", err, want)
	}
	got = blur(t, got)
	if !reflect.DeepEqual(got, exp) {
		g, _ := json.MarshalIndent(got, "", "  ")
		w, _ := json.MarshalIndent(exp, "", "  ")
		t.Fatalf("JSON differs\n got: %s\nwant: %s", g, w)
	}
}

// wantError checks an error response: status and exact message.
func wantError(t *testing.T, r response, code int, msg string) {
	t.Helper()
	b, _ := json.Marshal(map[string]string{"error": msg})
	wantJSON(t, r, code, string(b))
}

// decode unmarshals a response body.
func decode[T any](t *testing.T, r response) T {
	t.Helper()
	var v T
	if r.code != http.StatusOK {
		t.Fatalf("status %d: %s", r.code, r.body)
	}
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
	return v
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

func (e *env) enqueue(queue string, payload []byte, mod ...func(*qbridgev1.EnqueueRequest)) string {
	e.t.Helper()
	req := &qbridgev1.EnqueueRequest{Queue: queue, Payload: payload}
	for _, m := range mod {
		m(req)
	}
	resp, err := e.queues.Enqueue(ctxT(e.t, 10*time.Second), req)
	if err != nil {
		e.t.Fatalf("enqueue to %s: %v", queue, err)
	}
	return resp.GetId()
}

func (e *env) enqueueN(queue string, n int) {
	e.t.Helper()
	msgs := make([]*qbridgev1.BatchMessage, n)
	for i := range msgs {
		msgs[i] = &qbridgev1.BatchMessage{Payload: []byte(fmt.Sprintf("m%d", i))}
	}
	if _, err := e.queues.EnqueueBatch(ctxT(e.t, 10*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: queue, Messages: msgs}); err != nil {
		e.t.Fatalf("enqueue batch to %s: %v", queue, err)
	}
}

// take opens a Consume stream that holds one message unacked, and returns
// that delivery. The stream ends at test cleanup.
func (e *env) take(queue string) *qbridgev1.Delivery {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	e.t.Cleanup(cancel)
	st, err := e.queues.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: 1, MaxMessages: 1, LeaseDuration: durationpb.New(5 * time.Minute)})
	if err != nil {
		e.t.Fatalf("consume %s: %v", queue, err)
	}
	type got struct {
		d   *qbridgev1.Delivery
		err error
	}
	ch := make(chan got, 1)
	go func() {
		resp, err := st.Recv()
		if err != nil {
			ch <- got{err: err}
			return
		}
		ch <- got{d: resp.GetDeliveries()[0]}
	}()
	select {
	case g := <-ch:
		if g.err != nil {
			e.t.Fatalf("consume %s: %v", queue, g.err)
		}
		return g.d
	case <-time.After(10 * time.Second):
		e.t.Fatalf("no delivery from %s within 10s", queue)
	}
	return nil
}

// killMessage makes a dead letter of one new message of queue and returns
// its dead-letter id.
func (e *env) killMessage(queue string, payload []byte, errText string) string {
	e.t.Helper()
	e.enqueue(queue, payload, func(r *qbridgev1.EnqueueRequest) { r.TaskType = "invoice" })
	d := e.take(queue)
	if _, err := e.queues.Nack(ctxT(e.t, 10*time.Second), &qbridgev1.NackRequest{
		AckTokens: []string{d.GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER, Error: errText,
	}); err != nil {
		e.t.Fatalf("nack: %v", err)
	}
	resp, err := e.admin.PeekMessages(ctxT(e.t, 10*time.Second), &qbridgev1.PeekMessagesRequest{Queue: queue, State: qbridgev1.MessageState_MESSAGE_STATE_DEAD, PageSize: 1000})
	if err != nil {
		e.t.Fatal(err)
	}
	for _, m := range resp.GetMessages() {
		if bytes.Equal(m.GetPayload(), payload) {
			return m.GetId()
		}
	}
	e.t.Fatalf("dead letter %q not found", payload)
	return ""
}

func (e *env) stats(queue string) *qbridgev1.GetQueueStatsResponse {
	e.t.Helper()
	st, err := e.queues.GetQueueStats(ctxT(e.t, 10*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: queue})
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}
