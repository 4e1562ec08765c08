// Command qbench benchmarks qbridge against direct go-redis on the same
// Redis: it starts its own redis-server (127.0.0.1, no persistence) and an
// in-process qbridge server unless -redis-addr / -qbridge-addr are given,
// prints a table and optionally writes JSON. A run that loses a message
// exits non-zero.
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
		scen     = fs.String("scenarios", "all", "comma-separated subset of enqueue,batch,drain,latency,pubsub,idle")
		jsonOut  = fs.String("json", "", "write the JSON report to this file (- for stdout)")
		short    = fs.Bool("short", false, "quick run: 300ms runs, 100ms warm-up, 2 repeats, 200 idle streams (explicit flags win)")
		timeout  = fs.Duration("timeout", 15*time.Minute, "abort the whole run after this long")
		quiet    = fs.Bool("quiet", false, "no progress lines on stderr")
		cpuProf  = fs.String("cpuprofile", "", "write a CPU profile of the whole run (harness, clients and in-process server) to this file")
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
	}
	if cfg.QbridgeAddr != "" && cfg.RedisAddr == "" {
		return errors.New("-qbridge-addr needs -redis-addr (the Redis that server uses), so both sides run on the same Redis")
	}
	var err error
	if cfg.Payloads, err = bench.ParseSizes(*payloads); err != nil {
		return err
	}
	if *scen != "all" {
		cfg.Scenarios = map[string]bool{}
		for _, s := range strings.Split(*scen, ",") {
			switch s = strings.TrimSpace(s); s {
			case "enqueue", "batch", "drain", "latency", "pubsub", "idle":
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
