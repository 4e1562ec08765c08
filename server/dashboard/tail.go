package dashboard

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

type subscribedJSON struct {
	Channels []string `json:"channels"`
	Patterns []string `json:"patterns"`
}

type pubsubJSON struct {
	Channel string `json:"channel"`
	Pattern string `json:"pattern,omitempty"`
	payloadJSON
	Time time.Time `json:"time"`
}

type tailErrorJSON struct {
	Error  string `json:"error"`
	Status int    `json:"status"`
}

// tail streams a Subscribe stream as Server-Sent Events until the client
// goes away or the stream fails.
func (d *Dashboard) tail(w http.ResponseWriter, r *http.Request) {
	c := r.PathValue("c")
	req := &qbridgev1.SubscribeRequest{}
	if flagValue(r.URL.Query().Get("pattern")) {
		req.Patterns = []string{c}
	} else {
		req.Channels = []string{c}
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	if a := r.Header.Get("Authorization"); a != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", a)
	}
	stream, err := d.queues.Subscribe(ctx, req)
	if err != nil {
		d.grpcError(w, r, err)
		return
	}
	// The first message confirms the subscription, or the stream fails
	// (authorization, validation): then answer with an ordinary error.
	first, err := stream.Recv()
	if err != nil {
		d.grpcError(w, r, err)
		return
	}
	if first.GetSubscribed() == nil {
		d.grpcError(w, r, status.Error(codes.Internal, "the Subscribe stream did not begin with its confirmation"))
		return
	}

	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Time{}) // a tail lasts as long as the client wants
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer
	w.WriteHeader(http.StatusOK)
	send := func(event string, v any) bool {
		b, err := json.Marshal(v)
		if err != nil {
			return false
		}
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	sub := first.GetSubscribed()
	if !send("subscribed", subscribedJSON{Channels: nonNil(sub.GetChannels()), Patterns: nonNil(sub.GetPatterns())}) {
		return
	}

	type recv struct {
		m   *qbridgev1.SubscribeResponse
		err error
	}
	msgs := make(chan recv)
	go func() {
		for {
			m, err := stream.Recv()
			select {
			case msgs <- recv{m, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	keepAlive := time.NewTicker(keepAliveEvery)
	defer keepAlive.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-keepAlive.C:
			if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil || rc.Flush() != nil {
				return
			}
		case in := <-msgs:
			if in.err != nil {
				if ctx.Err() == nil {
					st := status.Convert(in.err)
					send("error", tailErrorJSON{Error: st.Message(), Status: httpStatus(st.Code())})
				}
				return
			}
			m := in.m.GetMessage()
			if m == nil {
				continue
			}
			if !send("message", pubsubJSON{Channel: m.GetChannel(), Pattern: m.GetPattern(), payloadJSON: showPayload(m.GetPayload()), Time: time.Now().UTC()}) {
				return
			}
		}
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
