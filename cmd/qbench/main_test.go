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

// needRedis skips t when there is no redis-server, unless
// QBRIDGE_REQUIRE_REDIS is set: then it fails.
func needRedis(t *testing.T) {
	t.Helper()
	if bench.FindRedisServer() == "" {
		if v := os.Getenv("QBRIDGE_REQUIRE_REDIS"); v == "1" || v == "true" {
			t.Fatal("redis-server not found and QBRIDGE_REQUIRE_REDIS is set")
		}
		t.Skip("SKIPPING: redis-server not found (set QBRIDGE_REQUIRE_REDIS=1 to fail instead)")
	}
}

// TestSmoke runs the harness's single-Redis scenarios in a tiny
// configuration against its own redis-server (TestShardsSmoke runs the
// shards scenario).
func TestSmoke(t *testing.T) {
	needRedis(t)
	out := filepath.Join(t.TempDir(), "r.json")
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"-scenarios", "enqueue,batch,drain,latency,pubsub,idle",
		"-duration", "100ms", "-warmup", "50ms", "-repeat", "1", "-idle-streams", "50",
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

// TestShardsSmoke runs the shards scenario in a tiny configuration (its own
// Redis Clusters of 1 and 3 masters): every message of every run consumed
// exactly once (the run fails otherwise), messages through every side, the
// sharded queue really sharded and spread over the masters. It checks no
// performance.
func TestShardsSmoke(t *testing.T) {
	needRedis(t)
	out := filepath.Join(t.TempDir(), "r.json")
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"-scenarios", "shards", "-shard-masters", "1,3", "-shards", "6",
		"-shard-producers", "4", "-shard-consumers", "4", "-shard-batch", "100", "-shard-payloads", "100", "-duration", "150ms", "-warmup", "0s", "-repeat", "1", "-payloads", "100", "-json", out}, &stdout, &stderr)
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
	if len(rep.Rows) != 4 {
		t.Fatalf("%d rows, want 4 (unsharded and sharded, on 1 and 3 masters)", len(rep.Rows))
	}
	for i, r := range rep.Rows {
		c := r.Cluster
		if c == nil {
			t.Fatalf("%s: no cluster figures", r.Scenario)
		}
		wantMasters, wantShards := []int{1, 1, 3, 3}[i], []int{1, 6, 1, 6}[i]
		if c.Masters != wantMasters || c.Shards != wantShards {
			t.Errorf("row %d %q: %d masters, %d shards; want %d, %d", i, r.Scenario, c.Masters, c.Shards, wantMasters, wantShards)
		}
		// Counts, not rates: a run this short may end (under -race, on
		// a busy machine) before its first Ack, and its rate be 0; what
		// it sent must still all have been consumed exactly once.
		if c.QbridgeMessages <= 0 || c.DirectMessages <= 0 || r.Qbridge.Count < 0 || r.Direct.Count < 0 ||
			r.Qbridge.Count > c.QbridgeMessages || r.Direct.Count > c.DirectMessages {
			t.Errorf("%s: counts: qbridge %d of %d messages in the measured time, direct %d of %d", r.Scenario,
				r.Qbridge.Count, c.QbridgeMessages, r.Direct.Count, c.DirectMessages)
		}
		if c.ServerShards != c.Shards {
			t.Errorf("%s: the server reports %d shards, %d were asked", r.Scenario, c.ServerShards, c.Shards)
		}
		if len(c.QbridgePlacement) != c.Masters || len(c.DirectPlacement) != c.Masters ||
			len(c.QbridgeCPU.MasterCores) != c.Masters || len(c.DirectCPU.MasterShare) != c.Masters {
			t.Errorf("%s: per-master figures do not cover the %d masters: %+v", r.Scenario, c.Masters, c)
			continue
		}
		for m := 0; m < c.Masters; m++ {
			if c.Shards > 1 && (c.QbridgePlacement[m] == 0 || c.DirectPlacement[m] == 0) {
				t.Errorf("%s: master %d holds no shard (qbridge %v, direct %v)", r.Scenario, m, c.QbridgePlacement, c.DirectPlacement)
			}
			if c.Shards > 1 && c.QbridgeCPU.MasterCores[m] <= 0 {
				t.Errorf("%s: master %d did no work: %v", r.Scenario, m, c.QbridgeCPU.MasterCores)
			}
		}
	}
}
