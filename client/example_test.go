package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/signal"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qbridge/qbridge/client"
)

// A worker that enqueues a job, then consumes the queue and settles each
// delivery. (Compiled, not run: it needs a qbridge server.)
func Example() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	c, err := client.Dial("localhost:7070")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	id, err := c.Enqueue(ctx, "emails", []byte(`{"to":"a@example.com"}`),
		client.WithHeaders(map[string]string{"content-type": "application/json"}))
	if err != nil {
		log.Fatalf("enqueue: %v (code %v)", err, status.Code(err))
	}
	log.Printf("enqueued %s", id)

	cs, err := c.Consume(ctx, "emails", client.WithMaxInFlight(8), client.WithLease(time.Minute))
	if err != nil {
		log.Fatal(err)
	}
	defer cs.Close()
	for {
		d, err := cs.Next()
		if errors.Is(err, context.Canceled) {
			return // we are shutting down
		}
		if err != nil {
			// The stream broke; Consume again to resume (maybe after a
			// backoff). Unacked deliveries were requeued by the server.
			log.Fatalf("consume: %v (code %v)", err, status.Code(err))
		}
		if err := handle(d); err != nil {
			// Deliver it again after a backoff; once it has used up the
			// queue's max attempts it becomes a dead letter instead.
			_ = d.Retry(ctx, err)
			continue
		}
		if err := d.Ack(ctx); status.Code(err) == codes.FailedPrecondition {
			log.Printf("%s: lease expired before the ack; it will be delivered again", d.ID)
		}
	}
}

func handle(d *client.Delivery) error {
	log.Printf("%s (attempt %d): %s", d.ID, d.Attempt, d.Payload)
	return nil
}

// Subscribe returns once the subscription is active, so a Publish that
// follows it is received.
func ExampleClient_Subscribe() {
	ctx := context.Background()
	c, err := client.Dial("localhost:7070")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	sub, err := c.Subscribe(ctx, []string{"alerts"}, []string{"metrics.*"})
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close()

	if _, err := c.Publish(ctx, "metrics.cpu", []byte("93")); err != nil {
		log.Fatal(err)
	}
	m, err := sub.Next()
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("%s (via %q): %s", m.Channel, m.Pattern, m.Payload)
}

// A task worker and a producer. The worker dispatches on the task type with
// a ServeMux; the producer uses Call for a request/reply round trip and
// Enqueue for fire-and-forget tasks. (Compiled, not run: it needs a qbridge
// server.)
func Example_tasks() {
	c, err := client.Dial("localhost:7070")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	// The worker side.
	mux := client.NewServeMux()
	mux.HandleFunc("thumbnail", func(ctx context.Context, t *client.Task) ([]byte, error) {
		if len(t.Payload) == 0 {
			// Retrying cannot help: dead-letter it at once.
			return nil, fmt.Errorf("empty image: %w", client.SkipRetry)
		}
		return []byte("thumbnails/" + t.ID + ".png"), nil // the result, for GetResult and Call
	})
	mux.HandleFunc("email", func(ctx context.Context, t *client.Task) ([]byte, error) {
		// An error retries the task after the queue's backoff.
		return nil, sendEmail(ctx, t.Payload)
	})
	mux.Use(func(next client.Handler) client.Handler {
		return client.HandlerFunc(func(ctx context.Context, t *client.Task) ([]byte, error) {
			start := time.Now()
			res, err := next.ProcessTask(ctx, t)
			log.Printf("%s %s (attempt %d): %v in %v", t.Type, t.ID, t.Attempt, err, time.Since(start))
			return res, err
		})
	})
	w := client.NewWorker(c, []string{"jobs:high", "jobs"}, mux,
		client.WithConcurrency(16), client.WithWorkerLease(time.Minute))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	// The producer side (usually another program).
	go func() {
		callCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		res, err := c.Call(callCtx, "jobs:high", "thumbnail", []byte("...image bytes..."))
		var pending *client.PendingError
		switch {
		case errors.As(err, &pending):
			log.Printf("no thumbnail yet; ask later with GetResult(%q, %q)", pending.Queue, pending.ID)
		case err != nil:
			log.Printf("thumbnail failed: %v", err) // a *client.TaskError, or the Enqueue's error
		default:
			log.Printf("thumbnail at %s", res.Payload)
		}
		if _, err := c.Enqueue(ctx, "jobs", []byte(`{"to":"a@example.com"}`), client.WithTaskType("email")); err != nil {
			log.Print(err)
		}
	}()

	// Until Ctrl-C; then running handlers may finish (WithShutdownTimeout).
	if err := w.Run(ctx); err != nil {
		log.Fatalf("worker: %v", err)
	}
}

func sendEmail(context.Context, []byte) error { return nil }
