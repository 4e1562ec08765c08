package main

import (
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestPubSub(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("subscribe then publish", func(t *testing.T) {
		sub := e.start(t, "subscribe", "task:pubsub:channel", "news.*", "--count", "3")
		sub.waitErr("^qbridge: subscribed to task:pubsub:channel, news.\\*\n$")
		// Received once through the channel; news.sports only through the
		// pattern.
		if r := e.mustRun(t, "", "publish", "task:pubsub:channel", "hi"); r.stdout != "1\n" {
			t.Fatalf("publish: %v", r)
		}
		if r := e.mustRun(t, "", "-o", "json", "publish", "news.sports", "goal!"); jsonOne(t, r.stdout)["receivers"] != 1.0 {
			t.Fatalf("publish: %v", r)
		}
		if r := e.mustRun(t, "", "publish", "nobody.listens", "x"); r.stdout != "0\n" {
			t.Fatalf("publish: %v", r)
		}
		e.mustRun(t, "", "publish", "news.weather", "bin\xff")
		if code := sub.wait(); code != 0 {
			t.Fatalf("subscribe exit %d\n%s", code, sub.stderr)
		}
		golden(t, "subscribe", normalize(sub.stdout.String()))
	})

	t.Run("json and stdin lines", func(t *testing.T) {
		sub := e.start(t, "-o", "json", "subscribe", "lines", "--count", "2")
		sub.waitErr("subscribed to lines\n")
		before := time.Now()
		r := e.mustRun(t, "first\n\nsecond\n", "publish", "lines")
		if r.stdout != "1\n1\n" {
			t.Fatalf("publish from stdin: %v", r)
		}
		if code := sub.wait(); code != 0 {
			t.Fatalf("subscribe exit %d\n%s", code, sub.stderr)
		}
		ms := jsonLines(t, sub.stdout.String())
		if len(ms) != 2 || ms[0]["payload"] != "first" || ms[1]["payload"] != "second" || ms[0]["channel"] != "lines" {
			t.Fatalf("messages: %v", ms)
		}
		at, err := time.Parse(time.RFC3339Nano, ms[0]["time"].(string))
		if err != nil || at.Before(before.Add(-time.Second)) || at.After(time.Now().Add(time.Second)) {
			t.Fatalf("time %v: %v", ms[0]["time"], err)
		}
	})

	t.Run("Ctrl-C", func(t *testing.T) {
		sub := e.start(t, "subscribe", "quiet")
		sub.waitErr("subscribed to quiet\n")
		sub.signal(syscall.SIGINT)
		if code := sub.wait(); code != exitInterrupted {
			t.Fatalf("exit %d, want %d\n%s", code, exitInterrupted, sub.stderr)
		}
	})

	t.Run("bad channel", func(t *testing.T) {
		r := e.run(t, "", "subscribe", "{braces}")
		wantExit(t, "bad channel", r, exitServer, "qbridge: InvalidArgument: ")
		if strings.Count(r.stderr, "\n") != 1 {
			t.Fatalf("want one line: %q", r.stderr)
		}
	})
}
