package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestEnqueue(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("from argument", func(t *testing.T) {
		r := e.mustRun(t, "", "enqueue", "arg", "hello")
		if !uuidRE.MatchString(r.stdout) || strings.Count(r.stdout, "\n") != 1 {
			t.Fatalf("want one server-assigned id, got %q", r.stdout)
		}
		r2 := e.mustRun(t, "", "enqueue", "arg", "hello again", "--id", "job-1")
		golden(t, "enqueue_arg", normalize(r.stdout+r2.stdout))
		if n := e.methodCalls("Enqueue"); n != 2 {
			t.Errorf("Enqueue calls = %d, want 2", n)
		}
		peek := jsonLines(t, e.mustRun(t, "", "-o", "json", "peek", "arg").stdout)
		if len(peek) != 2 || peek[0]["payload"] != "hello" || peek[1]["id"] != "job-1" || peek[1]["payload"] != "hello again" {
			t.Fatalf("peek after enqueue: %v", peek)
		}
	})

	t.Run("json", func(t *testing.T) {
		r := e.mustRun(t, "", "-o", "json", "enqueue", "js", "x", "--id", "j-1")
		m := jsonOne(t, r.stdout)
		if m["queue"] != "js" || m["id"] != "j-1" || m["duplicate"] != false {
			t.Fatalf("got %v", m)
		}
	})

	t.Run("stdin lines via batch", func(t *testing.T) {
		before := e.methodCalls("EnqueueBatch")
		r := e.mustRun(t, "one\ntwo\r\n\nthree", "enqueue", "lines")
		ids := strings.Fields(r.stdout)
		if len(ids) != 3 {
			t.Fatalf("want 3 ids, got %q", r.stdout)
		}
		if n := e.methodCalls("EnqueueBatch") - before; n != 1 {
			t.Errorf("EnqueueBatch calls = %d, want 1", n)
		}
		peek := jsonLines(t, e.mustRun(t, "", "-o", "json", "peek", "lines").stdout)
		var got []string
		for i, m := range peek {
			got = append(got, m["payload"].(string))
			if m["id"] != ids[i] {
				t.Errorf("message %d has id %v, printed %s", i, m["id"], ids[i])
			}
		}
		if strings.Join(got, ",") != "one,two,three" {
			t.Fatalf("payloads %q, want one,two,three (empty line skipped, CR stripped)", got)
		}
	})

	t.Run("batch size", func(t *testing.T) {
		before := e.methodCalls("EnqueueBatch")
		r := e.mustRun(t, "1\n2\n3\n4\n5\n", "-o", "json", "enqueue", "batched", "--batch-size", "2")
		if n := len(jsonLines(t, r.stdout)); n != 5 {
			t.Fatalf("want 5 results, got %d", n)
		}
		if n := e.methodCalls("EnqueueBatch") - before; n != 3 {
			t.Errorf("EnqueueBatch calls = %d, want 3 (2+2+1)", n)
		}
		e.wantCounts(t, "batched", 5, 0, 0, 0)
	})

	t.Run("file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "in.txt")
		if err := os.WriteFile(path, []byte("alpha\nbeta\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		r := e.mustRun(t, "", "enqueue", "fileq", "--file", path, "--task-type", "import")
		if n := len(strings.Fields(r.stdout)); n != 2 {
			t.Fatalf("want 2 ids, got %q", r.stdout)
		}
		r = e.mustRun(t, "", "-o", "json", "enqueue", "fileq", "--file", path, "--whole", "--id", "whole-1")
		if m := jsonOne(t, r.stdout); m["id"] != "whole-1" {
			t.Fatalf("got %v", m)
		}
		peek := jsonLines(t, e.mustRun(t, "", "-o", "json", "peek", "fileq").stdout)
		if len(peek) != 3 || peek[0]["payload"] != "alpha" || peek[1]["payload"] != "beta" || peek[2]["payload"] != "alpha\nbeta\n" {
			t.Fatalf("peek: %v", peek)
		}
		s := e.stats(t, "fileq")
		if tt := s["task_types"].(map[string]any)["import"].(map[string]any); tt["enqueued"] != 2.0 {
			t.Fatalf("task type counters: %v", tt)
		}
		wantExit(t, "missing file", e.run(t, "", "enqueue", "fileq", "--file", filepath.Join(t.TempDir(), "nope")), exitUsage, "qbridge: --file:")
	})

	t.Run("whole stdin is binary safe", func(t *testing.T) {
		e.mustRun(t, "\xff\x00bin\n", "enqueue", "bin", "--whole")
		m := jsonOne(t, e.mustRun(t, "", "-o", "json", "peek", "bin").stdout)
		if m["payload"] != nil || m["payload_base64"] != "/wBiaW4K" {
			t.Fatalf("binary payload: %v", m)
		}
		golden(t, "peek_binary", normalize(e.mustRun(t, "", "peek", "bin").stdout))
	})

	t.Run("options", func(t *testing.T) {
		at := time.Now().Add(2 * time.Hour).UTC().Format(time.RFC3339)
		e.mustRun(t, "", "enqueue", "opts", "later", "--delay", "1h", "--id", "d-1", "-H", "a=1", "--header", "b=x=y")
		e.mustRun(t, "", "enqueue", "opts", "at", "--at", at, "--id", "d-2")
		e.mustRun(t, "", "enqueue", "opts", "ttl", "--ttl", "1h", "--id", "t-1", "--task-type", "tt", "--keep-result")
		e.wantCounts(t, "opts", 1, 0, 2, 0)
		delayed := jsonLines(t, e.mustRun(t, "", "-o", "json", "peek", "opts", "--state", "delayed").stdout)
		if len(delayed) != 2 || delayed[0]["id"] != "d-1" || delayed[1]["id"] != "d-2" {
			t.Fatalf("delayed: %v", delayed)
		}
		h := delayed[0]["headers"].(map[string]any)
		if h["a"] != "1" || h["b"] != "x=y" {
			t.Fatalf("headers: %v", h)
		}
		if dt := delayed[1]["deliver_time"].(string); !strings.HasPrefix(dt, at[:16]) {
			t.Fatalf("deliver_time %s, want %s", dt, at)
		}
		ready := jsonOne(t, e.mustRun(t, "", "-o", "json", "peek", "opts").stdout)
		if ready["expire_time"] == nil {
			t.Fatalf("ttl message has no expire_time: %v", ready)
		}
		msg := jsonOne(t, e.mustRun(t, "", "-o", "json", "message", "opts", "t-1").stdout)
		if msg["task_type"] != "tt" || msg["state"] != "ready" {
			t.Fatalf("message: %v", msg)
		}
	})

	t.Run("dedup", func(t *testing.T) {
		r1 := e.mustRun(t, "", "enqueue", "dd", "order 42", "--dedup-key", "order-42")
		r2 := e.mustRun(t, "", "-o", "json", "enqueue", "dd", "order 42", "--dedup-key", "order-42")
		m := jsonOne(t, r2.stdout)
		if m["duplicate"] != true || m["id"] != strings.TrimSpace(r1.stdout) {
			t.Fatalf("second enqueue: %v (first id %s)", m, r1.stdout)
		}
		r3 := e.mustRun(t, "", "enqueue", "dd", "order 42", "--dedup-key", "order-42")
		if strings.TrimSpace(r3.stdout) != strings.TrimSpace(r1.stdout) || !strings.Contains(r3.stderr, "duplicate") {
			t.Fatalf("text duplicate: %v", r3)
		}
		e.wantCounts(t, "dd", 1, 0, 0, 0)
	})

	t.Run("usage errors", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			msg  string
		}{
			{[]string{"enqueue", "u", "--id", "x"}, "--id and --dedup-key name a single message"},
			{[]string{"enqueue", "u", "p", "--delay", "1s", "--at", "2030-01-01T00:00:00Z"}, "not both"},
			{[]string{"enqueue", "u", "p", "--at", "tomorrow"}, "RFC 3339"},
			{[]string{"enqueue", "u", "p", "-H", "novalue"}, "key=value"},
			{[]string{"enqueue", "u", "p", "--file", "x"}, "not both"},
			{[]string{"enqueue"}, "accepts between 1 and 2 arg(s)"},
		} {
			wantExit(t, strings.Join(tc.args, " "), e.run(t, "a\n", tc.args...), exitUsage, tc.msg)
		}
	})

	t.Run("server error mid-way", func(t *testing.T) {
		// A bounded queue takes the first batch and refuses the second:
		// the first stays enqueued, its ids printed.
		e.mustRun(t, "", "config", "set", "bounded", "--max-length", "2")
		r := e.run(t, "1\n2\n3\n", "enqueue", "bounded", "--batch-size", "2")
		wantExit(t, "full queue", r, exitServer,
			"qbridge: 2 messages were enqueued; the batch of input lines 3 onwards (1 messages) was not\n",
			"\nqbridge: ResourceExhausted: ")
		if n := len(strings.Fields(r.stdout)); n != 2 {
			t.Fatalf("want the 2 ids of the first batch, got %q", r.stdout)
		}
		e.wantCounts(t, "bounded", 2, 0, 0, 0)
		r = e.run(t, "1\n", "enqueue", "bad name")
		wantExit(t, "bad queue", r, exitServer, "qbridge: InvalidArgument: queue name")
	})
}

// A partial batch from a pipe that stays open goes out within the linger
// time, not when the input ends.
func TestEnqueueFlushesPartialBatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	p := e.start(t, "enqueue", "live", "--batch-size", "500")
	for i := 1; i <= 3; i++ {
		fmt.Fprintf(p.stdin, "line %d\n", i)
		// The id of each line appears while stdin is still open.
		p.waitOut(fmt.Sprintf(`(?s)(%s\n.*){%d}`, uuidRE, i))
	}
	e.wantCounts(t, "live", 3, 0, 0, 0)
	if err := p.stdin.Close(); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(); code != 0 {
		t.Fatalf("exit %d\n%s", code, p.stderr)
	}
}
