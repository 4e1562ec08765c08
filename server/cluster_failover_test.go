package server_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/broker"
)

// failoverReloadInterval is the ClusterStateReloadInterval of the
// instances of TestClusterFailover. go-redis reloads its slot map on a
// MOVED/ASK reply or when the map is older than this (default 60 s); a
// SIGKILLed master answers nothing (connection refused), so without a
// short interval the clients keep sending a failed-over slot's commands
// to the dead node for up to a minute after the promotion. qbridged sets
// the same 1 s (clusterReloadInterval in cmd/qbridged/topology.go).
const failoverReloadInterval = time.Second

// startOnCluster runs a qbridge server on c like startOn does, but with
// clients made by redis.NewClusterClient from c.ServiceOptions() (the
// service user), with failoverReloadInterval.
func startOnCluster(t *testing.T, c *redistest.Cluster) *topoInstance {
	t.Helper()
	mk := func(pool int) redis.UniversalClient {
		o := c.ServiceOptions()
		o.DialTimeout = time.Second
		o.ContextTimeoutEnabled = true
		o.DisableIdentity = true // no CLIENT SETINFO: the ACL does not allow it
		o.PoolSize = pool
		o.ClusterStateReloadInterval = failoverReloadInterval
		return redis.NewClusterClient(o)
	}
	return serveOn(t, mk(0), mk(server.DefaultBlockingWaits+2), nil)
}

// queueLoad is the bookkeeping of one queue under load.
type queueLoad struct {
	q        string
	acked    map[string]time.Time // enqueues that returned OK, and when
	received map[string]int       // deliveries per id
	enqErrs  int
	ackErrs  int
	streams  int // Consume streams opened
	lastErr  error
}

// TestClusterFailover SIGKILLs one master of a Redis Cluster with a
// replica per master, under a light load of enqueues and consumes on
// three queues (one per master, one of them on the killed master), through
// two qbridge instances. It checks that a replica is promoted and that
// every queue takes enqueues and delivers again within a bound, and that
// every enqueue acknowledged after the promotion (and every enqueue to a
// queue on a master that was not killed) is delivered. Replication is
// asynchronous: enqueues the killed master acknowledged just before it
// died may be lost; they are counted and logged, not forbidden.
func TestClusterFailover(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, redistest.WithReplicas(1))
	tp := &topology{name: "cluster", admin: c.Client(t), cluster: c}
	qs := tp.spread(t, "failover", redistest.ClusterSize) // one queue per master
	prod := startOnCluster(t, c)
	cons := startOnCluster(t, c)
	victimQ := qs[0]
	victimKey := broker.NewKeys("").Ready(victimQ)
	const recoveryBound = 20 * time.Second
	const enqueueEvery = 20 * time.Millisecond // per queue: 3 x 50/s

	var mu sync.Mutex
	loads := make([]*queueLoad, len(qs))
	for i, q := range qs {
		loads[i] = &queueLoad{q: q, acked: map[string]time.Time{}, received: map[string]int{}}
	}
	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	// Cancelled with stop, so that a consumer waiting in Recv on an idle
	// queue returns.
	loadCtx, loadCancel := context.WithCancel(context.Background())
	stopLoad := func() {
		if !stopped() {
			close(stop)
		}
		loadCancel()
	}
	var wg sync.WaitGroup
	for _, l := range loads {
		wg.Add(2)
		go func() { // producer
			defer wg.Done()
			tick := time.NewTicker(enqueueEvery)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				r, err := prod.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: l.q, Payload: []byte(fmt.Sprint(i))})
				cancel()
				mu.Lock()
				if err != nil {
					l.enqErrs++
					l.lastErr = err
				} else {
					l.acked[r.GetId()] = time.Now()
				}
				mu.Unlock()
			}
		}()
		go func() { // consumer: acks everything, reopens its stream when it ends
			defer wg.Done()
			for !stopped() {
				ctx, cancel := context.WithCancel(loadCtx)
				mu.Lock()
				l.streams++
				mu.Unlock()
				st, err := cons.client.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: l.q, MaxInFlight: 16, LeaseDuration: lease(2 * time.Second)})
				for err == nil && !stopped() {
					var resp *qbridgev1.ConsumeResponse
					if resp, err = st.Recv(); err != nil {
						break
					}
					toks := make([]string, 0, len(resp.GetDeliveries()))
					mu.Lock()
					for _, d := range resp.GetDeliveries() {
						l.received[d.GetId()]++
						toks = append(toks, d.GetAckToken())
					}
					mu.Unlock()
					actx, acancel := context.WithTimeout(context.Background(), 2*time.Second)
					_, aerr := cons.client.Ack(actx, &qbridgev1.AckRequest{AckTokens: toks})
					acancel()
					if aerr != nil { // unacked: their leases run out and they come back
						mu.Lock()
						l.ackErrs++
						mu.Unlock()
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
	}
	t.Cleanup(func() {
		stopLoad()
		wg.Wait()
	})

	eventually(t, 15*time.Second, "a steady flow on every queue before the kill", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, l := range loads {
			if len(l.acked) < 50 || len(l.received) < 25 {
				return false
			}
		}
		return true
	})

	killedAt := time.Now()
	victim := c.KillMasterOf(t, victimKey)
	promoted := c.WaitPromotion(t, victimKey, victim)
	promotedAt := time.Now()

	// Recovered: on every queue, an enqueue acknowledged after the
	// promotion has been delivered.
	recoveredAt := make([]time.Time, len(loads))
	eventually(t, recoveryBound-time.Since(killedAt), "every queue enqueues and delivers after the failover", func() bool {
		mu.Lock()
		defer mu.Unlock()
		done := true
		for i, l := range loads {
			if !recoveredAt[i].IsZero() {
				continue
			}
			for id, at := range l.acked {
				if at.After(promotedAt) && l.received[id] > 0 {
					recoveredAt[i] = time.Now()
					break
				}
			}
			done = done && !recoveredAt[i].IsZero()
		}
		return done
	})
	// Some more load on the new master, then stop and drain.
	mu.Lock()
	base := len(loads[0].acked)
	mu.Unlock()
	eventually(t, 10*time.Second, "load on the new master", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(loads[0].acked) >= base+100
	})
	stopLoad()
	wg.Wait()
	for _, l := range loads {
		drain := consume(t, cons.client, &qbridgev1.ConsumeRequest{Queue: l.q, MaxInFlight: 100, LeaseDuration: lease(10 * time.Second)})
		eventually(t, 15*time.Second, l.q+" drained", func() bool {
			for {
				select {
				case d := <-drain.ch:
					mu.Lock()
					l.received[d.GetId()]++
					mu.Unlock()
					if err := ack(t, cons.client, d); err != nil {
						return false
					}
					continue
				default:
				}
				break
			}
			r := fullStats(t, cons.client, l.q)
			return r.GetReady() == 0 && r.GetInFlight() == 0 && r.GetDelayed() == 0 && len(drain.ch) == 0
		})
		drain.cancel()
	}

	mu.Lock()
	defer mu.Unlock()
	t.Logf("failover of %s (node %d -> node %d): promoted and cluster ok %v after the kill",
		victimQ, victim, promoted, promotedAt.Sub(killedAt).Round(time.Millisecond))
	for i, l := range loads {
		var lost []string
		dup, duringOutage := 0, 0
		for id, at := range l.acked {
			if l.received[id] == 0 {
				lost = append(lost, id)
			}
			if at.After(killedAt) && at.Before(promotedAt) {
				duringOutage++
			}
		}
		for _, n := range l.received {
			if n > 1 {
				dup++
			}
		}
		sort.Strings(lost)
		role := "on a surviving master"
		if i == 0 {
			role = "on the killed master"
		}
		t.Logf("%s (%s): service back %v after the kill; %d enqueues acknowledged (%d during the outage), %d lost, "+
			"%d delivered more than once; %d enqueue errors (last: %v), %d failed acks, %d consume streams opened",
			l.q, role, recoveredAt[i].Sub(killedAt).Round(time.Millisecond), len(l.acked), duringOutage, len(lost),
			dup, l.enqErrs, l.lastErr, l.ackErrs, l.streams)
		for _, id := range lost {
			at := l.acked[id]
			switch {
			case i != 0:
				t.Errorf("%s: %s acknowledged at %v (kill at %v) by a master that was not killed, and lost", l.q, id, at, killedAt)
			case at.After(promotedAt):
				t.Errorf("%s: %s acknowledged after the promotion (%v) and lost", l.q, id, at)
			}
		}
	}
}
