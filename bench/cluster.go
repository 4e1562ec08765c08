package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis Clusters of masters only, for the shards scenario: each node a
// RedisProc (127.0.0.1, free port, own directory, killed by PID), with
// cluster mode on, its own bus port and nodes file. The slots are assigned
// by hand (CLUSTER ADDSLOTSRANGE, split evenly) and the nodes joined with
// CLUSTER MEET, since `redis-cli --cluster create` wants three masters or
// more.

const (
	clusterSlots = 16384
	// clusterFormTimeout bounds how long a new cluster may take to reach
	// cluster_state:ok on every node.
	clusterFormTimeout = 30 * time.Second
)

// redisCluster is a Redis Cluster of len(nodes) masters and no replicas;
// node i holds the slots slotRange(i).
type redisCluster struct {
	nodes []*RedisProc
	buses []int           // each node's cluster bus port
	admin []*redis.Client // one plain client per node: CLUSTER, INFO, FLUSHALL
}

// startCluster starts a cluster of masters nodes and waits until every node
// reports cluster_state:ok with all slots assigned and every node known.
// On error, everything started is stopped.
func startCluster(ctx context.Context, masters int) (_ *redisCluster, err error) {
	if masters < 1 || masters > 64 {
		return nil, fmt.Errorf("a cluster of %d masters: want 1 to 64", masters)
	}
	c := &redisCluster{}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	for i := 0; i < masters; i++ {
		bus := 0
		p, err := startRedis(ctx, func(port int) ([]string, error) {
			// The default bus port, port+10000, may be taken or above
			// 65535: name a free one.
			for try := 0; try < 5; try++ {
				b, err := freePort()
				if err != nil {
					return nil, err
				}
				if b != port {
					bus = b
					return []string{"--cluster-enabled", "yes",
						"--cluster-config-file", fmt.Sprintf("nodes-%d.conf", port),
						"--cluster-port", strconv.Itoa(b),
						"--cluster-node-timeout", "5000"}, nil
				}
			}
			return nil, errors.New("no free cluster bus port")
		})
		if err != nil {
			return nil, fmt.Errorf("cluster node %d of %d: %w", i+1, masters, err)
		}
		c.nodes = append(c.nodes, p)
		c.buses = append(c.buses, bus)
		c.admin = append(c.admin, redis.NewClient(&redis.Options{Addr: p.Addr, PoolSize: 2, MaxRetries: -1,
			DialTimeout: time.Second, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second}))
	}
	for i, a := range c.admin {
		// Distinct config epochs, as redis-cli gives them, so that no
		// epoch collision has to be resolved before the cluster is ok.
		if err := a.Do(ctx, "CLUSTER", "SET-CONFIG-EPOCH", i+1).Err(); err != nil {
			return nil, fmt.Errorf("node %s: CLUSTER SET-CONFIG-EPOCH: %w", c.nodes[i].Addr, err)
		}
		lo, hi := c.slotRange(i)
		if err := a.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", lo, hi).Err(); err != nil {
			return nil, fmt.Errorf("node %s: CLUSTER ADDSLOTSRANGE %d %d (needs Redis 7.0 or later): %w", c.nodes[i].Addr, lo, hi, err)
		}
	}
	_, port0, _ := net.SplitHostPort(c.nodes[0].Addr)
	for i := 1; i < masters; i++ {
		if err := c.admin[i].Do(ctx, "CLUSTER", "MEET", "127.0.0.1", port0, c.buses[0]).Err(); err != nil {
			return nil, fmt.Errorf("node %s: CLUSTER MEET: %w", c.nodes[i].Addr, err)
		}
	}
	deadline := time.Now().Add(clusterFormTimeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		err := c.ok(ctx)
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			var logs strings.Builder
			for _, n := range c.nodes {
				fmt.Fprintf(&logs, "--- %s:\n%s", n.Addr, n.out.String())
			}
			return nil, fmt.Errorf("cluster of %d masters not ok after %v: %v\n%s", masters, clusterFormTimeout, err, logs.String())
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

// slotRange returns the first and last slot of node i.
func (c *redisCluster) slotRange(i int) (lo, hi int) {
	n := len(c.nodes)
	return i * clusterSlots / n, (i+1)*clusterSlots/n - 1
}

// masterOfSlot returns the index of the node holding slot.
func (c *redisCluster) masterOfSlot(slot int) int {
	for i := range c.nodes {
		if _, hi := c.slotRange(i); slot <= hi {
			return i
		}
	}
	return len(c.nodes) - 1
}

// masterOf returns the index of the node holding key (Redis computes the
// slot: CLUSTER KEYSLOT).
func (c *redisCluster) masterOf(ctx context.Context, key string) (int, error) {
	slot, err := c.admin[0].ClusterKeySlot(ctx, key).Result()
	if err != nil {
		return 0, fmt.Errorf("CLUSTER KEYSLOT: %w", err)
	}
	return c.masterOfSlot(int(slot)), nil
}

// ok reports why the cluster is not (yet) usable from every node.
func (c *redisCluster) ok(ctx context.Context) error {
	for i, a := range c.admin {
		info, err := a.ClusterInfo(ctx).Result()
		if err != nil {
			return fmt.Errorf("node %s: %w", c.nodes[i].Addr, err)
		}
		for _, want := range []string{"cluster_state:ok", "cluster_slots_assigned:" + strconv.Itoa(clusterSlots),
			"cluster_known_nodes:" + strconv.Itoa(len(c.nodes))} {
			if !hasLine(info, want) {
				return fmt.Errorf("node %s: CLUSTER INFO lacks %s", c.nodes[i].Addr, want)
			}
		}
	}
	return nil
}

func hasLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}

// addrs returns the nodes' addresses.
func (c *redisCluster) addrs() []string {
	out := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		out[i] = n.Addr
	}
	return out
}

// flush empties every node.
func (c *redisCluster) flush(ctx context.Context) error {
	for i, a := range c.admin {
		if err := a.FlushAll(ctx).Err(); err != nil {
			return fmt.Errorf("node %s: FLUSHALL: %w", c.nodes[i].Addr, err)
		}
	}
	return nil
}

// cpuSeconds returns each node's CPU time so far (INFO CPU:
// used_cpu_user + used_cpu_sys).
func (c *redisCluster) cpuSeconds(ctx context.Context) ([]float64, error) {
	out := make([]float64, len(c.admin))
	for i, a := range c.admin {
		info, err := a.Info(ctx, "cpu").Result()
		if err != nil {
			return nil, fmt.Errorf("node %s: INFO CPU: %w", c.nodes[i].Addr, err)
		}
		found := 0
		for _, l := range strings.Split(info, "\n") {
			name, v, ok := strings.Cut(strings.TrimSpace(l), ":")
			if !ok || (name != "used_cpu_user" && name != "used_cpu_sys") {
				continue
			}
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return nil, fmt.Errorf("node %s: INFO CPU %s: %w", c.nodes[i].Addr, l, err)
			}
			out[i] += f
			found++
		}
		if found != 2 {
			return nil, fmt.Errorf("node %s: INFO CPU lacks used_cpu_user or used_cpu_sys", c.nodes[i].Addr)
		}
	}
	return out, nil
}

// stop closes the clients and kills every node by PID.
func (c *redisCluster) stop() {
	for _, a := range c.admin {
		_ = a.Close()
	}
	for _, n := range c.nodes {
		n.Stop()
	}
}

// procCPUSeconds returns the CPU time of this process (utime+stime of
// /proc/self/stat), or -1 where there is no /proc.
func procCPUSeconds() float64 {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return -1
	}
	// Fields after the command name (which may hold spaces), from
	// field 3: utime and stime are fields 14 and 15, in USER_HZ (100).
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return -1
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return (u + st) / 100
}

// hostBusySeconds returns the CPU time the whole machine spent busy (all
// but idle and iowait, from /proc/stat), or -1 where there is no /proc.
func hostBusySeconds() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return -1
	}
	var busy float64
	for j, v := range f[1:] {
		if j == 3 || j == 4 { // idle, iowait
			continue
		}
		if j >= 8 { // guest and guest_nice are already in user and nice
			break
		}
		x, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return -1
		}
		busy += x
	}
	return busy / 100
}
