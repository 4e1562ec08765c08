package tracing

import (
	"context"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// The message headers that carry the trace context, as W3C Trace Context
// (https://www.w3.org/TR/trace-context/) defines them.
const (
	// HeaderTraceparent holds the producer's span context:
	// "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>".
	HeaderTraceparent = "traceparent"
	// HeaderTracestate holds vendor-specific trace data that goes with
	// HeaderTraceparent; it is only meaningful next to it.
	HeaderTracestate = "tracestate"
)

// The server's limits on message headers (server/validate.go): injecting
// never takes a message past them, so it never makes a valid Enqueue fail.
const (
	maxHeaders     = 64
	maxHeaderBytes = 64 << 10
)

// w3c is the one propagator of the header contract: W3C trace context
// only (baggage is not copied into messages).
var w3c propagation.TraceContext

// InjectHeaders adds the span context of ctx to h as HeaderTraceparent (and
// HeaderTracestate when the span context has one) and returns h, allocating
// it when h is nil. It modifies h in place: pass a copy if h is shared.
//
// It adds nothing, and returns h as it is (nil stays nil), when ctx has no
// valid span context, when h already has a HeaderTraceparent (the
// producer's own trace context wins), or when the two headers would take h
// past the server's limits (64 headers, 64 KiB of keys and values). When it
// adds a traceparent and the span context has no tracestate, it removes a
// tracestate that h had without a traceparent: a tracestate belongs to the
// traceparent next to it.
func InjectHeaders(ctx context.Context, h map[string]string) map[string]string {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return h
	}
	if _, ok := h[HeaderTraceparent]; ok {
		return h
	}
	var tc propagation.MapCarrier = make(map[string]string, 2)
	w3c.Inject(trace.ContextWithSpanContext(context.Background(), sc), tc)
	tp, ts := tc[HeaderTraceparent], tc[HeaderTracestate]
	if tp == "" {
		return h
	}
	n, size := len(h)+1, len(HeaderTraceparent)+len(tp)
	if ts != "" {
		size += len(HeaderTracestate) + len(ts)
	}
	for k, v := range h {
		if k == HeaderTracestate {
			if ts != "" {
				continue // replaced
			}
			n-- // removed
			continue
		}
		size += len(k) + len(v)
	}
	if ts != "" {
		if _, had := h[HeaderTracestate]; !had {
			n++
		}
	}
	if n > maxHeaders || size > maxHeaderBytes {
		return h
	}
	if h == nil {
		h = make(map[string]string, 2)
	}
	h[HeaderTraceparent] = tp
	if ts != "" {
		h[HeaderTracestate] = ts
	} else {
		delete(h, HeaderTracestate)
	}
	return h
}

// ExtractHeaders returns ctx with the remote span context that
// HeaderTraceparent and HeaderTracestate of h describe; ctx itself when h
// has none or an invalid one. trace.SpanContextFromContext of the result
// is the producer's span context, to link a consumer's span to (or to
// parent it on).
func ExtractHeaders(ctx context.Context, h map[string]string) context.Context {
	if _, ok := h[HeaderTraceparent]; !ok {
		return ctx
	}
	return w3c.Extract(ctx, propagation.MapCarrier(h))
}
