// Package redisacl is the least-privilege Redis ACL for the user qbridge
// connects as: exactly the commands qbridge sends (directly or from its Lua
// scripts, which Redis checks against the same ACL), on its own keys and
// channels only.
//
// With key prefix P (qbridged's --key-prefix; empty by default) the user
// needs
//
//	resetkeys ~P* ~{P*     the ready list of queue Q is the key "P Q" (no
//	                       separator: the prefix is prepended as is) and so
//	                       are the two global keys "P qbridge:queues" and
//	                       "P qbridge:due"; every other key of queue Q is
//	                       "{P Q}:qb:...", a Redis Cluster hash tag, which
//	                       does not start with P, hence the second pattern.
//	                       With an empty prefix the queue names are arbitrary
//	                       keys and the rule is just ~* (Redis refuses a
//	                       pattern after ~*).
//	resetchannels &P*      pub/sub channel C is the Redis channel "P C",
//	                       classic or sharded (SPUBLISH, SSUBSCRIBE: Redis
//	                       checks them against the same rules); qbridge's
//	                       own channels are "P{qbridge}:..." (instance
//	                       control, events, stored results).
//	-@all +cmd ...         the commands in Commands, nothing else: no
//	                       FLUSHALL, KEYS, CONFIG, SCRIPT FLUSH, DEBUG, ...
//
// Characters of P that are special in Redis glob patterns (* ? [ ] \) are
// escaped with a backslash; braces are not special. Redis refuses
// whitespace anywhere in a key or channel pattern, so a space, tab, CR, LF,
// VT or FF in P becomes ? (any one character): the rule is then a little
// wider than the prefix. Rules builds the rule list, SetUser the ACL
// SETUSER command and ConfigLine the "user" line for redis.conf or an ACL
// file; for prefix "app:":
//
//	user qbridge on >secret resetkeys ~app:* ~{app:* resetchannels &app:* -@all +hello +auth ...
//
// On Redis Cluster every node needs the same user, with two more commands
// that go-redis's cluster client sends by itself (ClusterCommands: CLUSTER
// SLOTS and COMMAND); ClusterRules, ClusterSetUser and ClusterConfigLine
// include them. With Sentinel the master and replicas need the plain rule
// set; the sentinels are asked, with their own credentials if they have
// any, SENTINEL GET-MASTER-ADDR-BY-NAME and SENTINEL SENTINELS, and are
// subscribed to for +switch-master.
//
// Limits of the rule set:
//
//   - Redis checks a PSUBSCRIBE pattern literally against the channel
//     rules: a pattern is allowed only if it equals a rule, or if the user
//     has every channel. With prefix "app:", a Subscribe to the pattern
//     "news.*" (PSUBSCRIBE "app:news.*") is therefore refused with NOPERM
//     unless the operator adds that exact pattern (&app:news.*), or &* if
//     any pattern is fine. Plain channels need nothing more. With an empty
//     prefix the rule is &* and every pattern works.
//   - Keys under the prefix are not qbridge's alone: any key matching ~P*
//     or ~{P* is reachable. Give qbridge a prefix of its own to keep it
//     away from other data.
//   - SPUBLISH, SSUBSCRIBE and SUNSUBSCRIBE (sharded channels) came with
//     Redis 7.0. Redis 6.2 refuses an ACL rule naming a command it does not
//     know, so the rule set as a whole needs Redis 7.0 or later; for 6.2,
//     leave those three out (and do not use sharded channels).
//   - go-redis sends CLIENT SETINFO (library name and version) on every
//     new connection unless its options say DisableIdentity, and ignores a
//     refusal. qbridged disables it; Redis before 7.2 does not know the
//     subcommand and rejects "+client|setinfo" in an ACL rule, so it is not
//     in Commands. Programs that embed package server with their own
//     clients should set DisableIdentity too, or see refusals in ACL LOG.
package redisacl

import (
	"strings"
)

// Commands lists every Redis command qbridge sends (directly or from its Lua
// scripts), lower case, subcommands as "container|sub". Keep it in step with
// package broker: the tests check the scripts against it, and run the whole
// suite as a user with exactly these commands.
var Commands = []string{
	// Connection set-up by go-redis, on every new connection.
	"hello",          // HELLO 3 AUTH user password: protocol and login (Redis lets it through before login anyway)
	"auth",           // the fallback login when HELLO is refused
	"select",         // the database of --redis-url / --redis-db, when not 0
	"client|setname", // sent on connect when the Redis client is given a name (programs embedding package server may name theirs)
	"ping",           // health checks (Broker.Ping) and go-redis's health check of the pub/sub connection

	// Scripts: every state change of a queue is one Lua script.
	"evalsha",     // runs a cached script
	"eval",        // runs a script that Redis lost from its cache (NOSCRIPT after a restart or SCRIPT FLUSH)
	"script|load", // loads every script at start-up and after NOSCRIPT

	// Replication.
	"wait", // --enqueue-replicas (WithEnqueueReplicas): after a flush's enqueue scripts, wait until n replicas have them

	// Transactions.
	"multi", // SetConfig replaces a queue's config hash atomically (TxPipelined)
	"exec",  // ends that transaction

	// Ready lists (and what the scripts do to them).
	"lpush",  // PushBack returns auto-ack pops that never reached a client; scripts: requeue at the head
	"rpush",  // scripts: enqueue, promote, replay append to the tail
	"lpop",   // scripts: claim and auto-ack pop take from the head
	"llen",   // queue stats and backlog checks; scripts: max length, "ready" announcements
	"lrange", // PeekMessages, and GetResult's search of the ready list
	"lindex", // queue stats: age of the oldest ready message
	"blmove", // blocking wait for a queue to become non-empty (BLMOVE from the list to itself, takes nothing)

	// Plain keys.
	"set",    // PauseQueue sets the paused flag
	"del",    // ResumeQueue, config replacement; scripts: purge, delete queue, delete dead letters
	"exists", // queue stats, queue existence; scripts: paused flag, counters
	"type",   // scripts: refuse to touch a ready-list key that holds something other than a list
	"incr",   // scripts: lease id counter
	"incrby", // scripts: a batch of lease ids at once
	"time",   // scripts: Redis's clock for leases and due times (instances with skewed clocks agree)

	// Hashes (inflight, scheduled, dead letters, config, counters, dedup, results).
	"hget",    // scripts and GetResult, dead-letter lookups
	"hmget",   // peeking scheduled/dead messages, counters; scripts: policy, settle
	"hgetall", // GetQueueConfig, counters per task type
	"hset",    // SetConfig; scripts: inflight, scheduled, dead letters, dedup, results
	"hdel",    // scripts: settle, reap, promote, replay, dedup and result expiry
	"hlen",    // queue stats (messages in flight); scripts: delete queue
	"hexists", // scripts: dead-letter id collisions
	"hincrby", // scripts: event counters
	"hscan",   // GetResult's search of inflight/scheduled/dead messages

	// Sets (the queue registry).
	"sadd",      // registers queues that were enqueued to or consumed
	"srem",      // DeleteQueue unregisters a queue
	"smembers",  // the registered queues (ListQueues, the background reaper and promoter)
	"sismember", // whether a queue is known (Broker.Known)

	// Sorted sets (leases, delayed messages, dead-letter index, dedup and result expiry, due index).
	"zadd",          // the global due index (ZADD and ZADD LT); scripts: leases, delays, expiries
	"zrem",          // the global due index; scripts: leases, delays, expiries
	"zrange",        // due index, earliest delayed message, peeking by index; scripts: next due time, replay all
	"zrangebyscore", // scripts: expired leases, due messages, expired dedup keys and results
	"zcard",         // queue stats (delayed, dead); scripts: max length, delete dead letters
	"zscore",        // GetResult retention; scripts: dedup windows, lease extension

	// Pub/sub.
	"publish",      // Publish; scripts: "ready <queue>" events and stored-result announcements
	"subscribe",    // Subscribe streams, and each instance's control and events channels
	"psubscribe",   // Subscribe streams with patterns
	"unsubscribe",  // a Subscribe stream ends
	"punsubscribe", // a pattern Subscribe stream ends
	"spublish",     // Publish to a sharded channel (--sharded-channels; Redis 7)
	"ssubscribe",   // Subscribe streams on sharded channels
	"sunsubscribe", // a Subscribe stream on a sharded channel ends
}

// ClusterCommands lists what qbridge needs on Redis Cluster besides
// Commands: go-redis's cluster client asks for them on its own. A single
// Redis, or one behind Sentinel, needs none of them.
var ClusterCommands = []string{
	"cluster|slots", // which node serves which slot, at start-up and after a MOVED or a failure
	"command",       // the command table (key positions, routing tips), once per client; metadata only
	"asking",        // sent before following an ASK redirection while a slot migrates
}

// ClusterRules returns Rules(prefix) with ClusterCommands added: the ACL
// of qbridge's user on every node of a Redis Cluster.
func ClusterRules(prefix string) []string {
	rules := Rules(prefix)
	for _, c := range ClusterCommands {
		rules = append(rules, "+"+c)
	}
	return rules
}

// ClusterSetUser is SetUser for the nodes of a Redis Cluster (with
// ClusterCommands).
func ClusterSetUser(user, password, prefix string) []any {
	args := []any{"ACL", "SETUSER", user, "on", ">" + password}
	for _, r := range ClusterRules(prefix) {
		args = append(args, r)
	}
	return args
}

// ClusterConfigLine is ConfigLine for the nodes of a Redis Cluster (with
// ClusterCommands).
func ClusterConfigLine(user, password, prefix string) string {
	return configLine(user, password, ClusterRules(prefix))
}

// Rules returns the ACL SETUSER rules (without "on", the user name or a
// password) that give qbridge with key prefix prefix exactly what it needs;
// see the package documentation.
func Rules(prefix string) []string {
	p := globEscape(prefix)
	rules := []string{"resetkeys"}
	if prefix == "" {
		rules = append(rules, "~*")
	} else {
		rules = append(rules, "~"+p+"*", "~{"+p+"*")
	}
	rules = append(rules, "resetchannels", "&"+p+"*", "-@all")
	for _, c := range Commands {
		rules = append(rules, "+"+c)
	}
	return rules
}

// SetUser returns the full command line
// `ACL SETUSER <user> on ><password> <rules...>` as arguments (for
// redis.Client.Do).
func SetUser(user, password, prefix string) []any {
	args := []any{"ACL", "SETUSER", user, "on", ">" + password}
	for _, r := range Rules(prefix) {
		args = append(args, r)
	}
	return args
}

// ConfigLine returns the same as one `user ...` line for redis.conf or an ACL
// file. Arguments that need it (spaces, quotes, control characters, empty)
// are double-quoted the way Redis reads those files.
func ConfigLine(user, password, prefix string) string {
	return configLine(user, password, Rules(prefix))
}

func configLine(user, password string, rules []string) string {
	words := append([]string{"user", user, "on", ">" + password}, rules...)
	for i, w := range words {
		words[i] = configQuote(w)
	}
	return strings.Join(words, " ")
}

// globEscape escapes the characters that are special in Redis glob patterns
// (see stringmatchlen in Redis' util.c), and turns whitespace, which Redis
// does not accept in ACL patterns, into ?.
func globEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case ' ', '\t', '\n', '\r', '\v', '\f':
			b.WriteByte('?')
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// configQuote returns w as one argument for Redis' config and ACL file
// parser (sdssplitargs): bare when that reads back as w (a backslash
// outside quotes is literal), else double-quoted with \\, \" and \xHH.
func configQuote(w string) string {
	plain := w != ""
	for i := 0; i < len(w) && plain; i++ {
		c := w[i]
		plain = c > ' ' && c != 0x7f && c != '"' && c != '\''
	}
	if plain {
		return w
	}
	const hex = "0123456789abcdef"
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(w); i++ {
		switch c := w[i]; {
		case c == '\\' || c == '"':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < ' ' || c == 0x7f:
			b.WriteString(`\x`)
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}
