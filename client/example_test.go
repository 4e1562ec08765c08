package client_test

import (
	"context"
	"errors"
	"log"
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
