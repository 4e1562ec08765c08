package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

func (a *app) statsCmd() *cobra.Command {
	var (
		watch    bool
		interval time.Duration
	)
	cmd := &cobra.Command{
		Use:   "stats [QUEUE...]",
		Short: "Show queue depths, rates and totals",
		Long: `Stats shows how many messages each queue holds ready, in flight, delayed
and dead, its enqueue and ack rates (per second over the last minute, as the
server measures them), the age of its oldest ready message and whether it is
paused. With one QUEUE it shows everything, totals and per-task-type totals
included; with several, or none (every queue the server knows), a table.
With --output json: one object per queue.

--watch redraws the table every --interval until Ctrl-C (exit 130). On a
terminal it is redrawn in place; otherwise a new table is printed each time
(with --output json, one object per queue each time, with a "time" field).
In watch mode ENQ/S and ACK/S are measured over the last interval, from the
queues' totals.`,
		Example: `  qbridge stats
  qbridge stats jobs
  qbridge stats --watch
  qbridge stats jobs other --watch --interval 1s
  qbridge -o json stats jobs | jq .ready`,
		ValidArgsFunction: a.completeQueues,
		RunE: func(cmd *cobra.Command, args []string) error {
			if interval <= 0 {
				return usageErrorf("--interval %v: must be positive", interval)
			}
			if watch {
				return a.watchStats(args, interval)
			}
			stats, err := a.fetchStats(args)
			if err != nil {
				return err
			}
			if a.out.json {
				for _, s := range stats {
					if err := a.out.jsonLine(s); err != nil {
						return err
					}
				}
				return nil
			}
			if len(args) == 1 {
				return a.out.write([]byte(statsText(stats[0])))
			}
			if len(stats) == 0 {
				fmt.Fprintln(a.stderr, "qbridge: no queues yet")
				return nil
			}
			rows := make([][]string, len(stats))
			for i, s := range stats {
				rows[i] = statsRow(s, s.EnqueueRate, s.AckRate)
			}
			return a.out.write([]byte(table(statsHeader, rows)))
		},
	}
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "refresh until Ctrl-C")
	cmd.Flags().DurationVar(&interval, "interval", 2*time.Second, "with --watch: time between refreshes")
	return cmd
}

// listQueues returns every queue the server knows, in name order.
func (a *app) listQueues() ([]string, error) {
	c, err := a.client()
	if err != nil {
		return nil, err
	}
	var out []string
	token := ""
	for {
		ctx, cancel := a.rpcCtx()
		resp, err := c.Admin().ListQueues(ctx, &qbridgev1.ListQueuesRequest{PageSize: 1000, PageToken: token})
		cancel()
		if err != nil {
			return nil, err
		}
		out = append(out, resp.GetQueues()...)
		if token = resp.GetNextPageToken(); token == "" {
			return out, nil
		}
	}
}

// fetchStats returns the stats of queues, or of every queue when none is
// given.
func (a *app) fetchStats(queues []string) ([]jsonStats, error) {
	c, err := a.client()
	if err != nil {
		return nil, err
	}
	if len(queues) == 0 {
		if queues, err = a.listQueues(); err != nil {
			return nil, err
		}
	}
	out := make([]jsonStats, 0, len(queues))
	for _, q := range queues {
		ctx, cancel := a.rpcCtx()
		// The raw call: client.Stats leaves out the per-task-type totals.
		resp, err := c.Raw().GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
		cancel()
		if err != nil {
			return nil, err
		}
		out = append(out, newJSONStats(resp))
	}
	return out, nil
}

// ANSI sequences for the in-place display.
const (
	ansiHome       = "\x1b[H"
	ansiClear      = "\x1b[2J"
	ansiHideCursor = "\x1b[?25l"
	ansiShowCursor = "\x1b[?25h"
)

// watchStats refreshes the stats every interval until interrupted. The
// first round's errors end the command; later ones are shown and the watch
// goes on (the server may be restarting).
func (a *app) watchStats(queues []string, interval time.Duration) error {
	tty := isTTY(a.stdout) && !a.out.json
	if tty {
		fmt.Fprint(a.stdout, ansiHideCursor)
		defer fmt.Fprint(a.stdout, ansiShowCursor)
	}
	prev := map[string]jsonStats{}
	var prevAt time.Time
	t := time.NewTicker(interval)
	defer t.Stop()
	for round := 0; ; round++ {
		now := time.Now()
		stats, err := a.fetchStats(queues)
		switch {
		case err != nil && round == 0:
			return err
		case err != nil:
			line, _ := statusLine(err, a.addr)
			if tty {
				fmt.Fprint(a.stdout, ansiHome+ansiClear+watchHeader(a.addr, interval, now)+"\n\nqbridge: "+line+"\n")
			} else {
				fmt.Fprintf(a.stderr, "qbridge: %s\n", line)
			}
		default:
			if err := a.drawStats(stats, prev, prevAt, now, interval, tty); err != nil {
				return err
			}
			prev = map[string]jsonStats{}
			for _, s := range stats {
				prev[s.Queue] = s
			}
			prevAt = now
		}
		select {
		case <-a.ctx.Done():
			return a.ctx.Err()
		case <-t.C:
		}
	}
}

func watchHeader(addr string, interval time.Duration, now time.Time) string {
	return fmt.Sprintf("qbridge stats  %s  every %v  %s  (Ctrl-C to quit)", addr, interval, now.Local().Format("15:04:05"))
}

// drawStats shows one round of the watch.
func (a *app) drawStats(stats []jsonStats, prev map[string]jsonStats, prevAt, now time.Time, interval time.Duration, tty bool) error {
	if a.out.json {
		for _, s := range stats {
			s.Time = jsonTime(now)
			if err := a.out.jsonLine(s); err != nil {
				return err
			}
		}
		return nil
	}
	rows := make([][]string, len(stats))
	for i, s := range stats {
		enq, ack := s.EnqueueRate, s.AckRate
		if p, ok := prev[s.Queue]; ok {
			if dt := now.Sub(prevAt).Seconds(); dt > 0 {
				enq = max(0, float64(s.Counters.Enqueued-p.Counters.Enqueued)/dt)
				ack = max(0, float64(s.Counters.Acked-p.Counters.Acked)/dt)
			}
		}
		rows[i] = statsRow(s, enq, ack)
	}
	var b strings.Builder
	if tty {
		b.WriteString(ansiHome + ansiClear)
	} else if !prevAt.IsZero() {
		b.WriteString("\n")
	}
	b.WriteString(watchHeader(a.addr, interval, now) + "\n\n")
	if len(stats) == 0 {
		b.WriteString("no queues yet\n")
	} else {
		b.WriteString(table(statsHeader, rows))
	}
	return a.out.write([]byte(b.String()))
}

func (a *app) queuesCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "queues",
		Short: "List the queues the server knows",
		Long: `Queues lists, in name order, every queue qbridge knows: enqueued to,
consumed or configured through it. One name per line, or with --output json
one {"queue": NAME} object per line.`,
		Example: `  qbridge queues
  qbridge queues | xargs -n1 qbridge stats`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			qs, err := a.listQueues()
			if err != nil {
				return err
			}
			for _, q := range qs {
				if err := a.out.emit(map[string]string{"queue": q}, func() string { return q + "\n" }); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

// completeQueue completes the first argument with the server's queue
// names.
func (a *app) completeQueue(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	return a.completeQueues(cmd, args, "")
}

// completeQueues completes any argument with the server's queue names.
func (a *app) completeQueues(cmd *cobra.Command, _ []string, _ string) ([]string, cobra.ShellCompDirective) {
	if err := a.setup(cmd); err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	a.timeout = 2 * time.Second
	ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
	defer cancel()
	a.ctx = ctx
	qs, err := a.listQueues()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	return qs, cobra.ShellCompDirectiveNoFileComp
}
