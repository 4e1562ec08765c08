package client

// Tracing: the client follows the header contract of package
// github.com/qbridge/qbridge/server/tracing (W3C "traceparent" and
// "tracestate" message headers) without importing it, so that the client
// depends on the OpenTelemetry API only, never on the SDK or exporters.
//
// Enqueue and EnqueueBatch put the caller's span context into the headers
// of each message that has no traceparent yet; a Worker starts a span
// "process <queue>" for every task, linked to that span context. Both use
// OpenTelemetry's global tracer provider, so they cost next to nothing
// until the application installs one (otel.SetTracerProvider).

import (
	"context"
	"maps"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// tracerName is the instrumentation scope of the client's spans.
const tracerName = "github.com/qbridge/qbridge/client"

// The trace context headers (see server/tracing.HeaderTraceparent).
const (
	headerTraceparent = "traceparent"
	headerTracestate  = "tracestate"
)

// The server's limits on message headers: injecting never breaks them.
const (
	maxHeaders     = 64
	maxHeaderBytes = 64 << 10
)

// Span attributes of the process span (OpenTelemetry messaging semantic
// conventions; the qbridge-specific ones under messaging.qbridge.*).
const (
	attrSystem          = "messaging.system"
	attrOperationType   = "messaging.operation.type"
	attrOperationName   = "messaging.operation.name"
	attrDestination     = "messaging.destination.name"
	attrMessageID       = "messaging.message.id"
	attrBodySize        = "messaging.message.body.size"
	attrDeliveryAttempt = "messaging.qbridge.message.delivery_attempt"
	attrTaskType        = "messaging.qbridge.message.task_type"
)

var w3c propagation.TraceContext

// traceHeaders returns a copy of h with the span context of ctx added as
// traceparent (and tracestate), and true; or h and false when there is
// nothing to add: no valid span context, h has a traceparent already (the
// caller's own wins), or no room within the server's header limits. A
// tracestate that h has without a traceparent is replaced (or dropped): it
// belongs to the traceparent beside it. h itself is never modified.
func traceHeaders(ctx context.Context, h map[string]string) (map[string]string, bool) {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return h, false
	}
	if _, ok := h[headerTraceparent]; ok {
		return h, false
	}
	tc := propagation.MapCarrier{}
	w3c.Inject(trace.ContextWithSpanContext(context.Background(), sc), tc)
	tp, ts := tc[headerTraceparent], tc[headerTracestate]
	if tp == "" {
		return h, false
	}
	out := maps.Clone(h)
	if out == nil {
		out = make(map[string]string, 2)
	}
	out[headerTraceparent] = tp
	if ts != "" {
		out[headerTracestate] = ts
	} else {
		delete(out, headerTracestate)
	}
	size := 0
	for k, v := range out {
		size += len(k) + len(v)
	}
	if len(out) > maxHeaders || size > maxHeaderBytes {
		return h, false
	}
	return out, true
}

// tracingRPC is the QueueService client of a Client: Enqueue and
// EnqueueBatch add the caller's trace context to the message headers (on
// a copy of the request: the caller's request and maps are left as they
// are).
type tracingRPC struct {
	qbridgev1.QueueServiceClient
}

func (c tracingRPC) Enqueue(ctx context.Context, in *qbridgev1.EnqueueRequest, opts ...grpc.CallOption) (*qbridgev1.EnqueueResponse, error) {
	if h, ok := traceHeaders(ctx, in.GetHeaders()); ok {
		in = proto.Clone(in).(*qbridgev1.EnqueueRequest)
		in.Headers = h
	}
	return c.QueueServiceClient.Enqueue(ctx, in, opts...)
}

func (c tracingRPC) EnqueueBatch(ctx context.Context, in *qbridgev1.EnqueueBatchRequest, opts ...grpc.CallOption) (*qbridgev1.EnqueueBatchResponse, error) {
	if trace.SpanContextFromContext(ctx).IsValid() {
		var out *qbridgev1.EnqueueBatchRequest
		for i, m := range in.GetMessages() {
			h, ok := traceHeaders(ctx, m.GetHeaders())
			if !ok {
				continue
			}
			if out == nil {
				out = proto.Clone(in).(*qbridgev1.EnqueueBatchRequest)
			}
			out.Messages[i].Headers = h
		}
		if out != nil {
			in = out
		}
	}
	return c.QueueServiceClient.EnqueueBatch(ctx, in, opts...)
}

// producerSpanContext returns the span context that the trace headers of
// a delivery carry (invalid when they carry none).
func producerSpanContext(h map[string]string) trace.SpanContext {
	if _, ok := h[headerTraceparent]; !ok {
		return trace.SpanContext{}
	}
	return trace.SpanContextFromContext(w3c.Extract(context.Background(), propagation.MapCarrier(h)))
}

// startProcessSpan starts the span of a Worker's handler for d: "process
// <queue>", of kind consumer, the root of a trace of its own, linked to
// the producer's span context from d's headers. The span comes from the
// global tracer provider: a no-op unless the application installed one.
func startProcessSpan(ctx context.Context, d *Delivery) (context.Context, trace.Span) {
	attrs := []attribute.KeyValue{
		attribute.String(attrSystem, "qbridge"),
		attribute.String(attrOperationType, "process"),
		attribute.String(attrOperationName, "process"),
		attribute.String(attrDestination, d.Queue),
		attribute.String(attrMessageID, d.ID),
		attribute.Int(attrBodySize, len(d.Payload)),
		attribute.Int(attrDeliveryAttempt, d.Attempt),
	}
	if d.TaskType != "" {
		attrs = append(attrs, attribute.String(attrTaskType, d.TaskType))
	}
	opts := []trace.SpanStartOption{
		trace.WithNewRoot(),
		trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attrs...),
	}
	if sc := producerSpanContext(d.Headers); sc.IsValid() {
		opts = append(opts, trace.WithLinks(trace.Link{SpanContext: sc}))
	}
	return otel.GetTracerProvider().Tracer(tracerName).Start(ctx, "process "+d.Queue, opts...)
}

// endProcessSpan ends a process span with the handler's outcome.
func endProcessSpan(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(otelcodes.Error, err.Error())
	}
	span.End()
}
