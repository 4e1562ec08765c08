package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns PEM certificate and key for a server (127.0.0.1) or client.
func (ca *testCA) issue(t *testing.T, name string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	// Write then rename, as certificate tools do, so a reader never sees
	// half a file.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

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
	ca := newTestCA(t, "qbridge test CA")
	certPEM, keyPEM := ca.issue(t, "qbridged", true)
	certFile, keyFile := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key")
	writeFile(t, certFile, certPEM)
	writeFile(t, keyFile, keyPEM)
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--tls-cert", certFile, "--tls-key", keyFile}, nil)
	if logLine(d.logs.String(), "qbridge listening") == "" || !strings.Contains(d.logs.String(), "transport=TLS") {
		t.Fatalf("the listening line does not say TLS:\n%s", d.logs)
	}

	cc := tlsDial(t, d.addr, ca.pem, nil)
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
	other := newTestCA(t, "another CA")
	if err := healthOK(tlsDial(t, d.addr, other.pem, nil)); err == nil {
		t.Fatal("a client trusting another CA accepted the server's certificate")
	}

	// Replace the certificate with one from the other CA: new handshakes
	// get it within a couple of seconds, the open stream keeps working.
	c2, k2 := other.issue(t, "qbridged renewed", true)
	writeFile(t, keyFile, k2)
	writeFile(t, certFile, c2)
	eventually(t, 10*time.Second, "the renewed certificate to be served", func() bool {
		return healthOK(tlsDial(t, d.addr, other.pem, nil)) == nil
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
	ca := newTestCA(t, "qbridge test CA")
	certPEM, keyPEM := ca.issue(t, "qbridged", true)
	clientCA := newTestCA(t, "client CA")
	files := map[string][]byte{"server.pem": certPEM, "server.key": keyPEM, "clients.pem": clientCA.pem}
	for n, b := range files {
		writeFile(t, filepath.Join(dir, n), b)
	}
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--tls-cert", filepath.Join(dir, "server.pem"),
		"--tls-key", filepath.Join(dir, "server.key"), "--tls-client-ca", filepath.Join(dir, "clients.pem")}, nil)
	if !strings.Contains(d.logs.String(), "transport=\"mutual TLS\"") {
		t.Fatalf("the listening line does not say mutual TLS:\n%s", d.logs)
	}
	if err := healthOK(tlsDial(t, d.addr, ca.pem, nil)); err == nil {
		t.Fatal("a client without a certificate got through mutual TLS")
	}
	stranger := newTestCA(t, "stranger")
	sc, sk := stranger.issue(t, "intruder", false)
	strangerCert, err := tls.X509KeyPair(sc, sk)
	if err != nil {
		t.Fatal(err)
	}
	if err := healthOK(tlsDial(t, d.addr, ca.pem, &strangerCert)); err == nil {
		t.Fatal("a client certificate from an unknown CA got through")
	}
	cc, ck := clientCA.issue(t, "worker-1", false)
	clientCert, err := tls.X509KeyPair(cc, ck)
	if err != nil {
		t.Fatal(err)
	}
	if err := healthOK(tlsDial(t, d.addr, ca.pem, &clientCert)); err != nil {
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
