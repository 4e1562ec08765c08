package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/redistest"
)

// The batch reads over many queues (ReadyLengths, ReadCounters,
// FirstDelayedMany) on a Redis Cluster with a dead master: the queues of
// the healthy masters are read, those of the dead one are reported by a
// *PartialError.

// partialRead is one batch read, its values as int64s (0 for none).
type partialRead struct {
	op   string
	read func(ctx context.Context, b *Broker, queues []string) ([]int64, error)
}

var partialReads = []partialRead{
	{"read queue lengths", func(ctx context.Context, b *Broker, qs []string) ([]int64, error) {
		return b.ReadyLengths(ctx, qs)
	}},
	{"read counters", func(ctx context.Context, b *Broker, qs []string) ([]int64, error) {
		cs, err := b.ReadCounters(ctx, qs)
		out := make([]int64, len(cs))
		for i, c := range cs {
			out[i] = c.Enqueued*1000 + c.Acked
		}
		return out, err
	}},
	{"read delayed messages", func(ctx context.Context, b *Broker, qs []string) ([]int64, error) {
		ts, err := b.FirstDelayedMany(ctx, qs)
		out := make([]int64, len(ts))
		for i, t := range ts {
			if !t.IsZero() {
				out[i] = t.UnixMilli()
			}
		}
		return out, err
	}},
}

func TestPartialReadsOnClusterWithADeadNode(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, redistest.WithArgs("--cluster-require-full-coverage", "no"), redistest.WithAOF())
	admin := c.Client(t)
	o := c.ServiceOptions()
	o.DisableIdentity = true
	o.DialTimeout = time.Second
	svc := redis.NewClusterClient(o)
	t.Cleanup(func() { _ = svc.Close() })
	b := New(svc)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Two queues per node, interleaved, then a key of the wrong type on
	// the first node (ReadyLengths counts it as 1, the others read
	// nothing from it).
	const victim = 1
	var queues []string
	node := map[string]int{}
	for round := 0; round < 2; round++ {
		for n := 0; n < redistest.ClusterSize; n++ {
			for i := 0; ; i++ {
				q := fmt.Sprintf("partial-%d-%d-%d", round, n, i)
				if c.MasterOf(t, q) == n {
					queues = append(queues, q)
					node[q] = n
					break
				}
			}
		}
	}
	for i := 0; ; i++ {
		q := fmt.Sprintf("partial-string-%d", i)
		if c.MasterOf(t, q) == 0 {
			if err := admin.Set(ctx, q, "not a list", 0).Err(); err != nil {
				t.Fatal(err)
			}
			queues = append(queues, q)
			node[q] = 0
			break
		}
	}
	// Distinct values: queue i has i+1 ready messages, enqueued 10+i,
	// acked i, and its earliest delayed message due at 5000+i ms.
	want := map[string][]int64{}
	for _, r := range partialReads {
		want[r.op] = make([]int64, len(queues))
	}
	for i, q := range queues {
		if strings.HasPrefix(q, "partial-string-") {
			want["read queue lengths"][i] = 1
			continue
		}
		for j := 0; j <= i; j++ {
			if err := admin.RPush(ctx, b.keys.Ready(q), fmt.Sprint("m", j)).Err(); err != nil {
				t.Fatal(err)
			}
		}
		if err := admin.HSet(ctx, b.keys.Counters(q), "enqueued", 10+i, "acked", i).Err(); err != nil {
			t.Fatal(err)
		}
		if err := admin.ZAdd(ctx, b.keys.Delayed(q), redis.Z{Score: float64(5000 + i), Member: "d"}, redis.Z{Score: 9e12, Member: "later"}).Err(); err != nil {
			t.Fatal(err)
		}
		want["read queue lengths"][i] = int64(i + 1)
		want["read counters"][i] = int64(10+i)*1000 + int64(i)
		want["read delayed messages"][i] = int64(5000 + i)
	}

	check := func(t *testing.T, dead bool) {
		t.Helper()
		for _, r := range partialReads {
			start := time.Now()
			got, err := r.read(ctx, b, queues)
			took := time.Since(start)
			if len(got) != len(queues) {
				t.Fatalf("%s: %d values for %d queues (err %v)", r.op, len(got), len(queues), err)
			}
			if !dead {
				if err != nil {
					t.Errorf("%s: %v", r.op, err)
				}
			} else {
				var pe *PartialError
				if !errors.As(err, &pe) {
					t.Fatalf("%s: err %v (%T), want a *PartialError", r.op, err, err)
				}
				t.Logf("%s in %v: %v", r.op, took.Round(time.Millisecond), err)
				if pe.Op != r.op || pe.Total != len(queues) {
					t.Errorf("%s: Op %q, Total %d", r.op, pe.Op, pe.Total)
				}
				var failed []int
				for _, f := range pe.Failures {
					failed = append(failed, f.Index)
					if f.Queue != queues[f.Index] || f.Node != c.Node(victim).Addr() || !Unreachable(f.Err) {
						t.Errorf("%s: failure %+v; want queue %q on %s, unavailable", r.op, f, queues[f.Index], c.Node(victim).Addr())
					}
				}
				var wantFailed []int
				for i, q := range queues {
					if node[q] == victim {
						wantFailed = append(wantFailed, i)
					}
					if pe.Failed(i) != (node[q] == victim) {
						t.Errorf("%s: Failed(%d) = %v for a queue on node %d", r.op, i, pe.Failed(i), node[q])
					}
				}
				if fmt.Sprint(failed) != fmt.Sprint(wantFailed) {
					t.Errorf("%s: failed indexes %v, want %v", r.op, failed, wantFailed)
				}
				if nodes := pe.Nodes(); len(nodes) != 1 || nodes[0] != c.Node(victim).Addr() {
					t.Errorf("%s: Nodes() = %v", r.op, nodes)
				}
				if !errors.Is(err, ErrUnavailable) {
					t.Errorf("%s: errors.Is(err, ErrUnavailable) is false for %v", r.op, err)
				}
				if msg := err.Error(); !strings.Contains(msg, fmt.Sprintf("%d of %d queues", len(wantFailed), len(queues))) || !strings.Contains(msg, c.Node(victim).Addr()) {
					t.Errorf("%s: message %q", r.op, msg)
				}
			}
			for i, q := range queues {
				w := want[r.op][i]
				if dead && node[q] == victim {
					w = 0
				}
				if got[i] != w {
					t.Errorf("%s: %s (node %d) = %d, want %d", r.op, q, node[q], got[i], w)
				}
			}
		}
	}

	t.Run("all up", func(t *testing.T) { check(t, false) })
	c.Kill(t, victim)
	t.Run("a node down", func(t *testing.T) { check(t, true) })
	c.Restart(t, victim)
	t.Run("back", func(t *testing.T) { check(t, false) })

	// A cancelled read: every queue fails, with the context's error.
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	for _, r := range partialReads {
		got, err := r.read(cctx, b, queues)
		var pe *PartialError
		if !errors.As(err, &pe) || len(pe.Failures) != len(queues) || !errors.Is(err, context.Canceled) || len(got) != len(queues) {
			t.Errorf("%s, cancelled: %d values, %v", r.op, len(got), err)
		}
	}
}

// On a single Redis, a read that fails fails for every queue, of no node.
func TestPartialReadsOnOneNodeDown(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	o := srv.ServiceOptions(0)
	o.MaxRetries = -1
	rdb := redis.NewClient(o)
	t.Cleanup(func() { _ = rdb.Close() })
	b := New(rdb)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qs := []string{"a", "b"}
	if lens, err := b.ReadyLengths(ctx, qs); err != nil || len(lens) != 2 {
		t.Fatalf("up: %v, %v", lens, err)
	}
	if n := b.NodeOf(ctx, "a"); n != "" {
		t.Errorf("NodeOf on a single Redis: %q", n)
	}
	srv.Kill(t)
	for _, r := range partialReads {
		got, err := r.read(ctx, b, qs)
		var pe *PartialError
		if !errors.As(err, &pe) || len(got) != 2 || len(pe.Failures) != 2 || !pe.Failed(0) || !pe.Failed(1) ||
			pe.Failures[0].Node != "" || !errors.Is(err, ErrUnavailable) {
			t.Errorf("%s: %v, %v", r.op, got, err)
		}
	}
}

func TestUnreachable(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{errors.New("boom"), false},
		{wrap(errors.New("dial tcp 127.0.0.1:1: connect: connection refused"), "x"), true},
		{wrap(errors.New("redis: connection pool timeout"), "x"), true},
		{wrap(errors.New("i/o timeout"), "x"), true},
		{wrap(errors.New("TRYAGAIN Multiple keys request during rehashing of slot"), "x"), false},
		{wrap(errors.New("LOADING Redis is loading the dataset in memory"), "x"), false},
		{wrap(errors.New("CLUSTERDOWN The cluster is down"), "x"), false},
		{wrap(context.DeadlineExceeded, "x"), false},
	} {
		if got := Unreachable(c.err); got != c.want {
			t.Errorf("Unreachable(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}
