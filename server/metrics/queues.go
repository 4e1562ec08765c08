package metrics

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// queueCollector reads the per-queue stats from Redis at each scrape.
// Concurrent scrapes share one snapshot.
type queueCollector struct {
	snapshot snapshotFunc
	max      int
	timeout  time.Duration
	errors   atomic.Uint64

	mu     sync.Mutex
	flight *snapshotFlight // the snapshot under way, if any

	ready, inFlight, delayed, dead, oldestAge, paused, consumers *prometheus.Desc
	messages, truncated, redisUp, scrapeErrors                   *prometheus.Desc
}

// snapshotFlight is one call of the snapshot function; done is closed when
// its results are set.
type snapshotFlight struct {
	done      chan struct{}
	stats     []*qbridgev1.GetQueueStatsResponse
	truncated bool
	err       error
}

func newQueueCollector(snapshot snapshotFunc, max int, timeout time.Duration) *queueCollector {
	q := []string{"queue"}
	return &queueCollector{
		snapshot: snapshot, max: max, timeout: timeout,
		ready:     prometheus.NewDesc("qbridge_queue_ready", "Messages waiting to be delivered (cluster-wide, read from Redis).", q, nil),
		inFlight:  prometheus.NewDesc("qbridge_queue_in_flight", "Messages delivered and not yet acked, nacked or expired (cluster-wide).", q, nil),
		delayed:   prometheus.NewDesc("qbridge_queue_delayed", "Messages waiting for their delivery time (cluster-wide).", q, nil),
		dead:      prometheus.NewDesc("qbridge_queue_dead", "Dead letters (cluster-wide).", q, nil),
		oldestAge: prometheus.NewDesc("qbridge_queue_oldest_ready_age_seconds", "Age of the message at the head of the queue; 0 when empty or unknown.", q, nil),
		paused:    prometheus.NewDesc("qbridge_queue_paused", "1 if the queue is paused, else 0.", q, nil),
		consumers: prometheus.NewDesc("qbridge_queue_consumers", "Open Consume streams on the queue over all instances (as of their last heartbeat).", q, nil),
		messages: prometheus.NewDesc("qbridge_queue_messages_total",
			"The queue's event totals kept in Redis: cluster-wide, the same on every instance.", []string{"queue", "event"}, nil),
		truncated:    prometheus.NewDesc("qbridge_queues_truncated", "1 if more queues exist than are exported, else 0.", nil, nil),
		redisUp:      prometheus.NewDesc("qbridge_redis_up", "1 if this scrape's snapshot of the queues succeeded, else 0.", nil, nil),
		scrapeErrors: prometheus.NewDesc("qbridge_scrape_errors_total", "Snapshots of the queues that failed.", nil, nil),
	}
}

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.ready, c.inFlight, c.delayed, c.dead, c.oldestAge, c.paused, c.consumers,
		c.messages, c.truncated, c.redisUp, c.scrapeErrors} {
		ch <- d
	}
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	f := c.fetch()
	// A failed snapshot may still hold the stats of some queues (those on
	// the Redis Cluster nodes that answered): they are reported, with
	// qbridge_redis_up 0.
	if f.err != nil {
		ch <- prometheus.MustNewConstMetric(c.redisUp, prometheus.GaugeValue, 0)
		ch <- prometheus.MustNewConstMetric(c.scrapeErrors, prometheus.CounterValue, float64(c.errors.Load()))
		if len(f.stats) == 0 {
			return
		}
	} else {
		ch <- prometheus.MustNewConstMetric(c.redisUp, prometheus.GaugeValue, 1)
	}
	ch <- prometheus.MustNewConstMetric(c.scrapeErrors, prometheus.CounterValue, float64(c.errors.Load()))
	ch <- prometheus.MustNewConstMetric(c.truncated, prometheus.GaugeValue, b2f(f.truncated))
	seen := make(map[string]bool, len(f.stats))
	for _, st := range f.stats {
		q := st.GetQueue()
		if seen[q] {
			continue // a duplicate would fail the whole scrape
		}
		seen[q] = true
		gauge := func(d *prometheus.Desc, v float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, q)
		}
		gauge(c.ready, float64(st.GetReady()))
		gauge(c.inFlight, float64(st.GetInFlight()))
		gauge(c.delayed, float64(st.GetDelayed()))
		gauge(c.dead, float64(st.GetDead()))
		gauge(c.oldestAge, st.GetOldestReadyAge().AsDuration().Seconds())
		gauge(c.paused, b2f(st.GetPaused()))
		gauge(c.consumers, float64(st.GetConsumers()))
		cs := st.GetCounters()
		for _, e := range []struct {
			event string
			n     int64
		}{
			{"enqueued", cs.GetEnqueued()},
			{"acked", cs.GetAcked()},
			{"nacked", cs.GetNacked()},
			{"lease_expired", cs.GetLeaseExpired()},
			{"dead_lettered", cs.GetDeadLettered()},
			{"expired", cs.GetExpired()},
		} {
			ch <- prometheus.MustNewConstMetric(c.messages, prometheus.CounterValue, float64(e.n), q, e.event)
		}
	}
}

// fetch returns the result of a snapshot: a new one, or the one under way
// when another scrape started it.
func (c *queueCollector) fetch() *snapshotFlight {
	c.mu.Lock()
	if f := c.flight; f != nil {
		c.mu.Unlock()
		<-f.done
		return f
	}
	f := &snapshotFlight{done: make(chan struct{})}
	c.flight = f
	c.mu.Unlock()

	defer func() {
		c.mu.Lock()
		c.flight = nil
		c.mu.Unlock()
		close(f.done)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	f.stats, f.truncated, f.err = c.snapshot(ctx, c.max)
	if f.err != nil {
		c.errors.Add(1)
	}
	return f
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
