// Package readmetest runs the shell examples of README.md against a live
// qbridged, so the documentation cannot drift from the service.
//
// An example is a ```sh block preceded by a marker comment:
//
//	<!-- readme-test: MODE [newtoken] [wants=REGEX | wait=REGEX | fails=CODE] -->
//
// MODE "run" runs the block with bash and checks its output against wants
// (or that it failed with gRPC code CODE); "background" starts it, keeps it
// running, and waits until its output matches wait. $ACK_TOKEN is the newest
// ackToken printed by a background block; with "newtoken" the block first
// waits for a token it has not used yet. Lines that set ACK_TOKEN are
// dropped (they are there for people to paste into). localhost:7070 becomes
// the test server's address and redis-cli is pointed at the test's Redis.
package readmetest

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qbridge/qbridge/internal/redistest"
)

type example struct {
	line    int
	mode    string
	newTok  bool
	key     string // wants, wait or fails
	value   string
	command string
}

var markerRE = regexp.MustCompile(`^<!-- readme-test: (.*) -->$`)

func parseReadme(t *testing.T, path string) []example {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	var out []example
	for i := 0; i < len(lines); i++ {
		m := markerRE.FindStringSubmatch(strings.TrimSpace(lines[i]))
		if m == nil {
			continue
		}
		ex := example{line: i + 1}
		words := strings.Fields(m[1])
		ex.mode = words[0]
		for j := 1; j < len(words); j++ {
			if words[j] == "newtoken" {
				ex.newTok = true
				continue
			}
			k, v, ok := strings.Cut(strings.Join(words[j:], " "), "=")
			if !ok {
				t.Fatalf("README.md:%d: bad marker option %q", ex.line, words[j])
			}
			ex.key, ex.value = k, v
			break
		}
		// The next line must open a sh block.
		if i+1 >= len(lines) || strings.TrimSpace(lines[i+1]) != "```sh" {
			t.Fatalf("README.md:%d: marker not followed by a ```sh block", ex.line)
		}
		var body []string
		for i += 2; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
			body = append(body, lines[i])
		}
		ex.command = strings.Join(body, "\n")
		out = append(out, ex)
	}
	return out
}

// output collects a background command's output safely.
type output struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.Write(p)
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

var tokenRE = regexp.MustCompile(`"ackToken":\s*"(v1\.[A-Za-z0-9_-]+)"`)

// TestReadmeExamples runs the examples against qbridged on a real Redis
// (db 5, as in the scenarios), redis-cli examples included.
func TestReadmeExamples(t *testing.T) {
	root := repoRoot(t)
	grpcurl := findTool(t, root, "grpcurl")
	redisCli := findTool(t, root, "redis-cli")
	rs := redistest.Start(t)
	addr := startDaemon(t, root, "--redis-url", rs.URL(5), "--plaintext")
	port := rs.Addr()[strings.LastIndex(rs.Addr(), ":")+1:]
	runExamples(t, root, addr, grpcurl, redisCli, port)
}

// qbridgeBin is the qbridge CLI built for the README examples.
var qbridgeBin string

func buildCLI(t *testing.T, root string) string {
	t.Helper()
	if qbridgeBin != "" {
		return qbridgeBin
	}
	bin := filepath.Join(t.TempDir(), "qbridge")
	build := exec.Command("go", "build", "-o", bin, "./cmd/qbridge")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/qbridge: %v\n%s", err, out)
	}
	return bin
}

// TestReadmeExamplesEmbedded runs them against what `make run` starts: the
// embedded engine (the redis-cli examples need a real Redis and are left
// out).
func TestReadmeExamplesEmbedded(t *testing.T) {
	root := repoRoot(t)
	grpcurl := findTool(t, root, "grpcurl")
	addr := startDaemon(t, root)
	runExamples(t, root, addr, grpcurl, "", "")
}

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func runExamples(t *testing.T, root, addr, grpcurl, redisCli, port string) {
	t.Helper()
	examples := parseReadme(t, filepath.Join(root, "README.md"))
	if len(examples) < 10 {
		t.Fatalf("found %d README examples; the markers are broken", len(examples))
	}
	if redisCli == "" {
		kept := examples[:0]
		for _, ex := range examples {
			if !strings.Contains(ex.command, "redis-cli") {
				kept = append(kept, ex)
			}
		}
		examples = kept
	}
	cli := buildCLI(t, root)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var backgrounds []*output
	used := map[string]bool{}
	token := ""
	latestToken := func() string {
		for i := len(backgrounds) - 1; i >= 0; i-- {
			if m := tokenRE.FindAllStringSubmatch(backgrounds[i].String(), -1); len(m) > 0 {
				return m[len(m)-1][1]
			}
		}
		return ""
	}
	for _, ex := range examples {
		cmdText := rewrite(ex.command, addr, grpcurl, redisCli, port, cli)
		if ex.newTok {
			deadline := time.Now().Add(10 * time.Second)
			for {
				if tok := latestToken(); tok != "" && !used[tok] {
					token = tok
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("README.md:%d: no new ack token appeared in the background output:\n%s", ex.line, backgrounds[len(backgrounds)-1])
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		if token != "" {
			used[token] = true
		}
		switch ex.mode {
		case "background":
			out := &output{}
			cmd := exec.CommandContext(ctx, "bash", "-c", cmdText)
			cmd.Stdout, cmd.Stderr = out, out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cancel(); _ = cmd.Wait() })
			backgrounds = append(backgrounds, out)
			re := regexp.MustCompile(ex.value)
			deadline := time.Now().Add(10 * time.Second)
			for !re.MatchString(out.String()) {
				if time.Now().After(deadline) {
					t.Fatalf("README.md:%d: background output never matched %q:\n%s", ex.line, ex.value, out)
				}
				time.Sleep(20 * time.Millisecond)
			}
		case "run":
			cctx, ccancel := context.WithTimeout(ctx, 20*time.Second)
			cmd := exec.CommandContext(cctx, "bash", "-c", cmdText)
			cmd.Env = append(os.Environ(), "ACK_TOKEN="+token)
			outb, err := cmd.CombinedOutput()
			ccancel()
			out := strings.TrimSpace(string(outb))
			switch ex.key {
			case "fails":
				if err == nil || !strings.Contains(out, "Code: "+ex.value) {
					t.Fatalf("README.md:%d: want failure with code %s, got err=%v output:\n%s", ex.line, ex.value, err, out)
				}
			case "wants":
				if err != nil {
					t.Fatalf("README.md:%d: %v\n%s", ex.line, err, out)
				}
				if !regexp.MustCompile(`(?m)` + ex.value).MatchString(out) {
					t.Fatalf("README.md:%d: output does not match %q:\n%s", ex.line, ex.value, out)
				}
			default:
				t.Fatalf("README.md:%d: run needs wants= or fails=", ex.line)
			}
			t.Logf("README.md:%d ok", ex.line)
		default:
			t.Fatalf("README.md:%d: unknown mode %q", ex.line, ex.mode)
		}
	}
	// The Nack example made terminal 1 receive the message again.
	if !regexp.MustCompile(`"attempt":\s*2`).MatchString(backgrounds[0].String()) {
		t.Fatalf("after the Nack example the consumer did not see attempt 2:\n%s", backgrounds[0])
	}
	// The Publish example reached terminal 1 of the pub/sub section.
	published := false
	for _, b := range backgrounds {
		published = published || strings.Contains(b.String(), `"news.sports"`)
	}
	if !published {
		t.Fatal("the subscriber did not print the published message")
	}
}

func rewrite(cmd, addr, grpcurl, redisCli, port, cli string) string {
	var kept []string
	for _, l := range strings.Split(cmd, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "ACK_TOKEN=") {
			continue
		}
		kept = append(kept, l)
	}
	s := strings.Join(kept, "\n")
	s = strings.ReplaceAll(s, "localhost:7070", addr)
	s = regexp.MustCompile(`(^|\n|\s)grpcurl `).ReplaceAllString(s, "${1}"+grpcurl+" ")
	s = regexp.MustCompile(`(^|\n|\s)redis-cli `).ReplaceAllString(s, "${1}"+redisCli+" -h 127.0.0.1 -p "+port+" ")
	s = regexp.MustCompile(`(^|\n|\s)qbridge `).ReplaceAllString(s, "${1}"+cli+" --addr "+addr+" ")
	return s
}

// findTool looks in ./bin (where make puts pinned tools), then PATH.
func findTool(t *testing.T, root, name string) string {
	t.Helper()
	if p := filepath.Join(root, "bin", name); fileExists(p) {
		return p
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	msg := name + " not found (run `make tools`, or install redis-tools for redis-cli)"
	if v := strings.ToLower(os.Getenv(redistest.RequireEnv)); v == "1" || v == "true" {
		t.Fatal(msg)
	}
	t.Skip("### SKIPPING README examples: " + msg)
	return ""
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

var grpcAddrRE = regexp.MustCompile(`grpc=(\S+)`)

// startDaemon builds and runs qbridged and returns its gRPC address.
func startDaemon(t *testing.T, root string, args ...string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "qbridged")
	build := exec.Command("go", "build", "-o", bin, "./cmd/qbridged")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, append([]string{"--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"}, args...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sent := false
		for sc.Scan() {
			if m := grpcAddrRE.FindStringSubmatch(sc.Text()); m != nil && !sent {
				found <- m[1]
				sent = true
			}
		}
	}()
	select {
	case a := <-found:
		return a
	case <-time.After(20 * time.Second):
		t.Fatal("qbridged did not log its grpc= address")
	}
	return ""
}

var goBlockRE = regexp.MustCompile("(?s)<!-- readme-go: compiles -->\n```go\n(.*?)\n```")

// TestReadmeGoCompiles builds every Go program in README.md marked
// readme-go against this checkout's client package.
func TestReadmeGoCompiles(t *testing.T) {
	root := repoRoot(t)
	data, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := goBlockRE.FindAllSubmatch(data, -1)
	if len(blocks) == 0 {
		t.Fatal("no readme-go block found; the marker is broken")
	}
	for i, b := range blocks {
		out := t.TempDir()
		// Build it as a package of this module, so it uses this checkout.
		pkg := filepath.Join(root, "internal", "readmetest", "testdata", "prog"+strconv.Itoa(i))
		if err := os.MkdirAll(pkg, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(filepath.Join(root, "internal", "readmetest", "testdata")) })
		if err := os.WriteFile(filepath.Join(pkg, "main.go"), b[1], 0o644); err != nil {
			t.Fatal(err)
		}
		build := exec.Command("go", "build", "-o", filepath.Join(out, "bin"), "./internal/readmetest/testdata/prog"+strconv.Itoa(i))
		build.Dir = root
		if msg, err := build.CombinedOutput(); err != nil {
			t.Fatalf("README Go block %d does not build: %v\n%s", i, err, msg)
		}
	}
}
