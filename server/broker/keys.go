// Package broker holds every Redis command and Lua script qbridge runs, and
// the key layout they share. Nothing else in qbridge talks to Redis.
//
// # Key layout
//
// With key prefix P (empty by default) and queue Q:
//
//	P Q                  list   the ready queue. Exactly the list a plain Redis
//	                            client pushes to or pops from. qbridge appends
//	                            (RPUSH) and takes from the head (LPOP / BLMOVE),
//	                            so a plain BLPOP consumer sees qbridge's order.
//	{P Q}:qb:inflight    hash   lease id -> envelope of each delivered, unsettled message
//	{P Q}:qb:leases      zset   lease id -> lease deadline (Redis server time, unix ms)
//	{P Q}:qb:seq         string counter that hands out lease ids (never reused)
//	P qbridge:queues     set    queues that have had consumers; the lease reaper walks it
//
// The braces are a Redis Cluster hash tag: "{P Q}:..." hashes on "P Q", the
// same slot as the ready list itself, so every script below touches keys of a
// single slot. Queue names cannot contain braces (see package server).
//
// Pub/sub channel C is the Redis channel "P C"; patterns are prefixed the same
// way.
//
// # Message states
//
// A message is in exactly one place at every instant: an element of the ready
// list, or an entry of the inflight hash (with its lease in the leases zset).
// Every move between the two is a single Lua script, so a qbridge crash at
// any point cannot lose it.
package broker

// Keys builds Redis key and channel names for one key prefix.
type Keys struct {
	prefix string
}

// NewKeys returns the key layout for prefix (may be empty).
func NewKeys(prefix string) Keys { return Keys{prefix: prefix} }

// Prefix returns the configured key prefix.
func (k Keys) Prefix() string { return k.prefix }

// Ready is the ready list of queue q: the Redis list plain clients use.
func (k Keys) Ready(q string) string { return k.prefix + q }

func (k Keys) tag(q string) string { return "{" + k.prefix + q + "}" }

// InFlight is the hash of delivered, unsettled messages of queue q.
func (k Keys) InFlight(q string) string { return k.tag(q) + ":qb:inflight" }

// Leases is the sorted set of lease deadlines of queue q.
func (k Keys) Leases(q string) string { return k.tag(q) + ":qb:leases" }

// Seq is the lease id counter of queue q.
func (k Keys) Seq(q string) string { return k.tag(q) + ":qb:seq" }

// Queues is the set of queues the lease reaper looks after.
func (k Keys) Queues() string { return k.prefix + "qbridge:queues" }

// Channel is the Redis channel (or pattern) for pub/sub name c.
func (k Keys) Channel(c string) string { return k.prefix + c }

// StripChannel turns a Redis channel name back into the client's name.
func (k Keys) StripChannel(c string) string {
	if len(c) >= len(k.prefix) && c[:len(k.prefix)] == k.prefix {
		return c[len(k.prefix):]
	}
	return c
}
