package main

import (
	"strings"
	"syscall"
	"testing"
)

func TestConsume(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("count acks", func(t *testing.T) {
		for _, id := range []string{"m1", "m2", "m3"} {
			e.mustRun(t, "", "enqueue", "cq", "payload of "+id, "--id", id)
		}
		e.mustRun(t, "", "enqueue", "cq", "two\nlines\t", "--id", "m4")
		r := e.mustRun(t, "", "consume", "cq", "--count", "4")
		golden(t, "consume_count", normalize(r.stdout))
		e.wantCounts(t, "cq", 0, 0, 0, 0)
		if acked := e.stats(t, "cq")["counters"].(map[string]any)["acked"]; acked != 4.0 {
			t.Fatalf("acked = %v, want 4", acked)
		}
	})

	t.Run("json", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "cj", "hi", "--id", "j1", "-H", "k=v", "--task-type", "greet")
		d := jsonOne(t, e.mustRun(t, "", "-o", "json", "consume", "cj", "--count", "1").stdout)
		want := map[string]any{"queue": "cj", "id": "j1", "payload": "hi", "payload_base64": "aGk=", "attempt": 1.0, "task_type": "greet"}
		for k, v := range want {
			if d[k] != v {
				t.Errorf("%s = %v, want %v", k, d[k], v)
			}
		}
		if d["headers"].(map[string]any)["k"] != "v" || d["lease_deadline"] == nil || d["enqueue_time"] == nil {
			t.Errorf("delivery: %v", d)
		}
		e.wantCounts(t, "cj", 0, 0, 0, 0)
	})

	t.Run("no-ack", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "cn", "auto", "--id", "n1")
		d := jsonOne(t, e.mustRun(t, "", "-o", "json", "consume", "cn", "--no-ack", "--count", "1").stdout)
		if d["id"] != "n1" || d["lease_deadline"] != nil {
			t.Fatalf("auto-ack delivery: %v", d)
		}
		e.wantCounts(t, "cn", 0, 0, 0, 0)
		// Taken for good: it counts as acked (the queue's ack rate and
		// totals include auto-ack consumers).
		if acked := e.stats(t, "cn")["counters"].(map[string]any)["acked"]; acked != 1.0 {
			t.Fatalf("auto-ack counted %v acked messages, want 1", acked)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		r := e.run(t, "", "consume", "empty", "--timeout", "200ms")
		wantExit(t, "empty queue", r, exitTimeout, "qbridge: no message within 200ms\n")
		if r.stdout != "" {
			t.Fatalf("stdout: %q", r.stdout)
		}
		e.mustRun(t, "", "enqueue", "few", "only one", "--id", "f1")
		r = e.run(t, "", "consume", "few", "--count", "2", "--timeout", "1s")
		wantExit(t, "short queue", r, exitTimeout, "got 1 of --count 2")
		if r.stdout != "f1\tonly one\n" {
			t.Fatalf("stdout: %q", r.stdout)
		}
		// Without --count, an idle timeout after some messages is a drain.
		e.mustRun(t, "a\nb\n", "enqueue", "drain")
		r = e.mustRun(t, "", "consume", "drain", "--timeout", "1s")
		if n := strings.Count(r.stdout, "\n"); n != 2 {
			t.Fatalf("drain printed %d lines: %q", n, r.stdout)
		}
		e.wantCounts(t, "drain", 0, 0, 0, 0)
	})

	t.Run("priorities", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "low", "normal", "--id", "p-low")
		e.mustRun(t, "", "enqueue", "high", "urgent", "--id", "p-high")
		r := e.mustRun(t, "", "consume", "high", "low", "--count", "2")
		golden(t, "consume_priorities", normalize(r.stdout))
	})

	t.Run("interrupt", func(t *testing.T) {
		// (That a message held unacked goes back on Ctrl-C is tested with
		// --exec, where it is held for long.)
		e.mustRun(t, "", "enqueue", "intr", "first", "--id", "i1")
		p := e.start(t, "consume", "intr")
		p.waitOut("i1\tfirst\n")
		e.waitCounts(t, "intr", 0, 0) // acked after it was printed
		p.signal(syscall.SIGINT)
		if code := p.wait(); code != exitInterrupted {
			t.Fatalf("exit %d, want %d\n%s", code, exitInterrupted, p.stderr)
		}
		if s := p.stderr.String(); s != "" {
			t.Fatalf("stderr after Ctrl-C: %q", s)
		}
		if acked := e.stats(t, "intr")["counters"].(map[string]any)["acked"]; acked != 1.0 {
			t.Fatalf("acked = %v, want 1", acked)
		}
	})

	t.Run("usage", func(t *testing.T) {
		for _, args := range [][]string{
			{"consume", "q", "--result"},
			{"consume", "q", "--concurrency", "2"},
			{"consume", "q", "--no-ack", "--exec", "cat"},
			{"consume", "q", "--count", "-1"},
			{"consume", "q", "--exec", "cat", "--dead-letter-code", "0"},
		} {
			wantExit(t, strings.Join(args, " "), e.run(t, "", args...), exitUsage)
		}
	})
}

func TestConsumeExec(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("ack with result and environment", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "ex", "2+3", "--id", "e1", "--task-type", "add", "--keep-result")
		r := e.mustRun(t, "", "consume", "ex", "--count", "1", "--result", "--exec",
			`echo "in=$(cat) id=$QBRIDGE_ID queue=$QBRIDGE_QUEUE attempt=$QBRIDGE_ATTEMPT type=$QBRIDGE_TASK_TYPE"`)
		if r.stdout != "" {
			t.Fatalf("stdout with --result: %q", r.stdout)
		}
		if want := "qbridge: ex e1 attempt 1: acked with a result\n"; r.stderr != want {
			t.Fatalf("stderr %q, want %q", r.stderr, want)
		}
		res := jsonOne(t, e.mustRun(t, "", "-o", "json", "result", "ex", "e1").stdout)
		if want := "in=2+3 id=e1 queue=ex attempt=1 type=add\n"; res["result"] != want || res["state"] != "succeeded" {
			t.Fatalf("result %v, want %q", res, want)
		}
		e.wantCounts(t, "ex", 0, 0, 0, 0)
	})

	t.Run("stdout passes through", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "pass", "hello", "--id", "s1")
		r := e.mustRun(t, "", "consume", "pass", "--count", "1", "--exec", "tr a-z A-Z")
		if r.stdout != "HELLO" {
			t.Fatalf("stdout %q", r.stdout)
		}
		e.wantCounts(t, "pass", 0, 0, 0, 0)
	})

	t.Run("non-zero retries with the stderr tail", func(t *testing.T) {
		// A backoff far longer than it takes the first consumer to exit,
		// so that its stream cannot take the retry again (0.3s to 3s).
		e.mustRun(t, "", "config", "set", "fail", "--min-backoff", "3s", "--max-backoff", "3s")
		e.mustRun(t, "", "enqueue", "fail", "bad input", "--id", "f1")
		r := e.mustRun(t, "", "consume", "fail", "--count", "1", "--exec",
			`echo noise; echo "warming up" >&2; echo "boom: cannot parse line 3" >&2; exit 1`)
		wantExit(t, "retry log", r, 0, "qbridge: fail f1 attempt 1: exit status 1, to be retried: warming up; boom: cannot parse line 3\n")
		// Delivered again after the backoff, with attempt 2 and the error.
		d := jsonOne(t, e.mustRun(t, "", "-o", "json", "consume", "fail", "--count", "1", "--timeout", "10s").stdout)
		if d["id"] != "f1" || d["attempt"] != 2.0 || d["last_error"] != "warming up\nboom: cannot parse line 3" {
			t.Fatalf("redelivery: %v", d)
		}
		// EX_TEMPFAIL (75) retries too; no stderr gives a generic error,
		// which the next attempt sees.
		e.mustRun(t, "", "enqueue", "fail", "again", "--id", "f2")
		r = e.mustRun(t, "", "consume", "fail", "--count", "1", "--exec", "exit 75")
		wantExit(t, "tempfail", r, 0, "f2 attempt 1: exit status 75, to be retried: command failed: exit status 75")
		r = e.mustRun(t, "", "consume", "fail", "--count", "1", "--timeout", "10s", "--exec", `echo "$QBRIDGE_ATTEMPT: $QBRIDGE_LAST_ERROR"`)
		if r.stdout != "2: command failed: exit status 75\n" {
			t.Fatalf("second attempt: %v", r)
		}
	})

	t.Run("dead-letter code", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "dl", "poison", "--id", "x1", "--keep-result")
		r := e.mustRun(t, "", "consume", "dl", "--count", "1", "--exec", `echo "unparseable" >&2; exit 100`)
		wantExit(t, "dead-letter log", r, 0, "x1 attempt 1: exit status 100, dead-lettered: unparseable")
		e.wantCounts(t, "dl", 0, 0, 0, 1)
		golden(t, "consume_exec_dead_list", normalize(e.mustRun(t, "", "dead", "list", "dl").stdout))
		res := jsonOne(t, e.mustRun(t, "", "-o", "json", "result", "dl", "x1").stdout)
		if res["state"] != "dead" || res["error"] != "unparseable" {
			t.Fatalf("result: %v", res)
		}
		// Another code can be chosen.
		e.mustRun(t, "", "enqueue", "dl", "poison 2", "--id", "x2")
		e.mustRun(t, "", "consume", "dl", "--count", "1", "--exec", "exit 3", "--dead-letter-code", "3")
		e.wantCounts(t, "dl", 0, 0, 0, 2)
	})

	t.Run("concurrency", func(t *testing.T) {
		e.mustRun(t, "1\n2\n3\n4\n5\n6\n", "enqueue", "par")
		r := e.mustRun(t, "", "consume", "par", "--count", "6", "--concurrency", "3", "--exec", "cat; echo")
		got := strings.Fields(r.stdout)
		if len(got) != 6 || strings.Count(r.stderr, "acked") != 6 {
			t.Fatalf("%v", r)
		}
		e.wantCounts(t, "par", 0, 0, 0, 0)
	})

	t.Run("interrupt stops the command and requeues", func(t *testing.T) {
		e.mustRun(t, "", "enqueue", "slow", "work", "--id", "w1")
		p := e.start(t, "consume", "slow", "--exec", `echo started >&2; sleep 30; echo finished`)
		p.waitErr("started\n")
		e.wantCounts(t, "slow", 0, 1, 0, 0)
		p.signal(syscall.SIGINT)
		if code := p.wait(); code != exitInterrupted {
			t.Fatalf("exit %d, want %d\nstderr:\n%s", code, exitInterrupted, p.stderr)
		}
		if strings.Contains(p.stdout.String(), "finished") {
			t.Fatal("the command was not stopped")
		}
		// Back on the queue, not settled.
		e.waitCounts(t, "slow", 1, 0)
		m := jsonOne(t, e.mustRun(t, "", "-o", "json", "message", "slow", "w1").stdout)
		if m["state"] != "ready" || m["last_error"] != nil {
			t.Fatalf("message after interrupt: %v", m)
		}
	})
}
