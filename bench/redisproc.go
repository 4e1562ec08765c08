package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrNoRedisServer reports that no redis-server binary was found.
var ErrNoRedisServer = errors.New("redis-server not found (install Redis, or pass -redis-addr)")

// FindRedisServer returns the path of a redis-server binary, or "".
func FindRedisServer() string {
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

// RedisProc is a redis-server process started by the harness: 127.0.0.1
// only, a free port, no persistence. Stop kills it by PID.
type RedisProc struct {
	Addr string
	cmd  *exec.Cmd
	dir  string
	out  *syncBuffer
	once sync.Once

	exited chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// StartRedis starts a private redis-server and waits until it answers.
func StartRedis(ctx context.Context) (*RedisProc, error) { return startRedis(ctx, nil) }

// startRedis is StartRedis with more arguments for redis-server: extra, if
// not nil, returns them for each attempt on a port (a fresh cluster bus
// port, say).
func startRedis(ctx context.Context, extra func(port int) ([]string, error)) (*RedisProc, error) {
	bin := FindRedisServer()
	if bin == "" {
		return nil, ErrNoRedisServer
	}
	dir, err := os.MkdirTemp("", "qbench-redis-")
	if err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort()
		if err != nil {
			lastErr = err
			continue
		}
		args := []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir,
			"--daemonize", "no", "--loglevel", "warning"}
		if extra != nil {
			more, err := extra(port)
			if err != nil {
				lastErr = err
				continue
			}
			args = append(args, more...)
		}
		out := &syncBuffer{}
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			_ = os.RemoveAll(dir)
			return nil, fmt.Errorf("start %s: %w", bin, err)
		}
		p := &RedisProc{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), cmd: cmd, dir: dir, out: out}
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		if err := p.waitReady(ctx, exited); err != nil {
			_ = cmd.Process.Kill()
			<-exited
			lastErr = fmt.Errorf("%w; redis-server output:\n%s", err, out.String())
			continue
		}
		p.exited = exited
		return p, nil
	}
	_ = os.RemoveAll(dir)
	return nil, fmt.Errorf("redis-server did not start: %v", lastErr)
}

func (p *RedisProc) waitReady(ctx context.Context, exited <-chan struct{}) error {
	c := redis.NewClient(&redis.Options{Addr: p.Addr, MaxRetries: -1, DialTimeout: time.Second})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-exited:
			return errors.New("redis-server exited")
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if err := c.Ping(ctx).Err(); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("redis-server not ready after 10s: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop kills the process (by its PID) and removes its directory.
func (p *RedisProc) Stop() {
	p.once.Do(func() {
		_ = p.cmd.Process.Kill()
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
		}
		_ = os.RemoveAll(p.dir)
	})
}
