package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Sharded queues
//
// A queue Q declared with N shards is N queues of the ordinary layout
// (keys.go): shard 0 is Q itself, so a plain Redis client's LPUSH to Q, an
// instance that has not yet heard of the sharding, and the queue's history
// before it was sharded all land in a shard that is drained like the others;
// shard i > 0 is the queue "Q#<suffix i>" ('#' cannot appear in a queue
// name, so no client queue can collide with a shard). Every script still
// runs on one shard, in one slot.
//
// The suffixes are stored in the hash "P qbridge:shards" (field Q, value the
// suffixes of shards 1..N-1, space-separated), so every instance agrees on
// the names. On Redis Cluster a suffix is "<i>.<salt>", the salt chosen so
// that the shard's slot is served by the master holding the fewest of Q's
// shards when the shard is created: shards spread over the masters instead
// of wherever their hashes fall. Elsewhere the suffix is just "<i>".
//
// Shards are only ever added, and stay in the table when the queue is
// deleted. An instance with a stale view of a queue's shards therefore only
// ever uses shards that exist and are drained.

// ShardSep separates a sharded queue's name from a shard's suffix.
const ShardSep = "#"

// MaxShards bounds a queue's shard count.
const MaxShards = 256

// Logical returns the queue a physical queue name belongs to: q itself for
// an unsharded queue or shard 0, the part before ShardSep for other shards.
func Logical(physical string) string {
	if i := strings.IndexByte(physical, ShardSep[0]); i >= 0 {
		return physical[:i]
	}
	return physical
}

// ShardIndex returns the shard number of a physical queue name (0 for a
// queue's own name), and false when the suffix is malformed.
func ShardIndex(physical string) (int, bool) {
	i := strings.IndexByte(physical, ShardSep[0])
	if i < 0 {
		return 0, true
	}
	num, salt, salted := strings.Cut(physical[i+1:], ".")
	n, err := strconv.Atoi(num)
	if err != nil || n < 1 || n >= MaxShards || strconv.Itoa(n) != num {
		return 0, false
	}
	if salted {
		if v, err := strconv.Atoi(salt); err != nil || v < 0 || strconv.Itoa(v) != salt {
			return 0, false
		}
	}
	return n, true
}

// ShrinkError means a request would remove shards, which qbridge never does.
type ShrinkError struct {
	Queue     string
	Have, Ask int
}

func (e *ShrinkError) Error() string {
	return fmt.Sprintf("queue %q has %d shards and shards are never removed (their messages would be stranded), so it cannot have %d", e.Queue, e.Have, e.Ask)
}

// parseShards turns a stored suffix list into the physical names of every
// shard of queue q, shard 0 first.
func parseShards(q, stored string) []string {
	names := []string{q}
	for _, s := range strings.Fields(stored) {
		names = append(names, q+ShardSep+s)
	}
	return names
}

// Shards returns every sharded queue's physical shard names (shard 0, the
// queue's own name, first). Unsharded queues are absent.
func (b *Broker) Shards(ctx context.Context) (map[string][]string, error) {
	m, err := b.rdb.HGetAll(ctx, b.keys.Shards()).Result()
	if err != nil {
		return nil, wrap(err, "read shard table")
	}
	out := make(map[string][]string, len(m))
	for q, v := range m {
		if names := parseShards(q, v); len(names) > 1 {
			out[q] = names
		}
	}
	return out, nil
}

// QueueShards returns the physical names of queue q's shards ([q] when it is
// not sharded).
func (b *Broker) QueueShards(ctx context.Context, q string) ([]string, error) {
	v, err := b.rdb.HGet(ctx, b.keys.Shards(), q).Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, wrap(err, "read shards of %q", q)
	}
	return parseShards(q, v), nil
}

// GrowShards makes queue q have n shards, adding the missing ones, and
// returns the physical names of all of them. Asking for fewer shards than q
// has is a *ShrinkError. prepare, if not nil, is called with the names of
// the new shards before they are published in the table (to give them the
// queue's config, say). Concurrent calls agree: the table is updated by a
// compare-and-set, retried on conflict.
func (b *Broker) GrowShards(ctx context.Context, q string, n int, prepare func(more []string) error) ([]string, error) {
	if n < 1 || n > MaxShards {
		return nil, fmt.Errorf("%d shards: a queue has 1 to %d", n, MaxShards)
	}
	for attempt := 0; attempt < 10; attempt++ {
		v, err := b.rdb.HGet(ctx, b.keys.Shards(), q).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			return nil, wrap(err, "read shards of %q", q)
		}
		have := parseShards(q, v)
		switch {
		case n == len(have):
			return have, nil
		case n < len(have):
			return have, &ShrinkError{Queue: q, Have: len(have), Ask: n}
		}
		more, err := b.placeShards(ctx, have, n)
		if err != nil {
			return nil, err
		}
		if prepare != nil {
			if err := prepare(more); err != nil {
				return nil, err
			}
		}
		suffixes := strings.Fields(v)
		for _, name := range more {
			suffixes = append(suffixes, name[len(q)+1:])
		}
		ok, err := growShardsScript.Run(ctx, b.rdb, []string{b.keys.Shards()}, q, v, strings.Join(suffixes, " ")).Int()
		if err != nil {
			return nil, wrap(err, "store shards of %q", q)
		}
		if ok == 1 {
			return append(have, more...), nil
		}
	}
	return nil, fmt.Errorf("shards of %q: too many concurrent changes; retry", q)
}

// placeShards names the shards len(have)..n-1 of the queue have[0].
func (b *Broker) placeShards(ctx context.Context, have []string, n int) ([]string, error) {
	q := have[0]
	cc, ok := b.rdb.(*redis.ClusterClient)
	if !ok {
		more := make([]string, 0, n-len(have))
		for i := len(have); i < n; i++ {
			more = append(more, q+ShardSep+strconv.Itoa(i))
		}
		return more, nil
	}
	slots, err := cc.ClusterSlots(ctx).Result()
	if err != nil {
		return nil, wrap(err, "read the cluster's slot map")
	}
	owner := make([]string, SlotCount)
	load := map[string]int{}
	var masters []string
	for _, r := range slots {
		if len(r.Nodes) == 0 {
			continue
		}
		addr := r.Nodes[0].Addr
		if _, seen := load[addr]; !seen {
			load[addr] = 0
			masters = append(masters, addr)
		}
		for s := r.Start; s <= r.End && s < SlotCount; s++ {
			owner[s] = addr
		}
	}
	if len(masters) == 0 {
		return nil, errors.New("the cluster reports no slots: is it set up?")
	}
	slices.Sort(masters)
	for _, name := range have {
		if a := owner[Slot(b.keys.Ready(name))]; a != "" {
			load[a]++
		}
	}
	var more []string
	for i := len(have); i < n; i++ {
		target := masters[0]
		for _, m := range masters[1:] {
			if load[m] < load[target] {
				target = m
			}
		}
		name := ""
		for salt := 0; salt < 1<<16; salt++ {
			try := q + ShardSep + strconv.Itoa(i) + "." + strconv.Itoa(salt)
			if owner[Slot(b.keys.Ready(try))] == target {
				name = try
				break
			}
		}
		if name == "" { // a master with a sliver of the slots: take any
			name = q + ShardSep + strconv.Itoa(i) + ".0"
			target = owner[Slot(b.keys.Ready(name))]
		}
		load[target]++
		more = append(more, name)
	}
	return more, nil
}

// DedupLookup returns the id of the message enqueued on queue with dedup
// key key, if the key's window has not ended. A sharded queue checks the
// shards a key used before the queue grew (see server/shards.go).
func (b *Broker) DedupLookup(ctx context.Context, queue, key string) (id string, ok bool, err error) {
	id, err = dedupLookupScript.Run(ctx, b.rdb, []string{b.keys.Dedup(queue), b.keys.DedupExpiry(queue)}, key).Text()
	if errors.Is(err, redis.Nil) {
		return "", false, nil
	}
	if err != nil {
		return "", false, wrap(err, "look up dedup key of %q", queue)
	}
	return id, true, nil
}
