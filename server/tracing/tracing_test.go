package tracing_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
	"github.com/qbridge/qbridge/server/tracing"
)

const waitTimeout = 10 * time.Second

// recorder is a span processor that keeps ended spans in a tracetest
// in-memory exporter and wakes whoever waits for one.
type recorder struct {
	exp     *tracetest.InMemoryExporter
	mu      sync.Mutex
	changed chan struct{} // closed and replaced at each ended span
}

func newRecorder() (*recorder, *sdktrace.TracerProvider) {
	r := &recorder{exp: tracetest.NewInMemoryExporter(), changed: make(chan struct{})}
	return r, sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(r))
}

func (r *recorder) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (r *recorder) OnEnd(s sdktrace.ReadOnlySpan) {
	r.mu.Lock()
	defer r.mu.Unlock()
	_ = r.exp.ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{s})
	close(r.changed)
	r.changed = make(chan struct{})
}
func (r *recorder) Shutdown(context.Context) error   { return nil }
func (r *recorder) ForceFlush(context.Context) error { return nil }

// waitSpan waits until a span matching match has ended and returns it.
func (r *recorder) waitSpan(t *testing.T, what string, match func(tracetest.SpanStub) bool) tracetest.SpanStub {
	t.Helper()
	timeout := time.NewTimer(waitTimeout)
	defer timeout.Stop()
	for {
		r.mu.Lock()
		spans, changed := r.exp.GetSpans(), r.changed
		r.mu.Unlock()
		for _, s := range spans {
			if match(s) {
				return s
			}
		}
		select {
		case <-changed:
		case <-timeout.C:
			t.Fatalf("no span %s within %v; have %v", what, waitTimeout, spanNames(spans))
		}
	}
}

func spanNames(spans tracetest.SpanStubs) []string {
	var names []string
	for _, s := range spans {
		names = append(names, s.Name+"/"+s.SpanKind.String())
	}
	return names
}

// serverSpan matches the server span of a QueueService method.
func serverSpan(method string) func(tracetest.SpanStub) bool {
	return func(s tracetest.SpanStub) bool {
		return s.Name == "qbridge.v1.QueueService/"+method && s.SpanKind == trace.SpanKindServer
	}
}

// instance is a qbridge server on 127.0.0.1 built with the tracing
// options, and a gRPC client for it.
type instance struct {
	gs     *grpc.Server
	client qbridgev1.QueueServiceClient
	stop   func() // stops the servers gracefully (waits for handlers); idempotent
}

// start runs a qbridge server with serverOpts against a new redis-server.
// clientTP, when not nil, instruments the client connection (it sends the
// W3C trace context of the caller's span in the call's metadata).
func start(t *testing.T, serverOpts []grpc.ServerOption, clientTP trace.TracerProvider, brokerOpts ...broker.Option) *instance {
	t.Helper()
	rs := redistest.Start(t)
	svc := redis.NewClient(rs.ServiceOptions(0))
	srv := server.New(broker.New(svc, brokerOpts...),
		server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithReapInterval(100*time.Millisecond),
		server.WithWaitSlice(time.Second),
	)
	srv.Start()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(serverOpts...)
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	go func() { _ = gs.Serve(lis) }()
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if clientTP != nil {
		dopts = append(dopts, grpc.WithStatsHandler(otelgrpc.NewClientHandler(
			otelgrpc.WithTracerProvider(clientTP),
			otelgrpc.WithPropagators(propagation.TraceContext{}),
		)))
	}
	conn, err := grpc.NewClient(lis.Addr().String(), dopts...)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = conn.Close()
			srv.StopStreams()
			gs.GracefulStop() // returns once every handler has returned
			srv.Close()
			_ = svc.Close()
		})
	}
	t.Cleanup(stop)
	return &instance{gs: gs, client: qbridgev1.NewQueueServiceClient(conn), stop: stop}
}

// take consumes n messages from queue (auto-ack) and returns them.
func (in *instance) take(t *testing.T, queue string, n int) []*qbridgev1.Delivery {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	st, err := in.client.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue, AutoAck: true, MaxMessages: uint32(n)})
	if err != nil {
		t.Fatalf("consume: %v", err)
	}
	var out []*qbridgev1.Delivery
	for len(out) < n {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("consume %s: got %d of %d messages: %v", queue, len(out), n, err)
		}
		out = append(out, resp.GetDeliveries()...)
	}
	return out
}

// producerCtx returns a context with a client span of tp that carries a
// tracestate, as a traced producer's would.
func producerCtx(t *testing.T, tp trace.TracerProvider) (context.Context, trace.Span) {
	t.Helper()
	ts, err := trace.ParseTraceState("vendor=abc")
	if err != nil {
		t.Fatal(err)
	}
	// A remote sampled parent with a tracestate: spans below inherit both.
	parent := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID:    trace.TraceID{0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36},
		SpanID:     trace.SpanID{0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7},
		TraceFlags: trace.FlagsSampled,
		TraceState: ts,
		Remote:     true,
	})
	ctx := trace.ContextWithRemoteSpanContext(context.Background(), parent)
	ctx, cancel := context.WithTimeout(ctx, waitTimeout)
	t.Cleanup(cancel)
	ctx, span := tp.Tracer("producer").Start(ctx, "produce", trace.WithSpanKind(trace.SpanKindProducer))
	t.Cleanup(func() { span.End() })
	return ctx, span
}

// traceOf parses the trace context headers of a delivery.
func traceOf(t *testing.T, d *qbridgev1.Delivery) trace.SpanContext {
	t.Helper()
	sc := trace.SpanContextFromContext(tracing.ExtractHeaders(context.Background(), d.GetHeaders()))
	if !sc.IsValid() {
		t.Fatalf("message %s: no valid trace context in its headers %v", d.GetId(), d.GetHeaders())
	}
	return sc
}

func TestEnqueueInjectsServerSpanContext(t *testing.T) {
	rec, tp := newRecorder()
	opts, shutdown, err := tracing.Setup(context.Background(), tracing.Config{}, tracing.WithTracerProvider(tp))
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	defer func() {
		if err := shutdown(context.Background()); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	}()
	in := start(t, opts, tp)
	ctx, producer := producerCtx(t, tp)

	app := map[string]string{"content-type": "text/plain"}
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "q", Payload: []byte("a"), Headers: app}); err != nil {
		t.Fatalf("enqueue: %v", err)
	}
	own := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "q", Payload: []byte("b"),
		Headers: map[string]string{tracing.HeaderTraceparent: own, tracing.HeaderTracestate: "mine=1"}}); err != nil {
		t.Fatalf("enqueue: %v", err)
	}
	ds := in.take(t, "q", 2)

	// The first message carries the server's Enqueue span, in the
	// producer's trace.
	enq := rec.waitSpan(t, "Enqueue (server)", serverSpan("Enqueue"))
	if enq.SpanContext.TraceID() != producer.SpanContext().TraceID() {
		t.Fatalf("server span trace %s, producer trace %s: the incoming context was not its parent",
			enq.SpanContext.TraceID(), producer.SpanContext().TraceID())
	}
	sc := traceOf(t, ds[0])
	if sc.TraceID() != producer.SpanContext().TraceID() {
		t.Errorf("message trace id %s, want the producer's %s", sc.TraceID(), producer.SpanContext().TraceID())
	}
	if sc.SpanID() != enq.SpanContext.SpanID() {
		t.Errorf("message parent span %s, want the server's Enqueue span %s", sc.SpanID(), enq.SpanContext.SpanID())
	}
	if !sc.IsSampled() {
		t.Errorf("message trace context not sampled: %v", ds[0].GetHeaders())
	}
	if got := ds[0].GetHeaders()[tracing.HeaderTracestate]; got != "vendor=abc" {
		t.Errorf("tracestate %q, want the producer's %q", got, "vendor=abc")
	}
	if got := ds[0].GetHeaders()["content-type"]; got != "text/plain" || len(ds[0].GetHeaders()) != 3 {
		t.Errorf("headers %v: want the application's and the two trace headers", ds[0].GetHeaders())
	}

	// The producer's own traceparent (and its tracestate) win.
	if got := ds[1].GetHeaders(); got[tracing.HeaderTraceparent] != own || got[tracing.HeaderTracestate] != "mine=1" {
		t.Errorf("producer-set trace context replaced: got %v", got)
	}
}

func TestEnqueueBatchInjectsEveryMessage(t *testing.T) {
	rec, tp := newRecorder()
	opts, _, err := tracing.Setup(context.Background(), tracing.Config{}, tracing.WithTracerProvider(tp))
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	in := start(t, opts, tp)
	ctx, producer := producerCtx(t, tp)

	own := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	msgs := []*qbridgev1.BatchMessage{
		{Payload: []byte("0")},
		{Payload: []byte("1"), Headers: map[string]string{"k": "v"}},
		{Payload: []byte("2"), Headers: map[string]string{tracing.HeaderTraceparent: own}},
		{Payload: []byte("3")},
	}
	if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: "batch", Messages: msgs}); err != nil {
		t.Fatalf("enqueue batch: %v", err)
	}
	ds := in.take(t, "batch", len(msgs))
	enq := rec.waitSpan(t, "EnqueueBatch (server)", serverSpan("EnqueueBatch"))
	for i, d := range ds {
		if i == 2 {
			if got := d.GetHeaders()[tracing.HeaderTraceparent]; got != own {
				t.Errorf("message 2: producer-set traceparent replaced by %q", got)
			}
			continue
		}
		sc := traceOf(t, d)
		if sc.TraceID() != producer.SpanContext().TraceID() || sc.SpanID() != enq.SpanContext.SpanID() {
			t.Errorf("message %d: trace context %s/%s, want %s/%s (the server's EnqueueBatch span)",
				i, sc.TraceID(), sc.SpanID(), producer.SpanContext().TraceID(), enq.SpanContext.SpanID())
		}
	}
	if ds[1].GetHeaders()["k"] != "v" {
		t.Errorf("message 1 lost its header: %v", ds[1].GetHeaders())
	}
}

// A call without a trace context of its own is a new trace that starts at
// the server: its messages still carry it.
func TestEnqueueWithoutIncomingContext(t *testing.T) {
	rec, tp := newRecorder()
	opts, _, err := tracing.Setup(context.Background(), tracing.Config{}, tracing.WithTracerProvider(tp))
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	in := start(t, opts, nil)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "plain", Payload: []byte("x")}); err != nil {
		t.Fatalf("enqueue: %v", err)
	}
	d := in.take(t, "plain", 1)[0]
	enq := rec.waitSpan(t, "Enqueue (server)", serverSpan("Enqueue"))
	if enq.Parent.IsValid() {
		t.Errorf("server span has parent %v; want a root", enq.Parent)
	}
	if sc := traceOf(t, d); sc.SpanID() != enq.SpanContext.SpanID() || sc.TraceID() != enq.SpanContext.TraceID() {
		t.Errorf("message trace context %v, want the server span %v", sc, enq.SpanContext)
	}
	if _, ok := d.GetHeaders()[tracing.HeaderTracestate]; ok {
		t.Errorf("tracestate set without one to carry: %v", d.GetHeaders())
	}
}

// Raw-mode queues cannot store headers: WithRawQueues keeps the trace
// context out of their messages, so Enqueue still works.
func TestRawQueuesAreLeftAlone(t *testing.T) {
	_, tp := newRecorder()
	isRaw := func(q string) bool { return q == "legacy" }
	opts, _, err := tracing.Setup(context.Background(), tracing.Config{},
		tracing.WithTracerProvider(tp), tracing.WithRawQueues(isRaw))
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	in := start(t, opts, tp, broker.WithRawQueues(isRaw))
	ctx, _ := producerCtx(t, tp)
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "legacy", Payload: []byte("x")}); err != nil {
		t.Fatalf("enqueue to a raw queue under tracing: %v", err)
	}
	if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: "legacy",
		Messages: []*qbridgev1.BatchMessage{{Payload: []byte("y")}}}); err != nil {
		t.Fatalf("enqueue batch to a raw queue under tracing: %v", err)
	}
	for _, d := range in.take(t, "legacy", 2) {
		if len(d.GetHeaders()) != 0 {
			t.Errorf("raw message %s has headers %v", d.GetId(), d.GetHeaders())
		}
	}
}

func TestTracingOff(t *testing.T) {
	opts, shutdown, err := tracing.Setup(context.Background(), tracing.Config{SampleRatio: 1})
	if err != nil {
		t.Fatalf("Setup with no endpoint: %v", err)
	}
	if len(opts) != 0 {
		t.Errorf("Setup with no endpoint returned %d server options; want none", len(opts))
	}
	if err := shutdown(context.Background()); err != nil {
		t.Errorf("shutdown: %v", err)
	}
	// The caller traces and sends its context in the metadata; the server
	// does not trace, so its messages carry nothing.
	_, clientTP := newRecorder()
	in := start(t, opts, clientTP)
	ctx, _ := producerCtx(t, clientTP)
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "off", Payload: []byte("x")}); err != nil {
		t.Fatalf("enqueue: %v", err)
	}
	if _, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: "off",
		Messages: []*qbridgev1.BatchMessage{{Payload: []byte("y")}, {Payload: []byte("z"), Headers: map[string]string{"k": "v"}}}}); err != nil {
		t.Fatalf("enqueue batch: %v", err)
	}
	for _, d := range in.take(t, "off", 3) {
		if _, ok := d.GetHeaders()[tracing.HeaderTraceparent]; ok {
			t.Errorf("tracing off, yet message %s has headers %v", d.GetId(), d.GetHeaders())
		}
	}
}

func TestSetupRejectsBadConfig(t *testing.T) {
	for _, cfg := range []tracing.Config{
		{Endpoint: "127.0.0.1:4317", Protocol: "thrift"},
		{Endpoint: "127.0.0.1:4317", SampleRatio: 1.5},
		{Endpoint: "127.0.0.1:4317", SampleRatio: -0.1},
		{Endpoint: "ftp://127.0.0.1:4317"},
		{Endpoint: "http://"},
		{Endpoint: "127.0.0.1:4317/v1/traces"},
	} {
		opts, shutdown, err := tracing.Setup(context.Background(), cfg)
		if err == nil {
			_ = shutdown(context.Background())
			t.Errorf("Setup(%+v) = %d options, no error; want an error", cfg, len(opts))
		}
	}
}

// fakeCollector is an OTLP/gRPC trace collector.
type fakeCollector struct {
	collectortrace.UnimplementedTraceServiceServer
	mu   sync.Mutex
	reqs []*collectortrace.ExportTraceServiceRequest
	auth []string // the authorization metadata of each export
}

func (c *fakeCollector) Export(ctx context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reqs = append(c.reqs, req)
	c.auth = append(c.auth, md.Get("authorization")...)
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

// exported describes what a collector received: span names by service.name.
func exported(reqs []*collectortrace.ExportTraceServiceRequest) map[string][]string {
	out := map[string][]string{}
	for _, r := range reqs {
		for _, rs := range r.GetResourceSpans() {
			svc := ""
			for _, kv := range rs.GetResource().GetAttributes() {
				if kv.GetKey() == "service.name" {
					svc = kv.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.GetScopeSpans() {
				for _, s := range ss.GetSpans() {
					out[svc] = append(out[svc], s.GetName())
				}
			}
		}
	}
	return out
}

// traceOneEnqueue runs a qbridge server with the tracing of cfg, makes one
// Enqueue, stops the server and flushes the spans.
func traceOneEnqueue(t *testing.T, cfg tracing.Config) {
	t.Helper()
	opts, shutdown, err := tracing.Setup(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Setup(%+v): %v", cfg, err)
	}
	if len(opts) == 0 {
		t.Fatalf("Setup(%+v) returned no server options", cfg)
	}
	in := start(t, opts, nil)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "exported", Payload: []byte("x")}); err != nil {
		t.Fatalf("enqueue: %v", err)
	}
	d := in.take(t, "exported", 1)[0]
	if _, ok := d.GetHeaders()[tracing.HeaderTraceparent]; !ok {
		t.Errorf("tracing on, yet the message has no traceparent: %v", d.GetHeaders())
	}
	in.stop() // every handler, and so every span, has ended
	if err := shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

func wantExported(t *testing.T, got map[string][]string, service string) {
	t.Helper()
	names := strings.Join(got[service], ",")
	for _, want := range []string{"qbridge.v1.QueueService/Enqueue", "qbridge.v1.QueueService/Consume"} {
		if !strings.Contains(names, want) {
			t.Errorf("collector got %v; want a span %s of service %q", got, want, service)
		}
	}
}

func TestExportOTLPGRPC(t *testing.T) {
	col := &fakeCollector{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(gs, col)
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()

	for _, cfg := range []tracing.Config{
		{Endpoint: lis.Addr().String(), Insecure: true, Headers: map[string]string{"authorization": "Bearer t0k"}},
		{Endpoint: "http://" + lis.Addr().String(), Protocol: "grpc", ServiceName: "qb-east", SampleRatio: 1},
	} {
		col.mu.Lock()
		col.reqs, col.auth = nil, nil
		col.mu.Unlock()
		traceOneEnqueue(t, cfg)
		col.mu.Lock()
		got, auth := exported(col.reqs), col.auth
		col.mu.Unlock()
		service := cfg.ServiceName
		if service == "" {
			service = tracing.DefaultServiceName
		}
		wantExported(t, got, service)
		if want := cfg.Headers["authorization"]; want != "" && (len(auth) == 0 || auth[0] != want) {
			t.Errorf("collector got authorization %q, want %q", auth, want)
		}
	}
}

func TestExportOTLPHTTP(t *testing.T) {
	var (
		mu    sync.Mutex
		reqs  []*collectortrace.ExportTraceServiceRequest
		paths []string
	)
	col := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		req := &collectortrace.ExportTraceServiceRequest{}
		if err == nil {
			err = proto.Unmarshal(body, req)
		}
		if err != nil || r.Header.Get("Content-Type") != "application/x-protobuf" {
			http.Error(w, fmt.Sprintf("bad export (%s): %v", r.Header.Get("Content-Type"), err), http.StatusBadRequest)
			return
		}
		mu.Lock()
		reqs, paths = append(reqs, req), append(paths, r.URL.Path+" "+r.Header.Get("X-Tenant"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(nil)
	}))
	defer col.Close()

	traceOneEnqueue(t, tracing.Config{Endpoint: col.URL, Protocol: "http/protobuf", Headers: map[string]string{"X-Tenant": "t1"}})
	mu.Lock()
	defer mu.Unlock()
	wantExported(t, exported(reqs), tracing.DefaultServiceName)
	for _, p := range paths {
		if p != "/v1/traces t1" {
			t.Errorf("export to %q; want path /v1/traces with header X-Tenant t1", p)
		}
	}
}

func TestInjectHeaders(t *testing.T) {
	_, tp := newRecorder()
	ctx, span := producerCtx(t, tp)
	sc := span.SpanContext()
	want := fmt.Sprintf("00-%s-%s-01", sc.TraceID(), sc.SpanID())

	if h := tracing.InjectHeaders(context.Background(), nil); h != nil {
		t.Errorf("no span: got %v, want nil", h)
	}
	h := tracing.InjectHeaders(ctx, nil)
	if h[tracing.HeaderTraceparent] != want || h[tracing.HeaderTracestate] != "vendor=abc" || len(h) != 2 {
		t.Errorf("nil map: got %v, want traceparent %s and tracestate vendor=abc", h, want)
	}
	in := map[string]string{"a": "1"}
	if out := tracing.InjectHeaders(ctx, in); out[tracing.HeaderTraceparent] != want || in[tracing.HeaderTraceparent] != want {
		t.Errorf("got %v, want it added in place", in)
	}
	own := map[string]string{tracing.HeaderTraceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
	if out := tracing.InjectHeaders(ctx, maps.Clone(own)); !maps.Equal(out, own) {
		t.Errorf("producer-set traceparent: got %v, want %v unchanged", out, own)
	}

	// A span context without tracestate replaces a lone tracestate.
	plain, plainSpan := tp.Tracer("t").Start(context.Background(), "plain")
	defer plainSpan.End()
	lone := tracing.InjectHeaders(plain, map[string]string{tracing.HeaderTracestate: "stale=1"})
	if _, ok := lone[tracing.HeaderTracestate]; ok || lone[tracing.HeaderTraceparent] == "" {
		t.Errorf("lone tracestate: got %v, want only the new traceparent", lone)
	}

	// Never past the server's limits: 64 headers, 64 KiB.
	full := map[string]string{}
	for i := range 64 {
		full[fmt.Sprintf("h%d", i)] = "v"
	}
	if out := tracing.InjectHeaders(ctx, full); len(out) != 64 {
		t.Errorf("64 headers: got %d, want nothing added", len(out))
	}
	delete(full, "h0")
	if out := tracing.InjectHeaders(plain, full); len(out) != 64 || out[tracing.HeaderTraceparent] == "" {
		t.Errorf("63 headers and no tracestate to add: got %d headers, want the traceparent added", len(out))
	}
	big := map[string]string{"big": strings.Repeat("x", 64<<10-len("big")-10)}
	if out := tracing.InjectHeaders(ctx, big); len(out) != 1 {
		t.Errorf("headers near 64 KiB: got %d headers, want nothing added", len(out))
	}

	// ExtractHeaders reads what InjectHeaders wrote.
	got := trace.SpanContextFromContext(tracing.ExtractHeaders(context.Background(), h))
	if got.TraceID() != sc.TraceID() || got.SpanID() != sc.SpanID() || !got.IsRemote() || got.TraceState().String() != "vendor=abc" {
		t.Errorf("extracted %v, want %v", got, sc)
	}
	for _, bad := range []map[string]string{nil, {}, {tracing.HeaderTraceparent: "garbage"}} {
		if sc := trace.SpanContextFromContext(tracing.ExtractHeaders(context.Background(), bad)); sc.IsValid() {
			t.Errorf("ExtractHeaders(%v) = %v, want no span context", bad, sc)
		}
	}
}
