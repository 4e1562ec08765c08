package main

import (
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// blackholeProxy forwards TCP connections to target until freeze is called;
// from then on it silently drops everything in both directions while keeping
// the connections open, like a client host that vanished from the network.
type blackholeProxy struct {
	ln     net.Listener
	target string
	frozen chan struct{}
	once   sync.Once

	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func newBlackholeProxy(t *testing.T, target string) *blackholeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &blackholeProxy{ln: ln, target: target, frozen: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *blackholeProxy) addr() string { return p.ln.Addr().String() }

func (p *blackholeProxy) freeze() { p.once.Do(func() { close(p.frozen) }) }

func (p *blackholeProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(s, c)
		go p.pipe(c, s)
	}
}

func (p *blackholeProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			select {
			case <-p.frozen: // dropped
			default:
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *blackholeProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// TestKeepaliveDetectsDeadClient: a consumer whose host vanishes while its
// stream is idle (it holds deliveries and sends nothing) is detected by the
// server's keepalive pings, its stream ends and its deliveries go back to
// the queue long before their lease.
func TestKeepaliveDetectsDeadClient(t *testing.T) {
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--keepalive-time", "1s", "--keepalive-timeout", "1s"}, nil)
	direct := qbridgev1.NewQueueServiceClient(dial(t, d.addr))
	proxy := newBlackholeProxy(t, d.addr)
	viaProxy := qbridgev1.NewQueueServiceClient(dial(t, proxy.addr()))
	ctx := rpcCtx(t)

	for _, p := range []string{"x", "y"} {
		if _, err := direct.Enqueue(ctx, &qbridgev1.EnqueueRequest{Queue: "kaq", Payload: []byte(p)}); err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
	}
	stream, err := viaProxy.Consume(ctx, &qbridgev1.ConsumeRequest{Queue: "kaq", LeaseDuration: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatalf("Consume: %v", err)
	}
	recvDeliveries(t, stream, 2)
	proxy.freeze()
	frozenAt := time.Now()

	var last *qbridgev1.GetQueueStatsResponse
	ok := poll(15*time.Second, func() bool {
		st, err := direct.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: "kaq"})
		if err != nil {
			return false
		}
		last = st
		return st.GetReady() == 2 && st.GetInFlight() == 0
	})
	if !ok {
		t.Fatalf("the dead consumer's deliveries were not requeued within 15s; last stats %v", last)
	}
	t.Logf("dead consumer detected and its deliveries requeued %v after it vanished", time.Since(frozenAt).Round(time.Millisecond))
}
