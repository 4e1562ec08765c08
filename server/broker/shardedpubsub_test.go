package broker

import (
	"fmt"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/redistest"
)

func TestGlobMatch(t *testing.T) {
	for _, tc := range []struct {
		pattern, s string
		want       bool
	}{
		{"prices", "prices", true},
		{"prices", "prices2", false},
		{"*", "", true},
		{"*", "anything", true},
		{"metrics.*", "metrics.", true},
		{"metrics.*", "metrics.cpu", true},
		{"metrics.*", "metrics", false},
		{"metrics.*", "xmetrics.cpu", false},
		{"*.cpu", "host1.cpu", true},
		{"*.cpu", "host1.cpu.idle", false},
		{"a*b*c", "aXXbYYc", true},
		{"a*b*c", "aXXbYY", false},
		{"a**b", "ab", true},
		{"h?llo", "hello", true},
		{"h?llo", "hllo", false},
		{"h[ae]llo", "hallo", true},
		{"h[ae]llo", "hillo", false},
		{"h[^e]llo", "hallo", true},
		{"h[^e]llo", "hello", false},
		{"h[a-c]llo", "hbllo", true},
		{"h[c-a]llo", "hbllo", true}, // a range high to low, as Redis takes it
		{"h[a-c]llo", "hdllo", false},
		{`h\*llo`, "h*llo", true},
		{`h\*llo`, "hello", false},
		{`h[\]]`, "h]", true},
		{"h[ab", "ha", true}, // an unterminated set ends with the pattern
		{"x/y:*", "x/y:z", true},
	} {
		if got := globMatch(tc.pattern, tc.s); got != tc.want {
			t.Errorf("globMatch(%q, %q) = %v, want %v", tc.pattern, tc.s, got, tc.want)
		}
	}
}

func TestIsSharded(t *testing.T) {
	if b := New(nil); b.IsSharded("anything") {
		t.Error("a broker without WithShardedChannels shards a channel")
	}
	if b := New(nil, WithShardedChannels()); b.IsSharded("anything") || b.sharded != nil {
		t.Error("WithShardedChannels() with no pattern shards a channel")
	}
	b := New(nil, WithShardedChannels("prices", "metrics.*", "h?st[12]", `lit\*`), WithKeyPrefix("app:"))
	for ch, want := range map[string]bool{
		"prices": true, "prices.eu": false, "metrics.cpu": true, "metrics": false,
		"host1": true, "host3": false, "lit*": true, "litX": false,
		"app:prices": false, // names are matched as clients give them, without the prefix
	} {
		if got := b.IsSharded(ch); got != want {
			t.Errorf("IsSharded(%q) = %v, want %v", ch, got, want)
		}
	}
	if all := New(nil, WithShardedChannels("**")); !all.IsSharded("x") || !all.IsSharded("") {
		t.Error(`WithShardedChannels("**") does not shard every channel`)
	}
}

// TestShardedSlot: on Redis Cluster a sharded channel's connection is
// per slot, the slot of a key of the same name; elsewhere there is one.
func TestShardedSlot(t *testing.T) {
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}}) // never connects
	t.Cleanup(func() { _ = cc.Close() })
	onCluster := New(cc)
	for name, want := range map[string]int{"foo": 12182, "{user1000}.following": 3443, "foo{}{bar}": 8363, "foo{{bar}}zap": 4015, "foo{bar}{zap}": 5061} {
		if got := onCluster.ShardedSlot(name); got != want {
			t.Errorf("ShardedSlot(%q) = %d, want %d (CLUSTER KEYSLOT)", name, got, want)
		}
	}
	single := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = single.Close() })
	if s := New(single).ShardedSlot("foo"); s != 0 {
		t.Errorf("ShardedSlot off Redis Cluster = %d, want 0", s)
	}
}

// TestShardedPublish: Publish sends SPUBLISH to sharded channels (matched
// without the key prefix) and PUBLISH to the others, coalesced or not, in
// one pipeline when merged: each call gets its own count, and a sharded
// message reaches SSUBSCRIBE subscribers only.
func TestShardedPublish(t *testing.T) {
	t.Parallel()
	for _, slots := range []int{0, 4} {
		t.Run(fmt.Sprintf("coalescing %d", slots), func(t *testing.T) {
			t.Parallel()
			b, rdb := newTestBroker(t, WithCoalescing(slots), WithKeyPrefix("pfx:"), WithShardedChannels("metrics.*"))
			ctx := testCtx(t)
			sharded := rdb.SSubscribe(ctx, "pfx:metrics.a")
			t.Cleanup(func() { _ = sharded.Close() })
			if m, err := sharded.Receive(ctx); err != nil {
				t.Fatal(err)
			} else if s, ok := m.(*redis.Subscription); !ok || s.Kind != "ssubscribe" {
				t.Fatalf("SSUBSCRIBE: %v", m)
			}
			// A classic subscriber of the same name, and of a classic channel.
			classic := subscribe(t, b, rdb, "metrics.a", "news")
			resetStats(t, rdb)

			const publishers, each = 8, 25
			var wg sync.WaitGroup
			errs := make(chan error, publishers*each)
			for p := range publishers {
				wg.Go(func() {
					for k := range each {
						ch, want := "metrics.a", int64(1)
						if p%2 == 1 {
							ch = "news"
						}
						n, err := b.Publish(ctx, ch, fmt.Appendf(nil, "p%d:%d", p, k))
						if err != nil {
							errs <- err
						} else if n != want {
							errs <- fmt.Errorf("publish to %s reached %d, want %d", ch, n, want)
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if s, c := cmdCalls(t, rdb, "spublish"), cmdCalls(t, rdb, "publish"); s != publishers/2*each || c != publishers/2*each {
				t.Fatalf("Redis ran %d SPUBLISH and %d PUBLISH; want %d of each", s, c, publishers/2*each)
			}
			if err := rdb.SPublish(ctx, "pfx:metrics.a", "END").Err(); err != nil {
				t.Fatal(err)
			}
			next := map[int]int{}
			n := 0
			for {
				m, err := sharded.ReceiveMessage(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if m.Payload == "END" {
					break
				}
				var p, k int
				if _, err := fmt.Sscanf(m.Payload, "p%d:%d", &p, &k); err != nil || p%2 != 0 || k != next[p] {
					t.Fatalf("sharded subscriber got %q (%v); want publisher %d's message %d", m.Payload, err, p, next[p])
				}
				next[p]++
				n++
			}
			if n != publishers/2*each {
				t.Fatalf("sharded subscriber got %d messages, want %d", n, publishers/2*each)
			}
			// The classic subscriber of the same name got none of them.
			if err := rdb.Publish(ctx, "pfx:news", "END").Err(); err != nil {
				t.Fatal(err)
			}
			for _, m := range receiveUntil(t, classic, "END") {
				if m.channel != "pfx:news" {
					t.Fatalf("classic subscriber got %v", m)
				}
			}
		})
	}
}

// TestShardedPublishCluster: on Redis Cluster each SPUBLISH of a coalesced
// pipeline goes to its slot's master (the client splits the pipeline) and
// counts the subscribers there; ShardedSlot is Redis's slot.
func TestShardedPublishCluster(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	admin := c.Client(t)
	o := c.ServiceOptions()
	o.DisableIdentity = true
	svc := redis.NewClusterClient(o)
	t.Cleanup(func() { _ = svc.Close() })
	b := New(svc, WithShardedChannels("metrics.*"))
	ctx := testCtx(t)

	byNode := map[int]string{}
	for i := 0; len(byNode) < redistest.ClusterSize && i < 1000; i++ {
		ch := fmt.Sprintf("metrics.n%d", i)
		if n := c.NodeOf(t, ch); byNode[n] == "" {
			byNode[n] = ch
		}
	}
	subs := map[string]*redis.PubSub{}
	for _, ch := range byNode {
		if slot, err := admin.ClusterKeySlot(ctx, ch).Result(); err != nil || int(slot) != b.ShardedSlot(ch) {
			t.Fatalf("CLUSTER KEYSLOT %q = %d, %v; ShardedSlot says %d", ch, slot, err, b.ShardedSlot(ch))
		}
		ps := admin.SSubscribe(ctx, ch)
		t.Cleanup(func() { _ = ps.Close() })
		if m, err := ps.Receive(ctx); err != nil {
			t.Fatal(err)
		} else if s, ok := m.(*redis.Subscription); !ok || s.Kind != "ssubscribe" {
			t.Fatalf("SSUBSCRIBE %s: %v", ch, m)
		}
		subs[ch] = ps
	}
	if len(subs) != redistest.ClusterSize {
		t.Fatalf("channels on %d nodes only", len(subs))
	}
	const publishers, each = 6, 20
	var wg sync.WaitGroup
	errs := make(chan error, publishers*each*len(subs))
	for p := range publishers {
		wg.Go(func() {
			for k := range each {
				for ch := range subs {
					n, err := b.Publish(ctx, ch, fmt.Appendf(nil, "p%d:%d", p, k))
					if err != nil || n != 1 {
						errs <- fmt.Errorf("publish to %s: %d receivers, %v; want 1", ch, n, err)
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for ch, ps := range subs {
		next := map[int]int{}
		for i := 0; i < publishers*each; i++ {
			m, err := ps.ReceiveMessage(ctx)
			if err != nil {
				t.Fatalf("%s: %v", ch, err)
			}
			var p, k int
			if _, err := fmt.Sscanf(m.Payload, "p%d:%d", &p, &k); err != nil || k != next[p] || m.Channel != ch {
				t.Fatalf("%s got %q on %s; want publisher %d's message %d", ch, m.Payload, m.Channel, p, next[p])
			}
			next[p]++
		}
	}
}
