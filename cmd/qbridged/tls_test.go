package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/testcerts"
)

// tlsDial connects with TLS trusting ca, presenting client (if not nil).
func tlsDial(t *testing.T, addr string, ca []byte, client *tls.Certificate) *grpc.ClientConn {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if client != nil {
		cfg.Certificates = []tls.Certificate{*client}
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func healthOK(cc *grpc.ClientConn) error {
	ctx, cancel := contextWithTimeout(3 * time.Second)
	defer cancel()
	_, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

func TestTLSListener(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "qbridge test CA")
	certFile, keyFile := ca.Server(t, "qbridged").Write(t, dir, "server")
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--tls-cert", certFile, "--tls-key", keyFile}, nil)
	if logLine(d.logs.String(), "qbridge listening") == "" || !strings.Contains(d.logs.String(), "transport=TLS") {
		t.Fatalf("the listening line does not say TLS:\n%s", d.logs)
	}

	cc := tlsDial(t, d.addr, ca.PEM, nil)
	if err := healthOK(cc); err != nil {
		t.Fatalf("TLS client: %v", err)
	}
	ctx, cancel := contextWithTimeout(10 * time.Second)
	defer cancel()
	qc := qbridgev1.NewQueueServiceClient(cc)
	if _, err := qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "tls", Payload: []byte("x")}); err != nil {
		t.Fatalf("Enqueue over TLS: %v", err)
	}
	// A stream opened now must survive the certificate being replaced.
	st, err := qc.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "tls"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}

	if err := healthOK(dial(t, d.addr)); err == nil {
		t.Fatal("a plaintext client got an answer from the TLS listener")
	}
	other := testcerts.NewCA(t, "another CA")
	if err := healthOK(tlsDial(t, d.addr, other.PEM, nil)); err == nil {
		t.Fatal("a client trusting another CA accepted the server's certificate")
	}

	// Replace the certificate with one from the other CA: new handshakes
	// get it within a couple of seconds, the open stream keeps working.
	renewed := other.Server(t, "qbridged renewed")
	testcerts.WriteFile(t, keyFile, renewed.KeyPEM)
	testcerts.WriteFile(t, certFile, renewed.CertPEM)
	eventually(t, 10*time.Second, "the renewed certificate to be served", func() bool {
		return healthOK(tlsDial(t, d.addr, other.PEM, nil)) == nil
	})
	if _, err := qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "tls", Payload: []byte("y")}); err != nil {
		t.Fatalf("Enqueue on the old connection after the renewal: %v", err)
	}
	r, err := st.Recv()
	if err != nil || string(r.GetDeliveries()[0].GetPayload()) != "y" {
		t.Fatalf("the stream opened before the renewal: %v, %v; want the new message", r, err)
	}
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "qbridge test CA")
	certFile, keyFile := ca.Server(t, "qbridged").Write(t, dir, "server")
	clientCA := testcerts.NewCA(t, "client CA")
	clientCAFile := clientCA.WriteCA(t, dir, "clients.pem")
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--tls-cert", certFile,
		"--tls-key", keyFile, "--tls-client-ca", clientCAFile}, nil)
	if !strings.Contains(d.logs.String(), "transport=\"mutual TLS\"") {
		t.Fatalf("the listening line does not say mutual TLS:\n%s", d.logs)
	}
	if err := healthOK(tlsDial(t, d.addr, ca.PEM, nil)); err == nil {
		t.Fatal("a client without a certificate got through mutual TLS")
	}
	stranger := testcerts.NewCA(t, "stranger")
	if err := healthOK(tlsDial(t, d.addr, ca.PEM, &stranger.Client(t, "intruder").TLS)); err == nil {
		t.Fatal("a client certificate from an unknown CA got through")
	}
	if err := healthOK(tlsDial(t, d.addr, ca.PEM, &clientCA.Client(t, "worker-1").TLS)); err != nil {
		t.Fatalf("a client with a certificate from the client CA: %v", err)
	}
}

func TestTLSFlagsValidated(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"cert without key", []string{"--tls-cert", "a.pem"}, "--tls-cert (QBRIDGE_TLS_CERT) and --tls-key go together"},
		{"client CA without TLS", []string{"--tls-client-ca", "ca.pem"}, "--tls-client-ca (QBRIDGE_TLS_CLIENT_CA) needs --tls-cert"},
		{"unreadable files", []string{"--tls-cert", "/nonexistent/a.pem", "--tls-key", "/nonexistent/a.key"}, "--tls-cert /nonexistent/a.pem / --tls-key /nonexistent/a.key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := contextWithTimeout(10 * time.Second)
			defer cancel()
			var logs syncBuffer
			err := run(ctx, append([]string{"--listen", "127.0.0.1:0"}, tc.args...), func(string) string { return "" }, &logs, &logs)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("run: %v; want an error containing %q", err, tc.want)
			}
		})
	}
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
