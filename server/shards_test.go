package server_test

// Sharded queues (QueueConfig.shards): configuration, how Enqueue spreads
// messages over the shards, how one Consume stream takes from all of them,
// the lifecycle of messages on shards (leases, nacks, retries, delays, dead
// letters), the admin calls, results, ack tokens, and on a real Redis
// Cluster the placement of the shards on the masters.
//
// Every top-level test runs its own redis-server (or cluster), so they run
// in parallel. Helpers are prefixed with "sh".

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// shWait is how long the tests wait for something the server does in the
// background: one periodic shard reload (5 s) and then some.
const shWait = 10 * time.Second

// shConfigure replaces q's config (UpdateQueueConfig) and returns the config
// in force.
func shConfigure(t *testing.T, adm qbridgev1.AdminServiceClient, q string, cfg *qbridgev1.QueueConfig) *qbridgev1.QueueConfig {
	t.Helper()
	r, err := adm.UpdateQueueConfig(ctxT(t, 10*time.Second), &qbridgev1.UpdateQueueConfigRequest{Queue: q, Config: cfg})
	if err != nil {
		t.Fatalf("configure %s (%v): %v", q, cfg, err)
	}
	return r.GetConfig()
}

func shGetConfig(t *testing.T, adm qbridgev1.AdminServiceClient, q string) *qbridgev1.QueueConfig {
	t.Helper()
	r, err := adm.GetQueueConfig(ctxT(t, 5*time.Second), &qbridgev1.GetQueueConfigRequest{Queue: q})
	if err != nil {
		t.Fatalf("get config of %s: %v", q, err)
	}
	return r.GetConfig()
}

// shKnows waits until the instance behind c serves q with n shards (its
// stats list n shards; none for n == 1). An instance learns of new shards
// in the background (see shards.go), so every test that depends on where
// an instance puts messages waits for this first.
func shKnows(t *testing.T, c qbridgev1.QueueServiceClient, q string, n int) {
	t.Helper()
	want := n
	if n == 1 {
		want = 0
	}
	eventually(t, shWait, fmt.Sprintf("the instance serves %s with %d shards", q, n), func() bool {
		return len(admStats(t, c, q).GetShards()) == want
	})
}

// shShard makes q have n shards (through adm) and waits until every client
// in cs serves it so.
func shShard(t *testing.T, adm qbridgev1.AdminServiceClient, q string, n int, cs ...qbridgev1.QueueServiceClient) {
	t.Helper()
	if got := shConfigure(t, adm, q, &qbridgev1.QueueConfig{Shards: uint32(n)}).GetShards(); got != uint32(n) {
		t.Fatalf("UpdateQueueConfig(shards %d) of %s reports %d shards", n, q, got)
	}
	for _, c := range cs {
		shKnows(t, c, q, n)
	}
}

// shPerShard returns what GetQueueStats says each shard holds ready.
func shPerShard(t *testing.T, c qbridgev1.QueueServiceClient, q string) []int64 {
	t.Helper()
	var out []int64
	for i, s := range admStats(t, c, q).GetShards() {
		if s.GetShard() != uint32(i) {
			t.Fatalf("stats of %s: shards[%d] is shard %d", q, i, s.GetShard())
		}
		out = append(out, s.GetReady())
	}
	return out
}

// shKeyFor finds, for each shard of q (n shards), an ordering key that
// lands there, by enqueueing probes and reading the stats; then it purges
// q. It makes no assumption about the hash.
func shKeyFor(t *testing.T, in *instance, q string, n int) []string {
	t.Helper()
	keys := make([]string, n)
	found := 0
	before := shPerShard(t, in.client, q)
	if len(before) != n {
		t.Fatalf("%s has %d shards in stats; want %d", q, len(before), n)
	}
	for i := 0; found < n && i < 1000; i++ {
		k := fmt.Sprintf("key-%d", i)
		admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("probe"), OrderingKey: k})
		after := shPerShard(t, in.client, q)
		for s := range after {
			if after[s] != before[s] && keys[s] == "" {
				keys[s] = k
				found++
			}
		}
		// Empty again, so that a max_length cannot refuse the next probe.
		if _, err := in.admin.PurgeQueue(ctxT(t, 5*time.Second), &qbridgev1.PurgeQueueRequest{Queue: q}); err != nil {
			t.Fatal(err)
		}
		before = shPerShard(t, in.client, q)
	}
	if found < n {
		t.Fatalf("no ordering key found for every shard of %s: %q", q, keys)
	}
	if _, err := in.admin.PurgeQueue(ctxT(t, 5*time.Second), &qbridgev1.PurgeQueueRequest{Queue: q}); err != nil {
		t.Fatal(err)
	}
	return keys
}

// shShardsOf maps the id of every message of q in state to its shard, as
// PeekMessages reports it.
func shShardsOf(t *testing.T, a qbridgev1.AdminServiceClient, q string, state qbridgev1.MessageState) map[string]uint32 {
	t.Helper()
	out := map[string]uint32{}
	var all []*qbridgev1.QueuedMessage
	tok := ""
	for {
		r := admPeek(t, a, &qbridgev1.PeekMessagesRequest{Queue: q, State: state, PageSize: 1000, PageToken: tok})
		all = append(all, r.GetMessages()...)
		if tok = r.GetNextPageToken(); tok == "" {
			break
		}
	}
	for _, m := range all {
		if _, dup := out[m.GetId()]; dup {
			t.Fatalf("peek %v of %s lists %s twice", state, q, m.GetId())
		}
		out[m.GetId()] = m.GetShard()
	}
	return out
}

// shTake waits for n deliveries.
func shTake(t *testing.T, s *stream, n int) []*qbridgev1.Delivery {
	t.Helper()
	ds := make([]*qbridgev1.Delivery, n)
	for i := range ds {
		ds[i] = s.next(t, shWait)
	}
	return ds
}

// shMustAck acks ds in one call.
func shMustAck(t *testing.T, c qbridgev1.QueueServiceClient, ds ...*qbridgev1.Delivery) {
	t.Helper()
	if err := ack(t, c, ds...); err != nil {
		t.Fatalf("ack of %d deliveries: %v", len(ds), err)
	}
}

// shToken builds an ack token by hand, in the wire form of server/token.go:
// "v1." + base64url of queue, lease id, instance id (each a uvarint length
// and the bytes) and the consumer number (a uvarint).
func shToken(queue, leaseID, inst string, consumer uint64) string {
	var b []byte
	for _, s := range []string{queue, leaseID, inst} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	b = binary.AppendUvarint(b, consumer)
	return "v1." + base64.RawURLEncoding.EncodeToString(b)
}

// shParseToken is the inverse of shToken.
func shParseToken(t *testing.T, tok string) (queue, leaseID, inst string, consumer uint64) {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(tok, "v1."))
	if err != nil || !strings.HasPrefix(tok, "v1.") {
		t.Fatalf("token %q: %v", tok, err)
	}
	var f [3]string
	for i := range f {
		n, k := binary.Uvarint(b)
		if k <= 0 || uint64(len(b)-k) < n {
			t.Fatalf("token %q: truncated", tok)
		}
		f[i] = string(b[k : k+int(n)])
		b = b[k+int(n):]
	}
	c, k := binary.Uvarint(b)
	if k != len(b) {
		t.Fatalf("token %q: trailing bytes", tok)
	}
	return f[0], f[1], f[2], c
}

// shKeysOf returns, sorted, the Redis keys of queue q and of its shards
// (found with SCAN), but for the consumers hash (presence that consuming
// instances refresh, not data).
func shKeysOf(t *testing.T, rdb *redis.Client, q string) []string {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	var out []string
	iter := rdb.Scan(ctx, 0, "*", 1000).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		mine := k == q || strings.HasPrefix(k, q+broker.ShardSep) ||
			strings.HasPrefix(k, "{"+q+"}") || strings.HasPrefix(k, "{"+q+broker.ShardSep)
		if mine && !strings.HasSuffix(k, ":qb:consumers") {
			out = append(out, k)
		}
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// shTable reads q's entry of the shard table: the physical names of its
// shards, shard 0 (q) first.
func shTable(t *testing.T, rdb redis.UniversalClient, q string) []string {
	t.Helper()
	v, err := rdb.HGet(ctxT(t, 5*time.Second), broker.NewKeys("").Shards(), q).Result()
	if err == redis.Nil {
		return []string{q}
	}
	if err != nil {
		t.Fatal(err)
	}
	names := []string{q}
	for _, s := range strings.Fields(v) {
		names = append(names, q+broker.ShardSep+s)
	}
	return names
}

// ---------------------------------------------------------------------------
// Configuration

func TestShardConfig(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})

	t.Run("set get grow", func(t *testing.T) {
		t.Parallel()
		const q = "cfg-grow"
		for _, step := range []struct {
			ask, want uint32
		}{
			{0, 1}, // 0 on a new queue: unsharded
			{1, 1}, // 1 on an unsharded queue: nothing to do
			{3, 3},
			{3, 3}, // the same count again
			{0, 3}, // 0 keeps the count
			{5, 5},
			{256, 256}, // the limit
		} {
			if got := shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{Shards: step.ask}).GetShards(); got != step.want {
				t.Fatalf("UpdateQueueConfig(shards %d) reports %d shards; want %d", step.ask, got, step.want)
			}
			if got := shGetConfig(t, in.admin, q).GetShards(); got != step.want {
				t.Fatalf("after shards %d, GetQueueConfig reports %d shards; want %d", step.ask, got, step.want)
			}
			if got := len(shTable(t, in.rdb, q)); got != int(step.want) {
				t.Fatalf("after shards %d, the shard table names %d shards; want %d", step.ask, got, step.want)
			}
		}
		names := shTable(t, in.rdb, q)
		for i, name := range names {
			if i == 0 && name != q || i > 0 && name != fmt.Sprintf("%s#%d", q, i) {
				t.Fatalf("shard %d is named %q", i, name)
			}
		}
		shKnows(t, in.client, q, 256)
	})

	t.Run("shrink and too many are refused", func(t *testing.T) {
		t.Parallel()
		const q = "cfg-refuse"
		shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{Shards: 4, MaxLength: 10})
		for _, tc := range []struct {
			name string
			ask  uint32
			code codes.Code
			msg  []string
		}{
			{"fewer", 2, codes.FailedPrecondition, []string{"4 shards", "never removed", "cannot have 2", "move the messages to a new queue"}},
			{"one", 1, codes.FailedPrecondition, []string{"4 shards", "never removed"}},
			{"above the limit", 257, codes.InvalidArgument, []string{"257", "limit 256"}},
			{"far above the limit", 1 << 31, codes.InvalidArgument, []string{"limit 256"}},
		} {
			// The refused request also asks for another max_length: a
			// refused update must change nothing.
			shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{MaxLength: 10})
			_, err := in.admin.UpdateQueueConfig(ctxT(t, 5*time.Second), &qbridgev1.UpdateQueueConfigRequest{
				Queue: q, Config: &qbridgev1.QueueConfig{Shards: tc.ask, MaxLength: 5}})
			if status.Code(err) != tc.code {
				t.Fatalf("%s: shards %d: got %v; want %v", tc.name, tc.ask, err, tc.code)
			}
			for _, part := range tc.msg {
				if !strings.Contains(status.Convert(err).Message(), part) {
					t.Errorf("%s: message %q does not say %q", tc.name, status.Convert(err).Message(), part)
				}
			}
			cfg := shGetConfig(t, in.admin, q)
			if cfg.GetShards() != 4 || len(shTable(t, in.rdb, q)) != 4 {
				t.Fatalf("%s: after a refused update the queue has %d shards (table %v); want 4", tc.name, cfg.GetShards(), shTable(t, in.rdb, q))
			}
			if cfg.GetMaxLength() != 10 {
				t.Errorf("%s: a refused UpdateQueueConfig (%v) still changed max_length from 10 to %d", tc.name, status.Code(err), cfg.GetMaxLength())
			}
		}
	})

	t.Run("config applies to every shard", func(t *testing.T) {
		t.Parallel()
		const q = "cfg-every"
		shShard(t, in.admin, q, 3, in.client)
		// Set on a sharded queue, and grown after: every shard, old or
		// new, has the same stored config.
		shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{MaxLength: 2, RetryPolicy: &qbridgev1.RetryPolicy{MaxAttempts: 2}})
		cfg := shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{Shards: 4, MaxLength: 2, RetryPolicy: &qbridgev1.RetryPolicy{MaxAttempts: 2}})
		if cfg.GetShards() != 4 || cfg.GetMaxLength() != 2 || cfg.GetRetryPolicy().GetMaxAttempts() != 2 {
			t.Fatalf("config in force %v", cfg)
		}
		shKnows(t, in.client, q, 4)
		k := broker.NewKeys("")
		want, err := in.rdb.HGetAll(ctxT(t, 5*time.Second), k.Config(q)).Result()
		if err != nil || want["max_length"] != "2" || want["max_attempts"] != "2" {
			t.Fatalf("shard 0's stored config %v, %v", want, err)
		}
		for _, name := range shTable(t, in.rdb, q)[1:] {
			got, err := in.rdb.HGetAll(ctxT(t, 5*time.Second), k.Config(name)).Result()
			if err != nil || fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("shard %s's stored config %v (%v); shard 0 has %v", name, got, err, want)
			}
		}
		keys := shKeyFor(t, in, q, 4)

		// max_length is enforced per shard: each shard holds up to 2,
		// whatever the others hold. (QueueConfig.max_length documents "the
		// most messages the queue may hold"; on a sharded queue the queue
		// holds up to shards x max_length, and an Enqueue can be refused
		// while the queue holds fewer than max_length. See the report.)
		for i := 0; i < 2; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("a"), OrderingKey: keys[3]})
		}
		_, err = in.client.Enqueue(ctxT(t, 5*time.Second), &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("a"), OrderingKey: keys[3]})
		wantCode(t, err, codes.ResourceExhausted, "")
		for s := 0; s < 3; s++ {
			for i := 0; i < 2; i++ {
				admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("b"), OrderingKey: keys[s]})
			}
		}
		if got := shPerShard(t, in.client, q); !slices.Equal(got, []int64{2, 2, 2, 2}) {
			t.Fatalf("per shard ready %v; want 2 each", got)
		}
		if r := admStats(t, in.client, q).GetReady(); r != 8 {
			t.Fatalf("the queue holds %d; want 8 (4 shards x max_length 2)", r)
		}
		for s := 0; s < 4; s++ {
			_, err = in.client.Enqueue(ctxT(t, 5*time.Second), &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("c"), OrderingKey: keys[s]})
			wantCode(t, err, codes.ResourceExhausted, "")
		}
		// A config update reaches every shard: max_length 3 makes room
		// for one more in each.
		shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{MaxLength: 3, RetryPolicy: &qbridgev1.RetryPolicy{MaxAttempts: 2}})
		for s := 0; s < 4; s++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("d"), OrderingKey: keys[s]})
			_, err = in.client.Enqueue(ctxT(t, 5*time.Second), &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("e"), OrderingKey: keys[s]})
			wantCode(t, err, codes.ResourceExhausted, "")
		}

		// max_attempts 2 on every shard: the second failed attempt of a
		// message dead-letters it, in its own shard.
		if _, err := in.admin.PurgeQueue(ctxT(t, 5*time.Second), &qbridgev1.PurgeQueueRequest{Queue: q}); err != nil {
			t.Fatal(err)
		}
		ids := map[string]int{}
		for s := 0; s < 4; s++ {
			ids[admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("f"), OrderingKey: keys[s]}).GetId()] = s
		}
		st := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4})
		for attempts := 0; attempts < 8; attempts++ {
			d := st.next(t, shWait)
			if want, ok := ids[d.GetId()]; !ok || int(d.GetShard()) != want {
				t.Fatalf("delivery %s from shard %d; want one of %v from its shard", d.GetId(), d.GetShard(), ids)
			}
			if _, err := in.client.Nack(ctxT(t, 5*time.Second), &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()},
				Action: qbridgev1.NackAction_NACK_ACTION_RETRY, RetryDelay: durationpb.New(0)}); err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, shWait, "every message dead after 2 attempts", func() bool { return admStats(t, in.client, q).GetDead() == 4 })
		for _, s := range admStats(t, in.client, q).GetShards() {
			if s.GetDead() != 1 {
				t.Errorf("shard %d has %d dead letters; want 1", s.GetShard(), s.GetDead())
			}
		}
		for _, m := range admPeekAll(t, in.admin, q, stDead) {
			if int(m.GetShard()) != ids[m.GetId()] || m.GetDeadReason() != "max attempts reached" {
				t.Errorf("dead letter %s: shard %d, reason %q; want shard %d, max attempts", m.GetId(), m.GetShard(), m.GetDeadReason(), ids[m.GetId()])
			}
		}
	})

	t.Run("a batch over several shards is all or none per shard, and says what was written", func(t *testing.T) {
		t.Parallel()
		const q = "cfg-batch"
		shShard(t, in.admin, q, 2, in.client)
		shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{MaxLength: 2})
		keys := shKeyFor(t, in, q, 2)
		for i := 0; i < 2; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("fill"), OrderingKey: keys[0]})
		}
		// Shard 0 is full, shard 1 empty: a batch with a message for each
		// is written on shard 1 only (shards are separate slots: no
		// transaction spans them), and the error says so, so that the
		// caller retries only the rest.
		_, err := in.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{
			{Payload: []byte("to shard 1"), OrderingKey: keys[1]},
			{Payload: []byte("to shard 0"), OrderingKey: keys[0]},
		}})
		wantCode(t, err, codes.ResourceExhausted, "messages[0] were enqueued on other shards")
		if got := shPerShard(t, in.client, q); !slices.Equal(got, []int64{2, 1}) {
			t.Fatalf("after a partly refused batch the shards hold %v; want [2 1]", got)
		}
	})
}

// ---------------------------------------------------------------------------
// Where Enqueue puts messages

func TestShardSpread(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})

	t.Run("round robin", func(t *testing.T) {
		t.Parallel()
		const q, n = "spread-rr", 4
		shShard(t, in.admin, q, n, in.client)
		var ids []string
		for i := 0; i < 5*n; i++ {
			ids = append(ids, admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(itoa(i))}).GetId())
		}
		if got := shPerShard(t, in.client, q); !slices.Equal(got, []int64{5, 5, 5, 5}) {
			t.Fatalf("20 calls over 4 shards: %v; want 5 each", got)
		}
		where := shShardsOf(t, in.admin, q, stReady)
		for i := 1; i < len(ids); i++ {
			if where[ids[i]] != (where[ids[i-1]]+1)%n {
				t.Fatalf("call %d went to shard %d, call %d to shard %d: not in turn", i-1, where[ids[i-1]], i, where[ids[i]])
			}
		}
		// A batch without keys goes to one shard whole; the next batch
		// to the next shard.
		var prev uint32
		for b := 0; b < n; b++ {
			msgs := make([]*qbridgev1.BatchMessage, 3)
			for i := range msgs {
				msgs[i] = &qbridgev1.BatchMessage{Payload: []byte(fmt.Sprintf("b%d-%d", b, i))}
			}
			r, err := in.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
			if err != nil {
				t.Fatal(err)
			}
			where := shShardsOf(t, in.admin, q, stReady)
			for _, id := range r.GetIds()[1:] {
				if where[id] != where[r.GetIds()[0]] {
					t.Fatalf("batch %d split over shards %d and %d", b, where[r.GetIds()[0]], where[id])
				}
			}
			if b > 0 && where[r.GetIds()[0]] != (prev+1)%n {
				t.Fatalf("batch %d went to shard %d after shard %d", b, where[r.GetIds()[0]], prev)
			}
			prev = where[r.GetIds()[0]]
		}
		if got := shPerShard(t, in.client, q); !slices.Equal(got, []int64{8, 8, 8, 8}) {
			t.Fatalf("after 4 batches of 3: %v; want 8 each", got)
		}
	})

	t.Run("ordering keys", func(t *testing.T) {
		t.Parallel()
		const q, n, perKey = "spread-keys", 4, 10
		shShard(t, in.admin, q, n, in.client)
		keys := []string{"user-1", "user-2", "user-3", "user-4", "user-5", "user-6", "order/7", "x"}
		byID := map[string][2]int{} // id -> key index, sequence number
		// Interleaved: round i enqueues message i of every key; half the
		// rounds by Enqueue, half by one EnqueueBatch with every key.
		for i := 0; i < perKey; i++ {
			if i%2 == 0 {
				for k, key := range keys {
					id := admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(fmt.Sprintf("%s/%d", key, i)), OrderingKey: key}).GetId()
					byID[id] = [2]int{k, i}
				}
				continue
			}
			msgs := make([]*qbridgev1.BatchMessage, len(keys))
			for k, key := range keys {
				msgs[k] = &qbridgev1.BatchMessage{Payload: []byte(fmt.Sprintf("%s/%d", key, i)), OrderingKey: key}
			}
			r, err := in.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
			if err != nil || len(r.GetIds()) != len(keys) {
				t.Fatalf("batch: %v, %v", r, err)
			}
			for k, id := range r.GetIds() {
				byID[id] = [2]int{k, i}
			}
		}
		where := shShardsOf(t, in.admin, q, stReady)
		if len(where) != len(keys)*perKey {
			t.Fatalf("peek finds %d messages; want %d", len(where), len(keys)*perKey)
		}
		shardOfKey := map[int]uint32{}
		for id, ki := range byID {
			if s, ok := shardOfKey[ki[0]]; ok && s != where[id] {
				t.Fatalf("key %s has messages on shards %d and %d", keys[ki[0]], s, where[id])
			}
			shardOfKey[ki[0]] = where[id]
		}
		used := map[uint32]bool{}
		for _, s := range shardOfKey {
			used[s] = true
		}
		if len(used) < 2 {
			t.Fatalf("8 keys all on one shard (%v): the test proves nothing", shardOfKey)
		}
		// One consumer: each key's messages in enqueue order, and the
		// payload matches the id the enqueue returned.
		st := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8})
		next := make([]int, len(keys))
		for range len(keys) * perKey {
			d := st.next(t, shWait)
			ki, ok := byID[d.GetId()]
			if !ok {
				t.Fatalf("unknown delivery %s", d.GetId())
			}
			if want := fmt.Sprintf("%s/%d", keys[ki[0]], ki[1]); string(d.GetPayload()) != want {
				t.Fatalf("delivery %s carries %q; its enqueue was %q", d.GetId(), d.GetPayload(), want)
			}
			if ki[1] != next[ki[0]] {
				t.Fatalf("key %s: got message %d, want %d next (out of order)", keys[ki[0]], ki[1], next[ki[0]])
			}
			if d.GetShard() != shardOfKey[ki[0]] || d.GetQueue() != q {
				t.Fatalf("delivery of key %s from %s shard %d; want %s shard %d", keys[ki[0]], d.GetQueue(), d.GetShard(), q, shardOfKey[ki[0]])
			}
			next[ki[0]]++
			shMustAck(t, in.client, d)
		}
	})

	t.Run("dedup across shards", func(t *testing.T) {
		t.Parallel()
		const q, n = "spread-dedup", 4
		shShard(t, in.admin, q, n, in.client)
		first := map[string]string{}
		for i := 0; i < 12; i++ {
			key := fmt.Sprintf("dk-%d", i)
			r := admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("1"), DedupKey: key})
			if r.GetDuplicate() {
				t.Fatalf("first enqueue with %s is a duplicate", key)
			}
			first[key] = r.GetId()
		}
		if got := shPerShard(t, in.client, q); slices.Max(got) == 12 {
			t.Fatalf("12 dedup keys all on one shard (%v): the test proves nothing", got)
		}
		for i := 0; i < 12; i++ {
			key := fmt.Sprintf("dk-%d", i)
			r := admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("2"), DedupKey: key})
			if !r.GetDuplicate() || r.GetId() != first[key] {
				t.Errorf("second enqueue with %s = %v; want a duplicate of %s", key, r, first[key])
			}
		}
		// In a batch too, each message with its own shard.
		msgs := make([]*qbridgev1.BatchMessage, 12)
		for i := range msgs {
			msgs[i] = &qbridgev1.BatchMessage{Payload: []byte("3"), DedupKey: fmt.Sprintf("dk-%d", i)}
		}
		r, err := in.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
		if err != nil {
			t.Fatal(err)
		}
		for i, id := range r.GetIds() {
			if key := fmt.Sprintf("dk-%d", i); id != first[key] || !r.GetDuplicate()[i] {
				t.Errorf("batch message %d (%s): id %s duplicate %v; want a duplicate of %s", i, key, id, r.GetDuplicate()[i], first[key])
			}
		}
		if got := admStats(t, in.client, q).GetReady(); got != 12 {
			t.Fatalf("the queue holds %d; want the 12 first messages only", got)
		}
	})

	t.Run("dedup holds when the queue gains shards", func(t *testing.T) {
		t.Parallel()
		const q = "spread-dedup-grow"
		shShard(t, in.admin, q, 2, in.client)
		first := map[string]string{}
		for i := 0; i < 16; i++ {
			key := fmt.Sprintf("dk-%d", i)
			first[key] = admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("1"), DedupKey: key}).GetId()
		}
		shShard(t, in.admin, q, 5, in.client)
		var lost []string
		for i := 0; i < 16; i++ {
			key := fmt.Sprintf("dk-%d", i)
			r := admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("2"), DedupKey: key})
			if !r.GetDuplicate() || r.GetId() != first[key] {
				lost = append(lost, key)
			}
		}
		if len(lost) > 0 {
			t.Errorf("within the dedup window, after growing from 2 to 5 shards, %d of 16 dedup keys were not recognised (%v): the message was enqueued twice", len(lost), lost)
		}
		if got := admStats(t, in.client, q).GetReady(); got != 16 {
			t.Errorf("the queue holds %d; want 16", got)
		}
	})
}

// ---------------------------------------------------------------------------
// Consuming a sharded queue

func TestShardDrain(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})

	t.Run("one stream drains every shard exactly once", func(t *testing.T) {
		t.Parallel()
		const q, n, total = "drain-one", 5, 500
		shShard(t, a.admin, q, n, a.client)
		want := map[string]bool{}
		for i := 0; i < total/10; i++ {
			msgs := make([]*qbridgev1.BatchMessage, 10)
			for j := range msgs {
				msgs[j] = &qbridgev1.BatchMessage{Payload: []byte(fmt.Sprintf("m%d", i*10+j)), TaskType: fmt.Sprintf("t%d", i%2)}
			}
			r, err := a.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range r.GetIds() {
				want[id] = true
			}
		}
		where := shShardsOf(t, a.admin, q, stReady)
		st := admStats(t, a.client, q)
		if st.GetReady() != total || len(st.GetShards()) != n {
			t.Fatalf("stats before: ready %d, %d shards", st.GetReady(), len(st.GetShards()))
		}
		for i, s := range st.GetShards() {
			wantList := q
			if i > 0 {
				wantList = fmt.Sprintf("%s#%d", q, i)
			}
			if s.GetReady() != total/n || s.GetList() != wantList {
				t.Fatalf("shard %d: %v; want %d ready in list %s", i, s, total/n, wantList)
			}
		}
		s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 16})
		got := map[string]bool{}
		for len(got) < total {
			d := s.next(t, shWait)
			if got[d.GetId()] {
				t.Fatalf("%s delivered twice", d.GetId())
			}
			if !want[d.GetId()] || d.GetQueue() != q || d.GetShard() != where[d.GetId()] || d.GetAttempt() != 1 {
				t.Fatalf("delivery %s from %s shard %d attempt %d; peek had it on shard %d", d.GetId(), d.GetQueue(), d.GetShard(), d.GetAttempt(), where[d.GetId()])
			}
			got[d.GetId()] = true
			shMustAck(t, a.client, d)
		}
		st = admStats(t, a.client, q)
		if st.GetReady() != 0 || st.GetInFlight() != 0 || st.GetCounters().GetEnqueued() != total || st.GetCounters().GetAcked() != total {
			t.Fatalf("stats after: ready %d in flight %d counters %v", st.GetReady(), st.GetInFlight(), st.GetCounters())
		}
		for _, tt := range []string{"t0", "t1"} {
			if c := st.GetTaskTypes()[tt]; c.GetEnqueued() != total/2 || c.GetAcked() != total/2 {
				t.Errorf("task type %s counters %v; want %d enqueued and acked (summed over shards)", tt, c, total/2)
			}
		}
		s.none(t)
	})

	// Every shard full, a small window: the shards share the stream. A take
	// from one shard gives the stream at most share = ceil(window/shards),
	// so that the shards take turns: shards x share deliveries are one turn
	// of every shard. Allowing a whole second turn, every shard must have
	// delivered within the first 2 x shards x share deliveries, whether the
	// consumer acks a window at once or each delivery as it comes.
	for _, tc := range []struct {
		name      string
		shards    int
		window    int
		ackWindow bool // ack a whole window at once (else one by one)
	}{
		{"window acked at once", 4, 8, true},
		{"acked one by one", 4, 8, false},
		{"window below the shard count", 4, 2, true},
		{"three shards, window 16", 3, 16, true},
	} {
		t.Run("fair share: "+tc.name, func(t *testing.T) {
			t.Parallel()
			q := fmt.Sprintf("drain-fair-%d-%d-%v", tc.shards, tc.window, tc.ackWindow)
			const perShard = 60
			shShard(t, a.admin, q, tc.shards, a.client)
			for i := 0; i < tc.shards; i++ {
				// Batches without keys: one whole batch per shard, in turn.
				msgs := make([]*qbridgev1.BatchMessage, perShard)
				for j := range msgs {
					msgs[j] = &qbridgev1.BatchMessage{Payload: []byte("x")}
				}
				if _, err := a.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs}); err != nil {
					t.Fatal(err)
				}
			}
			for i, r := range shPerShard(t, a.client, q) {
				if r != perShard {
					t.Fatalf("shard %d holds %d; want %d", i, r, perShard)
				}
			}
			share := (tc.window + tc.shards - 1) / tc.shards
			bound := 2 * tc.shards * share
			s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: uint32(tc.window)})
			var order []uint32
			var held []*qbridgev1.Delivery
			for len(order) < bound {
				d := s.next(t, shWait)
				order = append(order, d.GetShard())
				held = append(held, d)
				if !tc.ackWindow || len(held) == tc.window {
					shMustAck(t, a.client, held...)
					held = nil
				}
			}
			seen := map[uint32]bool{}
			for _, sh := range order {
				seen[sh] = true
			}
			if len(seen) != tc.shards {
				t.Errorf("%d shards of %d each, window %d: the first %d deliveries came from shards %v only (in order: %v)",
					tc.shards, perShard, tc.window, bound, slices.Sorted(maps.Keys(seen)), order)
			}
		})
	}

	t.Run("competing consumers on two instances", func(t *testing.T) {
		t.Parallel()
		const q, n, total = "drain-compete", 3, 600
		shShard(t, a.admin, q, n, a.client, b.client)
		streams := []*stream{
			consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8}),
			consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4}),
			consume(t, b.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8}),
		}
		// Streams, not streams x shards.
		eventually(t, shWait, "3 consumers in the stats", func() bool { return admStats(t, b.client, q).GetConsumers() == 3 })
		want := map[string]bool{}
		for i := 0; i < total/10; i++ {
			via := a.client
			if i%2 == 1 {
				via = b.client
			}
			msgs := make([]*qbridgev1.BatchMessage, 10)
			for j := range msgs {
				msgs[j] = &qbridgev1.BatchMessage{Payload: []byte("x")}
			}
			r, err := via.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range r.GetIds() {
				want[id] = true
			}
		}
		if len(want) != total {
			t.Fatalf("%d distinct ids for %d messages", len(want), total)
		}
		var mu sync.Mutex
		got := map[string]int{}
		shardsSeen := map[uint32]bool{}
		var wg sync.WaitGroup
		done := make(chan struct{})
		for i, s := range streams {
			c := a.client
			if i == 2 {
				c = b.client
			}
			wg.Go(func() {
				for {
					select {
					case d, ok := <-s.ch:
						if !ok {
							return
						}
						mu.Lock()
						got[d.GetId()]++
						shardsSeen[d.GetShard()] = true
						mu.Unlock()
						if _, err := c.Ack(context.Background(), &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
							t.Errorf("ack %s: %v", d.GetId(), err)
						}
					case <-done:
						return
					}
				}
			})
		}
		eventually(t, 30*time.Second, "every message delivered", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(got) == total
		})
		close(done)
		wg.Wait()
		for id, n := range got {
			if n != 1 || !want[id] {
				t.Errorf("%s delivered %d times (known: %v)", id, n, want[id])
			}
		}
		if len(shardsSeen) != n {
			t.Errorf("deliveries from shards %v; want all %d", shardsSeen, n)
		}
		if st := admStats(t, b.client, q); st.GetReady() != 0 || st.GetInFlight() != 0 || st.GetCounters().GetAcked() != total {
			t.Fatalf("stats after: %v", st)
		}
	})

	t.Run("priority consume takes a sharded queue's shards at its priority", func(t *testing.T) {
		t.Parallel()
		const hi, lo = "drain-prio-hi", "drain-prio-lo"
		shShard(t, a.admin, hi, 3, a.client)
		enqueueN(t, a.client, lo, 5)
		hiIDs := map[string]bool{}
		for i := 0; i < 9; i++ {
			hiIDs[admEnqueue(t, a.client, &qbridgev1.EnqueueRequest{Queue: hi, Payload: []byte("h")}).GetId()] = true
		}
		if got := shPerShard(t, a.client, hi); !slices.Equal(got, []int64{3, 3, 3}) {
			t.Fatalf("hi per shard %v", got)
		}
		s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queues: []string{hi, lo}, MaxInFlight: 1})
		shardsSeen := map[uint32]bool{}
		for i := 0; i < 9; i++ {
			d := s.next(t, shWait)
			if d.GetQueue() != hi || !hiIDs[d.GetId()] {
				t.Fatalf("delivery %d from %s (shard %d) while %s has messages", i, d.GetQueue(), d.GetShard(), hi)
			}
			shardsSeen[d.GetShard()] = true
			shMustAck(t, a.client, d)
		}
		if len(shardsSeen) != 3 {
			t.Fatalf("hi delivered from shards %v", shardsSeen)
		}
		for i := 0; i < 5; i++ {
			d := s.next(t, shWait)
			if d.GetQueue() != lo || d.GetShard() != 0 {
				t.Fatalf("then delivery from %s shard %d; want %s", d.GetQueue(), d.GetShard(), lo)
			}
			shMustAck(t, a.client, d)
		}
	})
}

// ---------------------------------------------------------------------------
// Plain Redis producers

func TestShardLegacyProducers(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q = "legacy"
	shShard(t, in.admin, q, 3, in.client)
	ids := map[string]bool{}
	for i := 0; i < 6; i++ {
		ids[admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("qbridge")}).GetId()] = true
	}
	ctx := ctxT(t, 10*time.Second)
	if err := in.rdb.RPush(ctx, q, "plain-rpush").Err(); err != nil {
		t.Fatal(err)
	}
	if err := in.rdb.LPush(ctx, q, "plain-lpush").Err(); err != nil {
		t.Fatal(err)
	}
	if got := shPerShard(t, in.client, q); !slices.Equal(got, []int64{4, 2, 2}) {
		t.Fatalf("per shard %v; want the plain pushes on shard 0", got)
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4})
	plain := map[string]bool{}
	for i := 0; i < 8; i++ {
		d := s.next(t, shWait)
		if d.GetQueue() != q {
			t.Fatalf("delivery from %q", d.GetQueue())
		}
		if p := string(d.GetPayload()); strings.HasPrefix(p, "plain-") {
			if d.GetShard() != 0 {
				t.Fatalf("plain element %q from shard %d", p, d.GetShard())
			}
			plain[p] = true
		} else if !ids[d.GetId()] {
			t.Fatalf("unknown delivery %s %q", d.GetId(), p)
		}
		shMustAck(t, in.client, d)
	}
	if !plain["plain-rpush"] || !plain["plain-lpush"] {
		t.Fatalf("plain elements delivered: %v", plain)
	}
	// A plain push to the empty shard 0 wakes the idle stream.
	if err := in.rdb.RPush(ctx, q, "plain-late").Err(); err != nil {
		t.Fatal(err)
	}
	if d := s.next(t, shWait); string(d.GetPayload()) != "plain-late" || d.GetShard() != 0 {
		t.Fatalf("late plain push delivered as %q from shard %d", d.GetPayload(), d.GetShard())
	}
}

// ---------------------------------------------------------------------------
// Growing while streams are open

func TestShardGrowWhileConsuming(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	const q, total = "grow-open", 80
	shShard(t, b.admin, q, 2, a.client, b.client)
	fair := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 16})
	prio := consume(t, a.client, &qbridgev1.ConsumeRequest{Queues: []string{q, "grow-open-other"}, MaxInFlight: 4})
	// Both streams are attached (a queue's consumers are in its stats)
	// before the queue grows.
	eventually(t, shWait, "2 consumers", func() bool { return admStats(t, a.client, q).GetConsumers() == 2 })

	shShard(t, b.admin, q, 4, b.client) // a is not waited for
	want := map[string]bool{}
	for i := 0; i < total; i++ {
		want[admEnqueue(t, b.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(itoa(i))}).GetId()] = true
	}
	got := map[string]bool{}
	shards := map[uint32]int{}
	deadline := time.After(shWait)
	for len(got) < total {
		var d *qbridgev1.Delivery
		select {
		case d = <-fair.ch:
		case d = <-prio.ch:
		case <-deadline:
			t.Fatalf("after growing from 2 to 4 shards the streams on the other instance got %d of %d messages, by shard %v; stats %v",
				len(got), total, shards, admStats(t, b.client, q).GetShards())
		}
		if d == nil {
			t.Fatal("a stream ended")
		}
		if !want[d.GetId()] || got[d.GetId()] || d.GetQueue() != q {
			t.Fatalf("delivery %s from %s: unknown or twice", d.GetId(), d.GetQueue())
		}
		got[d.GetId()] = true
		shards[d.GetShard()]++
		shMustAck(t, a.client, d)
	}
	if shards[2] == 0 || shards[3] == 0 {
		t.Fatalf("deliveries by shard %v: none from the new shards", shards)
	}
	shKnows(t, a.client, q, 4)
}

// TestShardPeriodicReload: an instance whose "shards" announcement was
// lost (here: the table is grown behind its back, with no announcement)
// still takes up the new shards at its periodic reload, open streams
// included.
func TestShardPeriodicReload(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	const q = "reload"
	shShard(t, in.admin, q, 2, in.client)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4})
	eventually(t, shWait, "the stream attached", func() bool { return admStats(t, in.client, q).GetConsumers() == 1 })
	names, err := broker.New(in.rdb).GrowShards(ctxT(t, 5*time.Second), q, 3, nil)
	if err != nil || len(names) != 3 {
		t.Fatalf("grow behind the instance's back: %v, %v", names, err)
	}
	if err := in.rdb.RPush(ctxT(t, 5*time.Second), names[2], "on the new shard").Err(); err != nil {
		t.Fatal(err)
	}
	d := s.next(t, shWait) // the reload is every 5 s
	if string(d.GetPayload()) != "on the new shard" || d.GetShard() != 2 || d.GetQueue() != q {
		t.Fatalf("delivery %q from %s shard %d", d.GetPayload(), d.GetQueue(), d.GetShard())
	}
	shMustAck(t, in.client, d)
	shKnows(t, in.client, q, 3)
}

// TestShardCountServedRightAfterUpdate: once UpdateQueueConfig returned,
// the instance that served it serves the queue with the new shards: its
// GetQueueStats right after lists them (and sums over them).
func TestShardCountServedRightAfterUpdate(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	stale := 0
	for round := 0; round < 300; round++ {
		q := fmt.Sprintf("right-after-%d", round)
		shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{Shards: 4})
		if n := len(admStats(t, in.client, q).GetShards()); n != 4 {
			stale++
		}
	}
	if stale > 0 {
		t.Errorf("in %d of 300 rounds, GetQueueStats right after UpdateQueueConfig(shards 4) returned (same instance) did not list the 4 shards", stale)
	}
}

// ---------------------------------------------------------------------------
// Stream end, leases, nacks, retries, delays and dead letters on shards

func TestShardLifecycle(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{serverOpts: []server.Option{server.WithLeaseBounds(30*time.Second, 100*time.Millisecond, time.Hour)}})

	t.Run("stream end returns messages to their own shard", func(t *testing.T) {
		t.Parallel()
		const q = "life-end"
		shShard(t, in.admin, q, 4, in.client)
		for i := 0; i < 8; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(itoa(i))})
		}
		before := shShardsOf(t, in.admin, q, stReady)
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8, LeaseDuration: lease(time.Hour)})
		for _, d := range shTake(t, s, 8) {
			if d.GetShard() != before[d.GetId()] {
				t.Fatalf("%s delivered from shard %d; it was on %d", d.GetId(), d.GetShard(), before[d.GetId()])
			}
		}
		st := admStats(t, in.client, q)
		for _, sh := range st.GetShards() {
			if sh.GetInFlight() != 2 || sh.GetReady() != 0 {
				t.Fatalf("while held: shard %v; want 2 in flight", sh)
			}
		}
		s.cancel()
		eventually(t, shWait, "the ended stream's messages requeued", func() bool {
			st := admStats(t, in.client, q)
			return st.GetReady() == 8 && st.GetInFlight() == 0
		})
		after := shShardsOf(t, in.admin, q, stReady)
		if fmt.Sprint(after) != fmt.Sprint(before) {
			t.Fatalf("after the stream ended the messages are on shards %v; before %v", after, before)
		}
	})

	t.Run("lease expiry, nack requeue, nack retry", func(t *testing.T) {
		t.Parallel()
		const q = "life-lease"
		shShard(t, in.admin, q, 3, in.client)
		keys := shKeyFor(t, in, q, 3)
		idOn := map[uint32]string{}
		for sh := uint32(1); sh < 3; sh++ {
			idOn[sh] = admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x"), OrderingKey: keys[sh]}).GetId()
		}
		shardOf := map[string]uint32{idOn[1]: 1, idOn[2]: 2}
		// Attempt 1, on a stream that takes these two only: not acked; the
		// lease runs out.
		first := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 2, MaxMessages: 2, LeaseDuration: lease(300 * time.Millisecond)})
		for _, d := range shTake(t, first, 2) {
			if d.GetAttempt() != 1 || d.GetShard() != shardOf[d.GetId()] {
				t.Fatalf("first delivery %v", d)
			}
		}
		// Attempt 2, after the lease ran out, on a stream with a long
		// lease (so that a loaded machine cannot let it run out too):
		// from the same shard. ExtendLease takes tokens of two shards.
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 2, LeaseDuration: lease(time.Minute)})
		second := shTake(t, s, 2)
		if _, err := in.client.ExtendLease(ctxT(t, 5*time.Second), &qbridgev1.ExtendLeaseRequest{
			AckTokens: []string{second[0].GetAckToken(), second[1].GetAckToken()}, LeaseDuration: lease(time.Hour)}); err != nil {
			t.Fatalf("extend: %v", err)
		}
		for _, d := range second {
			if d.GetAttempt() != 2 || d.GetShard() != shardOf[d.GetId()] {
				t.Fatalf("delivery after lease expiry: %s attempt %d shard %d; want attempt 2 on shard %d", d.GetId(), d.GetAttempt(), d.GetShard(), shardOf[d.GetId()])
			}
		}
		if c := admStats(t, in.client, q).GetCounters(); c.GetLeaseExpired() != 2 {
			t.Fatalf("lease_expired %d; want 2 (summed over shards)", c.GetLeaseExpired())
		}
		// Nack requeue and nack retry (with a delay: delayed in its shard).
		byID := map[string]*qbridgev1.Delivery{second[0].GetId(): second[0], second[1].GetId(): second[1]}
		rtMustNack(t, in, rtRequeue, nil, "", byID[idOn[1]])
		rtMustNack(t, in, rtRetry, durationpb.New(300*time.Millisecond), "later", byID[idOn[2]])
		for i := 0; i < 2; i++ {
			d := s.next(t, shWait)
			if d.GetShard() != shardOf[d.GetId()] || d.GetAttempt() != 3 {
				t.Fatalf("redelivery of %s: shard %d attempt %d; want shard %d attempt 3", d.GetId(), d.GetShard(), d.GetAttempt(), shardOf[d.GetId()])
			}
			if d.GetId() == idOn[2] && d.GetLastError() != "later" {
				t.Fatalf("retried message's last_error %q", d.GetLastError())
			}
			shMustAck(t, in.client, d)
		}
	})

	t.Run("delayed message on shard 3", func(t *testing.T) {
		t.Parallel()
		const q = "life-delayed"
		shShard(t, in.admin, q, 4, in.client)
		keys := shKeyFor(t, in, q, 4)
		id := admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("later"), OrderingKey: keys[3], Delay: durationpb.New(2 * time.Second)}).GetId()
		at := admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("at"), OrderingKey: keys[2], DeliverAt: timestamppb.New(time.Now().Add(2100 * time.Millisecond))}).GetId()
		delayed := shShardsOf(t, in.admin, q, stDelayed)
		if delayed[id] != 3 || delayed[at] != 2 || len(delayed) != 2 {
			t.Fatalf("peek delayed: %v; want %s on shard 3, %s on 2", delayed, id, at)
		}
		st := admStats(t, in.client, q)
		if st.GetDelayed() != 2 || st.GetShards()[3].GetDelayed() != 1 || st.GetShards()[2].GetDelayed() != 1 {
			t.Fatalf("stats: %v", st)
		}
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4})
		want := map[string]uint32{id: 3, at: 2}
		for i := 0; i < 2; i++ {
			d := s.next(t, shWait)
			if sh, ok := want[d.GetId()]; !ok || d.GetShard() != sh {
				t.Fatalf("delivery %s from shard %d; want %v", d.GetId(), d.GetShard(), want)
			}
			delete(want, d.GetId())
			shMustAck(t, in.client, d)
		}
	})

	t.Run("dead letters", func(t *testing.T) {
		t.Parallel()
		const q = "life-dead"
		shShard(t, in.admin, q, 4, in.client)
		for i := 0; i < 8; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(itoa(i))})
		}
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8, LeaseDuration: lease(time.Hour)})
		shardOf := map[string]uint32{}
		for _, d := range shTake(t, s, 8) {
			shardOf[d.GetId()] = d.GetShard()
			rtMustNack(t, in, rtDeadLetter, nil, "bad "+d.GetId(), d)
		}
		st := admStats(t, in.client, q)
		if st.GetDead() != 8 || st.GetCounters().GetDeadLettered() != 8 {
			t.Fatalf("stats: dead %d, counters %v", st.GetDead(), st.GetCounters())
		}
		for _, sh := range st.GetShards() {
			if sh.GetDead() != 2 {
				t.Fatalf("shard %d has %d dead; want 2", sh.GetShard(), sh.GetDead())
			}
		}
		dead := admPeekAll(t, in.admin, q, stDead)
		if len(dead) != 8 {
			t.Fatalf("peek dead: %d", len(dead))
		}
		for _, m := range dead {
			if m.GetShard() != shardOf[m.GetId()] || m.GetLastError() != "bad "+m.GetId() {
				t.Fatalf("dead letter %s: shard %d, last error %q; delivered from shard %d", m.GetId(), m.GetShard(), m.GetLastError(), shardOf[m.GetId()])
			}
		}
		// Replay by id: one from shard 1, one from shard 3.
		var pick []string
		for _, want := range []uint32{1, 3} {
			for _, m := range dead {
				if m.GetShard() == want {
					pick = append(pick, m.GetId())
					break
				}
			}
		}
		r, err := in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, Ids: pick})
		if err != nil || r.GetReplayed() != 2 {
			t.Fatalf("replay %v: %v, %v", pick, r, err)
		}
		for i := 0; i < 2; i++ {
			d := s.next(t, shWait)
			if !slices.Contains(pick, d.GetId()) || d.GetShard() != shardOf[d.GetId()] {
				t.Fatalf("after replaying %v got %s from shard %d", pick, d.GetId(), d.GetShard())
			}
			shMustAck(t, in.client, d)
		}
		if st := admStats(t, in.client, q); st.GetDead() != 6 || st.GetShards()[1].GetDead() != 1 || st.GetShards()[3].GetDead() != 1 {
			t.Fatalf("after replay by id: %v", st)
		}
		// Delete one by id, replay all the others.
		var del string
		for _, m := range dead {
			if !slices.Contains(pick, m.GetId()) && m.GetShard() == 2 {
				del = m.GetId()
				break
			}
		}
		dr, err := in.admin.DeleteDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.DeleteDeadLettersRequest{Queue: q, Ids: []string{del}})
		if err != nil || dr.GetDeleted() != 1 {
			t.Fatalf("delete %s: %v, %v", del, dr, err)
		}
		r, err = in.admin.ReplayDeadLetters(ctxT(t, 5*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, All: true})
		if err != nil || r.GetReplayed() != 5 {
			t.Fatalf("replay all: %v, %v; want 5", r, err)
		}
		for i := 0; i < 5; i++ {
			d := s.next(t, shWait)
			if d.GetShard() != shardOf[d.GetId()] || d.GetId() == del || slices.Contains(pick, d.GetId()) {
				t.Fatalf("after replay all got %s from shard %d", d.GetId(), d.GetShard())
			}
			shMustAck(t, in.client, d)
		}
		if st := admStats(t, in.client, q); st.GetDead() != 0 || st.GetReady() != 0 || st.GetInFlight() != 0 {
			t.Fatalf("at the end: %v", st)
		}
	})
}

// ---------------------------------------------------------------------------
// Admin calls

func TestShardAdmin(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{serverOpts: []server.Option{server.WithLeaseBounds(30*time.Second, 100*time.Millisecond, time.Hour)}})

	t.Run("list queues", func(t *testing.T) {
		const q = "adm-list"
		shShard(t, in.admin, q, 4, in.client)
		for i := 0; i < 8; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
		}
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 2})
		shTake(t, s, 2) // every shard's dispatcher registered its queue
		admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: "adm-list-plain", Payload: []byte("x")})
		qs := admListAll(t, in.admin)
		n := 0
		for _, name := range qs {
			if strings.Contains(name, broker.ShardSep) {
				t.Errorf("ListQueues lists shard %q", name)
			}
			if name == q {
				n++
			}
		}
		if n != 1 || !slices.Contains(qs, "adm-list-plain") {
			t.Fatalf("ListQueues %v: %s %d times", qs, q, n)
		}
	})

	t.Run("peek pages over the shards", func(t *testing.T) {
		t.Parallel()
		const q = "adm-peek"
		shShard(t, in.admin, q, 5, in.client)
		// Batches without keys, one shard each in turn, of sizes 4, 1, 3
		// and 2: one shard stays empty.
		var all []string
		for _, size := range []int{4, 1, 3, 2} {
			msgs := make([]*qbridgev1.BatchMessage, size)
			for i := range msgs {
				msgs[i] = &qbridgev1.BatchMessage{Payload: []byte(fmt.Sprintf("%d/%d", size, i))}
			}
			r, err := in.client.EnqueueBatch(ctxT(t, 5*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, r.GetIds()...)
		}
		full := admPeek(t, in.admin, &qbridgev1.PeekMessagesRequest{Queue: q, State: stReady, PageSize: 100})
		if len(full.GetMessages()) != 10 || full.GetNextPageToken() != "" {
			t.Fatalf("one big page: %d messages, next %q", len(full.GetMessages()), full.GetNextPageToken())
		}
		per := shPerShard(t, in.client, q)
		// The order: shard 0's messages, then shard 1's...; in a shard,
		// enqueue order.
		var last uint32
		for i, m := range full.GetMessages() {
			if m.GetShard() < last {
				t.Fatalf("message %d from shard %d after shard %d", i, m.GetShard(), last)
			}
			last = m.GetShard()
		}
		for size := uint32(1); size <= 11; size++ {
			var got []*qbridgev1.QueuedMessage
			tok := ""
			pages := 0
			for {
				r := admPeek(t, in.admin, &qbridgev1.PeekMessagesRequest{Queue: q, State: stReady, PageSize: size, PageToken: tok})
				pages++
				if len(r.GetMessages()) > int(size) {
					t.Fatalf("page size %d: a page of %d", size, len(r.GetMessages()))
				}
				if r.GetNextPageToken() != "" && len(r.GetMessages()) < int(size) {
					t.Fatalf("page size %d: a short page (%d) before the end", size, len(r.GetMessages()))
				}
				got = append(got, r.GetMessages()...)
				if tok = r.GetNextPageToken(); tok == "" {
					break
				}
				if pages > 20 {
					t.Fatalf("page size %d: more than 20 pages", size)
				}
			}
			if fmt.Sprint(admIDs(got)) != fmt.Sprint(admIDs(full.GetMessages())) {
				t.Fatalf("page size %d: %v; one page gives %v", size, admIDs(got), admIDs(full.GetMessages()))
			}
			for i, m := range got {
				if m.GetShard() != full.GetMessages()[i].GetShard() {
					t.Fatalf("page size %d: message %s on shard %d, %d in one page", size, m.GetId(), m.GetShard(), full.GetMessages()[i].GetShard())
				}
			}
			if wantPages := max(1, (10+int(size)-1)/int(size)); pages != wantPages {
				t.Errorf("page size %d: %d pages; want %d", size, pages, wantPages)
			}
		}
		ids := admIDs(full.GetMessages())
		slices.Sort(ids)
		slices.Sort(all)
		if !slices.Equal(ids, all) {
			t.Fatalf("peek %v; enqueued %v", ids, all)
		}
		counted := map[uint32]int64{}
		for _, m := range full.GetMessages() {
			counted[m.GetShard()]++
		}
		for i, n := range per {
			if counted[uint32(i)] != n {
				t.Fatalf("peek puts %d on shard %d; stats %d", counted[uint32(i)], i, n)
			}
		}
		// In flight, across shards, in pages of 2.
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 5, LeaseDuration: lease(time.Hour)})
		held := map[string]uint32{}
		for _, d := range shTake(t, s, 5) {
			held[d.GetId()] = d.GetShard()
		}
		if got := shShardsOf(t, in.admin, q, stInFlight); fmt.Sprint(got) != fmt.Sprint(held) {
			t.Fatalf("peek in flight %v; held %v", got, held)
		}
		_, err := in.admin.PeekMessages(ctxT(t, 5*time.Second), &qbridgev1.PeekMessagesRequest{Queue: q, State: stReady, PageToken: "p1.bm9wZQ"})
		wantCode(t, err, codes.InvalidArgument, "page_token")
	})

	t.Run("purge", func(t *testing.T) {
		t.Parallel()
		const q = "adm-purge"
		shShard(t, in.admin, q, 3, in.client)
		keys := shKeyFor(t, in, q, 3)
		for i := 0; i < 7; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
		}
		admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("d"), OrderingKey: keys[2], Delay: durationpb.New(time.Hour)})
		r, err := in.admin.PurgeQueue(ctxT(t, 5*time.Second), &qbridgev1.PurgeQueueRequest{Queue: q})
		if err != nil || r.GetPurged() != 8 {
			t.Fatalf("purge: %v, %v; want 8", r, err)
		}
		admWantCounts(t, in.client, q, admCounts{})
		for _, sh := range admStats(t, in.client, q).GetShards() {
			if sh.GetReady() != 0 || sh.GetDelayed() != 0 {
				t.Fatalf("after purge shard %v", sh)
			}
		}
		for _, name := range shTable(t, in.rdb, q) {
			if _, err := in.rdb.ZScore(ctxT(t, 5*time.Second), broker.NewKeys("").Due(), name).Result(); err != redis.Nil {
				t.Errorf("the due index still has %s after the purge (%v)", name, err)
			}
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		t.Parallel()
		const q = "adm-pause"
		shShard(t, in.admin, q, 2, in.client)
		if _, err := in.admin.PauseQueue(ctxT(t, 5*time.Second), &qbridgev1.PauseQueueRequest{Queue: q}); err != nil {
			t.Fatal(err)
		}
		// Shards added while paused are paused.
		shShard(t, in.admin, q, 4, in.client)
		k := broker.NewKeys("")
		for _, name := range shTable(t, in.rdb, q) {
			if n, err := in.rdb.Exists(ctxT(t, 5*time.Second), k.Paused(name)).Result(); err != nil || n != 1 {
				t.Errorf("shard %s is not paused (%v)", name, err)
			}
		}
		for i := 0; i < 8; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
		}
		if got := shPerShard(t, in.client, q); !slices.Equal(got, []int64{2, 2, 2, 2}) {
			t.Fatalf("per shard %v", got)
		}
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 16})
		admQuiet(t, 300*time.Millisecond, s)
		admWantCounts(t, in.client, q, admCounts{ready: 8, paused: true})
		if _, err := in.admin.ResumeQueue(ctxT(t, 5*time.Second), &qbridgev1.ResumeQueueRequest{Queue: q}); err != nil {
			t.Fatal(err)
		}
		seen := map[uint32]int{}
		for _, d := range shTake(t, s, 8) {
			seen[d.GetShard()]++
			shMustAck(t, in.client, d)
		}
		if len(seen) != 4 {
			t.Fatalf("after resume, deliveries by shard %v", seen)
		}
		for _, name := range shTable(t, in.rdb, q) {
			if n, _ := in.rdb.Exists(ctxT(t, 5*time.Second), k.Paused(name)).Result(); n != 0 {
				t.Errorf("shard %s still paused", name)
			}
		}
	})

	t.Run("delete", func(t *testing.T) {
		t.Parallel()
		const q = "adm-delete"
		shShard(t, in.admin, q, 4, in.client)
		shConfigure(t, in.admin, q, &qbridgev1.QueueConfig{RetryPolicy: &qbridgev1.RetryPolicy{MaxAttempts: 5}})
		keys := shKeyFor(t, in, q, 4)
		// In flight only on shard 2; ready, delayed and dead elsewhere.
		admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("held"), OrderingKey: keys[2]})
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Hour)})
		held := s.next(t, shWait)
		if held.GetShard() != 2 {
			t.Fatalf("held message from shard %d", held.GetShard())
		}
		dead := admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("dead"), OrderingKey: keys[3]}).GetId()
		s2 := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1})
		if d := s2.next(t, shWait); d.GetId() != dead {
			t.Fatalf("got %s", d.GetId())
		} else {
			rtMustNack(t, in, rtDeadLetter, nil, "", d)
		}
		s2.cancel()
		if err := s2.err(t, shWait); status.Code(err) != codes.Canceled {
			t.Fatalf("stream end: %v", err)
		}
		admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("later"), OrderingKey: keys[1], Delay: durationpb.New(time.Hour)})
		for i := 0; i < 4; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("ready")})
		}
		if _, err := in.admin.PauseQueue(ctxT(t, 5*time.Second), &qbridgev1.PauseQueueRequest{Queue: q}); err != nil {
			t.Fatal(err)
		}
		full := admCounts{ready: 4, inFlight: 1, delayed: 1, dead: 1, paused: true}
		admWantCounts(t, in.client, q, full)
		keysBefore := shKeysOf(t, in.rdb, q)
		if len(keysBefore) < 20 {
			t.Fatalf("setup: only keys %v", keysBefore)
		}

		_, err := in.admin.DeleteQueue(ctxT(t, 5*time.Second), &qbridgev1.DeleteQueueRequest{Queue: q})
		wantCode(t, err, codes.FailedPrecondition, "in flight")
		if got := shKeysOf(t, in.rdb, q); !slices.Equal(got, keysBefore) {
			t.Fatalf("a refused delete changed the keys: %v; before %v", got, keysBefore)
		}
		admWantCounts(t, in.client, q, full)
		if got := len(shTable(t, in.rdb, q)); got != 4 {
			t.Fatalf("a refused delete left %d shards in the table", got)
		}

		if _, err := in.admin.DeleteQueue(ctxT(t, 5*time.Second), &qbridgev1.DeleteQueueRequest{Queue: q, Force: true}); err != nil {
			t.Fatal(err)
		}
		// Every key of the queue and of its shards is gone but the lease
		// id counters (never reset, so that old tokens cannot touch new
		// deliveries); the shard table keeps the queue's shards (shards are
		// never removed: an instance that had not heard of the removal
		// would enqueue to a shard nobody reads).
		for _, key := range shKeysOf(t, in.rdb, q) {
			if !strings.HasSuffix(key, ":qb:seq") {
				t.Errorf("key %s left after a forced delete", key)
			}
		}
		if got := len(shTable(t, in.rdb, q)); got != 4 {
			t.Errorf("after the delete the shard table has %d shards of %s; want 4", got, q)
		}
		for i := 0; i < 4; i++ {
			name := q
			if i > 0 {
				name = fmt.Sprintf("%s#%d", q, i)
			}
			if ok, _ := in.rdb.SIsMember(ctxT(t, 5*time.Second), broker.NewKeys("").Queues(), name).Result(); ok {
				t.Errorf("%s still registered", name)
			}
			if _, err := in.rdb.ZScore(ctxT(t, 5*time.Second), broker.NewKeys("").Due(), name).Result(); err != redis.Nil {
				t.Errorf("%s still in the due index (%v)", name, err)
			}
		}
		if slices.Contains(admListAll(t, in.admin), q) {
			t.Error("the deleted queue is listed")
		}
		_, err = in.admin.GetQueueConfig(ctxT(t, 5*time.Second), &qbridgev1.GetQueueConfigRequest{Queue: q})
		wantCode(t, err, codes.NotFound, "")
		wantCode(t, ack(t, in.client, held), codes.FailedPrecondition, "no longer hold a lease")

		// Recreated: with its shards, and the default policy.
		shKnows(t, in.client, q, 4)
		for i := 0; i < 3; i++ {
			admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("new")})
		}
		if cfg := shGetConfig(t, in.admin, q); cfg.GetShards() != 4 || cfg.GetRetryPolicy().GetMaxAttempts() == 5 {
			t.Fatalf("recreated queue's config %v; want 4 shards and the default policy", cfg)
		}
		s.cancel()
		s3 := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8})
		for _, d := range shTake(t, s3, 3) {
			if string(d.GetPayload()) != "new" {
				t.Fatalf("recreated queue delivers %q from shard %d", d.GetPayload(), d.GetShard())
			}
			shMustAck(t, in.client, d)
		}
		admWantCounts(t, in.client, q, admCounts{})
	})
}

// TestShardEnqueueRightAfterDelete: messages enqueued right after a
// sharded queue was deleted (once DeleteQueue returned), through any
// instance, land in shards that exist and are read: DeleteQueue keeps the
// queue's shards (a regression test: it used to drop them from the table,
// and an instance that had not yet heard of it put messages into shards
// nothing read).
func TestShardEnqueueRightAfterDelete(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})
	for _, tc := range []struct {
		name   string
		via    *instance
		rounds int
	}{{"through the deleting instance", a, 100}, {"through another instance", b, 40}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rounds := tc.rounds
			var lost []string
			for round := 0; round < rounds; round++ {
				q := fmt.Sprintf("del-then-enqueue-%s-%d", tc.via.addr, round)
				q = strings.NewReplacer(":", "-", ".", "-").Replace(q)
				shShard(t, a.admin, q, 4, a.client, b.client)
				admEnqueue(t, a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("old")})
				if _, err := a.admin.DeleteQueue(ctxT(t, 5*time.Second), &qbridgev1.DeleteQueueRequest{Queue: q}); err != nil {
					t.Fatal(err)
				}
				var ids []string
				for i := 0; i < 4; i++ {
					ids = append(ids, admEnqueue(t, tc.via.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("new")}).GetId())
				}
				shKnows(t, a.client, q, 4)
				shKnows(t, b.client, q, 4)
				missing := 0
				for _, id := range ids {
					_, err := a.client.GetMessage(ctxT(t, 5*time.Second), &qbridgev1.GetMessageRequest{Queue: q, Id: id})
					if status.Code(err) == codes.NotFound {
						missing++
					} else if err != nil {
						t.Fatal(err)
					}
				}
				if r := admStats(t, a.client, q).GetReady(); r != int64(4-missing) {
					t.Fatalf("round %d: stats count %d ready, GetMessage finds %d", round, r, 4-missing)
				}
				if missing > 0 {
					lost = append(lost, fmt.Sprintf("round %d: %d of 4 lost, keys left %v", round, missing, shKeysOf(t, a.rdb, q)))
				}
			}
			if len(lost) > 0 {
				t.Errorf("messages enqueued right after DeleteQueue returned are lost (in shards the table no longer has) in %d of %d rounds; first: %s",
					len(lost), rounds, lost[0])
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Results

func TestShardResults(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{})
	b := startInstance(t, rs, instanceConfig{})

	t.Run("get result waits for an ack on any shard", func(t *testing.T) {
		t.Parallel()
		const q = "res-wait"
		shShard(t, a.admin, q, 3, a.client, b.client)
		keys := shKeyFor(t, a, q, 3)
		var ids []string
		for sh := 0; sh < 3; sh++ {
			ids = append(ids, admEnqueue(t, a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("job"), OrderingKey: keys[sh]}).GetId())
		}
		type answer struct {
			r   *qbridgev1.GetResultResponse
			err error
		}
		answers := make([]chan answer, len(ids))
		for i, id := range ids {
			answers[i] = make(chan answer, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				r, err := b.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: q, Id: id, Wait: durationpb.New(15 * time.Second)})
				answers[i] <- answer{r, err}
			}()
		}
		for i := range ids {
			select {
			case ans := <-answers[i]:
				t.Fatalf("GetResult of %s answered before any ack: %v, %v", ids[i], ans.r, ans.err)
			default:
			}
		}
		s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 3})
		shardOf := map[string]uint32{}
		for _, d := range shTake(t, s, 3) {
			shardOf[d.GetId()] = d.GetShard()
			if _, err := a.client.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()},
				Results: map[string][]byte{d.GetAckToken(): []byte("result of " + d.GetId())}}); err != nil {
				t.Fatal(err)
			}
		}
		for i, id := range ids {
			ans := <-answers[i]
			if ans.err != nil || ans.r.GetState() != qbridgev1.ResultState_RESULT_STATE_SUCCEEDED || string(ans.r.GetResult()) != "result of "+id {
				t.Fatalf("GetResult of %s (shard %d): %v, %v", id, shardOf[id], ans.r, ans.err)
			}
		}
		if len(map[uint32]bool{shardOf[ids[0]]: true, shardOf[ids[1]]: true, shardOf[ids[2]]: true}) != 3 {
			t.Fatalf("the messages were not on 3 shards: %v", shardOf)
		}
	})

	t.Run("get message and get result in every state", func(t *testing.T) {
		t.Parallel()
		const q = "res-states"
		shShard(t, a.admin, q, 3, a.client, b.client)
		keys := shKeyFor(t, a, q, 3)
		s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1, LeaseDuration: lease(time.Hour)})
		enq := func(req *qbridgev1.EnqueueRequest) string {
			req.Queue = q
			return admEnqueue(t, a.client, req).GetId()
		}
		dead := enq(&qbridgev1.EnqueueRequest{Payload: []byte("d"), OrderingKey: keys[1], KeepResult: true})
		if d := s.next(t, shWait); d.GetId() != dead || d.GetShard() != 1 {
			t.Fatalf("got %s from %d", d.GetId(), d.GetShard())
		} else {
			rtMustNack(t, a, rtDeadLetter, nil, "broken", d)
		}
		failed := enq(&qbridgev1.EnqueueRequest{Payload: []byte("x"), OrderingKey: keys[2], KeepResult: true})
		if d := s.next(t, shWait); d.GetId() != failed || d.GetShard() != 2 {
			t.Fatalf("got %s from %d", d.GetId(), d.GetShard())
		} else {
			rtMustNack(t, a, rtDrop, nil, "dropped", d)
		}
		kept := enq(&qbridgev1.EnqueueRequest{Payload: []byte("k"), OrderingKey: keys[2], KeepResult: true})
		if d := s.next(t, shWait); d.GetId() != kept || d.GetShard() != 2 {
			t.Fatalf("got %s from %d", d.GetId(), d.GetShard())
		} else {
			shMustAck(t, a.client, d)
		}
		flying := enq(&qbridgev1.EnqueueRequest{Payload: []byte("f"), OrderingKey: keys[2]})
		if d := s.next(t, shWait); d.GetId() != flying || d.GetShard() != 2 {
			t.Fatalf("got %s from %d", d.GetId(), d.GetShard())
		}
		ready := enq(&qbridgev1.EnqueueRequest{Payload: []byte("r"), OrderingKey: keys[1]})
		delayed := enq(&qbridgev1.EnqueueRequest{Payload: []byte("l"), OrderingKey: keys[2], Delay: durationpb.New(time.Hour)})
		ready0 := enq(&qbridgev1.EnqueueRequest{Payload: []byte("r0"), OrderingKey: keys[0]})
		for _, tc := range []struct {
			id    string
			state qbridgev1.MessageState
		}{
			{dead, stDead},
			{kept, qbridgev1.MessageState_MESSAGE_STATE_SUCCEEDED},
			{failed, qbridgev1.MessageState_MESSAGE_STATE_FAILED},
			{flying, stInFlight},
			{ready, stReady},
			{ready0, stReady},
			{delayed, stDelayed},
		} {
			for _, in := range []*instance{a, b} {
				r, err := in.client.GetMessage(ctxT(t, 5*time.Second), &qbridgev1.GetMessageRequest{Queue: q, Id: tc.id})
				if err != nil || r.GetState() != tc.state || r.GetId() != tc.id {
					t.Errorf("GetMessage(%s) = %v, %v; want %v", tc.id, r, err, tc.state)
				}
			}
		}
		r, err := b.client.GetResult(ctxT(t, 5*time.Second), &qbridgev1.GetResultRequest{Queue: q, Id: dead})
		if err != nil || r.GetState() != qbridgev1.ResultState_RESULT_STATE_DEAD || r.GetError() != "broken" {
			t.Errorf("GetResult of the dead letter: %v, %v", r, err)
		}
		r, err = b.client.GetResult(ctxT(t, 5*time.Second), &qbridgev1.GetResultRequest{Queue: q, Id: failed})
		if err != nil || r.GetState() != qbridgev1.ResultState_RESULT_STATE_FAILED || r.GetError() != "dropped" {
			t.Errorf("GetResult of the dropped message: %v, %v", r, err)
		}
		r, err = b.client.GetResult(ctxT(t, 5*time.Second), &qbridgev1.GetResultRequest{Queue: q, Id: kept})
		if err != nil || r.GetState() != qbridgev1.ResultState_RESULT_STATE_SUCCEEDED {
			t.Errorf("GetResult of the kept result: %v, %v", r, err)
		}
		_, err = b.client.GetMessage(ctxT(t, 5*time.Second), &qbridgev1.GetMessageRequest{Queue: q, Id: "never"})
		wantCode(t, err, codes.NotFound, "")
		_, err = b.client.GetResult(ctxT(t, 5*time.Second), &qbridgev1.GetResultRequest{Queue: q, Id: ready, Wait: durationpb.New(200 * time.Millisecond)})
		wantCode(t, err, codes.NotFound, "")
	})
}

// ---------------------------------------------------------------------------
// Ack tokens of shards

func TestShardAckTokens(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{serverOpts: []server.Option{server.WithLeaseBounds(30*time.Second, 100*time.Millisecond, time.Hour)}})
	const q = "tokens"
	shShard(t, in.admin, q, 3, in.client)
	for i := 0; i < 6; i++ {
		admEnqueue(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 6, LeaseDuration: lease(time.Second)})
	ds := shTake(t, s, 6)
	var toks []string
	byShard := map[uint32][]*qbridgev1.Delivery{}
	for _, d := range ds {
		tq, _, _, _ := shParseToken(t, d.GetAckToken())
		want := q
		if d.GetShard() > 0 {
			want = fmt.Sprintf("%s#%d", q, d.GetShard())
		}
		if tq != want || d.GetQueue() != q {
			t.Fatalf("delivery from %s shard %d has a token naming %q; want %q", d.GetQueue(), d.GetShard(), tq, want)
		}
		toks = append(toks, d.GetAckToken())
		byShard[d.GetShard()] = append(byShard[d.GetShard()], d)
	}
	if len(byShard) != 3 {
		t.Fatalf("deliveries by shard %v", byShard)
	}

	// ExtendLease of tokens of every shard in one call: the 1 s leases
	// become an hour, so none runs out below.
	t0 := time.Now()
	er, err := in.client.ExtendLease(ctxT(t, 5*time.Second), &qbridgev1.ExtendLeaseRequest{AckTokens: toks, LeaseDuration: lease(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	admNear(t, "lease deadline", er.GetLeaseDeadline(), t0.Add(time.Hour), 5*time.Second)
	for _, m := range admPeekAll(t, in.admin, q, stInFlight) {
		admNear(t, "in-flight deadline of "+m.GetId(), m.GetLeaseDeadline(), t0.Add(time.Hour), 5*time.Second)
	}

	// Hand-made tokens: a malformed shard is refused as invalid by every
	// call that takes tokens; a well-formed token naming another shard (or
	// another queue's) than the one that holds the lease settles nothing.
	orig := byShard[1][0]
	_, lease1, inst, cons := shParseToken(t, orig.GetAckToken())
	for _, bad := range []string{q + "#junk", q + "#", q + "#0", q + "#01", q + "#256", q + "#-1", q + "#1#2", "#1", "tok{x}#1"} {
		tok := shToken(bad, lease1, inst, cons)
		_, err := in.client.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: []string{tok}})
		wantCode(t, err, codes.InvalidArgument, "ack_tokens[0]")
		_, err = in.client.Nack(ctxT(t, 5*time.Second), &qbridgev1.NackRequest{AckTokens: []string{tok}})
		wantCode(t, err, codes.InvalidArgument, "ack_tokens[0]")
		_, err = in.client.ExtendLease(ctxT(t, 5*time.Second), &qbridgev1.ExtendLeaseRequest{AckTokens: []string{tok}})
		wantCode(t, err, codes.InvalidArgument, "ack_tokens[0]")
	}
	// (Lease ids are counted per shard, so only shards that hand out no
	// such lease make a stale token here.)
	for _, other := range []string{q + "#7", "tokens-other#1"} {
		tok := shToken(other, lease1, inst, cons)
		_, err := in.client.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: []string{tok}})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("a token naming %s with the lease of a delivery of %s#1: %v; want FAILED_PRECONDITION", other, q, err)
		}
	}
	if st := admStats(t, in.client, q); st.GetInFlight() != 6 || st.GetCounters().GetAcked() != 0 {
		t.Fatalf("after the forged tokens: in flight %d, acked %d", st.GetInFlight(), st.GetCounters().GetAcked())
	}

	// Nack one of shard 1 and one of shard 2: back in their shards.
	nacked := []*qbridgev1.Delivery{byShard[1][0], byShard[2][0]}
	rtMustNack(t, in, rtRequeue, nil, "", nacked...)
	again := shTake(t, s, 2)
	for _, d := range again {
		var was *qbridgev1.Delivery
		for _, n := range nacked {
			if n.GetId() == d.GetId() {
				was = n
			}
		}
		if was == nil || d.GetShard() != was.GetShard() {
			t.Fatalf("after the nack got %s from shard %d", d.GetId(), d.GetShard())
		}
	}
	// Ack everything held, of all shards, in one call; the nacked tokens
	// are stale.
	rest := append([]*qbridgev1.Delivery{byShard[0][0], byShard[0][1], byShard[1][1], byShard[2][1]}, again...)
	var restToks []string
	for _, d := range rest {
		restToks = append(restToks, d.GetAckToken())
	}
	ar, err := in.client.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: restToks})
	if err != nil || ar.GetAcked() != 6 {
		t.Fatalf("ack of 6 across shards: %v, %v", ar, err)
	}
	wantCode(t, ack(t, in.client, nacked[0]), codes.FailedPrecondition, "no longer hold a lease")
	admWantCounts(t, in.client, q, admCounts{})
	if c := admStats(t, in.client, q).GetCounters(); c.GetAcked() != 6 || c.GetNacked() != 2 {
		t.Fatalf("counters %v", c)
	}
}

// ---------------------------------------------------------------------------
// Redis Cluster

func TestShardCluster(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	tp := clusterTopology(t, c)
	a, b := startOn(t, tp, nil), startOn(t, tp, nil)
	k := broker.NewKeys("")

	mastersOf := func(t *testing.T, q string) map[int]int {
		t.Helper()
		per := map[int]int{}
		for _, name := range shTable(t, tp.admin, q) {
			per[c.MasterOf(t, k.Ready(name))]++
		}
		return per
	}

	t.Run("placement", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			q         string
			steps     []uint32
			perMaster int
		}{
			{"place-3", []uint32{3}, 1},
			{"place-6", []uint32{6}, 2},
			{"place-6-by-one", []uint32{2, 3, 4, 5, 6}, 2},
			{"place-9-from-3", []uint32{3, 9}, 3},
		} {
			for _, n := range tc.steps {
				shConfigure(t, a.admin, tc.q, &qbridgev1.QueueConfig{Shards: n})
				per := mastersOf(t, tc.q)
				lo, hi := int(n), 0
				for m := 0; m < redistest.ClusterSize; m++ {
					lo, hi = min(lo, per[m]), max(hi, per[m])
				}
				if hi-lo > 1 {
					t.Errorf("%s with %d shards: shards per master %v", tc.q, n, per)
				}
			}
			per := mastersOf(t, tc.q)
			for m := 0; m < redistest.ClusterSize; m++ {
				if per[m] != tc.perMaster {
					t.Errorf("%s: shards per master %v; want %d on each", tc.q, per, tc.perMaster)
				}
			}
			for i, name := range shTable(t, tp.admin, tc.q) {
				if sh, ok := broker.ShardIndex(name); !ok || sh != i || broker.Logical(name) != tc.q {
					t.Errorf("shard %d is named %q (index %d, %v)", i, name, sh, ok)
				}
			}
		}
	})

	t.Run("slots", func(t *testing.T) {
		t.Parallel()
		const q = "slots-6"
		shConfigure(t, a.admin, q, &qbridgev1.QueueConfig{Shards: 6})
		ctx := ctxT(t, 10*time.Second)
		slots := map[int64]string{}
		for _, name := range shTable(t, tp.admin, q) {
			want, err := tp.admin.ClusterKeySlot(ctx, k.Ready(name)).Result()
			if err != nil {
				t.Fatal(err)
			}
			if int(want) != broker.Slot(k.Ready(name)) {
				t.Errorf("broker.Slot(%q) = %d; CLUSTER KEYSLOT %d", k.Ready(name), broker.Slot(k.Ready(name)), want)
			}
			for _, key := range queueKeys(k, name) {
				got, err := tp.admin.ClusterKeySlot(ctx, key).Result()
				if err != nil || got != want {
					t.Errorf("shard %s: key %s in slot %d (%v); its ready list in %d", name, key, got, err, want)
				}
			}
			if other, dup := slots[want]; dup {
				t.Errorf("shards %s and %s share slot %d", other, name, want)
			}
			slots[want] = name
		}
	})

	t.Run("produce and consume through two instances", func(t *testing.T) {
		t.Parallel()
		const q, n, total = "cluster-cycle", 3, 300
		shShard(t, a.admin, q, n, a.client, b.client)
		want := map[string]bool{}
		for i := 0; i < total/10; i++ {
			via := a.client
			if i%2 == 1 {
				via = b.client
			}
			msgs := make([]*qbridgev1.BatchMessage, 10)
			for j := range msgs {
				msgs[j] = &qbridgev1.BatchMessage{Payload: []byte("x")}
			}
			r, err := via.EnqueueBatch(ctxT(t, 10*time.Second), &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range r.GetIds() {
				want[id] = true
			}
		}
		st := fullStats(t, a.client, q)
		names := shTable(t, tp.admin, q)
		for i, sh := range st.GetShards() {
			if sh.GetList() != names[i] || sh.GetReady() != total/n {
				t.Fatalf("shard %d: %v; want list %s with %d", i, sh, names[i], total/n)
			}
		}
		sa := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8})
		sb := consume(t, b.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 8})
		got := map[string]bool{}
		shards := map[uint32]bool{}
		deadline := time.After(30 * time.Second)
		for len(got) < total {
			var d *qbridgev1.Delivery
			via := a.client
			select {
			case d = <-sa.ch:
			case d = <-sb.ch:
				via = b.client
			case <-deadline:
				t.Fatalf("got %d of %d", len(got), total)
			}
			if d == nil {
				t.Fatal("a stream ended")
			}
			if got[d.GetId()] || !want[d.GetId()] || d.GetQueue() != q {
				t.Fatalf("delivery %s from %s: twice or unknown", d.GetId(), d.GetQueue())
			}
			got[d.GetId()] = true
			shards[d.GetShard()] = true
			shMustAck(t, via, d)
		}
		if len(shards) != n {
			t.Fatalf("deliveries from shards %v", shards)
		}
		waitSettled(t, b.client, q)
		if st := fullStats(t, b.client, q); st.GetCounters().GetAcked() != total || st.GetCounters().GetEnqueued() != total {
			t.Fatalf("counters %v", st.GetCounters())
		}
	})

	t.Run("delays, dead letters and growth", func(t *testing.T) {
		t.Parallel()
		const q = "cluster-life"
		shShard(t, a.admin, q, 3, a.client, b.client)
		s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 16})
		for i := 0; i < 6; i++ {
			enqueueOne(t, b.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("later"), Delay: durationpb.New(200 * time.Millisecond)})
		}
		shardOf := map[string]uint32{}
		for _, d := range shTake(t, s, 6) {
			shardOf[d.GetId()] = d.GetShard()
			nackOne(t, b.client, d, qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER, 0, "dead")
		}
		st := fullStats(t, a.client, q)
		if st.GetDead() != 6 {
			t.Fatalf("dead %d", st.GetDead())
		}
		for _, sh := range st.GetShards() {
			if sh.GetDead() != 2 {
				t.Fatalf("shard %v; want 2 dead", sh)
			}
		}
		r, err := b.admin.ReplayDeadLetters(ctxT(t, 10*time.Second), &qbridgev1.ReplayDeadLettersRequest{Queue: q, All: true})
		if err != nil || r.GetReplayed() != 6 {
			t.Fatalf("replay: %v, %v", r, err)
		}
		for _, d := range shTake(t, s, 6) {
			if d.GetShard() != shardOf[d.GetId()] {
				t.Fatalf("replayed %s from shard %d; it died on %d", d.GetId(), d.GetShard(), shardOf[d.GetId()])
			}
			shMustAck(t, a.client, d)
		}
		// Grown through b while a's stream is open.
		shShard(t, b.admin, q, 6, b.client)
		seen := map[uint32]bool{}
		for i := 0; i < 12; i++ {
			enqueueOne(t, b.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
		}
		for _, d := range shTake(t, s, 12) {
			seen[d.GetShard()] = true
			shMustAck(t, a.client, d)
		}
		if len(seen) != 6 {
			t.Fatalf("after growing to 6, deliveries from shards %v", seen)
		}
		waitSettled(t, a.client, q)
	})

	t.Run("a token naming a malformed shard is refused", func(t *testing.T) {
		t.Parallel()
		const q = "cluster-token"
		shShard(t, a.admin, q, 2, a.client)
		enqueueOne(t, a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
		s := consume(t, a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1})
		d := s.next(t, shWait)
		_, leaseID, inst, cons := shParseToken(t, d.GetAckToken())
		// Suffixes that Enqueue never makes; with a brace the shard's
		// keys would span two slots.
		for _, bad := range []string{q + "#1.}", q + "#1.{x}", q + "#1.0}"} {
			_, err := a.client.Ack(ctxT(t, 10*time.Second), &qbridgev1.AckRequest{AckTokens: []string{shToken(bad, leaseID, inst, cons)}})
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("Ack of a token naming %q: %v; want INVALID_ARGUMENT", bad, err)
			}
		}
		shMustAck(t, a.client, d)
	})
}
