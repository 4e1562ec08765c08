package main

import (
	"context"
	"log/slog"
	"net"
	"sort"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// TestEmbeddedEngine runs qbridged in-process without a Redis URL and uses
// every surface through real gRPC clients.
func TestEmbeddedEngine(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	d := startDaemon(t, []string{"--listen", "127.0.0.1:0"}, nil)
	logs := d.logs.String()
	warn := logLine(logs, "EMBEDDED IN-MEMORY ENGINE")
	if !strings.Contains(warn, "level=WARN") || !strings.Contains(warn, "nothing is durable") ||
		!strings.Contains(warn, "QBRIDGE_REDIS_URL") || !strings.Contains(warn, "engine_addr=127.0.0.1:") {
		t.Errorf("no loud non-durable warning with the engine address; logs:\n%s", logs)
	}
	if host, _, err := net.SplitHostPort(d.addr); err != nil || host != "127.0.0.1" {
		t.Errorf("listening on %q, want 127.0.0.1:<port>", d.addr)
	}

	cc := dial(t, d.addr)
	q := qbridgev1.NewQueueServiceClient(cc)
	ctx := rpcCtx(t)

	t.Run("queue roundtrip", func(t *testing.T) {
		enq, err := q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "jobs", Payload: []byte("hello"), Headers: map[string]string{"k": "v"}})
		if err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := q.Consume(cctx, &qbridgev1.ConsumeRequest{Queue: "jobs", LeaseDuration: durationpb.New(time.Minute)})
		if err != nil {
			t.Fatalf("Consume: %v", err)
		}
		ds := recvDeliveries(t, stream, 1)
		got := ds[0]
		if got.GetId() != enq.GetId() || string(got.GetPayload()) != "hello" || got.GetHeaders()["k"] != "v" ||
			got.GetAttempt() != 1 || got.GetAckToken() == "" || got.GetQueue() != "jobs" {
			t.Fatalf("delivery %v, want id %s payload hello header k=v attempt 1 with a token", got, enq.GetId())
		}
		st, err := q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "jobs"})
		if err != nil || st.GetReady() != 0 || st.GetInFlight() != 1 {
			t.Fatalf("stats before ack: %v %v, want 0 ready, 1 in flight", st, err)
		}
		ack, err := q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{got.GetAckToken()}})
		if err != nil || ack.GetAcked() != 1 {
			t.Fatalf("Ack: %v %v, want 1 acked", ack, err)
		}
		st, err = q.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "jobs"})
		if err != nil || st.GetReady() != 0 || st.GetInFlight() != 0 {
			t.Fatalf("stats after ack: %v %v, want 0/0", st, err)
		}
	})

	t.Run("publish subscribe", func(t *testing.T) {
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		sub, err := q.Subscribe(sctx, &qbridgev1.SubscribeRequest{Channels: []string{"news"}})
		if err != nil {
			t.Fatalf("Subscribe: %v", err)
		}
		first, err := sub.Recv()
		if err != nil || first.GetSubscribed() == nil || len(first.GetSubscribed().GetChannels()) != 1 {
			t.Fatalf("first Subscribe message %v %v, want the subscribed confirmation", first, err)
		}
		pub, err := q.Publish(ctx, &qbridgev1.PublishRequest{Channel: "news", Payload: []byte("extra")})
		if err != nil || pub.GetReceivers() != 1 {
			t.Fatalf("Publish: %v %v, want 1 receiver", pub, err)
		}
		m, err := sub.Recv()
		if err != nil || m.GetMessage().GetChannel() != "news" || string(m.GetMessage().GetPayload()) != "extra" {
			t.Fatalf("Subscribe message %v %v, want extra on news", m, err)
		}
	})

	t.Run("health", func(t *testing.T) {
		for _, svc := range []string{"", "qbridge.v1.QueueService"} {
			st, err := healthStatus(cc, svc)
			if err != nil || st != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("health %q: %v %v, want SERVING", svc, st, err)
			}
		}
	})

	t.Run("reflection", func(t *testing.T) {
		rs, err := reflectionpb.NewServerReflectionClient(cc).ServerReflectionInfo(ctx)
		if err != nil {
			t.Fatalf("ServerReflectionInfo: %v", err)
		}
		if err := rs.Send(&reflectionpb.ServerReflectionRequest{
			MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
		}); err != nil {
			t.Fatalf("reflection Send: %v", err)
		}
		resp, err := rs.Recv()
		if err != nil {
			t.Fatalf("reflection Recv: %v", err)
		}
		var names []string
		for _, s := range resp.GetListServicesResponse().GetService() {
			names = append(names, s.GetName())
		}
		sort.Strings(names)
		for _, want := range []string{"qbridge.v1.QueueService", "grpc.health.v1.Health"} {
			if i := sort.SearchStrings(names, want); i == len(names) || names[i] != want {
				t.Errorf("reflection lists %v, missing %s", names, want)
			}
		}
		_ = rs.CloseSend()
	})

	if err := d.stop(t); err != nil {
		t.Fatalf("run after cancel: %v, want nil", err)
	}
	logs = d.logs.String()
	for _, step := range []string{"health set to NOT_SERVING", "drained", "gRPC server stopped", "queue service stopped", "Redis clients closed", "embedded in-memory engine stopped"} {
		if !strings.Contains(logs, step) {
			t.Errorf("shutdown did not log %q; logs:\n%s", step, logs)
		}
	}
	_ = cc.Close()
}

// TestRunListenError: a taken address makes run fail with an error naming
// it, and everything started is stopped again.
func TestRunListenError(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var logs syncBuffer
	err = run(context.Background(), []string{"--listen", ln.Addr().String()}, envFunc(nil), &logs, &logs)
	if err == nil || !strings.Contains(err.Error(), ln.Addr().String()) || !strings.Contains(err.Error(), "--listen") {
		t.Fatalf("run on a taken address: %v, want a listen error naming %s", err, ln.Addr())
	}
	if !strings.Contains(logs.String(), "embedded in-memory engine stopped") {
		t.Errorf("the engine was not stopped after the failure; logs:\n%s", logs.String())
	}
}

// TestJSONLogs: --log-format json writes JSON lines with the same fields.
func TestJSONLogs(t *testing.T) {
	d := startDaemonJSON(t)
	if err := d.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	line := logLine(d.logs.String(), "qbridge listening")
	if !strings.HasPrefix(line, "{") || !strings.Contains(line, `"grpc":"127.0.0.1:`) {
		t.Errorf("listening line %q, want JSON with a grpc attribute", line)
	}
}

func startDaemonJSON(t *testing.T) *daemon {
	t.Helper()
	d := &daemon{logs: &syncBuffer{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	env := map[string]string{"QBRIDGE_LOG_FORMAT": "json", "QBRIDGE_LISTEN": "127.0.0.1:0"}
	go func() { d.done <- run(ctx, nil, envFunc(env), nil, d.logs) }()
	t.Cleanup(cancel)
	eventually(t, 10*time.Second, "the JSON listening line", func() bool {
		return strings.Contains(d.logs.String(), `"msg":"qbridge listening"`)
	})
	return d
}

// panicky is a health service whose calls panic, to exercise recovery.
type panicky struct {
	healthpb.UnimplementedHealthServer
}

func (panicky) Check(context.Context, *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	panic("boom in Check")
}

func (panicky) Watch(*healthpb.HealthCheckRequest, grpc.ServerStreamingServer[healthpb.HealthCheckResponse]) error {
	panic("boom in Watch")
}

// TestInterceptorsRecoverAndLog: a panicking handler, unary or streaming,
// gives the client INTERNAL with a fixed message, logs the panic with its
// stack, and the call is logged when it finishes; the server keeps serving.
func TestInterceptorsRecoverAndLog(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	unary, stream := interceptors(log)
	gs := grpc.NewServer(grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...))
	healthpb.RegisterHealthServer(gs, panicky{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	cc := dial(t, ln.Addr().String())
	hc := healthpb.NewHealthClient(cc)
	ctx := rpcCtx(t)

	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{})
	wantCode(t, "panicking unary call", err, codes.Internal, panicMessage)

	ws, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	_, err = ws.Recv()
	wantCode(t, "panicking stream", err, codes.Internal, panicMessage)

	// Still serving after the panics.
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{})
	wantCode(t, "second unary call", err, codes.Internal, panicMessage)

	out := logs.String()
	for _, tt := range []struct{ what, want string }{
		{"unary panic", `panic="boom in Check"`},
		{"stream panic", `panic="boom in Watch"`},
		{"the stack of the panic", "panicky.Check"},
		{"the finished unary call at error level with its code", "grpc.method=Check"},
		{"the finished stream", "grpc.method=Watch"},
	} {
		if !strings.Contains(out, tt.want) {
			t.Errorf("logs lack %s (%q):\n%s", tt.what, tt.want, out)
		}
	}
	finished := logLine(out, "grpc.method=Check")
	if !strings.Contains(finished, "level=ERROR") || !strings.Contains(finished, "grpc.code=Internal") {
		t.Errorf("finished-call line %q, want ERROR with grpc.code=Internal", finished)
	}
}
