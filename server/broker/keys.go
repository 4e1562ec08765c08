// Package broker holds every Redis command and Lua script qbridge runs, and
// the key layout they share. Nothing else in qbridge talks to Redis.
//
// # Key layout
//
// With key prefix P (empty by default) and queue Q:
//
//	P Q                   list   the ready queue. Exactly the list a plain Redis
//	                             client pushes to or pops from. qbridge appends
//	                             (RPUSH) and takes from the head (LPOP / BLMOVE),
//	                             so a plain BLPOP consumer sees qbridge's order.
//	{P Q}:qb:inflight     hash   lease id -> envelope of each delivered, unsettled message
//	{P Q}:qb:leases       zset   lease id -> lease deadline (Redis server time, unix ms)
//	{P Q}:qb:seq          string counter for lease ids and other unique members (never reset)
//	{P Q}:qb:delayed      zset   member -> due time (unix ms) of delayed messages
//	{P Q}:qb:scheduled    hash   member -> envelope of delayed messages
//	{P Q}:qb:dead         hash   dead id -> envelope of dead letters (with reason and time)
//	{P Q}:qb:deadidx      zset   dead id -> time of death (unix ms), for paging
//	{P Q}:qb:config       hash   the queue's policy (fields absent: server default)
//	{P Q}:qb:counters     hash   event totals: enqueued, acked, nacked, ...
//	{P Q}:qb:paused       string present while the queue is paused
//	{P Q}:qb:dedup        hash   dedup key -> id of the message enqueued with it
//	{P Q}:qb:dedupexp     zset   dedup key -> end of its dedup window (unix ms)
//	{P Q}:qb:typecounts   hash   "<task type>\x1f<counter>" -> total, per task type
//	{P Q}:qb:results      hash   message id -> result record (outcome, time, attempts, error, payload)
//	{P Q}:qb:resultexp    zset   message id -> end of the result's retention (unix ms)
//	{P Q}:qb:consumers    hash   instance id -> "<open Consume streams>:<expiry, unix ms>",
//	                             refreshed by each consuming instance (presence, not data)
//	P qbridge:queues      set    queues qbridge has seen (enqueued to or consumed)
//	P qbridge:due         zset   queue -> earliest due time of its delayed messages
//	P qbridge:shards      hash   queue -> suffixes of its shards 1..N-1 (see shards.go)
//
// The braces are a Redis Cluster hash tag: "{P Q}:..." hashes on "P Q", the
// same slot as the ready list itself (which has no braces, so it hashes as a
// whole), so every script below touches keys of a single slot. Queue names
// cannot contain braces (see package server); neither may the prefix on
// Redis Cluster (see CheckClusterPrefix). The two global keys are only ever
// used by single-key commands, and the pipelines that read many queues at
// once are split per node by the cluster client; the only transaction
// (SetConfig) touches one key.
//
// Pub/sub channel C is the Redis channel "P C"; patterns are prefixed the same
// way. qbridge's own channels are "P{qbridge}:instance:<id>" (each
// instance's control channel), "P{qbridge}:events" (events for every
// instance, among them "ready <queue>", which scripts publish when they push
// to an empty ready list) and "P{qbridge}:results:<queue>" (stored results).
//
// # Message states
//
// A message is in exactly one place at every instant: an element of the ready
// list, an entry of the inflight hash (with its lease), of the scheduled hash
// (with its due time), or of the dead hash. Every move between them is a
// single Lua script, so a qbridge crash at any point cannot lose it.
package broker

import (
	"fmt"
	"strings"
)

// CheckClusterPrefix reports why key prefix p cannot be used on Redis
// Cluster: a brace in it would make Redis hash a queue's ready list "P Q"
// and its other keys "{P Q}:qb:..." on different hash tags, so that the
// queue's scripts fail with CROSSSLOT. (On a single Redis or with Sentinel
// any prefix works.)
func CheckClusterPrefix(p string) error {
	for _, c := range p {
		if c == '{' || c == '}' {
			return fmt.Errorf("key prefix %q has a brace %q: on Redis Cluster braces mark hash tags, and the keys of a queue would no longer share one slot; use a prefix without braces", p, c)
		}
	}
	return nil
}

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

// Delayed is the due-time index of queue q's delayed messages.
func (k Keys) Delayed(q string) string { return k.tag(q) + ":qb:delayed" }

// Scheduled holds queue q's delayed messages.
func (k Keys) Scheduled(q string) string { return k.tag(q) + ":qb:scheduled" }

// Dead holds queue q's dead letters.
func (k Keys) Dead(q string) string { return k.tag(q) + ":qb:dead" }

// DeadIndex orders queue q's dead letters by time of death.
func (k Keys) DeadIndex(q string) string { return k.tag(q) + ":qb:deadidx" }

// Config is queue q's policy.
func (k Keys) Config(q string) string { return k.tag(q) + ":qb:config" }

// Consumers is the hash of the Consume streams each instance has open on
// queue q.
func (k Keys) Consumers(q string) string { return k.tag(q) + ":qb:consumers" }

// Counters holds queue q's event totals.
func (k Keys) Counters(q string) string { return k.tag(q) + ":qb:counters" }

// Paused exists while queue q is paused.
func (k Keys) Paused(q string) string { return k.tag(q) + ":qb:paused" }

// Dedup maps queue q's remembered dedup keys to message ids.
func (k Keys) Dedup(q string) string { return k.tag(q) + ":qb:dedup" }

// DedupExpiry holds when each of queue q's dedup keys is forgotten.
func (k Keys) DedupExpiry(q string) string { return k.tag(q) + ":qb:dedupexp" }

// TypeCounts holds queue q's counters per task type.
func (k Keys) TypeCounts(q string) string { return k.tag(q) + ":qb:typecounts" }

// Results holds queue q's kept results.
func (k Keys) Results(q string) string { return k.tag(q) + ":qb:results" }

// ResultExpiry holds when each of queue q's results is forgotten.
func (k Keys) ResultExpiry(q string) string { return k.tag(q) + ":qb:resultexp" }

// ResultsChannel announces the ids of queue q's newly kept results.
func (k Keys) ResultsChannel(q string) string { return k.prefix + "{qbridge}:results:" + q }

// Queues is the set of queues qbridge has seen.
func (k Keys) Queues() string { return k.prefix + "qbridge:queues" }

// Due is the global index of each queue's earliest due time.
func (k Keys) Due() string { return k.prefix + "qbridge:due" }

// script returns the standard KEYS of queue q's scripts (see scripts.go).
func (k Keys) script(q string) []string {
	return []string{k.Ready(q), k.InFlight(q), k.Leases(q), k.Seq(q), k.Delayed(q), k.Scheduled(q),
		k.Dead(q), k.DeadIndex(q), k.Config(q), k.Counters(q), k.Paused(q), k.Dedup(q), k.DedupExpiry(q),
		k.TypeCounts(q), k.Results(q), k.ResultExpiry(q)}
}

// Channel is the Redis channel (or pattern) for pub/sub name c.
func (k Keys) Channel(c string) string { return k.prefix + c }

// StripChannel turns a Redis channel name back into the client's name.
func (k Keys) StripChannel(c string) string {
	if len(c) >= len(k.prefix) && c[:len(k.prefix)] == k.prefix {
		return c[len(k.prefix):]
	}
	return c
}

// Shards is the table of sharded queues (see shards.go).
func (k Keys) Shards() string { return k.prefix + "qbridge:shards" }

// SlotCount is the number of Redis Cluster hash slots.
const SlotCount = 16384

// Slot returns the Redis Cluster hash slot of key: CRC16 (XMODEM) of the
// key, or of its hash tag (the part between the first '{' and the next '}',
// when not empty), modulo SlotCount.
func Slot(key string) int {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % SlotCount
}
