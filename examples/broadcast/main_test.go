package main

import (
	"maps"
	"regexp"
	"slices"
	"strconv"
	"testing"

	"github.com/qbridge/qbridge/examples/internal/exampletest"
)

// 3 subscribers each receive every post published after they subscribed,
// and nothing from before; the publisher's receivers are what Redis
// PUBLISH returned.
func TestBroadcast(t *testing.T) {
	env := exampletest.Start(t)
	p := exampletest.Go(t, "broadcast", run,
		"-addr", env.Addr, "-subscribers", "3", "-posts", "5", "-late-after", "0", "-interval", "0")
	if err := p.Wait(t); err != nil {
		t.Fatalf("run: %v\n%s", err, p.Output())
	}

	// Who printed which post.
	got := map[string][]int{}
	for _, m := range p.Lines(regexp.MustCompile(`^(subscriber \d+(?: \(late\))?) got #(\d+) `)) {
		n, _ := strconv.Atoi(m[2])
		got[m[1]] = append(got[m[1]], n)
	}
	want := map[string][]int{
		"subscriber 1": {1, 2, 3, 4, 5},
		"subscriber 2": {1, 2, 3, 4, 5},
		"subscriber 3": {1, 2, 3, 4, 5},
	}
	for name, w := range want {
		if !slices.Equal(got[name], w) {
			t.Errorf("%s printed posts %v, want %v", name, got[name], w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("subscribers that printed posts: %v; want exactly %d", got, len(want))
	}

	// The publisher's receivers: what Redis PUBLISH returned. Nobody had
	// subscribed for post 0; afterwards every subscriber is a stream of the
	// same qbridge instance, which holds one Redis subscription for all.
	receivers := map[int]string{}
	for _, m := range p.Lines(regexp.MustCompile(`^published #(\d+) .*: receivers=(\d+)$`)) {
		n, _ := strconv.Atoi(m[1])
		receivers[n] = m[2]
	}
	wantReceivers := map[int]string{0: "0", 1: "1", 2: "1", 3: "1", 4: "1", 5: "1"}
	if !maps.Equal(receivers, wantReceivers) {
		t.Errorf("receivers per post = %v, want %v\n%s", receivers, wantReceivers, p.Output())
	}
	// The summary counts subscribers that printed each post.
	for n, w := range map[int]string{1: "3", 2: "3", 3: "3", 4: "3", 5: "3"} {
		re := regexp.MustCompile(`^#` + strconv.Itoa(n) + ` .*: receivers=1, subscribers that printed it=` + w + `$`)
		if len(p.Lines(re)) != 1 {
			t.Errorf("no summary line matching %q\n%s", re, p.Output())
		}
	}
}

// A subscriber that joins after post 2 sees posts 3 to 5 and nothing from
// before it subscribed.
func TestLateSubscriber(t *testing.T) {
	env := exampletest.Start(t)
	p := exampletest.Go(t, "broadcast", run,
		"-addr", env.Addr, "-subscribers", "1", "-posts", "5", "-late-after", "2", "-interval", "0")
	if err := p.Wait(t); err != nil {
		t.Fatalf("run: %v\n%s", err, p.Output())
	}
	var got []int
	for _, m := range p.Lines(regexp.MustCompile(`^subscriber 2 \(late\) got #(\d+) `)) {
		n, _ := strconv.Atoi(m[1])
		got = append(got, n)
	}
	if want := []int{3, 4, 5}; !slices.Equal(got, want) {
		t.Errorf("the late subscriber printed posts %v, want %v", got, want)
	}
}
