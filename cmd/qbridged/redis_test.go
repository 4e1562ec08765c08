package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// TestGracefulShutdownRequeues: on shutdown, a consumer that keeps holding
// unacked deliveries has its stream ended by the server, and its messages
// are back in the Redis list at once, not after their 1 minute lease.
// Health turns NOT_SERVING (seen on a Watch stream) as the shutdown begins.
// It also checks that the URL's database and the key prefix are used.
func TestGracefulShutdownRequeues(t *testing.T) {
	rs := redistest.Start(t)
	const db, prefix, queue = 5, "gs:", "drainq"
	d := startDaemon(t, []string{
		"--listen", "127.0.0.1:0",
		"--redis-url", rs.URL(db), "--plaintext",
		"--key-prefix", prefix,
		"--drain-timeout", "300ms",
	}, nil)
	cc := dial(t, d.addr)
	q := qbridgev1.NewQueueServiceClient(cc)
	ctx := rpcCtx(t)
	waitHealth(t, cc, healthpb.HealthCheckResponse_SERVING, 5*time.Second)

	for _, p := range []string{"a", "b", "c"} {
		if _, err := q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: []byte(p)}); err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
	}
	stream, err := q.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: 10, LeaseDuration: durationpb.New(time.Minute)})
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	recvDeliveries(t, stream, 3)

	rdb := rs.Client(t, db)
	ready, inflight := prefix+queue, "{"+prefix+queue+"}:qb:inflight"
	if n, err := rdb.HLen(ctx, inflight).Result(); err != nil || n != 3 {
		t.Fatalf("HLEN %s in db %d = %d %v before shutdown, want 3 (wrong db or prefix?)", inflight, db, n, err)
	}
	if n, err := rdb.LLen(ctx, ready).Result(); err != nil || n != 0 {
		t.Fatalf("LLEN %s = %d %v before shutdown, want 0", ready, n, err)
	}

	wctx, cancelWatch := context.WithCancel(ctx)
	defer cancelWatch()
	watch, err := healthpb.NewHealthClient(cc).Watch(wctx, &healthpb.HealthCheckRequest{Service: queueServiceName})
	if err != nil {
		t.Fatalf("health Watch: %v", err)
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health Watch first status %v %v, want SERVING", r, err)
	}

	stoppedAt := time.Now()
	d.cancel()
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health Watch status on shutdown %v %v, want NOT_SERVING", r, err)
	}
	cancelWatch() // or the graceful stop would wait for it

	// The server ends the stream; the client did not.
	for {
		if _, err := stream.Recv(); err != nil {
			wantCode(t, "Consume stream at the end of the drain", err, codes.Unavailable, "shutting down")
			break
		}
	}
	if err := d.stop(t); err != nil {
		t.Fatalf("run: %v, want nil", err)
	}
	if took := time.Since(stoppedAt); took > 15*time.Second {
		t.Errorf("shutdown took %v", took)
	}
	if n, err := rdb.LLen(ctx, ready).Result(); err != nil || n != 3 {
		t.Errorf("LLEN %s after shutdown = %d %v, want the 3 unacked messages back", ready, n, err)
	}
	if n, err := rdb.HLen(ctx, inflight).Result(); err != nil || n != 0 {
		t.Errorf("HLEN %s after shutdown = %d %v, want 0", inflight, n, err)
	}
	if n, _ := rs.Client(t, 0).DBSize(ctx).Result(); n != 0 {
		t.Errorf("db 0 has %d keys; everything should be in db %d", n, db)
	}
	logs := d.logs.String()
	order := []string{"health set to NOT_SERVING", "draining: new work refused", "drained; streams ended", "gRPC server stopped", "queue service stopped", "Redis clients closed"}
	last := -1
	for _, step := range order {
		i := strings.Index(logs, step)
		if i < last {
			t.Errorf("shutdown step %q missing or out of order; logs:\n%s", step, logs)
		}
		last = i
	}
}

// TestDrainWaitsForAcks specifies the drain (server.Drain, README
// "Shutdown"): while it lasts, health is NOT_SERVING and new work gets
// UNAVAILABLE, but consumers can still ack; a stream whose deliveries are
// all acked ends at once, and one that keeps holding deliveries ends at
// --drain-timeout, with its deliveries requeued.
func TestDrainWaitsForAcks(t *testing.T) {
	rs := redistest.Start(t)
	const queue, drain = "ackq", 3 * time.Second
	d := startDaemon(t, []string{
		"--listen", "127.0.0.1:0",
		"--redis-url", rs.URL(0), "--plaintext",
		"--drain-timeout", drain.String(),
	}, nil)
	cc := dial(t, d.addr)
	q := qbridgev1.NewQueueServiceClient(cc)
	ctx := rpcCtx(t)
	for _, p := range []string{"a", "b", "c", "d"} {
		if _, err := q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: []byte(p)}); err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
	}
	lease := durationpb.New(time.Minute)
	acker, err := q.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: 2, LeaseDuration: lease})
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	acked := recvDeliveries(t, acker, 2)
	holder, err := q.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: 2, LeaseDuration: lease})
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	recvDeliveries(t, holder, 2)

	stoppedAt := time.Now()
	d.cancel()
	eventually(t, 5*time.Second, "the drain to start", func() bool {
		return strings.Contains(d.logs.String(), "draining: new work refused")
	})
	if st, err := healthStatus(cc, queueServiceName); err != nil || st != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health during drain: %v %v, want NOT_SERVING", st, err)
	}
	_, err = q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: queue, Payload: []byte("late")})
	wantCode(t, "Enqueue during drain", err, codes.Unavailable, "shutting down")
	late, err := q.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: queue})
	if err == nil {
		_, err = late.Recv()
	}
	wantCode(t, "Consume during drain", err, codes.Unavailable, "shutting down")

	ack, err := q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{acked[0].GetAckToken(), acked[1].GetAckToken()}})
	if err != nil || ack.GetAcked() != 2 {
		t.Fatalf("Ack during drain: %v %v, want 2 acked", ack, err)
	}
	// The acker holds nothing now: its stream ends before the timeout.
	_, err = acker.Recv()
	wantCode(t, "the acker's stream", err, codes.Unavailable, "shutting down")
	if took := time.Since(stoppedAt); took >= drain {
		t.Errorf("the acker's stream ended %v after shutdown began, not right after its acks", took)
	}
	// The holder's stream lasts until the drain timeout.
	_, err = holder.Recv()
	wantCode(t, "the holder's stream", err, codes.Unavailable, "shutting down")
	if took := time.Since(stoppedAt); took < drain-100*time.Millisecond {
		t.Errorf("the holder's stream ended %v after shutdown began, before --drain-timeout %v", took, drain)
	}
	if err := d.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	st := rs.Client(t, 0)
	if n, _ := st.LLen(ctx, queue).Result(); n != 2 {
		t.Errorf("LLEN %s = %d after shutdown, want the holder's 2 deliveries back", queue, n)
	}
	if n, _ := st.HLen(ctx, "{"+queue+"}:qb:inflight").Result(); n != 0 {
		t.Errorf("%d deliveries still in flight after shutdown, want 0", n)
	}
}

// TestHealthFollowsRedis: qbridged starts while Redis is down (and cannot
// preload its scripts), reports NOT_SERVING, and recovers by itself each
// time Redis comes back; while Redis is down, calls fail with UNAVAILABLE.
func TestHealthFollowsRedis(t *testing.T) {
	rs := redistest.Start(t)
	rs.Stop(t)
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--redis-url", rs.URL(0), "--plaintext"}, nil)
	if !strings.Contains(d.logs.String(), "cannot preload Lua scripts") {
		t.Errorf("no warning about the failed script preload; logs:\n%s", d.logs)
	}
	cc := dial(t, d.addr)
	q := qbridgev1.NewQueueServiceClient(cc)
	ctx := rpcCtx(t)
	waitHealth(t, cc, healthpb.HealthCheckResponse_NOT_SERVING, 5*time.Second)

	// Redis comes up: the service recovers without a restart, and the
	// scripts it never loaded run (EVAL fallback).
	rs.Restart(t)
	waitHealth(t, cc, healthpb.HealthCheckResponse_SERVING, 10*time.Second)
	roundtrip := func(payload string) {
		t.Helper()
		if _, err := q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "hq", Payload: []byte(payload)}); err != nil {
			t.Fatalf("Enqueue with Redis up: %v", err)
		}
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := q.Consume(cctx, &qbridgev1.ConsumeRequest{Queue: "hq"})
		if err != nil {
			t.Fatalf("Consume: %v", err)
		}
		ds := recvDeliveries(t, stream, 1)
		if string(ds[0].GetPayload()) != payload {
			t.Fatalf("got %q, want %q", ds[0].GetPayload(), payload)
		}
		if _, err := q.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{ds[0].GetAckToken()}}); err != nil {
			t.Fatalf("Ack: %v", err)
		}
	}
	roundtrip("first")

	// Redis goes away.
	rs.Stop(t)
	waitHealth(t, cc, healthpb.HealthCheckResponse_NOT_SERVING, 10*time.Second)
	_, err := q.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "hq", Payload: []byte("lost")})
	wantCode(t, "Enqueue with Redis down", err, codes.Unavailable, "redis unavailable")

	// And comes back.
	rs.Restart(t)
	waitHealth(t, cc, healthpb.HealthCheckResponse_SERVING, 10*time.Second)
	roundtrip("second")

	logs := d.logs.String()
	if w := strings.Count(logs, "Redis unreachable; health NOT_SERVING"); w != 2 {
		t.Errorf("logged %d unreachable transitions, want 2 (once per outage); logs:\n%s", w, logs)
	}
	if !strings.Contains(logLine(logs, "Redis unreachable; health NOT_SERVING"), "level=WARN") {
		t.Errorf("unreachable transition not at WARN")
	}
	if r := strings.Count(logs, "Redis reachable again; health SERVING"); r != 2 {
		t.Errorf("logged %d recoveries, want 2; logs:\n%s", r, logs)
	}
	if err := d.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
}
