// Command broadcast shows scenario 3, broadcast: an account that posts
// articles publishes each post on a channel, every current subscriber
// receives it, and the publisher learns from Publish how many received it.
// Subscribers only see what was published after they subscribed: a post
// published before anyone subscribed reaches nobody, and a late subscriber
// sees only the posts after it joined. Subscribe returns once the server has
// confirmed the subscription, so "subscribed" means "will see the next
// post".
//
// With qbridged running (make run):
//
//	go run ./examples/broadcast                      # 3 subscribers, 5 posts
//	go run ./examples/broadcast -subscribers 10 -posts 20 -interval 100ms
//
// About the receivers count: it is what Redis PUBLISH returns, the number of
// Redis-level subscriptions that matched. All Subscribe streams served by one
// qbridge instance share one Redis subscription, so 3 subscribers on one
// qbridged count as 1 (plain redis-cli SUBSCRIBE clients count one each).
// The example therefore also reports, per post, how many of its subscribers
// printed it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/qbridge/qbridge/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "broadcast:", err)
		os.Exit(1)
	}
}

// titles are the articles the account posts, in turn.
var titles = []string{
	"Why blocking pops beat sleep(1)",
	"Acks, leases and the worker that died",
	"Ten producers, ten consumers",
	"Moving task:prodcons:queue to qbridge",
	"What PUBLISH returns, and what it does not",
	"Dead letters are not the end",
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("broadcast", flag.ContinueOnError)
	fs.SetOutput(stdout)
	addr := fs.String("addr", envOr("QBRIDGE_ADDR", "127.0.0.1:7070"), "qbridged gRPC address (env QBRIDGE_ADDR)")
	channel := fs.String("channel", "account:alice:posts", "the channel the account posts on")
	subscribers := fs.Int("subscribers", 3, "subscribers that subscribe before the first post")
	posts := fs.Int("posts", 5, "posts to publish after they subscribed")
	lateAfter := fs.Int("late-after", 2, "a late subscriber joins after this post (0: none)")
	interval := fs.Duration("interval", 300*time.Millisecond, "pause between posts")
	wait := fs.Duration("wait", 5*time.Second, "how long subscribers get to receive the last post")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *subscribers < 1 || *posts < 1 {
		return errors.New("-subscribers and -posts must be at least 1")
	}
	out := &lockedWriter{w: stdout}

	c, err := client.Dial(*addr)
	if err != nil {
		return err
	}
	defer c.Close()

	// A post before anyone subscribed: pub/sub keeps nothing, so no
	// subscriber of this run will ever see it.
	n, err := c.Publish(ctx, *channel, []byte(post(0)))
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	fmt.Fprintf(out, "published %s before anyone subscribed: receivers=%d\n", post(0), n)

	var subs []*subscriber
	defer func() {
		for _, s := range subs {
			s.close()
		}
	}()
	subscribe := func(name string, from int) error {
		s, err := newSubscriber(ctx, c, out, name, *channel, from, *posts)
		if err != nil {
			return err
		}
		subs = append(subs, s)
		fmt.Fprintf(out, "%s subscribed to %s\n", name, *channel)
		return nil
	}
	for i := 1; i <= *subscribers; i++ {
		if err := subscribe("subscriber "+strconv.Itoa(i), 1); err != nil {
			return err
		}
	}

	receivers := make([]int64, *posts+1)
	for i := 1; i <= *posts; i++ {
		if i > 1 && !pause(ctx, *interval) {
			return ctx.Err()
		}
		n, err := c.Publish(ctx, *channel, []byte(post(i)))
		if err != nil {
			return fmt.Errorf("publish: %w", err)
		}
		receivers[i] = n
		fmt.Fprintf(out, "published %s: receivers=%d\n", post(i), n)
		if i == *lateAfter && i < *posts {
			if err := subscribe(fmt.Sprintf("subscriber %d (late)", *subscribers+1), i+1); err != nil {
				return err
			}
		}
	}

	// Give every subscriber time to receive the last post, then stop them.
	deadline, cancel := context.WithTimeout(ctx, *wait)
	defer cancel()
	for _, s := range subs {
		select {
		case <-s.last:
		case <-deadline.Done():
		}
	}
	for _, s := range subs {
		s.close()
	}

	// The summary: who saw what, and whether that is what pub/sub promises.
	var problems []string
	for i := 1; i <= *posts; i++ {
		got := 0
		for _, s := range subs {
			if s.has(i) {
				got++
			}
		}
		fmt.Fprintf(out, "%s: receivers=%d, subscribers that printed it=%d\n", post(i), receivers[i], got)
	}
	for _, s := range subs {
		seen, err := s.result()
		fmt.Fprintf(out, "%s received %d of the %d posts published after it subscribed\n", s.name, len(seen), *posts-s.from+1)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", s.name, err))
		}
		if want := wantSeq(s.from, *posts); !slices.Equal(seen, want) {
			// Pub/sub promises exactly these: nothing from before the
			// subscription, everything after it, in order.
			problems = append(problems, fmt.Sprintf("%s subscribed after post #%d and received posts %v, want %v",
				s.name, s.from-1, seen, want))
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// post is the text of post number i: "#i title".
func post(i int) string { return fmt.Sprintf("#%d %s", i, titles[i%len(titles)]) }

// seqOf parses the number of a post.
func seqOf(p []byte) (int, bool) {
	s, ok := strings.CutPrefix(string(p), "#")
	if !ok {
		return 0, false
	}
	num, _, _ := strings.Cut(s, " ")
	n, err := strconv.Atoi(num)
	return n, err == nil
}

// subscriber prints every post it receives and remembers their numbers.
type subscriber struct {
	name     string
	from     int // the first post it should see
	sub      *client.Subscription
	last     chan struct{} // closed when it received the last post
	lastOnce sync.Once
	done     chan struct{} // closed when its goroutine returned

	mu   sync.Mutex
	seen []int
	err  error
}

// newSubscriber subscribes to channel; it returns once the server has
// confirmed the subscription, so it receives every post published after.
func newSubscriber(ctx context.Context, c *client.Client, out io.Writer, name, channel string, from, lastPost int) (*subscriber, error) {
	sub, err := c.Subscribe(ctx, []string{channel}, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: subscribe: %w", name, err)
	}
	s := &subscriber{name: name, from: from, sub: sub, last: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			m, err := sub.Next()
			if err != nil {
				if !errors.Is(err, context.Canceled) {
					s.mu.Lock()
					s.err = err
					s.mu.Unlock()
				}
				return
			}
			fmt.Fprintf(out, "%s got %s\n", name, m.Payload)
			n, ok := seqOf(m.Payload)
			if !ok {
				continue // someone else posting on the channel
			}
			s.mu.Lock()
			s.seen = append(s.seen, n)
			s.mu.Unlock()
			if n == lastPost {
				s.lastOnce.Do(func() { close(s.last) })
			}
		}
	}()
	return s, nil
}

// close ends the subscription and waits for its goroutine.
func (s *subscriber) close() {
	_ = s.sub.Close()
	<-s.done
}

func (s *subscriber) has(n int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Contains(s.seen, n)
}

func (s *subscriber) result() ([]int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.seen...), s.err
}

func wantSeq(from, to int) []int {
	var s []int
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}

// pause waits d, or returns false when ctx ends first.
func pause(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// lockedWriter serialises writes: the subscribers print concurrently.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
