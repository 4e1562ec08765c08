package server

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qbridge/qbridge/server/broker"
)

// Sharded queues (see broker/shards.go for the layout)
//
// Every instance keeps the shard table in memory: loaded at Start, reloaded
// every shardRefresh, and at once when an instance announces a change
// ("shards <queue>" on the events channel). Because shards are only ever
// added, an instance that has not yet heard of new shards still only uses
// shards that exist and are drained; it just does not use the new ones yet.
//
// Enqueue picks a shard per message: by the message's ordering key if it
// has one (per-key FIFO), else by its dedup key (so that dedup holds across
// the shards), else the call's turn in a per-queue round robin (a batch
// without keys goes to one shard whole, so it stays atomic).
//
// A Consume of a sharded queue attaches the stream to the dispatcher of
// every shard; each fills the stream from its own shard, taking at most the
// stream's window divided by the number of shards at a time, so that busy
// shards share the stream fairly. In a priority Consume (several queues),
// a sharded queue stands for its shards, in a rotating order per stream.

// shardRefresh is how often the shard table is reloaded (changes are also
// announced, so this only bounds how long a lost announcement matters).
const shardRefresh = 5 * time.Second

type shardTable struct {
	mu sync.RWMutex
	m  map[string][]string // logical queue -> physical shard names, shard 0 first
	rr sync.Map            // logical queue -> *atomic.Uint32 (round robin)
}

// shardsOf returns the physical queues of queue: [queue] when it is not
// sharded.
func (s *Server) shardsOf(queue string) []string {
	s.shards.mu.RLock()
	names := s.shards.m[queue]
	s.shards.mu.RUnlock()
	if names == nil {
		return []string{queue}
	}
	return names
}

// loadShards replaces the shard table with Redis's, and extends the open
// streams of queues that gained shards.
func (s *Server) loadShards(ctx context.Context) error {
	m, err := s.b.Shards(ctx)
	if err != nil {
		return err
	}
	s.setShards(m, nil)
	return nil
}

// refreshShards reloads one queue's shards.
func (s *Server) refreshShards(ctx context.Context, queue string) {
	names, err := s.b.QueueShards(ctx, queue)
	if err != nil {
		s.log.Debug("cannot reload a queue's shards; the periodic reload will", "queue", queue, "err", err)
		return
	}
	s.setShards(map[string][]string{queue: names}, []string{queue})
}

// setShards installs m: the whole table when only is nil, else the entries
// of the queues in only.
func (s *Server) setShards(m map[string][]string, only []string) {
	var grown []string
	s.shards.mu.Lock()
	if only == nil {
		for q := range s.shards.m {
			if _, ok := m[q]; !ok {
				grown = append(grown, q) // gone (deleted): streams fall back to shard 0
			}
		}
		for q, names := range m {
			if !slices.Equal(s.shards.m[q], names) {
				grown = append(grown, q)
			}
		}
		s.shards.m = m
	} else {
		if s.shards.m == nil {
			s.shards.m = map[string][]string{}
		}
		for _, q := range only {
			names := m[q]
			if len(names) <= 1 {
				names = nil
			}
			if !slices.Equal(s.shards.m[q], names) {
				grown = append(grown, q)
			}
			if names == nil {
				delete(s.shards.m, q)
			} else {
				s.shards.m[q] = names
			}
		}
	}
	s.shards.mu.Unlock()
	for _, q := range grown {
		s.reshard(q)
	}
}

// shardLoop reloads the shard table periodically.
func (s *Server) shardLoop(ctx context.Context) {
	t := time.NewTicker(shardRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := s.loadShards(lctx); err != nil && ctx.Err() == nil {
			s.log.Debug("cannot reload the shard table", "err", err)
		}
		cancel()
	}
}

// queueNames returns the names of the queues qbridge has seen, sorted, a
// sharded queue once (not its shards).
func (s *Server) queueNames(ctx context.Context) ([]string, error) {
	phys, err := s.b.RegisteredQueues(ctx)
	if err != nil {
		return nil, err
	}
	qs := make([]string, 0, len(phys))
	for _, q := range phys {
		qs = append(qs, broker.Logical(q))
	}
	slices.Sort(qs)
	return slices.Compact(qs), nil
}

// pickShards assigns each message of an Enqueue to a shard index of n:
// ordering key, else dedup key, else the queue's next turn.
func (s *Server) pickShards(queue string, n int, orderingKeys []string, msgs []broker.NewMessage) []int {
	picks := make([]int, len(msgs))
	turn := -1
	for i, m := range msgs {
		key := orderingKeys[i]
		if key == "" {
			key = m.DedupKey
		}
		if key != "" {
			picks[i] = keyShard(key, n)
			continue
		}
		if turn < 0 {
			v, ok := s.shards.rr.Load(queue)
			if !ok { // the first call only: LoadOrStore would allocate on every call
				v, _ = s.shards.rr.LoadOrStore(queue, new(atomic.Uint32))
			}
			turn = int(v.(*atomic.Uint32).Add(1) % uint32(n))
		}
		picks[i] = turn
	}
	return picks
}

// keyShard maps a key to one of n shards with a jump consistent hash
// (Lamping and Veach): when n grows, a key either keeps its shard or moves
// to one of the new ones, so only the share (new-old)/new of the keys move,
// rather than nearly all of them with a plain modulo.
func keyShard(key string, n int) int {
	h := fnv.New64a()
	h.Write([]byte(key))
	k := h.Sum64()
	b, j := int64(-1), int64(0)
	for j < int64(n) {
		b = j
		k = k*2862933555777941757 + 1
		j = int64(float64(b+1) * (float64(int64(1)<<31) / float64((k>>33)+1)))
	}
	return int(b)
}

// enqueueSharded enqueues msgs on the shards of a sharded queue, one call
// per shard, concurrently, and merges the answers in message order.
func (s *Server) enqueueSharded(ctx context.Context, shards []string, waitForRoom bool, orderingKeys []string, msgs []broker.NewMessage) (broker.EnqueueResult, error) {
	picks := s.pickShards(shards[0], len(shards), orderingKeys, msgs)
	dups, err := s.earlierDuplicates(ctx, shards, orderingKeys, msgs, picks)
	if err != nil {
		return broker.EnqueueResult{}, err
	}
	groups := map[int][]int{}
	var order []int
	for i, p := range picks {
		if dups[i] != "" {
			continue
		}
		if _, ok := groups[p]; !ok {
			order = append(order, p)
		}
		groups[p] = append(groups[p], i)
	}
	if len(order) == 1 && len(groups[order[0]]) == len(msgs) {
		return s.enqueueTo(ctx, shards[order[0]], waitForRoom, msgs)
	}
	results := make([]broker.EnqueueResult, len(order))
	errs := make([]error, len(order))
	var wg sync.WaitGroup
	for g, p := range order {
		part := make([]broker.NewMessage, len(groups[p]))
		for j, i := range groups[p] {
			part[j] = msgs[i]
		}
		wg.Go(func() { results[g], errs[g] = s.enqueueTo(ctx, shards[p], waitForRoom, part) })
	}
	wg.Wait()
	res := broker.EnqueueResult{IDs: make([]string, len(msgs)), Duplicate: make([]bool, len(msgs))}
	for i, id := range dups {
		if id != "" {
			res.IDs[i], res.Duplicate[i] = id, true
		}
	}
	for g, p := range order {
		r := results[g]
		for j, i := range groups[p] {
			if j < len(r.IDs) {
				res.IDs[i] = r.IDs[j]
			}
			if j < len(r.Duplicate) {
				res.Duplicate[i] = r.Duplicate[j]
			}
		}
		res.Created = res.Created || r.Created
		// Report the worst: a failure over "written, not replicated".
		if e := errs[g]; e != nil && (err == nil || errors.Is(err, broker.ErrNotReplicated)) {
			err = e
		}
	}
	if err != nil && !errors.Is(err, broker.ErrNotReplicated) {
		// Each shard's part is all or nothing, the whole is not: say which
		// messages were enqueued, so that the caller retries only the rest.
		var written []string
		for g, p := range order {
			if errs[g] == nil || errors.Is(errs[g], broker.ErrNotReplicated) {
				for _, i := range groups[p] {
					written = append(written, "messages["+itoa(i)+"]")
				}
			}
		}
		if len(written) > 0 {
			err = fmt.Errorf("%w; the batch spans shards (by its ordering or dedup keys) and is all-or-nothing per shard only: %s were enqueued on other shards, the others were not (retry only those, or retry all with dedup keys)", err, strings.Join(written, ", "))
		}
	}
	return res, err
}

// earlierDuplicates finds, for messages with a dedup key, an earlier message
// with that key in a shard the key mapped to before the queue grew: the
// enqueue script checks dedup keys in the shard it writes to, and a key that
// moved to a new shard would otherwise be accepted again. With a jump hash a
// key has used only a few shards (about ln of the count), and a lookup is
// needed only for keys whose shard changed. Returns the earlier ids ("": none).
func (s *Server) earlierDuplicates(ctx context.Context, shards []string, orderingKeys []string, msgs []broker.NewMessage, picks []int) ([]string, error) {
	dups := make([]string, len(msgs))
	for i, m := range msgs {
		if m.DedupKey == "" {
			continue
		}
		route := orderingKeys[i]
		if route == "" {
			route = m.DedupKey
		}
		seen := map[int]bool{picks[i]: true}
		for n := len(shards) - 1; n >= 1; n-- {
			b := keyShard(route, n)
			if seen[b] {
				continue
			}
			seen[b] = true
			id, ok, err := s.b.DedupLookup(ctx, shards[b], m.DedupKey)
			if err != nil {
				return nil, err
			}
			if ok {
				dups[i] = id
				break
			}
		}
	}
	return dups, nil
}

// physicalQueues expands a Consume's queues (priority order) into the
// physical queues its stream takes from; fair is true when the stream
// consumes one sharded queue (its shards then share it fairly). rot rotates
// the order of each queue's shards, so that priority streams do not all
// favour shard 0.
func (s *Server) physicalQueues(queues []string, rot uint64) (phys []string, fair bool) {
	for _, q := range queues {
		shards := s.shardsOf(q)
		k := int(rot % uint64(len(shards)))
		phys = append(phys, shards[k:]...)
		phys = append(phys, shards[:k]...)
	}
	return phys, len(queues) == 1 && len(phys) > 1
}
