package server_test

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/broker"
)

// Live resharding: a queue's slot moves from one master to another
// (redistest's MigrateSlot: IMPORTING, MIGRATING, MIGRATE batch by
// batch, NODE) while qbridge is under load. Every key of a queue is in
// one slot, and every script of a queue declares all of them, the queue's
// pause flag among them, which normally does not exist; so while the
// slot migrates, Redis answers the queue's scripts -TRYAGAIN (some keys
// here, some not) or -ASK then, after ASKING, -TRYAGAIN (none here, not
// all there): for the whole window the queue can neither take enqueues
// nor deliver, and calls must fail with UNAVAILABLE, retryable, and lose
// nothing. Single-key commands (stats, lease extension) follow -ASK to the
// target and work throughout.

// Phases of TestClusterSlotMigration; every call is counted under the
// phase it started in.
const (
	migBefore    = iota // the slot is stable on the source
	migMarked           // IMPORTING and MIGRATING being set or set, no key moved
	migSplit            // some keys moved, some not
	migMoved            // every key moved, the slot still migrating
	migFinishing        // CLUSTER SETSLOT NODE being sent to the masters
	migAfter            // the target owns the slot
	migDrain            // producers stopped, consumers drain the queues
	migPhases
)

var migPhaseNames = [migPhases]string{"before", "marked", "split (half-migrated)", "moved (all keys, slot not yet NODE)",
	"finishing (NODE)", "after", "drain"}

// migInWindow reports whether phase p is part of the migration window.
func migInWindow(p int32) bool { return p >= migMarked && p <= migFinishing }

// migOutcomes counts the results of calls by phase, operation and outcome
// (a gRPC code, with stale-lease acks apart), keeping a sample message
// of each operation and outcome.
type migOutcomes struct {
	mu     sync.Mutex
	n      map[migOutcomeKey]int
	sample map[[2]string]string
}

type migOutcomeKey struct {
	phase   int32
	op, out string
}

// migStaleLease is the outcome of an Ack or ExtendLease refused because the
// lease ran out (FAILED_PRECONDITION, a legitimate answer).
const migStaleLease = "FailedPrecondition(stale lease)"

func migOutcomeOf(err error) string {
	if err == nil {
		return "OK"
	}
	if err == io.EOF {
		return "EOF"
	}
	st := status.Convert(err)
	if st.Code() == codes.FailedPrecondition && strings.Contains(st.Message(), "no longer hold a lease") {
		return migStaleLease
	}
	return st.Code().String()
}

func (o *migOutcomes) record(phase int32, op string, err error) string {
	out := migOutcomeOf(err)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.n[migOutcomeKey{phase, op, out}]++
	if err != nil {
		if _, ok := o.sample[[2]string{op, out}]; !ok {
			o.sample[[2]string{op, out}] = status.Convert(err).Message()
		}
	}
	return out
}

func (o *migOutcomes) count(phase int32, op string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for k, v := range o.n {
		if k.phase == phase && k.op == op {
			n += v
		}
	}
	return n
}

// migQueue is the bookkeeping of one queue under load.
type migQueue struct {
	q string
	// allowed are the migOutcomes its calls may have (any phase).
	allowed map[string]bool

	tried     map[string]bool      // ids of every enqueue attempted
	acked     map[string]int32     // ids of acknowledged enqueues -> phase
	delivered map[string]int       // deliveries per id
	ackedOK   map[string]int       // successful acks per id
	stale     map[string]int       // acks refused as stale per id
	at        map[string]time.Time // first delivery of each id
}

func newMigQueue(q string, allowed ...string) *migQueue {
	l := &migQueue{q: q, allowed: map[string]bool{"OK": true}, tried: map[string]bool{}, acked: map[string]int32{},
		delivered: map[string]int{}, ackedOK: map[string]int{}, stale: map[string]int{}, at: map[string]time.Time{}}
	for _, a := range allowed {
		l.allowed[a] = true
	}
	return l
}

// TestClusterSlotMigration moves a queue's slot between masters of a
// three-master Cluster under a steady load of enqueues (with ids),
// consumes and acks through two qbridge instances, holding the slot in
// each state of the migration (marked, half-migrated, all keys moved but
// not yet reassigned) until perPhase enqueues were attempted in it. A
// second queue on the same source master, in a slot that stays, shares
// the instances' coalesced pipelines with it (more callers per instance
// than coalescing slots, so that calls wait and go together). It checks
// that:
//
//   - calls on the moving queue succeed or fail with UNAVAILABLE (acks
//     also with a stale lease), in every phase; those on the other queue
//     all succeed;
//   - every acknowledged enqueue is delivered, no message is delivered
//     twice with both deliveries acked (a duplicate copy), and the
//     duplicates are counted;
//   - Consume streams go on or end with UNAVAILABLE (and are reopened,
//     as the Go client's Worker does); a stream holding seven messages
//     through the migration keeps them: acks of two of them tried in each
//     held state succeed or fail with UNAVAILABLE, and every one not acked
//     then is acked afterwards with its token, through the other instance;
//   - a delayed message that falls due during the migration, and one due
//     later, are delivered, not early;
//   - a Subscribe stream lives through it and receives a Publish after;
//   - afterwards the target owns the slot and the source holds none of
//     its keys.
func TestClusterSlotMigration(t *testing.T) {
	t.Parallel()
	began := time.Now()
	c := redistest.StartCluster(t)
	keys := broker.NewKeys("")
	mig := newMigQueue("migrating", "Unavailable", migStaleLease)
	slot := broker.Slot(keys.Ready(mig.q))
	from := c.NodeOf(t, keys.Ready(mig.q))
	to := (from + 1) % redistest.ClusterSize
	var by *migQueue // a queue on the same master whose slot stays
	for i := 0; by == nil; i++ {
		q := fmt.Sprintf("bystander-%d", i)
		if broker.Slot(keys.Ready(q)) != slot && c.NodeOf(t, keys.Ready(q)) == from {
			by = newMigQueue(q)
		}
	}
	insts := []*topoInstance{startOnCluster(t, c), startOnCluster(t, c)}
	a, b := insts[0], insts[1]

	const (
		// 8 producers per instance, 4 coalescing slots (the default).
		migProducers = 12
		byProducers  = 4
		enqueueEvery = 40 * time.Millisecond // per producer: 400 enqueues/s in all
		perPhase     = 100                   // enqueues of the moving queue attempted in each held state
		loadLease    = 10 * time.Second      // longer than the migration
		callTimeout  = 5 * time.Second
	)

	var phase atomic.Int32
	rec := &migOutcomes{n: map[migOutcomeKey]int{}, sample: map[[2]string]string{}}
	var mu sync.Mutex // guards the migQueue maps
	// Producers stop first; consumers go on until the queues are drained.
	stopProducers, stopConsumers := make(chan struct{}), make(chan struct{})
	closed := func(ch chan struct{}) bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}
	consumeCtx, consumeCancel := context.WithCancel(context.Background())
	var prodWG, wg sync.WaitGroup
	stopAll := func() {
		if !closed(stopProducers) {
			close(stopProducers)
		}
		prodWG.Wait()
		if !closed(stopConsumers) {
			close(stopConsumers)
		}
		consumeCancel()
		wg.Wait()
	}
	t.Cleanup(stopAll)

	// ackOne acks one delivery through in, retrying on UNAVAILABLE until
	// it is acked, refused, or its lease is over.
	ackOne := func(l *migQueue, in *topoInstance, d *qbridgev1.Delivery) {
		defer wg.Done()
		giveUp := time.Now().Add(loadLease)
		for {
			ph := phase.Load()
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			_, err := in.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}})
			cancel()
			out := rec.record(ph, l.q+" ack", err)
			mu.Lock()
			switch out {
			case "OK":
				l.ackedOK[d.GetId()]++
			case migStaleLease:
				l.stale[d.GetId()]++
			}
			mu.Unlock()
			if out != "Unavailable" || time.Now().After(giveUp) {
				return
			}
			time.Sleep(50 * time.Millisecond) // retry backoff, not synchronisation
		}
	}
	deliver := func(l *migQueue, ds []*qbridgev1.Delivery) {
		mu.Lock()
		defer mu.Unlock()
		for _, d := range ds {
			if l.delivered[d.GetId()] == 0 {
				l.at[d.GetId()] = time.Now()
			}
			l.delivered[d.GetId()]++
		}
	}

	for _, l := range []*migQueue{mig, by} {
		n := migProducers
		if l == by {
			n = byProducers
		}
		for p := range n {
			in := insts[p%2]
			prodWG.Add(1)
			go func() { // producer: enqueues with its own ids
				defer prodWG.Done()
				tick := time.NewTicker(enqueueEvery)
				defer tick.Stop()
				for i := 0; ; i++ {
					select {
					case <-stopProducers:
						return
					case <-tick.C:
					}
					id := fmt.Sprintf("%s-p%d-%d", l.q, p, i)
					ph := phase.Load()
					ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
					_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: l.q, Id: id, Payload: []byte(id)})
					cancel()
					rec.record(ph, l.q+" enqueue", err)
					mu.Lock()
					l.tried[id] = true
					if err == nil {
						l.acked[id] = ph
					}
					mu.Unlock()
				}
			}()
		}
		for ci := range 2 {
			in := insts[ci%2]
			wg.Add(1)
			go func() { // consumer: acks each delivery, reopens its stream when it ends
				defer wg.Done()
				for !closed(stopConsumers) {
					ctx, cancel := context.WithCancel(consumeCtx)
					ph := phase.Load()
					st, err := in.client.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: l.q, MaxInFlight: 16, LeaseDuration: lease(loadLease)})
					for err == nil {
						var resp *qbridgev1.ConsumeResponse
						if resp, err = st.Recv(); err != nil {
							break
						}
						deliver(l, resp.GetDeliveries())
						for _, d := range resp.GetDeliveries() {
							wg.Add(1)
							go ackOne(l, in, d)
						}
						ph = phase.Load()
					}
					cancel()
					if closed(stopConsumers) {
						return
					}
					rec.record(ph, l.q+" consume stream end", err)
					select {
					case <-stopConsumers:
						return
					case <-time.After(50 * time.Millisecond): // reopen backoff, not synchronisation
					}
				}
			}()
		}
	}

	eventually(t, 15*time.Second, "a steady flow on both queues", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(mig.acked) >= 100 && len(mig.ackedOK) >= 50 && len(by.acked) >= 50 && len(by.ackedOK) >= 25
	})

	// A stream that holds messages through the migration: the first with
	// its lease extended throughout, two more acked (one attempt each) in
	// each held state; all acked afterwards through the other instance,
	// if still unacked, with their tokens.
	holder := consume(t, b.client, &qbridgev1.ConsumeRequest{Queue: mig.q, MaxInFlight: 7, LeaseDuration: lease(time.Minute)})
	var helds []*qbridgev1.Delivery
	for range 7 {
		helds = append(helds, holder.next(t, 10*time.Second))
	}
	deliver(mig, helds)
	held := helds[0]
	ackHeld := func(ph int32, d *qbridgev1.Delivery) error {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		r, err := a.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}})
		if err == nil && r.GetAcked() != 1 {
			err = fmt.Errorf("acked %d", r.GetAcked())
		}
		if ph >= 0 {
			rec.record(ph, mig.q+" ack of a held message", err)
		}
		if err == nil {
			mu.Lock()
			mig.ackedOK[d.GetId()]++
			mu.Unlock()
		}
		return err
	}
	heldAcked := map[string]bool{}
	ackHeldPair := func(ph int32) {
		for _, d := range helds[1+2*(ph-migMarked) : 3+2*(ph-migMarked)] {
			heldAcked[d.GetId()] = ackHeld(ph, d) == nil
		}
	}
	// A Subscribe stream (classic pub/sub is not bound to slots).
	const channel = "migration-news"
	sub := subscribe(t, a.client, &qbridgev1.SubscribeRequest{Channels: []string{channel}})
	if _, err := b.client.Publish(ctxT(t, callTimeout), &qbridgev1.PublishRequest{Channel: channel, Payload: []byte("before")}); err != nil {
		t.Fatal(err)
	}
	if m := sub.next(t); string(m.GetPayload()) != "before" {
		t.Fatalf("subscriber got %v", m)
	}
	// Delayed messages: one falls due while the slot migrates (the hold
	// of the first state waits for it), one later.
	delayed := map[string]time.Time{}
	for _, d := range []struct {
		id    string
		delay time.Duration
	}{{"delayed-during", 300 * time.Millisecond}, {"delayed-after", 6 * time.Second}} {
		due := time.Now().Add(d.delay)
		if _, err := a.client.Enqueue(ctxT(t, callTimeout), &qbridgev1.EnqueueRequest{Queue: mig.q, Id: d.id,
			Payload: []byte(d.id), Delay: durationpb.New(d.delay)}); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		mig.tried[d.id], mig.acked[d.id] = true, migBefore
		mu.Unlock()
		delayed[d.id] = due
	}

	// Lease extensions and stats of the moving queue throughout: single-key
	// commands, which follow -ASK.
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopConsumers:
				return
			case <-tick.C:
			}
			ph := phase.Load()
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			_, err := a.client.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: mig.q})
			rec.record(ph, mig.q+" stats", err)
			if ph < migAfter {
				_, err = a.client.ExtendLease(ctx, &qbridgev1.ExtendLeaseRequest{AckTokens: []string{held.GetAckToken()}, LeaseDuration: lease(time.Minute)})
				rec.record(ph, mig.q+" extend lease", err)
			}
			cancel()
		}
	}()

	// The migration, held in each state until perPhase enqueues of the
	// moving queue were attempted in it.
	src, dst := c.Node(from).Client(t, 0), c.Node(to).Client(t, 0)
	hold := func(ph int32, extra func() bool) {
		phase.Store(ph)
		ackHeldPair(ph)
		eventually(t, 30*time.Second, fmt.Sprintf("%d enqueues attempted while %s", perPhase, migPhaseNames[ph]), func() bool {
			return rec.count(ph, mig.q+" enqueue") >= perPhase && (extra == nil || extra())
		})
	}
	var windowEnd time.Time
	var splitSeen bool
	var splitSrc, splitDst int64
	phase.Store(migMarked)
	windowStart := time.Now()
	c.MigrateSlot(t, slot, to, redistest.WithMigrateBatch(3), redistest.WithMigrateHook(func(p redistest.MigrateProgress) {
		switch p.Step {
		case redistest.MigrateMarked:
			hold(migMarked, func() bool { return time.Now().After(delayed["delayed-during"].Add(200 * time.Millisecond)) })
		case redistest.MigrateBatch:
			if splitSeen || p.Left == 0 {
				return
			}
			splitSeen = true
			ctx := ctxT(t, callTimeout)
			var err error
			if splitSrc, err = src.ClusterCountKeysInSlot(ctx, slot).Result(); err != nil {
				t.Fatal(err)
			}
			if splitDst, err = dst.ClusterCountKeysInSlot(ctx, slot).Result(); err != nil {
				t.Fatal(err)
			}
			hold(migSplit, nil)
		case redistest.MigrateMoved:
			hold(migMoved, nil)
			phase.Store(migFinishing)
		case redistest.MigrateDone:
			windowEnd = time.Now()
			phase.Store(migAfter)
		}
	}))
	if !splitSeen {
		t.Errorf("the slot was never half-migrated (every key moved in the first batch)")
	}
	if splitSrc == 0 || splitDst == 0 {
		t.Errorf("half-migrated: %d keys of slot %d on the source, %d on the target; want some on both", splitSrc, slot, splitDst)
	}

	// The slot is the target's, and the source has none of its keys.
	ctx := ctxT(t, 10*time.Second)
	if got := c.NodeOf(t, keys.Ready(mig.q)); got != to {
		t.Errorf("slot %d is served by node %d after the migration, want %d", slot, got, to)
	}
	if n, err := src.ClusterCountKeysInSlot(ctx, slot).Result(); err != nil || n != 0 {
		t.Errorf("the source still holds %d keys of slot %d (%v)", n, slot, err)
	}
	var onTarget []string
	for _, k := range append(queueKeys(keys, mig.q), keys.Ready(mig.q)) {
		if ks, err := dst.ClusterKeySlot(ctx, k).Result(); err != nil || int(ks) != slot {
			t.Errorf("%s: CLUSTER KEYSLOT %d (%v), want %d", k, ks, err, slot)
		}
		if n, err := dst.Exists(ctx, k).Result(); err != nil {
			t.Errorf("EXISTS %s on the target: %v", k, err)
		} else if n == 1 {
			onTarget = append(onTarget, k)
		}
	}
	if n, err := dst.ClusterCountKeysInSlot(ctx, slot).Result(); err != nil || int(n) != len(onTarget) {
		t.Errorf("the target holds %d keys of slot %d (%v), of which %d are the queue's", n, slot, err, len(onTarget))
	}

	// Service is back: enqueues acknowledged after the migration are
	// delivered and acked.
	eventually(t, 15*time.Second, "enqueues and deliveries on the moved queue", func() bool {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for id, ph := range mig.acked {
			if ph == migAfter && mig.ackedOK[id] > 0 {
				n++
			}
		}
		return n >= 100
	})
	recoveredAt := time.Now()
	// The messages held through the migration (those not acked in the
	// window) are acked through the other instance with their tokens.
	select {
	case err := <-holder.errc:
		t.Errorf("the stream holding %d messages through the migration ended: %v", len(helds), err)
	default:
	}
	unacked := 0
	for _, d := range helds {
		if heldAcked[d.GetId()] {
			continue
		}
		unacked++
		if err := ackHeld(-1, d); err != nil {
			t.Errorf("ack of %s, held through the migration, afterwards: %v", d.GetId(), err)
		}
	}
	t.Logf("%d of %d messages held through the migration were acked afterwards with their tokens", unacked, len(helds))
	holder.cancel()
	// The subscriber lived through it.
	if _, err := b.client.Publish(ctxT(t, callTimeout), &qbridgev1.PublishRequest{Channel: channel, Payload: []byte("after")}); err != nil {
		t.Errorf("publish after the migration: %v", err)
	} else if m := sub.next(t); string(m.GetPayload()) != "after" {
		t.Errorf("subscriber got %v after the migration", m)
	}

	// Producers stop; the consumers drain both queues (the later delayed
	// message included), then stop.
	close(stopProducers)
	prodWG.Wait()
	phase.Store(migDrain)
	drainBy := time.Now().Add(3 * loadLease)
	var left []string
	for _, l := range []*migQueue{mig, by} {
		for {
			r, err := b.client.GetQueueStats(ctxT(t, callTimeout), &qbridgev1.GetQueueStatsRequest{Queue: l.q})
			if err == nil && r.GetReady() == 0 && r.GetInFlight() == 0 && r.GetDelayed() == 0 && r.GetDead() == 0 {
				break
			}
			if time.Now().After(drainBy) {
				left = append(left, fmt.Sprintf("%s: %v, %v", l.q, r, err))
				break
			}
			time.Sleep(20 * time.Millisecond) // polling interval
		}
	}
	stopAll()
	for _, s := range left {
		t.Errorf("not drained within %v: %s", 3*loadLease, s)
	}

	mu.Lock()
	defer mu.Unlock()
	t.Logf("slot %d of %q moved from node %d to node %d under load: window %v (SETSLOT IMPORTING to NODE on every master); "+
		"half-migrated with %d keys on the source, %d on the target; %d keys on the target after; "+
		"%v from the end of the window until 100 new enqueues were delivered and acked; test %v",
		slot, mig.q, from, to, windowEnd.Sub(windowStart).Round(time.Millisecond), splitSrc, splitDst, len(onTarget),
		recoveredAt.Sub(windowEnd).Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
	for _, id := range []string{"delayed-during", "delayed-after"} {
		due := delayed[id]
		switch at, ok := mig.at[id]; {
		case !ok:
			t.Errorf("delayed message %s (due %v) not delivered", id, due.Format(time.StampMilli))
		case at.Before(due.Add(-50 * time.Millisecond)):
			t.Errorf("delayed message %s delivered at %v, before it was due at %v", id, at.Format(time.StampMilli), due.Format(time.StampMilli))
		default:
			when := "after the migration"
			if due.Before(windowEnd) {
				when = "during the migration"
			}
			t.Logf("delayed message %s fell due %s, delivered %v after the window", id, when, at.Sub(windowEnd).Round(time.Millisecond))
		}
	}

	// Outcomes, by operation and phase (the phase a call started in).
	type row struct {
		k migOutcomeKey
		n int
	}
	var rows []row
	for k, n := range rec.n {
		rows = append(rows, row{k, n})
	}
	sort.Slice(rows, func(i, j int) bool {
		x, y := rows[i].k, rows[j].k
		if x.op != y.op {
			return x.op < y.op
		}
		if x.phase != y.phase {
			return x.phase < y.phase
		}
		return x.out < y.out
	})
	var table strings.Builder
	for _, r := range rows {
		fmt.Fprintf(&table, "  %-34s %-36s %-32s %6d\n", r.k.op, migPhaseNames[r.k.phase], r.k.out, r.n)
	}
	t.Logf("calls by operation, phase they started in, and outcome:\n%s", table.String())
	var samples []string
	for k, msg := range rec.sample {
		samples = append(samples, fmt.Sprintf("%s, %s: %s", k[0], k[1], msg))
	}
	sort.Strings(samples)
	t.Logf("a message of each failure:\n  %s", strings.Join(samples, "\n  "))
	for _, r := range rows {
		l := mig
		if strings.HasPrefix(r.k.op, by.q+" ") {
			l = by
		}
		allowed := l.allowed[r.k.out]
		switch {
		case strings.HasSuffix(r.k.op, " consume stream end"):
			allowed = r.k.out == "Unavailable" && l == mig
		case strings.HasSuffix(r.k.op, " enqueue"), strings.HasSuffix(r.k.op, " stats"):
			allowed = allowed && r.k.out != migStaleLease
		}
		if !allowed {
			t.Errorf("%s, %s: %d calls ended with %s: %s", r.k.op, migPhaseNames[r.k.phase], r.n, r.k.out, rec.sample[[2]string{r.k.op, r.k.out}])
		}
	}

	// Messages.
	for _, l := range []*migQueue{mig, by} {
		var lost, twiceAcked, phantom []string
		dupIDs, extra, ghosts, unconfirmed, inWin := 0, 0, 0, 0, 0
		for id, ph := range l.acked {
			if l.delivered[id] == 0 {
				lost = append(lost, id)
			}
			if migInWindow(ph) {
				inWin++
			}
		}
		for id, n := range l.delivered {
			if n > 1 {
				dupIDs++
				extra += n - 1
			}
			if l.ackedOK[id] > 1 {
				twiceAcked = append(twiceAcked, fmt.Sprintf("%s (delivered %d, acked %d, stale %d)", id, n, l.ackedOK[id], l.stale[id]))
			}
			if l.ackedOK[id] == 0 {
				unconfirmed++ // settled (the queue is empty), but no ack of it returned OK
			}
			if _, ok := l.acked[id]; !ok {
				if l.tried[id] {
					ghosts++ // its enqueue failed, but it was written
				} else {
					phantom = append(phantom, id)
				}
			}
		}
		stale := 0
		for _, n := range l.stale {
			stale += n
		}
		sort.Strings(lost)
		sort.Strings(twiceAcked)
		sort.Strings(phantom)
		t.Logf("%s: %d enqueues attempted, %d acknowledged (%d of them started during the window), %d lost; "+
			"%d ids delivered more than once (%d extra deliveries), %d delivered and acked more than once; "+
			"%d acks refused as stale; %d delivered though their enqueue failed; %d settled without an ack that returned OK",
			l.q, len(l.tried), len(l.acked), inWin, len(lost), dupIDs, extra, len(twiceAcked), stale, ghosts, unconfirmed)
		if len(lost) > 0 {
			t.Errorf("%s: %d acknowledged enqueues never delivered: %v", l.q, len(lost), migHead(lost, 10))
		}
		if len(twiceAcked) > 0 {
			t.Errorf("%s: %d messages were in the queue more than once (each delivery acked): %v", l.q, len(twiceAcked), migHead(twiceAcked, 10))
		}
		if len(phantom) > 0 {
			t.Errorf("%s: %d deliveries of ids never enqueued: %v", l.q, len(phantom), migHead(phantom, 10))
		}
	}
}

func migHead(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("... %d more", len(s)-n))
	}
	return s
}
