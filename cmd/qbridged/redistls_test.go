package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// redisTLSArgs are qbridged's flags for rs (started WithTLS) as the
// service user: rediss:// without credentials in the URL, the user and a
// password file as flags, and the TLS material; without lists flags to
// leave out.
func redisTLSArgs(t *testing.T, rs *redistest.Server, without ...string) []string {
	t.Helper()
	pw := filepath.Join(t.TempDir(), "redis-password")
	if err := os.WriteFile(pw, []byte(redistest.ServicePassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ca, cert, key := rs.TLSFiles()
	args := []string{"--listen", "127.0.0.1:0", "--plaintext", "--log-level", "debug",
		"--redis-url", "rediss://" + rs.Addr() + "/0",
		"--redis-username", redistest.ServiceUser, "--redis-password-file", pw}
	for _, f := range [][2]string{{"--redis-ca", ca}, {"--redis-cert", cert}, {"--redis-key", key}} {
		if !strings.Contains(strings.Join(without, " "), f[0]) {
			args = append(args, f[0], f[1])
		}
	}
	return args
}

// TestRedisOverTLS: qbridged works with a Redis that speaks only TLS and
// wants a client certificate, as the least-privilege ACL user, and never
// logs the password.
func TestRedisOverTLS(t *testing.T) {
	rs := redistest.Start(t, redistest.WithTLS())
	d := startDaemon(t, redisTLSArgs(t, rs), nil)
	cc := dial(t, d.addr)
	waitHealth(t, cc, healthpb.HealthCheckResponse_SERVING, 10*time.Second)

	q := qbridgev1.NewQueueServiceClient(cc)
	ctx := rpcCtx(t)
	if _, err := q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "tlsq", Payload: []byte("over tls")}); err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := q.Consume(cctx, &qbridgev1.ConsumeRequest{Queue: "tlsq"})
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	ds := recvDeliveries(t, stream, 1)
	if string(ds[0].GetPayload()) != "over tls" {
		t.Fatalf("got %q, want %q", ds[0].GetPayload(), "over tls")
	}
	if r, err := q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{ds[0].GetAckToken()}}); err != nil || r.GetAcked() != 1 {
		t.Fatalf("Ack: %v, %v; want 1 acked", r, err)
	}
	cancel()

	// What Redis saw: qbridged's connections are the service user's, the
	// message is settled, and the ACL refused nothing.
	admin := rs.Client(t, 0)
	clients, err := admin.ClientList(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(clients, "user="+redistest.ServiceUser) {
		t.Errorf("no connection of user %s in CLIENT LIST:\n%s", redistest.ServiceUser, clients)
	}
	if n, err := admin.HGet(ctx, "{tlsq}:qb:counters", "acked").Result(); err != nil || n != "1" {
		t.Errorf("acked counter = %q, %v; want 1", n, err)
	}
	if refused, err := admin.ACLLog(ctx, 100).Result(); err != nil || len(refused) != 0 {
		t.Errorf("ACL LOG = %+v, %v; want nothing refused", refused, err)
	}

	if err := d.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	logs := d.logs.String()
	if !strings.Contains(logs, "using Redis") {
		t.Fatalf("no 'using Redis' line; logs:\n%s", logs)
	}
	if strings.Contains(logs, redistest.ServicePassword) {
		t.Errorf("the logs contain the Redis password:\n%s", logs)
	}
}

// TestRedisOverTLSMissingMaterial: without the client certificate (or the
// CA) qbridged starts but is NOT_SERVING, and the log says why.
func TestRedisOverTLSMissingMaterial(t *testing.T) {
	rs := redistest.Start(t, redistest.WithTLS())
	for _, tc := range []struct {
		name    string
		without []string
		wants   []string // in the log, any of
	}{
		{"no client certificate", []string{"--redis-cert", "--redis-key"}, []string{"tls: certificate required", "tls: handshake failure"}},
		{"no CA", []string{"--redis-ca"}, []string{"x509: certificate signed by unknown authority"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, redisTLSArgs(t, rs, tc.without...), nil)
			cc := dial(t, d.addr)
			waitHealth(t, cc, healthpb.HealthCheckResponse_NOT_SERVING, 10*time.Second)
			var why string
			eventually(t, 10*time.Second, "the Redis error in the log", func() bool {
				why = logLine(d.logs.String(), "Redis unreachable")
				return why != ""
			})
			found := false
			for _, w := range tc.wants {
				found = found || strings.Contains(why, w)
			}
			if !found {
				t.Errorf("the unreachable line does not give the TLS error (any of %q):\n%s", tc.wants, why)
			}
			if err := d.stop(t); err != nil {
				t.Fatalf("run: %v", err)
			}
			if logs := d.logs.String(); strings.Contains(logs, redistest.ServicePassword) {
				t.Errorf("the logs contain the Redis password:\n%s", logs)
			}
		})
	}
}
