package client_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// spanRecorder is a span processor that keeps ended spans in a tracetest
// in-memory exporter and wakes whoever waits for one.
type spanRecorder struct {
	exp     *tracetest.InMemoryExporter
	mu      sync.Mutex
	changed chan struct{} // closed and replaced at each ended span
}

func (r *spanRecorder) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (r *spanRecorder) OnEnd(s sdktrace.ReadOnlySpan) {
	r.mu.Lock()
	defer r.mu.Unlock()
	_ = r.exp.ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{s})
	close(r.changed)
	r.changed = make(chan struct{})
}
func (r *spanRecorder) Shutdown(context.Context) error   { return nil }
func (r *spanRecorder) ForceFlush(context.Context) error { return nil }

// waitSpan waits until a span matching match has ended and returns it.
func (r *spanRecorder) waitSpan(t *testing.T, what string, match func(tracetest.SpanStub) bool) tracetest.SpanStub {
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
			t.Fatalf("no span %s within %v (%d spans ended)", what, waitTimeout, len(spans))
		}
	}
}

// installTracerProvider makes a recording provider OpenTelemetry's global
// one for the test (a no-op one again afterwards).
func installTracerProvider(t *testing.T) (*spanRecorder, *sdktrace.TracerProvider) {
	r := &spanRecorder{exp: tracetest.NewInMemoryExporter(), changed: make(chan struct{})}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(r))
	otel.SetTracerProvider(tp)
	t.Cleanup(func() { otel.SetTracerProvider(noop.NewTracerProvider()) })
	return r, tp
}

func attr(s tracetest.SpanStub, key string) (attribute.Value, bool) {
	for _, kv := range s.Attributes {
		if string(kv.Key) == key {
			return kv.Value, true
		}
	}
	return attribute.Value{}, false
}

// headerSpanContext parses the trace headers of a delivery.
func headerSpanContext(h map[string]string) trace.SpanContext {
	return trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier(h)))
}

func TestWorkerProcessSpans(t *testing.T) {
	e := newEnv(t)
	rec, tp := installTracerProvider(t)
	ctx := testCtx(t)
	const q = "traced-work"

	pctx, producer := tp.Tracer("test").Start(ctx, "produce", trace.WithSpanKind(trace.SpanKindProducer))
	okID, err := e.c.Enqueue(pctx, q, []byte("ok"), client.WithTaskType("greet"))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	failID, err := e.c.Enqueue(pctx, q, []byte("fail"))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	producer.End()
	// A message from a producer that did not trace: its span has no link.
	plainID, err := e.c.Enqueue(ctx, q, []byte("plain"))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}

	var (
		mu       sync.Mutex
		handlers = map[string]trace.SpanContext{} // task id -> the span in the handler's context
	)
	boom := fmt.Errorf("boom: %w", client.SkipRetry)
	w := client.NewWorker(e.c, []string{q}, client.HandlerFunc(func(ctx context.Context, task *client.Task) ([]byte, error) {
		mu.Lock()
		handlers[task.ID] = trace.SpanContextFromContext(ctx)
		mu.Unlock()
		if string(task.Payload) == "fail" {
			return nil, boom
		}
		return nil, nil
	}), client.WithWorkerLogger(testLogger(t)))
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(wctx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	spanOf := func(id string) tracetest.SpanStub {
		return rec.waitSpan(t, "process "+q+" of message "+id, func(s tracetest.SpanStub) bool {
			v, ok := attr(s, "messaging.message.id")
			return ok && v.AsString() == id
		})
	}
	for _, id := range []string{okID, failID, plainID} {
		s := spanOf(id)
		if s.Name != "process "+q || s.SpanKind != trace.SpanKindConsumer {
			t.Errorf("message %s: span %q of kind %v, want %q of kind consumer", id, s.Name, s.SpanKind, "process "+q)
		}
		if s.Parent.IsValid() {
			t.Errorf("message %s: process span has parent %v, want a root linked to the producer", id, s.Parent)
		}
		for key, want := range map[string]attribute.Value{
			"messaging.system":                           attribute.StringValue("qbridge"),
			"messaging.destination.name":                 attribute.StringValue(q),
			"messaging.operation.type":                   attribute.StringValue("process"),
			"messaging.qbridge.message.delivery_attempt": attribute.IntValue(1),
		} {
			if got, ok := attr(s, key); !ok || got != want {
				t.Errorf("message %s: attribute %s = %v, want %v", id, key, got.Emit(), want.Emit())
			}
		}
		mu.Lock()
		inHandler := handlers[id]
		mu.Unlock()
		if inHandler.SpanID() != s.SpanContext.SpanID() {
			t.Errorf("message %s: the handler's context has span %s, want the process span %s", id, inHandler.SpanID(), s.SpanContext.SpanID())
		}

		switch id {
		case plainID:
			if len(s.Links) != 0 {
				t.Errorf("untraced message: links %v, want none", s.Links)
			}
		default:
			if len(s.Links) != 1 || s.Links[0].SpanContext.TraceID() != producer.SpanContext().TraceID() ||
				s.Links[0].SpanContext.SpanID() != producer.SpanContext().SpanID() {
				t.Errorf("message %s: links %+v, want one to the producer span %v", id, s.Links, producer.SpanContext())
			}
		}

		switch id {
		case failID:
			if s.Status.Code != otelcodes.Error || s.Status.Description != boom.Error() {
				t.Errorf("failed handler: status %+v, want Error %q", s.Status, boom)
			}
			recorded := false
			for _, ev := range s.Events {
				for _, kv := range ev.Attributes {
					if ev.Name == "exception" && kv.Key == "exception.message" && kv.Value.AsString() == boom.Error() {
						recorded = true
					}
				}
			}
			if !recorded {
				t.Errorf("failed handler: events %+v, want the error recorded", s.Events)
			}
		default:
			if s.Status.Code != otelcodes.Unset || len(s.Events) != 0 {
				t.Errorf("message %s: status %+v, events %v; want none for a handler that succeeded", id, s.Status, s.Events)
			}
		}
	}
	if v, _ := attr(spanOf(okID), "messaging.qbridge.message.task_type"); v.AsString() != "greet" {
		t.Errorf("task type attribute %q, want greet", v.AsString())
	}
}

func TestEnqueueCarriesTraceContext(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	// The client uses the span in ctx, whatever the global provider.
	tp := sdktrace.NewTracerProvider()
	pctx, producer := tp.Tracer("test").Start(ctx, "produce")
	defer producer.End()
	psc := producer.SpanContext()
	const q = "traced-enqueue"
	own := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

	app := map[string]string{"k": "v"}
	if _, err := e.c.Enqueue(pctx, q, []byte("0"), client.WithHeaders(app)); err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	if _, err := e.c.EnqueueBatch(pctx, q, []client.Message{
		{Payload: []byte("1")},
		{Payload: []byte("2"), Headers: map[string]string{"traceparent": own}},
		{Payload: []byte("3"), Headers: app},
	}); err != nil {
		t.Fatalf("EnqueueBatch: %v", err)
	}
	if _, err := e.c.Enqueue(ctx, q, []byte("4")); err != nil { // no span
		t.Fatalf("Enqueue: %v", err)
	}
	req := &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("5"), Headers: app}
	if _, err := e.c.Raw().Enqueue(pctx, req); err != nil {
		t.Fatalf("Raw().Enqueue: %v", err)
	}
	if len(app) != 1 || len(req.GetHeaders()) != 1 {
		t.Errorf("the caller's headers were modified: %v, request %v", app, req.GetHeaders())
	}

	cs := consume(t, ctx, e.c, q, client.WithAutoAck())
	for i := range 6 {
		d := next(t, cs)
		if got := string(d.Payload); got != fmt.Sprint(i) {
			t.Fatalf("delivery %d has payload %q", i, got)
		}
		sc := headerSpanContext(d.Headers)
		switch i {
		case 2:
			if d.Headers["traceparent"] != own {
				t.Errorf("message 2: the caller's traceparent was replaced: %v", d.Headers)
			}
		case 4:
			if len(d.Headers) != 0 {
				t.Errorf("message without a span: headers %v, want none", d.Headers)
			}
		default:
			if sc.TraceID() != psc.TraceID() || sc.SpanID() != psc.SpanID() || !sc.IsSampled() {
				t.Errorf("message %d: trace context %v (headers %v), want the producer span %v", i, sc, d.Headers, psc)
			}
		}
		if (i == 0 || i == 3 || i == 5) && d.Headers["k"] != "v" {
			t.Errorf("message %d lost its header: %v", i, d.Headers)
		}
	}

	// A message with no room for them gets no trace headers, and is
	// enqueued all the same.
	full := map[string]string{}
	for i := range 64 {
		full[fmt.Sprintf("h%d", i)] = "v"
	}
	if _, err := e.c.Enqueue(pctx, q, []byte("full"), client.WithHeaders(full)); err != nil {
		t.Fatalf("Enqueue with 64 headers: %v", err)
	}
	if d := next(t, cs); !maps.Equal(d.Headers, full) {
		t.Errorf("message with 64 headers: got %d headers, want its own 64", len(d.Headers))
	}
}

// The Worker's spans cost nothing and change nothing without a provider.
func TestWorkerWithoutTracerProvider(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	const q = "untraced-work"
	if _, err := e.c.Enqueue(ctx, q, []byte("x")); err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	got := make(chan trace.Span, 1)
	w := client.NewWorker(e.c, []string{q}, client.HandlerFunc(func(ctx context.Context, _ *client.Task) ([]byte, error) {
		got <- trace.SpanFromContext(ctx)
		return nil, errors.New("not recorded anywhere")
	}), client.WithWorkerLogger(testLogger(t)))
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(wctx) }()
	select {
	case s := <-got:
		if s.IsRecording() {
			t.Errorf("without a tracer provider, the handler's span records")
		}
	case <-time.After(waitTimeout):
		t.Fatal("the handler did not run")
	}
	stop()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}
