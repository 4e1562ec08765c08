package metrics

import (
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// poolCollector exports the stats of go-redis connection pools.
type poolCollector struct {
	mu    sync.Mutex
	pools []redisPool

	conns, hits, misses, timeouts *prometheus.Desc
}

type redisPool struct {
	name  string
	stats func() *redis.PoolStats
}

func newPoolCollector() *poolCollector {
	p := []string{"pool"}
	return &poolCollector{
		conns:    prometheus.NewDesc("qbridge_redis_pool_connections", "Connections of a Redis pool: idle, or in total.", []string{"pool", "state"}, nil),
		hits:     prometheus.NewDesc("qbridge_redis_pool_hits_total", "Times a free connection was found in the pool.", p, nil),
		misses:   prometheus.NewDesc("qbridge_redis_pool_misses_total", "Times no free connection was found in the pool.", p, nil),
		timeouts: prometheus.NewDesc("qbridge_redis_pool_timeouts_total", "Waits for a connection of the pool that timed out.", p, nil),
	}
}

func (c *poolCollector) add(name string, stats func() *redis.PoolStats) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.pools {
		if p.name == name {
			panic(fmt.Sprintf("metrics: AddRedisPool(%q): a pool of that name was already added", name))
		}
	}
	c.pools = append(c.pools, redisPool{name, stats})
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.conns
	ch <- c.hits
	ch <- c.misses
	ch <- c.timeouts
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	pools := c.pools[:len(c.pools):len(c.pools)]
	c.mu.Unlock()
	for _, p := range pools {
		st := p.stats()
		if st == nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(st.IdleConns), p.name, "idle")
		ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(st.TotalConns), p.name, "total")
		ch <- prometheus.MustNewConstMetric(c.hits, prometheus.CounterValue, float64(st.Hits), p.name)
		ch <- prometheus.MustNewConstMetric(c.misses, prometheus.CounterValue, float64(st.Misses), p.name)
		ch <- prometheus.MustNewConstMetric(c.timeouts, prometheus.CounterValue, float64(st.Timeouts), p.name)
	}
}
