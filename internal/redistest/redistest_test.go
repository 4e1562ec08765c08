package redistest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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

	"github.com/qbridge/qbridge/internal/testcerts"
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
	if got, want := s.URL(3), "redis://qbridge:"+ServicePassword+"@"+s.Addr()+"/3"; got != want {
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

	// The URL selects the database; DB 3 is isolated from DB 0. (The URL
	// is the service user's, who may not GET: it checks with HGET.)
	opt, err := redis.ParseURL(s.URL(3))
	if err != nil {
		t.Fatalf("ParseURL(%q): %v", s.URL(3), err)
	}
	if opt.Username != ServiceUser || opt.Password != ServicePassword || opt.DB != 3 || opt.Addr != s.Addr() {
		t.Fatalf("ParseURL(%q) = user %q password %q db %d addr %q", s.URL(3), opt.Username, opt.Password, opt.DB, opt.Addr)
	}
	c3 := redis.NewClient(opt)
	t.Cleanup(func() { _ = c3.Close() })
	if err := s.Client(t, 0).HSet(ctx(t), "h", "f", "v0").Err(); err != nil {
		t.Fatalf("HSET: %v", err)
	}
	if err := c3.HGet(ctx(t), "h", "f").Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("HGET h f in db 3: err = %v, want redis.Nil", err)
	}
	if err := s.Client(t, 3).HSet(ctx(t), "h", "f", "v3").Err(); err != nil {
		t.Fatalf("HSET in db 3: %v", err)
	}
	if got, err := c3.HGet(ctx(t), "h", "f").Result(); err != nil || got != "v3" {
		t.Fatalf("HGET h f via URL client = %q, %v; want \"v3\"", got, err)
	}
}

// isNoPerm reports whether err is Redis' ACL refusal.
func isNoPerm(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "NOPERM")
}

func serviceClient(t *testing.T, s *Server, db int) *redis.Client {
	t.Helper()
	c := redis.NewClient(s.ServiceOptions(db))
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestServiceUser(t *testing.T) {
	t.Parallel()
	s := Start(t, WithAOF())
	svc := serviceClient(t, s, 2)
	admin := s.Client(t, 2)

	check := func(when string) {
		t.Helper()
		if who, err := svc.Do(ctx(t), "ACL", "WHOAMI").Text(); !isNoPerm(err) {
			t.Fatalf("%s: service user ran ACL WHOAMI: %q, %v; want NOPERM", when, who, err)
		}
		if err := svc.RPush(ctx(t), "q", "m").Err(); err != nil {
			t.Fatalf("%s: service user RPUSH: %v", when, err)
		}
		if err := svc.FlushAll(ctx(t)).Err(); !isNoPerm(err) {
			t.Fatalf("%s: service user FLUSHALL: %v; want NOPERM", when, err)
		}
		if err := svc.Keys(ctx(t), "*").Err(); !isNoPerm(err) {
			t.Fatalf("%s: service user KEYS: %v; want NOPERM", when, err)
		}
		if n, err := admin.LLen(ctx(t), "q").Result(); err != nil || n == 0 {
			t.Fatalf("%s: LLEN q = %d, %v; want the service user's pushes", when, n, err)
		}
		if who, err := admin.Do(ctx(t), "ACL", "WHOAMI").Text(); err != nil || who != "default" {
			t.Fatalf("%s: Client's ACL WHOAMI = %q, %v; want default", when, who, err)
		}
	}
	check("after Start")
	// The user is part of every launch, not a runtime change.
	s.Restart(t)
	check("after Restart")
	s.Kill(t)
	s.Restart(t)
	check("after Kill and Restart")

	// The default user keeps every permission.
	if err := admin.FlushAll(ctx(t)).Err(); err != nil {
		t.Fatalf("default user FLUSHALL: %v", err)
	}
	if n, err := admin.DBSize(ctx(t)).Result(); err != nil || n != 0 {
		t.Fatalf("DBSIZE after FLUSHALL = %d, %v", n, err)
	}
}

func TestServicePrefix(t *testing.T) {
	t.Parallel()
	s := Start(t, WithServicePrefix("app:"))
	svc := serviceClient(t, s, 0)
	for _, k := range []string{"app:q", "{app:q}:qb:seq"} {
		if err := svc.RPush(ctx(t), k, "m").Err(); err != nil {
			t.Fatalf("RPUSH %s: %v", k, err)
		}
	}
	for _, k := range []string{"q", "other:q", "{q}:qb:seq"} {
		if err := svc.RPush(ctx(t), k, "m").Err(); !isNoPerm(err) {
			t.Fatalf("RPUSH %s: %v; want NOPERM", k, err)
		}
	}
	// Without the option the user reaches every key.
	s0 := Start(t)
	if err := serviceClient(t, s0, 0).RPush(ctx(t), "q", "m").Err(); err != nil {
		t.Fatalf("RPUSH q without a prefix: %v", err)
	}
}

func TestTLS(t *testing.T) {
	t.Parallel()
	s := Start(t, WithTLS())

	if got, want := s.URL(4), "rediss://qbridge:"+ServicePassword+"@"+s.Addr()+"/4"; got != want {
		t.Fatalf("URL(4) = %q, want %q", got, want)
	}
	ca, cert, key := s.TLSFiles()
	for _, f := range []string{ca, cert, key} {
		if fi, err := os.Stat(f); err != nil || fi.Size() == 0 || !strings.HasPrefix(f, s.Dir()) {
			t.Fatalf("TLSFiles: %q: %v", f, err)
		}
	}
	if err := s.Client(t, 0).Set(ctx(t), "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET over TLS (default user): %v", err)
	}
	if err := serviceClient(t, s, 0).RPush(ctx(t), "q", "m").Err(); err != nil {
		t.Fatalf("RPUSH over TLS (service user): %v", err)
	}

	// The URL plus the files is all a separate process needs.
	opt, err := redis.ParseURL(s.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", ca)
	}
	opt.TLSConfig.RootCAs = pool
	opt.TLSConfig.Certificates = []tls.Certificate{pair}
	fromFiles := redis.NewClient(opt)
	t.Cleanup(func() { _ = fromFiles.Close() })
	if n, err := fromFiles.LLen(ctx(t), "q").Result(); err != nil || n != 1 {
		t.Fatalf("LLEN via URL and TLSFiles = %d, %v; want 1", n, err)
	}

	fails := func(what string, o *redis.Options) {
		t.Helper()
		o.MaxRetries = -1
		o.DialTimeout = 2 * time.Second
		o.ReadTimeout = 2 * time.Second
		c := redis.NewClient(o)
		defer c.Close()
		if err := c.Ping(ctx(t)).Err(); err == nil {
			t.Fatalf("%s: PING succeeded", what)
		}
	}
	// No plaintext port at all, and the TLS port does not speak it.
	fails("plaintext", &redis.Options{Addr: s.Addr()})
	// TLS without a client certificate.
	fails("TLS without a client certificate", &redis.Options{Addr: s.Addr(),
		TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}})
	// A client certificate from another CA.
	other := testcerts.NewCA(t, "another CA")
	fails("client certificate from another CA", &redis.Options{Addr: s.Addr(),
		TLSConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12,
			Certificates: []tls.Certificate{other.Client(t, "stranger").TLS}}})
	// A server certificate the client does not trust.
	fails("untrusting client", &redis.Options{Addr: s.Addr(),
		TLSConfig: &tls.Config{RootCAs: other.Pool(), ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12,
			Certificates: []tls.Certificate{pair}}})

	// Restart waits for readiness over TLS, with the same certificates.
	s.Restart(t)
	if err := fromFiles.Ping(ctx(t)).Err(); err != nil {
		t.Fatalf("PING after Restart: %v", err)
	}
	if ca2, _, _ := s.TLSFiles(); ca2 != ca {
		t.Fatalf("TLSFiles after Restart: CA %q, want %q", ca2, ca)
	}
}

func TestNoTLSFilesWithoutTLS(t *testing.T) {
	t.Parallel()
	s := Start(t)
	if ca, cert, key := s.TLSFiles(); ca != "" || cert != "" || key != "" {
		t.Fatalf("TLSFiles = %q, %q, %q; want empty", ca, cert, key)
	}
	if o := s.ServiceOptions(1); o.TLSConfig != nil || o.Username != ServiceUser || o.Password != ServicePassword || o.DB != 1 || o.Addr != s.Addr() {
		t.Fatalf("ServiceOptions(1) = %+v", o)
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
