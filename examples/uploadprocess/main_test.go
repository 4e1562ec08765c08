package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/qbridge/qbridge/examples/internal/exampletest"
)

var servingLine = regexp.MustCompile(`^web: serving on (http://\S+) `)

// 20 uploads are each processed exactly once, and /status shows each one
// succeeded with the right result.
func TestUploadsProcessedOnce(t *testing.T) {
	env := exampletest.Start(t)
	dir := t.TempDir()
	p := exampletest.Go(t, "uploadprocess", run,
		"-addr", env.Addr, "-http", "127.0.0.1:0", "-dir", dir, "-workers", "4", "-work", "0")
	base := p.WaitLine(t, servingLine)[1]

	const n = 20
	contents := map[string]string{} // job id -> uploaded content
	names := map[string]string{}    // job id -> file name
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			name := fmt.Sprintf("file-%02d.txt", i)
			content := strings.Repeat(fmt.Sprintf("line of %s\n", name), i+1)
			id := postUpload(t, base, name, content)
			mu.Lock()
			defer mu.Unlock()
			contents[id], names[id] = content, name
		})
	}
	wg.Wait()
	if len(contents) != n {
		t.Fatalf("%d distinct job ids for %d uploads", len(contents), n)
	}

	for id, content := range contents {
		st := getStatus(t, base, id, "10s")
		checkSucceeded(t, st, names[id], content, 1)
	}

	// Each job was processed once: one start and one finish printed.
	for id := range contents {
		started := p.Lines(regexp.MustCompile(`^worker: process_file ` + id + ` \(attempt (\d+)\): processing `))
		done := p.Lines(regexp.MustCompile(`^worker: process_file ` + id + `: done: `))
		if len(started) != 1 || started[0][1] != "1" || len(done) != 1 {
			t.Errorf("job %s: started %d times, done %d times; want once each, attempt 1", id, len(started), len(done))
		}
	}
	st, err := env.Client.Stats(exampletest.Ctx(t), "task:upload:queue")
	exampletest.Must(t, "Stats", err)
	if st.Ready != 0 || st.InFlight != 0 || st.Counters.Enqueued != n || st.Counters.Acked != n {
		t.Errorf("queue: ready %d, in flight %d, enqueued %d, acked %d; want 0, 0, %d, %d",
			st.Ready, st.InFlight, st.Counters.Enqueued, st.Counters.Acked, n, n)
	}

	// Unknown jobs and bad uploads are told apart.
	if code, body := get(t, base+"/status/no-such-job"); code != http.StatusNotFound {
		t.Errorf("GET /status/no-such-job = %d %s, want 404", code, body)
	}
	var form bytes.Buffer
	mw := multipart.NewWriter(&form)
	exampletest.Must(t, "form field", mw.WriteField("other", "x"))
	exampletest.Must(t, "close form", mw.Close())
	resp, err := exampletest.HTTP.Post(base+"/upload", mw.FormDataContentType(), &form)
	exampletest.Must(t, "POST /upload", err)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("upload without a file field = %d, want 400", resp.StatusCode)
	}
}

// A worker that stops halfway through a job (its context is cancelled while
// the handler is in the slow part) does not lose it: another worker
// processes it, as the job's second attempt.
func TestWorkerDiesHalfway(t *testing.T) {
	env := exampletest.Start(t)
	dir := t.TempDir()
	web := exampletest.Go(t, "web", run, "-mode", "web", "-addr", env.Addr, "-http", "127.0.0.1:0", "-dir", dir)
	base := web.WaitLine(t, servingLine)[1]

	// A worker whose slow part never ends before it is stopped.
	dying := exampletest.Go(t, "dying worker", run, "-mode", "worker", "-addr", env.Addr, "-dir", dir,
		"-workers", "1", "-work", "1h", "-shutdown-timeout", "100ms")
	content := "one\ntwo\nthree\n"
	id := postUpload(t, base, "report.txt", content)
	dying.WaitLine(t, regexp.MustCompile(`^worker: process_file `+id+` \(attempt 1\): processing report.txt$`))
	if st := getStatus(t, base, id, ""); st["state"] != "in flight" || st["deliveries"] != 1.0 {
		t.Errorf("status while the worker holds it: %v; want in flight, 1 delivery", st)
	}

	// Kill it halfway.
	if err := dying.Stop(t); err != nil {
		t.Fatalf("dying worker: %v", err)
	}
	if len(dying.Lines(regexp.MustCompile(`^worker: process_file `+id+`: stopped halfway`))) != 1 ||
		len(dying.Lines(regexp.MustCompile(`: done: `))) != 0 {
		t.Fatalf("the dying worker should have stopped halfway, not finished\n%s", dying.Output())
	}
	noDoneFiles(t, dir)

	// Another worker picks the job up.
	rescuer := exampletest.Go(t, "rescuer", run, "-mode", "worker", "-addr", env.Addr, "-dir", dir, "-work", "0")
	st := getStatus(t, base, id, "10s")
	checkSucceeded(t, st, "report.txt", content, 2)
	if len(rescuer.Lines(regexp.MustCompile(`^worker: process_file `+id+` \(attempt 2\): processing report.txt$`))) != 1 ||
		len(rescuer.Lines(regexp.MustCompile(`^worker: process_file `+id+`: done: report.txt has 3 lines, 3 words, 14 bytes$`))) != 1 {
		t.Errorf("the second worker should have processed the job once, as attempt 2\n%s", rescuer.Output())
	}
}

// A worker whose process crashes halfway through a job (its connection to
// qbridge breaks; it never nacks anything) does not lose it either: the
// server takes the job back when the stream ends, and another worker
// processes it.
func TestWorkerCrashesHalfway(t *testing.T) {
	env := exampletest.Start(t)
	dir := t.TempDir()
	web := exampletest.Go(t, "web", run, "-mode", "web", "-addr", env.Addr, "-http", "127.0.0.1:0", "-dir", dir)
	base := web.WaitLine(t, servingLine)[1]

	// The crashing worker talks to qbridge through a proxy the test cuts.
	proxy := exampletest.StartProxy(t, env.Addr)
	crashing := exampletest.Go(t, "crashing worker", run, "-mode", "worker", "-addr", proxy.Addr, "-dir", dir,
		"-workers", "1", "-work", "1h", "-shutdown-timeout", "100ms")
	content := "a\nb\n"
	id := postUpload(t, base, "app.log", content)
	crashing.WaitLine(t, regexp.MustCompile(`^worker: process_file `+id+` \(attempt 1\): processing app.log$`))

	// Crash: the connection is gone; nothing is acked or nacked.
	proxy.Cut()
	rescuer := exampletest.Go(t, "rescuer", run, "-mode", "worker", "-addr", env.Addr, "-dir", dir, "-work", "0")
	checkSucceeded(t, getStatus(t, base, id, "10s"), "app.log", content, 2)
	if len(rescuer.Lines(regexp.MustCompile(`^worker: process_file `+id+` \(attempt 2\): processing app.log$`))) != 1 {
		t.Errorf("the second worker should have processed the job as attempt 2\n%s", rescuer.Output())
	}
	if err := crashing.Stop(t); err != nil {
		t.Errorf("crashing worker: %v", err)
	}
	if len(crashing.Lines(regexp.MustCompile(`: done: `))) != 0 {
		t.Errorf("the crashed worker finished a job\n%s", crashing.Output())
	}
}

// postUpload posts content as a multipart upload and returns the job id of
// the 202 answer.
func postUpload(t *testing.T, base, name, content string) string {
	t.Helper()
	var form bytes.Buffer
	mw := multipart.NewWriter(&form)
	fw, err := mw.CreateFormFile("file", name)
	exampletest.Must(t, "form file", err)
	_, _ = io.WriteString(fw, content)
	exampletest.Must(t, "close form", mw.Close())
	resp, err := exampletest.HTTP.Post(base+"/upload", mw.FormDataContentType(), &form)
	exampletest.Must(t, "POST /upload", err)
	defer resp.Body.Close()
	var body struct {
		ID     string `json:"id"`
		Name   string `json:"name"`
		Size   int64  `json:"size"`
		Status string `json:"status"`
	}
	exampletest.Must(t, "decode /upload answer", json.NewDecoder(resp.Body).Decode(&body))
	if resp.StatusCode != http.StatusAccepted || body.ID == "" || body.Name != name || body.Size != int64(len(content)) ||
		body.Status != "/status/"+body.ID || resp.Header.Get("Location") != body.Status {
		t.Errorf("POST /upload %s = %d %+v (Location %q); want 202 with the job id", name, resp.StatusCode, body, resp.Header.Get("Location"))
	}
	return body.ID
}

// getStatus returns the decoded answer of GET /status/{id}, which must be
// 200.
func getStatus(t *testing.T, base, id, wait string) map[string]any {
	t.Helper()
	url := base + "/status/" + id
	if wait != "" {
		url += "?wait=" + wait
	}
	code, body := get(t, url)
	if code != http.StatusOK {
		t.Fatalf("GET %s = %d %s", url, code, body)
	}
	var st map[string]any
	exampletest.Must(t, "decode status", json.Unmarshal([]byte(body), &st))
	return st
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := exampletest.HTTP.Get(url)
	exampletest.Must(t, "GET "+url, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	exampletest.Must(t, "read body", err)
	return resp.StatusCode, string(body)
}

// noDoneFiles asserts that no upload in dir was processed.
func noDoneFiles(t *testing.T, dir string) {
	t.Helper()
	done, err := filepath.Glob(filepath.Join(dir, "*.done"))
	exampletest.Must(t, "glob", err)
	if len(done) > 0 {
		t.Fatalf(".done files exist: %v", done)
	}
}

// checkSucceeded checks a /status answer of a job that succeeded on its
// given attempt, and the .done file its worker wrote.
func checkSucceeded(t *testing.T, st map[string]any, name, content string, attempt int) {
	t.Helper()
	raw, _ := json.Marshal(st["result"])
	var res Result
	if err := json.Unmarshal(raw, &res); err != nil || st["state"] != "succeeded" ||
		st["attempts"] != float64(attempt) || st["deliveries"] != float64(attempt) || st["task_type"] != "process_file" {
		t.Errorf("status %v: want a process_file job that succeeded after %d attempt(s), with a result", st, attempt)
		return
	}
	sum := sha256.Sum256([]byte(content))
	want := Result{
		Name:   name,
		Path:   res.Path,
		Bytes:  int64(len(content)),
		Lines:  strings.Count(content, "\n"),
		Words:  len(strings.Fields(content)),
		SHA256: hex.EncodeToString(sum[:]),
		Done:   res.Path + ".done",
	}
	if res != want {
		t.Errorf("result of %s = %+v, want %+v", name, res, want)
	}
	stored, err := os.ReadFile(res.Path)
	if err != nil || string(stored) != content {
		t.Errorf("stored upload %s: %q, %v; want the uploaded content", res.Path, stored, err)
	}
	done, err := os.ReadFile(res.Done)
	if err != nil || !sameJSON(done, raw) {
		t.Errorf(".done file %s: %s, %v; want the result %s", res.Done, done, err, raw)
	}
}

func sameJSON(a, b []byte) bool {
	var x, y Result
	return json.Unmarshal(a, &x) == nil && json.Unmarshal(b, &y) == nil && x == y
}
