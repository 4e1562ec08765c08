package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Topologies: StartCluster runs a Redis Cluster of three masters (with
// WithReplicas(1), each with a replica), StartSentinel a master with a replica watched by three sentinels. Every
// process is a Server like those of Start (127.0.0.1, a free port, a private
// directory, ServiceUser on the data nodes, killed by PID at cleanup), so
// the options of Start apply to their data nodes, except WithTLS.

const (
	// ClusterSize is the number of masters StartCluster starts.
	ClusterSize = 3
	// clusterNodeTimeoutMs is each cluster node's cluster-node-timeout.
	clusterNodeTimeoutMs = 2000
	// topologyTimeout bounds how long a topology may take to form (and
	// a failover to complete).
	topologyTimeout = 30 * time.Second
)

// findRedisCLI locates redis-cli (to create clusters); "" if none is
// found. It looks next to redis-server first.
var findRedisCLI = func() string {
	if bin := findRedisServer(); bin != "" {
		p := filepath.Join(filepath.Dir(bin), "redis-cli")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p
		}
	}
	if p, err := exec.LookPath("redis-cli"); err == nil {
		return p
	}
	return ""
}

func withCluster() Option { return func(c *config) { c.cluster = true } }

// replicasMarker is how WithReplicas records its count in a config (the
// config type is shared with Start): two pseudo-arguments, the marker and
// the count, that StartCluster reads and strips before starting nodes.
const replicasMarker = "\x00redistest-cluster-replicas"

// WithReplicas makes StartCluster give each of its ClusterSize masters n
// replicas (ClusterSize*(1+n) nodes, joined with `redis-cli --cluster
// create --cluster-replicas n`), so that killing a master (KillMasterOf)
// makes the cluster promote a replica of it (WaitPromotion). Replicas have
// ServiceUser like every node, but replicate as the default user: the
// service user's ACL (redisacl.ClusterRules) has no PSYNC, SYNC or
// REPLCONF, and the default user of these test servers has every
// permission and no password, so no masteruser/masterauth is needed.
// Only StartCluster understands it (Start ignores it).
func WithReplicas(n int) Option {
	return func(c *config) { c.args = append(c.args, replicasMarker, strconv.Itoa(n)) }
}

// clusterReplicas returns the replica count WithReplicas set in opts (the
// last one wins).
func clusterReplicas(opts []Option) int {
	var c config
	for _, o := range opts {
		o(&c)
	}
	n := 0
	for i := 0; i+1 < len(c.args); i++ {
		if c.args[i] == replicasMarker {
			n, _ = strconv.Atoi(c.args[i+1])
			i++
		}
	}
	return n
}

// stripReplicas removes WithReplicas's pseudo-arguments from a config.
func stripReplicas() Option {
	return func(c *config) {
		var args []string
		for i := 0; i < len(c.args); i++ {
			if c.args[i] == replicasMarker && i+1 < len(c.args) {
				i++
				continue
			}
			args = append(args, c.args[i])
		}
		c.args = args
	}
}

func withoutTLS() Option { return func(c *config) { c.tls = false } }
func hasTLS(opts []Option) bool {
	var c config
	for _, o := range opts {
		o(&c)
	}
	return c.tls
}

// Cluster is a Redis Cluster of ClusterSize masters (no replicas, or
// WithReplicas(n) each), each node a Server with its own directory and
// nodes.conf, started by StartCluster.
type Cluster struct {
	nodes    []*Server
	replicas int
}

// StartCluster starts ClusterSize cluster-enabled redis-server processes
// (cluster-node-timeout 2000 ms, each with ServiceUser), joins them with
// `redis-cli --cluster create` (slots split evenly, no replicas; with
// WithReplicas(n), ClusterSize*n more nodes as replicas) and waits until
// every node reports cluster_state:ok (and every replica is in sync). opts apply to every node;
// WithTLS is not supported (each node would have its own CA). Everything is
// killed by PID at test cleanup. Like Start, it skips the test (or fails it
// under QBRIDGE_REQUIRE_REDIS) when redis-server or redis-cli is missing.
func StartCluster(t testing.TB, opts ...Option) *Cluster {
	t.Helper()
	if hasTLS(opts) {
		t.Fatalf("redistest: StartCluster does not support WithTLS")
		return nil
	}
	cli := findRedisCLI()
	if cli == "" && findRedisServer() != "" {
		missing(t, "redis-cli not found next to redis-server or in PATH (it comes with redis-server: apt-get install -y redis-server)")
		return nil
	}
	c := &Cluster{replicas: clusterReplicas(opts)}
	if c.replicas < 0 {
		t.Fatalf("redistest: WithReplicas(%d)", c.replicas)
		return nil
	}
	nodeOpts := append(append([]Option(nil), opts...), stripReplicas(), withCluster())
	if c.replicas > 0 {
		// Full syncs start at once, not after the default 5 s wait for
		// more replicas.
		nodeOpts = append([]Option{WithArgs("--repl-diskless-sync-delay", "0")}, nodeOpts...)
	}
	for i := 0; i < ClusterSize*(1+c.replicas); i++ {
		c.nodes = append(c.nodes, Start(t, nodeOpts...))
	}
	args := []string{"--cluster", "create"}
	args = append(args, c.Addrs()...)
	args = append(args, "--cluster-replicas", strconv.Itoa(c.replicas), "--cluster-yes")
	ctx, cancel := context.WithTimeout(context.Background(), topologyTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("redistest: %s %s: %v\n%s", cli, strings.Join(args, " "), err, out)
		return nil
	}
	c.WaitOK(t)
	return c
}

// missing skips t, or fails it when QBRIDGE_REQUIRE_REDIS is set, because
// of what is missing.
func missing(t testing.TB, what string) {
	t.Helper()
	if requireRedis() {
		t.Fatalf("redistest: %s, and %s=%q requires real Redis", what, RequireEnv, os.Getenv(RequireEnv))
		return
	}
	t.Skipf("\n"+
		"########################################################################\n"+
		"### SKIPPING real-Redis test: %s\n"+
		"### or set %s=1 to make this a failure instead of a skip.\n"+
		"########################################################################", what, RequireEnv)
}

// Node returns node i (0 <= i < Len()), for Kill, Restart, Addr, ...
// Roles change with failovers: see NodeOf and MasterOf.
func (c *Cluster) Node(i int) *Server { return c.nodes[i] }

// Len returns the number of nodes: ClusterSize, times 1+n with
// WithReplicas(n).
func (c *Cluster) Len() int { return len(c.nodes) }

// Addrs returns the nodes' addresses, "127.0.0.1:PORT" each.
func (c *Cluster) Addrs() []string {
	out := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		out[i] = n.Addr()
	}
	return out
}

// URL returns the URL qbridged takes for the cluster, as ServiceUser:
// "redis-cluster://qbridge:<ServicePassword>@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3".
func (c *Cluster) URL() string {
	return fmt.Sprintf("redis-cluster://%s:%s@%s", ServiceUser, ServicePassword, strings.Join(c.Addrs(), ","))
}

// ServiceOptions returns go-redis cluster options as ServiceUser: what an
// in-process qbridge broker under test should use. Callers may set further
// fields.
func (c *Cluster) ServiceOptions() *redis.ClusterOptions {
	return &redis.ClusterOptions{Addrs: c.Addrs(), Username: ServiceUser, Password: ServicePassword}
}

// Client returns a cluster client as the default user (every permission;
// for the test's own inspection), closed at test cleanup.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	t.Helper()
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs(), MaxRetries: -1, DialTimeout: time.Second})
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// Kill kills node i with SIGKILL. The other nodes mark it failing after
// cluster-node-timeout; its slots are unserved until it is back.
func (c *Cluster) Kill(t testing.TB, i int) {
	t.Helper()
	c.nodes[i].Kill(t)
}

// Restart starts node i again (same port, directory and nodes.conf, so it
// rejoins with its slots; its data survives only with WithAOF) and waits
// until the whole cluster is ok again.
func (c *Cluster) Restart(t testing.TB, i int) {
	t.Helper()
	c.nodes[i].Restart(t)
	c.WaitOK(t)
}

// WaitOK waits until every node that runs answers CLUSTER INFO with
// cluster_state:ok and knows all the cluster's nodes, CLUSTER SLOTS of
// each covers all 16384 slots, every replica that runs is in sync with
// its master (master_link_status:up), and every master that runs and
// serves slots has a replica in sync as long as WithReplicas was given
// and its replicas run. Killed nodes are skipped (after a failover the
// others still know them, flagged fail).
func (c *Cluster) WaitOK(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(topologyTimeout)
	for {
		err := c.ok()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			var logs strings.Builder
			for _, n := range c.nodes {
				if n.running() {
					logs.WriteString(n.logTail())
				}
			}
			t.Fatalf("redistest: cluster not ok within %v: %v\n%s", topologyTimeout, err, logs.String())
			return
		}
		time.Sleep(pollInterval)
	}
}

// ok reports why the cluster is not (yet) healthy; see WaitOK.
func (c *Cluster) ok() error {
	for _, n := range c.nodes {
		if !n.running() {
			continue
		}
		if err := n.clusterOK(len(c.nodes)); err != nil {
			return fmt.Errorf("node %s: %w", n.Addr(), err)
		}
		if c.replicas == 0 {
			continue
		}
		if err := c.replicationOK(n); err != nil {
			return fmt.Errorf("node %s: %w", n.Addr(), err)
		}
	}
	return nil
}

// replicationOK reports why node n's replication is not settled: a
// replica not in sync, or a master with slots whose running replicas
// are not all connected.
func (c *Cluster) replicationOK(n *Server) error {
	pc := n.probeClient()
	defer pc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	info, err := pc.Info(ctx, "replication").Result()
	if err != nil {
		return err
	}
	if containsLine(info, "role:slave") {
		if !containsLine(info, "master_link_status:up") {
			return fmt.Errorf("replica not in sync with its master")
		}
		return nil
	}
	// A master: every running node that names it as its master must be
	// connected to it.
	nodes, err := pc.ClusterNodes(ctx).Result()
	if err != nil {
		return err
	}
	myID, want := "", 0
	for _, line := range strings.Split(nodes, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && strings.Contains(f[2], "myself") {
			myID = f[0]
		}
	}
	for _, line := range strings.Split(nodes, "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[3] == myID && !strings.Contains(f[2], "fail") {
			want++
		}
	}
	if !containsLine(info, "connected_slaves:"+strconv.Itoa(want)) {
		return fmt.Errorf("master has not its %d running replica(s) connected", want)
	}
	return nil
}

// running reports whether s's redis-server process runs (it was not
// killed or stopped).
func (s *Server) running() bool {
	p := s.current()
	return p != nil && !p.exited()
}

// clusterOK reports why s is not (yet) a member of a healthy cluster of
// known nodes.
func (s *Server) clusterOK(known int) error {
	c := s.probeClient()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	info, err := c.ClusterInfo(ctx).Result()
	if err != nil {
		return err
	}
	for _, want := range []string{"cluster_state:ok", "cluster_slots_assigned:16384", "cluster_known_nodes:" + strconv.Itoa(known)} {
		if !containsLine(info, want) {
			return fmt.Errorf("CLUSTER INFO lacks %s", want)
		}
	}
	slots, err := c.ClusterSlots(ctx).Result()
	if err != nil {
		return err
	}
	covered := 0
	for _, r := range slots {
		covered += r.End - r.Start + 1
	}
	if covered != 16384 {
		return fmt.Errorf("CLUSTER SLOTS covers %d slots", covered)
	}
	return nil
}

// probeClient is a short-lived single-connection client as the default
// user, for polling.
func (s *Server) probeClient() *redis.Client {
	return redis.NewClient(&redis.Options{Addr: s.Addr(), TLSConfig: s.tlsConfig(), MaxRetries: -1, PoolSize: 1,
		DialTimeout: 500 * time.Millisecond, ReadTimeout: time.Second, WriteTimeout: time.Second})
}

// NodeOf returns the index of the node that serves key's slot (its
// master), as a running node sees it.
func (c *Cluster) NodeOf(t testing.TB, key string) int {
	t.Helper()
	i, err := c.masterOf(key)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	return i
}

// MasterOf is NodeOf: the index of the master serving key's slot.
func (c *Cluster) MasterOf(t testing.TB, key string) int {
	t.Helper()
	return c.NodeOf(t, key)
}

// masterOf returns the index of the node the first running node names
// as the master of key's slot.
func (c *Cluster) masterOf(key string) (int, error) {
	pc, err := c.probe()
	if err != nil {
		return -1, err
	}
	defer pc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	slot, err := pc.ClusterKeySlot(ctx, key).Result()
	if err != nil {
		return -1, fmt.Errorf("CLUSTER KEYSLOT %q: %w", key, err)
	}
	return c.slotOwner(int(slot))
}

// slotOwner returns the index of the node the first running node names
// as the master of slot.
func (c *Cluster) slotOwner(slot int) (int, error) {
	pc, err := c.probe()
	if err != nil {
		return -1, err
	}
	defer pc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	slots, err := pc.ClusterSlots(ctx).Result()
	if err != nil {
		return -1, fmt.Errorf("CLUSTER SLOTS: %w", err)
	}
	for _, r := range slots {
		if r.Start <= slot && slot <= r.End && len(r.Nodes) > 0 {
			for i, m := range c.nodes {
				if r.Nodes[0].Addr == m.Addr() {
					return i, nil
				}
			}
			return -1, fmt.Errorf("slot %d is served by %s, none of the cluster's nodes", slot, r.Nodes[0].Addr)
		}
	}
	return -1, fmt.Errorf("no node serves slot %d", slot)
}

// probe returns a client of the first running node (the caller closes it).
func (c *Cluster) probe() (*redis.Client, error) {
	for _, n := range c.nodes {
		if n.running() {
			return n.probeClient(), nil
		}
	}
	return nil, fmt.Errorf("no cluster node runs")
}

// KillMasterOf kills, with SIGKILL (by PID), the master that serves
// key's slot, and returns its index. With WithReplicas, a replica of it
// takes over after cluster-node-timeout and an election: see
// WaitPromotion. Without replicas the slots stay unserved until Restart.
func (c *Cluster) KillMasterOf(t testing.TB, key string) int {
	t.Helper()
	i := c.NodeOf(t, key)
	c.nodes[i].Kill(t)
	return i
}

// WaitPromotion waits until the running nodes name a master other than
// node old for key's slot, that node answers as a master, and the
// cluster is ok again (WaitOK: cluster_state:ok on every running node,
// all slots covered, replicas in sync), and returns the new master's
// index. With the settings of StartCluster a failover takes a few
// seconds (cluster-node-timeout, then an election).
func (c *Cluster) WaitPromotion(t testing.TB, key string, old int) int {
	t.Helper()
	deadline := time.Now().Add(topologyTimeout)
	for {
		i, err := c.masterOf(key)
		if err == nil && i == old {
			err = fmt.Errorf("node %d (%s) still serves %q", old, c.nodes[old].Addr(), key)
		}
		if err == nil {
			err = c.nodes[i].isMaster()
		}
		if err == nil {
			err = c.ok()
		}
		if err == nil {
			return i
		}
		if time.Now().After(deadline) {
			var logs strings.Builder
			for _, n := range c.nodes {
				if n.running() {
					logs.WriteString(n.logTail())
				}
			}
			t.Fatalf("redistest: no failover from node %d (%s) within %v: %v\n%s", old, c.nodes[old].Addr(), topologyTimeout, err, logs.String())
			return -1
		}
		time.Sleep(pollInterval)
	}
}

// isMaster reports why s does not answer as a master.
func (s *Server) isMaster() error {
	c := s.probeClient()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	info, err := c.Info(ctx, "replication").Result()
	if err != nil {
		return err
	}
	if !containsLine(info, "role:master") {
		return fmt.Errorf("%s is not a master yet", s.Addr())
	}
	return nil
}

// Sentinel is a Redis master with one replica, watched by three
// sentinels (quorum 2, down-after-milliseconds 1000, failover-timeout
// 5000) under the master name MasterName. The data nodes have ServiceUser;
// the sentinels have no users or passwords (anyone on 127.0.0.1 may ask
// them where the master is). Sentinels and replicas talk to the data
// nodes as the default user, which has no password here.
type Sentinel struct {
	data      []*Server // the initial master first, then the replica
	sentinels []*Server
}

// MasterName is the name the sentinels of StartSentinel know the master by.
const MasterName = "qbridge"

// StartSentinel starts a master and a replica of it (opts apply to both;
// WithTLS is not supported) and three sentinels monitoring them, and
// waits until the replica is in sync and every sentinel knows the replica
// and the other two sentinels (so that a failover can be agreed on).
// Everything is killed by PID at test cleanup.
func StartSentinel(t testing.TB, opts ...Option) *Sentinel {
	t.Helper()
	if hasTLS(opts) {
		t.Fatalf("redistest: StartSentinel does not support WithTLS")
		return nil
	}
	s := &Sentinel{}
	// Full syncs start at once, not after the default 5 s wait for more
	// replicas.
	dataOpts := append(append([]Option(nil), opts...), WithArgs("--repl-diskless-sync-delay", "0"))
	master := Start(t, dataOpts...)
	_, mport, _ := net.SplitHostPort(master.Addr())
	replicaOpts := append(dataOpts, WithArgs("--replicaof", "127.0.0.1", mport))
	replica := Start(t, replicaOpts...)
	s.data = []*Server{master, replica}
	conf := fmt.Sprintf("sentinel monitor %[1]s 127.0.0.1 %[2]s 2\n"+
		"sentinel down-after-milliseconds %[1]s 1000\n"+
		"sentinel failover-timeout %[1]s 5000\n", MasterName, mport)
	for i := 0; i < 3; i++ {
		s.sentinels = append(s.sentinels, Start(t, withoutTLS(), func(c *config) { c.sentinel = conf }))
	}
	deadline := time.Now().Add(topologyTimeout)
	for _, sn := range s.sentinels {
		for {
			err := sn.sentinelReady()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("redistest: sentinel %s not ready within %v: %v\n%s", sn.Addr(), topologyTimeout, err, sn.logTail())
				return nil
			}
			time.Sleep(pollInterval)
		}
	}
	return s
}

// sentinelReady reports why sentinel s cannot take part in a failover yet.
func (s *Server) sentinelReady() error {
	c := redis.NewSentinelClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1, PoolSize: 1,
		DialTimeout: 500 * time.Millisecond, ReadTimeout: time.Second, WriteTimeout: time.Second})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	m, err := c.Master(ctx, MasterName).Result()
	if err != nil {
		return err
	}
	if m["num-slaves"] != "1" || m["num-other-sentinels"] != "2" {
		return fmt.Errorf("it knows %s replicas and %s other sentinels", m["num-slaves"], m["num-other-sentinels"])
	}
	if strings.Contains(m["flags"], "down") {
		return fmt.Errorf("master flags %q", m["flags"])
	}
	reps, err := c.Replicas(ctx, MasterName).Result()
	if err != nil {
		return err
	}
	if len(reps) != 1 || reps[0]["master-link-status"] != "ok" || strings.Contains(reps[0]["flags"], "down") {
		return fmt.Errorf("replica not in sync: %v", reps)
	}
	return nil
}

// MasterName returns the name the sentinels know the master by.
func (s *Sentinel) MasterName() string { return MasterName }

// SentinelAddrs returns the sentinels' addresses.
func (s *Sentinel) SentinelAddrs() []string {
	out := make([]string, len(s.sentinels))
	for i, n := range s.sentinels {
		out[i] = n.Addr()
	}
	return out
}

// Data returns the data nodes: the initial master, then the initial
// replica (roles change with failovers: see MasterAddr).
func (s *Sentinel) Data() []*Server { return s.data }

// URL returns the URL qbridged takes for this setup, as ServiceUser:
// "redis-sentinel://qbridge:<ServicePassword>@S1,S2,S3/0?master=qbridge".
func (s *Sentinel) URL() string {
	return fmt.Sprintf("redis-sentinel://%s:%s@%s/0?master=%s", ServiceUser, ServicePassword,
		strings.Join(s.SentinelAddrs(), ","), MasterName)
}

// ServiceOptions returns go-redis failover options as ServiceUser: what
// an in-process qbridge broker under test should use. Callers may set
// further fields.
func (s *Sentinel) ServiceOptions() *redis.FailoverOptions {
	return &redis.FailoverOptions{MasterName: MasterName, SentinelAddrs: s.SentinelAddrs(),
		Username: ServiceUser, Password: ServicePassword}
}

// Client returns a failover client as the default user (every
// permission; for the test's own inspection), closed at test cleanup. It
// follows failovers.
func (s *Sentinel) Client(t testing.TB) *redis.Client {
	t.Helper()
	c := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: MasterName, SentinelAddrs: s.SentinelAddrs(),
		MaxRetries: -1, DialTimeout: time.Second})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// MasterAddr returns the master's address as the sentinels agree on it
// (all those that answer name the same one).
func (s *Sentinel) MasterAddr(t testing.TB) string {
	t.Helper()
	addr, err := s.masterAddr()
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	return addr
}

func (s *Sentinel) masterAddr() (string, error) {
	seen := ""
	for _, sn := range s.sentinels {
		c := redis.NewSentinelClient(&redis.Options{Addr: sn.Addr(), MaxRetries: -1, PoolSize: 1,
			DialTimeout: 500 * time.Millisecond, ReadTimeout: time.Second, WriteTimeout: time.Second})
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		hp, err := c.GetMasterAddrByName(ctx, MasterName).Result()
		cancel()
		_ = c.Close()
		if err != nil || len(hp) != 2 {
			continue // a sentinel may be down; the others decide
		}
		addr := net.JoinHostPort(hp[0], hp[1])
		if seen != "" && seen != addr {
			return "", fmt.Errorf("sentinels disagree on the master: %s and %s", seen, addr)
		}
		seen = addr
	}
	if seen == "" {
		return "", fmt.Errorf("no sentinel names a master for %q", MasterName)
	}
	return seen, nil
}

// Master returns the data node that is the master now.
func (s *Sentinel) Master(t testing.TB) *Server {
	t.Helper()
	addr := s.MasterAddr(t)
	for _, d := range s.data {
		if d.Addr() == addr {
			return d
		}
	}
	t.Fatalf("redistest: the master %s is none of the data nodes", addr)
	return nil
}

// KillMaster kills the current master with SIGKILL and returns its
// address; see WaitPromotion.
func (s *Sentinel) KillMaster(t testing.TB) string {
	t.Helper()
	m := s.Master(t)
	m.Kill(t)
	return m.Addr()
}

// WaitPromotion waits until every sentinel names a master other than old
// and that node answers as a master, and returns its address. With the
// settings of StartSentinel a failover takes a few seconds.
func (s *Sentinel) WaitPromotion(t testing.TB, old string) string {
	t.Helper()
	deadline := time.Now().Add(topologyTimeout)
	var lastErr error
	for {
		addr, err := s.masterAddr()
		if err == nil && addr == old {
			err = fmt.Errorf("the sentinels still name %s", old)
		}
		if err == nil {
			err = s.isMaster(addr)
		}
		if err == nil {
			return addr
		}
		lastErr = err
		if time.Now().After(deadline) {
			var logs strings.Builder
			for _, sn := range s.sentinels {
				logs.WriteString(sn.logTail())
			}
			t.Fatalf("redistest: no failover from %s within %v: %v\n%s", old, topologyTimeout, lastErr, logs.String())
			return ""
		}
		time.Sleep(pollInterval)
	}
}

// isMaster reports why the data node at addr is not a master.
func (s *Sentinel) isMaster(addr string) error {
	for _, d := range s.data {
		if d.Addr() != addr {
			continue
		}
		c := d.probeClient()
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		info, err := c.Info(ctx, "replication").Result()
		if err != nil {
			return err
		}
		if !containsLine(info, "role:master") {
			return fmt.Errorf("%s is not a master yet", addr)
		}
		return nil
	}
	return fmt.Errorf("%s is none of the data nodes", addr)
}
