package dashboard_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

func TestInfo(t *testing.T) {
	e := startEnv(t, envConfig{auth: true, interval: 50 * time.Millisecond, samples: 20, maxQueues: 7})
	// No token needed: the UI asks it before it knows it needs one.
	wantJSON(t, e.do("GET", "/api/info", "", nil), 200,
		`{"version": "<v>", "auth_required": true, "history": {"interval_seconds": 0.05, "samples": 20}, "max_queues": 7}`)

	open := startEnv(t, envConfig{})
	wantJSON(t, open.do("GET", "/api/info", "", nil), 200,
		`{"version": "<v>", "auth_required": false, "history": {"interval_seconds": 2, "samples": 300}, "max_queues": 100}`)
	// With authentication off, no token is needed anywhere.
	wantJSON(t, open.do("GET", "/api/queues", "", nil), 200, `{"queues": [], "truncated": false}`)
}

// TestAPI walks every endpoint's happy path on one fixture, then the
// failures, with exact JSON.
func TestAPI(t *testing.T) {
	e := startEnv(t, envConfig{auth: true})

	// orders: one in flight, three ready (text with a header, binary, 5000
	// bytes), one delayed. billing: one dead letter.
	inflight := e.enqueue("orders", []byte("first"))
	if d := e.take("orders"); d.GetId() != inflight {
		t.Fatalf("took %s, want %s", d.GetId(), inflight)
	}
	hello := e.enqueue("orders", []byte("hello"), func(r *qbridgev1.EnqueueRequest) { r.Headers = map[string]string{"k": "v"} })
	binary := e.enqueue("orders", []byte{0xff, 0x00, 0x01})
	big := e.enqueue("orders", []byte(strings.Repeat("é", 2500))) // 5000 bytes of 2-byte characters
	later := e.enqueue("orders", []byte("later"), func(r *qbridgev1.EnqueueRequest) { r.Delay = durationpb.New(time.Hour) })
	deadID := e.killMessage("billing", []byte("bad invoice"), "cannot parse")

	ordersJSON := `{"queue": "orders", "ready": 3, "in_flight": 1, "delayed": 1, "dead": 0,
		"oldest_ready_age_seconds": "<v>", "enqueue_rate": "<v>", "ack_rate": "<v>", "paused": false, "consumers": "<v>",
		"counters": {"enqueued": 5, "acked": 0, "nacked": 0, "lease_expired": 0, "dead_lettered": 0, "expired": 0}}`
	billingJSON := `{"queue": "billing", "ready": 0, "in_flight": 0, "delayed": 0, "dead": 1,
		"oldest_ready_age_seconds": null, "enqueue_rate": "<v>", "ack_rate": "<v>", "paused": false, "consumers": "<v>",
		"counters": {"enqueued": 1, "acked": 0, "nacked": 1, "lease_expired": 0, "dead_lettered": 1, "expired": 0},
		"task_types": {"invoice": {"enqueued": 1, "acked": 0, "nacked": 1, "lease_expired": 0, "dead_lettered": 1, "expired": 0}}}`

	t.Run("list queues", func(t *testing.T) {
		wantJSON(t, e.do("GET", "/api/queues", adminToken, nil), 200,
			`{"queues": [`+billingJSON+`, `+ordersJSON+`], "truncated": false}`)
	})

	t.Run("list pages through ListQueues", func(t *testing.T) {
		// More queues than one ListQueues page (500) holds.
		errs := make(chan error, 520)
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < 520; i += 8 {
					_, err := e.queues.Enqueue(ctxT(t, 10*time.Second), &qbridgev1.EnqueueRequest{Queue: fmt.Sprintf("team-a.q%03d", i), Payload: []byte("x")})
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		all := decode[struct {
			Queues []struct {
				Queue string `json:"queue"`
				Ready int64  `json:"ready"`
			} `json:"queues"`
			Truncated bool `json:"truncated"`
		}](t, e.do("GET", "/api/queues", adminToken, nil))
		if len(all.Queues) != 522 || all.Truncated {
			t.Fatalf("%d queues (truncated %v), want 522", len(all.Queues), all.Truncated)
		}
		for i, q := range all.Queues[2:] { // after billing and orders
			if want := fmt.Sprintf("team-a.q%03d", i); q.Queue != want || q.Ready != 1 {
				t.Fatalf("queue #%d is %+v, want %s with 1 ready", i+2, q, want)
			}
		}
		// team-a administers team-a.* only: ListQueues shows it nothing else.
		mine := decode[struct {
			Queues []struct {
				Queue string `json:"queue"`
			} `json:"queues"`
		}](t, e.do("GET", "/api/queues", teamToken, nil))
		if len(mine.Queues) != 520 || mine.Queues[0].Queue != "team-a.q000" || mine.Queues[519].Queue != "team-a.q519" {
			t.Fatalf("team-a sees %d queues", len(mine.Queues))
		}
	})

	t.Run("queue stats", func(t *testing.T) {
		wantJSON(t, e.do("GET", "/api/queues/orders", adminToken, nil), 200, ordersJSON)
		wantJSON(t, e.do("GET", "/api/queues/billing", adminToken, nil), 200, billingJSON)
		// A producer may read the stats of its queue (any queue permission).
		wantJSON(t, e.do("GET", "/api/queues/orders", producerToken, nil), 200, ordersJSON)
		// Names with "/" travel escaped as one path segment.
		e.enqueue("a/b:c@d", []byte("x"))
		wantJSON(t, e.do("GET", "/api/queues/a%2Fb:c@d", adminToken, nil), 200,
			`{"queue": "a/b:c@d", "ready": 1, "in_flight": 0, "delayed": 0, "dead": 0,
			"oldest_ready_age_seconds": "<v>", "enqueue_rate": "<v>", "ack_rate": "<v>", "paused": false, "consumers": "<v>",
			"counters": {"enqueued": 1, "acked": 0, "nacked": 0, "lease_expired": 0, "dead_lettered": 0, "expired": 0}}`)
	})

	t.Run("messages", func(t *testing.T) {
		wantJSON(t, e.do("GET", "/api/queues/orders/messages?state=ready", adminToken, nil), 200, `{
			"queue": "orders", "state": "ready", "next_page_token": "", "messages": [
			{"id": "`+hello+`", "state": "ready", "payload": "hello", "payload_encoding": "text", "payload_bytes": 5,
			 "payload_truncated": false, "headers": {"k": "v"}, "enqueue_time": "<v>", "deliveries": 0},
			{"id": "`+binary+`", "state": "ready", "payload": "/wAB", "payload_encoding": "base64", "payload_bytes": 3,
			 "payload_truncated": false, "enqueue_time": "<v>", "deliveries": 0},
			{"id": "`+big+`", "state": "ready", "payload": "`+strings.Repeat("é", 2048)+`", "payload_encoding": "text",
			 "payload_bytes": 5000, "payload_truncated": true, "enqueue_time": "<v>", "deliveries": 0}]}`)
		wantJSON(t, e.do("GET", "/api/queues/orders/messages?state=delayed", adminToken, nil), 200, `{
			"queue": "orders", "state": "delayed", "next_page_token": "", "messages": [
			{"id": "`+later+`", "state": "delayed", "payload": "later", "payload_encoding": "text", "payload_bytes": 5,
			 "payload_truncated": false, "enqueue_time": "<v>", "deliver_time": "<v>", "deliveries": 0}]}`)
		wantJSON(t, e.do("GET", "/api/queues/orders/messages?state=in_flight", adminToken, nil), 200, `{
			"queue": "orders", "state": "in_flight", "next_page_token": "", "messages": [
			{"id": "`+inflight+`", "state": "in_flight", "payload": "first", "payload_encoding": "text", "payload_bytes": 5,
			 "payload_truncated": false, "enqueue_time": "<v>", "lease_deadline": "<v>", "deliveries": 1}]}`)
		wantJSON(t, e.do("GET", "/api/queues/billing/messages?state=dead", adminToken, nil), 200, `{
			"queue": "billing", "state": "dead", "next_page_token": "", "messages": [
			{"id": "`+deadID+`", "state": "dead", "payload": "bad invoice", "payload_encoding": "text", "payload_bytes": 11,
			 "payload_truncated": false, "task_type": "invoice", "enqueue_time": "<v>", "deliveries": 1,
			 "last_error": "cannot parse", "dead_time": "<v>", "dead_reason": "nacked as dead letter"}]}`)

		// Paging: the token of the first page leads to the rest.
		type page struct {
			Messages []struct {
				ID string `json:"id"`
			} `json:"messages"`
			Next string `json:"next_page_token"`
		}
		p1 := decode[page](t, e.do("GET", "/api/queues/orders/messages?state=ready&page_size=2", adminToken, nil))
		if len(p1.Messages) != 2 || p1.Messages[0].ID != hello || p1.Messages[1].ID != binary || p1.Next == "" {
			t.Fatalf("first page: %+v", p1)
		}
		p2 := decode[page](t, e.do("GET", "/api/queues/orders/messages?state=ready&page_size=2&page_token="+p1.Next, adminToken, nil))
		if len(p2.Messages) != 1 || p2.Messages[0].ID != big || p2.Next != "" {
			t.Fatalf("second page: %+v", p2)
		}

		wantError(t, e.do("GET", "/api/queues/orders/messages?state=gone", adminToken, nil), 400,
			`state "gone": use state=ready, delayed, in_flight or dead`)
		wantError(t, e.do("GET", "/api/queues/orders/messages?state=ready&page_size=x", adminToken, nil), 400,
			`page_size "x" is not a number`)
		r := e.do("GET", "/api/queues/orders/messages?state=ready&page_size=5000", adminToken, nil)
		wantError(t, r, 400, "page_size 5000 is above the limit 1000")
		r = e.do("GET", "/api/queues/nosuch/messages?state=ready", adminToken, nil)
		if r.code != 404 || !strings.Contains(string(r.body), "nosuch") {
			t.Fatalf("unknown queue: %d %s", r.code, r.body)
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		wantJSON(t, e.do("POST", "/api/queues/billing/pause", adminToken, map[string]any{}), 200, `{"queue": "billing", "paused": true}`)
		if !e.stats("billing").GetPaused() {
			t.Fatal("billing is not paused")
		}
		wantJSON(t, e.do("GET", "/api/queues/billing", adminToken, nil), 200, strings.Replace(billingJSON, `"paused": false`, `"paused": true`, 1))
		// An empty body will do.
		wantJSON(t, e.do("POST", "/api/queues/billing/resume", adminToken, "", "application/json"), 200, `{"queue": "billing", "paused": false}`)
		if e.stats("billing").GetPaused() {
			t.Fatal("billing is still paused")
		}
	})

	t.Run("replay and delete dead letters", func(t *testing.T) {
		wantJSON(t, e.do("POST", "/api/queues/billing/dead/replay", adminToken, map[string]any{"ids": []string{deadID}}), 200,
			`{"queue": "billing", "replayed": 1}`)
		if st := e.stats("billing"); st.GetDead() != 0 || st.GetReady() != 1 {
			t.Fatalf("after replay: dead %d ready %d", st.GetDead(), st.GetReady())
		}
		e.killMessage("billing.eu", []byte("one"), "x")
		e.killMessage("billing.eu", []byte("two"), "y")
		wantJSON(t, e.do("POST", "/api/queues/billing.eu/dead/replay", adminToken, map[string]any{"all": true}), 200,
			`{"queue": "billing.eu", "replayed": 2}`)
		id := e.killMessage("billing.us", []byte("three"), "z")
		wantJSON(t, e.do("POST", "/api/queues/billing.us/dead/delete", adminToken, map[string]any{"ids": []string{id}}), 200,
			`{"queue": "billing.us", "deleted": 1}`)
		e.killMessage("billing.us", []byte("four"), "z")
		wantJSON(t, e.do("POST", "/api/queues/billing.us/dead/delete", adminToken, map[string]any{"all": true}), 200,
			`{"queue": "billing.us", "deleted": 1}`)
		if st := e.stats("billing.us"); st.GetDead() != 0 || st.GetReady() != 0 {
			t.Fatalf("after delete: dead %d ready %d", st.GetDead(), st.GetReady())
		}
		// Neither ids nor all: the server's own validation answers.
		r := e.do("POST", "/api/queues/billing/dead/delete", adminToken, map[string]any{})
		if r.code != 400 {
			t.Fatalf("empty selection: %d %s", r.code, r.body)
		}
		wantError(t, e.do("POST", "/api/queues/billing/dead/replay", adminToken, `{"ids": ["x"], "every": true}`), 400,
			`the request body is not the JSON object expected: json: unknown field "every"`)
		wantError(t, e.do("POST", "/api/queues/billing/dead/replay", adminToken, `{"all": true} {}`), 400,
			"the request body has more than one JSON value")
		wantError(t, e.do("POST", "/api/queues/billing/dead/replay", adminToken, ""), 400,
			"the request body is empty; send a JSON object")
	})

	t.Run("purge", func(t *testing.T) {
		wantJSON(t, e.do("POST", "/api/queues/orders/purge", adminToken, map[string]any{}), 200, `{"queue": "orders", "purged": 4}`)
		if st := e.stats("orders"); st.GetReady() != 0 || st.GetDelayed() != 0 || st.GetInFlight() != 1 {
			t.Fatalf("after purge: ready %d delayed %d in flight %d", st.GetReady(), st.GetDelayed(), st.GetInFlight())
		}
	})

	t.Run("authorization", func(t *testing.T) {
		before := e.stats("billing").GetReady()
		// A producer may not purge.
		wantError(t, e.do("POST", "/api/queues/orders/purge", producerToken, map[string]any{}), 403,
			`principal "orders-api" may not call /qbridge.v1.AdminService/PurgeQueue: it has no admin permission on queue "orders"; grants are set in qbridged's config`)
		// Nor list queues (it administers none), nor peek.
		wantError(t, e.do("GET", "/api/queues", producerToken, nil), 403,
			`principal "orders-api" may not call /qbridge.v1.AdminService/ListQueues: it holds no admin permission on any queue; grants are set in qbridged's config`)
		wantError(t, e.do("GET", "/api/queues/orders/messages?state=ready", producerToken, nil), 403,
			`principal "orders-api" may not call /qbridge.v1.AdminService/PeekMessages: it has no admin permission on queue "orders"; grants are set in qbridged's config`)
		// team-a may not touch billing.
		wantError(t, e.do("POST", "/api/queues/billing/purge", teamToken, map[string]any{}), 403,
			`principal "team-a" may not call /qbridge.v1.AdminService/PurgeQueue: it has no admin permission on queue "billing"; grants are set in qbridged's config`)
		if got := e.stats("billing").GetReady(); got != before {
			t.Fatalf("billing ready %d after refused purges, want %d", got, before)
		}

		// No token: 401 from the dashboard itself, on every endpoint but info.
		for _, c := range []struct{ method, path string }{
			{"GET", "/api/queues"}, {"GET", "/api/queues/orders"}, {"GET", "/api/queues/orders/history"},
			{"GET", "/api/queues/orders/messages?state=ready"}, {"POST", "/api/queues/orders/pause"},
			{"POST", "/api/queues/orders/resume"}, {"POST", "/api/queues/orders/purge"},
			{"POST", "/api/queues/orders/dead/replay"}, {"POST", "/api/queues/orders/dead/delete"},
			{"GET", "/api/channels/news/tail"},
		} {
			var body any
			if c.method == "POST" {
				body = map[string]any{"all": true}
			}
			r := e.do(c.method, c.path, "", body)
			wantError(t, r, 401, "this dashboard requires authentication: send the header 'Authorization: Bearer <token>' (the UI asks for the token)")
			if r.header.Get("WWW-Authenticate") != `Bearer realm="qbridge"` {
				t.Errorf("%s %s: WWW-Authenticate %q", c.method, c.path, r.header.Get("WWW-Authenticate"))
			}
		}
		// An unknown token: 401 with the gRPC API's message.
		wantError(t, e.do("GET", "/api/queues", "qbt_not_a_known_token", nil), 401,
			"the bearer token is not one this server knows: check the token, or have its hash added to a principal in qbridged's config")
		// A header that is not a bearer token.
		req, _ := http.NewRequest("GET", e.url+"/api/queues/orders", nil)
		req.Header.Set("Authorization", "Basic dXNlcjpwYXNz")
		resp, err := e.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Fatalf("basic auth: %d", resp.StatusCode)
		}
	})

	t.Run("rate limit is 429 with Retry-After", func(t *testing.T) {
		if r := e.do("GET", "/api/queues/orders", limitedToken, nil); r.code != 200 {
			t.Fatalf("first call: %d %s", r.code, r.body)
		}
		r := e.do("GET", "/api/queues/orders", limitedToken, nil)
		if r.code != 429 || !strings.Contains(string(r.body), `principal \"limited\" is over its request rate`) {
			t.Fatalf("second call: %d %s", r.code, r.body)
		}
		if ra := r.header.Get("Retry-After"); ra == "" || ra == "0" {
			t.Fatalf("Retry-After %q", ra)
		}
	})

	t.Run("bad requests", func(t *testing.T) {
		// Mutations need a JSON body: a form or plain text is refused.
		for _, ct := range []string{"application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", ""} {
			wantError(t, e.do("POST", "/api/queues/orders/pause", adminToken, "a=b", ct), 415,
				"send the request body as Content-Type: application/json")
		}
		if e.stats("orders").GetPaused() {
			t.Fatal("a refused pause paused the queue")
		}
		wantJSON(t, e.do("POST", "/api/queues/orders/pause", adminToken, "{}", "application/json; charset=utf-8"), 200,
			`{"queue": "orders", "paused": true}`)
		wantJSON(t, e.do("POST", "/api/queues/orders/resume", adminToken, "{}"), 200, `{"queue": "orders", "paused": false}`)
		wantError(t, e.do("POST", "/api/queues/orders/pause", adminToken, `{"force": true}`), 400,
			`the request body is not the JSON object expected: json: unknown field "force"`)

		// Bounded bodies.
		huge := `{"ids": ["` + strings.Repeat("x", 300<<10) + `"]}`
		wantError(t, e.do("POST", "/api/queues/orders/dead/delete", adminToken, huge), 413, "the request body is over 262144 bytes")

		// Methods.
		r := e.do("GET", "/api/queues/orders/purge", adminToken, nil)
		wantError(t, r, 405, "GET /api/queues/orders/purge: use POST")
		if r.header.Get("Allow") != "POST" {
			t.Errorf("Allow %q", r.header.Get("Allow"))
		}
		wantError(t, e.do("POST", "/api/queues", adminToken, "{}"), 405, "POST /api/queues: use GET")
		wantError(t, e.do("GET", "/api/nothing", adminToken, nil), 404, "no such API endpoint: /api/nothing")

		// The server's own validation and status codes come through.
		r = e.do("GET", "/api/queues/bad%20name", adminToken, nil)
		if r.code != 400 || !strings.Contains(string(r.body), "queue name") {
			t.Fatalf("bad name: %d %s", r.code, r.body)
		}
		r = e.do("POST", "/api/queues/nosuch/pause", adminToken, "{}")
		if r.code != 404 || !strings.Contains(string(r.body), "nosuch") {
			t.Fatalf("unknown queue: %d %s", r.code, r.body)
		}
		if err := e.rdb.Set(ctxT(t, 5*time.Second), "wrongtype", "x", 0).Err(); err != nil {
			t.Fatal(err)
		}
		r = e.do("GET", "/api/queues/wrongtype", adminToken, nil)
		if r.code != 409 {
			t.Fatalf("wrong type: %d %s", r.code, r.body)
		}

		// A cross-site request is refused even with a JSON content type.
		req, _ := http.NewRequest("POST", e.url+"/api/queues/orders/pause", strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+adminToken)
		req.Header.Set("Sec-Fetch-Site", "cross-site")
		req.Header.Set("Origin", "https://evil.example")
		resp, err := e.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 403 || e.stats("orders").GetPaused() {
			t.Fatalf("cross-site pause: %d, paused %v", resp.StatusCode, e.stats("orders").GetPaused())
		}
	})
}

// TestHistory checks that the sampler fills the history, that the ring
// keeps the latest samples, that only the first WithMaxQueues queues are
// sampled, and that the endpoint checks access with the caller's token.
func TestHistory(t *testing.T) {
	e := startEnv(t, envConfig{auth: true, interval: 20 * time.Millisecond, samples: 10, maxQueues: 2})
	e.enqueueN("orders", 3)
	e.enqueue("billing", []byte("x"))
	e.enqueue("zeta", []byte("x")) // third in name order: not sampled

	type hist struct {
		Queue    string  `json:"queue"`
		Interval float64 `json:"interval_seconds"`
		Capacity int     `json:"capacity"`
		Sampled  bool    `json:"sampled"`
		Samples  []struct {
			Time     time.Time `json:"time"`
			Ready    int64     `json:"ready"`
			InFlight int64     `json:"in_flight"`
			Delayed  int64     `json:"delayed"`
			Dead     int64     `json:"dead"`
			Enqueued int64     `json:"enqueued"`
			Acked    int64     `json:"acked"`
		} `json:"samples"`
	}
	get := func(q, token string) hist {
		return decode[hist](t, e.do("GET", "/api/queues/"+q+"/history", token, nil))
	}

	var h hist
	eventually(t, 10*time.Second, "orders history to fill its 10 samples", func() bool {
		h = get("orders", adminToken)
		return len(h.Samples) == 10
	})
	if h.Queue != "orders" || h.Interval != 0.02 || h.Capacity != 10 || !h.Sampled {
		t.Fatalf("history header: %+v", h)
	}
	for i, s := range h.Samples {
		if i > 0 && !s.Time.After(h.Samples[i-1].Time) {
			t.Fatalf("sample %d at %v is not after %v", i, s.Time, h.Samples[i-1].Time)
		}
	}
	last := h.Samples[9]
	if last.Ready != 3 || last.Enqueued != 3 || last.InFlight != 0 || last.Delayed != 0 || last.Dead != 0 || last.Acked != 0 {
		t.Fatalf("last sample: %+v", last)
	}
	// The exact JSON of one sample.
	r := e.do("GET", "/api/queues/orders/history", adminToken, nil)
	var raw struct {
		Samples []json.RawMessage `json:"samples"`
	}
	if err := json.Unmarshal(r.body, &raw); err != nil {
		t.Fatal(err)
	}
	wantJSON(t, response{code: 200, header: r.header, body: raw.Samples[len(raw.Samples)-1]}, 200,
		`{"time": "<v>", "ready": 3, "in_flight": 0, "delayed": 0, "dead": 0, "enqueued": 3, "acked": 0}`)

	// The ring moves on: the oldest sample goes, and new stats show up.
	first := h.Samples[0].Time
	d := e.take("orders")
	if _, err := e.queues.Ack(ctxT(t, 5*time.Second), &qbridgev1.AckRequest{AckTokens: []string{d.GetAckToken()}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a sample after the ack", func() bool {
		h = get("orders", adminToken)
		l := h.Samples[len(h.Samples)-1]
		return len(h.Samples) == 10 && h.Samples[0].Time.After(first) && l.Ready == 2 && l.Acked == 1
	})

	// zeta is beyond WithMaxQueues(2): known, but not sampled.
	wantJSON(t, e.do("GET", "/api/queues/zeta/history", adminToken, nil), 200,
		`{"queue": "zeta", "interval_seconds": 0.02, "capacity": 10, "sampled": false, "samples": []}`)

	// Access: the producer may see orders' stats, so its history too; not
	// billing's.
	if h := get("orders", producerToken); len(h.Samples) == 0 {
		t.Fatal("producer sees no history of orders")
	}
	wantError(t, e.do("GET", "/api/queues/billing/history", producerToken, nil), 403,
		`principal "orders-api" may not call /qbridge.v1.QueueService/GetQueueStats: it has no produce or consume or admin permission on queue "billing"; grants are set in qbridged's config`)
	wantError(t, e.do("GET", "/api/queues/billing/history", teamToken, nil), 403,
		`principal "team-a" may not call /qbridge.v1.QueueService/GetQueueStats: it has no produce or consume or admin permission on queue "billing"; grants are set in qbridged's config`)
}

// sseEvent is one Server-Sent Event.
type sseEvent struct {
	event, data string
}

// openTail opens a tail and returns its events; it fails the test on a
// non-200 answer.
func openTail(t *testing.T, e *env, path, token string) (<-chan sseEvent, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", e.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		resp.Body.Close()
		t.Fatalf("tail: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	ch := make(chan sseEvent, 16)
	go func() {
		defer resp.Body.Close()
		defer close(ch)
		sc := bufio.NewScanner(resp.Body)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.data != "" {
					ch <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "event: "):
				ev.event = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data = strings.TrimPrefix(line, "data: ")
			}
		}
	}()
	return ch, cancel
}

func nextEvent(t *testing.T, ch <-chan sseEvent) sseEvent {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("the event stream ended")
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no event within 10s")
	}
	return sseEvent{}
}

func wantEvent(t *testing.T, ev sseEvent, name, data string) {
	t.Helper()
	if ev.event != name {
		t.Fatalf("event %q (%s), want %q", ev.event, ev.data, name)
	}
	wantJSON(t, response{code: 200, header: http.Header{"Content-Type": {"application/json; charset=utf-8"}}, body: []byte(ev.data)}, 200, data)
}

func TestTail(t *testing.T) {
	e := startEnv(t, envConfig{auth: true})
	publish := func(channel string, payload []byte) int64 {
		t.Helper()
		r, err := e.queues.Publish(ctxT(t, 5*time.Second), &qbridgev1.PublishRequest{Channel: channel, Payload: payload})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetReceivers()
	}

	events, stop := openTail(t, e, "/api/channels/news.sports/tail", adminToken)
	wantEvent(t, nextEvent(t, events), "subscribed", `{"channels": ["news.sports"], "patterns": []}`)
	if n := publish("news.sports", []byte("goal!")); n != 1 {
		t.Fatalf("receivers %d, want 1", n)
	}
	wantEvent(t, nextEvent(t, events), "message",
		`{"channel": "news.sports", "payload": "goal!", "payload_encoding": "text", "payload_bytes": 5, "payload_truncated": false, "time": "<v>"}`)
	publish("news.sports", []byte{0xfe, 0xff})
	wantEvent(t, nextEvent(t, events), "message",
		`{"channel": "news.sports", "payload": "/v8=", "payload_encoding": "base64", "payload_bytes": 2, "payload_truncated": false, "time": "<v>"}`)

	// Patterns, with a name that needs escaping.
	pevents, pstop := openTail(t, e, "/api/channels/news.%2A/tail?pattern=1", adminToken)
	wantEvent(t, nextEvent(t, pevents), "subscribed", `{"channels": [], "patterns": ["news.*"]}`)
	publish("news.weather", []byte("rain"))
	wantEvent(t, nextEvent(t, pevents), "message",
		`{"channel": "news.weather", "pattern": "news.*", "payload": "rain", "payload_encoding": "text", "payload_bytes": 4, "payload_truncated": false, "time": "<v>"}`)
	pstop()

	// When the client goes away, the Subscribe stream ends: qbridge drops
	// its Redis subscription, so nobody receives what is published.
	stop()
	eventually(t, 10*time.Second, "the subscription to end with the client", func() bool {
		return publish("news.sports", []byte("anyone?")) == 0
	})

	// Refusals before the stream begins are ordinary HTTP errors.
	wantError(t, e.do("GET", "/api/channels/news.sports/tail", producerToken, nil), 403,
		`principal "orders-api" may not call /qbridge.v1.QueueService/Subscribe: it has no subscribe permission on channel "news.sports"; grants are set in qbridged's config`)
	r := e.do("GET", "/api/channels/bad%20channel/tail", adminToken, nil)
	if r.code != 400 || !strings.Contains(string(r.body), "channel name") {
		t.Fatalf("bad channel: %d %s", r.code, r.body)
	}
}

func TestStatic(t *testing.T) {
	e := startEnv(t, envConfig{})
	for _, c := range []struct{ path, ctype, contains string }{
		{"/", "text/html; charset=utf-8", `<canvas id="chart-depth"`},
		{"/app.js", "text/javascript; charset=utf-8", "'use strict';"},
		{"/app.css", "text/css; charset=utf-8", ".queue-table"},
	} {
		r := e.do("GET", c.path, "", nil)
		if r.code != 200 || r.header.Get("Content-Type") != c.ctype || !strings.Contains(string(r.body), c.contains) {
			t.Fatalf("%s: %d %q", c.path, r.code, r.header.Get("Content-Type"))
		}
		if csp := r.header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") || !strings.Contains(csp, "frame-ancestors 'none'") {
			t.Fatalf("%s: CSP %q", c.path, csp)
		}
		etag := r.header.Get("ETag")
		req, _ := http.NewRequest("GET", e.url+c.path, nil)
		req.Header.Set("If-None-Match", etag)
		resp, err := e.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if etag == "" || resp.StatusCode != http.StatusNotModified {
			t.Fatalf("%s: ETag %q, revalidation %d", c.path, etag, resp.StatusCode)
		}
	}
	if r := e.do("GET", "/index.html", "", nil); r.code != 404 {
		t.Fatalf("/index.html: %d", r.code)
	}
	if r := e.do("GET", "/api/queues", "", nil); r.header.Get("Cache-Control") != "no-store" {
		t.Fatalf("API Cache-Control %q", r.header.Get("Cache-Control"))
	}
}

// TestAPIShardedQueue: a sharded queue is one queue in the list, and its
// stats list its shards.
func TestAPIShardedQueue(t *testing.T) {
	e := startEnv(t, envConfig{auth: true})
	if _, err := e.admin.UpdateQueueConfig(ctxT(t, 10*time.Second), &qbridgev1.UpdateQueueConfigRequest{
		Queue: "hot", Config: &qbridgev1.QueueConfig{Shards: 2}}); err != nil {
		t.Fatal(err)
	}
	e.enqueue("hot", []byte("a"))
	e.enqueue("hot", []byte("b"))
	e.enqueue("hot", []byte("c"))
	// Calls without keys take the shards in turn, from shard 1 on a fresh
	// server.
	shards := `[{"shard": 0, "list": "hot", "ready": 1, "in_flight": 0, "delayed": 0, "dead": 0},
		{"shard": 1, "list": "hot#1", "ready": 2, "in_flight": 0, "delayed": 0, "dead": 0}]`
	hot := `{"queue": "hot", "ready": 3, "in_flight": 0, "delayed": 0, "dead": 0,
		"oldest_ready_age_seconds": "<v>", "enqueue_rate": "<v>", "ack_rate": "<v>", "paused": false, "consumers": "<v>",
		"counters": {"enqueued": 3, "acked": 0, "nacked": 0, "lease_expired": 0, "dead_lettered": 0, "expired": 0},
		"shards": ` + shards + `}`
	wantJSON(t, e.do("GET", "/api/queues", adminToken, nil), 200, `{"queues": [`+hot+`], "truncated": false}`)
	wantJSON(t, e.do("GET", "/api/queues/hot", adminToken, nil), 200, hot)
}
