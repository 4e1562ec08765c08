package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// TestTopologyURLs runs qbridged against a real Redis Cluster and a real
// Sentinel setup from their URLs: enqueue, consume and ack on queues
// whose keys are spread over the nodes.
func TestTopologyURLs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		start func(t *testing.T) string
	}{
		{"cluster", func(t *testing.T) string { return redistest.StartCluster(t).URL() }},
		{"sentinel", func(t *testing.T) string { return redistest.StartSentinel(t).URL() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			url := tc.start(t)
			d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--redis-url", url, "--plaintext", "--key-prefix", "e2e:"}, nil)
			if !strings.Contains(d.logs.String(), "topology="+tc.name) {
				t.Errorf("logs do not name the topology %s:\n%s", tc.name, d.logs)
			}
			if strings.Contains(d.logs.String(), redistest.ServicePassword) {
				t.Errorf("logs show the password:\n%s", d.logs)
			}
			cc := dial(t, d.addr)
			waitHealth(t, cc, healthpb.HealthCheckResponse_SERVING, 10*time.Second)
			q := qbridgev1.NewQueueServiceClient(cc)
			ctx := rpcCtx(t)
			for i := 0; i < 8; i++ {
				queue := fmt.Sprintf("e2e-%d", i)
				r, err := q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: []byte("x")})
				if err != nil {
					t.Fatalf("enqueue to %s: %v", queue, err)
				}
				sctx, cancel := context.WithCancel(ctx)
				st, err := q.Consume(sctx, &qbridgev1.ConsumeRequest{Queue: queue, LeaseDuration: durationpb.New(10 * time.Second)})
				if err != nil {
					t.Fatal(err)
				}
				ds := recvDeliveries(t, st, 1)
				if ds[0].GetId() != r.GetId() {
					t.Fatalf("%s: got %s, want %s", queue, ds[0].GetId(), r.GetId())
				}
				if _, err := q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{ds[0].GetAckToken()}}); err != nil {
					t.Fatalf("ack in %s: %v", queue, err)
				}
				cancel()
			}
		})
	}
}

func TestTopologyConfigErrors(t *testing.T) {
	const cluster = "redis-cluster://u:s3cret@127.0.0.1:7000,127.0.0.1:7001"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--redis-url", cluster, "--redis-db", "2"}, "only database 0"},
		{[]string{"--redis-url", cluster, "--key-prefix", "{app}:"}, "brace"},
		{[]string{"--redis-url", "redis-sentinel://u:s3cret@127.0.0.1:1/0"}, "master=NAME"},
		{[]string{"--redis-url", "redis-sentinel://u:s3cret@127.0.0.1:1/0?master=m&sentinel_password=s3cret&bad=1"}, "unexpected option"},
	} {
		_, err := parseConfig(append([]string{"--plaintext"}, tc.args...), func(string) string { return "" }, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%q: %v; want an error saying %q without the password", tc.args, err, tc.want)
		}
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--print-redis-acl", "--plaintext", "--redis-url", cluster}, func(string) string { return "" }, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "+cluster|slots +command") || !strings.Contains(out.String(), "every node") {
		t.Errorf("--print-redis-acl for a cluster:\n%s", out.String())
	}
}
