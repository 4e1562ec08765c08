package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func ctx(t *testing.T) context.Context {
	t.Helper()
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestStartSetGet(t *testing.T) {
	t.Parallel()
	s := Start(t)

	host, port, err := net.SplitHostPort(s.Addr())
	if err != nil {
		t.Fatalf("Addr %q: %v", s.Addr(), err)
	}
	if host != "127.0.0.1" {
		t.Fatalf("Addr host = %q, want 127.0.0.1", host)
	}
	if p, err := strconv.Atoi(port); err != nil || p <= 0 {
		t.Fatalf("Addr port = %q", port)
	}
	if got, want := s.URL(3), "redis://"+s.Addr()+"/3"; got != want {
		t.Fatalf("URL(3) = %q, want %q", got, want)
	}
	if s.PID() <= 0 {
		t.Fatalf("PID() = %d", s.PID())
	}

	c := s.Client(t, 0)
	if err := c.Set(ctx(t), "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	if got, err := c.Get(ctx(t), "k").Result(); err != nil || got != "v" {
		t.Fatalf("GET = %q, %v; want \"v\"", got, err)
	}

	// The URL selects the database; DB 3 is isolated from DB 0.
	opt, err := redis.ParseURL(s.URL(3))
	if err != nil {
		t.Fatalf("ParseURL(%q): %v", s.URL(3), err)
	}
	c3 := redis.NewClient(opt)
	t.Cleanup(func() { _ = c3.Close() })
	if err := c3.Get(ctx(t), "k").Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("GET k in db 3: err = %v, want redis.Nil", err)
	}
	if err := s.Client(t, 3).Set(ctx(t), "k3", "v3", 0).Err(); err != nil {
		t.Fatalf("SET in db 3: %v", err)
	}
	if got, err := c3.Get(ctx(t), "k3").Result(); err != nil || got != "v3" {
		t.Fatalf("GET k3 via URL client = %q, %v; want \"v3\"", got, err)
	}
}

func TestWithArgs(t *testing.T) {
	t.Parallel()
	s := Start(t, WithArgs("--maxmemory", "10mb"))
	got, err := s.Client(t, 0).ConfigGet(ctx(t), "maxmemory").Result()
	if err != nil {
		t.Fatalf("CONFIG GET: %v", err)
	}
	if got["maxmemory"] != strconv.Itoa(10<<20) {
		t.Fatalf("maxmemory = %q, want %d", got["maxmemory"], 10<<20)
	}
	// Defaults are applied too.
	got, err = s.Client(t, 0).ConfigGet(ctx(t), "bind").Result()
	if err != nil {
		t.Fatalf("CONFIG GET bind: %v", err)
	}
	if got["bind"] != "127.0.0.1" {
		t.Fatalf("bind = %q, want 127.0.0.1", got["bind"])
	}
}

func TestRestartPersistence(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		opts        []Option
		down        func(*Server, testing.TB)
		wantSurvive bool
	}{
		{"kill without AOF loses data", nil, (*Server).Kill, false},
		{"stop without AOF loses data", nil, (*Server).Stop, false},
		{"kill with AOF keeps data", []Option{WithAOF()}, (*Server).Kill, true},
		{"stop with AOF keeps data", []Option{WithAOF()}, (*Server).Stop, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := Start(t, tt.opts...)
			addr := s.Addr()
			c := s.Client(t, 5)
			if err := c.Set(ctx(t), "key", "value", 0).Err(); err != nil {
				t.Fatalf("SET: %v", err)
			}
			oldPID := s.PID()

			tt.down(s, t)
			if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				_ = conn.Close()
				t.Fatalf("%s still accepts connections after the server went down", addr)
			}
			// Idempotent: a second Stop/Kill on a dead server is a no-op.
			s.Kill(t)
			s.Stop(t)

			s.Restart(t)
			if s.Addr() != addr {
				t.Fatalf("Addr after Restart = %q, want %q", s.Addr(), addr)
			}
			if s.PID() == oldPID {
				t.Fatalf("PID after Restart = %d, same as before", s.PID())
			}

			// The client created before the restart reconnects.
			got, err := c.Get(ctx(t), "key").Result()
			switch {
			case tt.wantSurvive && (err != nil || got != "value"):
				t.Fatalf("GET after restart = %q, %v; want \"value\"", got, err)
			case !tt.wantSurvive && !errors.Is(err, redis.Nil):
				t.Fatalf("GET after restart = %q, %v; want redis.Nil", got, err)
			}

			// The restarted server is fully usable.
			if err := c.Set(ctx(t), "after", "restart", 0).Err(); err != nil {
				t.Fatalf("SET after restart: %v", err)
			}
		})
	}
}

func TestRestartWhileRunning(t *testing.T) {
	t.Parallel()
	s := Start(t, WithAOF())
	c := s.Client(t, 0)
	if err := c.Set(ctx(t), "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	s.Restart(t) // stops gracefully first
	if got, err := c.Get(ctx(t), "k").Result(); err != nil || got != "v" {
		t.Fatalf("GET after restart = %q, %v; want \"v\"", got, err)
	}
}

func TestRepeatedKillRestart(t *testing.T) {
	t.Parallel()
	s := Start(t, WithAOF())
	c := s.Client(t, 0)
	for i := range 3 {
		if err := c.Incr(ctx(t), "n").Err(); err != nil {
			t.Fatalf("round %d: INCR: %v", i, err)
		}
		s.Kill(t)
		s.Restart(t)
	}
	if got, err := c.Get(ctx(t), "n").Int(); err != nil || got != 3 {
		t.Fatalf("n = %d, %v; want 3", got, err)
	}
}

func TestParallelServersAreIsolated(t *testing.T) {
	t.Parallel()
	const n = 4
	servers := make([]*Server, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Start must be called with a TB whose Fatal may run on
			// this goroutine; use a sub-TB that reports via t.Errorf.
			servers[i] = startInGoroutine(t)
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	ports := map[string]int{}
	pids := map[int]int{}
	for i, s := range servers {
		if j, dup := ports[s.Addr()]; dup {
			t.Fatalf("servers %d and %d share address %s", j, i, s.Addr())
		}
		ports[s.Addr()] = i
		if j, dup := pids[s.PID()]; dup {
			t.Fatalf("servers %d and %d share PID %d", j, i, s.PID())
		}
		pids[s.PID()] = i
		if err := s.Client(t, 0).Set(ctx(t), "who", i, 0).Err(); err != nil {
			t.Fatalf("server %d: SET: %v", i, err)
		}
	}
	for i, s := range servers {
		got, err := s.Client(t, 0).Get(ctx(t), "who").Int()
		if err != nil || got != i {
			t.Fatalf("server %d: who = %d, %v; want %d", i, got, err, i)
		}
	}
}

// goroutineTB lets Start run on a goroutine other than the test's: Fatal and
// Skip record the message and end only that goroutine.
type goroutineTB struct {
	testing.TB
	mu      sync.Mutex
	fatal   string
	skipped string
}

func (g *goroutineTB) Fatalf(format string, args ...any) {
	g.mu.Lock()
	g.fatal = fmt.Sprintf(format, args...)
	g.mu.Unlock()
	g.TB.Errorf(format, args...)
	runtime.Goexit()
}

func (g *goroutineTB) Skipf(format string, args ...any) {
	g.mu.Lock()
	g.skipped = fmt.Sprintf(format, args...)
	g.mu.Unlock()
	runtime.Goexit()
}

func startInGoroutine(t *testing.T) *Server {
	return Start(&goroutineTB{TB: t})
}

func TestMissingBinary(t *testing.T) {
	// Not parallel: uses t.Setenv and swaps findRedisServer.
	orig := findRedisServer
	findRedisServer = func() string { return "" }
	t.Cleanup(func() { findRedisServer = orig })

	tests := []struct {
		env       string
		wantFatal bool
	}{
		{"", false},
		{"0", false},
		{"false", false},
		{"1", true},
		{"true", true},
		{"TRUE", true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s=%q", RequireEnv, tt.env), func(t *testing.T) {
			t.Setenv(RequireEnv, tt.env)
			// A fake TB whose Errorf is swallowed, so the expected Fatal
			// does not fail this test.
			fake := &goroutineTB{TB: quietTB{t}}
			done := make(chan *Server, 1)
			go func() {
				defer close(done)
				done <- Start(fake)
			}()
			if s, ok := <-done; ok {
				t.Fatalf("Start returned %v, want Fatal or Skip", s)
			}
			fake.mu.Lock()
			defer fake.mu.Unlock()
			if tt.wantFatal {
				if fake.fatal == "" || fake.skipped != "" {
					t.Fatalf("fatal=%q skipped=%q; want Fatal", fake.fatal, fake.skipped)
				}
				if !strings.Contains(fake.fatal, "redis-server not found") {
					t.Fatalf("fatal message %q lacks reason", fake.fatal)
				}
				return
			}
			if fake.skipped == "" || fake.fatal != "" {
				t.Fatalf("fatal=%q skipped=%q; want Skip", fake.fatal, fake.skipped)
			}
			for _, want := range []string{"SKIPPING real-Redis test: redis-server not found; install it (apt-get install -y redis-server)", RequireEnv} {
				if !strings.Contains(fake.skipped, want) {
					t.Fatalf("skip message %q lacks %q", fake.skipped, want)
				}
			}
		})
	}
}

// quietTB swallows Errorf so that an expected Fatal in TestMissingBinary does
// not fail the test.
type quietTB struct{ testing.TB }

func (quietTB) Errorf(string, ...any) {}

func TestCleanupRemovesDirAndKillsProcess(t *testing.T) {
	t.Parallel()
	var s *Server
	var dir string
	var pid int
	t.Run("inner", func(t *testing.T) {
		s = Start(t, WithAOF())
		dir, pid = s.Dir(), s.PID()
		if _, err := os.Stat(dir); err != nil {
			t.Fatalf("data dir: %v", err)
		}
	})
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("data dir %s still exists after cleanup (err=%v)", dir, err)
	}
	p := s.current()
	if p == nil || !p.exited() {
		t.Fatalf("redis-server pid %d not reaped after cleanup", pid)
	}
	// Calling Stop/Kill after cleanup is harmless.
	s.Stop(t)
	s.Kill(t)
}

func TestLaunchDetectsPortInUse(t *testing.T) {
	t.Parallel()
	bin := findRedisServer()
	if bin == "" {
		t.Skip("redis-server not found")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s := &Server{bin: bin, dir: t.TempDir(), port: l.Addr().(*net.TCPAddr).Port}
	err = s.launch()
	if !errors.Is(err, errPortInUse) {
		t.Fatalf("launch on a taken port: err = %v, want errPortInUse", err)
	}
	if p := s.current(); p == nil || !p.exited() {
		t.Fatalf("failed process was not reaped")
	}
}

func TestRestartRetriesWhilePortTaken(t *testing.T) {
	t.Parallel()
	s := Start(t)
	s.Kill(t)

	// Occupy the port; release it as soon as Restart has failed once.
	l, err := net.Listen("tcp", s.Addr())
	if err != nil {
		t.Fatalf("occupy %s: %v", s.Addr(), err)
	}
	released := make(chan struct{})
	go func() {
		defer close(released)
		defer l.Close()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		deadline := time.After(10 * time.Second)
		for {
			if strings.Contains(readFrom(s.logPath(), 0), "Address already in use") {
				return
			}
			select {
			case <-tick.C:
			case <-deadline:
				return
			}
		}
	}()

	s.Restart(t)
	<-released
	if err := s.Client(t, 0).Ping(ctx(t)).Err(); err != nil {
		t.Fatalf("PING after restart: %v", err)
	}
}
