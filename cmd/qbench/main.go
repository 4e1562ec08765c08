// Command qbench benchmarks qbridge against direct go-redis on the same
// Redis: it starts its own redis-server (127.0.0.1, no persistence) and an
// in-process qbridge server unless -redis-addr / -qbridge-addr are given,
// prints a table and optionally writes JSON. The shards scenario always
// starts its own Redis Clusters (-shard-masters) and in-process servers
// (with -redis-addr or -qbridge-addr it runs only when asked for by
// -scenarios). A run that loses a message exits non-zero.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/qbridge/qbridge/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "qbench:", err)
		if errors.Is(err, bench.ErrLost) {
			fmt.Fprintln(os.Stderr, "qbench: FAILED: a scenario lost messages")
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("qbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfg      bench.Config
		payloads = fs.String("payloads", "100,1024", "payload sizes in bytes, comma-separated (>= 8)")
		scen     = fs.String("scenarios", "all", "comma-separated subset of enqueue,batch,drain,latency,pubsub,idle,shards")
		jsonOut  = fs.String("json", "", "write the JSON report to this file (- for stdout)")
		short    = fs.Bool("short", false, "quick run: 300ms runs, 100ms warm-up, 2 repeats, 200 idle streams, shards on 1 and 3 masters (explicit flags win)")
		timeout  = fs.Duration("timeout", 15*time.Minute, "abort the whole run after this long")
		quiet    = fs.Bool("quiet", false, "no progress lines on stderr")
		cpuProf  = fs.String("cpuprofile", "", "write a CPU profile of the whole run (harness, clients and in-process server) to this file")
		masters  = fs.String("shard-masters", "1,2,3", "shards scenario: the Redis Cluster sizes (masters), comma-separated")
		shardPl  = fs.String("shard-payloads", "100,4096", "shards scenario: payload sizes in bytes, comma-separated (its own: -payloads does not apply)")
	)
	fs.StringVar(&cfg.RedisAddr, "redis-addr", "", "use this Redis instead of starting a private redis-server; only keys under -key-prefix in -redis-db are written and deleted")
	fs.IntVar(&cfg.RedisDB, "redis-db", 0, "Redis database (use a dedicated one with -redis-addr)")
	fs.StringVar(&cfg.KeyPrefix, "key-prefix", "qbench:", "prefix of every key the harness writes")
	fs.StringVar(&cfg.QbridgeAddr, "qbridge-addr", "", "benchmark this qbridge server instead of an in-process one (it must use the same Redis as -redis-addr)")
	fs.DurationVar(&cfg.Duration, "duration", 800*time.Millisecond, "measured time of each run of each scenario side")
	fs.DurationVar(&cfg.Warmup, "warmup", 300*time.Millisecond, "warm-up before each scenario side (excluded)")
	fs.IntVar(&cfg.Repeat, "repeat", 3, "measured runs per scenario side (min/median/max reported)")
	fs.IntVar(&cfg.IdleStreams, "idle-streams", 10000, "idle Consume streams, and as many idle Subscribe streams (0: skip)")
	fs.IntVar(&cfg.WakeTries, "wake-tries", 5, "wake-ups measured among the idle streams")
	fs.IntVar(&cfg.Rate, "rate", 1000, "messages per second of the paced latency scenario")
	fs.IntVar(&cfg.Window, "consume-window", 16, "max_in_flight of the Consume streams (server default 16)")
	fs.IntVar(&cfg.DrainMin, "drain-min", 1000, "smallest pre-filled queue of the drain scenario (later runs are sized from the measured rate)")
	fs.IntVar(&cfg.ShardCount, "shards", bench.DefaultShardCount, "shards scenario: shard count of the sharded queue (and direct lists), the same at every cluster size")
	fs.IntVar(&cfg.ShardProducers, "shard-producers", bench.DefaultShardProducers, "shards scenario: concurrent EnqueueBatch (and RPUSH) callers")
	fs.IntVar(&cfg.ShardConsumers, "shard-consumers", bench.DefaultShardConsumers, "shards scenario: Consume streams (direct: as many BLMPOP clients, at least one per list)")
	fs.IntVar(&cfg.ShardBatch, "shard-batch", bench.DefaultShardBatch, "shards scenario: messages per EnqueueBatch / RPUSH and per BLMPOP COUNT")
	fs.IntVar(&cfg.ShardWindow, "shard-window", bench.DefaultShardWindow, "shards scenario: max_in_flight of the Consume streams")
	fs.DurationVar(&cfg.ShardDuration, "shard-duration", 0, "shards scenario: measured time of each run (0: -duration)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *short {
		if !set["duration"] {
			cfg.Duration = 300 * time.Millisecond
		}
		if !set["warmup"] {
			cfg.Warmup = 100 * time.Millisecond
		}
		if !set["repeat"] {
			cfg.Repeat = 2
		}
		if !set["idle-streams"] {
			cfg.IdleStreams = 200
		}
		if !set["shard-masters"] {
			*masters = "1,3"
		}
	}
	if cfg.QbridgeAddr != "" && cfg.RedisAddr == "" {
		return errors.New("-qbridge-addr needs -redis-addr (the Redis that server uses), so both sides run on the same Redis")
	}
	var err error
	if cfg.Payloads, err = bench.ParseSizes(*payloads); err != nil {
		return err
	}
	if cfg.ShardPayloads, err = bench.ParseSizes(*shardPl); err != nil {
		return fmt.Errorf("-shard-payloads: %w", err)
	}
	for _, f := range strings.Split(*masters, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("-shard-masters: bad cluster size %q", f)
		}
		cfg.ShardMasters = append(cfg.ShardMasters, n)
	}
	if *scen != "all" {
		cfg.Scenarios = map[string]bool{}
		for _, s := range strings.Split(*scen, ",") {
			switch s = strings.TrimSpace(s); s {
			case "enqueue", "batch", "drain", "latency", "pubsub", "idle", "shards":
				cfg.Scenarios[s] = true
			default:
				return fmt.Errorf("unknown scenario %q", s)
			}
		}
	}
	if !*quiet {
		cfg.Progress = stderr
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	rep, err := bench.Run(ctx, cfg)
	if err != nil {
		if rep != nil && len(rep.Rows) > 0 {
			fmt.Fprintln(stdout, "qbench: FAILED; what was measured before the failure:")
			rep.WriteTable(stdout)
		}
		return err
	}
	rep.WriteTable(stdout)
	switch *jsonOut {
	case "":
	case "-":
		return rep.WriteJSON(stdout)
	default:
		f, err := os.Create(*jsonOut)
		if err != nil {
			return err
		}
		if err := rep.WriteJSON(f); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	}
	return nil
}
