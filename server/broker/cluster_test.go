package broker

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/redistest"
)

// crc16 is Redis Cluster's key hash (CRC-16/XMODEM).
func crc16(s string) uint16 {
	var crc uint16
	for i := 0; i < len(s); i++ {
		crc ^= uint16(s[i]) << 8
		for b := 0; b < 8; b++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}

// keySlot is the Redis Cluster slot of key: the hash of its hash tag (what
// is between the first { and the first } after it, when not empty), else
// of the whole key.
func keySlot(key string) int {
	if s := strings.IndexByte(key, '{'); s >= 0 {
		if e := strings.IndexByte(key[s+1:], '}'); e > 0 {
			key = key[s+1 : s+1+e]
		}
	}
	return int(crc16(key) % 16384)
}

func TestKeySlotReference(t *testing.T) {
	if got := crc16("123456789"); got != 0x31C3 {
		t.Fatalf("crc16 check value %#x, want 0x31c3", got)
	}
	// Values from CLUSTER KEYSLOT.
	for key, want := range map[string]int{"foo": 12182, "{user1000}.following": 3443, "{user1000}.followers": 3443, "foo{}{bar}": 8363, "foo{{bar}}zap": 4015, "foo{bar}{zap}": 5061, "123456789": 12739} {
		if got := keySlot(key); got != want {
			t.Errorf("keySlot(%q) = %d, want %d", key, got, want)
		}
	}
}

// queueKeys returns every key of queue q that Keys names: the results of
// every method of the form func(queue string) string, so that keys added
// later are checked too, except those that are no keys of the queue.
func queueKeys(k Keys, q string) []string {
	notKeys := map[string]bool{"Ready": true, "Channel": true, "StripChannel": true, "ResultsChannel": true}
	var out []string
	v := reflect.ValueOf(k)
	for i := 0; i < v.NumMethod(); i++ {
		m, name := v.Method(i), v.Type().Method(i).Name
		if notKeys[name] || m.Type().NumIn() != 1 || m.Type().NumOut() != 1 ||
			m.Type().In(0).Kind() != reflect.String || m.Type().Out(0).Kind() != reflect.String {
			continue
		}
		out = append(out, m.Call([]reflect.Value{reflect.ValueOf(q)})[0].String())
	}
	return out
}

// TestKeysShareTheReadySlot: for any queue name (no braces: see package
// server) and any prefix CheckClusterPrefix allows, every key a queue
// script declares is in the slot of the ready list; a prefix with a brace
// breaks that and CheckClusterPrefix refuses it.
func TestKeysShareTheReadySlot(t *testing.T) {
	if n := len(queueKeys(NewKeys(""), "q")); n < len(NewKeys("").script("q"))-1 {
		t.Fatalf("queueKeys finds %d keys, fewer than the scripts use", n)
	}
	queues := []string{"q", "task:prodcons:queue", "a b", "ü/ß", "x]y", ":", "qbridge:queues", strings.Repeat("long", 100)}
	for i := 0; i < 200; i++ {
		queues = append(queues, fmt.Sprintf("queue-%d", i))
	}
	for _, prefix := range []string{"", "app:", "my app/", "a]b", "*?"} {
		if err := CheckClusterPrefix(prefix); err != nil {
			t.Fatalf("CheckClusterPrefix(%q): %v", prefix, err)
		}
		k := NewKeys(prefix)
		for _, q := range queues {
			keys := append(k.script(q), queueKeys(k, q)...)
			want := keySlot(k.Ready(q))
			for _, key := range keys {
				if got := keySlot(key); got != want {
					t.Errorf("prefix %q queue %q: %q in slot %d, the ready list %q in %d", prefix, q, key, got, k.Ready(q), want)
				}
			}
		}
	}
	for _, prefix := range []string{"{app}:", "app{", "}", "{}"} {
		err := CheckClusterPrefix(prefix)
		if err == nil || !strings.Contains(err.Error(), "brace") {
			t.Errorf("CheckClusterPrefix(%q) = %v, want a refusal", prefix, err)
		}
	}
	// The refused prefixes do break a queue somewhere.
	k := NewKeys("{app}:")
	if keys := k.script("q"); keySlot(keys[0]) == keySlot(keys[1]) {
		t.Errorf("prefix {app}: keeps one slot; the refusal would be needless")
	}
}

// TestClusterPipelinesAcrossNodes runs the coalescers' multi-queue flushes
// on a real Redis Cluster, with queues on every node, after the script cache
// of every node was flushed: the pipeline is split per node, Redis refuses
// the scripts with NOSCRIPT, and the retry after loading them everywhere
// enqueues (and acks) every call exactly once.
func TestClusterPipelinesAcrossNodes(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	admin := c.Client(t)
	o := c.ServiceOptions()
	o.DisableIdentity = true
	svc := redis.NewClusterClient(o)
	t.Cleanup(func() { _ = svc.Close() })
	b := New(svc)
	ctx := testCtx(t)

	// One queue per node, each checked against Redis's own hashing.
	byNode := map[int]string{}
	for i := 0; len(byNode) < redistest.ClusterSize && i < 1000; i++ {
		q := fmt.Sprintf("node-q-%d", i)
		if n := c.NodeOf(t, q); byNode[n] == "" {
			byNode[n] = q
		}
	}
	var queues []string
	for _, q := range byNode {
		queues = append(queues, q)
		for _, key := range append(b.keys.script(q), queueKeys(b.keys, q)...) {
			if slot, err := admin.ClusterKeySlot(ctx, key).Result(); err != nil || int(slot) != keySlot(key) {
				t.Fatalf("CLUSTER KEYSLOT %q = %d, %v; keySlot says %d", key, slot, err, keySlot(key))
			}
		}
	}
	if len(queues) != redistest.ClusterSize {
		t.Fatalf("queues on %d nodes only", len(queues))
	}

	if err := admin.ScriptFlush(ctx).Err(); err != nil {
		t.Fatalf("SCRIPT FLUSH: %v", err)
	}
	var calls []*enqueueCall
	want := map[string][]string{}
	for i := 0; i < 2*len(queues); i++ {
		q := queues[i%len(queues)]
		ms := msgs(fmt.Sprintf("c%d", i), 2)
		calls = append(calls, newEnqueueCall(ctx, q, ms))
		for _, m := range ms {
			want[q] = append(want[q], m.ID)
		}
	}
	b.flushEnqueues(calls)
	assertAllDone(t, calls)
	for i, call := range calls {
		if call.err != nil {
			t.Fatalf("call %d to %s: %v", i, call.queue, call.err)
		}
	}
	for q, ids := range want {
		els, err := admin.LRange(ctx, q, 0, -1).Result()
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, el := range els {
			m, err := decodeEnvelope([]byte(el))
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, m.ID)
		}
		if !slices.Equal(got, ids) {
			t.Errorf("%s holds %v, want %v (each exactly once)", q, got, ids)
		}
	}

	// Claim everything, flush the script caches again, and ack it all in
	// one multi-queue settle flush.
	var settles []*settleCall
	for _, q := range queues {
		ls, _, err := b.Claim(ctx, q, 10, 10e9)
		if err != nil || len(ls) != len(want[q]) {
			t.Fatalf("claim from %s: %d leases, %v", q, len(ls), err)
		}
		for _, l := range ls {
			settles = append(settles, &settleCall{ctx: ctx, queue: q, counter: "acked", args: []any{l.LeaseID, ""}, done: make(chan struct{})})
		}
	}
	if err := admin.ScriptFlush(ctx).Err(); err != nil {
		t.Fatalf("SCRIPT FLUSH: %v", err)
	}
	b.flushSettles(settles)
	for i, s := range settles {
		if s.err != nil || len(s.ok) != 1 || !s.ok[0] {
			t.Fatalf("settle %d in %s: ok %v, %v", i, s.queue, s.ok, s.err)
		}
	}
	lens, err := b.ReadyLengths(ctx, queues)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := b.ReadCounters(ctx, queues)
	if err != nil {
		t.Fatal(err)
	}
	for i, q := range queues {
		st, err := b.Stats(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		if lens[i] != 0 || st.InFlight != 0 || cs[i].Acked != int64(len(want[q])) || cs[i].Enqueued != int64(len(want[q])) {
			t.Errorf("%s: ready %d, in flight %d, counters %+v", q, lens[i], st.InFlight, cs[i])
		}
	}
	if err := b.Ping(ctx); err != nil {
		t.Errorf("ping: %v", err)
	}
}
