package main

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

var httpAddrRE = regexp.MustCompile(`msg="HTTP listening" http=(\S+)`)

// httpGet returns the status and body of GET url.
func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// TestHTTPListener: the HTTP listener's address is logged; /healthz says
// the process is alive whatever Redis does, /readyz follows Redis (503 with
// the reason while it is down) and shutdown; /metrics shows the queue
// after a workload and the gRPC call counts; the dashboard and its API are
// served.
func TestHTTPListener(t *testing.T) {
	rs := redistest.Start(t)
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
		"--redis-url", rs.URL(0), "--plaintext"}, nil)
	var m []string
	eventually(t, 10*time.Second, "the HTTP address in the log", func() bool {
		m = httpAddrRE.FindStringSubmatch(d.logs.String())
		return m != nil
	})
	base := "http://" + m[1]
	for _, what := range []string{"/healthz", "/readyz", "/metrics", "dashboard=" + base + "/"} {
		if !strings.Contains(logLine(d.logs.String(), "HTTP listening"), what) {
			t.Errorf("the HTTP listening line does not name %s: %s", what, logLine(d.logs.String(), "HTTP listening"))
		}
	}

	if code, body := httpGet(t, base+"/healthz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := httpGet(t, base+"/readyz"); code != 200 || strings.TrimSpace(body) != "ready" {
		t.Errorf("/readyz: %d %q", code, body)
	}

	qc := qbridgev1.NewQueueServiceClient(dial(t, d.addr))
	for range 3 {
		if _, err := qc.Enqueue(rpcCtx(t), &qbridgev1.EnqueueRequest{Queue: "http-q", Payload: []byte("x")}); err != nil {
			t.Fatal(err)
		}
	}
	_, metrics := httpGet(t, base+"/metrics")
	for _, want := range []string{
		`qbridge_queue_ready{queue="http-q"} 3`,
		`qbridge_queue_messages_total{event="enqueued",queue="http-q"} 3`,
		`grpc_server_handled_total{grpc_code="OK",grpc_method="Enqueue",grpc_service="qbridge.v1.QueueService",grpc_type="unary"} 3`,
		`qbridge_redis_up 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	if code, body := httpGet(t, base+"/"); code != 200 || !strings.Contains(body, "<html") {
		t.Errorf("dashboard: %d %.200q", code, body)
	}
	if code, body := httpGet(t, base+"/api/queues"); code != 200 || !strings.Contains(body, `"queue":"http-q"`) || !strings.Contains(body, `"ready":3`) {
		t.Errorf("/api/queues: %d %s", code, body)
	}

	// Redis down: not ready (with the reason), but alive.
	rs.Stop(t)
	eventually(t, 10*time.Second, "/readyz to report Redis down", func() bool {
		code, body := httpGet(t, base+"/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "Redis unreachable")
	})
	if code, _ := httpGet(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz with Redis down: %d, want 200", code)
	}
	if _, metrics := httpGet(t, base+"/metrics"); !strings.Contains(metrics, "qbridge_redis_up 0") {
		t.Errorf("/metrics with Redis down lacks qbridge_redis_up 0")
	}
	rs.Restart(t)
	eventually(t, 10*time.Second, "/readyz to recover", func() bool {
		code, _ := httpGet(t, base+"/readyz")
		return code == 200
	})
}

// TestHTTPListenerOff: an empty --http-listen starts no HTTP listener.
func TestHTTPListenerOff(t *testing.T) {
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--http-listen", ""}, nil)
	if err := d.stop(t); err != nil { // the log is complete once run returned
		t.Fatal(err)
	}
	if strings.Contains(d.logs.String(), "HTTP listening") {
		t.Errorf("an HTTP listener was started:\n%s", d.logs)
	}
}
