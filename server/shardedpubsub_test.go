package server_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// Sharded pub/sub (broker.WithShardedChannels): SPUBLISH and SSUBSCRIBE
// for the channels named, on a single Redis and on a Redis Cluster of three
// masters, as the least-privilege user.

// shardedPatterns are the sharded channels of every instance here.
var shardedPatterns = []string{"metrics.*", "prices"}

func shardedOpts() []broker.Option {
	return []broker.Option{broker.WithShardedChannels(shardedPatterns...)}
}

// openSub opens a Subscribe stream, waits for its confirmation and returns
// it with the function that ends it.
func openSub(t *testing.T, c qbridgev1.QueueServiceClient, req *qbridgev1.SubscribeRequest) (*subStream, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	st, err := c.Subscribe(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	first, err := st.Recv()
	if err != nil {
		t.Fatalf("subscribe %v: %v", req, err)
	}
	if first.GetSubscribed() == nil {
		t.Fatalf("first message is %v, not the subscription confirmation", first)
	}
	s := &subStream{ch: make(chan *qbridgev1.PubSubMessage, 10000), errc: make(chan error, 1)}
	go func() {
		for {
			m, err := st.Recv()
			if err != nil {
				s.errc <- err
				return
			}
			s.ch <- m.GetMessage()
		}
	}()
	return s, cancel
}

// subscribeFails opens a Subscribe stream that must end before its
// confirmation, and returns how it ended.
func subscribeFails(t *testing.T, c qbridgev1.QueueServiceClient, req *qbridgev1.SubscribeRequest) error {
	t.Helper()
	ctx := ctxT(t, 15*time.Second)
	st, err := c.Subscribe(ctx, req)
	if err != nil {
		return err
	}
	first, err := st.Recv()
	if err == nil {
		t.Fatalf("subscribe %v: got %v, want the stream to fail", req, first)
	}
	return err
}

// expect reads the next message of s and checks it.
func (s *subStream) expect(t *testing.T, channel, pattern, payload string) {
	t.Helper()
	m := s.next(t)
	if m.GetChannel() != channel || m.GetPattern() != pattern || string(m.GetPayload()) != payload {
		t.Fatalf("got %v; want %q on %q (pattern %q)", m, payload, channel, pattern)
	}
}

func publish(t *testing.T, c qbridgev1.QueueServiceClient, channel, payload string) int64 {
	t.Helper()
	r, err := c.Publish(ctxT(t, 10*time.Second), &qbridgev1.PublishRequest{Channel: channel, Payload: []byte(payload)})
	if err != nil {
		t.Fatalf("publish to %s: %v", channel, err)
	}
	return r.GetReceivers()
}

// shardNumSub is PUBSUB SHARDNUMSUB of ch on one Redis (a cluster node
// counts only its own subscribers).
func shardNumSub(t *testing.T, c *redis.Client, ch string) int64 {
	t.Helper()
	m, err := c.PubSubShardNumSub(ctxT(t, 5*time.Second), ch).Result()
	if err != nil {
		t.Fatalf("PUBSUB SHARDNUMSUB %s: %v", ch, err)
	}
	return m[ch]
}

func numSub(t *testing.T, c *redis.Client, ch string) int64 {
	t.Helper()
	m, err := c.PubSubNumSub(ctxT(t, 5*time.Second), ch).Result()
	if err != nil {
		t.Fatalf("PUBSUB NUMSUB %s: %v", ch, err)
	}
	return m[ch]
}

func TestShardedPubSubSingleNode(t *testing.T) {
	rs := redistest.Start(t)
	a := startInstance(t, rs, instanceConfig{brokerOpts: shardedOpts()})
	b := startInstance(t, rs, instanceConfig{brokerOpts: shardedOpts()})
	admin := rs.Client(t, 0)

	t.Run("sharded channels use SSUBSCRIBE and SPUBLISH", func(t *testing.T) {
		s, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"prices", "metrics.cpu"}})
		for _, ch := range []string{"prices", "metrics.cpu"} {
			if n, m := shardNumSub(t, admin, ch), numSub(t, admin, ch); n != 1 || m != 0 {
				t.Fatalf("%s: %d sharded and %d classic subscriptions; want 1 and 0", ch, n, m)
			}
			if n := publish(t, b.client, ch, "on "+ch); n != 1 {
				t.Fatalf("publish to %s reached %d; want 1", ch, n)
			}
			s.expect(t, ch, "", "on "+ch)
		}
		// A name that no pattern matches stays classic.
		c, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metricsX"}})
		if n, m := shardNumSub(t, admin, "metricsX"), numSub(t, admin, "metricsX"); n != 0 || m != 1 {
			t.Fatalf("metricsX: %d sharded and %d classic subscriptions; want 0 and 1", n, m)
		}
		publish(t, b.client, "metricsX", "classic")
		c.expect(t, "metricsX", "", "classic")
	})

	t.Run("receivers counts instances", func(t *testing.T) {
		openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.count"}})
		openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.count"}})
		sb, _ := openSub(t, b.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.count"}})
		// Two instances, each with one SSUBSCRIBE for its streams.
		if n := publish(t, a.client, "metrics.count", "x"); n != 2 {
			t.Fatalf("receivers = %d, want 2", n)
		}
		sb.expect(t, "metrics.count", "", "x")
	})

	t.Run("only what is published after the confirmation", func(t *testing.T) {
		publish(t, a.client, "metrics.late", "before anyone")
		openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.late"}}) // keeps it subscribed
		for i := 0; i < 50; i++ {
			publish(t, a.client, "metrics.late", "before-"+itoa(i))
			s, cancel := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.late"}})
			publish(t, b.client, "metrics.late", "after-"+itoa(i))
			if m := s.next(t); string(m.GetPayload()) != "after-"+itoa(i) {
				t.Fatalf("round %d: the late joiner's first message is %q, published before it subscribed", i, m.GetPayload())
			}
			cancel()
		}
	})

	t.Run("patterns never see sharded channels", func(t *testing.T) {
		p, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Patterns: []string{"metrics*"}})
		s, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.pat"}})
		publish(t, b.client, "metrics.pat", "sharded")
		publish(t, b.client, "metricsZ", "classic")
		s.expect(t, "metrics.pat", "", "sharded")
		// Redis answers in order: a sharded message reaching the pattern
		// would come before the classic one.
		p.expect(t, "metricsZ", "metrics*", "classic")
	})

	t.Run("mixed subscribe", func(t *testing.T) {
		// The confirmation comes once every kind of subscription took
		// effect: what is published right after it arrives, every round.
		plain := admin
		for i := 0; i < 30; i++ {
			sh, cl, pat := fmt.Sprintf("metrics.mix%d", i), fmt.Sprintf("mix%d", i), fmt.Sprintf("alerts%d.*", i)
			s, cancel := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{sh, cl, "prices"}, Patterns: []string{pat}})
			ctx := ctxT(t, 5*time.Second)
			if err := plain.SPublish(ctx, sh, "s").Err(); err != nil {
				t.Fatal(err)
			}
			if err := plain.Publish(ctx, cl, "c").Err(); err != nil {
				t.Fatal(err)
			}
			if err := plain.Publish(ctx, fmt.Sprintf("alerts%d.eu", i), "p").Err(); err != nil {
				t.Fatal(err)
			}
			if err := plain.SPublish(ctx, "prices", "s2").Err(); err != nil {
				t.Fatal(err)
			}
			got := map[string]string{}
			for len(got) < 4 {
				m := s.next(t)
				got[m.GetChannel()] = string(m.GetPayload()) + "/" + m.GetPattern()
			}
			want := map[string]string{sh: "s/", cl: "c/", fmt.Sprintf("alerts%d.eu", i): "p/" + pat, "prices": "s2/"}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("round %d: got %v, want %v", i, got, want)
			}
			cancel()
		}
	})

	t.Run("stream end unsubscribes", func(t *testing.T) {
		s1, cancel1 := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.end", "prices"}})
		s2, cancel2 := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.end"}})
		_ = s1
		if n := shardNumSub(t, admin, "metrics.end"); n != 1 {
			t.Fatalf("%d subscriptions; want 1 (one per instance)", n)
		}
		cancel1()
		if err := <-s1.errc; status.Code(err) != codes.Canceled {
			t.Fatalf("first stream ended with %v", err)
		}
		// The other stream still holds it.
		publish(t, b.client, "metrics.end", "still")
		s2.expect(t, "metrics.end", "", "still")
		if n := shardNumSub(t, admin, "metrics.end"); n != 1 {
			t.Fatalf("%d subscriptions after one of two streams ended; want 1", n)
		}
		cancel2()
		eventually(t, 5*time.Second, "SHARDNUMSUB metrics.end = 0", func() bool { return shardNumSub(t, admin, "metrics.end") == 0 })
		if n := publish(t, b.client, "metrics.end", "gone"); n != 0 {
			t.Fatalf("receivers %d after every stream ended", n)
		}
	})

	t.Run("interop with plain Redis clients", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		s, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.plain"}})
		if n := admin.SPublish(ctx, "metrics.plain", "from SPUBLISH").Val(); n != 1 {
			t.Fatalf("plain SPUBLISH reached %d; want 1", n)
		}
		s.expect(t, "metrics.plain", "", "from SPUBLISH")
		ps := admin.SSubscribe(ctx, "metrics.plain")
		defer ps.Close()
		if m, err := ps.Receive(ctx); err != nil {
			t.Fatal(err)
		} else if sub, ok := m.(*redis.Subscription); !ok || sub.Kind != "ssubscribe" {
			t.Fatalf("plain SSUBSCRIBE: %v", m)
		}
		if n := publish(t, b.client, "metrics.plain", "from qbridge"); n != 2 {
			t.Fatalf("receivers %d; want 2 (qbridge instance and plain client)", n)
		}
		m, err := ps.ReceiveMessage(ctx)
		if err != nil || m.Payload != "from qbridge" || m.Channel != "metrics.plain" {
			t.Fatalf("plain SSUBSCRIBE got %v, %v", m, err)
		}
		s.expect(t, "metrics.plain", "", "from qbridge")
	})
}

// A sharded subscriber that reads nothing is cut off like a classic one:
// it lets go of its SSUBSCRIBE at once and its stream ends with
// RESOURCE_EXHAUSTED.
func TestShardedSlowSubscriberIsCutOff(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{brokerOpts: shardedOpts(), serverOpts: []server.Option{server.WithSubscriberBuffer(16, 1<<20)}})
	ctx := ctxT(t, 20*time.Second)
	cc, err := grpc.NewClient(in.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	st, err := qbridgev1.NewQueueServiceClient(cc).Subscribe(ctx, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.stalled"}})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.GetSubscribed() == nil {
		t.Fatalf("first message: %v, %v; want the confirmation", r, err)
	}
	if n := shardNumSub(t, in.rdb, "metrics.stalled"); n != 1 {
		t.Fatalf("%d subscriptions; want 1", n)
	}
	payload := strings.Repeat("x", 1024)
	for i := 0; i < 400; i++ {
		if err := in.rdb.SPublish(ctx, "metrics.stalled", payload).Err(); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 5*time.Second, "the overflowed subscriber lets go of its SSUBSCRIBE", func() bool {
		return shardNumSub(t, in.rdb, "metrics.stalled") == 0
	})
	for {
		if _, err := st.Recv(); err != nil {
			wantCode(t, err, codes.ResourceExhausted, "too slow")
			break
		}
	}
}

// A Redis user without SSUBSCRIBE: the stream ends with
// FAILED_PRECONDITION naming the refusal, instead of waiting forever, and
// the instance's other streams are not affected.
func TestShardedSubscribeRefusedByACL(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{brokerOpts: shardedOpts()})
	admin := rs.Client(t, 0)
	classic, _ := openSub(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"news"}})
	if err := admin.Do(ctxT(t, 5*time.Second), "ACL", "SETUSER", redistest.ServiceUser, "-ssubscribe").Err(); err != nil {
		t.Fatal(err)
	}
	err := subscribeFails(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"news", "prices"}})
	wantCode(t, err, codes.FailedPrecondition, "NOPERM")
	if n := numSub(t, admin, "news"); n != 1 {
		t.Fatalf("news has %d subscriptions after the failed stream; want 1 (the other stream's)", n)
	}
	publish(t, in.client, "news", "still here")
	classic.expect(t, "news", "", "still here")
	// Allowed again: sharded subscriptions work.
	if err := admin.Do(ctxT(t, 5*time.Second), "ACL", "SETUSER", redistest.ServiceUser, "+ssubscribe").Err(); err != nil {
		t.Fatal(err)
	}
	s, _ := openSub(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"prices"}})
	if n := publish(t, in.client, "prices", "ok"); n != 1 {
		t.Fatalf("receivers %d; want 1", n)
	}
	s.expect(t, "prices", "", "ok")
}

// Sharded streams that end leave nothing behind: each group's runner and
// reader end with the group's last stream.
func TestShardedStreamsDoNotLeakGoroutines(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{brokerOpts: shardedOpts()})
	stats(t, in.client, "warm")
	openSub(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"warm"}})
	snapshot := goleak.IgnoreCurrent()
	var cancels []context.CancelFunc
	for _, req := range []*qbridgev1.SubscribeRequest{
		{Channels: []string{"prices"}},
		{Channels: []string{"metrics.a", "metrics.b", "news"}, Patterns: []string{"n*"}},
		{Channels: []string{"metrics.a"}},
	} {
		_, cancel := openSub(t, in.client, req)
		cancels = append(cancels, cancel)
	}
	if goleak.Find(snapshot) == nil {
		t.Fatal("sharded subscriptions run no goroutine: is the check blind?")
	}
	for _, c := range cancels {
		c()
	}
	eventually(t, 5*time.Second, "SHARDNUMSUB of every channel = 0", func() bool {
		m := in.rdb.PubSubShardNumSub(ctxT(t, 5*time.Second), "prices", "metrics.a", "metrics.b").Val()
		return m["prices"]+m["metrics.a"]+m["metrics.b"] == 0
	})
	deadline := time.Now().Add(5 * time.Second)
	for goleak.Find(snapshot) != nil && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond) // poll interval
	}
	goleak.VerifyNone(t, snapshot)
}

// Redis restarts: a new sharded Subscribe fails with UNAVAILABLE while it
// is down, and an open one resumes once it is back.
func TestShardedSubscriptionSurvivesRedisRestart(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{brokerOpts: shardedOpts()})
	s, _ := openSub(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"prices"}})
	publish(t, in.client, "prices", "before")
	s.expect(t, "prices", "", "before")
	rs.Stop(t)
	err := subscribeFails(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{"metrics.down"}})
	wantCode(t, err, codes.Unavailable, "")
	rs.Restart(t)
	resumed(t, in.client, s, "prices")
}

// resumed waits until a Publish to channel reaches a subscriber again (the
// instance subscribed anew) and checks that s receives that message.
func resumed(t *testing.T, c qbridgev1.QueueServiceClient, s *subStream, channel string) {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	var payload string
	eventually(t, 20*time.Second, "a publish to "+channel+" reaches the subscription again", func() bool {
		payload = fmt.Sprintf("after-%d", time.Now().UnixNano())
		r, err := c.Publish(ctx, &qbridgev1.PublishRequest{Channel: channel, Payload: []byte(payload)})
		return err == nil && r.GetReceivers() == 1
	})
	// Messages published while nobody was subscribed are not delivered:
	// the first to arrive is the one that reached it.
	s.expect(t, channel, "", payload)
}

// nodeClients returns node i's client (default user) by index, made once.
func nodeClients(t *testing.T, c *redistest.Cluster) func(int) *redis.Client {
	clients := make([]*redis.Client, c.Len())
	for i := range clients {
		clients[i] = c.Node(i).Client(t, 0)
	}
	return func(i int) *redis.Client { return clients[i] }
}

// startOnSeed runs a qbridge server on Redis Cluster c whose clients know
// only the node at seed to begin with (they learn the others from it).
// mainReload, when not 0, is the ClusterStateReloadInterval of the main
// client (qbridged's is 1 s, so that Publish follows a failover); the
// blocking client, which the sharded subscriptions use, keeps go-redis's
// default (a minute), so that they can only follow a slot to its new
// master by re-reading the slot map themselves.
func startOnSeed(t *testing.T, c *redistest.Cluster, seed string, mainReload time.Duration, brokerOpts []broker.Option) *topoInstance {
	t.Helper()
	mk := func(pool int, reload time.Duration) redis.UniversalClient {
		o := c.ServiceOptions()
		o.Addrs = []string{seed}
		o.DialTimeout = time.Second
		o.ContextTimeoutEnabled = true
		o.DisableIdentity = true // no CLIENT SETINFO: the ACL does not allow it
		o.PoolSize = pool
		o.ClusterStateReloadInterval = reload
		return redis.NewClusterClient(o)
	}
	return serveOn(t, mk(0, mainReload), mk(server.DefaultBlockingWaits+2, 0), brokerOpts)
}

// spreadChannels returns n sharded channel names starting with base whose
// slots are served by n different masters (as far as there are).
func spreadChannels(t *testing.T, c *redistest.Cluster, base string) []string {
	t.Helper()
	return (&topology{cluster: c}).spread(t, base, redistest.ClusterSize)
}

func TestShardedPubSubCluster(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	// Two instances whose clients start from different nodes.
	a := startOnSeed(t, c, c.Node(0).Addr(), 0, shardedOpts())
	b := startOnSeed(t, c, c.Node(1).Addr(), 0, shardedOpts())
	admin := c.Client(t)
	node := nodeClients(t, c)

	t.Run("reaches both instances with an exact count", func(t *testing.T) {
		chans := spreadChannels(t, c, "metrics.both")
		sa, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: chans})
		sb, _ := openSub(t, b.client, &qbridgev1.SubscribeRequest{Channels: chans})
		for _, ch := range chans {
			owner := c.NodeOf(t, ch)
			for i := 0; i < c.Len(); i++ {
				want := int64(0)
				if i == owner {
					want = 2
				}
				if n := shardNumSub(t, node(i), ch); n != want {
					t.Fatalf("%s: node %d has %d sharded subscriptions; want %d (its slot is on node %d)", ch, i, n, want, owner)
				}
			}
			for round, pub := range []*topoInstance{a, b, a, b} {
				payload := fmt.Sprintf("%s-%d", ch, round)
				// SPUBLISH counts every subscriber of the channel: the two
				// instances, whichever node the publisher's client starts from.
				if n := publish(t, pub.client, ch, payload); n != 2 {
					t.Fatalf("sharded publish to %s reached %d; want 2", ch, n)
				}
				sa.expect(t, ch, "", payload)
				sb.expect(t, ch, "", payload)
			}
		}
	})

	t.Run("classic counts are node-local", func(t *testing.T) {
		sa, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{"classic"}})
		sb, _ := openSub(t, b.client, &qbridgev1.SubscribeRequest{Channels: []string{"classic"}})
		local := map[int64]bool{}
		var total int64
		for i := 0; i < c.Len(); i++ {
			n := numSub(t, node(i), "classic")
			local[n] = true
			total += n
		}
		if total != 2 {
			t.Fatalf("%d classic subscriptions over the nodes; want 2", total)
		}
		for i := 0; i < 10; i++ {
			// PUBLISH reaches the whole cluster, but counts only the
			// subscribers on the node that took it (documented).
			n := publish(t, a.client, "classic", itoa(i))
			if !local[n] {
				t.Fatalf("classic publish reached %d; want the count of one node, one of %v", n, local)
			}
			sa.expect(t, "classic", "", itoa(i))
			sb.expect(t, "classic", "", itoa(i))
		}
	})

	t.Run("patterns never see sharded channels", func(t *testing.T) {
		p, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Patterns: []string{"metrics*"}})
		for _, ch := range spreadChannels(t, c, "metrics.pat") {
			s, _ := openSub(t, b.client, &qbridgev1.SubscribeRequest{Channels: []string{ch}})
			publish(t, a.client, ch, "sharded")
			s.expect(t, ch, "", "sharded")
		}
		publish(t, b.client, "metricsZ", "classic")
		p.expect(t, "metricsZ", "metrics*", "classic")
		select {
		case m := <-p.ch:
			t.Fatalf("the pattern got %v", m)
		default:
		}
	})

	t.Run("mixed subscribe", func(t *testing.T) {
		for i := 0; i < 10; i++ {
			shards := spreadChannels(t, c, fmt.Sprintf("metrics.mix%d", i))
			cl, pat := fmt.Sprintf("mix%d", i), fmt.Sprintf("alerts%d.*", i)
			s, cancel := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: append([]string{cl}, shards...), Patterns: []string{pat}})
			ctx := ctxT(t, 5*time.Second)
			want := map[string]string{cl: "c/", fmt.Sprintf("alerts%d.eu", i): "p/" + pat}
			for _, sh := range shards {
				if err := admin.SPublish(ctx, sh, "s").Err(); err != nil {
					t.Fatal(err)
				}
				want[sh] = "s/"
			}
			if err := admin.Publish(ctx, cl, "c").Err(); err != nil {
				t.Fatal(err)
			}
			if err := admin.Publish(ctx, fmt.Sprintf("alerts%d.eu", i), "p").Err(); err != nil {
				t.Fatal(err)
			}
			got := map[string]string{}
			for len(got) < len(want) {
				m := s.next(t)
				got[m.GetChannel()] = string(m.GetPayload()) + "/" + m.GetPattern()
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("round %d: got %v, want %v", i, got, want)
			}
			cancel()
		}
	})

	t.Run("stream end unsubscribes", func(t *testing.T) {
		chans := spreadChannels(t, c, "metrics.end")
		_, cancel := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: chans})
		for _, ch := range chans {
			if n := shardNumSub(t, node(c.NodeOf(t, ch)), ch); n != 1 {
				t.Fatalf("%s: %d subscriptions on its node; want 1", ch, n)
			}
		}
		cancel()
		for _, ch := range chans {
			n := node(c.NodeOf(t, ch))
			eventually(t, 5*time.Second, "SHARDNUMSUB "+ch+" = 0 on its node", func() bool { return shardNumSub(t, n, ch) == 0 })
		}
	})

	t.Run("interop with plain Redis clients", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		for _, ch := range spreadChannels(t, c, "metrics.plain") {
			s, _ := openSub(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{ch}})
			if n := admin.SPublish(ctx, ch, "from SPUBLISH").Val(); n != 1 {
				t.Fatalf("plain SPUBLISH to %s reached %d; want 1", ch, n)
			}
			s.expect(t, ch, "", "from SPUBLISH")
			ps := admin.SSubscribe(ctx, ch)
			if m, err := ps.Receive(ctx); err != nil {
				t.Fatal(err)
			} else if sub, ok := m.(*redis.Subscription); !ok || sub.Kind != "ssubscribe" {
				t.Fatalf("plain SSUBSCRIBE: %v", m)
			}
			if n := publish(t, b.client, ch, "from qbridge"); n != 2 {
				t.Fatalf("receivers %d; want 2 (qbridge instance and plain client)", n)
			}
			m, err := ps.ReceiveMessage(ctx)
			if err != nil || m.Payload != "from qbridge" || m.Channel != ch {
				t.Fatalf("plain SSUBSCRIBE got %v, %v", m, err)
			}
			s.expect(t, ch, "", "from qbridge")
			_ = ps.Close()
		}
	})
}

// A cluster node restarts with a sharded subscription open on it: while it
// is down a new Subscribe to its slot fails with UNAVAILABLE; once it is
// back the open subscription resumes. Then the slot moves to another node
// (Redis ends the subscription with SUNSUBSCRIBE): it resumes on the new
// owner.
func TestShardedPubSubClusterNodeRestartAndSlotMigration(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	in := startOnSeed(t, c, c.Node(0).Addr(), 0, shardedOpts())
	node := nodeClients(t, c)
	chans := spreadChannels(t, c, "metrics.restart")
	// A channel whose node is not the one the instance's clients start
	// from.
	var ch string
	var victim int
	for _, x := range chans {
		if i := c.NodeOf(t, x); i != 0 {
			ch, victim = x, i
			break
		}
	}
	s, _ := openSub(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{ch}})
	publish(t, in.client, ch, "before")
	s.expect(t, ch, "", "before")

	c.Kill(t, victim)
	var other string // another sharded channel on the same node
	for i := 0; other == ""; i++ {
		if x := fmt.Sprintf("metrics.other-%d", i); c.NodeOf(t, x) == victim {
			other = x
		}
	}
	err := subscribeFails(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{other}})
	wantCode(t, err, codes.Unavailable, "")
	c.Restart(t, victim)
	resumed(t, in.client, s, ch)
	if n := shardNumSub(t, node(victim), ch); n != 1 {
		t.Fatalf("%d subscriptions on the restarted node; want 1", n)
	}

	// The slot moves (it holds no keys: nothing to MIGRATE).
	to := (victim + 1) % redistest.ClusterSize
	moveSlot(t, c, node, ch, victim, to)
	resumed(t, in.client, s, ch)
	if n := shardNumSub(t, node(to), ch); n != 1 {
		t.Fatalf("%d subscriptions on the slot's new node; want 1", n)
	}
	if n := shardNumSub(t, node(victim), ch); n != 0 {
		t.Fatalf("%d subscriptions left on the slot's old node; want 0", n)
	}
	// And the stream never ended.
	select {
	case err := <-s.errc:
		t.Fatalf("the subscription ended: %v", err)
	default:
	}
}

// A master with a sharded subscription open on it is SIGKILLed and its
// replica promoted: the subscription resumes on the new master, and the
// stream never ends.
func TestShardedPubSubClusterFailover(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, redistest.WithReplicas(1))
	in := startOnSeed(t, c, c.Node(0).Addr(), failoverReloadInterval, shardedOpts())
	node := nodeClients(t, c)
	ch := "metrics.failover"
	s, _ := openSub(t, in.client, &qbridgev1.SubscribeRequest{Channels: []string{ch}})
	publish(t, in.client, ch, "before")
	s.expect(t, ch, "", "before")
	old := c.KillMasterOf(t, ch)
	promoted := c.WaitPromotion(t, ch, old)
	resumed(t, in.client, s, ch)
	if n := shardNumSub(t, node(promoted), ch); n != 1 {
		t.Fatalf("%d subscriptions on the promoted master; want 1", n)
	}
	select {
	case err := <-s.errc:
		t.Fatalf("the subscription ended: %v", err)
	default:
	}
}

// moveSlot moves the (keyless) slot of key from node from to node to, the
// way redis-cli --cluster reshard does, and waits until every node agrees.
func moveSlot(t *testing.T, c *redistest.Cluster, node func(int) *redis.Client, key string, from, to int) {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	src, dst := node(from), node(to)
	slot, err := src.ClusterKeySlot(ctx, key).Result()
	if err != nil {
		t.Fatal(err)
	}
	if n := src.ClusterCountKeysInSlot(ctx, int(slot)).Val(); n != 0 {
		t.Fatalf("slot %d holds %d keys", slot, n)
	}
	srcID, dstID := src.ClusterMyID(ctx).Val(), dst.ClusterMyID(ctx).Val()
	for _, step := range []struct {
		on   *redis.Client
		args []any
	}{
		{dst, []any{"CLUSTER", "SETSLOT", slot, "IMPORTING", srcID}},
		{src, []any{"CLUSTER", "SETSLOT", slot, "MIGRATING", dstID}},
		{dst, []any{"CLUSTER", "SETSLOT", slot, "NODE", dstID}},
		{src, []any{"CLUSTER", "SETSLOT", slot, "NODE", dstID}},
	} {
		if err := step.on.Do(ctx, step.args...).Err(); err != nil {
			t.Fatalf("%v: %v", step.args, err)
		}
	}
	eventually(t, 20*time.Second, "every node has the slot on its new node", func() bool {
		for i := 0; i < c.Len(); i++ {
			slots, err := node(i).ClusterSlots(ctx).Result()
			if err != nil {
				return false
			}
			ok := false
			for _, r := range slots {
				if int64(r.Start) <= slot && slot <= int64(r.End) && len(r.Nodes) > 0 && r.Nodes[0].Addr == c.Node(to).Addr() {
					ok = true
				}
			}
			if !ok {
				return false
			}
		}
		return true
	})
}
