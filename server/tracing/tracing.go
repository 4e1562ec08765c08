// Package tracing adds OpenTelemetry tracing to qbridged, and carries the
// producer's trace context through the queue to the consumers.
//
// Tracing is off by default: Setup with an empty Config.Endpoint builds no
// tracer provider and returns no server options, so an untraced qbridged
// does exactly what it did before.
//
// # What is traced
//
// With an OTLP endpoint, Setup returns a gRPC stats handler (otelgrpc) that
// makes one server span per gRPC call, QueueService and AdminService alike
// (health checks excepted), named after the method
// ("qbridge.v1.QueueService/Enqueue"). Its parent is the W3C trace context
// the caller sent in its gRPC metadata (any OpenTelemetry-instrumented gRPC
// client sends it), if any. A Consume or Subscribe stream is one span that
// lasts as long as the stream. Spans are exported in batches over OTLP
// (gRPC or HTTP/protobuf) and sampled by a parent-based ratio sampler: a
// call whose caller sampled (or dropped) its trace follows that decision,
// the others are sampled at Config.SampleRatio.
//
// # The header contract
//
// Enqueue and EnqueueBatch put the trace context into each message's
// headers, so that it reaches whoever consumes the message, in any
// language:
//
//   - "traceparent" (HeaderTraceparent) is the W3C traceparent of the
//     server's Enqueue span, "00-<trace id>-<span id>-<flags>", and
//     "tracestate" (HeaderTracestate) the W3C tracestate, when there is one.
//   - A message that already has a traceparent header keeps it: a producer
//     that sets its own (the Go client does, from the caller's span; see
//     InjectHeaders) wins, and its trace then runs from the producer's span
//     to the consumers directly.
//   - Nothing is added to a message that has no room for it within the
//     server's header limits, to messages of raw-mode queues (see
//     WithRawQueues), or when tracing is off.
//
// The headers are ordinary message headers: they are stored with the
// message, delivered in Delivery.headers on every attempt, and shown by the
// admin API. A consumer links its processing span to the producer by reading
// the traceparent header (any W3C trace-context propagator parses it: in
// Go, ExtractHeaders; in Python, opentelemetry's TraceContextTextMapPropagator
// over the headers dict; in Node, W3CTraceContextPropagator with a plain
// object getter) and adding a span link to that span context (or using it as
// the parent). The Go client's Worker does that for every task it runs: a
// span "process <queue>" of kind consumer, linked to the producer.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// Protocols of Config.Protocol.
const (
	ProtocolGRPC = "grpc"
	ProtocolHTTP = "http/protobuf"
)

// DefaultServiceName is the service.name of qbridged's spans unless
// Config.ServiceName (or OTEL_SERVICE_NAME) says otherwise.
const DefaultServiceName = "qbridged"

// Config configures Setup.
type Config struct {
	// Endpoint is the OTLP collector: "host:port" (TLS unless Insecure),
	// or a URL "http://host:port" (plaintext) or "https://host:port"
	// (TLS). For http/protobuf, a URL path is used as it is, and a URL
	// without one, like "host:port", sends to /v1/traces. "" turns
	// tracing off.
	Endpoint string
	// Protocol is ProtocolGRPC ("grpc", the default when "") or
	// ProtocolHTTP ("http/protobuf").
	Protocol string
	// Insecure sends to the collector in plaintext (without TLS), also for
	// an "https://" Endpoint.
	Insecure bool
	// SampleRatio is the fraction of traces sampled that start at qbridged
	// (calls without a sampled or unsampled parent), in (0, 1]; 0 means 1
	// (all). To trace nothing, leave Endpoint empty.
	SampleRatio float64
	// ServiceName is the service.name resource attribute. "" means
	// OTEL_SERVICE_NAME if set, else DefaultServiceName.
	ServiceName string
	// Headers are sent with every export, e.g. an authorization header.
	Headers map[string]string
}

// Option configures Setup beyond Config.
type Option func(*options)

type options struct {
	tp    trace.TracerProvider
	isRaw func(queue string) bool
}

// WithTracerProvider makes Setup use tp instead of building a provider from
// the Config: Endpoint and the exporter settings are ignored, tracing is on,
// and the shutdown function Setup returns does nothing (tp is the caller's
// to shut down). For tests, and for programs that embed qbridge and have a
// provider of their own.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(o *options) { o.tp = tp }
}

// WithRawQueues tells Setup which queues are in raw mode (pass the same
// function as broker.WithRawQueues): their lists hold bare payloads and the
// server rejects any message header for them, so the trace context is not
// injected into their messages. Without it, an Enqueue to a raw-mode queue
// fails with INVALID_ARGUMENT while tracing is on.
func WithRawQueues(isRaw func(queue string) bool) Option {
	return func(o *options) { o.isRaw = isRaw }
}

// Setup turns tracing on as cfg says, or leaves it off when cfg.Endpoint is
// "" (and no WithTracerProvider is given): then it returns no server
// options and a shutdown function that does nothing.
//
// With tracing on, serverOpts are a stats handler that makes a server span
// for every call, and a unary interceptor (chained after the server's
// others: pass serverOpts to grpc.NewServer after grpc.ChainUnaryInterceptor
// or any interceptor option) that puts the span's trace context into the
// headers of Enqueue and EnqueueBatch messages (see the package
// documentation). shutdown flushes the spans not yet exported and stops the
// exporter; call it once, after the gRPC server has stopped, with a
// deadline.
//
// Setup does not change OpenTelemetry's global tracer provider or
// propagator. The exporters also read the standard OTEL_EXPORTER_OTLP_*
// environment variables for what cfg leaves unset (such as the
// certificate of a TLS collector), and the resource takes
// OTEL_RESOURCE_ATTRIBUTES. Setup does not connect: an unreachable
// collector shows up as export errors, reported to OpenTelemetry's global
// error handler (logged by default), never as failed calls.
func Setup(ctx context.Context, cfg Config, opts ...Option) (serverOpts []grpc.ServerOption, shutdown func(context.Context) error, err error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	noop := func(context.Context) error { return nil }
	tp, shutdown := o.tp, noop
	if tp == nil {
		if cfg.Endpoint == "" {
			return nil, noop, nil
		}
		sdk, err := newProvider(ctx, cfg)
		if err != nil {
			return nil, nil, err
		}
		tp, shutdown = sdk, sdk.Shutdown
	}
	handler := otelgrpc.NewServerHandler(
		otelgrpc.WithTracerProvider(tp),
		otelgrpc.WithPropagators(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})),
		// Tracing only: metrics are the business of server/metrics.
		otelgrpc.WithMeterProvider(metricnoop.NewMeterProvider()),
		otelgrpc.WithFilter(filters.Not(filters.HealthCheck())),
	)
	serverOpts = []grpc.ServerOption{
		grpc.StatsHandler(handler),
		grpc.ChainUnaryInterceptor(injector(o.isRaw)),
	}
	return serverOpts, shutdown, nil
}

// injector returns the interceptor that puts the trace context of the
// call's span into the headers of enqueued messages.
func injector(isRaw func(string) bool) grpc.UnaryServerInterceptor {
	skip := func(queue string) bool { return isRaw != nil && isRaw(queue) }
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if !trace.SpanContextFromContext(ctx).IsValid() {
			return handler(ctx, req)
		}
		switch r := req.(type) {
		case *qbridgev1.EnqueueRequest:
			if !skip(r.GetQueue()) {
				r.Headers = InjectHeaders(ctx, r.Headers)
			}
		case *qbridgev1.EnqueueBatchRequest:
			if !skip(r.GetQueue()) {
				for _, m := range r.GetMessages() {
					if m != nil {
						m.Headers = InjectHeaders(ctx, m.Headers)
					}
				}
			}
		}
		return handler(ctx, req)
	}
}

// newProvider builds the SDK tracer provider with an OTLP batch exporter.
func newProvider(ctx context.Context, cfg Config) (*sdktrace.TracerProvider, error) {
	ratio := cfg.SampleRatio
	switch {
	case ratio == 0:
		ratio = 1
	case ratio < 0 || ratio > 1:
		return nil, fmt.Errorf("tracing: sample ratio %v is out of range; use a value in (0, 1] (0 means 1)", cfg.SampleRatio)
	}
	exp, err := newExporter(ctx, cfg)
	if err != nil {
		return nil, err
	}
	res, err := newResource(ctx, cfg.ServiceName)
	if err != nil {
		_ = exp.Shutdown(ctx)
		return nil, err
	}
	return sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(ratio))),
	), nil
}

// newResource describes qbridged: service.name, the SDK, and
// OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME.
func newResource(ctx context.Context, serviceName string) (*resource.Resource, error) {
	const key = "service.name"
	// Later options win: an explicit name over the environment, the
	// environment over the default.
	opts := []resource.Option{resource.WithTelemetrySDK()}
	if serviceName == "" {
		opts = append(opts, resource.WithAttributes(attribute.String(key, DefaultServiceName)), resource.WithFromEnv())
	} else {
		opts = append(opts, resource.WithFromEnv(), resource.WithAttributes(attribute.String(key, serviceName)))
	}
	res, err := resource.New(ctx, opts...)
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		return nil, fmt.Errorf("tracing: resource: %w", err)
	}
	return res, nil
}

// exporter is what both OTLP exporters are.
type exporter = sdktrace.SpanExporter

func newExporter(ctx context.Context, cfg Config) (exporter, error) {
	u, err := parseEndpoint(cfg.Endpoint)
	if err != nil {
		return nil, err
	}
	switch strings.ToLower(cfg.Protocol) {
	case "", ProtocolGRPC:
		opts := []otlptracegrpc.Option{}
		if u != nil {
			opts = append(opts, otlptracegrpc.WithEndpointURL(u.String()))
		} else {
			opts = append(opts, otlptracegrpc.WithEndpoint(cfg.Endpoint))
		}
		if cfg.Insecure {
			opts = append(opts, otlptracegrpc.WithInsecure())
		}
		if len(cfg.Headers) > 0 {
			opts = append(opts, otlptracegrpc.WithHeaders(cfg.Headers))
		}
		exp, err := otlptracegrpc.New(ctx, opts...)
		if err != nil {
			return nil, fmt.Errorf("tracing: OTLP/gRPC exporter: %w", err)
		}
		return exp, nil
	case ProtocolHTTP:
		opts := []otlptracehttp.Option{}
		if u != nil {
			if u.Path == "" || u.Path == "/" {
				u.Path = "/v1/traces"
			}
			opts = append(opts, otlptracehttp.WithEndpointURL(u.String()))
		} else {
			opts = append(opts, otlptracehttp.WithEndpoint(cfg.Endpoint))
		}
		if cfg.Insecure {
			opts = append(opts, otlptracehttp.WithInsecure())
		}
		if len(cfg.Headers) > 0 {
			opts = append(opts, otlptracehttp.WithHeaders(cfg.Headers))
		}
		exp, err := otlptracehttp.New(ctx, opts...)
		if err != nil {
			return nil, fmt.Errorf("tracing: OTLP/HTTP exporter: %w", err)
		}
		return exp, nil
	default:
		return nil, fmt.Errorf("tracing: unknown OTLP protocol %q; use %q or %q", cfg.Protocol, ProtocolGRPC, ProtocolHTTP)
	}
}

// parseEndpoint returns the endpoint as a URL when it is one ("scheme://"),
// nil for "host:port".
func parseEndpoint(ep string) (*url.URL, error) {
	if !strings.Contains(ep, "://") {
		if strings.ContainsAny(ep, "/ ") {
			return nil, fmt.Errorf("tracing: OTLP endpoint %q is neither host:port nor an http(s) URL", ep)
		}
		return nil, nil
	}
	u, err := url.Parse(ep)
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP endpoint: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("tracing: OTLP endpoint %q: want host:port, http://host:port or https://host:port", ep)
	}
	return u, nil
}
