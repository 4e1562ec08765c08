package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/qbridge/qbridge/bench"
)

// TestSmoke runs the whole harness in a tiny configuration against its own
// redis-server.
func TestSmoke(t *testing.T) {
	if bench.FindRedisServer() == "" {
		if v := os.Getenv("QBRIDGE_REQUIRE_REDIS"); v == "1" || v == "true" {
			t.Fatal("redis-server not found and QBRIDGE_REQUIRE_REDIS is set")
		}
		t.Skip("SKIPPING: redis-server not found (set QBRIDGE_REQUIRE_REDIS=1 to fail instead)")
	}
	out := filepath.Join(t.TempDir(), "r.json")
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"-duration", "100ms", "-warmup", "50ms", "-repeat", "1", "-idle-streams", "50",
		"-wake-tries", "2", "-payloads", "100", "-rate", "500", "-drain-min", "300", "-json", out}, &stdout, &stderr)
	t.Logf("table:\n%s", stdout.String())
	if err != nil {
		t.Fatalf("run: %v\n%s", err, stderr.String())
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var rep bench.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("JSON: %v", err)
	}
	if len(rep.Rows) != 13 {
		t.Errorf("%d rows, want 13", len(rep.Rows))
	}
	for _, r := range rep.Rows {
		if r.Qbridge.Median <= 0 || r.Direct.Median <= 0 || r.Ratio <= 0 || r.Qbridge.Count <= 0 || r.Direct.Count <= 0 {
			t.Errorf("%s: no numbers: %+v %+v", r.Scenario, r.Qbridge, r.Direct)
		}
	}
	i := rep.Idle
	if i == nil || i.ConsumeStreams != 50 || i.RedisConnsIdle <= 0 || i.RSSIdleKiB <= 0 || i.ConsumeWake.P50us <= 0 || i.SubscribeWake.P50us <= 0 || i.DirectBLPOPWake.P50us <= 0 {
		t.Errorf("idle result incomplete: %+v", i)
	}
}
