package main

import (
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
)

func TestErrors(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("cannot connect", func(t *testing.T) {
		// A port nothing listens on: connection refused.
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := lis.Addr().String()
		lis.Close()
		for _, args := range [][]string{
			{"--addr", addr, "enqueue", "q", "x"},
			{"--addr", addr, "stats"},
			{"--addr", addr, "consume", "q"},
			{"--addr", addr, "subscribe", "c"},
		} {
			r := e.run(t, "", args...)
			wantExit(t, strings.Join(args, " "), r, exitUnavailable, "qbridge: Unavailable: cannot connect to "+addr+": ", "connection refused")
			if strings.Count(r.stderr, "\n") != 1 || r.stdout != "" {
				t.Fatalf("%s: want one line on stderr and nothing on stdout\n%v", strings.Join(args, " "), r)
			}
		}
		r := e.runEnv(t, []string{"QBRIDGE_ADDR=" + addr}, "", "queues")
		wantExit(t, "QBRIDGE_ADDR", r, exitUnavailable, "cannot connect to "+addr)
	})

	t.Run("invalid queue name", func(t *testing.T) {
		r := e.run(t, "", "enqueue", "bad name", "x")
		wantExit(t, "enqueue", r, exitServer, `qbridge: InvalidArgument: queue name "bad name" has a space at byte 3`)
		golden(t, "error_invalid_name", r.stderr)
		wantExit(t, "consume", e.run(t, "", "consume", "a*b", "--timeout", "5s"), exitServer, "qbridge: InvalidArgument: ")
	})

	t.Run("usage", func(t *testing.T) {
		r := e.run(t, "", "frobnicate")
		wantExit(t, "unknown command", r, exitUsage, `qbridge: unknown command "frobnicate" for "qbridge"`)
		golden(t, "error_unknown_command", r.stderr)
		wantExit(t, "unknown flag", e.run(t, "", "stats", "--frob"), exitUsage, "unknown flag: --frob", "Run 'qbridge stats --help' for usage.")
		wantExit(t, "bad duration", e.run(t, "", "consume", "q", "--timeout", "soon"), exitUsage, "invalid argument")
		wantExit(t, "args", e.run(t, "", "message", "q"), exitUsage, "accepts 2 arg(s)")
		wantExit(t, "output", e.run(t, "", "-o", "yaml", "queues"), exitUsage, `--output "yaml": use text or json`)
		wantExit(t, "env", e.runEnv(t, []string{"QBRIDGE_TIMEOUT=abc"}, "", "queues"), exitUsage, `QBRIDGE_TIMEOUT="abc"`)
	})

	t.Run("environment", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "envq", "x", "--id", "env-1")
		r := e.runEnv(t, []string{"QBRIDGE_OUTPUT=json"}, "", "queues")
		if m := jsonOne(t, r.stdout); m["queue"] != "envq" {
			t.Fatalf("%v", r)
		}
		// A flag wins over the environment.
		if r := e.runEnv(t, []string{"QBRIDGE_OUTPUT=json"}, "", "-o", "text", "queues"); r.stdout != "envq\n" {
			t.Fatalf("%v", r)
		}
	})

	t.Run("token", func(t *testing.T) {
		before := len(e.callsWithAuth())
		e.mustRun(t, "", "--token", "s3cret", "queues")
		e.runEnv(t, []string{"QBRIDGE_TOKEN=fromenv"}, "", "stats", "envq")
		got := e.callsWithAuth()[before:]
		if len(got) != 2 || got[0] != "Bearer s3cret" || got[1] != "Bearer fromenv" {
			t.Fatalf("authorization metadata: %q", got)
		}
	})
}

// callsWithAuth returns the authorization metadata of the calls that had one.
func (e *testEnv) callsWithAuth() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, c := range e.calls {
		if c.auth != "" {
			out = append(out, c.auth)
		}
	}
	return out
}

func TestTLS(t *testing.T) {
	t.Parallel()
	cert, caPEM := selfSigned(t)
	e := newEnv(t, withTLS(cert))
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	r := e.mustRun(t, "", "--ca-file", caFile, "enqueue", "secure", "x", "--id", "s-1")
	if r.stdout != "s-1\n" {
		t.Fatalf("%v", r)
	}
	if r := e.runEnv(t, []string{"QBRIDGE_CA_FILE=" + caFile, "QBRIDGE_TLS=true"}, "", "queues"); r.stdout != "secure\n" {
		t.Fatalf("%v", r)
	}
	wantExit(t, "unknown CA", e.run(t, "", "--tls", "queues"), exitUnavailable, "cannot connect to", "certificate")
	wantExit(t, "plaintext to TLS", e.run(t, "", "queues"), exitUnavailable, "cannot connect to")
	wantExit(t, "bad CA file", e.run(t, "", "--ca-file", filepath.Join(t.TempDir(), "none.pem"), "queues"), exitUsage, "--ca-file")
}

func TestMutualTLS(t *testing.T) {
	t.Parallel()
	serverCert, caPEM := selfSigned(t)
	clientCert, clientPEM, clientKeyPEM := selfSignedClient(t)
	pool := x509.NewCertPool()
	pool.AddCert(clientCert.Leaf)
	e := newEnv(t, withMutualTLS(serverCert, pool))
	dir := t.TempDir()
	files := map[string][]byte{"ca.pem": caPEM, "client.pem": clientPEM, "client.key": clientKeyPEM}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ca, cert, key := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key")
	if r := e.mustRun(t, "", "--ca-file", ca, "--cert-file", cert, "--key-file", key, "enqueue", "mtls", "x", "--id", "m-1"); r.stdout != "m-1\n" {
		t.Fatalf("%v", r)
	}
	if r := e.runEnv(t, []string{"QBRIDGE_CA_FILE=" + ca, "QBRIDGE_CERT_FILE=" + cert, "QBRIDGE_KEY_FILE=" + key}, "", "queues"); r.stdout != "mtls\n" {
		t.Fatalf("%v", r)
	}
	// The refusal reaches the client during or just after the handshake
	// (TLS 1.3), so the message varies; the exit code does not.
	wantExit(t, "no client certificate", e.run(t, "", "--ca-file", ca, "queues"), exitUnavailable)
	wantExit(t, "cert without key", e.run(t, "", "--ca-file", ca, "--cert-file", cert, "queues"), exitUsage, "--cert-file and --key-file go together")
	wantExit(t, "bad key file", e.run(t, "", "--ca-file", ca, "--cert-file", cert, "--key-file", ca, "queues"), exitUsage, "--cert-file/--key-file")
}

// selfSignedClient returns a self-signed client certificate (with its
// parsed leaf) and its PEM certificate and key.
func selfSignedClient(t *testing.T) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "qbridge test client"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return cert, certPEM, keyPEM
}

// selfSigned returns a certificate for 127.0.0.1 and its PEM, which serves
// as its own CA.
func selfSigned(t *testing.T) (tls.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "qbridge test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	cert, err := tls.X509KeyPair(certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	if err != nil {
		t.Fatal(err)
	}
	return cert, certPEM
}

func TestHelp(t *testing.T) {
	t.Parallel()
	e := &testEnv{addr: "127.0.0.1:1"} // help needs no server
	r := e.mustRun(t, "", "--help")
	golden(t, "help", r.stdout)
	for _, want := range []string{"Exit codes:", "130  interrupted", "QBRIDGE_ADDR", "QBRIDGE_TOKEN"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("qbridge --help lacks %q", want)
		}
	}
	// Every command has help with examples.
	for _, cmd := range [][]string{
		{"enqueue"}, {"consume"}, {"result"}, {"message"}, {"publish"}, {"subscribe"},
		{"stats"}, {"queues"}, {"peek"}, {"purge"}, {"pause"}, {"resume"},
		{"dead"}, {"dead", "list"}, {"dead", "replay"}, {"dead", "delete"},
		{"config"}, {"config", "get"}, {"config", "set"},
	} {
		r := e.mustRun(t, "", append(cmd, "--help")...)
		if !strings.Contains(r.stdout, "Examples:\n  qbridge ") && !strings.Contains(r.stdout, "Examples:\n  seq") {
			t.Errorf("qbridge %s --help has no examples:\n%s", strings.Join(cmd, " "), r.stdout)
		}
	}
	if r := e.mustRun(t, ""); !strings.Contains(r.stdout, "Usage:") {
		t.Errorf("qbridge without a command: %v", r)
	}
}

func TestCompletion(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, shell := range []string{"bash", "zsh"} {
		r := e.mustRun(t, "", "completion", shell)
		if !strings.Contains(r.stdout, "qbridge") || len(r.stdout) < 1000 {
			t.Errorf("completion %s: %.200s", shell, r.stdout)
		}
	}
	e.mustRun(t, "", "enqueue", "orders", "x")
	e.mustRun(t, "", "enqueue", "reports", "x")
	// What the shell scripts ask: queue names from the server.
	r := e.mustRun(t, "", "__complete", "stats", "")
	if !strings.HasPrefix(r.stdout, "orders\nreports\n:4\n") {
		t.Errorf("queue completion: %q", r.stdout)
	}
	r = e.mustRun(t, "", "__complete", "peek", "orders", "--state", "")
	if !strings.HasPrefix(r.stdout, "ready\ndelayed\nin-flight\ndead\n") {
		t.Errorf("state completion: %q", r.stdout)
	}
}
