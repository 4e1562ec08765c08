package server_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/broker"
)

func TestTaskTypeDeliveredAndCounted(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 10*time.Second)
	for _, tt := range []string{"generate_log_file", "parse_log_file", "parse_log_file", ""} {
		if _, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "tasks", Payload: []byte("p"), TaskType: tt}); err != nil {
			t.Fatal(err)
		}
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "tasks", MaxInFlight: 4})
	var got []string
	var ds []*qbridgev1.Delivery
	for i := 0; i < 4; i++ {
		d := s.next(t, 5*time.Second)
		got = append(got, d.GetTaskType())
		ds = append(ds, d)
	}
	if want := []string{"generate_log_file", "parse_log_file", "parse_log_file", ""}; !equal(got, want) {
		t.Fatalf("task types %v; want %v", got, want)
	}
	if err := ack(t, in.client, ds[0], ds[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{ds[2].GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER}); err != nil {
		t.Fatal(err)
	}
	st, err := in.client.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "tasks"})
	if err != nil {
		t.Fatal(err)
	}
	gen, parse := st.GetTaskTypes()["generate_log_file"], st.GetTaskTypes()["parse_log_file"]
	if len(st.GetTaskTypes()) != 2 || gen.GetEnqueued() != 1 || gen.GetAcked() != 1 ||
		parse.GetEnqueued() != 2 || parse.GetAcked() != 1 || parse.GetNacked() != 1 || parse.GetDeadLettered() != 1 {
		t.Fatalf("per task type counters: %v", st.GetTaskTypes())
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// A producer waits for the result; the ack wakes it (no polling), well
// before the wait runs out.
func TestGetResultWaitsForTheAck(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 20*time.Second)
	resp, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "rpc", Payload: []byte("2+2"), TaskType: "add", KeepResult: true})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetId()
	// No wait: not there yet.
	_, err = in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "rpc", Id: id})
	wantCode(t, err, codes.NotFound, "no result")

	type outcome struct {
		r   *qbridgev1.GetResultResponse
		err error
		at  time.Time
	}
	done := make(chan outcome, 1)
	go func() {
		r, err := in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "rpc", Id: id, Wait: durationpb.New(10 * time.Second)})
		done <- outcome{r, err, time.Now()}
	}()
	d := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "rpc"}).next(t, 5*time.Second)
	// Let the waiter subscribe; it must get the result whether it was
	// subscribed before the ack or reads it after subscribing.
	acked := time.Now()
	if _, err := in.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}, Results: map[string][]byte{d.GetAckToken(): []byte("4")}}); err != nil {
		t.Fatal(err)
	}
	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	if o.r.GetState() != qbridgev1.ResultState_RESULT_STATE_SUCCEEDED || string(o.r.GetResult()) != "4" || o.r.GetAttempts() != 1 || o.r.GetId() != id {
		t.Fatalf("result %v", o.r)
	}
	if lag := o.at.Sub(acked); lag > 2*time.Second {
		t.Fatalf("waiter got the result %v after the ack; it should be woken at once", lag)
	}
	// And without waiting now.
	r, err := in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "rpc", Id: id})
	if err != nil || string(r.GetResult()) != "4" {
		t.Fatalf("stored result: %v %v", r, err)
	}
	m, err := in.client.GetMessage(ctx, &qbridgev1.GetMessageRequest{Queue: "rpc", Id: id})
	if err != nil || m.GetState() != qbridgev1.MessageState_MESSAGE_STATE_SUCCEEDED {
		t.Fatalf("GetMessage after the ack: %v %v", m, err)
	}
}

func TestGetResultWaitTimesOut(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 10*time.Second)
	start := time.Now()
	_, err := in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "rpc", Id: "nobody", Wait: durationpb.New(500 * time.Millisecond)})
	wantCode(t, err, codes.NotFound, "no result")
	if el := time.Since(start); el < 450*time.Millisecond || el > 3*time.Second {
		t.Fatalf("waited %v; want about 500ms", el)
	}
	_, err = in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "rpc", Id: "x", Wait: durationpb.New(time.Hour)})
	wantCode(t, err, codes.InvalidArgument, "wait")
	_, err = in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "rpc"})
	wantCode(t, err, codes.InvalidArgument, "id is empty")
}

// Results are kept only when asked for (keep_result, or an ack with a
// result); failures and deaths of such messages are kept too; they expire.
func TestResultOutcomesAndExpiry(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{brokerOpts: []broker.Option{broker.WithResultRetention(time.Second)}})
	ctx := ctxT(t, 20*time.Second)
	enq := func(keep bool) string {
		r, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "out", Payload: []byte("x"), KeepResult: keep})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetId()
	}
	plain, kept, dropped, dead := enq(false), enq(true), enq(true), enq(true)
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "out", MaxInFlight: 4})
	ds := map[string]*qbridgev1.Delivery{}
	for i := 0; i < 4; i++ {
		d := s.next(t, 5*time.Second)
		ds[d.GetId()] = d
	}
	if err := ack(t, in.client, ds[plain], ds[kept]); err != nil {
		t.Fatal(err)
	}
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{ds[dropped].GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_DROP, Error: "bad input"}); err != nil {
		t.Fatal(err)
	}
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{ds[dead].GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER, Error: "poison"}); err != nil {
		t.Fatal(err)
	}
	get := func(id string) (*qbridgev1.GetResultResponse, error) {
		return in.client.GetResult(ctx, &qbridgev1.GetResultRequest{Queue: "out", Id: id})
	}
	if _, err := get(plain); err == nil {
		t.Fatal("a message acked without a result and without keep_result has a result")
	}
	for id, want := range map[string]struct {
		state qbridgev1.ResultState
		err   string
	}{
		kept:    {qbridgev1.ResultState_RESULT_STATE_SUCCEEDED, ""},
		dropped: {qbridgev1.ResultState_RESULT_STATE_FAILED, "bad input"},
		dead:    {qbridgev1.ResultState_RESULT_STATE_DEAD, "poison"},
	} {
		r, err := get(id)
		if err != nil || r.GetState() != want.state || r.GetError() != want.err {
			t.Fatalf("result of %s = %v, %v; want %v %q", id, r, err, want.state, want.err)
		}
	}
	eventually(t, 10*time.Second, "results forgotten after the 1s retention", func() bool {
		_, err := get(kept)
		return err != nil
	})
}

func TestGetMessageStates(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx := ctxT(t, 10*time.Second)
	state := func(id string) qbridgev1.MessageState {
		m, err := in.client.GetMessage(ctx, &qbridgev1.GetMessageRequest{Queue: "where", Id: id})
		if err != nil {
			t.Fatalf("GetMessage(%s): %v", id, err)
		}
		return m.GetState()
	}
	ids := enqueueN(t, in.client, "where", 3)
	later, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "where", Payload: []byte("later"), Delay: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if got := state(ids[2]); got != qbridgev1.MessageState_MESSAGE_STATE_READY {
		t.Fatalf("ready message: %v", got)
	}
	if got := state(later.GetId()); got != qbridgev1.MessageState_MESSAGE_STATE_DELAYED {
		t.Fatalf("delayed message: %v", got)
	}
	s := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "where", MaxInFlight: 1})
	d := s.next(t, 5*time.Second)
	if got := state(d.GetId()); got != qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT {
		t.Fatalf("in-flight message: %v", got)
	}
	if _, err := in.client.Nack(ctx, &qbridgev1.NackRequest{AckTokens: []string{d.GetAckToken()}, Action: qbridgev1.NackAction_NACK_ACTION_DEAD_LETTER}); err != nil {
		t.Fatal(err)
	}
	if got := state(d.GetId()); got != qbridgev1.MessageState_MESSAGE_STATE_DEAD {
		t.Fatalf("dead message: %v", got)
	}
	_, err = in.client.GetMessage(ctx, &qbridgev1.GetMessageRequest{Queue: "where", Id: "nope"})
	wantCode(t, err, codes.NotFound, "not in queue")
}

func TestTaskAndResultBadInput(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{brokerOpts: []broker.Option{broker.WithRawQueues(func(q string) bool { return q == "raw" })}})
	ctx := ctxT(t, 10*time.Second)
	_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "t", TaskType: "bad type"})
	wantCode(t, err, codes.InvalidArgument, "task_type")
	_, err = in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "raw", TaskType: "x"})
	wantCode(t, err, codes.InvalidArgument, "raw mode")
	enqueueN(t, in.client, "t", 1)
	d := consume(t, in.client, &qbridgev1.ConsumeRequest{Queue: "t"}).next(t, 5*time.Second)
	_, err = in.client.Ack(ctx, &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}, Results: map[string][]byte{"v1.other": []byte("r")}})
	wantCode(t, err, codes.InvalidArgument, "not in ack_tokens")
	if _, f := stats(t, in.client, "t"); f != 1 {
		t.Fatal("a refused ack settled the delivery")
	}
	_ = context.Background
}
