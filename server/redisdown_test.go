package server_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// Regression (chaos suite, Redis hung by SIGSTOP): while the health check
// finds Redis unreachable, writes fail at once with UNAVAILABLE naming the
// reason, instead of each waiting on Redis until its deadline; they work
// again as soon as it is cleared.
func TestRedisDownFailsFast(t *testing.T) {
	rs := redistest.Start(t)
	in := startInstance(t, rs, instanceConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	in.srv.SetRedisDown(errors.New("ping: i/o timeout"))
	calls := []struct {
		name string
		call func() error
	}{
		{"Enqueue", func() error {
			_, err := in.client.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "down", Payload: []byte("x")})
			return err
		}},
		{"EnqueueBatch", func() error {
			_, err := in.client.EnqueueBatch(ctx, &qbridgev1.EnqueueBatchRequest{Queue: "down", Messages: []*qbridgev1.BatchMessage{{Payload: []byte("x")}}})
			return err
		}},
		{"Publish", func() error {
			_, err := in.client.Publish(ctx, &qbridgev1.PublishRequest{Channel: "down", Payload: []byte("x")})
			return err
		}},
	}
	for _, c := range calls {
		start := time.Now()
		err := c.call()
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "i/o timeout") {
			t.Errorf("%s while Redis is down: %v; want UNAVAILABLE naming the health check's error", c.name, err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("%s took %v; want an immediate answer", c.name, d)
		}
	}
	if n := in.rdb.LLen(ctx, "down").Val(); n != 0 {
		t.Fatalf("a refused enqueue wrote %d messages", n)
	}
	in.srv.SetRedisDown(nil)
	for _, c := range calls {
		if err := c.call(); err != nil {
			t.Errorf("%s after Redis is back: %v", c.name, err)
		}
	}
	if n := in.rdb.LLen(ctx, "down").Val(); n != 2 {
		t.Fatalf("queue holds %d messages after recovery; want 2", n)
	}
}
