package redistest

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// keysOnEveryNode returns one key per cluster node.
func keysOnEveryNode(t *testing.T, c *Cluster) []string {
	t.Helper()
	keys := make([]string, ClusterSize)
	found := 0
	for i := 0; found < ClusterSize && i < 1000; i++ {
		k := fmt.Sprintf("k%d", i)
		if n := c.NodeOf(t, k); keys[n] == "" {
			keys[n] = k
			found++
		}
	}
	if found < ClusterSize {
		t.Fatalf("no keys found for every node: %q", keys)
	}
	return keys
}

func TestCluster(t *testing.T) {
	t.Parallel()
	c := StartCluster(t)

	addrs := c.Addrs()
	if len(addrs) != ClusterSize {
		t.Fatalf("Addrs() = %v", addrs)
	}
	for _, a := range addrs {
		if !strings.HasPrefix(a, "127.0.0.1:") {
			t.Fatalf("Addrs() = %v, want 127.0.0.1 only", addrs)
		}
	}
	if got, want := c.URL(), "redis-cluster://qbridge:"+ServicePassword+"@"+strings.Join(addrs, ","); got != want {
		t.Fatalf("URL() = %q, want %q", got, want)
	}

	admin := c.Client(t)
	svc := redis.NewClusterClient(c.ServiceOptions())
	t.Cleanup(func() { _ = svc.Close() })
	keys := keysOnEveryNode(t, c)
	for _, k := range keys {
		if err := svc.RPush(ctx(t), k, "m").Err(); err != nil {
			t.Fatalf("service user RPUSH %s: %v", k, err)
		}
		if n, err := admin.LLen(ctx(t), k).Result(); err != nil || n != 1 {
			t.Fatalf("LLEN %s = %d, %v", k, n, err)
		}
	}
	if err := svc.Do(ctx(t), "FLUSHALL").Err(); !isNoPerm(err) {
		t.Fatalf("service user FLUSHALL: %v; want NOPERM", err)
	}
	for i := 0; i < ClusterSize; i++ {
		if dir := c.Node(i).Dir(); !fileExists(dir + "/nodes.conf") {
			t.Fatalf("node %d has no nodes.conf in %s", i, dir)
		}
	}

	// A killed node's slots fail; after Restart the cluster is whole again
	// (without AOF the node's data is gone).
	victim := c.NodeOf(t, keys[1])
	c.Kill(t, victim)
	if err := c.Node(victim).probeClient().Ping(ctx(t)).Err(); err == nil {
		t.Fatalf("node %d still answers after Kill", victim)
	}
	c.Restart(t, victim)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := admin.RPush(ctx(t), keys[1], "again").Err()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("RPUSH after restart: %v", err)
		}
		time.Sleep(pollInterval)
	}
}

func TestClusterRefusesTLS(t *testing.T) {
	t.Parallel()
	fake := &goroutineTB{TB: quietTB{t}}
	done := make(chan *Cluster, 1)
	go func() {
		defer close(done)
		done <- StartCluster(fake, WithTLS())
	}()
	if c, ok := <-done; ok {
		t.Fatalf("StartCluster(WithTLS) returned %v, want Fatal", c)
	}
	if !strings.Contains(fake.fatal, "WithTLS") {
		t.Fatalf("fatal = %q", fake.fatal)
	}
}

func TestSentinel(t *testing.T) {
	t.Parallel()
	s := StartSentinel(t)

	if s.MasterName() != "qbridge" || len(s.SentinelAddrs()) != 3 {
		t.Fatalf("MasterName %q, SentinelAddrs %v", s.MasterName(), s.SentinelAddrs())
	}
	want := "redis-sentinel://qbridge:" + ServicePassword + "@" + strings.Join(s.SentinelAddrs(), ",") + "/0?master=qbridge"
	if got := s.URL(); got != want {
		t.Fatalf("URL() = %q, want %q", got, want)
	}
	first := s.MasterAddr(t)
	if first != s.Data()[0].Addr() {
		t.Fatalf("master %s, want the first data node %s", first, s.Data()[0].Addr())
	}

	admin := s.Client(t)
	svc := redis.NewFailoverClient(s.ServiceOptions())
	t.Cleanup(func() { _ = svc.Close() })
	if err := svc.RPush(ctx(t), "q", "before").Err(); err != nil {
		t.Fatalf("service user RPUSH: %v", err)
	}
	if err := svc.FlushAll(ctx(t)).Err(); !isNoPerm(err) {
		t.Fatalf("service user FLUSHALL: %v; want NOPERM", err)
	}
	// Replicated before the failover: WAIT for the replica.
	if n, err := admin.Wait(ctx(t), 1, 5*time.Second).Result(); err != nil || n != 1 {
		t.Fatalf("WAIT 1: %d, %v", n, err)
	}

	start := time.Now()
	old := s.KillMaster(t)
	if old != first {
		t.Fatalf("KillMaster killed %s, want %s", old, first)
	}
	promoted := s.WaitPromotion(t, old)
	t.Logf("failover from %s to %s in %v", old, promoted, time.Since(start).Round(time.Millisecond))
	if promoted != s.Data()[1].Addr() {
		t.Fatalf("promoted %s, want the replica %s", promoted, s.Data()[1].Addr())
	}
	if s.Master(t) != s.Data()[1] {
		t.Fatalf("Master() is not the replica")
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := svc.RPush(ctx(t), "q", "after").Err()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("RPUSH after failover: %v", err)
		}
		time.Sleep(pollInterval)
	}
	if got, err := admin.LRange(ctx(t), "q", 0, -1).Result(); err != nil || strings.Join(got, ",") != "before,after" {
		t.Fatalf("LRANGE q = %q, %v", got, err)
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func TestClusterWithReplicas(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, WithReplicas(1))
	if c.Len() != 2*ClusterSize {
		t.Fatalf("Len() = %d, want %d", c.Len(), 2*ClusterSize)
	}
	masters, replicas := 0, 0
	for i := 0; i < c.Len(); i++ {
		info, err := c.Node(i).Client(t, 0).Info(ctx(t), "replication").Result()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case containsLine(info, "role:master") && containsLine(info, "connected_slaves:1"):
			masters++
		case containsLine(info, "role:slave") && containsLine(info, "master_link_status:up"):
			replicas++
		default:
			t.Fatalf("node %d: %s", i, info)
		}
		// The pseudo-arguments of WithReplicas never reach redis-server.
		for _, a := range c.Node(i).args() {
			if a == replicasMarker {
				t.Fatalf("node %d got the WithReplicas marker: %q", i, c.Node(i).args())
			}
		}
	}
	if masters != ClusterSize || replicas != ClusterSize {
		t.Fatalf("%d masters with a replica and %d replicas in sync, want %d each", masters, replicas, ClusterSize)
	}

	svc := redis.NewClusterClient(c.ServiceOptions())
	t.Cleanup(func() { _ = svc.Close() })
	const k = "failover-key"
	if err := svc.RPush(ctx(t), k, "before").Err(); err != nil {
		t.Fatalf("service user RPUSH: %v", err)
	}
	m := c.MasterOf(t, k)
	// Replicated before the kill: WAIT on the master itself.
	if n, err := c.Node(m).Client(t, 0).Wait(ctx(t), 1, 5*time.Second).Result(); err != nil || n != 1 {
		t.Fatalf("WAIT 1 on the master: %d, %v", n, err)
	}

	start := time.Now()
	if got := c.KillMasterOf(t, k); got != m {
		t.Fatalf("KillMasterOf killed node %d, want %d", got, m)
	}
	if c.Node(m).running() {
		t.Fatalf("node %d still runs after KillMasterOf", m)
	}
	nm := c.WaitPromotion(t, k, m)
	t.Logf("failover of %q from node %d to node %d in %v", k, m, nm, time.Since(start).Round(time.Millisecond))
	if nm == m || c.MasterOf(t, k) != nm {
		t.Fatalf("WaitPromotion = %d, MasterOf = %d, killed %d", nm, c.MasterOf(t, k), m)
	}
	// go-redis reloads its slot map on MOVED or every
	// ClusterStateReloadInterval (60 s by default), and the dead master
	// sends no MOVED: reload it, as a client must after a failover.
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := svc.RPush(ctx(t), k, "after").Err()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("service user RPUSH after failover: %v", err)
		}
		svc.ReloadState(ctx(t))
		time.Sleep(pollInterval)
	}
	if got, err := svc.LRange(ctx(t), k, 0, -1).Result(); err != nil || strings.Join(got, ",") != "before,after" {
		t.Fatalf("LRANGE %s = %q, %v", k, got, err)
	}
}
