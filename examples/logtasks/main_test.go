package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/qbridge/qbridge/client"
	"github.com/qbridge/qbridge/examples/internal/exampletest"
)

var (
	consumingLine = regexp.MustCompile(`^worker: consuming `)
	generatedLine = regexp.MustCompile(`^worker: generate_log_file (\S+): wrote (\d+) lines to (\S+)$`)
	parsedLine    = regexp.MustCompile(`^worker: parse_log_file (\S+): (\S+) has (\d+) lines: `)
	producerLine  = regexp.MustCompile(`^producer: (generate_log_file|parse_log_file) (\{.*\}) -> (\{.*\}) \(attempts (\d+)\)$`)
)

// Worker and producer in one process: both task types are dispatched to
// their handlers, and the producer reads back matching results.
func TestBoth(t *testing.T) {
	env := exampletest.Start(t)
	p := exampletest.Go(t, "logtasks", run, "-addr", env.Addr, "-count", "3", "-lines", "500")
	if err := p.Wait(t); err != nil {
		t.Fatalf("run: %v\n%s", err, p.Output())
	}
	checkProducer(t, p, 3, 500)
	if g, q := len(p.Lines(generatedLine)), len(p.Lines(parsedLine)); g != 3 || q != 3 {
		t.Errorf("worker handled %d generate_log_file and %d parse_log_file tasks, want 3 each\n%s", g, q, p.Output())
	}
}

// Worker and producer as separate runs; tasks that cannot succeed are
// dead-lettered at once and the caller learns why.
func TestProducerWorker(t *testing.T) {
	env := exampletest.Start(t)
	dir := t.TempDir()
	worker := exampletest.Go(t, "worker", run, "-mode", "worker", "-addr", env.Addr, "-dir", dir)
	worker.WaitLine(t, consumingLine)

	producer := exampletest.Go(t, "producer", run, "-mode", "producer", "-addr", env.Addr, "-count", "2", "-lines", "2000")
	if err := producer.Wait(t); err != nil {
		t.Fatalf("producer: %v\n%s", err, producer.Output())
	}
	checkProducer(t, producer, 2, 2000)

	// The worker wrote one file per generate_log_file task, each handled
	// once, and parsed each once.
	gen := worker.Lines(generatedLine)
	parsed := worker.Lines(parsedLine)
	if len(gen) != 2 || len(parsed) != 2 {
		t.Fatalf("worker handled %d generate and %d parse tasks, want 2 each\n%s", len(gen), len(parsed), worker.Output())
	}
	for _, m := range gen {
		if filepath.Dir(m[3]) != dir || m[3] != filepath.Join(dir, m[1]+".log") {
			t.Errorf("generated %s, want %s/<task id>.log", m[3], dir)
		}
		data, err := os.ReadFile(m[3])
		exampletest.Must(t, "read generated file", err)
		if n := strings.Count(string(data), "\n"); n != 2000 {
			t.Errorf("%s has %d lines, want 2000", m[3], n)
		}
	}

	ctx := exampletest.Ctx(t)
	for _, tc := range []struct {
		taskType, params, wantErr string
	}{
		{"parse_log_file", `{"path": "/etc/passwd"}`, `"/etc/passwd" is not a file in ` + dir},
		{"parse_log_file", `{"path": "` + filepath.Join(dir, "missing.log") + `"}`, "no such file or directory"},
		{"parse_log_file", `not json`, "bad params"},
		{"rotate_log_file", `{}`, `no handler for task type "rotate_log_file"`},
	} {
		res, err := env.Client.Call(ctx, "task:logtasks:queue", tc.taskType, []byte(tc.params))
		var te *client.TaskError
		if !errors.As(err, &te) {
			t.Errorf("Call(%s %s) = %v, %v; want a TaskError", tc.taskType, tc.params, res, err)
			continue
		}
		if res.State != client.ResultDead || res.Attempts != 1 || !strings.Contains(res.Error, tc.wantErr) {
			t.Errorf("Call(%s %s): %s after %d attempts with %q; want dead after 1 attempt with %q",
				tc.taskType, tc.params, res.State, res.Attempts, res.Error, tc.wantErr)
		}
	}

	// The worker stops when its context ends, and returns nil.
	if err := worker.Stop(t); err != nil {
		t.Errorf("worker: %v", err)
	}
}

// checkProducer checks the producer's result lines: n generate/parse pairs,
// each parse counting exactly what its generate wrote.
func checkProducer(t *testing.T, p *exampletest.Proc, n, lines int) {
	t.Helper()
	ms := p.Lines(producerLine)
	if len(ms) != 2*n {
		t.Fatalf("producer printed %d results, want %d\n%s", len(ms), 2*n, p.Output())
	}
	for i := 0; i < len(ms); i += 2 {
		gen, parse := ms[i], ms[i+1]
		if gen[1] != "generate_log_file" || parse[1] != "parse_log_file" || gen[4] != "1" || parse[4] != "1" {
			t.Fatalf("producer lines %q, %q: want a generate then a parse, each on attempt 1", gen[0], parse[0])
		}
		var g, q LogFile
		var pp ParseParams
		exampletest.Must(t, "decode generate result", json.Unmarshal([]byte(gen[3]), &g))
		exampletest.Must(t, "decode parse params", json.Unmarshal([]byte(parse[2]), &pp))
		exampletest.Must(t, "decode parse result", json.Unmarshal([]byte(parse[3]), &q))
		sum := g.Levels["INFO"] + g.Levels["WARN"] + g.Levels["ERROR"]
		if g.Lines != lines || sum != lines || pp.Path != g.Path || q.Path != g.Path ||
			q.Lines != lines || !sameLevels(q.Levels, g.Levels) {
			t.Errorf("generate returned %+v, parse of %q returned %+v; want %d lines, the same counts", g, pp.Path, q, lines)
		}
	}
	if len(p.Lines(regexp.MustCompile(`^producer: \d+ log files generated and parsed; every parse matches`))) != 1 {
		t.Errorf("no producer summary\n%s", p.Output())
	}
}
