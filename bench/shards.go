package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// ---- shards: sharded queues on Redis Clusters of 1, 2, 3 masters ----
//
// For each cluster size the harness starts a Redis Cluster of that many
// masters and an in-process qbridge over it, and measures a steady
// produce+consume load: producers EnqueueBatch while consumers Consume
// (a large max_in_flight) and Ack in batches, with at most a bounded
// backlog of produced-but-unacked messages, so throughput is messages that
// went all the way through per second. Once on an unsharded queue, once on
// a queue of ShardCount shards; next to each, the direct go-redis
// counterpart on the same cluster: RPUSH of whole batches and BLMPOP COUNT
// on one list, and the same spread over ShardCount lists in slots of
// different masters. INFO CPU of every master, before and after each
// measured run, shows where the Redis work went.

// Defaults of the shards scenario (Config fields left zero).
var (
	DefaultShardMasters = []int{1, 2, 3}
	// DefaultShardPayloads are two regimes on a small machine: with 100
	// bytes the harness process (clients and server) costs about what
	// Redis does per message, so the machine's cores are the limit before
	// a second master can help; with 4 KiB, Redis does most of the work
	// per message and one master is the limit of an unsharded queue.
	DefaultShardPayloads = []int{100, 4096}
)

const (
	// DefaultShardCount is the sharded queue's shard count: the same at
	// every cluster size, so that only the masters change, and a multiple
	// of 1, 2 and 3, so that every master gets as many shards.
	DefaultShardCount = 6
	// The load: enough producers, batches and streams that one master
	// saturates under an unsharded queue (measured on 2 vCPUs: its Redis
	// at 0.92-0.98 cores, against 0.8 with 4 producers of 200 and 4
	// streams), and that a sharded queue keeps more masters busy (with 4
	// KiB payloads on 3 masters, 32 producers of 250 and 16 streams did
	// 32k/s where 16 of 500 and 8 streams did 30.6k/s, as on 1 master).
	DefaultShardProducers = 32
	DefaultShardConsumers = 16
	DefaultShardBatch     = 250
	DefaultShardWindow    = 1024 // qbridged's --max-in-flight default

	// flowStall bounds how long the backlog left at the end of a run may
	// go without a message consumed before the run counts as lost.
	flowStall = 10 * time.Second
	// maxAckTokens is the most tokens one Ack call carries (the server's
	// limit, its --max-batch default).
	maxAckTokens = 1000
	// directPopTimeout is how long a direct consumer's BLMPOP blocks on an
	// empty list (Redis takes fractions of seconds).
	directPopTimeout = "0.05"
)

// ClusterRow is what a row of the shards scenario adds.
type ClusterRow struct {
	Masters int `json:"masters"`
	// Shards is the qbridge queue's shard count asked for (1: unsharded),
	// and the number of direct lists.
	Shards int `json:"shards"`
	// ServerShards is how many shards the server reports for the queue
	// (GetQueueStats.shards; 1 when it lists none).
	ServerShards int `json:"server_shards"`
	// QbridgePlacement and DirectPlacement count the qbridge queue's
	// shards (their ready lists) and the direct lists on each master.
	QbridgePlacement []int `json:"qbridge_placement"`
	DirectPlacement  []int `json:"direct_placement"`
	// The load: producers each send batches of Batch messages while at
	// most Backlog messages are produced and not yet consumed; qbridge
	// consumers are Consume streams with max_in_flight Window, each acking
	// what it got in batched Ack calls; direct consumers BLMPOP COUNT Batch
	// (at least one per list).
	Producers       int `json:"producers"`
	Consumers       int `json:"consumers"`
	DirectConsumers int `json:"direct_consumers"`
	Batch           int `json:"batch"`
	Window          int `json:"window"`
	Backlog         int `json:"backlog"`
	// CPU use over the measured runs (warm-up excluded).
	QbridgeCPU *CPUUse `json:"qbridge_cpu"`
	DirectCPU  *CPUUse `json:"direct_cpu"`
	// QbridgeMessages and DirectMessages count the messages of the
	// measured runs, each produced and then consumed exactly once (those
	// consumed after the measured time included: not only the rate's).
	QbridgeMessages int64 `json:"qbridge_messages"`
	DirectMessages  int64 `json:"direct_messages"`
	// QbridgeCeiling and DirectCeiling are derived, not measured: the
	// median rate over the busiest master's cores, i.e. the rate at which
	// that master's Redis would be saturated (1.0 core) if CPU per message
	// stayed the same and the clients kept up. Where the measured rate is
	// bound by the machine rather than by Redis, this is what the cluster
	// itself could take.
	QbridgeCeiling float64 `json:"qbridge_redis_ceiling"`
	DirectCeiling  float64 `json:"direct_redis_ceiling"`
}

// ceiling is rate over the busiest master's cores (0 if none was busy).
func ceiling(rate float64, u *CPUUse) float64 {
	busiest := 0.0
	for _, v := range u.MasterCores {
		busiest = max(busiest, v)
	}
	if busiest <= 0 {
		return 0
	}
	return rate / busiest
}

// CPUUse is where CPU went during the measured runs of one side.
type CPUUse struct {
	// MasterCores is each master's CPU time (INFO CPU used_cpu_user +
	// used_cpu_sys) per second of run: 1.0 is a saturated Redis main
	// thread. MasterShare is each master's part of their sum.
	MasterCores []float64 `json:"master_cores"`
	MasterShare []float64 `json:"master_share"`
	// HarnessCores is the qbench process's CPU time per second (harness,
	// clients and the in-process server); HostCores the whole machine's
	// busy time per second. -1 where /proc is missing.
	HarnessCores float64 `json:"harness_cores"`
	HostCores    float64 `json:"host_cores"`
}

// shardParams are the shards scenario's settings with defaults applied.
type shardParams struct {
	masters                             []int
	shards                              int
	producers, consumers, batch, window int
	duration, warmup                    time.Duration
	repeat                              int
	payloads                            []int
	keyPrefix                           string
	progress                            func(format string, a ...any)
}

func shardParamsOf(cfg Config, logf func(string, ...any)) (shardParams, error) {
	p := shardParams{
		masters:   cfg.ShardMasters,
		shards:    cfg.ShardCount,
		producers: cfg.ShardProducers,
		consumers: cfg.ShardConsumers,
		batch:     cfg.ShardBatch,
		window:    cfg.ShardWindow,
		duration:  cfg.ShardDuration,
		warmup:    cfg.Warmup,
		repeat:    cfg.Repeat,
		payloads:  cfg.ShardPayloads,
		keyPrefix: cfg.KeyPrefix,
		progress:  logf,
	}
	if len(p.masters) == 0 {
		p.masters = DefaultShardMasters
	}
	if len(p.payloads) == 0 {
		p.payloads = DefaultShardPayloads
	}
	for _, size := range p.payloads {
		if size < 8 || size > 64<<10 {
			return p, fmt.Errorf("shards: payload %d: want 8 bytes (a sequence number) to 64 KiB", size)
		}
	}
	p.shards = orDefault(p.shards, DefaultShardCount)
	p.producers = orDefault(p.producers, DefaultShardProducers)
	p.consumers = orDefault(p.consumers, DefaultShardConsumers)
	p.batch = orDefault(p.batch, DefaultShardBatch)
	p.window = orDefault(p.window, DefaultShardWindow)
	if p.duration <= 0 {
		p.duration = cfg.Duration
	}
	for _, m := range p.masters {
		if m < 1 || m > 16 {
			return p, fmt.Errorf("shards: a cluster of %d masters: want 1 to 16", m)
		}
	}
	switch {
	case p.shards < 2 || p.shards > broker.MaxShards:
		return p, fmt.Errorf("shards: %d shards: want 2 to %d", p.shards, broker.MaxShards)
	case p.batch < 1 || p.batch > 1000:
		return p, fmt.Errorf("shards: batch %d: want 1 to 1000 (qbridged's --max-batch default)", p.batch)
	case p.window < 1 || p.window > DefaultShardWindow:
		return p, fmt.Errorf("shards: window %d: want 1 to %d", p.window, DefaultShardWindow)
	case p.producers < 1 || p.consumers < 1:
		return p, fmt.Errorf("shards: need producers and consumers")
	}
	return p, nil
}

// maxBacklogBytes bounds the payload bytes produced and not consumed.
const maxBacklogBytes = 32 << 20

// backlogFor returns how many messages of size bytes may be produced and
// not yet consumed: room for every consumer's full window twice over and
// for every producer to have two batches under way, so that neither side
// waits for the other while Redis keeps up, but at most maxBacklogBytes of
// payload (and never less than one batch per producer).
func (p shardParams) backlogFor(size int) int {
	n := min(max(p.consumers*p.window*2, p.producers*p.batch*2), maxBacklogBytes/size)
	return max(n, p.producers*p.batch)
}

func orDefault(v, d int) int {
	if v <= 0 {
		return d
	}
	return v
}

// runShards runs the shards scenario; it returns the rows measured so far
// with any error.
func runShards(ctx context.Context, cfg Config, logf func(string, ...any)) ([]Row, error) {
	p, err := shardParamsOf(cfg, logf)
	if err != nil {
		return nil, err
	}
	if err := broker.CheckClusterPrefix(p.keyPrefix); err != nil {
		return nil, fmt.Errorf("shards: %w", err)
	}
	var rows []Row
	for _, m := range p.masters {
		logf("  shards: starting a Redis Cluster of %d master(s)", m)
		ce, err := newClusterEnv(ctx, p, m)
		if err != nil {
			return rows, fmt.Errorf("shards, %d masters: %w", m, err)
		}
		more, err := ce.measureAll(ctx)
		ce.close()
		rows = append(rows, more...)
		if err != nil {
			return rows, fmt.Errorf("shards, %d masters: %w", m, err)
		}
	}
	return rows, nil
}

// clusterEnv is one cluster with a direct cluster client and an in-process
// qbridge server on it.
type clusterEnv struct {
	p       shardParams
	masters int
	c       *redisCluster
	direct  *redis.ClusterClient

	srvRDB, srvBlocking *redis.ClusterClient
	srv                 *server.Server
	gs                  *grpc.Server
	served              chan error
	conns               []*grpc.ClientConn
	qc                  qbridgev1.QueueServiceClient
	admin               qbridgev1.AdminServiceClient

	seq int
}

func newClusterEnv(ctx context.Context, p shardParams, masters int) (_ *clusterEnv, err error) {
	ce := &clusterEnv{p: p, masters: masters}
	defer func() {
		if err != nil {
			ce.close()
		}
	}()
	if ce.c, err = startCluster(ctx, masters); err != nil {
		return nil, err
	}
	addrs := ce.c.addrs()
	// The cluster clients as qbridged makes them (cmd/qbridged
	// newRedisClient): go-redis defaults, the slot map re-read every
	// second, and a blocking pool of DefaultBlockingWaits+2 per node.
	ce.direct = redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, PoolSize: 256, ClientName: directClientName,
		ClusterStateReloadInterval: time.Second})
	if err := ce.direct.Ping(ctx).Err(); err != nil {
		return nil, fmt.Errorf("cluster %v: %w", addrs, err)
	}
	ce.srvRDB = redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, ClientName: serverClientName,
		ClusterStateReloadInterval: time.Second})
	ce.srvBlocking = redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, ClientName: serverClientName,
		PoolSize: server.DefaultBlockingWaits + 2, ClusterStateReloadInterval: time.Second})
	b := broker.New(ce.srvRDB, broker.WithKeyPrefix(p.keyPrefix+"q:"), broker.WithBlockingClient(ce.srvBlocking))
	if err := b.LoadScripts(ctx); err != nil {
		return nil, err
	}
	ce.srv = server.New(b, server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	ce.srv.Start()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	ce.gs = grpc.NewServer()
	qbridgev1.RegisterQueueServiceServer(ce.gs, ce.srv)
	qbridgev1.RegisterAdminServiceServer(ce.gs, ce.srv.Admin())
	healthpb.RegisterHealthServer(ce.gs, health.NewServer())
	ce.served = make(chan error, 1)
	go func() { ce.served <- ce.gs.Serve(lis) }()
	for i := 0; i < 8; i++ {
		cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, err
		}
		ce.conns = append(ce.conns, cc)
	}
	ce.qc = qbridgev1.NewQueueServiceClient(ce.conns[0])
	ce.admin = qbridgev1.NewAdminServiceClient(ce.conns[0])
	return ce, nil
}

func (ce *clusterEnv) qcN(i int) qbridgev1.QueueServiceClient {
	return qbridgev1.NewQueueServiceClient(ce.conns[i%len(ce.conns)])
}

func (ce *clusterEnv) name(kind string) string {
	ce.seq++
	return fmt.Sprintf("bench-%s-%d", kind, ce.seq)
}

// nameOnFirst returns a fresh name whose key (key(name)) is on master 0,
// so that every run of an unsharded side loads the same master.
func (ce *clusterEnv) nameOnFirst(ctx context.Context, kind string, key func(string) string) (string, error) {
	for try := 0; try < 1000; try++ {
		n := ce.name(kind)
		i, err := ce.c.masterOf(ctx, key(n))
		if err != nil {
			return "", err
		}
		if i == 0 {
			return n, nil
		}
	}
	return "", fmt.Errorf("no %s name on the first master", kind)
}

func (ce *clusterEnv) close() {
	for _, c := range ce.conns {
		_ = c.Close()
	}
	if ce.gs != nil {
		ce.gs.Stop()
		<-ce.served
	}
	if ce.srv != nil {
		ce.srv.Close()
	}
	for _, c := range []*redis.ClusterClient{ce.direct, ce.srvRDB, ce.srvBlocking} {
		if c != nil {
			_ = c.Close()
		}
	}
	if ce.c != nil {
		ce.c.stop()
	}
}

// measureAll measures, for every payload size, the unsharded and the
// sharded queue next to their direct counterparts. The four sides take
// turns (a warm-up each, then round after round of one run each), so that
// a burst of other load on the machine falls on all of them alike rather
// than on one.
func (ce *clusterEnv) measureAll(ctx context.Context) ([]Row, error) {
	p := ce.p
	var rows []Row
	for _, size := range p.payloads {
		type pair struct {
			shards       int
			q, d         *sideRuns
			qPlace       []int
			dPlace       []int
			serverShards int
		}
		var pairs []*pair
		var sides []*sideRuns
		for _, shards := range []int{1, p.shards} {
			pr := &pair{shards: shards}
			pr.q = ce.newSide("Consume+Ack of EnqueueBatch", func(ctx context.Context, size int, dur time.Duration, ramp bool) (flowSample, error) {
				x, place, n, err := ce.qbFlow(ctx, size, dur, ramp, shards)
				pr.qPlace, pr.serverShards = place, n
				return x, err
			})
			pr.d = ce.newSide("BLMPOP of RPUSH", func(ctx context.Context, size int, dur time.Duration, ramp bool) (flowSample, error) {
				x, place, err := ce.directFlow(ctx, size, dur, ramp, shards)
				pr.dPlace = place
				return x, err
			})
			pairs = append(pairs, pr)
			sides = append(sides, pr.q, pr.d)
		}
		if p.warmup > 0 {
			for _, sd := range sides {
				if err := ce.c.flush(ctx); err != nil {
					return rows, err
				}
				if _, err := sd.run(ctx, size, p.warmup, false); err != nil {
					return rows, fmt.Errorf("%s (warm-up): %w", sd.label, err)
				}
			}
		}
		for i := 0; i < p.repeat; i++ {
			for _, sd := range sides {
				if err := ce.c.flush(ctx); err != nil {
					return rows, err
				}
				x, err := sd.run(ctx, size, p.duration, true)
				if err != nil {
					return rows, fmt.Errorf("%s: %w", sd.label, err)
				}
				sd.add(x)
			}
		}
		for _, pr := range pairs {
			qs, qcpu, qn := pr.q.result()
			ds, dcpu, dn := pr.d.result()
			what := "unsharded vs 1 list"
			if pr.shards > 1 {
				what = fmt.Sprintf("%d shards vs %d lists", pr.shards, pr.shards)
			}
			r := Row{Scenario: fmt.Sprintf("shards m=%d %s", ce.masters, what), Payload: size, Qbridge: qs, Direct: ds,
				Cluster: &ClusterRow{Masters: ce.masters, Shards: pr.shards, ServerShards: pr.serverShards,
					QbridgePlacement: pr.qPlace, DirectPlacement: pr.dPlace,
					Producers: p.producers, Consumers: p.consumers, DirectConsumers: directConsumers(p.consumers, pr.shards),
					Batch: p.batch, Window: p.window, Backlog: p.backlogFor(size), QbridgeCPU: qcpu, DirectCPU: dcpu,
					QbridgeMessages: qn, DirectMessages: dn,
					QbridgeCeiling: ceiling(qs.Median, qcpu), DirectCeiling: ceiling(ds.Median, dcpu)}}
			if ds.Median > 0 {
				r.Ratio = qs.Median / ds.Median
			}
			rows = append(rows, r)
			p.progress("  %-34s %5dB  qbridge %10.0f/s  direct %10.0f/s  ratio %.2f  Redis cores/master q %s d %s%s", r.Scenario, size,
				qs.Median, ds.Median, r.Ratio, fmtCores(qcpu.MasterCores), fmtCores(dcpu.MasterCores), shardWarning(r.Cluster))
		}
	}
	return rows, nil
}

func shardWarning(c *ClusterRow) string {
	if c.ServerShards != c.Shards {
		return fmt.Sprintf("  (the server reports %d shard(s), %d asked)", c.ServerShards, c.Shards)
	}
	return ""
}

// flowSample is one measured run with the CPU it used.
type flowSample struct {
	sample
	total       int64 // messages produced and consumed, the tail included
	elapsed     time.Duration
	masterCPU   []float64 // seconds per master
	harnessCPU  float64   // seconds, -1 unknown
	hostBusyCPU float64   // seconds, -1 unknown
}

// sideRuns collects the measured runs of one side: samples, and CPU use
// and messages summed over them.
type sideRuns struct {
	label string
	run   func(ctx context.Context, size int, dur time.Duration, ramp bool) (flowSample, error)
	ss    []sample
	cpu   []float64 // seconds per master
	self  float64   // seconds, -1 unknown
	host  float64   // seconds, -1 unknown
	el    time.Duration
	msgs  int64
}

func (ce *clusterEnv) newSide(label string, run func(ctx context.Context, size int, dur time.Duration, ramp bool) (flowSample, error)) *sideRuns {
	return &sideRuns{label: label, run: run, cpu: make([]float64, ce.masters)}
}

func (sd *sideRuns) add(x flowSample) {
	sd.ss = append(sd.ss, x.sample)
	sd.el += x.elapsed
	sd.msgs += x.total
	for j, v := range x.masterCPU {
		sd.cpu[j] += v
	}
	if sd.self >= 0 {
		sd.self = addKnown(sd.self, x.harnessCPU)
	}
	if sd.host >= 0 {
		sd.host = addKnown(sd.host, x.hostBusyCPU)
	}
}

// result returns the side's series, its CPU use per second of measured
// run, and its messages.
func (sd *sideRuns) result() (*Series, *CPUUse, int64) {
	sec := sd.el.Seconds()
	use := &CPUUse{MasterCores: make([]float64, len(sd.cpu)), MasterShare: make([]float64, len(sd.cpu)), HarnessCores: -1, HostCores: -1}
	var total float64
	for _, v := range sd.cpu {
		total += v
	}
	for j, v := range sd.cpu {
		if total > 0 {
			use.MasterShare[j] = v / total
		}
		if sec > 0 {
			use.MasterCores[j] = v / sec
		}
	}
	if sd.self >= 0 && sec > 0 {
		use.HarnessCores = sd.self / sec
	}
	if sd.host >= 0 && sec > 0 {
		use.HostCores = sd.host / sec
	}
	return summarize(sd.label, "", sd.ss), use, sd.msgs
}

func addKnown(sum, v float64) float64 {
	if v < 0 {
		return -1
	}
	return sum + v
}

// cpuMark is a reading of every CPU counter the scenario reports.
type cpuMark struct {
	at            time.Time
	masters       []float64
	harness, host float64
}

func (ce *clusterEnv) cpuMark(ctx context.Context) (cpuMark, error) {
	m := cpuMark{harness: procCPUSeconds(), host: hostBusySeconds()}
	var err error
	m.masters, err = ce.c.cpuSeconds(ctx)
	m.at = time.Now()
	return m, err
}

// ---- the load ----

// flow is one run of the load: producers take a credit per batch (at most
// backlog/batch batches produced and not consumed), consumers settle
// messages and give credits back. Every message carries a sequence
// number; a number seen twice, or never, fails the run.
type flow struct {
	batch   int
	credits chan struct{}

	mu       sync.Mutex
	got      []bool
	issued   int64 // sequence numbers handed out
	count    int64 // distinct ones settled
	dups     int64 // settled twice, or never issued
	returned int64 // credits given back
}

func newFlow(batch, backlog int) *flow {
	n := max(1, backlog/batch)
	f := &flow{batch: batch, credits: make(chan struct{}, n)}
	for i := 0; i < n; i++ {
		f.credits <- struct{}{}
	}
	return f
}

// issue returns the first of batch fresh sequence numbers.
func (f *flow) issue() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	base := f.issued
	f.issued += int64(f.batch)
	for int64(len(f.got)) < f.issued {
		f.got = append(f.got, false)
	}
	return uint64(base)
}

// settle records consumed messages and gives back the credits of whole
// batches.
func (f *flow) settle(seqs []uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range seqs {
		if s >= uint64(f.issued) || f.got[s] {
			f.dups++
			continue
		}
		f.got[s] = true
		f.count++
	}
	// Never more than were taken: the channel cannot be full here.
	for f.count-f.returned*int64(f.batch) >= int64(f.batch) {
		f.returned++
		f.credits <- struct{}{}
	}
}

func (f *flow) counts() (issued, count, dups int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.issued, f.count, f.dups
}

func (f *flow) check(what string) error {
	issued, count, dups := f.counts()
	if count != issued || dups != 0 {
		return fmt.Errorf("%w: %s: %d of %d messages consumed, %d duplicates or unknown", errLost, what, count, issued, dups)
	}
	return nil
}

type (
	// produceFunc sends one batch (producer w).
	produceFunc func(ctx context.Context, w int, msgs [][]byte) error
	// consumeFunc consumes until ctx ends, settling into f (consumer w);
	// it returns nil when it ends because ctx did.
	consumeFunc func(ctx context.Context, w int, f *flow) error
)

// rampTimeout bounds a run's ramp (see runFlow).
const rampTimeout = 30 * time.Second

// runFlow runs producers and consumers, then lets the consumers finish the
// backlog and checks every message was consumed exactly once. With ramp,
// the measured time dur starts once a whole backlog has been consumed:
// at first the producers fill the backlog at once, a burst that would
// otherwise weigh on the rate (at 4 KiB, about a second of Redis time), so
// the rate is that of the steady state. The rate is the messages consumed
// within dur, per second.
func (ce *clusterEnv) runFlow(ctx context.Context, size int, dur time.Duration, ramp bool, consumers int, produce produceFunc, consume consumeFunc, what string) (flowSample, error) {
	p := ce.p
	backlog := p.backlogFor(size)
	f := newFlow(p.batch, backlog)
	runCtx, abort := context.WithCancel(ctx)
	defer abort()
	cctx, stopConsumers := context.WithCancel(runCtx)
	defer stopConsumers()
	var (
		errMu    sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
		abort()
	}
	var cwg sync.WaitGroup
	for w := 0; w < consumers; w++ {
		cwg.Add(1)
		go func() {
			defer cwg.Done()
			if err := consume(cctx, w, f); err != nil && cctx.Err() == nil {
				fail(fmt.Errorf("consumer %d: %w", w, err))
			}
		}()
	}
	stop := make(chan struct{})
	var pwg sync.WaitGroup
	for w := 0; w < p.producers; w++ {
		pwg.Add(1)
		go func() {
			defer pwg.Done()
			for {
				select {
				case <-f.credits:
				case <-stop:
					return
				case <-runCtx.Done():
					return
				}
				select {
				case <-stop:
					return
				default:
				}
				base := f.issue()
				msgs := make([][]byte, p.batch)
				for j := range msgs {
					msgs[j] = payload(size, base+uint64(j))
				}
				if err := produce(runCtx, w, msgs); err != nil {
					if runCtx.Err() == nil {
						fail(fmt.Errorf("producer %d: %w", w, err))
					}
					return
				}
			}
		}()
	}
	if ramp {
		// (Past the timeout, the measurement starts anyway.)
		waitFor(runCtx, rampTimeout, func() bool { _, c, _ := f.counts(); return c >= int64(backlog) })
	}
	_, start, _ := f.counts()
	before, markErr := ce.cpuMark(ctx)
	if markErr != nil {
		fail(markErr)
	}
	timer := time.NewTimer(dur)
	select {
	case <-timer.C:
	case <-runCtx.Done():
		timer.Stop()
	}
	_, end, _ := f.counts()
	after, err := ce.cpuMark(ctx)
	if err != nil {
		fail(err)
	}
	close(stop)
	pwg.Wait()
	// The backlog left: consumed after the measured time, for the check.
	// Producers have stopped: issued is final. Wait as long as messages
	// keep coming; a shortfall is reported by check below.
	for {
		issued, last, dups := f.counts()
		if last+dups >= issued || runCtx.Err() != nil {
			break
		}
		if !waitFor(runCtx, flowStall, func() bool { _, c, _ := f.counts(); return c != last }) {
			break
		}
	}
	stopConsumers()
	cwg.Wait()
	errMu.Lock()
	err = firstErr
	errMu.Unlock()
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil {
		return flowSample{}, err
	}
	if err := f.check(what); err != nil {
		return flowSample{}, err
	}
	issued, _, _ := f.counts()
	el := after.at.Sub(before.at)
	x := flowSample{sample: sample{ops: float64(end-start) / el.Seconds(), n: end - start}, total: issued, elapsed: el,
		harnessCPU: -1, hostBusyCPU: -1}
	for i := range after.masters {
		x.masterCPU = append(x.masterCPU, after.masters[i]-before.masters[i])
	}
	if before.harness >= 0 && after.harness >= 0 {
		x.harnessCPU = after.harness - before.harness
	}
	if before.host >= 0 && after.host >= 0 {
		x.hostBusyCPU = after.host - before.host
	}
	return x, nil
}

// qbFlow runs the load through qbridge on a fresh queue of shards shards
// (1: unsharded). It returns the sample, where the queue's shards are
// (count per master) and how many shards the server reports.
func (ce *clusterEnv) qbFlow(ctx context.Context, size int, dur time.Duration, ramp bool, shards int) (flowSample, []int, int, error) {
	q := ce.name(fmt.Sprintf("shards%d", shards))
	if shards == 1 {
		var err error
		if q, err = ce.nameOnFirst(ctx, "unsharded", func(n string) string { return ce.p.keyPrefix + "q:" + n }); err != nil {
			return flowSample{}, nil, 0, err
		}
	} else {
		if _, err := ce.admin.UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: q,
			Config: &qbridgev1.QueueConfig{Shards: uint32(shards)}}); err != nil {
			return flowSample{}, nil, 0, fmt.Errorf("UpdateQueueConfig shards=%d: %w", shards, err)
		}
	}
	n := ce.p.batch
	x, err := ce.runFlow(ctx, size, dur, ramp, ce.p.consumers, func(ctx context.Context, w int, msgs [][]byte) error {
		bm := make([]*qbridgev1.BatchMessage, len(msgs))
		for i, m := range msgs {
			bm[i] = &qbridgev1.BatchMessage{Payload: m}
		}
		r, err := ce.qcN(w).EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: bm})
		if err == nil && len(r.GetIds()) != n {
			err = fmt.Errorf("EnqueueBatch returned %d ids for %d messages", len(r.GetIds()), n)
		}
		return err
	}, ce.qbConsumer(q), fmt.Sprintf("qbridge queue %s (%d shards asked)", q, shards))
	st, serr := ce.qc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil {
		if errors.Is(err, errLost) && serr == nil {
			err = fmt.Errorf("%w; the queue now: %s", err, statsText(st))
		}
		return x, nil, 0, err
	}
	if serr != nil {
		return x, nil, 0, fmt.Errorf("GetQueueStats: %w", serr)
	}
	if st.GetReady() != 0 || st.GetInFlight() != 0 {
		return x, nil, 0, fmt.Errorf("%w: after the run, queue %s still has %d ready and %d in flight", errLost, q, st.GetReady(), st.GetInFlight())
	}
	lists := []string{q}
	if len(st.GetShards()) > 0 {
		lists = lists[:0]
		for _, s := range st.GetShards() {
			if s.GetReady() != 0 || s.GetInFlight() != 0 {
				return x, nil, 0, fmt.Errorf("%w: after the run, shard %d (%s) of queue %s still has %d ready and %d in flight", errLost, s.GetShard(), s.GetList(), q, s.GetReady(), s.GetInFlight())
			}
			lists = append(lists, s.GetList())
		}
	}
	place := make([]int, ce.masters)
	for _, l := range lists {
		i, err := ce.c.masterOf(ctx, ce.p.keyPrefix+"q:"+l)
		if err != nil {
			return x, nil, 0, err
		}
		place[i]++
	}
	return x, place, len(lists), nil
}

// statsText summarizes GetQueueStats, per shard too.
func statsText(st *qbridgev1.GetQueueStatsResponse) string {
	s := fmt.Sprintf("%d ready, %d in flight, %d delayed, %d dead, %d shards listed", st.GetReady(), st.GetInFlight(), st.GetDelayed(), st.GetDead(), len(st.GetShards()))
	for _, sh := range st.GetShards() {
		s += fmt.Sprintf("; shard %d (%s): %d ready, %d in flight", sh.GetShard(), sh.GetList(), sh.GetReady(), sh.GetInFlight())
	}
	return s
}

// qbConsumer is a Consume stream with a large window whose deliveries an
// acker goroutine acks in batches (whatever arrived while the previous Ack
// was under way), so that receiving and acking overlap.
func (ce *clusterEnv) qbConsumer(q string) consumeFunc {
	window := ce.p.window
	return func(ctx context.Context, w int, f *flow) error {
		qc := ce.qcN(w)
		// A failed Ack ends the stream too.
		sctx, endStream := context.WithCancel(ctx)
		defer endStream()
		st, err := qc.Consume(sctx, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: uint32(window)})
		if err != nil {
			return err
		}
		type got struct {
			toks []string
			seqs []uint64
		}
		// At most window deliveries are unacked, so at most window
		// responses: the receiver never blocks on this channel.
		pending := make(chan got, window)
		ackDone := make(chan error, 1)
		go func() {
			var err error
			defer func() { ackDone <- err }()
			for g := range pending {
			merge: // with whatever else has arrived
				for {
					select {
					case more, ok := <-pending:
						if !ok {
							break merge
						}
						g.toks = append(g.toks, more.toks...)
						g.seqs = append(g.seqs, more.seqs...)
					default:
						break merge
					}
				}
				for len(g.toks) > 0 && err == nil {
					n := min(len(g.toks), maxAckTokens)
					if _, err = qc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: g.toks[:n]}); err == nil {
						f.settle(g.seqs[:n])
						g.toks, g.seqs = g.toks[n:], g.seqs[n:]
					}
				}
				if err != nil {
					if ctx.Err() != nil {
						err = nil
					} else {
						err = fmt.Errorf("Ack: %w", err)
					}
					endStream()
					for range pending { // until the receiver sees the end
					}
					return
				}
			}
		}()
		for {
			r, err := st.Recv()
			if err != nil {
				close(pending)
				if aerr := <-ackDone; aerr != nil {
					return aerr
				}
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			g := got{toks: make([]string, 0, len(r.GetDeliveries())), seqs: make([]uint64, 0, len(r.GetDeliveries()))}
			for _, d := range r.GetDeliveries() {
				g.toks = append(g.toks, d.GetAckToken())
				g.seqs = append(g.seqs, seqOf(d.GetPayload()))
			}
			pending <- g
		}
	}
}

// directKeys returns n fresh list names in n different slots, spread
// evenly over the masters (for n = 1, on master 0), and how many are on
// each master.
func (ce *clusterEnv) directKeys(ctx context.Context, n int) ([]string, []int, error) {
	place := make([]int, ce.masters)
	if n == 1 {
		name, err := ce.nameOnFirst(ctx, "list", func(n string) string { return ce.p.keyPrefix + "d:" + n })
		if err != nil {
			return nil, nil, err
		}
		place[0]++
		return []string{ce.p.keyPrefix + "d:" + name}, place, nil
	}
	base := ce.p.keyPrefix + "d:" + ce.name("list")
	var keys []string
	slots := map[int64]bool{}
	for j := 0; len(keys) < n; j++ {
		if j > 100*n {
			return nil, nil, fmt.Errorf("no %d list names in different slots spread over %d masters", n, ce.masters)
		}
		k := fmt.Sprintf("%s:%d", base, j)
		slot, err := ce.c.admin[0].ClusterKeySlot(ctx, k).Result()
		if err != nil {
			return nil, nil, err
		}
		i := ce.c.masterOfSlot(int(slot))
		if slots[slot] || i != len(keys)%ce.masters {
			continue
		}
		slots[slot] = true
		place[i]++
		keys = append(keys, k)
	}
	return keys, place, nil
}

// directConsumers is how many BLMPOP consumers the direct side runs: as
// many as qbridge has streams, and at least one per list.
func directConsumers(consumers, lists int) int {
	per := (consumers + lists - 1) / lists
	return per * lists
}

// directFlow runs the load with go-redis alone: each producer RPUSHes
// whole batches to the lists in turn; consumers BLMPOP COUNT batch, each
// on one list.
func (ce *clusterEnv) directFlow(ctx context.Context, size int, dur time.Duration, ramp bool, lists int) (flowSample, []int, error) {
	keys, place, err := ce.directKeys(ctx, lists)
	if err != nil {
		return flowSample{}, nil, err
	}
	next := make([]int, ce.p.producers)
	for w := range next {
		next[w] = w
	}
	batch := ce.p.batch
	x, err := ce.runFlow(ctx, size, dur, ramp, directConsumers(ce.p.consumers, lists), func(ctx context.Context, w int, msgs [][]byte) error {
		k := keys[next[w]%len(keys)]
		next[w]++
		vals := make([]any, len(msgs))
		for i, m := range msgs {
			vals[i] = m
		}
		return ce.direct.RPush(ctx, k, vals...).Err()
	}, func(ctx context.Context, w int, f *flow) error {
		k := keys[w%len(keys)]
		for ctx.Err() == nil {
			// BLMPOP with a timeout below a second (go-redis's BLMPop
			// rounds up to 1 s), routed by its key (after numkeys).
			cmd := redis.NewKeyValuesCmd(ctx, "blmpop", directPopTimeout, 1, k, "left", "count", batch)
			cmd.SetFirstKeyPos(3)
			_ = ce.direct.Process(ctx, cmd)
			_, vals, err := cmd.Result()
			if err == redis.Nil {
				continue
			}
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("BLMPOP: %w", err)
			}
			seqs := make([]uint64, len(vals))
			for i, v := range vals {
				seqs[i] = seqOf([]byte(v))
			}
			f.settle(seqs)
		}
		return nil
	}, fmt.Sprintf("direct RPUSH→BLMPOP on %d list(s)", lists))
	if err != nil {
		return x, nil, err
	}
	for _, k := range keys {
		n, err := ce.direct.LLen(ctx, k).Result()
		if err != nil {
			return x, nil, err
		}
		if n != 0 {
			return x, nil, fmt.Errorf("%w: after the run, list %s still holds %d", errLost, k, n)
		}
	}
	return x, place, nil
}

// ---- report ----

func fmtCores(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(parts, "+")
}

func fmtShares(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%.0f", 100*x)
	}
	return strings.Join(parts, "/") + "%"
}

func fmtCoresOrNA(v float64) string {
	if v < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", v)
}

// fmtHost prints the host's busy cores and, in parentheses, those neither
// the qbench process nor the masters used: other load on the machine.
func fmtHost(u *CPUUse) string {
	if u.HostCores < 0 {
		return "n/a"
	}
	other := u.HostCores
	if u.HarnessCores >= 0 {
		other -= u.HarnessCores
	}
	for _, v := range u.MasterCores {
		other -= v
	}
	return fmt.Sprintf("%.2f (%.2f)", u.HostCores, max(0, other))
}

func fmtPlacement(v []int) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprint(x)
	}
	return strings.Join(parts, "/")
}

// writeShards prints the shards rows' cluster figures: throughput against
// the fewest masters measured, and the Redis CPU of each master.
func (r *Report) writeShards(w io.Writer) {
	var rows []Row
	for _, x := range r.Rows {
		if x.Cluster != nil {
			rows = append(rows, x)
		}
	}
	if len(rows) == 0 {
		return
	}
	c0 := rows[0].Cluster
	backlogs := map[int]int{}
	var sizes []int
	for _, x := range rows {
		if _, ok := backlogs[x.Payload]; !ok {
			sizes = append(sizes, x.Payload)
		}
		backlogs[x.Payload] = x.Cluster.Backlog
	}
	var bl []string
	for _, sz := range sizes {
		bl = append(bl, fmt.Sprintf("%d of %dB", backlogs[sz], sz))
	}
	fmt.Fprintf(w, "\nshards: Redis Clusters (masters only, on this machine), produce+consume messages/s in steady state; %d producers × EnqueueBatch of %d / RPUSH of %d, "+
		"%d Consume streams (max_in_flight %d, batched Ack) / BLMPOP COUNT %d; at most %s messages produced and not consumed\n",
		c0.Producers, c0.Batch, c0.Batch, c0.Consumers, c0.Window, c0.Batch, strings.Join(bl, ", "))
	fmt.Fprintf(w, "  growth: median ops/s over that of the same queue kind at the fewest masters measured; Redis cores: each master's CPU time per second (1.00 = one saturated Redis); share: its part of the masters' total;\n"+
		"  Redis ceiling (derived, not measured): ops/s over the busiest master's cores, the rate at which that master would saturate if the clients kept up;\n"+
		"  qbench cores: the harness process (clients and in-process server); host busy: the machine's busy cores (in parentheses: other load, neither qbench nor these masters)\n")
	// The baseline of each (payload, shards) kind: its row at the fewest
	// masters.
	type kind struct{ payload, shards int }
	base := map[kind]Row{}
	for _, x := range rows {
		k := kind{x.Payload, x.Cluster.Shards}
		if b, ok := base[k]; !ok || x.Cluster.Masters < b.Cluster.Masters {
			base[k] = x
		}
	}
	growth := func(v, b float64) string {
		if b <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", v/b)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  masters\tqueue\tpayload\tqbridge\tgrowth\tdirect\tgrowth\tratio\tRedis ceiling q / d\tplacement q / d\tRedis cores q\tshare q\tRedis cores d\tshare d\tqbench cores q / d\thost busy (other) q / d\t")
	for _, x := range rows {
		c := x.Cluster
		b := base[kind{x.Payload, c.Shards}]
		queue := "unsharded"
		if c.Shards > 1 {
			queue = fmt.Sprintf("%d shards", c.Shards)
			if c.ServerShards != c.Shards {
				queue += fmt.Sprintf(" (server: %d)", c.ServerShards)
			}
		}
		fmt.Fprintf(tw, "  %d\t%s\t%dB\t%s\t%s\t%s\t%s\t%.2f\t%s / %s\t%s / %s\t%s\t%s\t%s\t%s\t%s / %s\t%s / %s\t\n", c.Masters, queue, x.Payload,
			fmtOps(x.Qbridge.Median), growth(x.Qbridge.Median, b.Qbridge.Median), fmtOps(x.Direct.Median), growth(x.Direct.Median, b.Direct.Median), x.Ratio,
			fmtOps(c.QbridgeCeiling), fmtOps(c.DirectCeiling),
			fmtPlacement(c.QbridgePlacement), fmtPlacement(c.DirectPlacement),
			fmtCores(c.QbridgeCPU.MasterCores), fmtShares(c.QbridgeCPU.MasterShare), fmtCores(c.DirectCPU.MasterCores), fmtShares(c.DirectCPU.MasterShare),
			fmtCoresOrNA(c.QbridgeCPU.HarnessCores), fmtCoresOrNA(c.DirectCPU.HarnessCores), fmtHost(c.QbridgeCPU), fmtHost(c.DirectCPU))
	}
	_ = tw.Flush()
	for _, x := range rows {
		if c := x.Cluster; c.ServerShards != c.Shards {
			fmt.Fprintf(w, "  WARNING: the server did not shard the queue of %d shards (it reports %d): its rows measure an unsharded queue\n", c.Shards, c.ServerShards)
			break
		}
	}
}
