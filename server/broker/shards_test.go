package broker

// Sharded queues at the broker level: the slot function against Redis's
// own CLUSTER KEYSLOT, the naming of shards (Logical, ShardIndex), the
// shard table under concurrent growth, and the placement of shards on the
// masters of a real Redis Cluster.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/redistest"
)

// shardClusterBroker starts a Redis Cluster and returns it with a broker
// over it as the service user.
func shardClusterBroker(t *testing.T) (*redistest.Cluster, *Broker) {
	t.Helper()
	c := redistest.StartCluster(t)
	o := c.ServiceOptions()
	o.DisableIdentity = true
	o.DialTimeout = time.Second
	svc := redis.NewClusterClient(o)
	t.Cleanup(func() { _ = svc.Close() })
	b := New(svc)
	if err := b.LoadScripts(testCtx(t)); err != nil {
		t.Fatalf("LoadScripts: %v", err)
	}
	return c, b
}

func TestShardLogicalAndShardIndex(t *testing.T) {
	for _, tc := range []struct {
		name    string
		logical string
		index   int
		ok      bool
	}{
		{"q", "q", 0, true},
		{"task:prodcons:queue", "task:prodcons:queue", 0, true},
		{"q#1", "q", 1, true},
		{"q#9", "q", 9, true},
		{"q#10", "q", 10, true},
		{"q#255", "q", 255, true},
		{"q#1.0", "q", 1, true},
		{"q#7.12345", "q", 7, true},
		{"a:b/c@d#3.65535", "a:b/c@d", 3, true},
		{"q.x#2", "q.x", 2, true},
		// Malformed: not a shard any queue can have.
		{"q#0", "q", 0, false},   // shard 0 is the queue's own name
		{"q#256", "q", 0, false}, // above MaxShards - 1
		{"q#1000", "q", 0, false},
		{"q#01", "q", 0, false},
		{"q#00", "q", 0, false},
		{"q#-1", "q", 0, false},
		{"q#+1", "q", 0, false},
		{"q# 1", "q", 0, false},
		{"q#", "q", 0, false},
		{"q#junk", "q", 0, false},
		{"q#1#2", "q", 0, false},
		{"#1", "", 1, true}, // Logical is empty: callers validate the name
		{"q#.1", "q", 0, false},
		{"q#99999999999999999999", "q", 0, false},
		// Suffixes GrowShards never makes: "<i>" or "<i>.<decimal salt>"
		// only. A brace in a shard name would put its ready list and its
		// other keys in different slots (CROSSSLOT on Redis Cluster).
		{"q#1.", "q", 0, false},
		{"q#1.x", "q", 0, false},
		{"q#1.2.3", "q", 0, false},
		{"q#1.}", "q", 0, false},
		{"q#1.{x}", "q", 0, false},
		{"q#1.0}", "q", 0, false},
		{"q#1.0 ", "q", 0, false},
	} {
		if got := Logical(tc.name); got != tc.logical {
			t.Errorf("Logical(%q) = %q; want %q", tc.name, got, tc.logical)
		}
		idx, ok := ShardIndex(tc.name)
		if ok != tc.ok || ok && idx != tc.index {
			t.Errorf("ShardIndex(%q) = %d, %v; want %d, %v", tc.name, idx, ok, tc.index, tc.ok)
		}
	}
}

// TestShardSlotMatchesClusterKeySlot compares Slot with CLUSTER KEYSLOT for
// hand-picked hash tag cases and thousands of random keys rich in braces.
func TestShardSlotMatchesClusterKeySlot(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	node := c.Node(0).Client(t, 0)
	keys := []string{
		"", "{", "}", "{}", "}{", "{}{}", "{a}", "a{b}c", "{{x}}", "{{}}", "{}{a}", "{a}{b}", "a{}b{c}",
		"{a", "a}", "}{a}", "{ }", "x{}", "{x}}", "{{x}", "q#1.5", "{q#1.5}:qb:inflight", "{q}:qb:seq",
		"foo", "123456789", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}",
		"\x00", "{\x00}", "\xff{\xfe}", "ü{ß}", strings.Repeat("k", 1000), "{" + strings.Repeat("t", 500) + "}x",
	}
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	alphabet := []string{"{", "}", "{", "}", "a", "b", "x", "#", ".", ":", "\x00", "\xff", "ü", "7"}
	for i := 0; i < 5000; i++ {
		var sb strings.Builder
		for n := rng.IntN(16); n > 0; n-- {
			sb.WriteString(alphabet[rng.IntN(len(alphabet))])
		}
		keys = append(keys, sb.String())
	}
	ctx := testCtx(t)
	cmds := make([]*redis.IntCmd, len(keys))
	if _, err := node.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.ClusterKeySlot(ctx, k)
		}
		return nil
	}); err != nil {
		t.Fatalf("CLUSTER KEYSLOT: %v", err)
	}
	bad := 0
	for i, k := range keys {
		if got, want := Slot(k), int(cmds[i].Val()); got != want {
			if bad++; bad <= 20 {
				t.Errorf("Slot(%q) = %d; CLUSTER KEYSLOT says %d", k, got, want)
			}
		}
		if s := Slot(k); s < 0 || s >= SlotCount {
			t.Fatalf("Slot(%q) = %d out of range", k, s)
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d keys in the wrong slot", bad, len(keys))
	}
}

func TestShardGrowShardsSingle(t *testing.T) {
	t.Parallel()
	b, rdb := newTestBroker(t)
	ctx := testCtx(t)

	t.Run("arguments, growth and shrink", func(t *testing.T) {
		const q = "grow-args"
		for _, n := range []int{0, -1, MaxShards + 1} {
			if _, err := b.GrowShards(ctx, q, n, nil); err == nil || !strings.Contains(err.Error(), "1 to 256") {
				t.Errorf("GrowShards(%d) = %v; want a refusal naming the range", n, err)
			}
		}
		if names, err := b.QueueShards(ctx, q); err != nil || !slices.Equal(names, []string{q}) {
			t.Fatalf("QueueShards of an unsharded queue = %v, %v", names, err)
		}
		names, err := b.GrowShards(ctx, q, 1, func([]string) error { t.Fatal("prepare called for no new shard"); return nil })
		if err != nil || !slices.Equal(names, []string{q}) {
			t.Fatalf("GrowShards(1) = %v, %v", names, err)
		}
		if n, _ := rdb.HLen(ctx, b.Keys().Shards()).Result(); n != 0 {
			t.Fatalf("GrowShards(1) wrote the table (%d entries)", n)
		}
		var prepared []string
		names, err = b.GrowShards(ctx, q, 3, func(more []string) error {
			prepared = append(prepared, more...)
			// Not yet published.
			if cur, _ := b.QueueShards(ctx, q); len(cur) != 1 {
				t.Errorf("prepare sees %v already in the table", cur)
			}
			return nil
		})
		want := []string{q, q + "#1", q + "#2"}
		if err != nil || !slices.Equal(names, want) || !slices.Equal(prepared, want[1:]) {
			t.Fatalf("GrowShards(3) = %v, %v (prepared %v); want %v", names, err, prepared, want)
		}
		if v, _ := rdb.HGet(ctx, b.Keys().Shards(), q).Result(); v != "1 2" {
			t.Fatalf("table entry %q; want \"1 2\"", v)
		}
		names, err = b.GrowShards(ctx, q, 3, nil)
		if err != nil || !slices.Equal(names, want) {
			t.Fatalf("GrowShards(3) again = %v, %v", names, err)
		}
		names, err = b.GrowShards(ctx, q, 2, nil)
		var se *ShrinkError
		if !errors.As(err, &se) || se.Have != 3 || se.Ask != 2 || se.Queue != q || !slices.Equal(names, want) {
			t.Fatalf("GrowShards(2) = %v, %v; want a *ShrinkError 3 -> 2 and the current shards", names, err)
		}
		if !strings.Contains(err.Error(), "never removed") {
			t.Errorf("shrink error %q does not say why", err)
		}
		// A failing prepare publishes nothing.
		boom := errors.New("boom")
		if _, err := b.GrowShards(ctx, q, 5, func([]string) error { return boom }); !errors.Is(err, boom) {
			t.Fatalf("GrowShards with a failing prepare = %v", err)
		}
		if names, _ := b.QueueShards(ctx, q); !slices.Equal(names, want) {
			t.Fatalf("after a failed prepare the shards are %v", names)
		}
		names, err = b.GrowShards(ctx, q, MaxShards, nil)
		if err != nil || len(names) != MaxShards || names[MaxShards-1] != q+"#255" {
			t.Fatalf("GrowShards(%d) = %d names, %v", MaxShards, len(names), err)
		}
		for i, name := range names {
			if idx, ok := ShardIndex(name); !ok || idx != i || Logical(name) != q {
				t.Fatalf("shard %d named %q: index %d %v", i, name, idx, ok)
			}
		}
	})

	t.Run("table reads", func(t *testing.T) {
		for _, q := range []string{"tbl-a", "tbl-b"} {
			if _, err := b.GrowShards(ctx, q, 2, nil); err != nil {
				t.Fatal(err)
			}
		}
		all, err := b.Shards(ctx)
		if err != nil || !slices.Equal(all["tbl-a"], []string{"tbl-a", "tbl-a#1"}) || !slices.Equal(all["tbl-b"], []string{"tbl-b", "tbl-b#1"}) {
			t.Fatalf("Shards() = %v, %v", all, err)
		}
		if _, ok := all["tbl-unsharded"]; ok {
			t.Fatal("an unsharded queue in Shards()")
		}
	})

	t.Run("concurrent growth", func(t *testing.T) {
		shardGrowConcurrently(t, b, "conc", 20)
	})
}

// shardGrowConcurrently runs, for each of rounds queues, several goroutines
// that grow the queue to different counts at once, while another reads
// the table: the readers never see the queue shrink or its shards renamed,
// every call ends with the shards it asked for or a *ShrinkError (another
// call went further), and the table ends with the largest count asked.
func shardGrowConcurrently(t *testing.T, b *Broker, base string, rounds int) [][]string {
	t.Helper()
	ctx := testCtx(t)
	var finals [][]string
	var retried atomic.Int64 // calls that prepared more than once
	for r := 0; r < rounds; r++ {
		q := fmt.Sprintf("%s-%d", base, r)
		asks := []int{2, 3, 4, 5, 6, 7, 8, 9}
		rand.Shuffle(len(asks), func(i, j int) { asks[i], asks[j] = asks[j], asks[i] })
		stop := make(chan struct{})
		var watch sync.WaitGroup
		var seen [][]string
		watch.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				names, err := b.QueueShards(ctx, q)
				if err != nil {
					t.Error(err)
					return
				}
				seen = append(seen, names)
			}
		})
		results := make([][]string, len(asks))
		errs := make([]error, len(asks))
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, n := range asks {
			wg.Go(func() {
				<-start
				calls := 0
				results[i], errs[i] = b.GrowShards(ctx, q, n, func(more []string) error {
					calls++
					return nil
				})
				if calls > 1 {
					retried.Add(1) // lost the compare-and-set and tried again
				}
			})
		}
		close(start)
		wg.Wait()
		close(stop)
		watch.Wait()
		final, err := b.QueueShards(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		if len(final) != slices.Max(asks) {
			t.Fatalf("%s: %d shards after growing to %v; want %d", q, len(final), asks, slices.Max(asks))
		}
		for i, n := range asks {
			var se *ShrinkError
			switch {
			case errs[i] == nil:
				if len(results[i]) != n {
					t.Errorf("%s: GrowShards(%d) returned %d shards", q, n, len(results[i]))
				}
			case errors.As(errs[i], &se):
				if se.Ask != n || se.Have <= n {
					t.Errorf("%s: GrowShards(%d): %v", q, n, errs[i])
				}
			default:
				t.Errorf("%s: GrowShards(%d) failed: %v", q, n, errs[i])
			}
			if !slices.Equal(results[i], final[:min(len(results[i]), len(final))]) {
				t.Errorf("%s: GrowShards(%d) returned %v; the table ends with %v", q, n, results[i], final)
			}
		}
		prev := 0
		for _, names := range append(seen, final) {
			if len(names) < prev {
				t.Fatalf("%s: the table shrank from %d to %d shards", q, prev, len(names))
			}
			if !slices.Equal(names, final[:len(names)]) {
				t.Fatalf("%s: a reader saw %v; the table ends with %v", q, names, final)
			}
			prev = len(names)
		}
		finals = append(finals, final)
	}
	t.Logf("%d of %d calls lost the compare-and-set and retried", retried.Load(), rounds*8)
	if retried.Load() == 0 {
		t.Errorf("no call ever lost the compare-and-set: the test did not exercise concurrent growth")
	}
	return finals
}

func TestShardPlacementOnCluster(t *testing.T) {
	t.Parallel()
	c, b := shardClusterBroker(t)
	ctx := testCtx(t)
	admin := c.Client(t)

	perMaster := func(t *testing.T, names []string) map[int]int {
		t.Helper()
		per := map[int]int{}
		for _, name := range names {
			per[c.MasterOf(t, b.Keys().Ready(name))]++
		}
		return per
	}
	balanced := func(t *testing.T, what string, names []string) {
		t.Helper()
		per := perMaster(t, names)
		lo, hi := len(names), 0
		for m := 0; m < redistest.ClusterSize; m++ {
			lo, hi = min(lo, per[m]), max(hi, per[m])
		}
		if hi-lo > 1 {
			t.Errorf("%s: %d shards per master %v", what, len(names), per)
		}
	}

	t.Run("3 and 6 shards", func(t *testing.T) {
		for _, tc := range []struct{ n, each int }{{3, 1}, {6, 2}, {9, 3}} {
			q := fmt.Sprintf("place-%d", tc.n)
			names, err := b.GrowShards(ctx, q, tc.n, nil)
			if err != nil || len(names) != tc.n {
				t.Fatalf("GrowShards(%s, %d) = %v, %v", q, tc.n, names, err)
			}
			per := perMaster(t, names)
			for m := 0; m < redistest.ClusterSize; m++ {
				if per[m] != tc.each {
					t.Errorf("%s: shards per master %v; want %d each", q, per, tc.each)
				}
			}
			for i, name := range names {
				idx, ok := ShardIndex(name)
				if !ok || idx != i || Logical(name) != q {
					t.Errorf("shard %d named %q", i, name)
				}
				if i > 0 && !strings.HasPrefix(name, fmt.Sprintf("%s#%d.", q, i)) {
					t.Errorf("shard %d named %q; want a salted suffix %d.<salt>", i, name, i)
				}
				for _, key := range append(queueKeys(b.Keys(), name), b.Keys().Ready(name)) {
					slot, err := admin.ClusterKeySlot(ctx, key).Result()
					if err != nil || int(slot) != Slot(b.Keys().Ready(name)) {
						t.Errorf("shard %s: key %q in slot %d (%v); Slot of the ready list %d", name, key, slot, err, Slot(b.Keys().Ready(name)))
					}
				}
			}
		}
	})

	t.Run("one at a time stays balanced", func(t *testing.T) {
		const q = "place-steps"
		for n := 1; n <= 12; n++ {
			names, err := b.GrowShards(ctx, q, n, nil)
			if err != nil {
				t.Fatal(err)
			}
			balanced(t, fmt.Sprintf("%s after growing to %d", q, n), names)
		}
	})

	t.Run("with a key prefix", func(t *testing.T) {
		o := c.ServiceOptions()
		o.DisableIdentity = true
		svc := redis.NewClusterClient(o)
		t.Cleanup(func() { _ = svc.Close() })
		pb := New(svc, WithKeyPrefix("app:"))
		names, err := pb.GrowShards(ctx, "pfx", 6, nil)
		if err != nil {
			t.Fatal(err)
		}
		per := map[int]int{}
		for _, name := range names {
			per[c.MasterOf(t, pb.Keys().Ready(name))]++
		}
		for m := 0; m < redistest.ClusterSize; m++ {
			if per[m] != 2 {
				t.Errorf("with prefix app:, shards per master %v; want 2 each", per)
			}
		}
		if v, err := admin.HGet(ctx, "app:qbridge:shards", "pfx").Result(); err != nil || len(strings.Fields(v)) != 5 {
			t.Errorf("prefixed table entry %q, %v", v, err)
		}
	})

	t.Run("concurrent growth", func(t *testing.T) {
		for _, names := range shardGrowConcurrently(t, b, "cconc", 5) {
			balanced(t, names[0]+" grown concurrently", names)
		}
	})

	t.Run("a node's view agrees", func(t *testing.T) {
		// Every shard's ready list is served by the master placement
		// chose: a write to it through the cluster client lands there.
		names, err := b.GrowShards(ctx, "place-write", 3, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range names {
			if err := admin.RPush(ctx, b.Keys().Ready(name), "x").Err(); err != nil {
				t.Fatal(err)
			}
			m := c.MasterOf(t, b.Keys().Ready(name))
			n, err := c.Node(m).Client(t, 0).Exists(context.Background(), b.Keys().Ready(name)).Result()
			if err != nil || n != 1 {
				t.Errorf("shard %s is not on node %d (%d, %v)", name, m, n, err)
			}
		}
	})
}
