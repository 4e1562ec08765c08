package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func (a *app) publishCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "publish CHANNEL [PAYLOAD]",
		Short: "Publish to a pub/sub channel",
		Long: `Publish sends PAYLOAD to CHANNEL (the Redis channel of that name) and prints
how many Redis-level subscriptions received it (what Redis PUBLISH returns:
each qbridge instance with subscribers counts once per matching channel or
pattern). Without PAYLOAD, each line of stdin is published as one message
(empty lines are skipped) and a count is printed per line.`,
		Example: `  qbridge publish news.sports 'goal!'
  tail -f app.log | qbridge publish logs > /dev/null
  qbridge -o json publish news.sports 'goal!'     # {"channel":"news.sports","receivers":1}`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			channel := args[0]
			publish := func(p []byte) error {
				ctx, cancel := a.rpcCtx()
				defer cancel()
				n, err := c.Publish(ctx, channel, p)
				if err != nil {
					return err
				}
				return a.out.printPublished(channel, n)
			}
			if len(args) == 2 {
				return publish([]byte(args[1]))
			}
			return eachLine(a.stdin, publish)
		},
	}
}

// eachLine calls f with each non-empty line of r, without its line end.
func eachLine(r io.Reader, f func([]byte) error) error {
	br := bufio.NewReader(r)
	for {
		raw, err := br.ReadBytes('\n')
		if p := bytes.TrimSuffix(bytes.TrimSuffix(raw, []byte("\n")), []byte("\r")); len(p) > 0 {
			if err := f(p); err != nil {
				return err
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return usageErrorf("read stdin: %v", err)
		}
	}
}

// globChars make a subscribe argument a pattern.
const globChars = `*?[]^\`

func (a *app) subscribeCmd() *cobra.Command {
	var count int
	cmd := &cobra.Command{
		Use:   "subscribe CHANNEL|PATTERN...",
		Short: "Print what is published on channels and patterns",
		Long: `Subscribe prints every message published on the channels and glob patterns
(as in Redis PSUBSCRIBE: an argument with one of ` + globChars + ` is a pattern)
after the subscription is confirmed, until Ctrl-C (exit 130) or --count.

Once subscribed it writes "qbridge: subscribed to ..." on stderr: every
message published after that line is received. Each message is printed as
"HH:MM:SS.mmm  CHANNEL  PAYLOAD" (local time of arrival; "CHANNEL (PATTERN)"
when it matched a pattern), or with --output json as an object with time,
channel, pattern, payload and payload_base64. Delivery is at-most-once, like
Redis pub/sub: a subscriber that reads too slowly is cut off by the server
(ResourceExhausted, exit 2).`,
		Example: `  qbridge subscribe task:pubsub:channel
  qbridge subscribe 'news.*' alerts
  qbridge -o json subscribe 'news.*' | jq -r .payload`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if count < 0 {
				return usageErrorf("--count %d: must not be negative", count)
			}
			var channels, patterns []string
			for _, s := range args {
				if strings.ContainsAny(s, globChars) {
					patterns = append(patterns, s)
				} else {
					channels = append(channels, s)
				}
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			sub, err := c.Subscribe(a.ctx, channels, patterns)
			if err != nil {
				return err
			}
			defer sub.Close()
			fmt.Fprintf(a.stderr, "qbridge: subscribed to %s\n", strings.Join(args, ", "))
			for n := 0; count == 0 || n < count; n++ {
				m, err := sub.Next()
				if err != nil {
					return err
				}
				if err := a.out.printPubSub(m, time.Now()); err != nil {
					return usageErrorf("write the output: %v", err)
				}
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&count, "count", "n", 0, "stop after this many messages (0: no limit)")
	return cmd
}
