package broker

import (
	"context"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Sharded pub/sub
//
// Channels matching WithShardedChannels are sharded (Redis 7): Publish sends
// SPUBLISH instead of PUBLISH, and Subscribe streams subscribe with
// SSUBSCRIBE (package server). On Redis Cluster a sharded channel lives on
// the master that owns its hash slot (the slot of "P C", like a key):
// SPUBLISH goes to that node alone instead of being broadcast to every
// node, and its receiver count covers every subscriber. Redis delivers
// SPUBLISHed messages to SSUBSCRIBE subscribers only: never to PSUBSCRIBE
// patterns, nor to a plain SUBSCRIBE of the same name; plain Redis clients
// use SPUBLISH and SSUBSCRIBE for these channels too. On a single Redis or
// with Sentinel the commands work the same, on the one master.

// WithShardedChannels makes the channels whose names (as clients give them,
// without the key prefix) match one of patterns sharded. Patterns are Redis
// glob patterns: * (any run of characters), ? (any one character), [abc],
// [^abc] and [a-z] (one character of, or not of, a set), and \ (the next
// character literally); a pattern without those characters names one
// channel. Default: no channel is sharded.
func WithShardedChannels(patterns ...string) Option {
	return func(b *Broker) { b.sharded = newChannelMatcher(patterns) }
}

// IsSharded reports whether channel (a client's name, without the key
// prefix) is sharded.
func (b *Broker) IsSharded(channel string) bool {
	return b.sharded != nil && b.sharded.match(channel)
}

// ShardedPubSub returns a new pub/sub connection for sharded channels, not
// yet connected: its first SSubscribe connects it, on Redis Cluster to the
// master of the slot of the first channel. On Redis Cluster one
// connection must only ever hold channels of one slot (see ShardedSlot):
// SSUBSCRIBE refuses channels of several slots (CROSSSLOT), and go-redis
// subscribes all of a connection's channels again in one command when it
// reconnects.
func (b *Broker) ShardedPubSub(ctx context.Context) *redis.PubSub {
	return b.blocking.SSubscribe(ctx)
}

// ShardedSlot returns which sharded pub/sub connection Redis channel ch
// (with the key prefix) belongs on: on Redis Cluster its hash slot, the
// one Redis computes for a key of that name (Slot); elsewhere always 0,
// since one connection takes every sharded channel.
func (b *Broker) ShardedSlot(ch string) int {
	if _, ok := b.blocking.(*redis.ClusterClient); !ok {
		return 0
	}
	return Slot(ch)
}

// ReloadSlots makes a Redis Cluster client re-read which master serves
// which slot now (a no-op elsewhere), so that the next sharded connection
// goes to a slot's current master after a failover or a migration.
func (b *Broker) ReloadSlots(ctx context.Context) {
	if cc, ok := b.blocking.(*redis.ClusterClient); ok {
		reloadSlots(ctx, cc)
	}
}

// channelMatcher tests channel names against WithShardedChannels's
// patterns: names without glob characters by a map lookup, the others one
// by one.
type channelMatcher struct {
	all   bool
	names map[string]struct{}
	globs []string
}

func newChannelMatcher(patterns []string) *channelMatcher {
	if len(patterns) == 0 {
		return nil
	}
	m := &channelMatcher{names: map[string]struct{}{}}
	for _, p := range patterns {
		switch {
		case strings.Trim(p, "*") == "" && p != "":
			m.all = true
		case strings.ContainsAny(p, `*?[\`):
			m.globs = append(m.globs, p)
		default:
			m.names[p] = struct{}{}
		}
	}
	return m
}

func (m *channelMatcher) match(ch string) bool {
	if m.all {
		return true
	}
	if _, ok := m.names[ch]; ok {
		return true
	}
	for _, g := range m.globs {
		if globMatch(g, ch) {
			return true
		}
	}
	return false
}

// globMatch reports whether s matches the Redis glob pattern p (the syntax
// of PSUBSCRIBE and KEYS, matched the way Redis matches it: an unterminated
// [ set ends with the pattern, a range may be given high to low).
func globMatch(p, s string) bool {
	for len(p) > 0 {
		switch p[0] {
		case '*':
			for len(p) > 1 && p[1] == '*' {
				p = p[1:]
			}
			if len(p) == 1 {
				return true
			}
			for i := 0; i <= len(s); i++ {
				if globMatch(p[1:], s[i:]) {
					return true
				}
			}
			return false
		case '?':
			if len(s) == 0 {
				return false
			}
		case '[':
			if len(s) == 0 {
				return false
			}
			ok, rest := matchSet(p[1:], s[0])
			if !ok {
				return false
			}
			p, s = rest, s[1:]
			continue
		case '\\':
			if len(p) >= 2 {
				p = p[1:]
			}
			fallthrough
		default:
			if len(s) == 0 || p[0] != s[0] {
				return false
			}
		}
		p, s = p[1:], s[1:]
	}
	return len(s) == 0
}

// matchSet matches c against the set that p begins with (just after its
// '['), and returns the pattern after the set.
func matchSet(p string, c byte) (bool, string) {
	not := len(p) > 0 && p[0] == '^'
	if not {
		p = p[1:]
	}
	match := false
	for len(p) > 0 && p[0] != ']' {
		switch {
		case p[0] == '\\' && len(p) >= 2:
			match = match || p[1] == c
			p = p[2:]
		case len(p) >= 3 && p[1] == '-':
			lo, hi := p[0], p[2]
			if lo > hi {
				lo, hi = hi, lo
			}
			match = match || (c >= lo && c <= hi)
			p = p[3:]
		default:
			match = match || p[0] == c
			p = p[1:]
		}
	}
	if len(p) > 0 {
		p = p[1:] // the ']'
	}
	return match != not, p
}
