// Package bench is qbridge's benchmark harness: each qbridge figure next to
// its direct go-redis counterpart on the same Redis (see cmd/qbench).
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"
)

// Config is one harness run.
type Config struct {
	RedisAddr   string // empty: start a private redis-server
	RedisDB     int
	KeyPrefix   string
	QbridgeAddr string // empty: in-process server
	Payloads    []int
	Duration    time.Duration
	Warmup      time.Duration
	Repeat      int
	IdleStreams int
	WakeTries   int
	Rate        int
	Window      int
	DrainMin    int
	Scenarios   map[string]bool // nil: all of enqueue,batch,drain,latency,pubsub,idle,shards
	Progress    io.Writer       // may be nil

	// The shards scenario (shards.go); zero values take its defaults.
	ShardMasters   []int         // cluster sizes (masters), default 1,2,3
	ShardPayloads  []int         // payload sizes, default 100,4096 (not Payloads)
	ShardCount     int           // shards of the sharded queue, default 6
	ShardProducers int           // EnqueueBatch callers, default 32
	ShardConsumers int           // Consume streams, default 16
	ShardBatch     int           // messages per EnqueueBatch, default 250
	ShardWindow    int           // max_in_flight of the streams, default 1024
	ShardDuration  time.Duration // measured time of each run (default Duration)
}

// Row is one line of the table.
type Row struct {
	Scenario string  `json:"scenario"`
	Payload  int     `json:"payload_bytes"`
	Qbridge  *Series `json:"qbridge"`
	Direct   *Series `json:"direct"`
	// Ratio is qbridge/direct throughput, median over median.
	Ratio float64 `json:"ratio"`
	// Cluster is set on the rows of the shards scenario.
	Cluster *ClusterRow `json:"cluster,omitempty"`
}

// Report is the result of a run.
type Report struct {
	Started     time.Time   `json:"started"`
	WallSeconds float64     `json:"wall_seconds"`
	GoMaxProcs  int         `json:"gomaxprocs"`
	Duration    string      `json:"duration"`
	Warmup      string      `json:"warmup"`
	Repeat      int         `json:"repeat"`
	Redis       string      `json:"redis"`
	Qbridge     string      `json:"qbridge"`
	Rows        []Row       `json:"rows"`
	Idle        *IdleResult `json:"idle,omitempty"`
}

// ErrLost is returned (wrapped) when a scenario lost or duplicated messages.
var ErrLost = errLost

func (c Config) on(s string) bool { return c.Scenarios == nil || c.Scenarios[s] }

// Run runs the configured scenarios.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Repeat < 1 || cfg.Duration <= 0 || len(cfg.Payloads) == 0 || cfg.Rate <= 0 {
		return nil, errors.New("need repeat >= 1, duration > 0, a payload size and rate > 0")
	}
	for _, p := range cfg.Payloads {
		if p < 8 {
			return nil, fmt.Errorf("payload %d: at least 8 bytes (they carry a sequence number)", p)
		}
	}
	if cfg.WakeTries <= 0 {
		cfg.WakeTries = 5
	}
	if cfg.DrainMin <= 0 {
		cfg.DrainMin = 1000
	}
	if cfg.KeyPrefix == "" {
		cfg.KeyPrefix = "qbench:"
	}
	start := time.Now()
	e, err := newEnv(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer e.close()
	rep := &Report{Started: start, GoMaxProcs: runtime.GOMAXPROCS(0), Duration: cfg.Duration.String(), Warmup: cfg.Warmup.String(), Repeat: cfg.Repeat, Redis: e.redisAddr, Qbridge: e.qbAddr}
	if e.redisProc != nil {
		rep.Redis += " (own redis-server)"
	}
	if e.srv != nil {
		rep.Qbridge += " (in-process)"
	}
	// fail returns what was measured so far with the error.
	fail := func(err error) (*Report, error) {
		rep.WallSeconds = time.Since(start).Seconds()
		return rep, err
	}
	logf := func(format string, a ...any) {
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, format+"\n", a...)
		}
	}
	measure := func(label, latOf string, size int, s side) (*Series, error) {
		if err := e.flush(ctx); err != nil {
			return nil, err
		}
		if cfg.Warmup > 0 {
			if _, err := s(ctx, size, cfg.Warmup); err != nil {
				return nil, fmt.Errorf("%s (warm-up): %w", label, err)
			}
		}
		var ss []sample
		for i := 0; i < cfg.Repeat; i++ {
			if err := e.flush(ctx); err != nil {
				return nil, err
			}
			x, err := s(ctx, size, cfg.Duration)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", label, err)
			}
			ss = append(ss, x)
		}
		return summarize(label, latOf, ss), nil
	}
	add := func(name string, size int, q, d *Series) {
		r := Row{Scenario: name, Payload: size, Qbridge: q, Direct: d}
		if d.Median > 0 {
			r.Ratio = q.Median / d.Median
		}
		rep.Rows = append(rep.Rows, r)
		logf("  %-34s %5dB  qbridge %10.0f/s  direct %10.0f/s  ratio %.2f", name, size, q.Median, d.Median, r.Ratio)
	}
	pair := func(name string, size int, qLabel, dLabel, latOf string, q, d side) error {
		qs, err := measure(qLabel, latOf, size, q)
		if err != nil {
			return err
		}
		ds, err := measure(dLabel, latOf, size, d)
		if err != nil {
			return err
		}
		add(name, size, qs, ds)
		return nil
	}
	for _, size := range cfg.Payloads {
		if cfg.on("enqueue") {
			for _, c := range []int{1, 16, 64} {
				if err := pair(fmt.Sprintf("enqueue c=%d vs LPUSH", c), size, "Enqueue", "LPUSH", "call", e.qbEnqueue(c), e.directLPUSH(c)); err != nil {
					return fail(err)
				}
			}
			// The ceiling of any unary call on this machine: a gRPC
			// health check (no Redis) from as many callers, next to the
			// LPUSH figure just measured (once: it does not depend on the
			// payload).
			if size == cfg.Payloads[0] {
				qs, err := measure("health Check", "call", size, e.grpcNoop(64))
				if err != nil {
					return fail(err)
				}
				add("(ref) gRPC no-op c=64 vs LPUSH", size, qs, rep.Rows[len(rep.Rows)-1].Direct)
			}
		}
		if cfg.on("batch") {
			if err := pair("batch×100 vs pipelined LPUSH×100", size, "EnqueueBatch", "pipelined LPUSH", "call of 100", e.qbBatch, e.directPipeline); err != nil {
				return fail(err)
			}
		}
		if cfg.on("drain") {
			for _, c := range []int{1, 4} {
				qd := &drainer{min: cfg.DrainMin, max: 300000, run: e.qbDrain(c, cfg.Window)}
				qs, err := measure("Consume+Ack", "", size, qd.side)
				if err != nil {
					return fail(err)
				}
				for _, reliable := range []bool{true, false} {
					lbl := "BLPOP"
					if reliable {
						lbl = "BLMOVE+LREM"
					}
					dd := &drainer{min: cfg.DrainMin, max: 300000, run: e.directDrain(c, reliable)}
					ds, err := measure(lbl, "", size, dd.side)
					if err != nil {
						return fail(err)
					}
					add(fmt.Sprintf("drain c=%d vs %s", c, lbl), size, qs, ds)
				}
			}
		}
		if cfg.on("latency") {
			if err := pair(fmt.Sprintf("latency @%d/s vs RPUSH→BLPOP", cfg.Rate), size, "Enqueue→Consume", "RPUSH→BLPOP", "end-to-end", e.qbLatency(cfg.Rate, cfg.Window), e.directLatency(cfg.Rate)); err != nil {
				return fail(err)
			}
		}
		if cfg.on("pubsub") {
			for _, p := range []int{1, 16} {
				if err := pair(fmt.Sprintf("pubsub pubs=%d subs=1", p), size, "Publish→Subscribe", "PUBLISH→SUBSCRIBE", "publish call", e.qbPubSub(p, 1), e.directPubSub(p, 1)); err != nil {
					return fail(err)
				}
			}
			if err := pair("pubsub fan-out pubs=1 subs=100", size, "Publish→100×Subscribe", "PUBLISH→100×SUBSCRIBE", "publish call", e.qbPubSub(1, 100), e.directPubSub(1, 100)); err != nil {
				return fail(err)
			}
		}
	}
	if cfg.on("shards") {
		if cfg.Scenarios == nil && (cfg.RedisAddr != "" || cfg.QbridgeAddr != "") {
			// It would not measure the given Redis or qbridge.
			logf("  shards: skipped (it starts its own Redis Clusters and qbridge servers; ask for it with -scenarios shards)")
		} else {
			rows, err := runShards(ctx, cfg, logf)
			rep.Rows = append(rep.Rows, rows...)
			if err != nil {
				return fail(err)
			}
		}
	}
	if cfg.on("idle") && cfg.IdleStreams > 0 {
		logf("  idle: opening %d Consume + %d Subscribe streams", cfg.IdleStreams, cfg.IdleStreams)
		if rep.Idle, err = e.idle(ctx, cfg.IdleStreams, cfg.WakeTries); err != nil {
			return fail(fmt.Errorf("idle streams: %w", err))
		}
	}
	rep.WallSeconds = time.Since(start).Seconds()
	return rep, nil
}

func fmtOps(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.1fk", v/1e3)
	default:
		return fmt.Sprintf("%.0f", v)
	}
}

func fmtUs(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%.2fms", v/1000)
	}
	return fmt.Sprintf("%.0fµs", v)
}

func noise(s *Series) string {
	if s.Median == 0 {
		return "-"
	}
	return fmt.Sprintf("%s..%s", fmtOps(s.Min), fmtOps(s.Max))
}

func lat(q, d *Series, p99 bool) string {
	if q.P50us == 0 && d.P50us == 0 {
		return "-"
	}
	if p99 {
		return fmtUs(q.P99us) + " / " + fmtUs(d.P99us)
	}
	return fmtUs(q.P50us) + " / " + fmtUs(d.P50us)
}

// WriteTable prints the report as a table.
func (r *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "qbench: redis %s, qbridge %s, GOMAXPROCS %d, %s per run after %s warm-up, %d repeats; ops/s are medians, noise is min..max\n",
		r.Redis, r.Qbridge, r.GoMaxProcs, r.Duration, r.Warmup, r.Repeat)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tpayload\tqbridge ops/s\tdirect ops/s\tratio\tp50 q / d\tp99 q / d\tnoise q\tnoise d\t")
	for _, x := range r.Rows {
		fmt.Fprintf(tw, "%s\t%dB\t%s\t%s\t%.2f\t%s\t%s\t%s\t%s\t\n", x.Scenario, x.Payload, fmtOps(x.Qbridge.Median), fmtOps(x.Direct.Median), x.Ratio,
			lat(x.Qbridge, x.Direct, false), lat(x.Qbridge, x.Direct, true), noise(x.Qbridge), noise(x.Direct))
	}
	_ = tw.Flush()
	r.writeShards(w)
	if i := r.Idle; i != nil {
		fmt.Fprintf(w, "\nidle streams: %d Consume + %d Subscribe (opened and settled in %.1fs)\n", i.ConsumeStreams, i.SubscribeStreams, i.OpenSeconds)
		fmt.Fprintf(w, "  Redis connections (all but the harness's direct ones): %d before, %d with the streams open\n", i.RedisConnsBefore, i.RedisConnsIdle)
		if i.RSSIdleKiB >= 0 {
			fmt.Fprintf(w, "  process RSS: %d KiB before, %d KiB idle: %.1f KiB per stream (client and server share the process: an upper bound)\n", i.RSSBeforeKiB, i.RSSIdleKiB, i.PerStreamKiB)
		} else {
			fmt.Fprintf(w, "  process RSS: n/a (remote qbridge)\n")
		}
		if i.WakeTimeouts > 0 {
			fmt.Fprintf(w, "  WARNING: %d of the Consume wake-ups took longer than %.0fs (counted as %.0fs; the messages were still queued)\n", i.WakeTimeouts, i.WakeTimeout, i.WakeTimeout)
		}
		fmt.Fprintf(w, "  wake-up p50/p99: Consume %s / %s (direct BLPOP %s / %s); Subscribe %s / %s (direct SUBSCRIBE %s / %s)\n",
			fmtUs(i.ConsumeWake.P50us), fmtUs(i.ConsumeWake.P99us), fmtUs(i.DirectBLPOPWake.P50us), fmtUs(i.DirectBLPOPWake.P99us),
			fmtUs(i.SubscribeWake.P50us), fmtUs(i.SubscribeWake.P99us), fmtUs(i.DirectSubscribeWake.P50us), fmtUs(i.DirectSubscribeWake.P99us))
	}
	fmt.Fprintf(w, "\nwall time %.1fs\n", r.WallSeconds)
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// ParseSizes parses "100,1024".
func ParseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		var n int
		if _, err := fmt.Sscanf(strings.TrimSpace(f), "%d", &n); err != nil || n <= 0 {
			return nil, fmt.Errorf("bad payload size %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}
