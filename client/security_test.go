package client_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/testcerts"
)

// recordingServer answers Enqueue and Consume, recording the authorization
// metadata and the client certificate name of each call.
type recordingServer struct {
	qbridgev1.UnimplementedQueueServiceServer
	mu    sync.Mutex
	auth  []string // authorization metadata of each call ("" when none)
	peers []string // common name of each call's verified client certificate
}

func (s *recordingServer) record(ctx context.Context) {
	md, _ := metadata.FromIncomingContext(ctx)
	a := strings.Join(md.Get("authorization"), ",")
	cn := ""
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
			cn = ti.State.VerifiedChains[0][0].Subject.CommonName
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.auth = append(s.auth, a)
	s.peers = append(s.peers, cn)
}

func (s *recordingServer) calls() (auth, peers []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.auth...), append([]string(nil), s.peers...)
}

func (s *recordingServer) Enqueue(ctx context.Context, _ *qbridgev1.EnqueueRequest) (*qbridgev1.EnqueueResponse, error) {
	s.record(ctx)
	return &qbridgev1.EnqueueResponse{Id: "id-1"}, nil
}

func (s *recordingServer) Consume(_ *qbridgev1.ConsumeRequest, st qbridgev1.QueueService_ConsumeServer) error {
	s.record(st.Context())
	return st.Send(&qbridgev1.ConsumeResponse{Deliveries: []*qbridgev1.Delivery{{Id: "d-1", Queue: "q", Payload: []byte("p"), Attempt: 1}}})
}

// serveRecording serves a recordingServer on 127.0.0.1 with opts (e.g.
// TLS credentials) and returns its address; it is stopped at cleanup.
func serveRecording(t *testing.T, opts ...grpc.ServerOption) (*recordingServer, string) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	rs := &recordingServer{}
	gs := grpc.NewServer(opts...)
	qbridgev1.RegisterQueueServiceServer(gs, rs)
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(lis) }()
	t.Cleanup(func() {
		gs.Stop()
		<-done
	})
	return rs, lis.Addr().String()
}

// dialT dials addr with opts and closes the client at cleanup.
func dialT(t *testing.T, addr string, opts ...client.Option) *client.Client {
	t.Helper()
	c, err := client.Dial(addr, opts...)
	if err != nil {
		t.Fatalf("Dial(%s): %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func writeTestFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestWithTLSBadFiles: files WithTLS cannot use make Dial fail, with an
// error naming what is wrong; TLSConfig says the same.
func TestWithTLSBadFiles(t *testing.T) {
	dir := t.TempDir()
	set := testcerts.WriteSet(t, dir, "worker")
	notPEM := writeTestFile(t, dir, "not.pem", []byte("this is not a certificate\n"))
	missing := filepath.Join(dir, "missing.pem")
	tests := []struct {
		name                string
		ca, cert, key, want string
	}{
		{"missing CA file", missing, "", "", "CA file"},
		{"CA file not PEM", notPEM, "", "", "holds no PEM certificate"},
		{"CA file is a key", set.Files.ClientKey, "", "", "holds no PEM certificate"},
		{"cert without key", set.Files.CA, set.Files.ClientCert, "", "needs both"},
		{"key without cert", set.Files.CA, "", set.Files.ClientKey, "needs both"},
		{"missing cert file", set.Files.CA, missing, set.Files.ClientKey, "client certificate"},
		{"key of another certificate", set.Files.CA, set.Files.ClientCert, set.Files.ServerKey, "client certificate"},
		{"cert file not PEM", set.Files.CA, notPEM, set.Files.ClientKey, "client certificate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := client.Dial("127.0.0.1:1", client.WithTLS(tc.ca, tc.cert, tc.key))
			if err == nil {
				_ = c.Close()
				t.Fatalf("Dial with WithTLS(%q, %q, %q) succeeded", tc.ca, tc.cert, tc.key)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Dial: %q does not contain %q", err, tc.want)
			}
			if _, err2 := client.TLSConfig(tc.ca, tc.cert, tc.key); err2 == nil || err2.Error() != err.Error() {
				t.Errorf("TLSConfig: %v; want the same error as Dial (%v)", err2, err)
			}
		})
	}
	// The error of a bad WithTLS is not lost to a later good option.
	if c, err := client.Dial("127.0.0.1:1", client.WithTLS(missing, "", ""), client.WithToken("t")); err == nil {
		_ = c.Close()
		t.Error("Dial with a missing CA file and WithToken succeeded")
	}
}

// TestTLSConfig: the configuration WithTLS uses.
func TestTLSConfig(t *testing.T) {
	set := testcerts.WriteSet(t, t.TempDir(), "worker")
	cfg, err := client.TLSConfig("", "", "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RootCAs != nil || len(cfg.Certificates) != 0 || cfg.MinVersion < tls.VersionTLS12 || cfg.InsecureSkipVerify {
		t.Errorf("TLSConfig with no files: %+v; want system roots, no client certificate, TLS 1.2+, verification on", cfg)
	}
	cfg, err = client.TLSConfig(set.Files.CA, set.Files.ClientCert, set.Files.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RootCAs == nil || !cfg.RootCAs.Equal(set.CA.Pool()) || len(cfg.Certificates) != 1 || cfg.InsecureSkipVerify {
		t.Errorf("TLSConfig with all files: %+v; want the CA as the only root and the client certificate", cfg)
	}
}

// TestWithTokenSendsBearer: WithToken sends "authorization: Bearer <t>" with
// unary and streaming calls, also over plaintext; without it, nothing.
func TestWithTokenSendsBearer(t *testing.T) {
	ctx := testCtx(t)
	rs, addr := serveRecording(t)
	const token = "qbt_s3cret-t0ken"
	c := dialT(t, addr, client.WithToken(token))
	if _, err := c.Enqueue(ctx, "q", []byte("x")); err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	cs, err := c.Consume(ctx, "q")
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	next(t, cs)
	_ = cs.Close()
	if _, err := dialT(t, addr).Enqueue(ctx, "q", []byte("x")); err != nil {
		t.Fatalf("Enqueue without a token: %v", err)
	}
	auth, _ := rs.calls()
	want := []string{"Bearer " + token, "Bearer " + token, ""}
	if strings.Join(auth, "|") != strings.Join(want, "|") {
		t.Errorf("authorization metadata of the calls: %q, want %q", auth, want)
	}
}

// TestWithTLS: WithTLS connects to a TLS server that its CA file vouches
// for, with a client certificate when given, and carries WithToken's
// token; without the CA (system roots), or without TLS, it does not
// connect.
func TestWithTLS(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	set := testcerts.WriteSet(t, dir, "worker-7")
	srvCfg := &tls.Config{Certificates: []tls.Certificate{set.Server.TLS}, MinVersion: tls.VersionTLS12}
	rs, addr := serveRecording(t, grpc.Creds(credentials.NewTLS(srvCfg)))

	c := dialT(t, addr, client.WithTLS(set.Files.CA, "", ""), client.WithToken("tls-token"))
	if id, err := c.Enqueue(ctx, "q", []byte("x")); err != nil || id != "id-1" {
		t.Fatalf("Enqueue over TLS: %q, %v", id, err)
	}
	cs, err := c.Consume(ctx, "q")
	if err != nil {
		t.Fatalf("Consume over TLS: %v", err)
	}
	if d := next(t, cs); d.ID != "d-1" {
		t.Fatalf("Consume over TLS: delivery %q, want d-1", d.ID)
	}
	_ = cs.Close()
	if auth, _ := rs.calls(); len(auth) != 2 || auth[0] != "Bearer tls-token" || auth[1] != "Bearer tls-token" {
		t.Errorf("authorization metadata over TLS: %q", auth)
	}

	// System roots do not know the test CA; a plaintext client gets no
	// answer; a CA that did not sign the server's certificate is refused.
	_, err = dialT(t, addr, client.WithTLS("", "", "")).Enqueue(ctx, "q", []byte("x"))
	wantCode(t, "Enqueue trusting the system roots", err, codes.Unavailable)
	if !strings.Contains(err.Error(), "certificate") {
		t.Errorf("Enqueue trusting the system roots: %v; want a certificate error", err)
	}
	_, err = dialT(t, addr).Enqueue(ctx, "q", []byte("x"))
	wantCode(t, "Enqueue in plaintext to a TLS server", err, codes.Unavailable)
	other := testcerts.NewCA(t, "another CA").WriteCA(t, dir, "other-ca.pem")
	_, err = dialT(t, addr, client.WithTLS(other, "", "")).Enqueue(ctx, "q", []byte("x"))
	wantCode(t, "Enqueue trusting another CA", err, codes.Unavailable)
	if auth, _ := rs.calls(); len(auth) != 2 {
		t.Errorf("the server saw %d calls, want only the 2 that connected", len(auth))
	}
}

// TestWithTLSClientCertificate: WithTLS with a certificate and key does
// mutual TLS; a server requiring a client certificate refuses a client
// without one.
func TestWithTLSClientCertificate(t *testing.T) {
	ctx := testCtx(t)
	set := testcerts.WriteSet(t, t.TempDir(), "worker-7")
	pool := x509.NewCertPool()
	pool.AddCert(set.CA.Cert)
	srvCfg := &tls.Config{
		Certificates: []tls.Certificate{set.Server.TLS},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}
	rs, addr := serveRecording(t, grpc.Creds(credentials.NewTLS(srvCfg)))

	c := dialT(t, addr, client.WithTLS(set.Files.CA, set.Files.ClientCert, set.Files.ClientKey))
	if _, err := c.Enqueue(ctx, "q", []byte("x")); err != nil {
		t.Fatalf("Enqueue with a client certificate: %v", err)
	}
	if _, peers := rs.calls(); len(peers) != 1 || peers[0] != "worker-7" {
		t.Errorf("client certificates seen by the server: %q, want [worker-7]", peers)
	}
	_, err := dialT(t, addr, client.WithTLS(set.Files.CA, "", "")).Enqueue(ctx, "q", []byte("x"))
	wantCode(t, "Enqueue without a client certificate", err, codes.Unavailable)
}
