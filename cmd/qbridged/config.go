package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/server"
	"github.com/qbridge/qbridge/server/auth"
	"github.com/qbridge/qbridge/server/broker"
)

// Config is qbridged's configuration. Every field comes from one entry of
// flagDefs: its default, overridden by its environment variable, overridden
// by its command-line flag.
type Config struct {
	ConfigFile       string
	HTTPListen       string
	Dashboard        bool
	MetricsMaxQueues int
	OTLPEndpoint     string
	OTLPProtocol     string
	OTLPInsecure     bool
	TraceSampleRatio float64
	PrintRedisACL    bool
	Listen           string
	Plaintext        bool
	TLSCert          string
	TLSKey           string
	TLSClientCA      string
	RedisURL         string
	RedisDB          int
	RedisUsername    string
	RedisPassFile    string
	RedisCA          string
	RedisCert        string
	RedisKey         string
	KeyPrefix        string
	RawQueues        []string
	ShardedChannels  []string
	MaxPayloadBytes  int
	MaxBatch         int
	MaxInFlight      int
	DefaultLease     time.Duration
	ReapInterval     time.Duration
	SubscriberBuffer int
	WaitSlice        time.Duration
	DrainTimeout     time.Duration
	ShutdownTimeout  time.Duration
	KeepaliveTime    time.Duration
	KeepaliveTimeout time.Duration
	BlockingWaits    int
	IdlePoll         time.Duration
	Coalescing       int
	EnqueueReplicas  int
	ReplicasTimeout  time.Duration
	MaxAttempts      int
	RetryBackoffMin  time.Duration
	RetryBackoffMax  time.Duration
	MaxLength        int
	ExpiredAction    string
	DedupWindow      time.Duration
	ResultRetention  time.Duration
	LogLevel         slog.Level
	LogFormat        string
	PublicHealth     bool
	PublicReflection bool
	MaxConcStreams   int
	RequestsPerSec   float64
	RequestBurst     int
	BytesPerSec      float64
	MaxStreams       int

	// Principals come from the config file's [[principal]] tables, their
	// limits filled in from the defaults above.
	Principals []auth.Principal

	// redisPassword comes from --redis-password-file or the environment
	// (never a flag: command lines are visible to every local user). It is
	// never logged.
	redisPassword string
	// fileKeys are the settings the config file gave, for error messages.
	fileKeys map[string]bool
}

// redisPasswordEnv holds the Redis password when no file is given.
const redisPasswordEnv = "QBRIDGE_REDIS_PASSWORD"

// Lease bounds the server accepts (server.WithLeaseBounds); --default-lease
// must lie within them.
const (
	minLease = time.Second
	maxLease = 12 * time.Hour
	// maxPayloadLimit is Redis' largest string (proto-max-bulk-len default).
	maxPayloadLimit = 512 << 20
)

// flagDef is one configuration setting: a flag, its environment variable and
// its default. flagDefs is the single source of the --help text and of the
// table in README.md.
type flagDef struct {
	name  string // flag name, without dashes
	arg   string // what the value is, for the help text
	def   string // default, as it would be typed
	usage string // one sentence or two
	value func(c *Config) flag.Value
}

// envVar is the environment variable for the flag: QBRIDGE_<UPPER_SNAKE>.
func (d flagDef) envVar() string {
	return "QBRIDGE_" + strings.ToUpper(strings.ReplaceAll(d.name, "-", "_"))
}

var flagDefs = []flagDef{
	{"config", "file", "",
		"TOML configuration file: any flag below as `name = value`, plus principals and their grants (see Security in README.md). Environment variables and flags override it.",
		func(c *Config) flag.Value { return (*stringValue)(&c.ConfigFile) }},
	{"print-redis-acl", "bool", "false",
		"Print the least-privilege Redis ACL for qbridged's user (--redis-username, default qbridge) and --key-prefix, and exit.",
		func(c *Config) flag.Value { return (*boolValue)(&c.PrintRedisACL) }},
	{"listen", "host:port", "127.0.0.1:7070",
		"gRPC listen address. Port 0 picks a free port (the log says which).",
		func(c *Config) flag.Value { return (*stringValue)(&c.Listen) }},
	{"http-listen", "host:port", "127.0.0.1:7071",
		"HTTP listen address of /healthz, /readyz, /metrics and the web dashboard (plaintext; the dashboard's API goes through the gRPC authorization). Empty turns the HTTP listener off.",
		func(c *Config) flag.Value { return (*stringValue)(&c.HTTPListen) }},
	{"dashboard", "bool", "true",
		"Serve the web dashboard at / of --http-listen.",
		func(c *Config) flag.Value { return (*boolValue)(&c.Dashboard) }},
	{"metrics-max-queues", "n", "100",
		"Most queues exported in /metrics and sampled for the dashboard's history: the first in name order (qbridge_queues_truncated says when there are more); per-instance delivery series of further queues are counted under queue=\"_other\".",
		func(c *Config) flag.Value { return (*intValue)(&c.MetricsMaxQueues) }},
	{"otlp-endpoint", "host:port", "",
		"OpenTelemetry collector to send traces to (OTLP). Empty: tracing off. Producers' trace context travels in each message's traceparent header.",
		func(c *Config) flag.Value { return (*stringValue)(&c.OTLPEndpoint) }},
	{"otlp-protocol", "protocol", "grpc",
		"OTLP protocol: grpc or http/protobuf.",
		func(c *Config) flag.Value { return (*stringValue)(&c.OTLPProtocol) }},
	{"otlp-insecure", "bool", "false",
		"Send traces to --otlp-endpoint without TLS.",
		func(c *Config) flag.Value { return (*boolValue)(&c.OTLPInsecure) }},
	{"trace-sample-ratio", "ratio", "1",
		"Share of new traces sampled (above 0, at most 1); calls that carry a sampled parent are always traced.",
		func(c *Config) flag.Value { return (*floatValue)(&c.TraceSampleRatio) }},
	{"plaintext", "bool", "false",
		"Serve gRPC without TLS. Needed, when --tls-cert is not set, to run with --redis-url (the embedded development mode is plaintext without asking): say so only behind a TLS-terminating proxy or on a trusted network.",
		func(c *Config) flag.Value { return (*boolValue)(&c.Plaintext) }},
	{"tls-cert", "file", "",
		"PEM certificate (chain) of the gRPC listener; with --tls-key, the listener speaks TLS only. New files are picked up on SIGHUP or within a second of changing; open streams keep theirs.",
		func(c *Config) flag.Value { return (*stringValue)(&c.TLSCert) }},
	{"tls-key", "file", "",
		"PEM private key of --tls-cert.",
		func(c *Config) flag.Value { return (*stringValue)(&c.TLSKey) }},
	{"tls-client-ca", "file", "",
		"PEM CA certificates for mutual TLS: clients must present a certificate signed by one of them (needs --tls-cert).",
		func(c *Config) flag.Value { return (*stringValue)(&c.TLSClientCA) }},
	{"redis-url", "url", "",
		"Redis to use: redis://[user:password@]host:port[/db] (rediss:// for TLS) or unix:///path/to/redis.sock[?db=N]; Sentinel: redis-sentinel://[user:password@]host1:26379,host2:26379[/db]?master=NAME; Cluster: redis-cluster://[user:password@]host1:6379,host2:6379 (rediss-sentinel://, rediss-cluster:// for TLS). Empty starts an embedded in-memory engine for development: nothing is durable.",
		func(c *Config) flag.Value { return (*stringValue)(&c.RedisURL) }},
	{"redis-db", "n", "-1",
		"Redis database number. -1 takes it from --redis-url (0 when the URL has none); any other value overrides the URL.",
		func(c *Config) flag.Value { return (*intValue)(&c.RedisDB) }},
	{"redis-username", "name", "",
		"Redis ACL user (overrides the URL's). See README.md for the least-privilege ACL qbridge needs.",
		func(c *Config) flag.Value { return (*stringValue)(&c.RedisUsername) }},
	{"redis-password-file", "file", "",
		"File holding the Redis password (trailing newline ignored). The password may also come from " + redisPasswordEnv + " or the URL; it is never logged.",
		func(c *Config) flag.Value { return (*stringValue)(&c.RedisPassFile) }},
	{"redis-ca", "file", "",
		"PEM CA certificates to verify a rediss:// server with (default: the system roots).",
		func(c *Config) flag.Value { return (*stringValue)(&c.RedisCA) }},
	{"redis-cert", "file", "",
		"PEM client certificate for rediss:// (with --redis-key), for a Redis with tls-auth-clients.",
		func(c *Config) flag.Value { return (*stringValue)(&c.RedisCert) }},
	{"redis-key", "file", "",
		"PEM private key of --redis-cert.",
		func(c *Config) flag.Value { return (*stringValue)(&c.RedisKey) }},
	{"key-prefix", "prefix", "",
		"Prefix of every Redis key and pub/sub channel qbridge uses.",
		func(c *Config) flag.Value { return (*stringValue)(&c.KeyPrefix) }},
	{"raw-queues", "q1,q2", "",
		"Comma-separated queues in raw mode: their Redis lists hold bare payloads that plain Redis clients (BLPOP) can read; such messages carry no headers.",
		func(c *Config) flag.Value { return (*listValue)(&c.RawQueues) }},
	{"sharded-channels", "c1,p*", "",
		"Comma-separated pub/sub channels, or glob patterns of channels (* ? [abc] as in Subscribe patterns), that are sharded (Redis 7): published with SPUBLISH and subscribed with SSUBSCRIBE, so that on Redis Cluster each lives on the master of its slot instead of being broadcast to every node, and Publish's receiver count is exact. Subscribe patterns do not see them; plain Redis clients use SPUBLISH and SSUBSCRIBE for them. Needs --redis-url.",
		func(c *Config) flag.Value { return (*listValue)(&c.ShardedChannels) }},
	{"max-payload-bytes", "bytes", "1048576",
		"Largest payload of one message or publish.",
		func(c *Config) flag.Value { return (*intValue)(&c.MaxPayloadBytes) }},
	{"max-batch", "n", "1000",
		"Most messages in one EnqueueBatch.",
		func(c *Config) flag.Value { return (*intValue)(&c.MaxBatch) }},
	{"max-in-flight", "n", "1024",
		"Largest max_in_flight a Consume stream may ask for.",
		func(c *Config) flag.Value { return (*intValue)(&c.MaxInFlight) }},
	{"default-lease", "duration", "30s",
		"Lease of a delivery when the Consume request sets none (allowed: 1s to 12h).",
		func(c *Config) flag.Value { return (*durationValue)(&c.DefaultLease) }},
	{"reap-interval", "duration", "1s",
		"How often deliveries whose lease ran out are looked for and requeued.",
		func(c *Config) flag.Value { return (*durationValue)(&c.ReapInterval) }},
	{"subscriber-buffer", "messages", "1024",
		"Messages one Subscribe stream may have waiting to be sent (also at most 8 MiB); a slower subscriber is cut off with RESOURCE_EXHAUSTED.",
		func(c *Config) flag.Value { return (*intValue)(&c.SubscriberBuffer) }},
	{"wait-slice", "duration", "5s",
		"Length of one blocking wait in Redis on an empty queue before it is re-issued (whole seconds, at least 1s).",
		func(c *Config) flag.Value { return (*durationValue)(&c.WaitSlice) }},
	{"drain-timeout", "duration", "10s",
		"On shutdown, how long consumers get to ack what they hold before their streams are ended (unacked messages go back to their queues). 0 ends them at once.",
		func(c *Config) flag.Value { return (*durationValue)(&c.DrainTimeout) }},
	{"shutdown-timeout", "duration", "5s",
		"On shutdown, after draining, how long the gRPC server waits for calls to finish before closing connections.",
		func(c *Config) flag.Value { return (*durationValue)(&c.ShutdownTimeout) }},
	{"keepalive-time", "duration", "10s",
		"The server pings a connection that has been idle this long (at least 1s).",
		func(c *Config) flag.Value { return (*durationValue)(&c.KeepaliveTime) }},
	{"keepalive-timeout", "duration", "5s",
		"A connection that does not answer a ping within this time is closed, and its streams end (their unacked messages go back to their queues).",
		func(c *Config) flag.Value { return (*durationValue)(&c.KeepaliveTimeout) }},
	{"blocking-waits", "n", "24",
		"Empty queues that may wait in Redis with a blocking command at once, one connection each (woken at once by any push, plain LPUSH included). Further empty queues hold no connection: a qbridge enqueue to an empty queue wakes them at once, and anything else (a plain Redis push) within --idle-poll.",
		func(c *Config) flag.Value { return (*intValue)(&c.BlockingWaits) }},
	{"idle-poll", "duration", "250ms",
		"How often the lengths of empty queues beyond --blocking-waits are checked (pipelined LLEN).",
		func(c *Config) flag.Value { return (*durationValue)(&c.IdlePoll) }},
	{"coalescing", "n", "4",
		"Concurrent Enqueue, Publish, Ack and dropping Nack calls are merged into shared Redis pipelines (one script run per queue), at most this many in flight per kind at once; 0 sends each call on its own.",
		func(c *Config) flag.Value { return (*intValue)(&c.Coalescing) }},
	{"enqueue-replicas", "n", "0",
		"Acknowledge an Enqueue or EnqueueBatch only once this many replicas of the Redis master have it (Redis WAIT after each pipeline of enqueues), so that a failover to one of them keeps it. When fewer acknowledge within --enqueue-replicas-timeout the call fails with UNAVAILABLE although the message is enqueued on the master. 0: off (replication is asynchronous).",
		func(c *Config) flag.Value { return (*intValue)(&c.EnqueueReplicas) }},
	{"enqueue-replicas-timeout", "duration", "1s",
		"How long an enqueue waits for --enqueue-replicas replicas (1ms to 1m).",
		func(c *Config) flag.Value { return (*durationValue)(&c.ReplicasTimeout) }},
	{"max-attempts", "n", "25",
		"Default retry policy: deliveries of a message before it is dead-lettered (1 to 1000). A queue's config and an Enqueue may override it.",
		func(c *Config) flag.Value { return (*intValue)(&c.MaxAttempts) }},
	{"retry-backoff-min", "duration", "1s",
		"Default retry policy: backoff before the first retry; retry n waits a random time up to min(max, min*2^(n-1)).",
		func(c *Config) flag.Value { return (*durationValue)(&c.RetryBackoffMin) }},
	{"retry-backoff-max", "duration", "10m",
		"Default retry policy: the longest backoff.",
		func(c *Config) flag.Value { return (*durationValue)(&c.RetryBackoffMax) }},
	{"max-length", "n", "0",
		"Default bound on the ready and delayed messages of a queue (0: unbounded); Enqueue beyond it fails with RESOURCE_EXHAUSTED.",
		func(c *Config) flag.Value { return (*intValue)(&c.MaxLength) }},
	{"expired-action", "action", "drop",
		"Default for messages whose ttl passed: drop or dead-letter.",
		func(c *Config) flag.Value { return (*stringValue)(&c.ExpiredAction) }},
	{"dedup-window", "duration", "10m",
		"Default time a dedup key is remembered (1s to 7 days).",
		func(c *Config) flag.Value { return (*durationValue)(&c.DedupWindow) }},
	{"result-retention", "duration", "24h",
		"How long a message's result (GetResult) is kept after it finished (1s to 30 days).",
		func(c *Config) flag.Value { return (*durationValue)(&c.ResultRetention) }},
	{"public-health", "bool", "true",
		"Let callers without credentials use the gRPC health service (for load balancers and probes) when principals are configured.",
		func(c *Config) flag.Value { return (*boolValue)(&c.PublicHealth) }},
	{"public-reflection", "bool", "false",
		"Let callers without credentials use server reflection (grpcurl list/describe) when principals are configured. Authenticated callers may always use it.",
		func(c *Config) flag.Value { return (*boolValue)(&c.PublicReflection) }},
	{"max-concurrent-streams", "n", "0",
		"Most concurrent calls (streams included) on one client connection; more wait in the client. 0: gRPC's default (no limit).",
		func(c *Config) flag.Value { return (*intValue)(&c.MaxConcStreams) }},
	{"requests-per-second", "rate", "0",
		"Default request rate of each principal (and of each client IP without one): unary calls plus streams opened; over it, RESOURCE_EXHAUSTED with a retry delay. 0: unlimited. A principal may set its own.",
		func(c *Config) flag.Value { return (*floatValue)(&c.RequestsPerSec) }},
	{"request-burst", "n", "0",
		"Requests a principal may make at once above its rate (0: one second's worth).",
		func(c *Config) flag.Value { return (*intValue)(&c.RequestBurst) }},
	{"bytes-per-second", "rate", "0",
		"Default rate of request bytes of each principal (and client IP without one); a burst of one second's worth, never less than one largest message. 0: unlimited.",
		func(c *Config) flag.Value { return (*floatValue)(&c.BytesPerSec) }},
	{"max-streams", "n", "0",
		"Default bound on the streams (Consume, Subscribe, ...) one principal (or client IP without one) has open at once, over all its connections; more fail with RESOURCE_EXHAUSTED. 0: unlimited.",
		func(c *Config) flag.Value { return (*intValue)(&c.MaxStreams) }},
	{"log-level", "level", "info",
		"Log level: debug, info, warn or error.",
		func(c *Config) flag.Value { return (*levelValue)(&c.LogLevel) }},
	{"log-format", "format", "text",
		"Log format: text or json. Logs go to stderr.",
		func(c *Config) flag.Value { return (*formatValue)(&c.LogFormat) }},
}

// parseConfig builds the Config from defaults, then the environment (read
// through getenv; an empty value counts as unset), then args. It returns
// flag.ErrHelp when args ask for help.
func parseConfig(args []string, getenv func(string) string, stderr io.Writer) (*Config, error) {
	c := &Config{}
	fs := flag.NewFlagSet("qbridged", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Run 'qbridged --help' for the flags and their environment variables.")
	}
	// Layers, each overriding the one before: defaults, the config file,
	// the environment, the command line.
	for _, d := range flagDefs {
		if err := d.value(c).Set(d.def); err != nil {
			panic(fmt.Sprintf("qbridged: bad default %q for --%s: %v", d.def, d.name, err))
		}
	}
	path, given := configFileArg(args)
	if !given {
		path = getenv(lookupFlag("config").envVar())
	}
	var file *configFile
	if path != "" {
		var err error
		if file, err = loadConfigFile(path); err != nil {
			return nil, err
		}
		for _, s := range file.settings {
			if err := lookupFlag(s.name).value(c).Set(s.value); err != nil {
				return nil, fmt.Errorf("%s: invalid value %q for %s: %v", path, s.value, s.name, err)
			}
		}
	}
	for _, d := range flagDefs {
		v := d.value(c)
		if env := getenv(d.envVar()); env != "" {
			if err := v.Set(env); err != nil {
				return nil, fmt.Errorf("invalid value %q in %s (--%s): %v", env, d.envVar(), d.name, err)
			}
		}
		fs.Var(v, d.name, d.usage)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, flag.ErrHelp
		}
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: qbridged takes only flags (see --help)", fs.Arg(0))
	}
	switch {
	case c.RedisPassFile != "":
		b, err := os.ReadFile(c.RedisPassFile)
		if err != nil {
			return nil, fmt.Errorf("--redis-password-file: %w", err)
		}
		c.redisPassword = strings.TrimRight(string(b), "\r\n")
		if c.redisPassword == "" {
			return nil, fmt.Errorf("--redis-password-file %s holds no password", c.RedisPassFile)
		}
	case getenv(redisPasswordEnv) != "":
		c.redisPassword = getenv(redisPasswordEnv)
	}
	if file != nil {
		c.Principals = file.principals(c.defaultLimits())
		c.fileKeys = file.keys
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// validate checks values that each parse fine but are out of range.
func (c *Config) validate() error {
	var errs []string
	bad := func(name, format string, args ...any) {
		d := lookupFlag(name)
		where := fmt.Sprintf("--%s (%s)", name, d.envVar())
		if c.fileKeys[name] {
			where = fmt.Sprintf("--%s (%s, or %s in config file %s)", name, d.envVar(), name, c.ConfigFile)
		}
		errs = append(errs, fmt.Sprintf("%s %s", where, fmt.Sprintf(format, args...)))
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		bad("tls-cert", "and --tls-key go together; give both or neither")
	}
	if c.TLSClientCA != "" && c.TLSCert == "" {
		bad("tls-client-ca", "needs --tls-cert and --tls-key (mutual TLS is TLS first)")
	}
	if c.Listen == "" {
		bad("listen", "is empty; give host:port, e.g. 127.0.0.1:7070")
	}
	if c.RedisDB < -1 {
		bad("redis-db", "must be -1 (take it from --redis-url) or a database number >= 0, got %d", c.RedisDB)
	}
	if c.TLSCert != "" && c.Plaintext {
		bad("plaintext", "contradicts --tls-cert; give one or the other")
	}
	if c.RedisURL == "" && !c.PrintRedisACL {
		for _, name := range []string{"redis-username", "redis-password-file", "redis-ca", "redis-cert", "redis-key"} {
			if lookupFlag(name).value(c).String() != "" {
				bad(name, "needs --redis-url: without it qbridged uses its embedded engine")
			}
		}
	}
	if c.RedisURL != "" {
		if c.TLSCert == "" && !c.Plaintext && !c.PrintRedisACL {
			errs = append(errs, "refusing to serve gRPC in plaintext with a real Redis: give --tls-cert and --tls-key, or --plaintext (QBRIDGE_PLAINTEXT=true) to accept unencrypted connections (behind a TLS-terminating proxy or on a trusted network)")
		}
		if _, err := c.redisOptions(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	for _, q := range c.RawQueues {
		if err := server.ValidateName("queue", q); err != nil {
			bad("raw-queues", "has a bad entry: %v", err)
		}
	}
	for _, p := range c.ShardedChannels {
		if err := server.ValidatePattern(p); err != nil {
			bad("sharded-channels", "has a bad entry: %v", err)
		}
	}
	if len(c.ShardedChannels) > 0 && c.RedisURL == "" && !c.PrintRedisACL {
		bad("sharded-channels", "needs --redis-url: the embedded engine has no sharded pub/sub (SPUBLISH, SSUBSCRIBE)")
	}
	if c.MaxPayloadBytes <= 0 || c.MaxPayloadBytes > maxPayloadLimit {
		bad("max-payload-bytes", "must be between 1 and %d (512 MiB, the largest Redis string), got %d", maxPayloadLimit, c.MaxPayloadBytes)
	}
	positive := []struct {
		name string
		v    int
	}{
		{"max-batch", c.MaxBatch},
		{"max-in-flight", c.MaxInFlight},
		{"subscriber-buffer", c.SubscriberBuffer},
		{"blocking-waits", c.BlockingWaits},
		{"metrics-max-queues", c.MetricsMaxQueues},
	}
	for _, p := range positive {
		if p.v <= 0 {
			bad(p.name, "must be a positive number, got %d", p.v)
		}
	}
	for _, n := range []struct {
		name string
		v    float64
	}{{"max-concurrent-streams", float64(c.MaxConcStreams)}, {"requests-per-second", c.RequestsPerSec}, {"request-burst", float64(c.RequestBurst)}, {"bytes-per-second", c.BytesPerSec}, {"max-streams", float64(c.MaxStreams)}} {
		if n.v < 0 {
			bad(n.name, "must be 0 (unlimited) or positive, got %g", n.v)
		}
	}
	if c.OTLPProtocol != "grpc" && c.OTLPProtocol != "http/protobuf" {
		bad("otlp-protocol", "must be grpc or http/protobuf, got %q", c.OTLPProtocol)
	}
	if c.TraceSampleRatio <= 0 || c.TraceSampleRatio > 1 {
		bad("trace-sample-ratio", "must be above 0 and at most 1, got %g", c.TraceSampleRatio)
	}
	if c.Coalescing < 0 {
		bad("coalescing", "must be 0 (off) or a positive number, got %d", c.Coalescing)
	}
	if c.EnqueueReplicas < 0 {
		bad("enqueue-replicas", "must be 0 (off) or a number of replicas, got %d", c.EnqueueReplicas)
	}
	if c.EnqueueReplicas > 0 && c.RedisURL == "" && !c.PrintRedisACL {
		bad("enqueue-replicas", "needs --redis-url: the embedded engine has no replicas")
	}
	if c.ReplicasTimeout < time.Millisecond || c.ReplicasTimeout > time.Minute {
		bad("enqueue-replicas-timeout", "must be between 1ms and 1m, got %v", c.ReplicasTimeout)
	}
	if c.IdlePoll < time.Millisecond {
		bad("idle-poll", "must be at least 1ms, got %v", c.IdlePoll)
	}
	if c.DefaultLease < minLease || c.DefaultLease > maxLease {
		bad("default-lease", "must be between %v and %v, got %v", minLease, maxLease, c.DefaultLease)
	}
	if c.ReapInterval <= 0 {
		bad("reap-interval", "must be a positive duration, got %v", c.ReapInterval)
	}
	// Redis blocking commands take whole seconds here (go-redis truncates
	// shorter timeouts to 1s with a warning); 0 would block forever.
	if c.WaitSlice < time.Second || c.WaitSlice%time.Second != 0 {
		bad("wait-slice", "must be a whole number of seconds, at least 1s, got %v", c.WaitSlice)
	}
	if c.DrainTimeout < 0 {
		bad("drain-timeout", "must be 0 or a positive duration, got %v", c.DrainTimeout)
	}
	if c.ShutdownTimeout <= 0 {
		bad("shutdown-timeout", "must be a positive duration, got %v", c.ShutdownTimeout)
	}
	if c.KeepaliveTime < time.Second {
		bad("keepalive-time", "must be at least 1s, got %v", c.KeepaliveTime)
	}
	if c.KeepaliveTimeout <= 0 {
		bad("keepalive-timeout", "must be a positive duration, got %v", c.KeepaliveTimeout)
	}
	if c.MaxAttempts < 1 || c.MaxAttempts > 1000 {
		bad("max-attempts", "must be between 1 and 1000, got %d", c.MaxAttempts)
	}
	if c.RetryBackoffMin < time.Millisecond || c.RetryBackoffMax < c.RetryBackoffMin || c.RetryBackoffMax > 7*24*time.Hour {
		bad("retry-backoff-min", "and --retry-backoff-max must satisfy 1ms <= min <= max <= 168h, got %v and %v", c.RetryBackoffMin, c.RetryBackoffMax)
	}
	if c.MaxLength < 0 {
		bad("max-length", "must be 0 (unbounded) or positive, got %d", c.MaxLength)
	}
	if c.ExpiredAction != "drop" && c.ExpiredAction != "dead-letter" {
		bad("expired-action", "must be drop or dead-letter, got %q", c.ExpiredAction)
	}
	if c.ResultRetention < time.Second || c.ResultRetention > 30*24*time.Hour {
		bad("result-retention", "must be between 1s and 720h, got %v", c.ResultRetention)
	}
	if c.DedupWindow < time.Second || c.DedupWindow > 7*24*time.Hour {
		bad("dedup-window", "must be between 1s and 168h, got %v", c.DedupWindow)
	}
	if len(c.Principals) == 0 {
		// Nothing else to check: the default limits were checked above.
	} else if _, err := auth.New(c.authConfig()); err != nil {
		errs = append(errs, fmt.Sprintf("config file %s: %v", c.ConfigFile, strings.ReplaceAll(err.Error(), "\n", "; ")))
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

func lookupFlag(name string) flagDef {
	for _, d := range flagDefs {
		if d.name == name {
			return d
		}
	}
	panic("qbridged: no flag " + name)
}

// redisOptions parses --redis-url (one node, Sentinel or Cluster: see
// redisTopology in topology.go) and applies --redis-db, the credentials and
// the TLS files. Errors never contain a password.
func (c *Config) redisOptions() (*redis.UniversalOptions, error) {
	where := fmt.Sprintf("--redis-url (%s) %s", lookupFlag("redis-url").envVar(), redactURL(c.RedisURL))
	opts, err := redisTopology(c.RedisURL)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", where, err)
	}
	if opts.IsClusterMode {
		if c.RedisDB > 0 {
			return nil, fmt.Errorf("--redis-db (QBRIDGE_REDIS_DB) %d: Redis Cluster has only database 0", c.RedisDB)
		}
		if err := broker.CheckClusterPrefix(c.KeyPrefix); err != nil {
			return nil, fmt.Errorf("--key-prefix (QBRIDGE_KEY_PREFIX): %v", err)
		}
	}
	if c.RedisDB >= 0 {
		opts.DB = c.RedisDB
	}
	if c.RedisUsername != "" {
		opts.Username = c.RedisUsername
	}
	if c.redisPassword != "" {
		opts.Password = c.redisPassword
	}
	if c.RedisCA != "" || c.RedisCert != "" || c.RedisKey != "" {
		if opts.TLSConfig == nil {
			return nil, fmt.Errorf("--redis-ca, --redis-cert and --redis-key are for TLS: use a rediss:// URL in %s", where)
		}
		if (c.RedisCert == "") != (c.RedisKey == "") {
			return nil, errors.New("--redis-cert (QBRIDGE_REDIS_CERT) and --redis-key (QBRIDGE_REDIS_KEY) go together; give both or neither")
		}
		if c.RedisCA != "" {
			pem, err := os.ReadFile(c.RedisCA)
			if err != nil {
				return nil, fmt.Errorf("--redis-ca: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("--redis-ca %s holds no PEM certificate", c.RedisCA)
			}
			opts.TLSConfig.RootCAs = pool
		}
		if c.RedisCert != "" {
			pair, err := tls.LoadX509KeyPair(c.RedisCert, c.RedisKey)
			if err != nil {
				return nil, fmt.Errorf("--redis-cert/--redis-key: %w", err)
			}
			opts.TLSConfig.Certificates = []tls.Certificate{pair}
		}
	}
	// Honour each call's deadline on the socket too: without this a hung
	// Redis holds a command for the whole read timeout, whatever the
	// caller's deadline (and the 1 s health ping would not notice it).
	opts.ContextTimeoutEnabled = true
	// No CLIENT SETINFO on connect: the least-privilege ACL does not allow
	// it (Redis before 7.2 cannot even name it in a rule).
	opts.DisableIdentity = true
	return opts, nil
}

// redactURL returns raw with its passwords replaced by "xxxxx", for logs
// and error messages (see redactRedisURL: host lists and
// sentinel_password too).
func redactURL(raw string) string { return redactRedisURL(raw) }

// rawQueueSet returns the membership test for broker.WithRawQueues.
func (c *Config) rawQueueSet() func(string) bool {
	set := make(map[string]struct{}, len(c.RawQueues))
	for _, q := range c.RawQueues {
		set[q] = struct{}{}
	}
	return func(q string) bool {
		_, ok := set[q]
		return ok
	}
}

// maxRecvMsgSize is the largest gRPC message qbridged accepts: room for a
// request carrying the largest payload twice over plus headers, and never
// less than 16 MiB so that batches of small messages fit.
func (c *Config) maxRecvMsgSize() int {
	return max(4<<20, c.MaxPayloadBytes*2+1<<20, 16<<20)
}

// writeHelp prints every flag with its environment variable and default.
func writeHelp(w io.Writer) {
	fmt.Fprint(w, `Usage: qbridged [flags]

qbridged serves the qbridge.v1.QueueService gRPC API (work queues and pub/sub
over Redis), with gRPC health checking and server reflection.

Every flag can also be set with its environment variable; a flag given on the
command line wins over the environment. Flags take one or two dashes.

`)
	for _, d := range flagDefs {
		def := d.def
		if def == "" {
			def = `""`
		}
		fmt.Fprintf(w, "  --%s %s\n      env %s, default %s\n", d.name, d.arg, d.envVar(), def)
		for _, line := range wrap(d.usage, 72) {
			fmt.Fprintf(w, "      %s\n", line)
		}
	}
}

// markdownFlagTable renders flagDefs as the table in README.md.
func markdownFlagTable() string {
	var b strings.Builder
	b.WriteString("| Flag | Environment variable | Default | Description |\n")
	b.WriteString("|------|----------------------|---------|-------------|\n")
	for _, d := range flagDefs {
		def := "`" + d.def + "`"
		if d.def == "" {
			def = "(empty)"
		}
		fmt.Fprintf(&b, "| `--%s` | `%s` | %s | %s |\n", d.name, d.envVar(), def, strings.ReplaceAll(d.usage, "|", `\|`))
	}
	return b.String()
}

// wrap splits s into lines of at most width bytes, at spaces.
func wrap(s string, width int) []string {
	var lines []string
	line := ""
	for _, w := range strings.Fields(s) {
		if line != "" && len(line)+1+len(w) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	if line != "" {
		lines = append(lines, line)
	}
	return lines
}

// flag.Value implementations. Their errors say what is expected, since they
// are shown for both flags and environment variables.

type stringValue string

func (v *stringValue) String() string     { return string(*v) }
func (v *stringValue) Set(s string) error { *v = stringValue(s); return nil }

type boolValue bool

func (v *boolValue) String() string   { return strconv.FormatBool(bool(*v)) }
func (v *boolValue) IsBoolFlag() bool { return true }
func (v *boolValue) Set(s string) error {
	b, err := strconv.ParseBool(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("want true or false")
	}
	*v = boolValue(b)
	return nil
}

type floatValue float64

func (v *floatValue) String() string { return strconv.FormatFloat(float64(*v), 'g', -1, 64) }
func (v *floatValue) Set(s string) error {
	f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil {
		return fmt.Errorf("want a number such as 100 or 0.5")
	}
	*v = floatValue(f)
	return nil
}

type intValue int

func (v *intValue) String() string { return strconv.Itoa(int(*v)) }
func (v *intValue) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("want an integer such as 1024")
	}
	*v = intValue(n)
	return nil
}

type durationValue time.Duration

func (v *durationValue) String() string { return time.Duration(*v).String() }
func (v *durationValue) Set(s string) error {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("want a duration such as 500ms, 30s or 1m30s")
	}
	*v = durationValue(d)
	return nil
}

// listValue is a comma-separated list; blanks around entries and empty
// entries are dropped.
type listValue []string

func (v *listValue) String() string { return strings.Join(*v, ",") }
func (v *listValue) Set(s string) error {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	*v = out
	return nil
}

type levelValue slog.Level

func (v *levelValue) String() string { return slog.Level(*v).String() }
func (v *levelValue) Set(s string) error {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.TrimSpace(s))); err != nil {
		return fmt.Errorf("want debug, info, warn or error")
	}
	*v = levelValue(l)
	return nil
}

type formatValue string

func (v *formatValue) String() string { return string(*v) }
func (v *formatValue) Set(s string) error {
	switch f := strings.ToLower(strings.TrimSpace(s)); f {
	case "text", "json":
		*v = formatValue(f)
		return nil
	}
	return fmt.Errorf("want text or json")
}
