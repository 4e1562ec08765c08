package redistest

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Live resharding: MigrateSlot moves one hash slot, with its keys, from
// the master that serves it to another master while clients keep using
// it, the way `redis-cli --cluster reshard` does (see "Redis Cluster live
// resharding explained" under CLUSTER SETSLOT in the Redis docs):
//
//  1. CLUSTER SETSLOT <slot> IMPORTING <source-id> on the target, then
//     CLUSTER SETSLOT <slot> MIGRATING <target-id> on the source. The
//     order matters: the target must accept ASKING requests before the
//     source starts redirecting to it.
//  2. Until the source holds no key of the slot: CLUSTER GETKEYSINSLOT on
//     the source, and MIGRATE of those keys to the target (atomically per
//     batch: each key exists on exactly one of the two at every instant).
//  3. CLUSTER SETSLOT <slot> NODE <target-id> on the target first (it
//     takes the slot and bumps its config epoch), then on the source (it
//     refuses while it still holds keys of the slot), then on every other
//     master, so that all of them redirect with MOVED at once instead of
//     learning it by gossip.
//
// While the slot is MIGRATING, the source serves a command whose keys all
// exist on it, answers -ASK <target> when none of them does, and -TRYAGAIN
// when only some do (a multi-key command, a Lua script with several KEYS).
// The target, IMPORTING, serves a command that follows ASKING, except a
// multi-key one with a key it does not have (-TRYAGAIN), and answers
// -MOVED <source> to anything else. A script that declares a key that
// exists nowhere (a queue's pause flag, say) gets -TRYAGAIN or -ASK then
// -TRYAGAIN for as long as the slot is migrating.

// MigrateStep names a point of MigrateSlot at which WithMigrateHook's
// hook is called.
type MigrateStep int

const (
	// MigrateMarked: the target imports the slot and the source migrates
	// it; no key has moved yet.
	MigrateMarked MigrateStep = iota
	// MigrateBatch: one more batch of keys has moved; the source may
	// still hold some (the slot is split between the two masters).
	MigrateBatch
	// MigrateMoved: every key has moved to the target, but the slot is
	// still migrating: the source answers -ASK, the target serves only
	// what follows ASKING.
	MigrateMoved
	// MigrateDone: every master names the target as the slot's owner,
	// and no node migrates or imports it any more.
	MigrateDone
)

func (s MigrateStep) String() string {
	switch s {
	case MigrateMarked:
		return "marked"
	case MigrateBatch:
		return "batch"
	case MigrateMoved:
		return "moved"
	case MigrateDone:
		return "done"
	}
	return fmt.Sprintf("MigrateStep(%d)", int(s))
}

// MigrateProgress is what a hook of MigrateSlot is told.
type MigrateProgress struct {
	Step MigrateStep
	Slot int
	// From and To are the indexes (see Node) of the source and the target.
	From, To int
	// Moved is the number of keys moved so far; Left, at MigrateBatch,
	// the number of keys of the slot the source still holds after the
	// batch (as counted just before it; keys may come and go meanwhile).
	Moved, Left int
}

type migrateConfig struct {
	batch int
	hook  func(MigrateProgress)
}

// MigrateOption configures MigrateSlot.
type MigrateOption func(*migrateConfig)

// WithMigrateBatch makes MigrateSlot move at most n keys per MIGRATE
// (default 10).
func WithMigrateBatch(n int) MigrateOption {
	return func(c *migrateConfig) { c.batch = max(1, n) }
}

// WithMigrateHook makes MigrateSlot call hook, in MigrateSlot's
// goroutine, at each step (see MigrateStep); the migration goes on when
// hook returns. A hook that takes its time keeps the slot in that state:
// at MigrateBatch with Left > 0, half-migrated, its keys split between
// source and target. A hook may fail the test (t.Fatal, from the test's
// goroutine): the slot then stays as it is until the cluster is killed.
func WithMigrateHook(hook func(MigrateProgress)) MigrateOption {
	return func(c *migrateConfig) { c.hook = hook }
}

const (
	// migrateTimeoutMs is MIGRATE's timeout (the source's connection to
	// the target), and migrateCallTimeout bounds each command MigrateSlot
	// sends.
	migrateTimeoutMs   = 5000
	migrateCallTimeout = 10 * time.Second
)

// MigrateSlot moves hash slot slot, and every key in it, from the master
// that serves it to node to (an index, see Node), by the standard live
// resharding steps (see above), and returns once every running node
// names node to as the slot's owner and the source holds no key of the
// slot. It fails the test if node to already serves the slot or is not a
// master, or if a step fails.
//
// It talks to the nodes as the default user (every permission, no
// password on these test servers): ServiceUser's ACL has neither CLUSTER
// SETSLOT nor MIGRATE. MIGRATE therefore needs no AUTH: the source
// connects to the target as the default user, which has no password. Keys
// move without REPLACE: a key of the slot that already exists on the
// target is a bug (the source served it, so nothing should have created it
// there), and fails the test with BUSYKEY.
func (c *Cluster) MigrateSlot(t testing.TB, slot int, to int, opts ...MigrateOption) {
	t.Helper()
	cfg := migrateConfig{batch: 10}
	for _, o := range opts {
		o(&cfg)
	}
	if err := c.migrateSlot(slot, to, cfg); err != nil {
		t.Fatalf("redistest: migrate slot %d to node %d: %v", slot, to, err)
	}
}

// adminClient is a single-connection client to s as the default user,
// with room for MIGRATE's timeout.
func (s *Server) adminClient() *redis.Client {
	return redis.NewClient(&redis.Options{Addr: s.Addr(), TLSConfig: s.tlsConfig(), MaxRetries: -1, PoolSize: 1,
		DialTimeout: time.Second, ReadTimeout: migrateCallTimeout, WriteTimeout: migrateCallTimeout})
}

func (c *Cluster) migrateSlot(slot, to int, cfg migrateConfig) error {
	if slot < 0 || slot >= 16384 {
		return fmt.Errorf("no slot %d", slot)
	}
	if to < 0 || to >= len(c.nodes) {
		return fmt.Errorf("no node %d (the cluster has %d)", to, len(c.nodes))
	}
	from, err := c.slotOwner(slot)
	if err != nil {
		return err
	}
	if from == to {
		return fmt.Errorf("node %d (%s) already serves slot %d", to, c.nodes[to].Addr(), slot)
	}
	if err := c.nodes[to].isMaster(); err != nil {
		return err
	}
	src, dst := c.nodes[from].adminClient(), c.nodes[to].adminClient()
	defer src.Close()
	defer dst.Close()
	ctx := context.Background()
	call := func(cl *redis.Client, args ...any) *redis.Cmd {
		cctx, cancel := context.WithTimeout(ctx, migrateCallTimeout)
		defer cancel()
		return cl.Do(cctx, args...)
	}
	srcID, err := call(src, "cluster", "myid").Text()
	if err != nil {
		return fmt.Errorf("CLUSTER MYID of the source %s: %w", c.nodes[from].Addr(), err)
	}
	dstID, err := call(dst, "cluster", "myid").Text()
	if err != nil {
		return fmt.Errorf("CLUSTER MYID of the target %s: %w", c.nodes[to].Addr(), err)
	}
	progress := MigrateProgress{Slot: slot, From: from, To: to}
	step := func(s MigrateStep) {
		if cfg.hook != nil {
			progress.Step = s
			cfg.hook(progress)
		}
	}

	// 1. Target first: it must take ASKING requests before the source
	// redirects there.
	if err := call(dst, "cluster", "setslot", slot, "importing", srcID).Err(); err != nil {
		return fmt.Errorf("CLUSTER SETSLOT %d IMPORTING on the target %s: %w", slot, c.nodes[to].Addr(), err)
	}
	if err := call(src, "cluster", "setslot", slot, "migrating", dstID).Err(); err != nil {
		return fmt.Errorf("CLUSTER SETSLOT %d MIGRATING on the source %s: %w", slot, c.nodes[from].Addr(), err)
	}
	step(MigrateMarked)

	// 2. The keys, batch by batch.
	host, port, _ := net.SplitHostPort(c.nodes[to].Addr())
	moveBatch := func() (moved, left int, err error) {
		n, err := call(src, "cluster", "countkeysinslot", slot).Int()
		if err != nil {
			return 0, 0, fmt.Errorf("CLUSTER COUNTKEYSINSLOT %d on the source: %w", slot, err)
		}
		keys, err := call(src, "cluster", "getkeysinslot", slot, cfg.batch).StringSlice()
		if err != nil {
			return 0, 0, fmt.Errorf("CLUSTER GETKEYSINSLOT %d on the source: %w", slot, err)
		}
		if len(keys) == 0 {
			return 0, n, nil
		}
		args := []any{"migrate", host, port, "", 0, migrateTimeoutMs, "keys"}
		for _, k := range keys {
			args = append(args, k)
		}
		// NOKEY: the keys were deleted since GETKEYSINSLOT; nothing moved.
		if err := call(src, args...).Err(); err != nil && !strings.HasPrefix(err.Error(), "NOKEY") {
			return 0, n, fmt.Errorf("MIGRATE of %d keys of slot %d to %s: %w", len(keys), slot, c.nodes[to].Addr(), err)
		}
		return len(keys), n, nil
	}
	for {
		moved, left, err := moveBatch()
		if err != nil {
			return err
		}
		if moved == 0 {
			break
		}
		progress.Moved += moved
		progress.Left = max(0, left-moved)
		step(MigrateBatch)
	}
	step(MigrateMoved)

	// 3. The target takes the slot, then the source gives it up, then
	// every other master learns it.
	if err := call(dst, "cluster", "setslot", slot, "node", dstID).Err(); err != nil {
		return fmt.Errorf("CLUSTER SETSLOT %d NODE on the target %s: %w", slot, c.nodes[to].Addr(), err)
	}
	for attempt := 0; ; attempt++ {
		err := call(src, "cluster", "setslot", slot, "node", dstID).Err()
		if err == nil {
			break
		}
		// "still hold keys": some key was created on the source since the
		// last GETKEYSINSLOT (it cannot be, while the slot migrates; but
		// move it rather than strand it).
		if attempt >= 3 || !strings.Contains(err.Error(), "hold keys") {
			return fmt.Errorf("CLUSTER SETSLOT %d NODE on the source %s: %w", slot, c.nodes[from].Addr(), err)
		}
		for {
			moved, _, err := moveBatch()
			if err != nil {
				return err
			}
			if moved == 0 {
				break
			}
			progress.Moved += moved
		}
	}
	for i, n := range c.nodes {
		if i == from || i == to || !n.running() || n.isMaster() != nil {
			continue
		}
		cl := n.adminClient()
		err := call(cl, "cluster", "setslot", slot, "node", dstID).Err()
		_ = cl.Close()
		if err != nil {
			return fmt.Errorf("CLUSTER SETSLOT %d NODE on %s: %w", slot, n.Addr(), err)
		}
	}
	if err := c.waitSlotSettled(slot, from, to, dstID); err != nil {
		return err
	}
	progress.Left = 0
	step(MigrateDone)
	return nil
}

// waitSlotSettled waits until every running node names node to (id
// toID) as slot's master and marks it neither migrating nor importing,
// and the source holds no key of the slot.
func (c *Cluster) waitSlotSettled(slot, from, to int, toID string) error {
	deadline := time.Now().Add(topologyTimeout)
	for {
		err := c.slotSettled(slot, from, to, toID)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("slot %d not settled on node %d within %v: %w", slot, to, topologyTimeout, err)
		}
		time.Sleep(pollInterval)
	}
}

func (c *Cluster) slotSettled(slot, from, to int, toID string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, n := range c.nodes {
		if !n.running() {
			continue
		}
		pc := n.probeClient()
		nodes, err := pc.ClusterNodes(ctx).Result()
		_ = pc.Close()
		if err != nil {
			return fmt.Errorf("CLUSTER NODES of %s: %w", n.Addr(), err)
		}
		owner := ""
		for _, line := range strings.Split(nodes, "\n") {
			f := strings.Fields(line)
			if len(f) < 9 {
				continue
			}
			for _, r := range f[8:] {
				if strings.HasPrefix(r, "[") {
					if strings.HasPrefix(r, fmt.Sprintf("[%d-", slot)) {
						return fmt.Errorf("%s still shows %s", n.Addr(), r)
					}
					continue
				}
				lo, hi, isRange := strings.Cut(r, "-")
				if !isRange {
					hi = lo
				}
				var a, b int
				if _, err := fmt.Sscan(lo, &a); err != nil {
					continue
				}
				if _, err := fmt.Sscan(hi, &b); err != nil {
					continue
				}
				if a <= slot && slot <= b {
					owner = f[0]
				}
			}
		}
		if owner != toID {
			return fmt.Errorf("%s names %q as the owner of slot %d, not %s (node %d)", n.Addr(), owner, slot, toID, to)
		}
	}
	pc := c.nodes[from].probeClient()
	defer pc.Close()
	if n, err := pc.ClusterCountKeysInSlot(ctx, slot).Result(); err != nil || n != 0 {
		return fmt.Errorf("the source %s holds %d keys of slot %d (%v)", c.nodes[from].Addr(), n, slot, err)
	}
	return nil
}
