// Package redistest runs real, isolated redis-server processes for
// integration tests.
//
// Every Server listens on 127.0.0.1 only, on a freshly picked free port, and
// keeps its data in a private directory that survives Kill/Stop/Restart of the
// process for the lifetime of the test. The process is killed (by PID) and the
// directory removed at test cleanup.
//
// Every server has, besides the all-powerful default user (used by Client,
// for the test's own inspection), the user ServiceUser with exactly the
// least-privilege ACL qbridge documents (package redisacl): URL and
// ServiceOptions connect as that user, so qbridge under test runs with the
// permissions operators give it. WithTLS makes the server speak TLS only,
// with client certificates.
//
// StartCluster and StartSentinel (cluster.go) run whole topologies of such
// servers: a Redis Cluster of three masters, and a master with a replica
// watched by three sentinels.
//
// If no redis-server binary can be found, Start skips the test with a loud
// message, unless QBRIDGE_REQUIRE_REDIS is "1" or "true", in which case the
// test fails instead.
package redistest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/testcerts"
	"github.com/qbridge/qbridge/server/broker/redisacl"
)

const (
	// RequireEnv is the environment variable that turns a missing
	// redis-server binary into a test failure instead of a skip.
	RequireEnv = "QBRIDGE_REQUIRE_REDIS"

	// ServiceUser is the ACL user of every Server that URL and
	// ServiceOptions connect as: it has redisacl.Rules("") (or the prefix
	// of WithServicePrefix; redisacl.ClusterRules on the nodes of
	// StartCluster) and nothing more.
	ServiceUser = "qbridge"
	// ServicePassword is ServiceUser's password (URL-safe).
	ServicePassword = "qbridge-test-secret"

	// ACLLogEnv names a file that, when set, every Server appends its ACL
	// LOG to at test cleanup: what the ACL refused, and to whom (to find
	// what ServiceUser lacks). The ACL LOG is logged anyway when a test
	// fails.
	ACLLogEnv = "QBRIDGE_REDIS_ACL_LOG"

	readyTimeout   = 10 * time.Second
	exitTimeout    = 10 * time.Second
	restartTimeout = 10 * time.Second
	pollInterval   = 10 * time.Millisecond
	startAttempts  = 5
	logTailLines   = 30
)

// errPortInUse reports that redis-server exited because its port was taken.
var errPortInUse = errors.New("redis-server port already in use")

// findRedisServer locates the redis-server binary; it returns "" if none is
// found. It is a variable so tests can simulate a missing binary.
var findRedisServer = func() string {
	if p, err := exec.LookPath("redis-server"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/bin/redis-server", "/usr/local/bin/redis-server"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p
		}
	}
	return ""
}

type config struct {
	aof           bool
	args          []string
	tls           bool
	servicePrefix string
	// cluster makes the server a Redis Cluster node (StartCluster).
	cluster bool
	// sentinel, when set, makes the process a Redis Sentinel
	// (StartSentinel): it is the initial content of its sentinel.conf.
	sentinel string
}

// Option configures a Server.
type Option func(*config)

// WithAOF enables the append-only file with appendfsync always, so every
// acknowledged write survives a SIGKILL followed by Restart.
func WithAOF() Option {
	return func(c *config) { c.aof = true }
}

// WithServicePrefix gives ServiceUser the ACL for key prefix prefix
// (redisacl.Rules(prefix)) instead of the one for the empty prefix.
func WithServicePrefix(prefix string) Option {
	return func(c *config) { c.servicePrefix = prefix }
}

// WithTLS makes redis-server listen with TLS only (no plaintext port), and
// require a client certificate. Start generates a CA, a server certificate
// for 127.0.0.1 and a client certificate into the server's directory (see
// TLSFiles); URL then returns a rediss:// URL, and Client and
// ServiceOptions are set up with the CA and the client certificate. If
// redis-server was built without TLS, Start skips the test.
func WithTLS() Option {
	return func(c *config) { c.tls = true }
}

// WithArgs appends extra redis-server command-line arguments, e.g.
// WithArgs("--maxmemory", "10mb"). They come after the defaults, so they
// override them.
func WithArgs(args ...string) Option {
	return func(c *config) { c.args = append(c.args, args...) }
}

// Server is one redis-server process started by a test, on 127.0.0.1 and a
// free port.
type Server struct {
	bin  string
	dir  string
	port int
	cfg  config
	// certs is the TLS material (WithTLS only).
	certs *testcerts.Set

	mu   sync.Mutex
	proc *process // current process; nil before the first successful start
}

// process is one run of redis-server. done is closed once the process has
// been reaped by cmd.Wait; waitErr is valid after that.
type process struct {
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitExit waits up to d for the process to be reaped.
func (p *process) waitExit(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-p.done:
		return true
	case <-timer.C:
		return false
	}
}

// Start starts redis-server for the test and registers t.Cleanup to kill it
// (by PID) and remove its directory.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()

	bin := findRedisServer()
	if bin == "" {
		if requireRedis() {
			t.Fatalf("redistest: redis-server not found in PATH, /usr/bin or /usr/local/bin, and %s=%q requires real Redis; install it (apt-get install -y redis-server)", RequireEnv, os.Getenv(RequireEnv))
			return nil
		}
		t.Skipf("\n" +
			"########################################################################\n" +
			"### SKIPPING real-Redis test: redis-server not found; install it (apt-get install -y redis-server)\n" +
			"### or set " + RequireEnv + "=1 to make this a failure instead of a skip.\n" +
			"########################################################################")
		return nil
	}

	var cfg config
	for _, o := range opts {
		o(&cfg)
	}

	dir, err := os.MkdirTemp("", "redistest-")
	if err != nil {
		t.Fatalf("redistest: create data dir: %v", err)
	}
	s := &Server{bin: bin, dir: dir, cfg: cfg}
	t.Cleanup(func() { s.cleanup(t) })
	if cfg.tls {
		if why := tlsUnsupported(bin); why != "" {
			t.Skipf("\n"+
				"########################################################################\n"+
				"### SKIPPING TLS Redis test: %s was built without TLS support (%s)\n"+
				"### (a redis-server built with BUILD_TLS=yes, like Debian's, runs it)\n"+
				"########################################################################", bin, why)
			return nil
		}
		s.certs = testcerts.WriteSet(t, dir, "redistest client")
	}

	var lastErr error
	for attempt := 1; attempt <= startAttempts; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("redistest: pick free port: %v", err)
		}
		s.port = port
		lastErr = s.launch()
		if lastErr == nil {
			return s
		}
		if !errors.Is(lastErr, errPortInUse) {
			break
		}
		t.Logf("redistest: port %d taken (attempt %d/%d), retrying on another port", port, attempt, startAttempts)
	}
	t.Fatalf("redistest: start redis-server: %v", lastErr)
	return nil
}

func requireRedis() bool {
	v := strings.ToLower(strings.TrimSpace(os.Getenv(RequireEnv)))
	return v == "1" || v == "true"
}

// freePort asks the kernel for a free TCP port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, err
	}
	return port, nil
}

// tlsProbe caches tlsUnsupported per binary.
var tlsProbe sync.Map // bin -> string

// tlsUnsupported returns why bin cannot serve TLS, or "" if it can. A
// redis-server 7.0 built without TLS does not know the tls-port directive;
// one built with it exits at once with "--port 0 --tls-port 0" because it
// has nowhere to listen. (Should a build pass this probe and still lack
// TLS, Start fails with redis-server's own complaint in the log tail.)
func tlsUnsupported(bin string) string {
	if v, ok := tlsProbe.Load(bin); ok {
		return v.(string)
	}
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	out, _ := exec.CommandContext(ctx, bin, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no", "--logfile", "").CombinedOutput()
	why := ""
	switch text := string(out); {
	case strings.Contains(text, "Bad directive") || strings.Contains(text, "FATAL CONFIG FILE ERROR"):
		why = "it rejects --tls-port"
	case !strings.Contains(text, "Configured to not listen anywhere"):
		why = "unexpected answer to --tls-port: " + strings.TrimSpace(lastLines(text, 3))
	}
	tlsProbe.Store(bin, why)
	return why
}

func lastLines(text string, n int) string {
	lines := strings.Split(strings.TrimRight(text, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Addr returns "127.0.0.1:PORT".
func (s *Server) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
}

// URL returns the URL qbridge under test should use: ServiceUser's,
// "redis://qbridge:<ServicePassword>@127.0.0.1:PORT/DB", or rediss:// with
// WithTLS (the URL carries no certificates: see TLSFiles).
func (s *Server) URL(db int) string {
	scheme := "redis"
	if s.certs != nil {
		scheme = "rediss"
	}
	return fmt.Sprintf("%s://%s:%s@%s/%d", scheme, ServiceUser, ServicePassword, s.Addr(), db)
}

// TLSFiles returns the PEM files of the CA (that signed the server's and
// the client's certificates) and of the client certificate and its key;
// all empty without WithTLS.
func (s *Server) TLSFiles() (ca, cert, key string) {
	if s.certs == nil {
		return "", "", ""
	}
	return s.certs.Files.CA, s.certs.Files.ClientCert, s.certs.Files.ClientKey
}

// tlsConfig returns a fresh client TLS configuration (nil without
// WithTLS): trust the test CA, present the client certificate.
func (s *Server) tlsConfig() *tls.Config {
	if s.certs == nil {
		return nil
	}
	c := s.certs.ClientConfig()
	c.ServerName = "127.0.0.1"
	return c
}

// ServiceOptions returns go-redis options for database db as ServiceUser
// (with the TLS configuration under WithTLS): what an in-process qbridge
// broker under test should use. Callers may set further fields.
func (s *Server) ServiceOptions(db int) *redis.Options {
	return &redis.Options{
		Addr:      s.Addr(),
		DB:        db,
		Username:  ServiceUser,
		Password:  ServicePassword,
		TLSConfig: s.tlsConfig(),
	}
}

// Dir returns the server's data directory (holds redis.log and AOF files).
func (s *Server) Dir() string { return s.dir }

// PID returns the PID of the current (or most recent) redis-server process.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		return 0
	}
	return s.proc.cmd.Process.Pid
}

// Client returns a go-redis client for database db as the default user
// (every permission; for the test's own inspection and set-up); it is
// closed at test cleanup. The client keeps working across Restart (it
// reconnects).
func (s *Server) Client(t testing.TB, db int) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{
		Addr:      s.Addr(),
		DB:        db,
		TLSConfig: s.tlsConfig(),
	})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Stop stops redis-server gracefully with SIGTERM (no RDB is written since
// saving is disabled; the AOF, if enabled, is flushed) and waits for it to
// exit. If it does not exit in time it is killed and the test fails. Calling
// Stop on an already stopped server is a no-op.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	p := s.current()
	if p == nil || p.exited() {
		return
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("redistest: SIGTERM pid %d: %v", p.cmd.Process.Pid, err)
	}
	if p.waitExit(exitTimeout) {
		return
	}
	_ = p.cmd.Process.Kill()
	exited := p.waitExit(exitTimeout)
	t.Fatalf("redistest: redis-server pid %d did not exit within %v after SIGTERM (killed: exited=%v)\n%s",
		p.cmd.Process.Pid, exitTimeout, exited, s.logTail())
}

// Kill sends SIGKILL to redis-server and waits for it to exit. Calling Kill on
// an already stopped server is a no-op.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	if err := s.kill(); err != nil {
		t.Fatalf("redistest: %v", err)
	}
}

func (s *Server) kill() error {
	p := s.current()
	if p == nil || p.exited() {
		return nil
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("SIGKILL pid %d: %w", p.cmd.Process.Pid, err)
	}
	if !p.waitExit(exitTimeout) {
		return fmt.Errorf("redis-server pid %d did not exit within %v after SIGKILL", p.cmd.Process.Pid, exitTimeout)
	}
	return nil
}

// Restart starts redis-server again on the same port and in the same
// directory (so AOF data is reloaded) and waits until it answers. A running
// server is stopped gracefully first. If the port is briefly unavailable the
// start is retried until a deadline.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Stop(t)

	deadline := time.Now().Add(restartTimeout)
	for {
		err := s.launch()
		if err == nil {
			return
		}
		if !errors.Is(err, errPortInUse) || time.Now().After(deadline) {
			t.Fatalf("redistest: restart redis-server on %s: %v", s.Addr(), err)
		}
		// Back off before retrying the same port; this is a retry delay,
		// not synchronisation.
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *Server) current() *process {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc
}

func (s *Server) logPath() string      { return filepath.Join(s.dir, "redis.log") }
func (s *Server) stderrPath() string   { return filepath.Join(s.dir, "redis.stdout-stderr.log") }
func (s *Server) sentinelPath() string { return filepath.Join(s.dir, "sentinel.conf") }

func (s *Server) args() []string {
	var args []string
	if s.cfg.sentinel != "" {
		// A sentinel reads (and rewrites) its config file, which must come
		// first; the command line below overrides what it says.
		args = append(args, s.sentinelPath(), "--sentinel")
	}
	if s.certs != nil {
		f := s.certs.Files
		args = append(args,
			"--port", "0",
			"--tls-port", strconv.Itoa(s.port),
			"--tls-cert-file", f.ServerCert,
			"--tls-key-file", f.ServerKey,
			"--tls-ca-cert-file", f.CA,
			"--tls-auth-clients", "yes",
		)
	} else {
		args = append(args, "--port", strconv.Itoa(s.port))
	}
	args = append(args,
		"--bind", "127.0.0.1",
		"--protected-mode", "no",
		"--daemonize", "no",
		"--dir", s.dir,
		"--logfile", s.logPath(),
		"--databases", "16",
		"--save", "",
	)
	if s.cfg.sentinel != "" {
		// Sentinels run without ServiceUser: anyone on 127.0.0.1 may ask
		// them where the master is.
		return append(args, s.cfg.args...)
	}
	if s.cfg.cluster {
		args = append(args,
			"--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(s.dir, "nodes.conf"),
			"--cluster-node-timeout", strconv.Itoa(clusterNodeTimeoutMs),
		)
	}
	// ServiceUser, as a "user" directive: redis-server quotes each
	// argument, so the rules reach its ACL parser one by one, unchanged.
	args = append(args, "--user", ServiceUser, "on", ">"+ServicePassword)
	if s.cfg.cluster {
		args = append(args, redisacl.ClusterRules(s.cfg.servicePrefix)...)
	} else {
		args = append(args, redisacl.Rules(s.cfg.servicePrefix)...)
	}
	if s.cfg.aof {
		args = append(args, "--appendonly", "yes", "--appendfsync", "always")
	} else {
		args = append(args, "--appendonly", "no")
	}
	return append(args, s.cfg.args...)
}

// launch starts one redis-server process on s.port and waits until it is
// ready. On failure the process is killed and reaped; errPortInUse is
// returned (wrapped) if the port was taken.
func (s *Server) launch() error {
	out, err := os.OpenFile(s.stderrPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer out.Close() // the child has its own copy of the descriptor

	if s.cfg.sentinel != "" {
		// Written once: later runs read what the sentinel rewrote (its id,
		// the current master, the other sentinels it knows).
		if _, err := os.Stat(s.sentinelPath()); errors.Is(err, os.ErrNotExist) {
			if err := os.WriteFile(s.sentinelPath(), []byte(s.cfg.sentinel), 0o644); err != nil {
				return err
			}
		}
	}

	// Remember where this run's log output starts, so that failures are
	// classified by this run's messages only (the log is shared by runs).
	logOff := fileSize(s.logPath())
	outOff := fileSize(s.stderrPath())

	cmd := exec.Command(s.bin, s.args()...)
	cmd.Dir = s.dir
	cmd.Stdout = out
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("exec %s: %w", s.bin, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	s.mu.Lock()
	s.proc = p
	s.mu.Unlock()

	if err := s.waitReady(p); err != nil {
		_ = s.kill()
		tail := s.logTail()
		fresh := readFrom(s.logPath(), logOff) + readFrom(s.stderrPath(), outOff)
		if strings.Contains(fresh, "Address already in use") {
			return fmt.Errorf("%w: %s: %v", errPortInUse, s.Addr(), err)
		}
		return fmt.Errorf("%v\n%s", err, tail)
	}
	return nil
}

// waitReady polls the server until it answers INFO with our own PID (so a
// foreign process that grabbed the port is not mistaken for ours), the
// process exits, or the deadline passes.
func (s *Server) waitReady(p *process) error {
	c := redis.NewClient(&redis.Options{
		Addr:         s.Addr(),
		TLSConfig:    s.tlsConfig(),
		DialTimeout:  250 * time.Millisecond,
		ReadTimeout:  500 * time.Millisecond,
		WriteTimeout: 500 * time.Millisecond,
		MaxRetries:   -1,
		PoolSize:     1,
	})
	defer c.Close()

	pid := p.cmd.Process.Pid
	want := "process_id:" + strconv.Itoa(pid)
	deadline := time.NewTimer(readyTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()

	// Abort an in-flight poll as soon as the process exits.
	exitCtx, exitCancel := context.WithCancel(context.Background())
	defer exitCancel()
	go func() {
		select {
		case <-p.done:
			exitCancel()
		case <-exitCtx.Done():
		}
	}()

	var lastErr error
	for {
		ctx, cancel := context.WithTimeout(exitCtx, time.Second)
		info, err := c.Info(ctx, "server").Result()
		cancel()
		switch {
		case err != nil:
			lastErr = err
		case !containsLine(info, want):
			lastErr = fmt.Errorf("%s is answered by a different redis-server (not pid %d)", s.Addr(), pid)
		default:
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("redis-server pid %d exited before becoming ready: %v", pid, p.waitErr)
		case <-deadline.C:
			return fmt.Errorf("redis-server pid %d not ready on %s within %v: %v", pid, s.Addr(), readyTimeout, lastErr)
		case <-tick.C:
		}
	}
}

func containsLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}

// logTail returns the last lines of the redis log and of the captured
// stdout/stderr, for error messages.
func (s *Server) logTail() string {
	var b strings.Builder
	for _, f := range []string{s.logPath(), s.stderrPath()} {
		tail := tailFile(f, logTailLines)
		if tail == "" {
			continue
		}
		fmt.Fprintf(&b, "--- tail of %s ---\n%s\n", f, tail)
	}
	if b.Len() == 0 {
		return "(redis log is empty)"
	}
	return b.String()
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// readFrom returns the contents of path from byte offset off on.
func readFrom(path string, off int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return ""
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return ""
	}
	return string(data)
}

func tailFile(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const maxBytes = 16 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > maxBytes {
		if _, err := f.Seek(-maxBytes, io.SeekEnd); err != nil {
			return ""
		}
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return ""
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// cleanup kills the process (only the one we started, by PID), reaps it and
// removes the data directory. If the test failed, the log tail is logged.
func (s *Server) cleanup(t testing.TB) {
	// What the ACL refused (ServiceUser's missing permissions show here),
	// read while the server still runs.
	var refused string
	if dump := os.Getenv(ACLLogEnv); t.Failed() || dump != "" {
		refused = s.aclLog()
		if dump != "" && refused != "" {
			appendFile(dump, fmt.Sprintf("--- %s (redis-server %s)\n%s", t.Name(), s.Addr(), refused))
		}
	}
	if err := s.kill(); err != nil {
		t.Errorf("redistest: cleanup: %v", err)
	}
	if t.Failed() {
		t.Logf("redistest: redis-server on %s (dir %s):\n%s", s.Addr(), s.dir, s.logTail())
		if refused != "" {
			t.Logf("redistest: ACL LOG of %s:\n%s", s.Addr(), refused)
		}
	}
	if err := os.RemoveAll(s.dir); err != nil {
		t.Errorf("redistest: cleanup: remove %s: %v", s.dir, err)
	}
}

// aclLog returns the entries of the server's ACL LOG, one a line, or "" if
// there are none or the server does not answer.
func (s *Server) aclLog() string {
	p := s.current()
	if p == nil || p.exited() {
		return ""
	}
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), TLSConfig: s.tlsConfig(), MaxRetries: -1,
		DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	entries, err := c.ACLLog(ctx, 1000).Result()
	if err != nil {
		return ""
	}
	var b strings.Builder
	for _, e := range entries {
		fmt.Fprintf(&b, "user=%s reason=%s context=%s object=%q count=%d\n", e.Username, e.Reason, e.Context, e.Object, e.Count)
	}
	return b.String()
}

func appendFile(path, text string) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	_, _ = f.WriteString(text)
	_ = f.Close()
}
