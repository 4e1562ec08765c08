package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

// The HTTP listener (--http-listen) serves what is not gRPC: /healthz and
// /readyz for orchestrators, /metrics for Prometheus, and the dashboard at
// /. It is plaintext and unauthenticated apart from the dashboard's API
// (which goes through the gRPC authorization), so it binds to loopback by
// default; put it behind a proxy or a network policy to expose it.

const (
	httpReadHeaderTimeout = 5 * time.Second
	httpIdleTimeout       = 2 * time.Minute
)

// readiness is what /readyz reports: ready while Redis answers and the
// server is not shutting down.
type readiness struct {
	ready  atomic.Bool
	reason atomic.Value // string: why not ready
}

func (r *readiness) set(ready bool, reason string) {
	r.reason.Store(reason)
	r.ready.Store(ready)
}

func (r *readiness) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintln(w, "ok")
}

func (r *readiness) readyz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if r.ready.Load() {
		fmt.Fprintln(w, "ready")
		return
	}
	reason, _ := r.reason.Load().(string)
	w.WriteHeader(http.StatusServiceUnavailable)
	fmt.Fprintf(w, "not ready: %s\n", reason)
}

// httpServer is the running HTTP listener.
type httpServer struct {
	srv  *http.Server
	ln   net.Listener
	done chan error
}

// startHTTP listens on addr and serves mux.
func startHTTP(addr string, mux http.Handler, log *slog.Logger) (*httpServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s (--http-listen): %w", addr, err)
	}
	h := &httpServer{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: httpReadHeaderTimeout,
			IdleTimeout:       httpIdleTimeout,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		},
		ln:   ln,
		done: make(chan error, 1),
	}
	go func() {
		err := h.srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		h.done <- err
	}()
	return h, nil
}

func (h *httpServer) addr() string { return h.ln.Addr().String() }

// stop closes the listener and ends open requests (dashboard event streams
// included) after at most timeout.
func (h *httpServer) stop(timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := h.srv.Shutdown(ctx); err != nil {
		_ = h.srv.Close()
	}
	<-h.done
}
