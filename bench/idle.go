package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// IdleResult is scenario 6.
type IdleResult struct {
	ConsumeStreams   int `json:"consume_streams"`
	SubscribeStreams int `json:"subscribe_streams"`
	// Redis connections: all clients of the Redis, minus the harness's
	// direct clients, before and with the streams open.
	RedisConnsBefore int `json:"redis_conns_before"`
	RedisConnsIdle   int `json:"redis_conns_idle"`
	// RSS of the harness process (VmRSS), before and with the streams open;
	// -1 when qbridge is remote. The client side of the streams lives in the
	// same process, so PerStreamKiB is an upper bound for the server.
	RSSBeforeKiB int64   `json:"rss_before_kib"`
	RSSIdleKiB   int64   `json:"rss_idle_kib"`
	PerStreamKiB float64 `json:"rss_per_stream_kib"`
	OpenSeconds  float64 `json:"open_seconds"`
	// WakeTimeouts counts wake-ups not delivered within WakeTimeout (the
	// message was then checked to still be in its queue, so not lost).
	WakeTimeouts int     `json:"wake_timeouts"`
	WakeTimeout  float64 `json:"wake_timeout_seconds"`
	// Wake-up latency of one idle stream among all the others.
	ConsumeWake   *Series `json:"consume_wake"`
	SubscribeWake *Series `json:"subscribe_wake"`
	// The same with one lone direct BLPOP / SUBSCRIBE client.
	DirectBLPOPWake     *Series `json:"direct_blpop_wake"`
	DirectSubscribeWake *Series `json:"direct_subscribe_wake"`
}

func rssKiB() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			if len(f) >= 2 {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				return v
			}
		}
	}
	return -1
}

func settledRSS() int64 {
	runtime.GC()
	debug.FreeOSMemory()
	return rssKiB()
}

func (e *env) serverConns(ctx context.Context) (int, error) {
	total, direct, _, err := e.clientCounts(ctx)
	return total - direct, err
}

func wakeSeries(label string, lat []time.Duration) *Series {
	s := summarize(label, "wake-up", []sample{{lat: lat, n: int64(len(lat)), ops: 0}})
	s.OpsPS, s.Min, s.Median, s.Max = nil, 0, 0, 0
	return s
}

func (e *env) idle(ctx context.Context, streams, tries int) (*IdleResult, error) {
	if err := e.flush(ctx); err != nil {
		return nil, err
	}
	res := &IdleResult{ConsumeStreams: streams, SubscribeStreams: streams, RSSBeforeKiB: -1, RSSIdleKiB: -1}
	var err error
	if res.RedisConnsBefore, err = e.serverConns(ctx); err != nil {
		return nil, err
	}
	inproc := e.srv != nil
	if inproc {
		res.RSSBeforeKiB = settledRSS()
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cwoke := make(chan wake, 16)
	swoke := make(chan wake, 16)
	prefix := e.name("idle")
	qname := func(i int) string { return fmt.Sprintf("%s-q%d", prefix, i) }
	cname := func(i int) string { return fmt.Sprintf("%s-c%d", prefix, i) }
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	streamErr := make(chan error, 1)
	report := func(err error) {
		if err != nil && sctx.Err() == nil {
			select {
			case streamErr <- err:
			default:
			}
		}
	}
	start := time.Now()
	sem := make(chan struct{}, 64)
	var openErr error
	var openMu sync.Mutex
	for i := 0; i < streams; i++ {
		sem <- struct{}{}
		wg.Add(2)
		go func() {
			defer wg.Done()
			cs, err := e.qcN(i).Consume(sctx, &qbridgev1.ConsumeRequest{Queue: qname(i), AutoAck: true})
			if err != nil {
				report(err)
				<-sem
				return
			}
			<-sem
			for {
				r, err := cs.Recv()
				if err != nil {
					report(fmt.Errorf("idle Consume stream %d: %w", i, err))
					return
				}
				if len(r.GetDeliveries()) > 0 {
					cwoke <- wake{i, time.Now()}
				}
			}
		}()
		go func() {
			defer wg.Done()
			ss, err := e.qcN(i).Subscribe(sctx, &qbridgev1.SubscribeRequest{Channels: []string{cname(i)}})
			if err == nil {
				_, err = ss.Recv() // Subscribed
			}
			if err != nil {
				openMu.Lock()
				openErr = fmt.Errorf("open Subscribe stream %d: %w", i, err)
				openMu.Unlock()
				return
			}
			for {
				r, err := ss.Recv()
				if err != nil {
					report(fmt.Errorf("idle Subscribe stream %d: %w", i, err))
					return
				}
				if r.GetMessage() != nil {
					swoke <- wake{i, time.Now()}
				}
			}
		}()
		openMu.Lock()
		err := openErr
		openMu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	// Settle: the Redis connection count stops changing.
	last, stable := -1, 0
	for stable < 5 && time.Since(start) < 60*time.Second {
		time.Sleep(200 * time.Millisecond)
		n, err := e.serverConns(ctx)
		if err != nil {
			return nil, err
		}
		if n == last {
			stable++
		} else {
			stable, last = 0, n
		}
	}
	select {
	case err := <-streamErr:
		return nil, err
	default:
	}
	res.OpenSeconds = time.Since(start).Seconds()
	res.RedisConnsIdle = last
	if inproc {
		res.RSSIdleKiB = settledRSS()
		res.PerStreamKiB = float64(res.RSSIdleKiB-res.RSSBeforeKiB) / float64(2*streams)
	}
	var clat, slat []time.Duration
	for t := 0; t < tries; t++ {
		j := (t + 1) * streams / (tries + 1)
		t0 := time.Now()
		if _, err := e.qc.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: qname(j), Payload: payload(100, uint64(t))}); err != nil {
			return nil, err
		}
		if err := waitWake(ctx, cwoke, streamErr, j, func(w wake) { clat = append(clat, w.t.Sub(t0)) }); err != nil {
			if !errors.Is(err, errWakeTimeout) {
				return nil, fmt.Errorf("idle Consume stream %d: %w", j, err)
			}
			st, serr := e.qc.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: qname(j)})
			if serr != nil {
				return nil, serr
			}
			if st.GetReady()+st.GetInFlight() != 1 {
				return nil, fmt.Errorf("%w: idle Consume stream %d got nothing in %v and its queue holds %d ready, %d in flight", errLost, j, wakeTimeout, st.GetReady(), st.GetInFlight())
			}
			res.WakeTimeouts++
			clat = append(clat, wakeTimeout)
			if e.cfg.Progress != nil {
				fmt.Fprintf(e.cfg.Progress, "  idle: Consume stream %d not woken within %v (message still queued)\n", j, wakeTimeout)
			}
		}
		t0 = time.Now()
		if _, err := e.qc.Publish(ctx, &qbridgev1.PublishRequest{Channel: cname(j), Payload: payload(100, uint64(t))}); err != nil {
			return nil, err
		}
		if err := waitWake(ctx, swoke, streamErr, j, func(w wake) { slat = append(slat, w.t.Sub(t0)) }); err != nil {
			return nil, fmt.Errorf("idle Subscribe stream %d: %w", j, err)
		}
	}
	res.WakeTimeout = wakeTimeout.Seconds()
	res.ConsumeWake = wakeSeries("qbridge idle Consume", clat)
	res.SubscribeWake = wakeSeries("qbridge idle Subscribe", slat)
	cancel()
	wg.Wait()
	if res.DirectBLPOPWake, res.DirectSubscribeWake, err = e.directWake(ctx, tries); err != nil {
		return nil, err
	}
	return res, nil
}

const wakeTimeout = 10 * time.Second

// wake is stream i receiving a message at t.
type wake struct {
	i int
	t time.Time
}

var errWakeTimeout = errors.New("not delivered within the wake-up timeout")

// waitWake waits for stream j to wake; late wake-ups of other streams
// (earlier timeouts) are ignored.
func waitWake(ctx context.Context, ch <-chan wake, errc <-chan error, j int, f func(wake)) error {
	timeout := time.After(wakeTimeout)
	for {
		select {
		case w := <-ch:
			if w.i != j {
				continue
			}
			f(w)
			return nil
		case err := <-errc:
			return err
		case <-timeout:
			return errWakeTimeout
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (e *env) directWake(ctx context.Context, tries int) (*Series, *Series, error) {
	var bl, sl []time.Duration
	for t := 0; t < tries; t++ {
		k := e.directKey("wake")
		got := make(chan time.Time, 1)
		errc := make(chan error, 1)
		go func() {
			kv, err := e.direct.BLPop(ctx, 10*time.Second, k).Result()
			if err == nil && len(kv) == 2 {
				got <- time.Now()
				return
			}
			errc <- fmt.Errorf("direct BLPOP wake: %v", err)
		}()
		time.Sleep(20 * time.Millisecond)
		t0 := time.Now()
		if err := e.direct.RPush(ctx, k, "x").Err(); err != nil {
			return nil, nil, err
		}
		select {
		case t1 := <-got:
			bl = append(bl, t1.Sub(t0))
		case err := <-errc:
			return nil, nil, err
		}
		ch := e.directKey("wakech")
		ps := e.direct.Subscribe(ctx, ch)
		if _, err := ps.Receive(ctx); err != nil {
			_ = ps.Close()
			return nil, nil, err
		}
		t0 = time.Now()
		if err := e.direct.Publish(ctx, ch, "x").Err(); err != nil {
			_ = ps.Close()
			return nil, nil, err
		}
		rctx, rc := context.WithTimeout(ctx, 10*time.Second)
		_, err := ps.ReceiveMessage(rctx)
		rc()
		sl = append(sl, time.Since(t0))
		_ = ps.Close()
		if err != nil && err != redis.Nil {
			return nil, nil, fmt.Errorf("direct SUBSCRIBE wake: %w", err)
		}
	}
	slices.Sort(bl)
	return wakeSeries("direct BLPOP", bl), wakeSeries("direct SUBSCRIBE", sl), nil
}
