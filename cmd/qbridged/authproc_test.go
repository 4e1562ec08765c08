package main

import (
	"crypto/rand"
	"encoding/base64"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/internal/testcerts"
	"github.com/qbridge/qbridge/server/auth"
)

// newTestToken returns a random bearer token shaped like `qbridge token
// new`'s.
func newTestToken(t *testing.T) string {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "qbt_" + base64.RawURLEncoding.EncodeToString(b)
}

// dialAs returns a Go client over TLS (trusting caFile) sending token, or
// no token when it is "". It is closed at cleanup.
func dialAs(t *testing.T, addr, caFile, token string) *client.Client {
	t.Helper()
	opts := []client.Option{client.WithTLS(caFile, "", "")}
	if token != "" {
		opts = append(opts, client.WithToken(token))
	}
	c, err := client.Dial(addr, opts...)
	if err != nil {
		t.Fatalf("client.Dial(%s): %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// wantStatus fails unless err is a gRPC status with code c whose message
// contains each of msgs.
func wantStatus(t *testing.T, what string, err error, c codes.Code, msgs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: succeeded, want %v", what, c)
	}
	st := status.Convert(err)
	if st.Code() != c {
		t.Fatalf("%s: got %v (%v), want %v", what, st.Code(), err, c)
	}
	for _, m := range msgs {
		if !strings.Contains(st.Message(), m) {
			t.Fatalf("%s: %q does not contain %q", what, st.Message(), m)
		}
	}
}

// TestAuthEndToEnd runs qbridged (run, in-process) on a real Redis with a
// TLS listener and a --config file of two principals known by token hash:
// a producer of orders.* and a consumer of orders.*. Each may do what it is
// granted and nothing else, callers without a token are refused but for
// health checks, and the log names principals but never a token.
func TestAuthEndToEnd(t *testing.T) {
	rs := redistest.Start(t)
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "qbridge auth test CA")
	certFile, keyFile := ca.Server(t, "qbridged").Write(t, dir, "server")
	caFile := ca.WriteCA(t, dir, "ca.pem")

	producerToken, consumerToken, strangerToken := newTestToken(t), newTestToken(t), newTestToken(t)
	cfg := writeTOML(t, `
log-level = "debug"

[[principal]]
name = "producer"
tokens = ["`+auth.HashToken(producerToken)+`"]
  [[principal.grant]]
  queues = ["orders.*"]
  allow = ["produce"]

[[principal]]
name = "consumer"
tokens = ["`+auth.HashToken(consumerToken)+`"]
  [[principal.grant]]
  queues = ["orders.*"]
  allow = ["consume"]
`)
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--redis-url", rs.URL(0),
		"--tls-cert", certFile, "--tls-key", keyFile, "--config", cfg}, nil)
	if l := logLine(d.logs.String(), "authentication on"); l == "" || !strings.Contains(l, "principals=2") {
		t.Fatalf("no startup line saying authentication is on for 2 principals:\n%s", d.logs)
	}
	ctx := rpcCtx(t)
	producer := dialAs(t, d.addr, caFile, producerToken)
	consumer := dialAs(t, d.addr, caFile, consumerToken)

	// The producer may produce to orders.*, and only there.
	id, err := producer.Enqueue(ctx, "orders.eu", []byte("order 1"))
	if err != nil {
		t.Fatalf("producer: Enqueue to orders.eu: %v", err)
	}
	_, err = producer.Enqueue(ctx, "billing", []byte("x"))
	wantStatus(t, "producer: Enqueue to billing", err, codes.PermissionDenied, `principal "producer"`, `"billing"`)
	_, err = producer.Enqueue(ctx, "orders", []byte("x")) // "orders.*" does not match "orders"
	wantStatus(t, "producer: Enqueue to orders", err, codes.PermissionDenied, `principal "producer"`)
	pc, err := producer.Consume(ctx, "orders.eu")
	if err == nil {
		_, err = pc.Next()
		_ = pc.Close()
	}
	wantStatus(t, "producer: Consume of orders.eu", err, codes.PermissionDenied, `principal "producer"`, "consume")

	// The consumer may consume orders.*, not produce to it.
	_, err = consumer.Enqueue(ctx, "orders.eu", []byte("x"))
	wantStatus(t, "consumer: Enqueue to orders.eu", err, codes.PermissionDenied, `principal "consumer"`, "produce")
	cs, err := consumer.Consume(ctx, "orders.eu")
	if err != nil {
		t.Fatalf("consumer: Consume: %v", err)
	}
	defer cs.Close()
	dv, err := cs.Next()
	if err != nil {
		t.Fatalf("consumer: Next: %v", err)
	}
	if dv.ID != id || string(dv.Payload) != "order 1" {
		t.Fatalf("consumer got %s %q, want %s %q", dv.ID, dv.Payload, id, "order 1")
	}
	if err := dv.Ack(ctx); err != nil {
		t.Fatalf("consumer: Ack: %v", err)
	}
	if r, f, err := consumer.QueueStats(ctx, "orders.eu"); err != nil || r != 0 || f != 0 {
		t.Fatalf("consumer: QueueStats after the ack: ready %d, in flight %d, %v; want 0, 0", r, f, err)
	}
	other, err := consumer.Consume(ctx, "billing")
	if err == nil {
		_, err = other.Next()
		_ = other.Close()
	}
	wantStatus(t, "consumer: Consume of billing", err, codes.PermissionDenied, `principal "consumer"`)

	// No token, or one the server does not know: UNAUTHENTICATED.
	anon := dialAs(t, d.addr, caFile, "")
	_, err = anon.Enqueue(ctx, "orders.eu", []byte("x"))
	wantStatus(t, "no token: Enqueue", err, codes.Unauthenticated, "authorization: Bearer")
	ac, err := anon.Consume(ctx, "orders.eu")
	if err == nil {
		_, err = ac.Next()
		_ = ac.Close()
	}
	wantStatus(t, "no token: Consume", err, codes.Unauthenticated)
	_, err = dialAs(t, d.addr, caFile, strangerToken).Enqueue(ctx, "orders.eu", []byte("x"))
	wantStatus(t, "unknown token: Enqueue", err, codes.Unauthenticated, "not one this server knows")

	// Health checks need no token (--public-health defaults to true).
	tc, err := client.TLSConfig(caFile, "", "")
	if err != nil {
		t.Fatal(err)
	}
	hc, err := grpc.NewClient(d.addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	for _, svc := range []string{"", queueServiceName} {
		resp, err := healthpb.NewHealthClient(hc).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health of %q without a token: %v, %v; want SERVING", svc, resp, err)
		}
	}

	// Stop qbridged, so that its log is complete, then read it: denials
	// name the principal, and no token appears anywhere.
	if err := d.stop(t); err != nil {
		t.Fatalf("run returned %v after cancel", err)
	}
	logs := d.logs.String()
	for _, name := range []string{"producer", "consumer"} {
		found := false
		for _, l := range strings.Split(logs, "\n") {
			found = found || strings.Contains(l, "principal="+name) && strings.Contains(l, "permission denied")
		}
		if !found {
			t.Errorf("no permission denied line with principal=%s in the log:\n%s", name, logs)
		}
	}
	if logLine(logs, "unknown bearer token") == "" || logLine(logs, "no credentials") == "" {
		t.Errorf("the unauthenticated calls are not logged:\n%s", logs)
	}
	for what, tok := range map[string]string{"producer": producerToken, "consumer": consumerToken, "unknown": strangerToken} {
		if strings.Contains(logs, tok) {
			t.Errorf("the log contains the %s token:\n%s", what, logs)
		}
		// Nor the secret part without its prefix.
		if strings.Contains(logs, strings.TrimPrefix(tok, "qbt_")) {
			t.Errorf("the log contains the %s token without its qbt_ prefix", what)
		}
	}
}
