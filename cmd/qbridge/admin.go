package main

import (
	"bufio"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// parseState maps a --state value to a message state.
func parseState(s string) (qbridgev1.MessageState, error) {
	switch strings.ToLower(strings.ReplaceAll(s, "_", "-")) {
	case "ready":
		return qbridgev1.MessageState_MESSAGE_STATE_READY, nil
	case "delayed":
		return qbridgev1.MessageState_MESSAGE_STATE_DELAYED, nil
	case "in-flight", "inflight":
		return qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT, nil
	case "dead":
		return qbridgev1.MessageState_MESSAGE_STATE_DEAD, nil
	}
	return 0, usageErrorf("--state %q: use ready, delayed, in-flight or dead", s)
}

// peek returns up to limit messages of queue in state, paging as needed.
func (a *app) peek(queue string, state qbridgev1.MessageState, limit int) ([]*qbridgev1.QueuedMessage, error) {
	c, err := a.client()
	if err != nil {
		return nil, err
	}
	var out []*qbridgev1.QueuedMessage
	token := ""
	for len(out) < limit {
		ctx, cancel := a.rpcCtx()
		resp, err := c.Admin().PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{
			Queue: queue, State: state, PageSize: uint32(min(limit-len(out), 1000)), PageToken: token,
		})
		cancel()
		if err != nil {
			return nil, err
		}
		out = append(out, resp.GetMessages()...)
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	return out, nil
}

func (a *app) printQueued(queue string, state qbridgev1.MessageState, ms []*qbridgev1.QueuedMessage) error {
	if a.out.json {
		for _, m := range ms {
			if err := a.out.jsonLine(newJSONQueued(queue, m)); err != nil {
				return err
			}
		}
		return nil
	}
	if len(ms) == 0 {
		fmt.Fprintf(a.stderr, "qbridge: no %s messages in %s\n", stateName(state), queue)
		return nil
	}
	return a.out.write([]byte(queuedTable(state, ms)))
}

func (a *app) peekCmd() *cobra.Command {
	var (
		stateFlag string
		limit     int
	)
	cmd := &cobra.Command{
		Use:   "peek QUEUE",
		Short: "Show messages of a queue without taking them",
		Long: `Peek shows up to --limit messages of QUEUE in one state, changing nothing:
ready (head first), delayed (due first), in-flight (lease deadline first) or
dead (most recently dead last). Text output is a table with payloads cut to
60 characters; --output json gives every field of each message, whole
payload included.`,
		Example: `  qbridge peek jobs
  qbridge peek jobs --state delayed --limit 100
  qbridge -o json peek jobs --state in-flight | jq .lease_deadline`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeQueue,
		RunE: func(cmd *cobra.Command, args []string) error {
			state, err := parseState(stateFlag)
			if err != nil {
				return err
			}
			if limit < 1 {
				return usageErrorf("--limit %d: must be at least 1", limit)
			}
			ms, err := a.peek(args[0], state, limit)
			if err != nil {
				return err
			}
			return a.printQueued(args[0], state, ms)
		},
	}
	cmd.Flags().StringVarP(&stateFlag, "state", "s", "ready", "ready, delayed, in-flight or dead")
	cmd.Flags().IntVarP(&limit, "limit", "l", 20, "most messages to show")
	_ = cmd.RegisterFlagCompletionFunc("state", cobra.FixedCompletions([]string{"ready", "delayed", "in-flight", "dead"}, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func (a *app) purgeCmd() *cobra.Command {
	var yes bool
	cmd := &cobra.Command{
		Use:   "purge QUEUE",
		Short: "Remove every ready and delayed message of a queue",
		Long: `Purge removes every ready and delayed message of QUEUE for good; messages in
flight and dead letters are left alone. On a terminal it asks first (showing
how many messages would go) unless --yes is given; when stdin is not a
terminal, --yes is required (exit 1 without it). Answering no exits 1.`,
		Example: `  qbridge purge jobs
  qbridge purge jobs --yes`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeQueue,
		RunE: func(cmd *cobra.Command, args []string) error {
			queue := args[0]
			c, err := a.client()
			if err != nil {
				return err
			}
			if !yes {
				if !isTTY(a.stdin) {
					return usageErrorf("purge removes messages for good: add --yes (stdin is not a terminal to confirm on)")
				}
				ctx, cancel := a.rpcCtx()
				st, err := c.Stats(ctx, queue)
				cancel()
				if err != nil {
					return err
				}
				fmt.Fprintf(a.stderr, "Purge %d ready and %d delayed messages of %s for good? [y/N] ", st.Ready, st.Delayed, queue)
				answer, _ := bufio.NewReader(a.stdin).ReadString('\n')
				if a.ctx.Err() != nil {
					return a.ctx.Err()
				}
				switch strings.ToLower(strings.TrimSpace(answer)) {
				case "y", "yes":
				default:
					return usageErrorf("purge cancelled; nothing removed")
				}
			}
			ctx, cancel := a.rpcCtx()
			defer cancel()
			resp, err := c.Admin().PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: queue})
			if err != nil {
				return err
			}
			return a.out.printCount(queue, "purged", "purged", resp.GetPurged(), "message")
		},
	}
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	return cmd
}

func (a *app) pauseCmd() *cobra.Command {
	return a.pauseResumeCmd(true)
}

func (a *app) resumeCmd() *cobra.Command {
	return a.pauseResumeCmd(false)
}

func (a *app) pauseResumeCmd(pause bool) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pause QUEUE",
		Short: "Stop deliveries from a queue (enqueues still accepted)",
		Long: `Pause stops deliveries from QUEUE on every qbridge instance; Enqueue still
accepts messages, and deliveries already made are unaffected. Undo with
'qbridge resume'.`,
		Example: `  qbridge pause jobs && qbridge stats jobs`,
	}
	verb := "paused"
	if !pause {
		cmd.Use = "resume QUEUE"
		cmd.Short = "Resume deliveries from a paused queue"
		cmd.Long = `Resume undoes 'qbridge pause': deliveries from QUEUE start again at once.`
		cmd.Example = `  qbridge resume jobs`
		verb = "resumed"
	}
	cmd.Args = cobra.ExactArgs(1)
	cmd.ValidArgsFunction = a.completeQueue
	cmd.RunE = func(_ *cobra.Command, args []string) error {
		queue := args[0]
		c, err := a.client()
		if err != nil {
			return err
		}
		ctx, cancel := a.rpcCtx()
		defer cancel()
		if pause {
			_, err = c.Admin().PauseQueue(ctx, &qbridgev1.PauseQueueRequest{Queue: queue})
		} else {
			_, err = c.Admin().ResumeQueue(ctx, &qbridgev1.ResumeQueueRequest{Queue: queue})
		}
		if err != nil {
			return err
		}
		return a.out.emit(map[string]any{"queue": queue, "paused": pause}, func() string { return verb + " " + queue + "\n" })
	}
	return cmd
}

func (a *app) deadCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dead",
		Short: "List, replay or delete dead letters",
		Long: `Dead letters are messages that used up their attempts, were dead-lettered by
their consumer, or expired (with the dead-letter expired action). Each keeps
its error, its attempt count, and when and why it died.`,
		Example: `  qbridge dead list jobs
  qbridge dead replay jobs --all
  qbridge dead delete jobs job-7`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	var limit int
	list := &cobra.Command{
		Use:   "list QUEUE",
		Short: "Show the dead letters of a queue",
		Long: `List shows up to --limit dead letters of QUEUE, most recently dead last: the
dead letter id (what replay and delete take), deliveries, when and why it
died, its last error and payload.`,
		Example: `  qbridge dead list jobs
  qbridge -o json dead list jobs | jq -r .id`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeQueue,
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit < 1 {
				return usageErrorf("--limit %d: must be at least 1", limit)
			}
			st := qbridgev1.MessageState_MESSAGE_STATE_DEAD
			ms, err := a.peek(args[0], st, limit)
			if err != nil {
				return err
			}
			return a.printQueued(args[0], st, ms)
		},
	}
	list.Flags().IntVarP(&limit, "limit", "l", 100, "most dead letters to show")
	cmd.AddCommand(list, a.deadActionCmd(true), a.deadActionCmd(false))
	return cmd
}

// deadActionCmd is "dead replay" (replay) or "dead delete".
func (a *app) deadActionCmd(replay bool) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "replay QUEUE [ID...] [--all]",
		Short: "Move dead letters back to the queue",
		Long: `Replay moves the dead letters with the given ids (as 'qbridge dead list'
shows them), or with --all every dead letter, back to the tail of QUEUE with
their attempt count reset, and prints how many.`,
		Example: `  qbridge dead replay jobs --all
  qbridge dead replay jobs ID1 ID2`,
	}
	verb, field := "replayed", "replayed"
	if !replay {
		cmd.Use = "delete QUEUE [ID...] [--all]"
		cmd.Short = "Remove dead letters for good"
		cmd.Long = `Delete removes the dead letters with the given ids (as 'qbridge dead list'
shows them), or with --all every dead letter of QUEUE, and prints how many.`
		cmd.Example = `  qbridge dead delete jobs --all
  qbridge -o json dead list jobs | jq -r .id | xargs qbridge dead delete jobs`
		verb, field = "deleted", "deleted"
	}
	cmd.Args = cobra.MinimumNArgs(1)
	cmd.ValidArgsFunction = a.completeQueue
	cmd.RunE = func(_ *cobra.Command, args []string) error {
		queue, ids := args[0], args[1:]
		switch {
		case all && len(ids) > 0:
			return usageErrorf("give dead letter ids or --all, not both")
		case !all && len(ids) == 0:
			return usageErrorf("give the ids of dead letters ('qbridge dead list %s'), or --all", queue)
		}
		c, err := a.client()
		if err != nil {
			return err
		}
		ctx, cancel := a.rpcCtx()
		defer cancel()
		var n int64
		if replay {
			resp, err := c.Admin().ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: queue, Ids: ids, All: all})
			if err != nil {
				return err
			}
			n = resp.GetReplayed()
		} else {
			resp, err := c.Admin().DeleteDeadLetters(ctx, &qbridgev1.DeleteDeadLettersRequest{Queue: queue, Ids: ids, All: all})
			if err != nil {
				return err
			}
			n = resp.GetDeleted()
		}
		return a.out.printCount(queue, verb, field, n, "dead letter")
	}
	cmd.Flags().BoolVar(&all, "all", false, "every dead letter of the queue")
	return cmd
}

func (a *app) configCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Show or set a queue's policy",
		Long: `A queue's policy (retry attempts and backoff, length bound, what happens to
expired messages, dedup window) is stored in Redis and shared by every
qbridge instance.`,
		Example: `  qbridge config get jobs
  qbridge config set jobs --max-attempts 5 --min-backoff 2s --max-backoff 5m`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	get := &cobra.Command{
		Use:   "get QUEUE",
		Short: "Show the policy in force",
		Long: `Get shows QUEUE's policy in force, the server's defaults filled in for what
the queue does not set.`,
		Example:           `  qbridge config get jobs`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeQueue,
		RunE: func(_ *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := a.rpcCtx()
			defer cancel()
			resp, err := c.Admin().GetQueueConfig(ctx, &qbridgev1.GetQueueConfigRequest{Queue: args[0]})
			if err != nil {
				return err
			}
			return a.out.printConfig(args[0], resp.GetConfig())
		},
	}
	var (
		maxAttempts            uint32
		minBackoff, maxBackoff time.Duration
		maxLength              uint64
		expired                string
		dedupWindow            time.Duration
		shards                 uint32
	)
	set := &cobra.Command{
		Use:   "set QUEUE [flags]",
		Short: "Replace a queue's policy",
		Long: `Set REPLACES the policy of QUEUE (which need not exist yet) with the one the
flags give, and prints the policy now in force. A setting not given falls
back to the server's default: it is not kept from the queue's previous
policy (the server cannot tell a queue's own settings from the defaults
filled in by 'config get'), so give every setting the queue should have.
The one exception is --shards: not given, the queue keeps its shards.`,
		Example: `  qbridge config set jobs --max-attempts 5 --min-backoff 2s --max-backoff 5m
  qbridge config set bounded --max-length 1000
  qbridge config set orders --expired-action dead-letter --dedup-window 1h
  qbridge config set hot --shards 6`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeQueue,
		RunE: func(_ *cobra.Command, args []string) error {
			cfg := &qbridgev1.QueueConfig{MaxLength: maxLength, Shards: shards}
			if maxAttempts > 0 || minBackoff > 0 || maxBackoff > 0 {
				cfg.RetryPolicy = &qbridgev1.RetryPolicy{MaxAttempts: maxAttempts}
				if minBackoff > 0 {
					cfg.RetryPolicy.MinBackoff = durationpb.New(minBackoff)
				}
				if maxBackoff > 0 {
					cfg.RetryPolicy.MaxBackoff = durationpb.New(maxBackoff)
				}
			}
			if dedupWindow > 0 {
				cfg.DedupWindow = durationpb.New(dedupWindow)
			}
			switch expired {
			case "":
			case "drop":
				cfg.ExpiredAction = qbridgev1.ExpiredAction_EXPIRED_ACTION_DROP
			case "dead-letter":
				cfg.ExpiredAction = qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER
			default:
				return usageErrorf("--expired-action %q: use drop or dead-letter", expired)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := a.rpcCtx()
			defer cancel()
			resp, err := c.Admin().UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: args[0], Config: cfg})
			if err != nil {
				return err
			}
			return a.out.printConfig(args[0], resp.GetConfig())
		},
	}
	f := set.Flags()
	f.Uint32Var(&maxAttempts, "max-attempts", 0, "deliveries before a message is dead-lettered (1 to 1000)")
	f.DurationVar(&minBackoff, "min-backoff", 0, "backoff before the first retry")
	f.DurationVar(&maxBackoff, "max-backoff", 0, "longest retry backoff")
	f.Uint64Var(&maxLength, "max-length", 0, "most ready + delayed messages; enqueues beyond fail (0: unbounded)")
	f.StringVar(&expired, "expired-action", "", "what happens to messages whose ttl passed: drop or dead-letter")
	f.DurationVar(&dedupWindow, "dedup-window", 0, "how long a dedup key is remembered (1s to 7 days)")
	f.Uint32Var(&shards, "shards", 0, "spread the queue over this many shards (on Redis Cluster, over its masters); shards are never removed (0: keep the current count)")
	_ = set.RegisterFlagCompletionFunc("expired-action", cobra.FixedCompletions([]string{"drop", "dead-letter"}, cobra.ShellCompDirectiveNoFileComp))
	cmd.AddCommand(get, set)
	return cmd
}
