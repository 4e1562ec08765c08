package main

import (
	"encoding/json"
	"regexp"
	"slices"
	"strconv"
	"testing"

	"github.com/qbridge/qbridge/examples/internal/exampletest"
)

var (
	subscribedLine = regexp.MustCompile(`^listen: subscribed to task:pubsub:channel`)
	servingLine    = regexp.MustCompile(`^web: serving on (http://\S+) `)
	prodconsLine   = regexp.MustCompile(`^load: client \d+ round \d+ GET /prodcons -> 202 (\{.*\})$`)
	pubsubLine     = regexp.MustCompile(`^load: client \d+ round \d+ GET /pubsub -> 200 (\{.*\})$`)
	jobLine        = regexp.MustCompile(`^listen: job (\S+) from task:prodcons:queue: (\d+) \(attempt (\d+)\)$`)
	messageLine    = regexp.MustCompile(`^listen: message on task:pubsub:channel: (.*)$`)
)

// The siege-like load (10 clients x 5 rounds) against the web app: every
// job reaches the listener exactly once, and every message published after
// the listener subscribed is printed by it.
func TestLoadWebListen(t *testing.T) {
	env := exampletest.Start(t)
	listener := exampletest.Go(t, "listen", run, "-mode", "listen", "-addr", env.Addr, "-jobs", "50", "-messages", "50")
	listener.WaitLine(t, subscribedLine) // subscribed before anything is published

	web := exampletest.Go(t, "web", run, "-mode", "web", "-addr", env.Addr, "-http", "127.0.0.1:0")
	url := web.WaitLine(t, servingLine)[1]

	load := exampletest.Go(t, "load", run, "-mode", "load", "-url", url, "-clients", "10", "-rounds", "5")
	if err := load.Wait(t); err != nil {
		t.Fatalf("load: %v\n%s", err, load.Output())
	}
	if err := listener.Wait(t); err != nil { // it stops by itself after 50 jobs and 50 messages
		t.Fatalf("listen: %v\n%s", err, listener.Output())
	}
	checkRun(t, env, load, listener)
}

// -mode all runs the same in one process, and stops by itself.
func TestAll(t *testing.T) {
	env := exampletest.Start(t)
	p := exampletest.Go(t, "all", run, "-addr", env.Addr, "-clients", "4", "-rounds", "3")
	if err := p.Wait(t); err != nil {
		t.Fatalf("run: %v\n%s", err, p.Output())
	}
	checkRun(t, env, p, p)
	if len(p.Lines(regexp.MustCompile(`^listen: got 12 jobs and 12 messages$`))) != 1 {
		t.Errorf("no summary line\n%s", p.Output())
	}
}

// checkRun compares what the load test got back with what the listener
// printed, and checks that the queue is empty with every job acked.
func checkRun(t *testing.T, env *exampletest.Env, load, listener *exampletest.Proc) {
	t.Helper()
	// What the web app answered.
	jobs := map[string]int{} // id -> job
	for _, m := range load.Lines(prodconsLine) {
		var resp struct {
			ID    string `json:"id"`
			Queue string `json:"queue"`
			Job   int    `json:"job"`
		}
		exampletest.Must(t, "decode /prodcons answer", json.Unmarshal([]byte(m[1]), &resp))
		if resp.ID == "" || resp.Queue != "task:prodcons:queue" {
			t.Errorf("/prodcons answered %s", m[1])
		}
		jobs[resp.ID] = resp.Job
	}
	var published []string
	for _, m := range load.Lines(pubsubLine) {
		var resp struct {
			Channel   string `json:"channel"`
			Message   string `json:"message"`
			Receivers int64  `json:"receivers"`
		}
		exampletest.Must(t, "decode /pubsub answer", json.Unmarshal([]byte(m[1]), &resp))
		// One qbridge instance with subscribers: one Redis subscription.
		if resp.Channel != "task:pubsub:channel" || resp.Receivers != 1 {
			t.Errorf("/pubsub answered %s; want channel task:pubsub:channel, receivers 1", m[1])
		}
		published = append(published, resp.Message)
	}
	requests := len(load.Lines(prodconsLine)) // one per client and round
	if len(jobs) != requests || len(published) != requests || requests == 0 {
		t.Fatalf("load: %d distinct job ids, %d messages from %d requests per endpoint\n%s",
			len(jobs), len(published), requests, load.Output())
	}

	// What the listener printed: every job exactly once, on its first
	// attempt, with the payload the web app enqueued.
	seen := map[string]int{}
	for _, m := range listener.Lines(jobLine) {
		seen[m[1]]++
		if want, ok := jobs[m[1]]; !ok || m[2] != strconv.Itoa(want) || m[3] != "1" {
			t.Errorf("listener printed %q; want one of the enqueued jobs, attempt 1", m[0])
		}
	}
	for id := range jobs {
		if seen[id] != 1 {
			t.Errorf("job %s printed %d times by the listener, want once", id, seen[id])
		}
	}
	var printed []string
	for _, m := range listener.Lines(messageLine) {
		printed = append(printed, m[1])
	}
	slices.Sort(published)
	slices.Sort(printed)
	if !slices.Equal(printed, published) {
		t.Errorf("listener printed messages %q\nwant the published %q", printed, published)
	}

	st, err := env.Client.Stats(exampletest.Ctx(t), "task:prodcons:queue")
	exampletest.Must(t, "Stats", err)
	if st.Ready != 0 || st.InFlight != 0 || st.Counters.Acked != int64(requests) || st.Counters.Enqueued != int64(requests) {
		t.Errorf("queue stats: ready %d, in flight %d, enqueued %d, acked %d; want 0, 0, %d, %d",
			st.Ready, st.InFlight, st.Counters.Enqueued, st.Counters.Acked, requests, requests)
	}
}
