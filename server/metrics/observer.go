package metrics

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qbridge/qbridge/server"
)

// latencyBuckets are the bounds of qbridge_delivery_latency_seconds: 1ms
// to 1h.
var latencyBuckets = []float64{
	.001, .0025, .005, .01, .025, .05, .1, .25, .5,
	1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
}

// observer is the server.Observer of Metrics: instance-local counters and
// a histogram, with at most max distinct queue label values.
type observer struct {
	delivered, redelivered *prometheus.CounterVec
	latency                *prometheus.HistogramVec

	published, receivers, psDelivered, dropped, cutOff prometheus.Counter

	max    int
	queues sync.Map // queue name -> *queueSeries, at most max of them
	full   atomic.Bool
	mu     sync.Mutex // admits new queues
	n      int        // queues admitted; under mu

	otherOnce sync.Once // creates other, when first needed
	other     *queueSeries
}

var _ server.Observer = (*observer)(nil)

// queueSeries are the series of one queue label value.
type queueSeries struct {
	delivered, redelivered prometheus.Counter
	latency                prometheus.Observer
}

func newObserver(max int) *observer {
	q := []string{"queue"}
	o := &observer{
		max: max,
		delivered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "qbridge_delivered_total", Help: "Messages this instance sent to Consume streams.",
		}, q),
		redelivered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "qbridge_redelivered_total", Help: "Messages this instance sent to Consume streams again (attempt > 1).",
		}, q),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "qbridge_delivery_latency_seconds",
			Help:    "Time from a message's enqueue (its delay included) to its delivery by this instance.",
			Buckets: latencyBuckets,
		}, q),
		published: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "qbridge_pubsub_published_total", Help: "Successful Publish calls on this instance.",
		}),
		receivers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "qbridge_pubsub_receivers_total", Help: "Sum of the receivers (on all instances) that Publish on this instance reported.",
		}),
		psDelivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "qbridge_pubsub_delivered_total", Help: "Published messages queued to this instance's Subscribe streams.",
		}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "qbridge_pubsub_dropped_total", Help: "Messages dropped with subscribers of this instance cut off for falling behind.",
		}),
		cutOff: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "qbridge_pubsub_subscribers_cut_off_total", Help: "Subscribers of this instance cut off for falling behind.",
		}),
	}
	return o
}

func (o *observer) newSeries(queue string) *queueSeries {
	return &queueSeries{
		delivered:   o.delivered.WithLabelValues(queue),
		redelivered: o.redelivered.WithLabelValues(queue),
		latency:     o.latency.WithLabelValues(queue),
	}
}

// series returns the series that count queue: its own, or those of
// otherQueue once max queues have theirs.
func (o *observer) series(queue string) *queueSeries {
	if s, ok := o.queues.Load(queue); ok {
		return s.(*queueSeries)
	}
	if queue == otherQueue || o.full.Load() {
		return o.otherSeries()
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if s, ok := o.queues.Load(queue); ok {
		return s.(*queueSeries)
	}
	if o.n >= o.max {
		o.full.Store(true)
		return o.otherSeries()
	}
	s := o.newSeries(queue)
	o.queues.Store(queue, s)
	o.n++
	return s
}

// otherSeries returns the series of otherQueue.
func (o *observer) otherSeries() *queueSeries {
	o.otherOnce.Do(func() { o.other = o.newSeries(otherQueue) })
	return o.other
}

func (o *observer) Delivered(queue string, attempt uint32, sinceEnqueue time.Duration) {
	s := o.series(queue)
	s.delivered.Inc()
	if attempt > 1 {
		s.redelivered.Inc()
	}
	s.latency.Observe(max(0, sinceEnqueue).Seconds()) // < 0: clocks of instances differ
}

func (o *observer) Published(receivers int64) {
	o.published.Inc()
	if receivers > 0 {
		o.receivers.Add(float64(receivers))
	}
}

func (o *observer) PubSubDelivered(n int) {
	if n > 0 {
		o.psDelivered.Add(float64(n))
	}
}

func (o *observer) PubSubDropped(buffered int) {
	o.cutOff.Inc()
	if buffered > 0 {
		o.dropped.Add(float64(buffered))
	}
}

func (o *observer) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range o.collectors() {
		c.Describe(ch)
	}
}

func (o *observer) Collect(ch chan<- prometheus.Metric) {
	for _, c := range o.collectors() {
		c.Collect(ch)
	}
}

func (o *observer) collectors() []prometheus.Collector {
	return []prometheus.Collector{o.delivered, o.redelivered, o.latency,
		o.published, o.receivers, o.psDelivered, o.dropped, o.cutOff}
}
