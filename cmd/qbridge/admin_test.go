package main

import (
	"strings"
	"syscall"
	"testing"
)

func TestStatsAndQueues(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.mustRun(t, "a\nb\nc\n", "enqueue", "alpha", "--task-type", "imp")
	e.mustRun(t, "", "enqueue", "beta", "later", "--delay", "1h")
	e.mustRun(t, "", "enqueue", "beta", "now")
	e.mustRun(t, "", "consume", "alpha", "--count", "1")
	// The stream may have taken the next message before it ended; the
	// server puts it back.
	e.waitCounts(t, "alpha", 2, 0)

	t.Run("queues", func(t *testing.T) {
		golden(t, "queues", e.mustRun(t, "", "queues").stdout)
		ms := jsonLines(t, e.mustRun(t, "", "-o", "json", "queues").stdout)
		if len(ms) != 2 || ms[0]["queue"] != "alpha" || ms[1]["queue"] != "beta" {
			t.Fatalf("%v", ms)
		}
	})

	t.Run("one queue", func(t *testing.T) {
		r := e.mustRun(t, "", "stats", "alpha")
		golden(t, "stats_one", normalize(r.stdout, rateRE, "<R>", ageRE, "<AGE>"))
		s := e.stats(t, "alpha")
		if s["ready"] != 2.0 || s["paused"] != false || s["counters"].(map[string]any)["acked"] != 1.0 {
			t.Fatalf("%v", s)
		}
		if s["task_types"].(map[string]any)["imp"].(map[string]any)["enqueued"] != 3.0 {
			t.Fatalf("task types: %v", s["task_types"])
		}
	})

	t.Run("all queues", func(t *testing.T) {
		r := e.mustRun(t, "", "stats")
		golden(t, "stats_all", normalize(r.stdout, rateRE, "<R>", ageRE, "<AGE>"))
		ms := jsonLines(t, e.mustRun(t, "", "-o", "json", "stats").stdout)
		if len(ms) != 2 || ms[1]["queue"] != "beta" || ms[1]["delayed"] != 1.0 || ms[1]["ready"] != 1.0 {
			t.Fatalf("%v", ms)
		}
	})

	t.Run("watch without a terminal", func(t *testing.T) {
		p := e.start(t, "stats", "--watch", "--interval", "50ms")
		// Two rounds, each a header and the table.
		p.waitOut(`(?s)qbridge stats  \S+  every 50ms  \d\d:\d\d:\d\d  \(Ctrl-C to quit\)\n\nQUEUE .*\nalpha .*\nbeta .*\n\nqbridge stats .*\nbeta .*\n`)
		p.signal(syscall.SIGINT)
		if code := p.wait(); code != exitInterrupted {
			t.Fatalf("exit %d\n%s", code, p.stderr)
		}
		if strings.Contains(p.stdout.String(), "\x1b[") {
			t.Fatal("ANSI sequences written to a pipe")
		}
	})

	t.Run("watch json", func(t *testing.T) {
		p := e.start(t, "-o", "json", "stats", "beta", "--watch", "--interval", "50ms")
		p.waitOut(`(?s)("queue":"beta".*){3}`)
		p.signal(syscall.SIGTERM)
		if code := p.wait(); code != exitInterrupted {
			t.Fatalf("exit %d\n%s", code, p.stderr)
		}
		ms := jsonLines(t, p.stdout.String())
		if ms[0]["time"] == ms[1]["time"] || ms[0]["delayed"] != 1.0 {
			t.Fatalf("%v", ms[:2])
		}
	})

	t.Run("watch fails at once without a server", func(t *testing.T) {
		r := e.run(t, "", "--addr", "127.0.0.1:1", "stats", "--watch")
		wantExit(t, "watch", r, exitUnavailable, "cannot connect")
	})
}

func TestAdmin(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("peek", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "pk", "first", "--id", "p1")
		e.mustRun(t, "", "enqueue", "pk", "second", "--id", "p2")
		e.mustRun(t, "", "enqueue", "pk", "later", "--id", "p3", "--delay", "1h")
		golden(t, "peek_ready", normalize(e.mustRun(t, "", "peek", "pk").stdout))
		golden(t, "peek_delayed", normalize(e.mustRun(t, "", "peek", "pk", "--state", "delayed").stdout))
		if r := e.mustRun(t, "", "-o", "json", "peek", "pk", "--limit", "1"); jsonOne(t, r.stdout)["id"] != "p1" {
			t.Fatalf("limit 1: %v", r)
		}
		// In flight: held by a consumer in the background.
		p := e.start(t, "consume", "pk", "--exec", "echo held >&2; sleep 30")
		p.waitErr("held\n")
		m := jsonOne(t, e.mustRun(t, "", "-o", "json", "peek", "pk", "--state", "in-flight").stdout)
		if m["id"] != "p1" || m["state"] != "in-flight" || m["lease_deadline"] == nil || m["deliveries"] != 1.0 {
			t.Fatalf("in flight: %v", m)
		}
		p.signal(syscall.SIGINT)
		p.wait()
		r := e.run(t, "", "peek", "pk", "--state", "gone")
		wantExit(t, "bad state", r, exitUsage, "use ready, delayed, in-flight or dead")
		r = e.run(t, "", "peek", "unknown-queue")
		wantExit(t, "unknown queue", r, exitNotFound, `qbridge: NotFound: queue "unknown-queue" not found`)
	})

	t.Run("purge", func(t *testing.T) {
		e.mustRun(t, "1\n2\n", "enqueue", "pg")
		e.mustRun(t, "", "enqueue", "pg", "later", "--delay", "1h")
		r := e.run(t, "", "purge", "pg")
		wantExit(t, "purge without --yes", r, exitUsage, "add --yes")
		e.wantCounts(t, "pg", 2, 0, 1, 0)
		r = e.mustRun(t, "", "purge", "pg", "--yes")
		if r.stdout != "purged 3 messages of pg\n" {
			t.Fatalf("%v", r)
		}
		e.wantCounts(t, "pg", 0, 0, 0, 0)
		if m := jsonOne(t, e.mustRun(t, "", "-o", "json", "purge", "pg", "-y").stdout); m["purged"] != 0.0 {
			t.Fatalf("%v", m)
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "pz", "held back", "--id", "z1")
		if r := e.mustRun(t, "", "pause", "pz"); r.stdout != "paused pz\n" {
			t.Fatalf("%v", r)
		}
		if e.stats(t, "pz")["paused"] != true {
			t.Fatal("not paused")
		}
		wantExit(t, "consume paused", e.run(t, "", "consume", "pz", "--timeout", "200ms"), exitTimeout)
		if r := e.mustRun(t, "", "-o", "json", "resume", "pz"); jsonOne(t, r.stdout)["paused"] != false {
			t.Fatalf("%v", r)
		}
		if r := e.mustRun(t, "", "consume", "pz", "--count", "1", "--timeout", "10s"); r.stdout != "z1\theld back\n" {
			t.Fatalf("%v", r)
		}
		wantExit(t, "pause unknown", e.run(t, "", "pause", "never-seen"), exitNotFound)
	})

	t.Run("dead letters", func(t *testing.T) {
		for _, id := range []string{"d1", "d2", "d3"} {
			e.mustRun(t, "", "enqueue", "dq", "payload "+id, "--id", id)
		}
		e.mustRun(t, "", "consume", "dq", "--count", "3", "--exec", `echo "failed $QBRIDGE_ID" >&2; exit 100`)
		e.wantCounts(t, "dq", 0, 0, 0, 3)
		golden(t, "dead_list", normalize(e.mustRun(t, "", "dead", "list", "dq").stdout))
		ms := jsonLines(t, e.mustRun(t, "", "-o", "json", "dead", "list", "dq").stdout)
		if len(ms) != 3 || ms[0]["dead_reason"] != "nacked as dead letter" || ms[0]["last_error"] != "failed d1" || ms[0]["dead_time"] == nil {
			t.Fatalf("%v", ms)
		}
		wantExit(t, "replay nothing", e.run(t, "", "dead", "replay", "dq"), exitUsage, "or --all")
		wantExit(t, "replay both", e.run(t, "", "dead", "replay", "dq", "d1", "--all"), exitUsage, "not both")
		if r := e.mustRun(t, "", "dead", "replay", "dq", "d1"); r.stdout != "replayed 1 dead letter of dq\n" {
			t.Fatalf("%v", r)
		}
		e.wantCounts(t, "dq", 1, 0, 0, 2)
		d := jsonOne(t, e.mustRun(t, "", "-o", "json", "consume", "dq", "--count", "1").stdout)
		if d["id"] != "d1" || d["attempt"] != 1.0 || d["last_error"] != "failed d1" {
			t.Fatalf("replayed: %v", d)
		}
		if r := e.mustRun(t, "", "dead", "delete", "dq", "d2"); r.stdout != "deleted 1 dead letter of dq\n" {
			t.Fatalf("%v", r)
		}
		if m := jsonOne(t, e.mustRun(t, "", "-o", "json", "dead", "replay", "dq", "--all").stdout); m["replayed"] != 1.0 {
			t.Fatalf("%v", m)
		}
		e.mustRun(t, "", "consume", "dq", "--count", "1", "--exec", "exit 100")
		if m := jsonOne(t, e.mustRun(t, "", "-o", "json", "dead", "delete", "dq", "--all").stdout); m["deleted"] != 1.0 {
			t.Fatalf("%v", m)
		}
		e.wantCounts(t, "dq", 0, 0, 0, 0)
		if r := e.mustRun(t, "", "dead", "list", "dq"); r.stdout != "" || !strings.Contains(r.stderr, "no dead messages in dq") {
			t.Fatalf("%v", r)
		}
	})

	t.Run("result and message", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "rpc", "2+2", "--id", "job-7", "--task-type", "add", "--keep-result")
		wantExit(t, "no result yet", e.run(t, "", "result", "rpc", "job-7"), exitNotFound, "qbridge: NotFound: ")
		wantExit(t, "wait expires", e.run(t, "", "result", "rpc", "job-7", "--wait", "200ms"), exitTimeout,
			"qbridge: no outcome for message job-7 of rpc within 200ms\n")
		golden(t, "message_ready", e.mustRun(t, "", "message", "rpc", "job-7").stdout)

		// A waiting result is woken by the ack of a worker.
		w := e.start(t, "result", "rpc", "job-7", "--wait", "10s")
		e.mustRun(t, "", "consume", "rpc", "--count", "1", "--result", "--exec", "echo $(( $(cat) ))")
		if code := w.wait(); code != 0 {
			t.Fatalf("result --wait: exit %d\n%s", code, w.stderr)
		}
		golden(t, "result_succeeded", normalize(w.stdout.String()))
		res := jsonOne(t, e.mustRun(t, "", "-o", "json", "result", "rpc", "job-7").stdout)
		if res["result"] != "4\n" || res["result_base64"] != "NAo=" || res["attempts"] != 1.0 || res["state"] != "succeeded" {
			t.Fatalf("%v", res)
		}
		m := jsonOne(t, e.mustRun(t, "", "-o", "json", "message", "rpc", "job-7").stdout)
		if m["state"] != "succeeded" || m["task_type"] != "add" {
			t.Fatalf("%v", m)
		}
		wantExit(t, "unknown message", e.run(t, "", "message", "rpc", "nope"), exitNotFound, "qbridge: NotFound: ")
	})

	t.Run("config", func(t *testing.T) {
		r := e.mustRun(t, "", "config", "set", "cfg", "--max-attempts", "5", "--min-backoff", "2s", "--max-backoff", "5m", "--max-length", "100", "--expired-action", "dead-letter")
		golden(t, "config_set", r.stdout)
		golden(t, "config_get", e.mustRun(t, "", "config", "get", "cfg").stdout)
		m := jsonOne(t, e.mustRun(t, "", "-o", "json", "config", "get", "cfg").stdout)
		if m["max_attempts"] != 5.0 || m["min_backoff"] != "2s" || m["max_length"] != 100.0 || m["expired_action"] != "dead-letter" || m["dedup_window"] != "10m0s" {
			t.Fatalf("%v", m)
		}
		wantExit(t, "bad action", e.run(t, "", "config", "set", "cfg", "--expired-action", "keep"), exitUsage)
		wantExit(t, "bad attempts", e.run(t, "", "config", "set", "cfg", "--max-attempts", "5000"), exitServer, "qbridge: InvalidArgument: ")
		wantExit(t, "get unknown", e.run(t, "", "config", "get", "nothing-here"), exitNotFound)
	})
}
