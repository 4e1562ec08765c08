package dashboard

import (
	"sync"
	"time"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// sample is one queue's stats at one time.
type sample struct {
	Time     time.Time `json:"time"`
	Ready    int64     `json:"ready"`
	InFlight int64     `json:"in_flight"`
	Delayed  int64     `json:"delayed"`
	Dead     int64     `json:"dead"`
	Enqueued int64     `json:"enqueued"`
	Acked    int64     `json:"acked"`
}

// ring keeps the latest samples of one queue.
type ring struct {
	buf   []sample
	start int // index of the oldest
	n     int
}

func (r *ring) add(s sample) {
	if r.n < len(r.buf) {
		r.buf[(r.start+r.n)%len(r.buf)] = s
		r.n++
		return
	}
	r.buf[r.start] = s
	r.start = (r.start + 1) % len(r.buf)
}

func (r *ring) list() []sample {
	out := make([]sample, r.n)
	for i := range out {
		out[i] = r.buf[(r.start+i)%len(r.buf)]
	}
	return out
}

// history holds the samples of every sampled queue.
type history struct {
	capacity int

	mu        sync.Mutex
	byQueue   map[string]*ring
	truncated bool
	failing   bool
}

func newHistory(capacity int) *history {
	return &history{capacity: capacity, byQueue: map[string]*ring{}}
}

// record adds a sample of each queue in stats, taken at now, and forgets
// queues that are no longer there. It reports whether sampling had been
// failing until now.
func (h *history) record(now time.Time, stats []*qbridgev1.GetQueueStatsResponse, truncated bool) (recovered bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	seen := h.addLocked(now, stats)
	for q := range h.byQueue {
		if !seen[q] {
			delete(h.byQueue, q)
		}
	}
	h.truncated = truncated
	recovered, h.failing = h.failing, false
	return recovered
}

// recordPartial records the queues a failed snapshot could read, keeping
// the history of the others (their node may come back).
func (h *history) recordPartial(now time.Time, stats []*qbridgev1.GetQueueStatsResponse) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.addLocked(now, stats)
}

// addLocked adds a sample of each queue in stats and returns their names.
func (h *history) addLocked(now time.Time, stats []*qbridgev1.GetQueueStatsResponse) map[string]bool {
	seen := make(map[string]bool, len(stats))
	for _, st := range stats {
		q := st.GetQueue()
		seen[q] = true
		r := h.byQueue[q]
		if r == nil {
			r = &ring{buf: make([]sample, h.capacity)}
			h.byQueue[q] = r
		}
		r.add(sample{
			Time: now.UTC(), Ready: st.GetReady(), InFlight: st.GetInFlight(), Delayed: st.GetDelayed(), Dead: st.GetDead(),
			Enqueued: st.GetCounters().GetEnqueued(), Acked: st.GetCounters().GetAcked(),
		})
	}
	return seen
}

// failed notes a failed sampling; it reports whether this is the first
// failure since the last success (so that it is logged once).
func (h *history) failed(error) (first bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	first, h.failing = !h.failing, true
	return first
}

// samples returns a copy of queue's samples, oldest first, and whether the
// queue is sampled at all.
func (h *history) samples(queue string) ([]sample, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.byQueue[queue]
	if r == nil {
		return []sample{}, false
	}
	return r.list(), true
}
