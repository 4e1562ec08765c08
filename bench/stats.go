package bench

import (
	"encoding/binary"
	"slices"
	"sync"
	"time"
)

// sample is one measured run of one side of a scenario.
type sample struct {
	ops float64         // operations (messages) per second
	n   int64           // operations done
	lat []time.Duration // per-operation latencies, if any
}

// Series is the repeats of one side of a scenario.
type Series struct {
	Label  string    `json:"label"`
	OpsPS  []float64 `json:"ops_per_sec"`
	Min    float64   `json:"min"`
	Median float64   `json:"median"`
	Max    float64   `json:"max"`
	Count  int64     `json:"count"`            // operations over all repeats
	P50us  float64   `json:"p50_us,omitempty"` // over all repeats
	P99us  float64   `json:"p99_us,omitempty"`
	// LatencyOf says what the latency measures.
	LatencyOf string `json:"latency_of,omitempty"`
}

func summarize(label, latOf string, ss []sample) *Series {
	s := &Series{Label: label, LatencyOf: latOf}
	var lat []time.Duration
	for _, x := range ss {
		s.OpsPS = append(s.OpsPS, x.ops)
		s.Count += x.n
		lat = append(lat, x.lat...)
	}
	sorted := slices.Clone(s.OpsPS)
	slices.Sort(sorted)
	if len(sorted) > 0 {
		s.Min, s.Max = sorted[0], sorted[len(sorted)-1]
		s.Median = median(sorted)
	}
	if len(lat) > 0 {
		slices.Sort(lat)
		s.P50us = us(pct(lat, 0.50))
		s.P99us = us(pct(lat, 0.99))
	} else {
		s.LatencyOf = ""
	}
	return s
}

func median(sorted []float64) float64 {
	n := len(sorted)
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

func pct(sorted []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(sorted)) + 0.5)
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	if i < 0 {
		i = 0
	}
	return sorted[i]
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// payload returns a payload of size n whose first 8 bytes carry seq (when
// n >= 8).
func payload(n int, seq uint64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = 'x'
	}
	if n >= 8 {
		binary.BigEndian.PutUint64(b, seq)
	}
	return b
}

func seqOf(b []byte) uint64 {
	if len(b) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

// latRecorder collects latencies from several goroutines.
type latRecorder struct {
	mu  sync.Mutex
	all []time.Duration
}

func (r *latRecorder) add(l []time.Duration) {
	r.mu.Lock()
	r.all = append(r.all, l...)
	r.mu.Unlock()
}
