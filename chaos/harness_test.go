// Package chaos breaks things under load and proves nothing is lost.
//
// Every case runs real processes on 127.0.0.1: a redis-server of its own
// (internal/redistest), one or more qbridged binaries built once per run,
// and producer and consumer clients (goroutines here, or this test binary
// run again as a child process when a client itself must be killed or
// stopped). A ledger (ledger_test.go) records what the clients were told
// and checks, at the end, every message like a total-queue checker, using
// only the public RPCs and reading Redis for stray entries.
//
// `go test ./chaos` (and so `make test` and CI) runs every case shortened to
// seconds; `make chaos` sets CHAOS_FULL=1 for the sizes of the issue, and
// CHAOS_SOAK=30m runs the soak case for that long.
package chaos

import (
	"bufio"
	"context"
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

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// daemonBin is the qbridged binary built by TestMain; faultBin is the same
// built with the test-only fault injection (see server/faults_on.go).
var daemonBin, faultBin string

// full is true under `make chaos` (CHAOS_FULL=1): the sizes.
var full = os.Getenv("CHAOS_FULL") == "1"

// pick returns short in the quick run and long under CHAOS_FULL.
func pick[T any](short, long T) T {
	if full {
		return long
	}
	return short
}

func TestMain(m *testing.M) {
	if child := os.Getenv(childEnv); child != "" {
		os.Exit(runChild(child))
	}
	dir, err := os.MkdirTemp("", "qbridge-chaos-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		daemonBin = filepath.Join(dir, "qbridged")
		faultBin = filepath.Join(dir, "qbridged-faults")
		for _, b := range []struct {
			out  string
			tags string
		}{{daemonBin, ""}, {faultBin, "qbridge_faults"}} {
			args := []string{"build", "-o", b.out}
			if b.tags != "" {
				args = append(args, "-tags", b.tags)
			}
			args = append(args, "github.com/qbridge/qbridge/cmd/qbridged")
			cmd := exec.Command("go", args...)
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			if err := cmd.Run(); err != nil {
				fmt.Fprintf(os.Stderr, "chaos: building qbridged: %v\n", err)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// daemon is one qbridged process, restartable on the same address.
type daemon struct {
	t    testing.TB
	bin  string
	args []string
	env  []string
	Addr string
	logf string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// startDaemon starts qbridged against redisURL on a free loopback port and
// waits until its health is SERVING. It is killed (by PID) at cleanup.
func startDaemon(t testing.TB, redisURL string, extra ...string) *daemon {
	t.Helper()
	return startDaemonBin(t, daemonBin, nil, redisURL, extra...)
}

func startDaemonBin(t testing.TB, bin string, env []string, redisURL string, extra ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, bin: bin, env: env, Addr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	d.logf = filepath.Join(t.TempDir(), "qbridged-"+strings.ReplaceAll(d.Addr, ":", "-")+".log")
	d.args = append([]string{"--listen", d.Addr, "--http-listen", "127.0.0.1:0", "--redis-url", redisURL, "--plaintext", "--log-level", "warn"}, extra...)
	d.Start()
	t.Cleanup(func() {
		d.Kill()
		if t.Failed() {
			t.Logf("qbridged %s log tail:\n%s", d.Addr, tail(d.logf, 40))
		}
	})
	return d
}

// Start (re)starts the process and waits until it serves.
func (d *daemon) Start() {
	d.t.Helper()
	f, err := os.OpenFile(d.logf, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		d.t.Fatal(err)
	}
	cmd := exec.Command(d.bin, d.args...)
	cmd.Env = append(os.Environ(), d.env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		d.t.Fatalf("start qbridged: %v", err)
	}
	done := make(chan struct{})
	d.mu.Lock()
	d.cmd, d.done, d.err = cmd, done, nil
	d.mu.Unlock()
	go func() {
		err := cmd.Wait()
		f.Close()
		d.mu.Lock()
		d.err = err
		d.mu.Unlock()
		close(done)
	}()
	if !waitServing(d.Addr, 20*time.Second, done) {
		d.t.Fatalf("qbridged %s did not become SERVING within 20s\n%s", d.Addr, tail(d.logf, 40))
	}
}

// waitServing polls the health service until SERVING, the deadline, or the
// process exits.
func waitServing(addr string, within time.Duration, exited <-chan struct{}) bool {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return true
		}
		select {
		case <-exited:
			return false
		case <-time.After(50 * time.Millisecond): // poll interval
		}
	}
	return false
}

func (d *daemon) signal(sig syscall.Signal) {
	d.mu.Lock()
	cmd, done := d.cmd, d.done
	d.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Signal(sig)
}

// Kill sends SIGKILL and waits for the process to be gone.
func (d *daemon) Kill() {
	d.signal(syscall.SIGCONT) // a stopped process must run to die promptly
	d.signal(syscall.SIGKILL)
	d.Wait(10 * time.Second)
}

// Term sends SIGTERM (graceful shutdown).
func (d *daemon) Term() { d.signal(syscall.SIGTERM) }

// Stop and Cont suspend and resume the process (SIGSTOP / SIGCONT).
func (d *daemon) Stop() { d.signal(syscall.SIGSTOP) }
func (d *daemon) Cont() { d.signal(syscall.SIGCONT) }

// Wait waits up to within for the process to exit and returns its exit
// error (nil: exit 0); ok is false if it is still running.
func (d *daemon) Wait(within time.Duration) (err error, ok bool) {
	d.mu.Lock()
	done := d.done
	d.mu.Unlock()
	if done == nil {
		return nil, true
	}
	select {
	case <-done:
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.err, true
	case <-time.After(within):
		return nil, false
	}
}

// Running reports whether the process is alive.
func (d *daemon) Running() bool {
	d.mu.Lock()
	done := d.done
	d.mu.Unlock()
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// PID returns the current process id.
func (d *daemon) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil || d.cmd.Process == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// dial returns a client connection that round-robins over addrs and
// reconnects by itself to whichever of them are up.
func dial(t testing.TB, addrs ...string) *grpc.ClientConn {
	t.Helper()
	r := manual.NewBuilderWithScheme("chaos" + strconv.Itoa(freePort(t)))
	var state resolver.State
	for _, a := range addrs {
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a})
	}
	r.InitialState(state)
	cc, err := grpc.NewClient(r.Scheme()+":///qbridge",
		grpc.WithResolvers(r),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin":{}}]}`),
		grpc.WithConnectParams(connectParams),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func queueClient(cc *grpc.ClientConn) qbridgev1.QueueServiceClient {
	return qbridgev1.NewQueueServiceClient(cc)
}

// waitFor polls cond until it holds or within passes.
func waitFor(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not synchronisation
	}
}

// ---- child processes ----

// childEnv selects a child mode when this test binary runs as a client
// process (see runChild).
const childEnv = "QBRIDGE_CHAOS_CHILD"

// runChild runs a client process: "hold" consumes CHAOS_QUEUE on
// CHAOS_ADDR with CHAOS_LEASE and prints "got <payload> <attempt>" for each
// delivery, never acking (it is killed or stopped by the test).
func runChild(mode string) int {
	addr, queue := os.Getenv("CHAOS_ADDR"), os.Getenv("CHAOS_QUEUE")
	lease, _ := time.ParseDuration(os.Getenv("CHAOS_LEASE"))
	window, _ := strconv.Atoi(os.Getenv("CHAOS_WINDOW"))
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cc.Close()
	switch mode {
	case "hold":
		req := &qbridgev1.ConsumeRequest{Queue: queue, MaxInFlight: uint32(window)}
		if lease > 0 {
			req.LeaseDuration = durationpb(lease)
		}
		st, err := qbridgev1.NewQueueServiceClient(cc).Consume(context.Background(), req)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		w := bufio.NewWriter(os.Stdout)
		for {
			r, err := st.Recv()
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 2
			}
			for _, d := range r.GetDeliveries() {
				fmt.Fprintf(w, "got %s %d\n", d.GetPayload(), d.GetAttempt())
			}
			w.Flush()
		}
	}
	fmt.Fprintf(os.Stderr, "unknown child mode %q\n", mode)
	return 1
}

// child is a client process started by a test.
type child struct {
	cmd   *exec.Cmd
	lines chan string
	done  chan struct{}
}

// startChild runs this test binary in a child mode; its stdout lines arrive
// on lines. It is killed (by PID) at cleanup.
func startChild(t testing.TB, mode string, env ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), childEnv+"="+mode), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, lines: make(chan string, 1<<16), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		_ = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(c.Kill)
	return c
}

func (c *child) signal(sig syscall.Signal) {
	select {
	case <-c.done:
	default:
		_ = c.cmd.Process.Signal(sig)
	}
}

// Kill ends the child with SIGKILL and waits for it.
func (c *child) Kill() {
	c.signal(syscall.SIGCONT)
	c.signal(syscall.SIGKILL)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
	}
}

// Stop suspends the child (SIGSTOP): a half-open client.
func (c *child) Stop() { c.signal(syscall.SIGSTOP) }

var errTimeout = errors.New("timed out")

// next returns the child's next stdout line.
func (c *child) next(within time.Duration) (string, error) {
	select {
	case l := <-c.lines:
		return l, nil
	case <-time.After(within):
		return "", errTimeout
	}
}

// procStat is what /proc says about a process at one moment (the chaos
// cases watch qbridged's memory, threads and descriptors with it).
type procStat struct {
	RSS     int64 // VmRSS, bytes
	HWM     int64 // VmHWM (peak RSS since start or the last reset), bytes
	Threads int
	FDs     int
}

func readProcStat(pid int) (procStat, error) {
	var s procStat
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		switch k {
		case "VmRSS":
			s.RSS = n << 10
		case "VmHWM":
			s.HWM = n << 10
		case "Threads":
			s.Threads = int(n)
		}
	}
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.FDs = len(fds)
	}
	if s.RSS == 0 {
		return s, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
	}
	return s, nil
}
