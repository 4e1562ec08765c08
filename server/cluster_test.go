package server_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"reflect"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// The server's behaviours over a real Redis Cluster (three masters) and a
// real Sentinel setup (master, replica, three sentinels), with the broker's
// clients made by redis.NewUniversalClient as qbridged makes them, as the
// least-privilege user. On the cluster, the queues of each behaviour are
// named so that their keys land on different nodes.

// topology is a Redis deployment the behaviours run on.
type topology struct {
	name string
	// opts are the service user's options; each instance gets its own
	// clients from them.
	opts func() *redis.UniversalOptions
	// admin is the test's own client (default user).
	admin redis.UniversalClient
	// cluster is set on Redis Cluster.
	cluster *redistest.Cluster
}

func clusterTopology(t *testing.T, c *redistest.Cluster) *topology {
	return &topology{
		name: "cluster",
		opts: func() *redis.UniversalOptions {
			o := c.ServiceOptions()
			return &redis.UniversalOptions{Addrs: o.Addrs, IsClusterMode: true, Username: o.Username, Password: o.Password}
		},
		admin:   c.Client(t),
		cluster: c,
	}
}

func sentinelTopology(t *testing.T, s *redistest.Sentinel) *topology {
	return &topology{
		name: "sentinel",
		opts: func() *redis.UniversalOptions {
			o := s.ServiceOptions()
			return &redis.UniversalOptions{Addrs: o.SentinelAddrs, MasterName: o.MasterName, Username: o.Username, Password: o.Password}
		},
		admin: s.Client(t),
	}
}

// spread returns n queue names starting with base; on a cluster, their
// ready lists (and with them all their keys) are on n different nodes as
// far as there are nodes.
func (tp *topology) spread(t *testing.T, base string, n int) []string {
	t.Helper()
	if tp.cluster == nil {
		out := make([]string, n)
		for i := range out {
			out[i] = fmt.Sprintf("%s-%d", base, i)
		}
		return out
	}
	byNode := map[int]string{}
	var out []string
	for i := 0; len(out) < n && i < 10000; i++ {
		q := fmt.Sprintf("%s-%d", base, i)
		node := tp.cluster.NodeOf(t, broker.NewKeys("").Ready(q))
		if _, taken := byNode[node]; taken && len(byNode) < redistest.ClusterSize {
			continue
		}
		byNode[node] = q
		out = append(out, q)
	}
	return out
}

// topoInstance is one in-process qbridge server on a topology.
type topoInstance struct {
	srv            *server.Server
	gs             *grpc.Server
	conn           *grpc.ClientConn
	client         qbridgev1.QueueServiceClient
	admin          qbridgev1.AdminServiceClient
	main, blocking redis.UniversalClient
}

// startOn runs a qbridge server on tp with clients made like qbridged's.
func startOn(t *testing.T, tp *topology, brokerOpts []broker.Option, serverOpts ...server.Option) *topoInstance {
	t.Helper()
	mk := func(pool int) redis.UniversalClient {
		o := tp.opts()
		o.DialTimeout = time.Second
		o.ContextTimeoutEnabled = true
		o.DisableIdentity = true // no CLIENT SETINFO: the ACL does not allow it
		o.PoolSize = pool
		return redis.NewUniversalClient(o)
	}
	return serveOn(t, mk(0), mk(server.DefaultBlockingWaits+2), brokerOpts, serverOpts...)
}

// serveOn runs a qbridge server over the given Redis clients (closed at
// cleanup) and returns it with a gRPC client.
func serveOn(t *testing.T, main, blocking redis.UniversalClient, brokerOpts []broker.Option, serverOpts ...server.Option) *topoInstance {
	t.Helper()
	in := &topoInstance{main: main, blocking: blocking}
	b := broker.New(in.main, append([]broker.Option{broker.WithBlockingClient(in.blocking)}, brokerOpts...)...)
	if err := b.LoadScripts(ctxT(t, 10*time.Second)); err != nil {
		t.Fatalf("load scripts: %v", err)
	}
	opts := append([]server.Option{
		server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithReapInterval(100 * time.Millisecond),
		server.WithWaitSlice(time.Second),
	}, serverOpts...)
	in.srv = server.New(b, opts...)
	in.srv.Start()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	in.gs = grpc.NewServer()
	qbridgev1.RegisterQueueServiceServer(in.gs, in.srv)
	qbridgev1.RegisterAdminServiceServer(in.gs, in.srv.Admin())
	go func() { _ = in.gs.Serve(lis) }()
	in.conn, err = grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	in.client = qbridgev1.NewQueueServiceClient(in.conn)
	in.admin = qbridgev1.NewAdminServiceClient(in.conn)
	t.Cleanup(func() {
		in.srv.StopStreams()
		in.gs.Stop()
		in.srv.Close()
		_ = in.conn.Close()
		_ = in.blocking.Close()
		_ = in.main.Close()
	})
	return in
}

// topoEnv is what a behaviour gets: two instances on the same topology.
type topoEnv struct {
	tp   *topology
	a, b *topoInstance
}

func TestClusterBehaviours(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t)
	runBehaviours(t, clusterTopology(t, c))
}

func TestSentinelBehaviours(t *testing.T) {
	t.Parallel()
	s := redistest.StartSentinel(t)
	runBehaviours(t, sentinelTopology(t, s))
}

func runBehaviours(t *testing.T, tp *topology) {
	e := &topoEnv{tp: tp, a: startOn(t, tp, nil), b: startOn(t, tp, nil)}
	for _, bh := range []struct {
		name string
		run  func(t *testing.T, e *topoEnv)
	}{
		{"keys in one slot", behaveSlots},
		{"enqueue consume ack", behaveBasic},
		{"nack and retry", behaveRetry},
		{"dead letters and replay", behaveDeadLetters},
		{"delayed messages", behaveDelayed},
		{"max length", behaveMaxLength},
		{"dedup", behaveDedup},
		{"priority", behavePriority},
		{"stream end requeues", behaveStreamEnd},
		{"two instances share work", behaveSharing},
		{"parked queues wake", behaveParked},
		{"pubsub", behavePubSub},
		{"admin", behaveAdmin},
		{"results", behaveResults},
		{"concurrent calls and a lost script cache", behaveConcurrent},
	} {
		t.Run(bh.name, func(t *testing.T) {
			t.Parallel()
			bh.run(t, e)
		})
	}
}

// behaveSlots checks, with Redis's own CLUSTER KEYSLOT, that every key of a
// queue is in the slot of its ready list, with and without a key prefix.
func behaveSlots(t *testing.T, e *topoEnv) {
	if e.tp.cluster == nil {
		t.Skip("slots are a cluster matter")
	}
	cc := e.tp.admin
	ctx := ctxT(t, 10*time.Second)
	if n := len(queueKeys(broker.NewKeys(""), "q")); n < 15 {
		t.Fatalf("queueKeys finds only %d keys", n)
	}
	for _, prefix := range []string{"", "app:", "my app/"} {
		k := broker.NewKeys(prefix)
		for _, q := range append(e.tp.spread(t, "slots", 3), "task:prodcons:queue", "a b", "ü") {
			want, err := cc.ClusterKeySlot(ctx, k.Ready(q)).Result()
			if err != nil {
				t.Fatal(err)
			}
			for _, key := range queueKeys(k, q) {
				if got, err := cc.ClusterKeySlot(ctx, key).Result(); err != nil || got != want {
					t.Errorf("prefix %q queue %q: %q in slot %d (%v), its ready list %q in %d", prefix, q, key, got, err, k.Ready(q), want)
				}
			}
		}
	}
	// And a prefixed instance works end to end (the ACL of the empty
	// prefix allows every key).
	in := startOn(t, e.tp, []broker.Option{broker.WithKeyPrefix("app:")})
	for _, q := range e.tp.spread(t, "prefixed", 3) {
		id := enqueueOne(t, in.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
		s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(5 * time.Second)})
		if d := s.next(t, 5*time.Second); d.GetId() != id {
			t.Fatalf("%s: got %s, want %s", q, d.GetId(), id)
		} else if err := ack(t, in.client, d); err != nil {
			t.Fatal(err)
		}
		if n, err := cc.Exists(ctx, "app:"+q, "{app:"+q+"}:qb:counters").Result(); err != nil || n != 1 {
			t.Fatalf("%s: prefixed keys: %d, %v", q, n, err)
		}
	}
}

// queueKeys returns every key of queue q that Keys names: the results of
// every method of the form func(queue string) string (so keys added later
// are checked too) except the ready list and channel names.
func queueKeys(k broker.Keys, q string) []string {
	notKeys := map[string]bool{"Ready": true, "Channel": true, "StripChannel": true, "ResultsChannel": true}
	var out []string
	v := reflect.ValueOf(k)
	for i := 0; i < v.NumMethod(); i++ {
		m, name := v.Method(i), v.Type().Method(i).Name
		if notKeys[name] || m.Type().NumIn() != 1 || m.Type().NumOut() != 1 ||
			m.Type().In(0).Kind() != reflect.String || m.Type().Out(0).Kind() != reflect.String {
			continue
		}
		out = append(out, m.Call([]reflect.Value{reflect.ValueOf(q)})[0].String())
	}
	return out
}

func enqueueOne(t *testing.T, c qbridgev1.QueueServiceClient, req *qbridgev1.EnqueueRequest) string {
	t.Helper()
	resp, err := c.Enqueue(ctxT(t, 10*time.Second), req)
	if err != nil {
		t.Fatalf("enqueue to %s: %v", req.GetQueue(), err)
	}
	return resp.GetId()
}

func nackOne(t *testing.T, c qbridgev1.QueueServiceClient, d *qbridgev1.Delivery, action qbridgev1.NackAction, delay time.Duration, errText string) {
	t.Helper()
	req := &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}, Action: action, Error: errText}
	if delay > 0 {
		req.RetryDelay = durationpb.New(delay)
	}
	if r, err := c.Nack(ctxT(t, 10*time.Second), req); err != nil || r.GetNacked() != 1 {
		t.Fatalf("nack %s: %v, %v", d.GetId(), r, err)
	}
}

func fullStats(t *testing.T, c qbridgev1.QueueServiceClient, q string) *qbridgev1.GetQueueStatsResponse {
	t.Helper()
	r, err := c.GetQueueStats(ctxT(t, 5*time.Second), &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil {
		t.Fatalf("stats of %s: %v", q, err)
	}
	return r
}

func waitSettled(t *testing.T, c qbridgev1.QueueServiceClient, q string) {
	t.Helper()
	eventually(t, 10*time.Second, q+" empty and settled", func() bool {
		r := fullStats(t, c, q)
		return r.GetReady() == 0 && r.GetInFlight() == 0 && r.GetDelayed() == 0
	})
}

func behaveBasic(t *testing.T, e *topoEnv) {
	for _, q := range e.tp.spread(t, "basic", 3) {
		id := enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("hello " + q), Headers: map[string]string{"k": "v"}})
		if r := fullStats(t, e.b.client, q); r.GetReady() != 1 {
			t.Fatalf("%s: ready %d, want 1", q, r.GetReady())
		}
		s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 4, LeaseDuration: lease(10 * time.Second)})
		d := s.next(t, 5*time.Second)
		if d.GetId() != id || string(d.GetPayload()) != "hello "+q || d.GetHeaders()["k"] != "v" || d.GetAttempt() != 1 || d.GetQueue() != q {
			t.Fatalf("%s: delivery %v", q, d)
		}
		if err := ack(t, e.a.client, d); err != nil { // acked through the other instance
			t.Fatalf("%s: ack: %v", q, err)
		}
		waitSettled(t, e.a.client, q)
		if c := fullStats(t, e.a.client, q).GetCounters(); c.GetEnqueued() != 1 || c.GetAcked() != 1 {
			t.Fatalf("%s: counters %v", q, c)
		}
		// A plain Redis producer's push wakes the waiting consumer.
		if err := e.tp.admin.LPush(ctxT(t, 5*time.Second), q, "legacy").Err(); err != nil {
			t.Fatal(err)
		}
		if d := s.next(t, 5*time.Second); string(d.GetPayload()) != "legacy" {
			t.Fatalf("%s: legacy delivery %v", q, d)
		} else if err := ack(t, e.b.client, d); err != nil {
			t.Fatal(err)
		}
	}
}

func behaveRetry(t *testing.T, e *topoEnv) {
	for _, q := range e.tp.spread(t, "retry", 3) {
		id := enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("r")})
		s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(10 * time.Second)})
		d := s.next(t, 5*time.Second)
		nackOne(t, e.b.client, d, qbridgev1.NackAction_NACK_ACTION_RETRY, 300*time.Millisecond, "boom")
		if r := fullStats(t, e.a.client, q); r.GetDelayed() != 1 {
			t.Fatalf("%s: delayed %d after a retry nack, want 1", q, r.GetDelayed())
		}
		d = s.next(t, 5*time.Second)
		if d.GetId() != id || d.GetAttempt() != 2 || d.GetLastError() != "boom" {
			t.Fatalf("%s: redelivery %v", q, d)
		}
		// Requeue at once: straight back.
		nackOne(t, e.a.client, d, qbridgev1.NackAction_NACK_ACTION_REQUEUE, 0, "")
		d = s.next(t, 5*time.Second)
		if d.GetId() != id || d.GetAttempt() != 3 {
			t.Fatalf("%s: requeued delivery %v", q, d)
		}
		if err := ack(t, e.b.client, d); err != nil {
			t.Fatal(err)
		}
		waitSettled(t, e.a.client, q)
	}
}

func behaveDeadLetters(t *testing.T, e *topoEnv) {
	for _, q := range e.tp.spread(t, "dead", 3) {
		ctx := ctxT(t, 30*time.Second)
		if _, err := e.a.admin.UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: q,
			Config: &qbridgev1.QueueConfig{RetryPolicy: &qbridgev1.RetryPolicy{MaxAttempts: 2}}}); err != nil {
			t.Fatal(err)
		}
		id := enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("d")})
		s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(10 * time.Second)})
		nackOne(t, e.b.client, s.next(t, 5*time.Second), qbridgev1.NackAction_NACK_ACTION_REQUEUE, 0, "first")
		nackOne(t, e.b.client, s.next(t, 5*time.Second), qbridgev1.NackAction_NACK_ACTION_REQUEUE, 0, "second")
		if r := fullStats(t, e.a.client, q); r.GetDead() != 1 || r.GetReady() != 0 {
			t.Fatalf("%s: dead %d ready %d after max attempts", q, r.GetDead(), r.GetReady())
		}
		peek, err := e.a.admin.PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{Queue: q, State: qbridgev1.MessageState_MESSAGE_STATE_DEAD})
		if err != nil || len(peek.GetMessages()) != 1 || peek.GetMessages()[0].GetId() != id ||
			peek.GetMessages()[0].GetDeadReason() != "max attempts reached" || peek.GetMessages()[0].GetLastError() != "second" {
			t.Fatalf("%s: dead letters %v, %v", q, peek, err)
		}
		if r, err := e.b.admin.ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: q, All: true}); err != nil || r.GetReplayed() != 1 {
			t.Fatalf("%s: replay: %v, %v", q, r, err)
		}
		d := s.next(t, 5*time.Second)
		if d.GetId() != id || d.GetAttempt() != 1 {
			t.Fatalf("%s: replayed delivery %v", q, d)
		}
		nackOne(t, e.b.client, d, qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER, 0, "give up")
		if r, err := e.a.admin.DeleteDeadLetters(ctx, &qbridgev1.DeleteDeadLettersRequest{Queue: q, All: true}); err != nil || r.GetDeleted() != 1 {
			t.Fatalf("%s: delete dead letters: %v, %v", q, r, err)
		}
		if r := fullStats(t, e.a.client, q); r.GetDead() != 0 || r.GetCounters().GetDeadLettered() != 2 {
			t.Fatalf("%s: stats after deleting dead letters %v", q, r)
		}
	}
}

func behaveDelayed(t *testing.T, e *topoEnv) {
	qs := e.tp.spread(t, "delayed", 3)
	const delay = 700 * time.Millisecond
	ids := map[string]string{}
	start := time.Now()
	for i, q := range qs {
		req := &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("later"), Delay: durationpb.New(delay)}
		in := e.a
		if i%2 == 1 {
			in = e.b
		}
		ids[q] = enqueueOne(t, in.client, req)
		if r := fullStats(t, e.a.client, q); r.GetDelayed() != 1 || r.GetReady() != 0 {
			t.Fatalf("%s: delayed %d ready %d", q, r.GetDelayed(), r.GetReady())
		}
	}
	for _, q := range qs {
		s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(10 * time.Second)})
		d := s.next(t, 10*time.Second)
		if d.GetId() != ids[q] {
			t.Fatalf("%s: got %v", q, d)
		}
		if since := time.Since(start); since < delay-50*time.Millisecond {
			t.Fatalf("%s: delivered after %v, before its delay %v", q, since, delay)
		}
		if err := ack(t, e.b.client, d); err != nil {
			t.Fatal(err)
		}
	}
}

func behaveMaxLength(t *testing.T, e *topoEnv) {
	for _, q := range e.tp.spread(t, "bounded", 3) {
		ctx := ctxT(t, 10*time.Second)
		if _, err := e.a.admin.UpdateQueueConfig(ctx, &qbridgev1.UpdateQueueConfigRequest{Queue: q,
			Config: &qbridgev1.QueueConfig{MaxLength: 2}}); err != nil {
			t.Fatal(err)
		}
		enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("1")})
		enqueueOne(t, e.b.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("2"), Delay: durationpb.New(time.Hour)})
		_, err := e.a.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("3")})
		wantCode(t, err, codes.ResourceExhausted, "")
		_, err = e.b.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{{Payload: []byte("4")}}})
		wantCode(t, err, codes.ResourceExhausted, "")
		if r := fullStats(t, e.a.client, q); r.GetReady() != 1 || r.GetDelayed() != 1 {
			t.Fatalf("%s: ready %d delayed %d", q, r.GetReady(), r.GetDelayed())
		}
	}
}

func behaveDedup(t *testing.T, e *topoEnv) {
	for _, q := range e.tp.spread(t, "dedup", 3) {
		ctx := ctxT(t, 10*time.Second)
		r1, err := e.a.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("1"), DedupKey: "order-7"})
		if err != nil || r1.GetDuplicate() {
			t.Fatalf("%s: first: %v, %v", q, r1, err)
		}
		r2, err := e.b.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("2"), DedupKey: "order-7"})
		if err != nil || !r2.GetDuplicate() || r2.GetId() != r1.GetId() {
			t.Fatalf("%s: second: %v, %v; want a duplicate of %s", q, r2, err, r1.GetId())
		}
		rb, err := e.a.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: []*qbridgev1.BatchMessage{
			{Payload: []byte("3"), DedupKey: "order-7"}, {Payload: []byte("4"), DedupKey: "order-8"}}})
		if err != nil || !slices.Equal(rb.GetDuplicate(), []bool{true, false}) || rb.GetIds()[0] != r1.GetId() {
			t.Fatalf("%s: batch: %v, %v", q, rb, err)
		}
		if r := fullStats(t, e.a.client, q); r.GetReady() != 2 {
			t.Fatalf("%s: ready %d, want 2", q, r.GetReady())
		}
	}
}

func behavePriority(t *testing.T, e *topoEnv) {
	qs := e.tp.spread(t, "prio", 3) // highest priority first
	ids := map[string]string{}
	for i := len(qs) - 1; i >= 0; i-- { // lowest first, to be sure order is priority's
		ids[qs[i]] = enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: qs[i], Payload: []byte(qs[i])})
	}
	s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queues: qs, MaxInFlight: 1, LeaseDuration: lease(10 * time.Second)})
	for _, q := range qs {
		d := s.next(t, 5*time.Second)
		if d.GetQueue() != q || d.GetId() != ids[q] {
			t.Fatalf("got %s from %s, want %s from %s", d.GetId(), d.GetQueue(), ids[q], q)
		}
		if err := ack(t, e.a.client, d); err != nil {
			t.Fatal(err)
		}
	}
	// Waiting on all three: a push to any of them is delivered.
	for i := len(qs) - 1; i >= 0; i-- {
		id := enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: qs[i], Payload: []byte("again")})
		d := s.next(t, 5*time.Second)
		if d.GetId() != id || d.GetQueue() != qs[i] {
			t.Fatalf("got %s from %s, want %s from %s", d.GetId(), d.GetQueue(), id, qs[i])
		}
		if err := ack(t, e.a.client, d); err != nil {
			t.Fatal(err)
		}
	}
}

func behaveStreamEnd(t *testing.T, e *topoEnv) {
	for _, q := range e.tp.spread(t, "ended", 3) {
		id := enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("e")})
		s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(time.Minute)})
		if d := s.next(t, 5*time.Second); d.GetId() != id {
			t.Fatalf("%s: got %v", q, d)
		}
		s.cancel()
		// Back at once, not after the minute's lease.
		eventually(t, 5*time.Second, q+" requeued", func() bool {
			r := fullStats(t, e.a.client, q)
			return r.GetReady() == 1 && r.GetInFlight() == 0
		})
		s2 := consume(t, e.a.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(10 * time.Second)})
		d := s2.next(t, 5*time.Second)
		if d.GetId() != id || d.GetAttempt() != 2 {
			t.Fatalf("%s: after the stream ended: %v", q, d)
		}
		if err := ack(t, e.a.client, d); err != nil {
			t.Fatal(err)
		}
	}
}

func behaveSharing(t *testing.T, e *topoEnv) {
	const window, n = 5, 10
	for _, q := range e.tp.spread(t, "shared", 3) {
		sa := consume(t, e.a.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: window, LeaseDuration: lease(10 * time.Second)})
		sb := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: window, LeaseDuration: lease(10 * time.Second)})
		ids := enqueueN(t, e.a.client, q, n)
		got := map[string]bool{}
		var held []*qbridgev1.Delivery
		for _, s := range []*stream{sa, sb} {
			// Each holds its whole window unacked: the other gets the rest.
			for i := 0; i < window; i++ {
				d := s.next(t, 5*time.Second)
				if got[d.GetId()] {
					t.Fatalf("%s: %s delivered twice", q, d.GetId())
				}
				got[d.GetId()] = true
				held = append(held, d)
			}
		}
		for _, id := range ids {
			if !got[id] {
				t.Fatalf("%s: %s not delivered", q, id)
			}
		}
		if err := ack(t, e.b.client, held...); err != nil {
			t.Fatal(err)
		}
		waitSettled(t, e.a.client, q)
	}
}

// behaveParked: with no blocking waits at all, every empty queue parks
// and is woken by the "ready" announcement its script publishes, from
// whichever node the queue is on.
func behaveParked(t *testing.T, e *topoEnv) {
	in := startOn(t, e.tp, nil, server.WithIdleQueues(0, time.Minute))
	qs := e.tp.spread(t, "parked", 3)
	var streams []*stream
	for _, q := range qs {
		streams = append(streams, consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(10 * time.Second)}))
	}
	for i, q := range qs {
		id := enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("wake")})
		// Well within the minute of the poll.
		d := streams[i].next(t, 10*time.Second)
		if d.GetId() != id {
			t.Fatalf("%s: got %v", q, d)
		}
		if err := ack(t, in.client, d); err != nil {
			t.Fatal(err)
		}
	}
}

func behavePubSub(t *testing.T, e *topoEnv) {
	chans := e.tp.spread(t, "news", 3) // channel names that would hash to different nodes
	sub := subscribe(t, e.a.client, &qbridgev1.SubscribeRequest{Channels: chans, Patterns: []string{"alerts.*"}})
	ctx := ctxT(t, 10*time.Second)
	for _, ch := range chans {
		// Publish through the other instance, whose connection may be to
		// another node: classic pub/sub reaches the whole cluster.
		if _, err := e.b.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: ch, Payload: []byte("on " + ch)}); err != nil {
			t.Fatal(err)
		}
		m := sub.next(t)
		if m.GetChannel() != ch || string(m.GetPayload()) != "on "+ch || m.GetPattern() != "" {
			t.Fatalf("got %v, want the message on %s", m, ch)
		}
	}
	if _, err := e.b.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "alerts.eu", Payload: []byte("fire")}); err != nil {
		t.Fatal(err)
	}
	if m := sub.next(t); m.GetChannel() != "alerts.eu" || m.GetPattern() != "alerts.*" || string(m.GetPayload()) != "fire" {
		t.Fatalf("pattern message %v", m)
	}
	// A plain Redis publisher reaches qbridge subscribers too.
	if err := e.tp.admin.Publish(ctx, chans[0], "plain").Err(); err != nil {
		t.Fatal(err)
	}
	if m := sub.next(t); m.GetChannel() != chans[0] || string(m.GetPayload()) != "plain" {
		t.Fatalf("plain publish: %v", m)
	}
}

func behaveAdmin(t *testing.T, e *topoEnv) {
	qs := e.tp.spread(t, "adm", 3)
	ctx := ctxT(t, 20*time.Second)
	for _, q := range qs {
		enqueueN(t, e.a.client, q, 3)
	}
	listed := func() []string {
		var all []string
		tok := ""
		for {
			r, err := e.b.admin.ListQueues(ctx, &qbridgev1.ListQueuesRequest{PageSize: 1000, PageToken: tok})
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, r.GetQueues()...)
			if tok = r.GetNextPageToken(); tok == "" {
				return all
			}
		}
	}
	for _, q := range qs {
		if !slices.Contains(listed(), q) {
			t.Fatalf("ListQueues lacks %s", q)
		}
		p, err := e.b.admin.PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{Queue: q, State: qbridgev1.MessageState_MESSAGE_STATE_READY, PageSize: 10})
		if err != nil || len(p.GetMessages()) != 3 || string(p.GetMessages()[0].GetPayload()) != "m0" {
			t.Fatalf("%s: peek: %v, %v", q, p, err)
		}
	}
	if r, err := e.b.admin.PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: qs[0]}); err != nil || r.GetPurged() != 3 {
		t.Fatalf("purge: %v, %v", r, err)
	}
	if r := fullStats(t, e.a.client, qs[0]); r.GetReady() != 0 {
		t.Fatalf("ready %d after purge", r.GetReady())
	}
	if _, err := e.b.admin.DeleteQueue(ctx, &qbridgev1.DeleteQueueRequest{Queue: qs[1]}); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(listed(), qs[1]) {
		t.Fatalf("ListQueues still has the deleted %s", qs[1])
	}
	if n, err := e.tp.admin.Exists(ctx, qs[1]).Result(); err != nil || n != 0 {
		t.Fatalf("the deleted queue's list: %d, %v", n, err)
	}
	// Paused: nothing is delivered (checked by the stats), resumed: it is.
	if _, err := e.a.admin.PauseQueue(ctx, &qbridgev1.PauseQueueRequest{Queue: qs[2]}); err != nil {
		t.Fatal(err)
	}
	s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: qs[2], MaxInFlight: 3, LeaseDuration: lease(10 * time.Second)})
	if r := fullStats(t, e.a.client, qs[2]); !r.GetPaused() || r.GetReady() != 3 {
		t.Fatalf("paused %v ready %d", r.GetPaused(), r.GetReady())
	}
	s.none(t)
	if _, err := e.a.admin.ResumeQueue(ctx, &qbridgev1.ResumeQueueRequest{Queue: qs[2]}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := ack(t, e.a.client, s.next(t, 5*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
}

func behaveResults(t *testing.T, e *topoEnv) {
	for _, q := range e.tp.spread(t, "results", 3) {
		id := enqueueOne(t, e.a.client, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("job"), KeepResult: true, TaskType: "resize"})
		// A waiter on the other instance learns the result from the
		// announcement the ack's script publishes.
		type res struct {
			r   *qbridgev1.GetResultResponse
			err error
		}
		waited := make(chan res, 1)
		go func() {
			r, err := e.b.client.GetResult(context.Background(), &qbridgev1.GetResultRequest{Queue: q, Id: id, Wait: durationpb.New(10 * time.Second)})
			waited <- res{r, err}
		}()
		s := consume(t, e.a.client, &qbridgev1.ConsumeRequest{Queue: q, LeaseDuration: lease(10 * time.Second)})
		d := s.next(t, 5*time.Second)
		if _, err := e.a.client.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()},
			Results: map[string][]byte{d.GetAckToken(): []byte("done")}}); err != nil {
			t.Fatal(err)
		}
		var w res
		select {
		case w = <-waited:
		case <-time.After(15 * time.Second):
			t.Fatalf("%s: GetResult with wait did not return", q)
		}
		if w.err != nil || w.r.GetState() != qbridgev1.ResultState_RESULT_STATE_SUCCEEDED || string(w.r.GetResult()) != "done" || w.r.GetAttempts() != 1 {
			t.Fatalf("%s: waited result %v, %v", q, w.r, w.err)
		}
		m, err := e.a.client.GetMessage(ctxT(t, 5*time.Second), &qbridgev1.GetMessageRequest{Queue: q, Id: id})
		if err != nil || m.GetId() != id || m.GetTaskType() != "resize" {
			t.Fatalf("%s: GetMessage %v, %v", q, m, err)
		}
		if c := fullStats(t, e.a.client, q).GetTaskTypes()["resize"]; c.GetEnqueued() != 1 || c.GetAcked() != 1 {
			t.Fatalf("%s: task type counters %v", q, c)
		}
	}
}

// TestSentinelFailover kills the master under a light load of enqueues
// and consumes, and checks that the service works again within a bound
// after the replica is promoted. Replication is asynchronous: enqueues
// acknowledged just before the kill may be lost; they are counted and
// logged, not forbidden. With --enqueue-replicas 1 none may be lost; the
// old master is restarted (Sentinel makes it the new master's replica) so
// that enqueues can be acknowledged again.
func TestSentinelFailover(t *testing.T) {
	t.Parallel()
	for _, replicas := range []int{0, 1} {
		t.Run(fmt.Sprintf("enqueue-replicas=%d", replicas), func(t *testing.T) {
			t.Parallel()
			sentinelFailover(t, replicas)
		})
	}
}

func sentinelFailover(t *testing.T, replicas int) {
	s := redistest.StartSentinel(t)
	tp := sentinelTopology(t, s)
	var prodOpts []broker.Option
	if replicas > 0 {
		prodOpts = []broker.Option{broker.WithEnqueueReplicas(replicas, time.Second)}
	}
	prod := startOn(t, tp, prodOpts)
	cons := startOn(t, tp, nil)
	const q = "failover"
	const recoveryBound = 30 * time.Second

	var mu sync.Mutex
	acked := map[string]time.Time{} // enqueues that returned OK, and when
	received := map[string]int{}    // deliveries per id
	var lastErr error
	var enqErrs, consErrs int
	lastOK := time.Time{} // last successful enqueue

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // producer: one enqueue every 5 ms
		defer wg.Done()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			r, err := prod.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(fmt.Sprint(i))})
			cancel()
			mu.Lock()
			if err != nil {
				enqErrs++
				lastErr = err
			} else {
				acked[r.GetId()] = time.Now()
				lastOK = time.Now()
			}
			mu.Unlock()
		}
	}()
	go func() { // consumer: acks everything, reopens its stream when it breaks
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithCancel(context.Background())
			// A Recv on an empty queue waits for ever: stop ends it.
			go func() {
				select {
				case <-stop:
					cancel()
				case <-ctx.Done():
				}
			}()
			st, err := cons.client.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 16, LeaseDuration: lease(2 * time.Second)})
			for err == nil {
				var resp *qbridgev1.ConsumeResponse
				if resp, err = st.Recv(); err != nil {
					break
				}
				toks := make([]string, 0, len(resp.GetDeliveries()))
				mu.Lock()
				for _, d := range resp.GetDeliveries() {
					received[d.GetId()]++
					toks = append(toks, d.GetAckToken())
				}
				mu.Unlock()
				actx, acancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, aerr := cons.client.Ack(actx, &qbridgev1.AckRequest{AckTokens: toks})
				acancel()
				if aerr != nil {
					mu.Lock()
					consErrs++
					mu.Unlock()
					// Unacked: their leases run out and they come back.
				}
				select {
				case <-stop:
					err = context.Canceled
				default:
				}
			}
			cancel()
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond): // retry backoff, not synchronisation
			}
		}
	}()
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	})

	count := func() (a, r int) {
		mu.Lock()
		defer mu.Unlock()
		return len(acked), len(received)
	}
	eventually(t, 10*time.Second, "a steady flow before the kill", func() bool {
		a, r := count()
		return a >= 100 && r >= 50
	})

	killedAt := time.Now()
	old := s.KillMaster(t)
	promoted := s.WaitPromotion(t, old)
	promotedAt := time.Now()
	if replicas > 0 {
		// The new master has no replica: bring the old one back, as a
		// replica, or no enqueue can be acknowledged.
		for _, d := range s.Data() {
			if d.Addr() == old {
				d.Restart(t)
			}
		}
	}

	// Recovered: enqueues succeed again and a message enqueued after the
	// promotion is consumed.
	var recoveredAt time.Time
	eventually(t, recoveryBound, "enqueues and consumes after the failover", func() bool {
		mu.Lock()
		defer mu.Unlock()
		if !lastOK.After(promotedAt) {
			return false
		}
		for id, at := range acked {
			if at.After(promotedAt) && received[id] > 0 {
				recoveredAt = time.Now()
				return true
			}
		}
		return false
	})
	if d := recoveredAt.Sub(killedAt); d > recoveryBound {
		t.Fatalf("recovered %v after the kill, want within %v", d, recoveryBound)
	}
	// Some more load on the new master, then stop and drain.
	base, _ := count()
	eventually(t, 10*time.Second, "load on the new master", func() bool {
		a, _ := count()
		return a >= base+100
	})
	close(stop)
	wg.Wait()
	drain := consume(t, cons.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 100, LeaseDuration: lease(10 * time.Second)})
	eventually(t, 15*time.Second, "the queue drained", func() bool {
		for {
			select {
			case d := <-drain.ch:
				mu.Lock()
				received[d.GetId()]++
				mu.Unlock()
				if err := ack(t, cons.client, d); err != nil {
					return false
				}
				continue
			default:
			}
			break
		}
		r := fullStats(t, cons.client, q)
		return r.GetReady() == 0 && r.GetInFlight() == 0 && r.GetDelayed() == 0 && len(drain.ch) == 0
	})

	mu.Lock()
	defer mu.Unlock()
	var lost []string
	dup := 0
	for id := range acked {
		if received[id] == 0 {
			lost = append(lost, id)
		}
	}
	for _, n := range received {
		if n > 1 {
			dup++
		}
	}
	sort.Strings(lost)
	t.Logf("failover %s -> %s: promoted %v after the kill, service back %v after the kill; "+
		"%d enqueues acknowledged, %d of them lost (acked before the kill, not replicated); "+
		"%d delivered more than once; %d enqueue errors during the outage (last: %v), %d failed acks",
		old, promoted, promotedAt.Sub(killedAt).Round(time.Millisecond), recoveredAt.Sub(killedAt).Round(time.Millisecond),
		len(acked), len(lost), dup, enqErrs, lastErr, consErrs)
	for _, id := range lost {
		if at := acked[id]; at.After(promotedAt) || replicas > 0 {
			t.Errorf("%s was acknowledged (at %v; promotion at %v; --enqueue-replicas %d) and lost", id, at.Format(time.StampMilli), promotedAt.Format(time.StampMilli), replicas)
		}
	}
}

// behaveConcurrent makes concurrent enqueues and acks to queues on
// different nodes, which the coalescers merge into pipelines that span
// nodes, first with the script cache of every node flushed (the NOSCRIPT
// path of those pipelines).
func behaveConcurrent(t *testing.T, e *topoEnv) {
	qs := e.tp.spread(t, "busy", 3)
	ctx := ctxT(t, 30*time.Second)
	if err := e.tp.admin.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	const perQueue = 40
	var mu sync.Mutex
	ids := map[string]string{} // id -> queue
	var wg sync.WaitGroup
	errs := make(chan error, perQueue*len(qs))
	for i := 0; i < perQueue*len(qs); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in, q := e.a, qs[i%len(qs)]
			if i%2 == 1 {
				in = e.b
			}
			r, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte(fmt.Sprint(i))})
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			ids[r.GetId()] = q
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent enqueue: %v", err)
	}
	seen := map[string]bool{}
	for _, q := range qs {
		s := consume(t, e.b.client, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: perQueue, LeaseDuration: lease(10 * time.Second)})
		var ds []*qbridgev1.Delivery
		for len(ds) < perQueue {
			d := s.next(t, 5*time.Second)
			if ids[d.GetId()] != q || seen[d.GetId()] {
				t.Fatalf("%s: unexpected delivery %s (of %q, seen %v)", q, d.GetId(), ids[d.GetId()], seen[d.GetId()])
			}
			seen[d.GetId()] = true
			ds = append(ds, d)
		}
		// One ack call each, at once: merged into shared pipelines.
		ackErrs := make(chan error, len(ds))
		for i, d := range ds {
			in := e.a
			if i%2 == 1 {
				in = e.b
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := in.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}})
				if err == nil && r.GetAcked() != 1 {
					err = fmt.Errorf("acked %d", r.GetAcked())
				}
				if err != nil {
					ackErrs <- err
				}
			}()
		}
		wg.Wait()
		close(ackErrs)
		for err := range ackErrs {
			t.Fatalf("%s: concurrent ack: %v", q, err)
		}
	}
	for _, q := range qs {
		waitSettled(t, e.a.client, q)
	}
}
