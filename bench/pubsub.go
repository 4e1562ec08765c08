package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// pubWindow is the most messages publishers may be ahead of the slowest
// subscriber (below qbridge's default 1024-message subscriber buffer), so
// that both sides measure sustained delivery, not buffer overflow.
const pubWindow = 512

// pubsubRun publishes from pubs goroutines for dur to subs subscribers of
// one channel and returns the delivered messages per second.
func pubsubRun(ctx context.Context, pubs, subs int, dur time.Duration, what string,
	subscribe func(ctx context.Context, i int, got func()) (wait func() error, err error),
	publish func(ctx context.Context) error) (sample, error) {
	recv := make([]atomic.Int64, subs)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var waits []func() error
	for i := 0; i < subs; i++ {
		w, err := subscribe(sctx, i, func() { recv[i].Add(1) })
		if err != nil {
			return sample{}, fmt.Errorf("%s subscribe: %w", what, err)
		}
		waits = append(waits, w)
	}
	minRecv := func() int64 {
		m := recv[0].Load()
		for i := 1; i < subs; i++ {
			m = min(m, recv[i].Load())
		}
		return m
	}
	var published atomic.Int64
	start := time.Now()
	n, lat, _, err := runFor(ctx, pubs, dur, func(ctx context.Context, _, _ int) error {
		p := published.Add(1)
		for p-minRecv() > pubWindow {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			time.Sleep(20 * time.Microsecond)
		}
		return publish(ctx)
	})
	if err != nil {
		return sample{}, fmt.Errorf("%s publish: %w", what, err)
	}
	if !waitFor(ctx, 10*time.Second, func() bool { return minRecv() >= n }) {
		var got int64
		for i := range recv {
			got += recv[i].Load()
		}
		return sample{}, fmt.Errorf("%w: %s: %d published to %d subscribers, %d of %d deliveries arrived", errLost, what, n, subs, got, n*int64(subs))
	}
	el := time.Since(start)
	cancel()
	for _, w := range waits {
		if err := w(); err != nil {
			return sample{}, fmt.Errorf("%s subscriber: %w", what, err)
		}
	}
	for i := range recv {
		if r := recv[i].Load(); r != n {
			return sample{}, fmt.Errorf("%w: %s: subscriber %d got %d of %d", errLost, what, i, r, n)
		}
	}
	d := n * int64(subs)
	return sample{ops: float64(d) / el.Seconds(), n: d, lat: lat}, nil
}

func (e *env) qbPubSub(pubs, subs int) side {
	return func(ctx context.Context, size int, dur time.Duration) (sample, error) {
		ch := e.name("ch")
		p := payload(size, 1)
		return pubsubRun(ctx, pubs, subs, dur, "qbridge Publish→Subscribe", func(ctx context.Context, i int, got func()) (func() error, error) {
			st, err := e.qcN(i).Subscribe(ctx, &qbridgev1.SubscribeRequest{Channels: []string{ch}})
			if err != nil {
				return nil, err
			}
			r, err := st.Recv()
			if err != nil {
				return nil, err
			}
			if r.GetSubscribed() == nil {
				return nil, fmt.Errorf("first Subscribe response is not Subscribed: %v", r)
			}
			errc := make(chan error, 1)
			go func() {
				for {
					r, err := st.Recv()
					if err != nil {
						if ctx.Err() != nil {
							err = nil
						}
						errc <- err
						return
					}
					if r.GetMessage() != nil {
						got()
					}
				}
			}()
			return func() error { return <-errc }, nil
		}, func(ctx context.Context) error {
			_, err := e.qc.Publish(ctx, &qbridgev1.PublishRequest{Channel: ch, Payload: p})
			return err
		})
	}
}

func (e *env) directPubSub(pubs, subs int) side {
	return func(ctx context.Context, size int, dur time.Duration) (sample, error) {
		ch := e.directKey("ch")
		p := payload(size, 1)
		return pubsubRun(ctx, pubs, subs, dur, "direct PUBLISH→SUBSCRIBE", func(ctx context.Context, i int, got func()) (func() error, error) {
			ps := e.direct.Subscribe(ctx, ch)
			if _, err := ps.Receive(ctx); err != nil {
				_ = ps.Close()
				return nil, err
			}
			errc := make(chan error, 1)
			var once sync.Once
			go func() {
				for {
					if _, err := ps.ReceiveMessage(ctx); err != nil {
						if ctx.Err() != nil || errors.Is(err, redis.ErrClosed) {
							err = nil
						}
						once.Do(func() { _ = ps.Close() })
						errc <- err
						return
					}
					got()
				}
			}()
			return func() error {
				once.Do(func() { _ = ps.Close() }) // ReceiveMessage ignores cancellation
				return <-errc
			}, nil
		}, func(ctx context.Context) error {
			return e.direct.Publish(ctx, ch, p).Err()
		})
	}
}
