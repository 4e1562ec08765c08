// Package crosslang runs the generated-code clients of other languages
// against a live qbridged on real Redis, next to Go clients.
package crosslang

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/auth"
)

// RequireEnv makes a missing client toolchain fail the tests instead of
// skipping them (CI sets it).
const RequireEnv = "QBRIDGE_REQUIRE_CLIENTS"

func repoRoot() string {
	_, f, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(f), "..", "..")
}

func needPython(t *testing.T) {
	t.Helper()
	if err := exec.Command("/usr/bin/python3", "-c", "import grpc, google.protobuf").Run(); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("python3 with grpcio and protobuf is missing and %s=1: run 'make client-tools'", RequireEnv)
		}
		t.Skip("SKIPPING: python3-grpcio / python3-protobuf missing (run 'make client-tools'; CI sets " + RequireEnv + "=1 to fail instead)")
	}
}

// service starts a private redis-server and a qbridged on loopback.
func service(t *testing.T, creds credentials.TransportCredentials, extra ...string) (addr string, qc qbridgev1.QueueServiceClient) {
	t.Helper()
	rs := redistest.Start(t)
	bin := filepath.Join(t.TempDir(), "qbridged")
	build := exec.Command("go", "build", "-o", bin, "github.com/qbridge/qbridge/cmd/qbridged")
	build.Dir = repoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build qbridged: %v\n%s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = l.Addr().String()
	l.Close()
	args := []string{"--listen", addr, "--http-listen", "127.0.0.1:0", "--redis-url", rs.URL(0), "--log-level", "warn"}
	if !slices.Contains(extra, "--tls-cert") {
		// A real Redis without TLS needs the explicit opt-in.
		args = append(args, "--plaintext")
	}
	cmd := exec.Command(bin, append(args, extra...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	hc := healthpb.NewHealthClient(cc)
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qbridged on %s not serving: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
	return addr, qbridgev1.NewQueueServiceClient(cc)
}

// python runs the Python driver script in mode and returns its stdout
// lines as they come, and a function that waits for it to exit.
func python(t *testing.T, ctx context.Context, mode, addr string, args ...string) (<-chan string, func() error) {
	t.Helper()
	script := filepath.Join(repoRoot(), "clients", "python", "tests", "xlang.py")
	return start(t, ctx, "/usr/bin/python3", append([]string{script, mode, addr}, args...)...)
}

// node runs the Node driver script likewise.
func node(t *testing.T, ctx context.Context, mode, addr string, args ...string) (<-chan string, func() error) {
	t.Helper()
	script := filepath.Join(repoRoot(), "clients", "node", "tests", "xlang.mjs")
	return start(t, ctx, "node", append([]string{script, mode, addr}, args...)...)
}

func start(t *testing.T, ctx context.Context, bin string, argv ...string) (<-chan string, func() error) {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, argv...)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	return lines, func() error {
		<-done
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("%s %v: %v\n%s", filepath.Base(bin), argv, err, stderr.String())
		}
		return nil
	}
}

func needNode(t *testing.T) {
	t.Helper()
	_, errNode := exec.LookPath("node")
	_, errMods := os.Stat(filepath.Join(repoRoot(), "node_modules", "@connectrpc", "connect-node"))
	if errNode != nil || errMods != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("node or the npm packages are missing and %s=1: run 'make client-tools'", RequireEnv)
		}
		t.Skip("SKIPPING: node or node_modules missing (run 'make client-tools'; CI sets " + RequireEnv + "=1 to fail instead)")
	}
}

func next(t *testing.T, lines <-chan string) string {
	t.Helper()
	select {
	case l, ok := <-lines:
		if !ok {
			t.Fatal("python exited early")
		}
		return l
	case <-time.After(20 * time.Second):
		t.Fatal("no output from python within 20s")
	}
	return ""
}

func recvOne(t *testing.T, st qbridgev1.QueueService_ConsumeClient) *qbridgev1.Delivery {
	t.Helper()
	r, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(r.GetDeliveries()) != 1 {
		t.Fatalf("%d deliveries in one response with max_in_flight 1", len(r.GetDeliveries()))
	}
	return r.GetDeliveries()[0]
}

func TestPython(t *testing.T) {
	needPython(t)
	addr, qc := service(t, insecure.NewCredentials())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	t.Run("python produces, Go consumes", func(t *testing.T) {
		lines, wait := python(t, ctx, "produce", addr, "py-to-go", "5")
		var ids []string
		for l := range lines {
			ids = append(ids, strings.TrimPrefix(l, "id "))
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
		if len(ids) != 5 {
			t.Fatalf("python enqueued %d; want 5", len(ids))
		}
		st, err := qc.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "py-to-go", MaxInFlight: 1})
		if err != nil {
			t.Fatal(err)
		}
		for i, id := range ids {
			d := recvOne(t, st)
			if d.GetId() != id || string(d.GetPayload()) != fmt.Sprintf("py-%d", i) || d.GetHeaders()["lang"] != "python" {
				t.Fatalf("delivery %d: %v; want id %s, payload py-%d, header lang=python", i, d, id, i)
			}
			if _, err := qc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("a python consumer that leaves without acking: redelivered", func(t *testing.T) {
		r, err := qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "py-leave", Payload: []byte("once")})
		if err != nil {
			t.Fatal(err)
		}
		lines, wait := python(t, ctx, "take-and-leave", addr, "py-leave")
		got := next(t, lines)
		if want := "took " + r.GetId() + " 1 once"; got != want {
			t.Fatalf("python: %q; want %q", got, want)
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
		st, err := qc.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "py-leave", MaxInFlight: 1})
		if err != nil {
			t.Fatal(err)
		}
		d := recvOne(t, st)
		if d.GetId() != r.GetId() || d.GetAttempt() != 2 {
			t.Fatalf("after python left: %v; want id %s attempt 2", d, r.GetId())
		}
	})

	t.Run("error codes in python", func(t *testing.T) {
		lines, wait := python(t, ctx, "bad-queue", addr)
		if got := next(t, lines); got != "error InvalidArgument INVALID_ARGUMENT" {
			t.Fatalf("python saw %q; want the InvalidArgument exception", got)
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("Go publishes, python subscribes", func(t *testing.T) {
		lines, wait := python(t, ctx, "subscribe", addr, "go-to-py", "3")
		if got := next(t, lines); got != "subscribed" {
			t.Fatalf("python: %q; want subscribed", got)
		}
		for i := 0; i < 3; i++ {
			r, err := qc.Publish(ctx, &qbridgev1.PublishRequest{Channel: "go-to-py", Payload: []byte(fmt.Sprintf("m%d", i))})
			if err != nil || r.GetReceivers() != 1 {
				t.Fatalf("publish: %v, %v receivers; want 1", err, r.GetReceivers())
			}
		}
		for i := 0; i < 3; i++ {
			if got, want := next(t, lines), fmt.Sprintf("msg go-to-py m%d", i); got != want {
				t.Fatalf("python: %q; want %q", got, want)
			}
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("the prodcons example", func(t *testing.T) {
		script := filepath.Join(repoRoot(), "clients", "python", "examples", "prodcons.py")
		out, err := exec.CommandContext(ctx, "/usr/bin/python3", script, "produce", "--addr", addr, "--count", "3").CombinedOutput()
		if err != nil {
			t.Fatalf("produce: %v\n%s", err, out)
		}
		out, err = exec.CommandContext(ctx, "/usr/bin/python3", script, "work", "--addr", addr, "--count", "3").CombinedOutput()
		if err != nil {
			t.Fatalf("work: %v\n%s", err, out)
		}
		for i := 0; i < 3; i++ {
			if !strings.Contains(string(out), fmt.Sprintf("job %d attempt 1", i)) {
				t.Fatalf("worker output lacks job %d:\n%s", i, out)
			}
		}
	})
}

func TestNode(t *testing.T) {
	needNode(t)
	addr, qc := service(t, insecure.NewCredentials())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	t.Run("Go produces, node consumes with ack", func(t *testing.T) {
		var ids []string
		for i := 0; i < 5; i++ {
			r, err := qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "go-to-node", Payload: []byte(fmt.Sprintf("go-%d", i))})
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, r.GetId())
		}
		lines, wait := node(t, ctx, "consume-ack", addr, "go-to-node", "5")
		for i, id := range ids {
			if got, want := next(t, lines), fmt.Sprintf("acked %s 1 go-%d", id, i); got != want {
				t.Fatalf("node: %q; want %q", got, want)
			}
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
		st, err := qc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "go-to-node"})
		if err != nil {
			t.Fatal(err)
		}
		if st.GetReady() != 0 || st.GetInFlight() != 0 || st.GetCounters().GetAcked() != 5 {
			t.Fatalf("after node acked: ready %d in flight %d acked %d; want 0, 0, 5", st.GetReady(), st.GetInFlight(), st.GetCounters().GetAcked())
		}
	})

	t.Run("node publishes, python subscribes", func(t *testing.T) {
		needPython(t)
		sub, waitSub := python(t, ctx, "subscribe", addr, "node-to-py", "3")
		if got := next(t, sub); got != "subscribed" {
			t.Fatalf("python: %q; want subscribed", got)
		}
		pub, waitPub := node(t, ctx, "publish", addr, "node-to-py", "3")
		for i := 0; i < 3; i++ {
			if got := next(t, pub); got != "receivers 1" {
				t.Fatalf("node publish %d: %q; want receivers 1", i, got)
			}
		}
		if err := waitPub(); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 3; i++ {
			if got, want := next(t, sub), fmt.Sprintf("msg node-to-py node-%d", i); got != want {
				t.Fatalf("python: %q; want %q", got, want)
			}
		}
		if err := waitSub(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("error codes in node", func(t *testing.T) {
		lines, wait := node(t, ctx, "bad-queue", addr)
		if got := next(t, lines); got != "error true InvalidArgument" {
			t.Fatalf("node saw %q; want a QbridgeError with code InvalidArgument", got)
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("the pubsub example", func(t *testing.T) {
		script := filepath.Join(repoRoot(), "clients", "node", "examples", "pubsub.mjs")
		t.Setenv("QBRIDGE_ADDR", addr) // the example's address; start passes the environment on
		sub, waitSub := start(t, ctx, "node", script, "subscribe", "news", "1")
		if got := next(t, sub); got != "subscribed" {
			t.Fatalf("subscriber: %q; want subscribed", got)
		}
		pub, waitPub := start(t, ctx, "node", script, "publish", "news", "hello")
		if got := next(t, pub); got != "receivers 1" {
			t.Fatalf("publisher: %q; want receivers 1", got)
		}
		if got := next(t, sub); got != "news hello" {
			t.Fatalf("subscriber: %q; want news hello", got)
		}
		for _, w := range []func() error{waitPub, waitSub} {
			if err := w(); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// The Python and Node clients speak TLS (verifying the server with a CA
// file) and send a token when given one; plaintext to a TLS listener fails
// with UNAVAILABLE in both.
func TestTLSClients(t *testing.T) {
	needPython(t)
	needNode(t)
	dir := t.TempDir()
	caPEM, certPEM, keyPEM := testCerts(t)
	files := map[string][]byte{"ca.pem": caPEM, "server.pem": certPEM, "server.key": keyPEM}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// One principal, known by its token, may produce to tls-q only.
	conf := "[[principal]]\nname = \"xlang\"\ntokens = [\"" + auth.HashToken("s3cret") + "\"]\n" +
		"  [[principal.grant]]\n  queues = [\"tls-q\"]\n  allow = [\"produce\"]\n"
	if err := os.WriteFile(filepath.Join(dir, "qbridged.toml"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	addr, _ := service(t, credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}),
		"--tls-cert", filepath.Join(dir, "server.pem"), "--tls-key", filepath.Join(dir, "server.key"),
		"--config", filepath.Join(dir, "qbridged.toml"))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name      string
		run       func(t *testing.T, ctx context.Context, mode, addr string, args ...string) (<-chan string, func() error)
		ca, token string
		queue     string
		want      string
	}{
		{"python over TLS with a token", python, filepath.Join(dir, "ca.pem"), "s3cret", "tls-q", "id "},
		{"python plaintext", python, "", "", "tls-q", "error Unavailable"},
		{"python without a token", python, filepath.Join(dir, "ca.pem"), "", "tls-q", "error Unauthenticated"},
		{"python with a wrong token", python, filepath.Join(dir, "ca.pem"), "wrong", "tls-q", "error Unauthenticated"},
		{"python on a queue not granted", python, filepath.Join(dir, "ca.pem"), "s3cret", "tls-other", "error PermissionDenied"},
		{"node over TLS with a token", node, filepath.Join(dir, "ca.pem"), "s3cret", "tls-q", "id "},
		{"node plaintext", node, "", "", "tls-q", "error Unavailable"},
		{"node without a token", node, filepath.Join(dir, "ca.pem"), "", "tls-q", "error Unauthenticated"},
		{"node with a wrong token", node, filepath.Join(dir, "ca.pem"), "wrong", "tls-q", "error Unauthenticated"},
		{"node on a queue not granted", node, filepath.Join(dir, "ca.pem"), "s3cret", "tls-other", "error PermissionDenied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("XLANG_CA", tc.ca)
			t.Setenv("XLANG_TOKEN", tc.token)
			lines, wait := tc.run(t, ctx, "enqueue-one", addr, tc.queue)
			if got := next(t, lines); !strings.HasPrefix(got, tc.want) {
				t.Fatalf("got %q; want %q...", got, tc.want)
			}
			if err := wait(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// testCerts returns a CA and a server certificate for 127.0.0.1 it signed.
func testCerts(t *testing.T) (caPEM, certPEM, keyPEM []byte) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "crosslang CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "qbridged"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
}

// The Python and Node snippets of the README's "Using qbridge from Python,
// Node and any language" run as written (only the address is the live
// service's) and do what they say.
func TestREADMESnippets(t *testing.T) {
	needPython(t)
	needNode(t)
	readme, err := os.ReadFile(filepath.Join(repoRoot(), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(readme)
	start := strings.Index(text, "## Using qbridge from Python, Node")
	end := strings.Index(text[max(start, 0):], "\n## ")
	if start < 0 || end < 0 {
		t.Fatal("README has no section \"Using qbridge from Python, Node and any language\"")
	}
	section := text[start : start+end]
	snippet := func(lang string) string {
		i := strings.Index(section, "```"+lang+"\n")
		if i < 0 {
			t.Fatalf("no %s snippet in the section", lang)
		}
		body := section[i+len("```"+lang+"\n"):]
		return body[:strings.Index(body, "```")]
	}
	addr, _ := service(t, insecure.NewCredentials())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, tc := range []struct {
		lang string
		argv []string
		want []string
	}{
		{"python", []string{"/usr/bin/python3", "-c"}, []string{"1 b'resize 42'", "news b'hello'"}},
		{"js", []string{"node", "--input-type=module", "-e"}, []string{"1 resize 42", "news hi"}},
	} {
		t.Run(tc.lang, func(t *testing.T) {
			code := strings.ReplaceAll(snippet(tc.lang), "127.0.0.1:7070", addr)
			cmd := exec.CommandContext(ctx, tc.argv[0], append(tc.argv[1:], code)...)
			cmd.Dir = repoRoot() // the snippets use paths from the repository's root
			cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(string(out), w) {
					t.Fatalf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}
