package metrics

// The tests run a qbridge server in process, against a real redis-server
// (as the least-privilege user qbridge runs as), with these metrics wired
// in the way qbridged wires them, drive it over real gRPC and read the
// metrics over HTTP.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// wait is the deadline of every poll and RPC of these tests.
const wait = 10 * time.Second

// harness is one in-process qbridge server with its metrics.
type harness struct {
	m     *Metrics
	srv   *server.Server
	qc    qbridgev1.QueueServiceClient
	admin qbridgev1.AdminServiceClient
	url   string // of the metrics endpoint
	addr  string // of the gRPC server
}

func start(t *testing.T, rs *redistest.Server, opts ...Option) *harness {
	t.Helper()
	return startWith(t, rs, nil, opts...)
}

// startWith is start with further server options.
func startWith(t *testing.T, rs *redistest.Server, serverOpts []server.Option, opts ...Option) *harness {
	t.Helper()
	ro := rs.ServiceOptions(0)
	ro.MaxRetries, ro.DialTimeout = -1, time.Second
	svc := redis.NewClient(ro)

	var srv *server.Server // set below: the metrics and the server need each other
	m := New(func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error) {
		return srv.Snapshot(ctx, max)
	}, opts...)
	srv = server.New(broker.New(svc), append([]server.Option{
		server.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		server.WithObserver(m.Observer()),
		server.WithReapInterval(100 * time.Millisecond),
		server.WithWaitSlice(time.Second)}, serverOpts...)...)
	srv.Start()
	m.AddRedisPool("main", svc.PoolStats)

	gs := grpc.NewServer(m.GRPCServerOptions()...)
	qbridgev1.RegisterQueueServiceServer(gs, srv)
	qbridgev1.RegisterAdminServiceServer(gs, srv.Admin())
	m.InitializeGRPC(gs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(m.Handler()) // on 127.0.0.1
	addr := lis.Addr().String()
	t.Cleanup(func() {
		hs.Close()
		srv.StopStreams()
		gs.Stop()
		<-served
		srv.Close()
		_ = conn.Close()
		_ = svc.Close()
	})
	return &harness{m: m, srv: srv, qc: qbridgev1.NewQueueServiceClient(conn),
		admin: qbridgev1.NewAdminServiceClient(conn), url: hs.URL + "/metrics", addr: addr}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return ctx
}

// scrape is one parsed scrape of the metrics endpoint.
type scrape map[string]*dto.MetricFamily

func (h *harness) scrape(t *testing.T) scrape {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, h.url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: HTTP %d: %s", resp.StatusCode, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("scrape: parse: %v\n%s", err, body)
	}
	return fams
}

// series returns the metrics of family name whose labels include labels
// ("k=v" pairs).
func (s scrape) series(name string, labels ...string) []*dto.Metric {
	f := s[name]
	if f == nil {
		return nil
	}
	var out []*dto.Metric
	for _, m := range f.GetMetric() {
		if hasLabels(m, labels) {
			out = append(out, m)
		}
	}
	return out
}

func hasLabels(m *dto.Metric, labels []string) bool {
	have := map[string]string{}
	for _, l := range m.GetLabel() {
		have[l.GetName()] = l.GetValue()
	}
	for _, kv := range labels {
		k, v, _ := strings.Cut(kv, "=")
		if got, ok := have[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// value returns the value of the one series of name with labels: a
// counter's or gauge's value, a histogram's sample count; ok is false if
// there is no such series.
func (s scrape) value(t *testing.T, name string, labels ...string) (v float64, ok bool) {
	t.Helper()
	ms := s.series(name, labels...)
	switch len(ms) {
	case 0:
		return 0, false
	case 1:
	default:
		t.Fatalf("%d series of %s{%s}; want one", len(ms), name, strings.Join(labels, ","))
	}
	m := ms[0]
	switch {
	case m.Counter != nil:
		return m.GetCounter().GetValue(), true
	case m.Gauge != nil:
		return m.GetGauge().GetValue(), true
	case m.Histogram != nil:
		return float64(m.GetHistogram().GetSampleCount()), true
	case m.Untyped != nil:
		return m.GetUntyped().GetValue(), true
	}
	t.Fatalf("%s{%s} has no value of a known type", name, strings.Join(labels, ","))
	return 0, false
}

// want describes the expected value of one series.
type want struct {
	name   string
	labels []string
	v      float64
}

func (w want) String() string { return fmt.Sprintf("%s{%s}", w.name, strings.Join(w.labels, ",")) }

// mismatches returns what in s differs from wants.
func (s scrape) mismatches(t *testing.T, wants []want) []string {
	t.Helper()
	var bad []string
	for _, w := range wants {
		v, ok := s.value(t, w.name, w.labels...)
		switch {
		case !ok:
			bad = append(bad, fmt.Sprintf("%v missing; want %v", w, w.v))
		case v != w.v:
			bad = append(bad, fmt.Sprintf("%v = %v; want %v", w, v, w.v))
		}
	}
	return bad
}

// scrapeUntil scrapes until every want holds, or fails the test at the
// deadline; it returns the scrape where they held.
func (h *harness) scrapeUntil(t *testing.T, wants []want) scrape {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		s := h.scrape(t)
		bad := s.mismatches(t, wants)
		if len(bad) == 0 {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v the metrics still differ:\n  %s", wait, strings.Join(bad, "\n  "))
		}
		time.Sleep(20 * time.Millisecond) // poll interval
	}
}

// labelValues returns the values of label in the series of name, sorted.
func (s scrape) labelValues(name, label string) []string {
	var out []string
	for _, m := range s.series(name) {
		for _, l := range m.GetLabel() {
			if l.GetName() == label {
				out = append(out, l.GetValue())
			}
		}
	}
	sort.Strings(out)
	return out
}

// deliveries is a Consume stream with a reader goroutine.
type deliveries struct {
	ch   chan *qbridgev1.Delivery
	errc chan error
}

func (h *harness) consume(t *testing.T, ctx context.Context, req *qbridgev1.ConsumeRequest) *deliveries {
	t.Helper()
	st, err := h.qc.Consume(ctx, req)
	if err != nil {
		t.Fatalf("consume: %v", err)
	}
	d := &deliveries{ch: make(chan *qbridgev1.Delivery, 1000), errc: make(chan error, 1)}
	go func() {
		for {
			resp, err := st.Recv()
			if err != nil {
				d.errc <- err
				return
			}
			for _, x := range resp.GetDeliveries() {
				d.ch <- x
			}
		}
	}()
	return d
}

func (d *deliveries) next(t *testing.T) *qbridgev1.Delivery {
	t.Helper()
	select {
	case x := <-d.ch:
		return x
	case err := <-d.errc:
		t.Fatalf("consume stream ended: %v", err)
	case <-time.After(wait):
		t.Fatalf("no delivery within %v", wait)
	}
	return nil
}

func (h *harness) enqueue(t *testing.T, req *qbridgev1.EnqueueRequest) string {
	t.Helper()
	resp, err := h.qc.Enqueue(ctxT(t), req)
	if err != nil {
		t.Fatalf("enqueue to %s: %v", req.GetQueue(), err)
	}
	return resp.GetId()
}

// queueWants are the expected per-queue series of queue q.
func queueWants(q string, ready, inFlight, delayed, dead, paused float64, counters map[string]float64) []want {
	l := []string{"queue=" + q}
	ws := []want{
		{"qbridge_queue_ready", l, ready},
		{"qbridge_queue_in_flight", l, inFlight},
		{"qbridge_queue_delayed", l, delayed},
		{"qbridge_queue_dead", l, dead},
		{"qbridge_queue_paused", l, paused},
	}
	for _, e := range []string{"enqueued", "acked", "nacked", "lease_expired", "dead_lettered", "expired"} {
		ws = append(ws, want{"qbridge_queue_messages_total", []string{"queue=" + q, "event=" + e}, counters[e]})
	}
	return ws
}

func grpcHandled(method, code string, v float64) want {
	return want{"grpc_server_handled_total", []string{"grpc_service=qbridge.v1.QueueService", "grpc_method=" + method, "grpc_code=" + code}, v}
}

// workload runs a scripted workload on h and returns what the metrics
// must then say.
//
//   - queue a: 5 messages and a delayed one enqueued; the 5 consumed: 3
//     acked, 1 nacked to the dead letters, 1 nacked back and delivered
//     again, and left in flight;
//   - queue b: 1 message enqueued, the queue paused;
//   - channel news, with one subscriber, and void, with none: one publish
//     each.
func (h *harness) workload(t *testing.T) []want {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	sub, err := h.qc.Subscribe(ctx, &qbridgev1.SubscribeRequest{Channels: []string{"news"}})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := sub.Recv(); err != nil || r.GetSubscribed() == nil {
		t.Fatalf("subscribe: first response %v, %v; want the confirmation", r, err)
	}

	for i := range 5 {
		h.enqueue(t, &qbridgev1.EnqueueRequest{Queue: "a", Payload: fmt.Appendf(nil, "m%d", i)})
	}
	delayedID := h.enqueue(t, &qbridgev1.EnqueueRequest{Queue: "a", Payload: []byte("later"), Delay: durationpb.New(time.Hour)})
	h.enqueue(t, &qbridgev1.EnqueueRequest{Queue: "b", Payload: []byte("held")})
	if _, err := h.admin.PauseQueue(ctxT(t), &qbridgev1.PauseQueueRequest{Queue: "b"}); err != nil {
		t.Fatal(err)
	}

	c := h.consume(t, ctx, &qbridgev1.ConsumeRequest{Queue: "a", MaxInFlight: 5, LeaseDuration: durationpb.New(time.Minute)})
	var ds []*qbridgev1.Delivery
	for range 5 {
		d := c.next(t)
		if d.GetId() == delayedID {
			t.Fatal("the delayed message was delivered at once")
		}
		if d.GetAttempt() != 1 {
			t.Fatalf("first delivery of %s has attempt %d", d.GetId(), d.GetAttempt())
		}
		ds = append(ds, d)
	}
	tokens := func(ds ...*qbridgev1.Delivery) []string {
		var out []string
		for _, d := range ds {
			out = append(out, d.GetAckToken())
		}
		return out
	}
	if _, err := h.qc.Ack(ctxT(t), &qbridgev1.AckRequest{AckTokens: tokens(ds[:3]...)}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.qc.Nack(ctxT(t), &qbridgev1.NackRequest{AckTokens: tokens(ds[3]),
		Action: qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER, Error: "poison"}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.qc.Nack(ctxT(t), &qbridgev1.NackRequest{AckTokens: tokens(ds[4]),
		Action: qbridgev1.NackAction_NACK_ACTION_REQUEUE}); err != nil {
		t.Fatal(err)
	}
	again := c.next(t)
	if again.GetId() != ds[4].GetId() || again.GetAttempt() != 2 {
		t.Fatalf("redelivery: %s attempt %d; want %s attempt 2", again.GetId(), again.GetAttempt(), ds[4].GetId())
	}

	for ch, receivers := range map[string]int64{"news": 1, "void": 0} {
		r, err := h.qc.Publish(ctxT(t), &qbridgev1.PublishRequest{Channel: ch, Payload: []byte("hi")})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetReceivers() != receivers {
			t.Fatalf("publish to %s: %d receivers; want %d", ch, r.GetReceivers(), receivers)
		}
	}
	if r, err := sub.Recv(); err != nil || r.GetMessage().GetChannel() != "news" {
		t.Fatalf("subscriber: %v, %v; want the message on news", r, err)
	}

	ws := queueWants("a", 0, 1, 1, 1, 0, map[string]float64{"enqueued": 6, "acked": 3, "nacked": 2, "dead_lettered": 1})
	ws = append(ws, queueWants("b", 1, 0, 0, 0, 1, map[string]float64{"enqueued": 1})...)
	return append(ws,
		want{"qbridge_queues_truncated", nil, 0},
		want{"qbridge_redis_up", nil, 1},
		want{"qbridge_scrape_errors_total", nil, 0},

		want{"qbridge_delivered_total", []string{"queue=a"}, 6},
		want{"qbridge_redelivered_total", []string{"queue=a"}, 1},
		want{"qbridge_delivery_latency_seconds", []string{"queue=a"}, 6},
		want{"qbridge_pubsub_published_total", nil, 2},
		want{"qbridge_pubsub_receivers_total", nil, 1},
		want{"qbridge_pubsub_delivered_total", nil, 1},
		want{"qbridge_pubsub_dropped_total", nil, 0},
		want{"qbridge_pubsub_subscribers_cut_off_total", nil, 0},

		grpcHandled("Enqueue", "OK", 7),
		grpcHandled("Ack", "OK", 1),
		grpcHandled("Nack", "OK", 2),
		grpcHandled("Publish", "OK", 2),
		grpcHandled("GetMessage", "OK", 0), // never called: there by InitializeGRPC
		want{"grpc_server_started_total", []string{"grpc_method=Enqueue"}, 7},
		want{"grpc_server_handling_seconds", []string{"grpc_method=Enqueue"}, 7},
		want{"grpc_server_handled_total", []string{"grpc_service=qbridge.v1.AdminService", "grpc_method=PauseQueue", "grpc_code=OK"}, 1},
	)
}

func TestWorkload(t *testing.T) {
	rs := redistest.Start(t)
	h := start(t, rs)
	s := h.scrapeUntil(t, h.workload(t))

	// Only the queues there are.
	if got := s.labelValues("qbridge_queue_ready", "queue"); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("qbridge_queue_ready for queues %v; want [a b]", got)
	}
	if got := s.labelValues("qbridge_delivered_total", "queue"); !slices.Equal(got, []string{"a"}) {
		t.Errorf("qbridge_delivered_total for queues %v; want [a]", got)
	}
	// Ages: 0 for the empty queue a, that of b's message for b.
	if v, _ := s.value(t, "qbridge_queue_oldest_ready_age_seconds", "queue=a"); v != 0 {
		t.Errorf("oldest ready age of the empty queue a: %v; want 0", v)
	}
	if v, ok := s.value(t, "qbridge_queue_oldest_ready_age_seconds", "queue=b"); !ok || v <= 0 || v > wait.Seconds()*10 {
		t.Errorf("oldest ready age of b: %v (present: %v); want a few seconds at most, above 0", v, ok)
	}
	// The latency histogram: its buckets span 1ms to 1h, its sum is that of
	// the deliveries' ages (each under the test's duration).
	h0 := s.series("qbridge_delivery_latency_seconds", "queue=a")[0].GetHistogram()
	bs := h0.GetBucket()
	if n := len(bs); n > 0 && math.IsInf(bs[n-1].GetUpperBound(), 1) {
		bs = bs[:n-1]
	}
	if len(bs) == 0 || bs[0].GetUpperBound() != 0.001 || bs[len(bs)-1].GetUpperBound() != 3600 {
		t.Errorf("latency buckets %v; want 0.001 ... 3600", bs)
	}
	if h0.GetSampleSum() <= 0 || h0.GetSampleSum() > 6*60 {
		t.Errorf("latency sum %v; want the ages of 6 deliveries", h0.GetSampleSum())
	}
	// The Redis pool.
	total, ok1 := s.value(t, "qbridge_redis_pool_connections", "pool=main", "state=total")
	idle, ok2 := s.value(t, "qbridge_redis_pool_connections", "pool=main", "state=idle")
	if !ok1 || !ok2 || total < 1 || idle > total {
		t.Errorf("pool connections: total %v (%v), idle %v (%v); want total >= 1 >= ... idle <= total", total, ok1, idle, ok2)
	}
	hits, _ := s.value(t, "qbridge_redis_pool_hits_total", "pool=main")
	misses, _ := s.value(t, "qbridge_redis_pool_misses_total", "pool=main")
	if hits+misses < 1 {
		t.Errorf("pool hits %v + misses %v; want the workload's connection uses", hits, misses)
	}
	if _, ok := s.value(t, "qbridge_redis_pool_timeouts_total", "pool=main"); !ok {
		t.Error("qbridge_redis_pool_timeouts_total{pool=main} missing")
	}
	// The default registry has the Go and process collectors.
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if s[name] == nil {
			t.Errorf("%s missing from the default registry", name)
		}
	}
	// Types are part of the contract.
	for name, typ := range map[string]dto.MetricType{
		"qbridge_queue_ready":              dto.MetricType_GAUGE,
		"qbridge_queue_messages_total":     dto.MetricType_COUNTER,
		"qbridge_delivery_latency_seconds": dto.MetricType_HISTOGRAM,
		"qbridge_pubsub_dropped_total":     dto.MetricType_COUNTER,
		"qbridge_redis_pool_connections":   dto.MetricType_GAUGE,
		"qbridge_redis_pool_hits_total":    dto.MetricType_COUNTER,
		"qbridge_scrape_errors_total":      dto.MetricType_COUNTER,
		"grpc_server_handling_seconds":     dto.MetricType_HISTOGRAM,
	} {
		if got := s[name].GetType(); got != typ {
			t.Errorf("%s has type %v; want %v", name, got, typ)
		}
	}
	checkDoc(t, s)
	// Every name of this package follows the Prometheus conventions.
	for _, c := range []prometheus.Collector{h.m.queues, h.m.observer, h.m.pools} {
		problems, err := testutil.CollectAndLint(c)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("lint: %s: %s", p.Metric, p.Text)
		}
	}
}

// checkDoc checks that the package doc lists every qbridge_ and grpc_
// metric of s, with its type and labels, and no other.
func checkDoc(t *testing.T, s scrape) {
	t.Helper()
	src, err := os.ReadFile("metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	line := regexp.MustCompile(`(?m)^//\t((?:qbridge|grpc)_\w+) +(\w+) +\{([^}]*)\}`)
	documented := map[string]string{}
	for _, m := range line.FindAllStringSubmatch(string(src), -1) {
		documented[m[1]] = m[2] + " {" + m[3] + "}"
	}
	for name, f := range s {
		if !strings.HasPrefix(name, "qbridge_") && !strings.HasPrefix(name, "grpc_") {
			continue
		}
		var labels []string
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if !slices.Contains(labels, l.GetName()) {
					labels = append(labels, l.GetName())
				}
			}
		}
		want := strings.ToLower(f.GetType().String()) + " {" + strings.Join(labels, ",") + "}"
		got, ok := documented[name]
		delete(documented, name)
		if !ok {
			t.Errorf("the package doc does not list %s (%s)", name, want)
			continue
		}
		// Compare the label sets, whatever their order.
		gotType, gotLabels, _ := strings.Cut(got, " ")
		wantType, wantLabels, _ := strings.Cut(want, " ")
		gl := strings.Split(strings.Trim(gotLabels, "{}"), ",")
		wl := strings.Split(strings.Trim(wantLabels, "{}"), ",")
		slices.Sort(gl)
		slices.Sort(wl)
		if gotType != wantType || !slices.Equal(gl, wl) {
			t.Errorf("the package doc lists %s as %s; it is %s", name, got, want)
		}
	}
	for name := range documented {
		t.Errorf("the package doc lists %s, which is not exported", name)
	}
}

// With WithMaxQueues(2) and 3 queues, the scrape exports 2 and says it
// left some out, and the Observer counts the third queue it delivers from
// under queue="_other".
func TestMaxQueues(t *testing.T) {
	rs := redistest.Start(t)
	h := start(t, rs, WithMaxQueues(2))
	// Delivered from in the order q3, q1, q2: the Observer admits the first
	// two it sees; the scrape exports the first two by name.
	for _, q := range []string{"q3", "q1", "q2"} {
		h.enqueue(t, &qbridgev1.EnqueueRequest{Queue: q, Payload: []byte("x")})
		ctx, cancel := context.WithCancel(context.Background())
		d := h.consume(t, ctx, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: 1})
		got := d.next(t)
		if _, err := h.qc.Ack(ctxT(t), &qbridgev1.AckRequest{AckTokens: []string{got.GetAckToken()}}); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	ws := append(queueWants("q1", 0, 0, 0, 0, 0, map[string]float64{"enqueued": 1, "acked": 1}),
		queueWants("q2", 0, 0, 0, 0, 0, map[string]float64{"enqueued": 1, "acked": 1})...)
	ws = append(ws,
		want{"qbridge_queues_truncated", nil, 1},
		want{"qbridge_redis_up", nil, 1},
		want{"qbridge_delivered_total", []string{"queue=q3"}, 1},
		want{"qbridge_delivered_total", []string{"queue=q1"}, 1},
		want{"qbridge_delivered_total", []string{"queue=_other"}, 1},
		want{"qbridge_delivery_latency_seconds", []string{"queue=_other"}, 1},
		want{"qbridge_redelivered_total", []string{"queue=_other"}, 0},
	)
	s := h.scrapeUntil(t, ws)
	for _, name := range []string{"qbridge_queue_ready", "qbridge_queue_in_flight", "qbridge_queue_delayed",
		"qbridge_queue_dead", "qbridge_queue_oldest_ready_age_seconds", "qbridge_queue_paused"} {
		if got := s.labelValues(name, "queue"); !slices.Equal(got, []string{"q1", "q2"}) {
			t.Errorf("%s for queues %v; want [q1 q2]", name, got)
		}
	}
	if got := s.labelValues("qbridge_queue_messages_total", "queue"); len(got) != 12 || slices.Contains(got, "q3") {
		t.Errorf("qbridge_queue_messages_total for queues %v; want 6 events of q1 and q2", got)
	}
	for _, name := range []string{"qbridge_delivered_total", "qbridge_redelivered_total", "qbridge_delivery_latency_seconds"} {
		if got := s.labelValues(name, "queue"); !slices.Equal(got, []string{"_other", "q1", "q3"}) {
			t.Errorf("%s for queues %v; want [_other q1 q3]", name, got)
		}
	}
}

// A subscriber that reads nothing is cut off, and the messages it had
// waiting are counted as dropped.
func TestSubscriberCutOff(t *testing.T) {
	rs := redistest.Start(t)
	const buffer = 16
	h := startWith(t, rs, []server.Option{server.WithSubscriberBuffer(buffer, 1<<20)})
	// A client with small gRPC windows, that reads nothing once subscribed.
	cc, err := grpc.NewClient(h.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	st, err := qbridgev1.NewQueueServiceClient(cc).Subscribe(ctxT(t), &qbridgev1.SubscribeRequest{Channels: []string{"stalled"}})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.GetSubscribed() == nil {
		t.Fatalf("subscribe: first response %v, %v; want the confirmation", r, err)
	}
	// Far more than the gRPC windows and the buffer hold, published by a
	// plain Redis client.
	rdb := rs.Client(t, 0)
	payload := strings.Repeat("x", 1024)
	for range 400 {
		if err := rdb.Publish(ctxT(t), "stalled", payload).Err(); err != nil {
			t.Fatal(err)
		}
	}
	s := h.scrapeUntil(t, []want{{"qbridge_pubsub_subscribers_cut_off_total", nil, 1}})
	// The buffer was full when it overflowed (its reader may have taken one
	// more meanwhile), and the message that did not fit is dropped too.
	if v, _ := s.value(t, "qbridge_pubsub_dropped_total"); v < buffer || v > buffer+1 {
		t.Errorf("qbridge_pubsub_dropped_total %v; want the %d buffered messages and the one that overflowed", v, buffer)
	}
	if v, _ := s.value(t, "qbridge_pubsub_delivered_total"); v < buffer || v >= 400 {
		t.Errorf("qbridge_pubsub_delivered_total %v; want those queued before the cut-off", v)
	}
	if bad := s.mismatches(t, []want{{"qbridge_pubsub_published_total", nil, 0}}); len(bad) > 0 {
		t.Error(bad)
	}
}

// A scrape while Redis is down succeeds, without the queue series, and
// says so.
func TestRedisDown(t *testing.T) {
	rs := redistest.Start(t)
	const timeout = 2 * time.Second
	h := start(t, rs, WithScrapeTimeout(timeout))
	h.enqueue(t, &qbridgev1.EnqueueRequest{Queue: "a", Payload: []byte("x")})
	h.scrapeUntil(t, append(queueWants("a", 1, 0, 0, 0, 0, map[string]float64{"enqueued": 1}),
		want{"qbridge_redis_up", nil, 1},
		want{"qbridge_scrape_errors_total", nil, 0}))

	rs.Stop(t)
	for i := 1; i <= 2; i++ {
		began := time.Now()
		s := h.scrape(t)
		if took := time.Since(began); took > timeout+2*time.Second {
			t.Errorf("scrape %d with Redis down took %v; the scrape timeout is %v", i, took, timeout)
		}
		if bad := s.mismatches(t, []want{
			{"qbridge_redis_up", nil, 0},
			{"qbridge_scrape_errors_total", nil, float64(i)},
			{"qbridge_pubsub_published_total", nil, 0}, // the other series are still there
			grpcHandled("Enqueue", "OK", 1),
		}); len(bad) > 0 {
			t.Errorf("scrape %d with Redis down:\n  %s", i, strings.Join(bad, "\n  "))
		}
		for name := range s {
			if strings.HasPrefix(name, "qbridge_queue") {
				t.Errorf("scrape %d with Redis down exports %s", i, name)
			}
		}
		if _, ok := s.value(t, "qbridge_redis_pool_connections", "pool=main", "state=total"); !ok {
			t.Errorf("scrape %d with Redis down lacks the pool's series", i)
		}
	}
}

// A snapshot slower than the scrape timeout is abandoned at the timeout.
func TestScrapeTimeout(t *testing.T) {
	var calls []int
	var mu sync.Mutex
	m := New(func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error) {
		mu.Lock()
		calls = append(calls, max)
		mu.Unlock()
		<-ctx.Done()
		return nil, false, ctx.Err()
	}, WithScrapeTimeout(50*time.Millisecond), WithMaxQueues(7))
	hs := httptest.NewServer(m.Handler())
	defer hs.Close()
	h := &harness{m: m, url: hs.URL}
	s := h.scrape(t)
	if bad := s.mismatches(t, []want{{"qbridge_redis_up", nil, 0}, {"qbridge_scrape_errors_total", nil, 1}}); len(bad) > 0 {
		t.Error(strings.Join(bad, "; "))
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(calls, []int{7}) {
		t.Errorf("snapshot called with max %v; want [7]", calls)
	}
}

// The snapshot's answer is exported as is, including the truncation.
func TestSnapshotExported(t *testing.T) {
	m := New(func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error) {
		if _, ok := ctx.Deadline(); !ok {
			return nil, false, errors.New("no deadline")
		}
		return []*qbridgev1.GetQueueStatsResponse{{
			Queue: "x", Ready: 3, InFlight: 4, Delayed: 5, Dead: 6, Paused: true,
			OldestReadyAge: durationpb.New(1500 * time.Millisecond),
			Counters:       &qbridgev1.QueueCounters{Enqueued: 10, Acked: 11, Nacked: 12, LeaseExpired: 13, DeadLettered: 14, Expired: 15},
		}}, true, nil
	})
	hs := httptest.NewServer(m.Handler())
	defer hs.Close()
	s := (&harness{url: hs.URL}).scrape(t)
	ws := queueWants("x", 3, 4, 5, 6, 1, map[string]float64{"enqueued": 10, "acked": 11, "nacked": 12,
		"lease_expired": 13, "dead_lettered": 14, "expired": 15})
	ws = append(ws, want{"qbridge_queue_oldest_ready_age_seconds", []string{"queue=x"}, 1.5},
		want{"qbridge_queues_truncated", nil, 1}, want{"qbridge_redis_up", nil, 1})
	if bad := s.mismatches(t, ws); len(bad) > 0 {
		t.Error(strings.Join(bad, "\n"))
	}
}

// A snapshot that failed for some queues (a Redis Cluster node down) still
// exports the queues it read, with qbridge_redis_up 0 and the error counted.
func TestPartialSnapshotExported(t *testing.T) {
	m := New(func(ctx context.Context, max int) ([]*qbridgev1.GetQueueStatsResponse, bool, error) {
		return []*qbridgev1.GetQueueStatsResponse{{Queue: "alive", Ready: 2, Counters: &qbridgev1.QueueCounters{}}}, false,
			errors.New("the stats of 1 of 2 queues could not be read")
	})
	hs := httptest.NewServer(m.Handler())
	defer hs.Close()
	s := (&harness{url: hs.URL}).scrape(t)
	ws := queueWants("alive", 2, 0, 0, 0, 0, map[string]float64{"enqueued": 0, "acked": 0, "nacked": 0,
		"lease_expired": 0, "dead_lettered": 0, "expired": 0})
	ws = append(ws, want{"qbridge_redis_up", nil, 0}, want{"qbridge_scrape_errors_total", nil, 1})
	if bad := s.mismatches(t, ws); len(bad) > 0 {
		t.Error(strings.Join(bad, "\n"))
	}
}

// The Observer never gives the queue label more than the cap's values,
// under concurrent use, and counts every call.
func TestObserverCap(t *testing.T) {
	o := newObserver(3)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				o.Delivered(fmt.Sprintf("q%d", (g+i)%10), uint32(1+i%2), time.Duration(i-5)*time.Millisecond)
			}
		})
	}
	o.Delivered(otherQueue, 1, 0) // a queue so named is counted with the others
	wg.Wait()
	o.Published(-1)
	o.PubSubDelivered(0)
	o.PubSubDropped(0)
	o.PubSubDropped(4)

	if n := testutil.CollectAndCount(o.delivered); n != 4 {
		t.Errorf("%d delivered series; want 3 queues and _other", n)
	}
	var total float64
	ch := make(chan prometheus.Metric, 100)
	o.delivered.Collect(ch)
	close(ch)
	for m := range ch {
		var d dto.Metric
		if err := m.Write(&d); err != nil {
			t.Fatal(err)
		}
		total += d.GetCounter().GetValue()
	}
	if total != 8*500+1 {
		t.Errorf("delivered %v in all; want %d", total, 8*500+1)
	}
	if got := testutil.ToFloat64(o.redelivered.WithLabelValues(otherQueue)); got == 0 {
		t.Error("no redeliveries counted under _other")
	}
	if got := testutil.ToFloat64(o.dropped); got != 4 {
		t.Errorf("dropped %v; want 4", got)
	}
	if got := testutil.ToFloat64(o.cutOff); got != 2 {
		t.Errorf("cut off %v; want 2", got)
	}
	if got := testutil.ToFloat64(o.receivers); got != 0 {
		t.Errorf("receivers %v; want 0", got)
	}
}

func TestOptionsChecked(t *testing.T) {
	snap := func(context.Context, int) ([]*qbridgev1.GetQueueStatsResponse, bool, error) { return nil, false, nil }
	for name, opt := range map[string]Option{"WithMaxQueues(0)": WithMaxQueues(0), "WithScrapeTimeout(0)": WithScrapeTimeout(0)} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("New with %s did not panic", name)
				}
			}()
			New(snap, opt)
		}()
	}
	m := New(snap)
	m.AddRedisPool("main", func() *redis.PoolStats { return &redis.PoolStats{} })
	defer func() {
		if recover() == nil {
			t.Error("a second pool named main was accepted")
		}
	}()
	m.AddRedisPool("main", func() *redis.PoolStats { return &redis.PoolStats{} })
}
