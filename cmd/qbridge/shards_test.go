package main

import (
	"strings"
	"testing"
)

// TestShardedQueue drives a sharded queue from the command line: config set
// --shards, enqueue --ordering-key, stats per shard, consume across shards.
func TestShardedQueue(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	cfg := jsonOne(t, e.mustRun(t, "", "-o", "json", "config", "set", "hot", "--shards", "3").stdout)
	if cfg["shards"] != 3.0 {
		t.Fatalf("config set --shards 3: %v", cfg)
	}
	if r := e.run(t, "", "config", "set", "hot", "--shards", "2"); r.code == 0 || !strings.Contains(r.stderr, "never removed") {
		t.Fatalf("shrinking: want a failure that says shards are never removed; got %v", r)
	}
	// Another setting keeps the shards.
	if cfg := jsonOne(t, e.mustRun(t, "", "-o", "json", "config", "set", "hot", "--max-attempts", "4").stdout); cfg["shards"] != 3.0 {
		t.Fatalf("config set without --shards: %v", cfg)
	}
	e.mustRun(t, "a\nb\nc\n", "enqueue", "hot")
	for _, p := range []string{"k1", "k2", "k3"} {
		e.mustRun(t, "", "enqueue", "hot", p, "--ordering-key", "same")
	}
	st := jsonOne(t, e.mustRun(t, "", "-o", "json", "stats", "hot").stdout)
	shards, _ := st["shards"].([]any)
	if st["ready"] != 6.0 || len(shards) != 3 {
		t.Fatalf("stats: %v", st)
	}
	if text := e.mustRun(t, "", "stats", "hot").stdout; !strings.Contains(text, "shard 2") || !strings.Contains(text, "list hot#") {
		t.Fatalf("stats text lacks the shards:\n%s", text)
	}
	var keyed []string
	for _, d := range jsonLines(t, e.mustRun(t, "", "-o", "json", "consume", "hot", "--count", "6").stdout) {
		if d["queue"] != "hot" {
			t.Fatalf("delivery from %v; want queue hot", d["queue"])
		}
		if p, _ := d["payload"].(string); strings.HasPrefix(p, "k") {
			keyed = append(keyed, p)
		}
	}
	if strings.Join(keyed, ",") != "k1,k2,k3" {
		t.Fatalf("messages of one ordering key came as %v; want k1,k2,k3", keyed)
	}
}
