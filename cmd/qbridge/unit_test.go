package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestRenderProgress(t *testing.T) {
	for _, tc := range []struct {
		name  string
		s     progressState
		width int
		want  string
	}{
		{"known size", progressState{label: "jobs", msgs: 12345, read: 450, total: 1000, rate: 8123.4, elapsed: 4 * time.Second}, 80,
			"jobs [==============>                 ]   45%  12,345 msgs  8,123 msg/s  ETA 4s"},
		{"done", progressState{label: "jobs", msgs: 50000, read: 1000, total: 1000, rate: 9876, elapsed: 5100 * time.Millisecond, final: true}, 80,
			"jobs [====]  100%  50,000 msgs  9,876 msg/s  done in 5s"},
		{"unknown size", progressState{label: "jobs", msgs: 999, read: 4000, total: -1, rate: 0.4, elapsed: 65 * time.Second}, 80,
			"jobs  999 msgs  0 msg/s  1m05s"},
		{"too narrow for a bar", progressState{label: "jobs", msgs: 1, read: 1, total: 10, elapsed: time.Second}, 30,
			"jobs   10%  1 msgs  0 msg/s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := renderProgress(tc.s, tc.width)
			if tc.name == "done" {
				// The bar fills what the width leaves.
				tc.want = strings.Replace(tc.want, "[====]", "["+strings.Repeat("=", 80-len("jobs")-3-len("  100%  50,000 msgs  9,876 msg/s  done in 5s")-1)+"]", 1)
			}
			if got != tc.want {
				t.Errorf("got  %q\nwant %q", got, tc.want)
			}
			if len(got) >= tc.width {
				t.Errorf("%d columns, terminal has %d", len(got), tc.width)
			}
		})
	}
}

func TestProgressDraws(t *testing.T) {
	var buf bytes.Buffer
	p := newProgress(&buf, "q", 100, 80, true)
	p.start()
	p.add(10, 50)
	_ = p.around(func() error { buf.WriteString("ID\n"); return nil })
	p.stop()
	out := buf.String()
	// Drawn, erased for the output, drawn again below it, and finished.
	if !strings.Contains(out, "\x1b[K\r\x1b[KID\n\rq [") || !strings.HasSuffix(out, "\x1b[K\n") || !strings.Contains(out, "100%  10 msgs") {
		t.Fatalf("output %q", out)
	}
}

func TestPayloadText(t *testing.T) {
	for in, want := range map[string]string{
		"hello":       "hello",
		"héllo wörld": "héllo wörld",
		"two\nlines":  `"two\nlines"`,
		"tab\there":   `"tab\there"`,
		`"quoted"`:    `"\"quoted\""`,
		"base64:x":    `"base64:x"`,
		"\xff\x00":    "base64:/wA=",
		"":            "",
	} {
		if got := payloadText([]byte(in)); got != want {
			t.Errorf("payloadText(%q) = %q, want %q", in, got, want)
		}
	}
	jp := newJSONPayload([]byte("\xff"))
	if jp.Payload != nil || jp.PayloadBase64 != "/w==" {
		t.Errorf("%+v", jp)
	}
}

func TestStatusLine(t *testing.T) {
	for _, tc := range []struct {
		err  error
		line string
		code int
	}{
		{status.Error(codes.InvalidArgument, "queue name is empty"), "InvalidArgument: queue name is empty", exitServer},
		{status.Error(codes.NotFound, "qbridge: no\nresult"), "NotFound: no; result", exitNotFound},
		{status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:1: connect: connection refused"`),
			"Unavailable: cannot connect to A: dial tcp 127.0.0.1:1: connect: connection refused", exitUnavailable},
		{status.Error(codes.Unavailable, "server shutting down"), "Unavailable: server shutting down", exitUnavailable},
		{status.Error(codes.DeadlineExceeded, "context deadline exceeded while waiting for connections to become ready"),
			"Unavailable: cannot connect to A within the timeout (--timeout)", exitUnavailable},
		{status.Error(codes.DeadlineExceeded, "context deadline exceeded"), "DeadlineExceeded: context deadline exceeded", exitServer},
		{status.Error(codes.ResourceExhausted, "queue full"), "ResourceExhausted: queue full", exitServer},
	} {
		line, code := statusLine(tc.err, "A")
		if line != tc.line || code != tc.code {
			t.Errorf("statusLine(%v) = %q, %d; want %q, %d", tc.err, line, code, tc.line, tc.code)
		}
	}
}

func TestExitCodes(t *testing.T) {
	var stderr bytes.Buffer
	a := &app{ctx: context.Background(), stderr: &stderr, addr: "A"}
	if code := a.exit(nil, timeoutErrorf("nothing")); code != exitTimeout || stderr.String() != "qbridge: nothing\n" {
		t.Errorf("timeout: %d %q", code, stderr.String())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	a.ctx = ctx
	if code := a.exit(nil, status.Error(codes.Canceled, "x")); code != exitInterrupted {
		t.Errorf("interrupted: %d", code)
	}
	a.ctx = context.Background()
	stderr.Reset()
	if code := a.exit(nil, errors.New(`unknown command "x" for "qbridge"`)); code != exitUsage || !strings.Contains(stderr.String(), "Run 'qbridge --help' for usage.") {
		t.Errorf("usage: %d %q", code, stderr.String())
	}
}

func TestTailBuffer(t *testing.T) {
	tb := &tailBuffer{max: 16}
	_, _ = tb.Write([]byte("first line\nsecond line\nthird\n"))
	if got := tb.String(); got != "third" {
		t.Errorf("got %q", got)
	}
	tb = &tailBuffer{max: 16}
	_, _ = tb.Write([]byte("  short error \n"))
	if got := tb.String(); got != "short error" {
		t.Errorf("got %q", got)
	}
	tb = &tailBuffer{max: 3}
	_, _ = tb.Write([]byte("aaaaaéé")) // cut inside the first é
	if got := tb.String(); got != "é" {
		t.Errorf("got %q", got)
	}
}

func TestCommas(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 1234567: "1,234,567", -4321: "-4,321"} {
		if got := commas(n); got != want {
			t.Errorf("commas(%d) = %q, want %q", n, got, want)
		}
	}
}
