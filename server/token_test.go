package server

import (
	"strings"
	"testing"

	"github.com/qbridge/qbridge/server/broker"
)

func TestAckTokenRoundTrip(t *testing.T) {
	for _, tok := range []ackToken{
		{Queue: "task:prodcons:queue", LeaseID: "1", Instance: "abcdef0123456789", Consumer: 1},
		{Queue: strings.Repeat("q", MaxNameLen), LeaseID: "18446744073709551615", Instance: "", Consumer: 1 << 63},
	} {
		got, err := parseAckToken(tok.String())
		if err != nil {
			t.Fatalf("parse(%v): %v", tok, err)
		}
		if got != tok {
			t.Fatalf("round trip: got %+v want %+v", got, tok)
		}
	}
}

func FuzzParseAckToken(f *testing.F) {
	f.Add(ackToken{Queue: "q", LeaseID: "7", Instance: "i", Consumer: 3}.String())
	f.Add("v1.")
	f.Add("garbage")
	f.Add(ackToken{Queue: "q#3", LeaseID: "7", Instance: "i", Consumer: 3}.String())
	f.Add(ackToken{Queue: "q#3.17", LeaseID: "7", Instance: "i", Consumer: 3}.String())
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := parseAckToken(s)
		if err != nil {
			return
		}
		// Whatever parses names a valid queue or a well-formed shard of
		// one, and a numeric lease, and re-encodes to a token that parses
		// to the same thing.
		if !wellFormedShard(tok.Queue) || strings.Trim(tok.LeaseID, "0123456789") != "" || tok.LeaseID == "" {
			t.Fatalf("accepted %+v", tok)
		}
		again, err := parseAckToken(tok.String())
		if err != nil || again != tok {
			t.Fatalf("re-encode of %+v: %+v, %v", tok, again, err)
		}
	})
}

// wellFormedShard reports whether q is a valid queue name, or the name of
// shard i (1 to 255) of one: "<queue>#<i>" or "<queue>#<i>.<salt>", i and
// the salt in decimal without leading zeros (see broker/shards.go; the
// salt is what GrowShards picks on Redis Cluster).
func wellFormedShard(q string) bool {
	name, suffix, sharded := strings.Cut(q, broker.ShardSep)
	if ValidateName("queue", name) != nil {
		return false
	}
	if !sharded {
		return true
	}
	num, salt, salted := strings.Cut(suffix, ".")
	decimal := func(s string) bool {
		return s != "" && strings.Trim(s, "0123456789") == "" && (s == "0" || s[0] != '0')
	}
	if !decimal(num) || num == "0" || len(num) > 3 || num > "255" && len(num) == 3 {
		return false
	}
	return !salted || decimal(salt) && len(salt) <= 9
}

// TestAckTokenShards: a token of a shard names the shard (the lease is
// the shard's); only names a shard can have are accepted, and the queue
// it authorizes against is the queue, not the shard.
func TestAckTokenShards(t *testing.T) {
	for _, tc := range []struct {
		queue string
		ok    bool
	}{
		{"q", true},
		{"q#1", true},
		{"q#255", true},
		{"q#1.0", true},
		{"q#7.12345", true},
		{"task:prodcons:queue#3", true},
		{"q#junk", false},
		{"q#", false},
		{"q#0", false},
		{"q#00", false},
		{"q#01", false},
		{"q#256", false},
		{"q#-1", false},
		{"q#+1", false},
		{"q#1#2", false},
		{"#1", false},
		{"q{x}#1", false},
		{"q x#1", false},
		{strings.Repeat("q", MaxNameLen+1) + "#1", false},
		// Suffixes no shard has; with a brace, the keys of the "shard"
		// would hash to two slots, and on Redis Cluster the call fails
		// inside Redis (CROSSSLOT) instead of being refused.
		{"q#1.", false},
		{"q#1.x", false},
		{"q#1.2.3", false},
		{"q#1.}", false},
		{"q#1.{x}", false},
		{"q#1.0}", false},
	} {
		tok := ackToken{Queue: tc.queue, LeaseID: "12", Instance: "inst", Consumer: 4}
		got, err := parseAckToken(tok.String())
		if tc.ok {
			if !wellFormedShard(tc.queue) {
				t.Errorf("wellFormedShard(%q) is false; the test's own rule disagrees", tc.queue)
			}
			if err != nil || got != tok {
				t.Errorf("token of %q: %+v, %v; want it accepted", tc.queue, got, err)
				continue
			}
			q, err := AckTokenQueue(tok.String())
			if want, _, _ := strings.Cut(tc.queue, broker.ShardSep); err != nil || q != want {
				t.Errorf("AckTokenQueue of a token of %q = %q, %v; want %q", tc.queue, q, err, want)
			}
			continue
		}
		if err == nil {
			t.Errorf("token of %q accepted: %+v", tc.queue, got)
		}
		if wellFormedShard(tc.queue) {
			t.Errorf("wellFormedShard(%q) is true; the test's own rule disagrees", tc.queue)
		}
	}
}
