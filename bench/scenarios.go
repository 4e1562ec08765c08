package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// errLost marks a run that lost (or duplicated) messages: fatal.
var errLost = errors.New("messages lost")

// side measures one side of a scenario for about dur.
type side func(ctx context.Context, size int, dur time.Duration) (sample, error)

// runFor runs conc workers calling op until dur has passed; it returns the
// operations done, their latencies and the elapsed time.
func runFor(ctx context.Context, conc int, dur time.Duration, op func(ctx context.Context, w int, i int) error) (int64, []time.Duration, time.Duration, error) {
	var (
		rec      latRecorder
		total    atomic.Int64
		firstErr error
		errOnce  sync.Once
		wg       sync.WaitGroup
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	deadline := start.Add(dur)
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]time.Duration, 0, 4096)
			for i := 0; time.Now().Before(deadline); i++ {
				t0 := time.Now()
				if err := op(ctx, w, i); err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
					break
				}
				lat = append(lat, time.Since(t0))
				total.Add(1)
			}
			rec.add(lat)
		}()
	}
	wg.Wait()
	return total.Load(), rec.all, time.Since(start), firstErr
}

// ---- 1. unary enqueue vs LPUSH ----

func (e *env) qbEnqueue(conc int) side {
	return func(ctx context.Context, size int, dur time.Duration) (sample, error) {
		q := e.qbQueue("enq")
		p := payload(size, 1)
		n, lat, el, err := runFor(ctx, conc, dur, func(ctx context.Context, _, _ int) error {
			_, err := e.qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: p})
			return err
		})
		if err != nil {
			return sample{}, fmt.Errorf("Enqueue: %w", err)
		}
		if err := e.checkQbReady(ctx, q, n); err != nil {
			return sample{}, err
		}
		return sample{ops: float64(n) / el.Seconds(), n: n, lat: lat}, nil
	}
}

// grpcNoop calls the gRPC health service (which touches no Redis): what
// the same callers get from any unary call on this machine.
func (e *env) grpcNoop(conc int) side {
	return func(ctx context.Context, _ int, dur time.Duration) (sample, error) {
		hc := healthpb.NewHealthClient(e.conns[0])
		n, lat, el, err := runFor(ctx, conc, dur, func(ctx context.Context, _, _ int) error {
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
			return err
		})
		if err != nil {
			return sample{}, fmt.Errorf("health Check: %w", err)
		}
		return sample{ops: float64(n) / el.Seconds(), n: n, lat: lat}, nil
	}
}

func (e *env) directLPUSH(conc int) side {
	return func(ctx context.Context, size int, dur time.Duration) (sample, error) {
		k := e.directKey("lpush")
		p := payload(size, 1)
		n, lat, el, err := runFor(ctx, conc, dur, func(ctx context.Context, _, _ int) error {
			return e.direct.LPush(ctx, k, p).Err()
		})
		if err != nil {
			return sample{}, fmt.Errorf("LPUSH: %w", err)
		}
		if err := e.checkLLen(ctx, k, n); err != nil {
			return sample{}, err
		}
		return sample{ops: float64(n) / el.Seconds(), n: n, lat: lat}, nil
	}
}

func (e *env) checkQbReady(ctx context.Context, q string, want int64) error {
	st, err := e.qc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
	if err != nil {
		return fmt.Errorf("GetQueueStats: %w", err)
	}
	if st.GetReady() != want {
		return fmt.Errorf("%w: qbridge queue %s holds %d ready messages, %d were enqueued", errLost, q, st.GetReady(), want)
	}
	return nil
}

func (e *env) checkLLen(ctx context.Context, k string, want int64) error {
	got, err := e.direct.LLen(ctx, k).Result()
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("%w: list %s holds %d, %d were pushed", errLost, k, got, want)
	}
	return nil
}

// ---- 2. batch enqueue vs pipelined LPUSH ----

const batchSize = 100

func (e *env) qbBatch(ctx context.Context, size int, dur time.Duration) (sample, error) {
	q := e.qbQueue("batch")
	msgs := make([]*qbridgev1.BatchMessage, batchSize)
	for i := range msgs {
		msgs[i] = &qbridgev1.BatchMessage{Payload: payload(size, uint64(i))}
	}
	n, lat, el, err := runFor(ctx, 1, dur, func(ctx context.Context, _, _ int) error {
		r, err := e.qc.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs})
		if err == nil && len(r.GetIds()) != batchSize {
			err = fmt.Errorf("EnqueueBatch returned %d ids for %d messages", len(r.GetIds()), batchSize)
		}
		return err
	})
	if err != nil {
		return sample{}, fmt.Errorf("EnqueueBatch: %w", err)
	}
	if err := e.checkQbReady(ctx, q, n*batchSize); err != nil {
		return sample{}, err
	}
	return sample{ops: float64(n*batchSize) / el.Seconds(), n: n * batchSize, lat: lat}, nil
}

func (e *env) directPipeline(ctx context.Context, size int, dur time.Duration) (sample, error) {
	k := e.directKey("pipe")
	ps := make([][]byte, batchSize)
	for i := range ps {
		ps[i] = payload(size, uint64(i))
	}
	n, lat, el, err := runFor(ctx, 1, dur, func(ctx context.Context, _, _ int) error {
		pipe := e.direct.Pipeline()
		for _, p := range ps {
			pipe.LPush(ctx, k, p)
		}
		_, err := pipe.Exec(ctx)
		return err
	})
	if err != nil {
		return sample{}, fmt.Errorf("pipelined LPUSH: %w", err)
	}
	if err := e.checkLLen(ctx, k, n*batchSize); err != nil {
		return sample{}, err
	}
	return sample{ops: float64(n*batchSize) / el.Seconds(), n: n * batchSize, lat: lat}, nil
}

// ---- 3. drain a pre-filled queue ----

// drainer sizes each pre-fill from the rate of the previous run, so that a
// full drain takes about the requested duration.
type drainer struct {
	min, max int
	rate     float64
	run      func(ctx context.Context, size, n int) (time.Duration, error)
}

func (d *drainer) side(ctx context.Context, size int, dur time.Duration) (sample, error) {
	n := d.min
	if d.rate > 0 {
		n = max(d.min, min(d.max, int(d.rate*dur.Seconds())))
	}
	el, err := d.run(ctx, size, n)
	if err != nil {
		return sample{}, err
	}
	d.rate = float64(n) / el.Seconds()
	return sample{ops: d.rate, n: int64(n)}, nil
}

// seen tracks which of n messages were taken, to catch losses and
// duplicates.
type seen struct {
	mu    sync.Mutex
	got   []bool
	count int
	dups  int
	last  time.Time
	done  chan struct{}
}

func newSeen(n int) *seen { return &seen{got: make([]bool, n), done: make(chan struct{})} }

func (s *seen) mark(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seq >= uint64(len(s.got)) || s.got[seq] {
		s.dups++
		return
	}
	s.got[seq] = true
	s.count++
	if s.count == len(s.got) {
		s.last = time.Now()
		close(s.done)
	}
}

func (s *seen) check(what string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.count != len(s.got) || s.dups != 0 {
		return fmt.Errorf("%w: %s: %d of %d messages taken, %d duplicates or unknown", errLost, what, s.count, len(s.got), s.dups)
	}
	return nil
}

func (s *seen) wait(ctx context.Context, timeout time.Duration) bool {
	select {
	case <-s.done:
		return true
	case <-time.After(timeout):
		return false
	case <-ctx.Done():
		return false
	}
}

const drainTimeout = 60 * time.Second

func (e *env) qbDrain(consumers, window int) func(ctx context.Context, size, n int) (time.Duration, error) {
	return func(ctx context.Context, size, n int) (time.Duration, error) {
		q := e.qbQueue("drain")
		for i := 0; i < n; i += 1000 {
			var msgs []*qbridgev1.BatchMessage
			for j := i; j < min(n, i+1000); j++ {
				msgs = append(msgs, &qbridgev1.BatchMessage{Payload: payload(size, uint64(j))})
			}
			if _, err := e.qc.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: q, Messages: msgs}); err != nil {
				return 0, fmt.Errorf("pre-fill: %w", err)
			}
		}
		s := newSeen(n)
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		errs := make(chan error, consumers)
		var wg sync.WaitGroup
		start := time.Now()
		for c := 0; c < consumers; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- e.consumeAck(sctx, c, q, window, s)
			}()
		}
		ok := s.wait(ctx, drainTimeout)
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil && !ok {
				return 0, fmt.Errorf("Consume: %w", err)
			}
		}
		if err := s.check("qbridge Consume+Ack drain"); err != nil {
			return 0, err
		}
		st, err := e.qc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
		if err != nil {
			return 0, err
		}
		if st.GetReady() != 0 || st.GetInFlight() != 0 {
			return 0, fmt.Errorf("%w: after the drain, queue %s still has %d ready and %d in flight", errLost, q, st.GetReady(), st.GetInFlight())
		}
		return s.last.Sub(start), nil
	}
}

// consumeAck reads one Consume stream, acking each response's deliveries in
// one Ack call before counting them.
func (e *env) consumeAck(ctx context.Context, i int, q string, window int, s *seen) error {
	st, err := e.qcN(i).Consume(ctx, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: uint32(window)})
	if err != nil {
		return err
	}
	for {
		r, err := st.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		toks := make([]string, 0, len(r.GetDeliveries()))
		for _, d := range r.GetDeliveries() {
			toks = append(toks, d.GetAckToken())
		}
		if _, err := e.qc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: toks}); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("Ack: %w", err)
		}
		for _, d := range r.GetDeliveries() {
			s.mark(seqOf(d.GetPayload()))
		}
	}
}

func (e *env) prefillDirect(ctx context.Context, k string, size, n int) error {
	for i := 0; i < n; i += 1000 {
		pipe := e.direct.Pipeline()
		for j := i; j < min(n, i+1000); j++ {
			pipe.LPush(ctx, k, payload(size, uint64(j)))
		}
		if _, err := pipe.Exec(ctx); err != nil {
			return fmt.Errorf("pre-fill: %w", err)
		}
	}
	return nil
}

// directDrain drains with BLMOVE src→processing + LREM (reliable queue) or
// with plain BLPOP.
func (e *env) directDrain(consumers int, reliable bool) func(ctx context.Context, size, n int) (time.Duration, error) {
	return func(ctx context.Context, size, n int) (time.Duration, error) {
		k := e.directKey("drain")
		if err := e.prefillDirect(ctx, k, size, n); err != nil {
			return 0, err
		}
		s := newSeen(n)
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		errs := make(chan error, consumers)
		var wg sync.WaitGroup
		start := time.Now()
		for c := 0; c < consumers; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				proc := fmt.Sprintf("%s:processing:%d", k, c)
				for sctx.Err() == nil {
					var v string
					var err error
					if reliable {
						v, err = e.direct.BLMove(sctx, k, proc, "RIGHT", "LEFT", time.Second).Result()
					} else {
						var kv []string
						kv, err = e.direct.BLPop(sctx, time.Second, k).Result()
						if len(kv) == 2 {
							v = kv[1]
						}
					}
					if err == redis.Nil {
						continue
					}
					if err != nil {
						if sctx.Err() == nil {
							errs <- err
						}
						return
					}
					if reliable {
						if err := e.direct.LRem(sctx, proc, 1, v).Err(); err != nil {
							if sctx.Err() == nil {
								errs <- err
							}
							return
						}
					}
					s.mark(seqOf([]byte(v)))
				}
			}()
		}
		ok := s.wait(ctx, drainTimeout)
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil && !ok {
				return 0, err
			}
		}
		what := "direct BLPOP drain"
		if reliable {
			what = "direct BLMOVE+LREM drain"
		}
		if err := s.check(what); err != nil {
			return 0, err
		}
		return s.last.Sub(start), nil
	}
}

// ---- 4. paced end-to-end latency ----

// paced sends one message per interval for dur with send(seq) while recv
// delivers seqs to got; it returns per-message latency.
func paced(ctx context.Context, rate int, dur time.Duration, send func(ctx context.Context, seq uint64) error, start func(ctx context.Context, got func(seq uint64)) error, what string) (sample, error) {
	n := max(1, int(float64(rate)*dur.Seconds()))
	sent := make([]time.Time, n)
	recvd := make([]time.Time, n)
	var count atomic.Int64
	var dups atomic.Int64
	done := make(chan struct{})
	var mu sync.Mutex
	got := func(seq uint64) {
		now := time.Now()
		mu.Lock()
		defer mu.Unlock()
		if seq >= uint64(n) || !recvd[seq].IsZero() {
			dups.Add(1)
			return
		}
		recvd[seq] = now
		if count.Add(1) == int64(n) {
			close(done)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cerr := make(chan error, 1)
	go func() { cerr <- start(cctx, got) }()
	time.Sleep(20 * time.Millisecond) // let the consumer block first
	interval := time.Second / time.Duration(rate)
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if d := time.Until(t0.Add(time.Duration(i) * interval)); d > 0 {
			time.Sleep(d)
		}
		sent[i] = time.Now()
		if err := send(ctx, uint64(i)); err != nil {
			return sample{}, fmt.Errorf("%s send: %w", what, err)
		}
	}
	el := time.Since(t0)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	case err := <-cerr:
		if err != nil {
			return sample{}, fmt.Errorf("%s receive: %w", what, err)
		}
	}
	cancel()
	<-cerr
	mu.Lock()
	defer mu.Unlock()
	if c := count.Load(); c != int64(n) || dups.Load() != 0 {
		return sample{}, fmt.Errorf("%w: %s: %d of %d delivered, %d duplicates", errLost, what, c, n, dups.Load())
	}
	lat := make([]time.Duration, n)
	for i := range lat {
		lat[i] = recvd[i].Sub(sent[i])
	}
	return sample{ops: float64(n) / el.Seconds(), n: int64(n), lat: lat}, nil
}

func (e *env) qbLatency(rate, window int) side {
	return func(ctx context.Context, size int, dur time.Duration) (sample, error) {
		q := e.qbQueue("lat")
		return paced(ctx, rate, dur, func(ctx context.Context, seq uint64) error {
			_, err := e.qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: q, Payload: payload(size, seq)})
			return err
		}, func(ctx context.Context, got func(uint64)) error {
			st, err := e.qcN(1).Consume(ctx, &qbridgev1.ConsumeRequest{Queue: q, MaxInFlight: uint32(window)})
			if err != nil {
				return err
			}
			for {
				r, err := st.Recv()
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return err
				}
				for _, d := range r.GetDeliveries() {
					got(seqOf(d.GetPayload()))
				}
				toks := make([]string, 0, len(r.GetDeliveries()))
				for _, d := range r.GetDeliveries() {
					toks = append(toks, d.GetAckToken())
				}
				if _, err := e.qc.Ack(ctx, &qbridgev1.AckRequest{AckTokens: toks}); err != nil && ctx.Err() == nil {
					return fmt.Errorf("Ack: %w", err)
				}
			}
		}, "qbridge Enqueue→Consume")
	}
}

func (e *env) directLatency(rate int) side {
	return func(ctx context.Context, size int, dur time.Duration) (sample, error) {
		k := e.directKey("lat")
		return paced(ctx, rate, dur, func(ctx context.Context, seq uint64) error {
			return e.direct.RPush(ctx, k, payload(size, seq)).Err()
		}, func(ctx context.Context, got func(uint64)) error {
			for {
				kv, err := e.direct.BLPop(ctx, time.Second, k).Result()
				if err == redis.Nil {
					continue
				}
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return err
				}
				got(seqOf([]byte(kv[1])))
			}
		}, "direct RPUSH→BLPOP")
	}
}
