package main

import (
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"

	"github.com/qbridge/qbridge/client"
)

// maxResultWait is the longest wait of one GetResult call (the server's
// limit); longer --wait values take several calls.
const maxResultWait = 5 * time.Minute

func (a *app) resultCmd() *cobra.Command {
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "result QUEUE ID",
		Short: "Show the outcome of a message",
		Long: `Result shows how message ID of QUEUE finished: succeeded (acked, with the
result its consumer gave), failed (dropped) or dead, with the error, the
attempts and when. Outcomes are kept for messages enqueued with
--keep-result, and for messages acked with a result (consume --exec
--result), for the server's result retention (24h by default).

No outcome (yet) exits 4 (NotFound). With --wait D the command waits up to D
for the outcome (woken by the ack; it does not poll) and exits 5 if there is
still none. A task that failed or died is still an outcome: exit 0, see the
state.`,
		Example: `  qbridge result rpc job-7
  qbridge result rpc job-7 --wait 30s
  qbridge -o json result rpc job-7 --wait 1m | jq -r .result`,
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: a.completeQueue,
		RunE: func(_ *cobra.Command, args []string) error {
			if wait < 0 {
				return usageErrorf("--wait %v: must not be negative", wait)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			queue, id := args[0], args[1]
			res, err := a.getResult(c, queue, id, wait)
			if wait > 0 && isCode(err, codes.NotFound) {
				return timeoutErrorf("no outcome for message %s of %s within %v", id, queue, wait)
			}
			if err != nil {
				return err
			}
			return a.out.printResult(queue, res)
		},
	}
	cmd.Flags().DurationVarP(&wait, "wait", "w", 0, "wait up to this long for the outcome (exit 5 if none)")
	return cmd
}

// getResult asks for the outcome, waiting up to wait in calls of at most
// maxResultWait. Each call's deadline is its wait plus --timeout.
func (a *app) getResult(c *client.Client, queue, id string, wait time.Duration) (*client.Result, error) {
	end := time.Now().Add(wait)
	for {
		chunk := min(time.Until(end), maxResultWait)
		if chunk < 0 {
			chunk = 0
		}
		if wait > 0 && chunk < time.Millisecond {
			chunk = time.Millisecond
		}
		ctx, cancel := a.timeoutCtx(a.ctx, chunk)
		start := time.Now()
		res, err := c.GetResult(ctx, queue, id, chunk)
		cancel()
		if !isCode(err, codes.NotFound) || wait <= 0 || time.Until(end) <= 0 {
			return res, err
		}
		// Not yet, and time is left: ask again (after a pause if the
		// server answered early, so this cannot spin).
		if time.Since(start) < chunk/2 {
			select {
			case <-time.After(min(100*time.Millisecond, time.Until(end))):
			case <-a.ctx.Done():
				return nil, a.ctx.Err()
			}
		}
	}
}

func (a *app) messageCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "message QUEUE ID",
		Short: "Tell where a message is",
		Long: `Message finds message ID in QUEUE and tells where it is: ready, delayed,
in-flight, dead, or (while its outcome is kept) succeeded or failed, with its
deliveries so far, task type and last error. Unknown id: exit 4. It searches
the queue, so it takes time proportional to the queue's size.`,
		Example: `  qbridge message rpc job-7
  qbridge -o json message rpc job-7 | jq -r .state`,
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: a.completeQueue,
		RunE: func(_ *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := a.rpcCtx()
			defer cancel()
			m, err := c.GetMessage(ctx, args[0], args[1])
			if err != nil {
				return err
			}
			return a.out.printMessageInfo(args[0], m)
		},
	}
}
