package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

var updateREADME = flag.Bool("update", false, "rewrite the flag table in README.md from flagDefs")

func envFunc(env map[string]string) func(string) string {
	return func(k string) string { return env[k] }
}

func TestConfigDefaults(t *testing.T) {
	c, err := parseConfig(nil, envFunc(nil), io.Discard)
	if err != nil {
		t.Fatalf("parseConfig with no flags and no environment: %v", err)
	}
	want := &Config{
		Listen:           "127.0.0.1:7070",
		RedisURL:         "",
		RedisDB:          -1,
		KeyPrefix:        "",
		RawQueues:        nil,
		MaxPayloadBytes:  1 << 20,
		MaxBatch:         1000,
		MaxInFlight:      1024,
		DefaultLease:     30 * time.Second,
		ReapInterval:     time.Second,
		SubscriberBuffer: 1024,
		WaitSlice:        5 * time.Second,
		DrainTimeout:     10 * time.Second,
		ShutdownTimeout:  5 * time.Second,
		KeepaliveTime:    10 * time.Second,
		KeepaliveTimeout: 5 * time.Second,
		BlockingWaits:    24,
		IdlePoll:         250 * time.Millisecond,
		Coalescing:       4,
		ReplicasTimeout:  time.Second,
		MaxAttempts:      25,
		RetryBackoffMin:  time.Second,
		RetryBackoffMax:  10 * time.Minute,
		ExpiredAction:    "drop",
		DedupWindow:      10 * time.Minute,
		ResultRetention:  24 * time.Hour,
		LogLevel:         slog.LevelInfo,
		LogFormat:        "text",
		PublicHealth:     true,
		HTTPListen:       "127.0.0.1:7071",
		Dashboard:        true,
		MetricsMaxQueues: 100,
		OTLPProtocol:     "grpc",
		TraceSampleRatio: 1,
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", c, want)
	}
	// Keepalive must detect a dead client on an idle stream well under a
	// minute.
	if d := c.KeepaliveTime + c.KeepaliveTimeout; d > 30*time.Second {
		t.Errorf("default keepalive detects dead peers after %v; want well under a minute", d)
	}
}

func TestConfigEveryFlagHasEnvVar(t *testing.T) {
	seenFlag := map[string]bool{}
	seenEnv := map[string]bool{}
	for _, d := range flagDefs {
		if seenFlag[d.name] || seenEnv[d.envVar()] {
			t.Errorf("duplicate flag %q / env %q", d.name, d.envVar())
		}
		seenFlag[d.name], seenEnv[d.envVar()] = true, true
		want := "QBRIDGE_" + strings.ToUpper(strings.ReplaceAll(d.name, "-", "_"))
		if d.envVar() != want {
			t.Errorf("--%s: env var %q, want %q", d.name, d.envVar(), want)
		}
		if d.usage == "" {
			t.Errorf("--%s has no description", d.name)
		}
	}
	// Every exported Config field is set by exactly one flag, but for the
	// principals, which only the --config file has (and the Redis
	// password, unexported, never a flag).
	notFlags := map[string]bool{"Principals": true}
	n := 0
	for _, f := range reflect.VisibleFields(reflect.TypeOf(Config{})) {
		if f.IsExported() && !notFlags[f.Name] {
			n++
		}
	}
	if len(flagDefs) != n {
		t.Errorf("%d flags for %d exported Config fields", len(flagDefs), n)
	}
}

func TestConfigPrecedence(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		get  func(*Config) any
		want any
	}{
		{"env string", nil, map[string]string{"QBRIDGE_LISTEN": "127.0.0.1:9000"},
			func(c *Config) any { return c.Listen }, "127.0.0.1:9000"},
		{"flag beats env string", []string{"--listen", "127.0.0.1:9001"}, map[string]string{"QBRIDGE_LISTEN": "127.0.0.1:9000"},
			func(c *Config) any { return c.Listen }, "127.0.0.1:9001"},
		{"single dash flag", []string{"-listen=127.0.0.1:9002"}, nil,
			func(c *Config) any { return c.Listen }, "127.0.0.1:9002"},
		{"env int", nil, map[string]string{"QBRIDGE_MAX_BATCH": "50"},
			func(c *Config) any { return c.MaxBatch }, 50},
		{"flag beats env int", []string{"--max-batch=7"}, map[string]string{"QBRIDGE_MAX_BATCH": "50"},
			func(c *Config) any { return c.MaxBatch }, 7},
		{"env duration", nil, map[string]string{"QBRIDGE_DRAIN_TIMEOUT": "1m"},
			func(c *Config) any { return c.DrainTimeout }, time.Minute},
		{"flag beats env duration", []string{"--drain-timeout", "250ms"}, map[string]string{"QBRIDGE_DRAIN_TIMEOUT": "1m"},
			func(c *Config) any { return c.DrainTimeout }, 250 * time.Millisecond},
		{"env list", nil, map[string]string{"QBRIDGE_RAW_QUEUES": " legacy:jobs , ,mail "},
			func(c *Config) any { return c.RawQueues }, []string{"legacy:jobs", "mail"}},
		{"flag beats env list", []string{"--raw-queues=a"}, map[string]string{"QBRIDGE_RAW_QUEUES": "b,c"},
			func(c *Config) any { return c.RawQueues }, []string{"a"}},
		{"env sharded channels", []string{"--plaintext", "--redis-url=redis://127.0.0.1:6379"}, map[string]string{"QBRIDGE_SHARDED_CHANNELS": "metrics.*, prices ,h?st[12]"},
			func(c *Config) any { return c.ShardedChannels }, []string{"metrics.*", "prices", "h?st[12]"}},
		{"flag beats env sharded channels", []string{"--plaintext", "--redis-url=redis://127.0.0.1:6379", "--sharded-channels=a.*"}, map[string]string{"QBRIDGE_SHARDED_CHANNELS": "b"},
			func(c *Config) any { return c.ShardedChannels }, []string{"a.*"}},
		{"env level", nil, map[string]string{"QBRIDGE_LOG_LEVEL": "debug"},
			func(c *Config) any { return c.LogLevel }, slog.LevelDebug},
		{"flag beats env level", []string{"--log-level=WARN"}, map[string]string{"QBRIDGE_LOG_LEVEL": "debug"},
			func(c *Config) any { return c.LogLevel }, slog.LevelWarn},
		{"env format", nil, map[string]string{"QBRIDGE_LOG_FORMAT": "json"},
			func(c *Config) any { return c.LogFormat }, "json"},
		{"flag beats env format", []string{"--log-format=text"}, map[string]string{"QBRIDGE_LOG_FORMAT": "json"},
			func(c *Config) any { return c.LogFormat }, "text"},
		{"flag can set the empty string over env", []string{"--key-prefix="}, map[string]string{"QBRIDGE_KEY_PREFIX": "app:"},
			func(c *Config) any { return c.KeyPrefix }, ""},
		{"env prefix", nil, map[string]string{"QBRIDGE_KEY_PREFIX": "app:"},
			func(c *Config) any { return c.KeyPrefix }, "app:"},
		{"unrelated env ignored", nil, map[string]string{"LISTEN": "x", "QBRIDGE_LISTENX": "y"},
			func(c *Config) any { return c.Listen }, "127.0.0.1:7070"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseConfig(tt.args, envFunc(tt.env), io.Discard)
			if err != nil {
				t.Fatalf("parseConfig(%q, %v): %v", tt.args, tt.env, err)
			}
			if got := tt.get(c); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %#v, want %#v", got, tt.want)
			}
		})
	}
}

func TestConfigRejectsBadValues(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want []string // all must appear in the error
	}{
		{"non-integer flag", []string{"--max-batch=lots"}, nil,
			[]string{"max-batch", "want an integer"}},
		{"non-integer env names the variable", nil, map[string]string{"QBRIDGE_MAX_IN_FLIGHT": "abc"},
			[]string{"QBRIDGE_MAX_IN_FLIGHT", "--max-in-flight", "want an integer"}},
		{"bad duration env", nil, map[string]string{"QBRIDGE_DEFAULT_LEASE": "30"},
			[]string{"QBRIDGE_DEFAULT_LEASE", "want a duration"}},
		{"zero batch", []string{"--max-batch=0"}, nil,
			[]string{"--max-batch (QBRIDGE_MAX_BATCH) must be a positive number, got 0"}},
		{"negative in-flight", []string{"--max-in-flight=-3"}, nil,
			[]string{"--max-in-flight", "positive", "-3"}},
		{"zero subscriber buffer", []string{"--subscriber-buffer=0"}, nil,
			[]string{"--subscriber-buffer", "positive"}},
		{"zero blocking waits", []string{"--blocking-waits=0"}, nil,
			[]string{"--blocking-waits", "positive"}},
		{"negative coalescing", []string{"--coalescing=-1"}, nil,
			[]string{"--coalescing (QBRIDGE_COALESCING) must be 0 (off) or a positive number, got -1"}},
		{"idle poll too short", []string{"--idle-poll=0s"}, nil,
			[]string{"--idle-poll", "at least 1ms"}},
		{"payload zero", []string{"--max-payload-bytes=0"}, nil,
			[]string{"--max-payload-bytes", "between 1 and"}},
		{"payload above redis limit", []string{"--max-payload-bytes=1073741824"}, nil,
			[]string{"--max-payload-bytes", "512 MiB"}},
		{"lease too short", []string{"--default-lease=500ms"}, nil,
			[]string{"--default-lease (QBRIDGE_DEFAULT_LEASE) must be between 1s and 12h0m0s, got 500ms"}},
		{"lease too long", []string{"--default-lease=13h"}, nil,
			[]string{"--default-lease", "between 1s and 12h"}},
		{"reap zero", []string{"--reap-interval=0s"}, nil,
			[]string{"--reap-interval", "positive duration"}},
		{"reap negative", []string{"--reap-interval=-1s"}, nil,
			[]string{"--reap-interval", "positive duration"}},
		{"wait slice sub-second", []string{"--wait-slice=500ms"}, nil,
			[]string{"--wait-slice", "whole number of seconds"}},
		{"wait slice fractional", []string{"--wait-slice=1500ms"}, nil,
			[]string{"--wait-slice", "whole number of seconds"}},
		{"drain negative", []string{"--drain-timeout=-1s"}, nil,
			[]string{"--drain-timeout", "0 or a positive duration"}},
		{"shutdown zero", []string{"--shutdown-timeout=0s"}, nil,
			[]string{"--shutdown-timeout", "positive duration"}},
		{"keepalive below grpc minimum", []string{"--keepalive-time=100ms"}, nil,
			[]string{"--keepalive-time", "at least 1s"}},
		{"keepalive timeout zero", []string{"--keepalive-timeout=0s"}, nil,
			[]string{"--keepalive-timeout", "positive duration"}},
		{"empty listen", []string{"--listen="}, nil,
			[]string{"--listen", "empty"}},
		{"redis db below -1", []string{"--redis-db=-2"}, nil,
			[]string{"--redis-db", "-1", ">= 0"}},
		{"log level", []string{"--log-level=loud"}, nil,
			[]string{"log-level", "debug, info, warn or error"}},
		{"log format", nil, map[string]string{"QBRIDGE_LOG_FORMAT": "xml"},
			[]string{"QBRIDGE_LOG_FORMAT", "text or json"}},
		{"redis url scheme", []string{"--plaintext", "--redis-url=http://127.0.0.1:6379"}, nil,
			[]string{"--redis-url (QBRIDGE_REDIS_URL)", "scheme", "redis://"}},
		{"redis url db", []string{"--plaintext", "--redis-url=redis://127.0.0.1:6379/nope"}, nil,
			[]string{"--redis-url", "database"}},
		{"raw queue name", []string{"--raw-queues=ok,no{braces}"}, nil,
			[]string{"--raw-queues (QBRIDGE_RAW_QUEUES)", "no{braces}"}},
		{"sharded channel pattern", []string{"--plaintext", "--redis-url=redis://127.0.0.1:6379", "--sharded-channels=ok.*,no{braces}"}, nil,
			[]string{"--sharded-channels (QBRIDGE_SHARDED_CHANNELS) has a bad entry", "no{braces}"}},
		{"sharded channels on the embedded engine", []string{"--sharded-channels=prices"}, nil,
			[]string{"--sharded-channels", "needs --redis-url", "embedded engine"}},
		{"unknown flag", []string{"--nope"}, nil,
			[]string{"flag provided but not defined: -nope"}},
		{"positional argument", []string{"serve"}, nil,
			[]string{`unexpected argument "serve"`}},
		{"several problems reported together", []string{"--max-batch=0", "--reap-interval=0s"}, nil,
			[]string{"--max-batch", "--reap-interval"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			c, err := parseConfig(tt.args, envFunc(tt.env), &stderr)
			if err == nil {
				t.Fatalf("parseConfig(%q, %v) = %+v, want an error", tt.args, tt.env, c)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			// And run reports it instead of starting.
			if rerr := run(context.Background(), tt.args, envFunc(tt.env), io.Discard, io.Discard); rerr == nil || rerr.Error() != err.Error() {
				t.Errorf("run: %v, want %v", rerr, err)
			}
		})
	}
}

func TestConfigRedisURL(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		network string
		addr    string
		db      int
		tls     bool
		user    string
		pass    string
	}{
		{name: "db from URL path", args: []string{"--redis-url=redis://10.0.0.1:6379/5"},
			network: "tcp", addr: "10.0.0.1:6379", db: 5},
		{name: "no db in URL", args: []string{"--redis-url=redis://10.0.0.1:6380"},
			network: "tcp", addr: "10.0.0.1:6380", db: 0},
		{name: "flag overrides URL db", args: []string{"--redis-url=redis://10.0.0.1:6379/5", "--redis-db=3"},
			network: "tcp", addr: "10.0.0.1:6379", db: 3},
		{name: "redis-db 0 overrides too", args: []string{"--redis-url=redis://10.0.0.1:6379/5", "--redis-db=0"},
			network: "tcp", addr: "10.0.0.1:6379", db: 0},
		{name: "env db overrides URL db", env: map[string]string{"QBRIDGE_REDIS_URL": "redis://10.0.0.1:6379/5", "QBRIDGE_REDIS_DB": "2"},
			network: "tcp", addr: "10.0.0.1:6379", db: 2},
		{name: "flag -1 restores URL db over env", args: []string{"--redis-db=-1"}, env: map[string]string{"QBRIDGE_REDIS_URL": "redis://10.0.0.1:6379/5", "QBRIDGE_REDIS_DB": "2"},
			network: "tcp", addr: "10.0.0.1:6379", db: 5},
		{name: "TLS with credentials", args: []string{"--redis-url=rediss://app:s3cret@redis.example:6380/1"},
			network: "tcp", addr: "redis.example:6380", db: 1, tls: true, user: "app", pass: "s3cret"},
		{name: "unix socket", args: []string{"--redis-url=unix:///run/redis.sock?db=4"},
			network: "unix", addr: "/run/redis.sock", db: 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseConfig(append([]string{"--plaintext"}, tt.args...), envFunc(tt.env), io.Discard)
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			o, err := c.redisOptions()
			if err != nil {
				t.Fatalf("redisOptions: %v", err)
			}
			rc := redis.NewUniversalClient(o)
			defer rc.Close()
			single, ok := rc.(*redis.Client)
			if !ok {
				t.Fatalf("NewUniversalClient made a %T, want a single-node *redis.Client", rc)
			}
			if got := single.Options(); got.Network != tt.network || got.Addr != tt.addr || got.DB != tt.db {
				t.Errorf("got %s %s db %d, want %s %s db %d", got.Network, got.Addr, got.DB, tt.network, tt.addr, tt.db)
			}
			if (o.TLSConfig != nil) != tt.tls {
				t.Errorf("TLS config %v, want TLS %v", o.TLSConfig, tt.tls)
			}
			if o.Username != tt.user || o.Password != tt.pass {
				t.Errorf("credentials %q/%q, want %q/%q", o.Username, o.Password, tt.user, tt.pass)
			}
		})
	}
}

func TestConfigRedisURLErrorsHidePassword(t *testing.T) {
	for _, u := range []string{
		"http://user:hunter2@127.0.0.1:6379/0",
		"redis://user:hunter2@127.0.0.1:6379/x",
		"redis://user:hunter2@127.0.0.1:6379/0\x7f",
	} {
		_, err := parseConfig([]string{"--plaintext", "--redis-url", u}, envFunc(nil), io.Discard)
		if err == nil {
			t.Errorf("%q: accepted", u)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%q: error leaks the password: %v", u, err)
		}
	}
}

// TestConfigPlaintext: with a real Redis, qbridged serves gRPC over TLS or,
// when told so with --plaintext, without; the embedded development mode is
// plaintext without asking.
func TestConfigPlaintext(t *testing.T) {
	const url = "--redis-url=redis://127.0.0.1:6379/0"
	tls := []string{"--tls-cert=/nonexistent/server.pem", "--tls-key=/nonexistent/server.key"} // read by run, not parsed here
	tests := []struct {
		name      string
		args      []string
		env       map[string]string
		want      []string // all must appear in the error; nil: it parses
		plaintext bool     // Config.Plaintext when it parses
	}{
		{name: "real Redis without TLS or --plaintext", args: []string{url},
			want: []string{"--plaintext", "--tls-cert", "QBRIDGE_PLAINTEXT=true"}},
		{name: "URL from the environment likewise", env: map[string]string{"QBRIDGE_REDIS_URL": "redis://127.0.0.1:6379/0"},
			want: []string{"--plaintext", "--tls-cert"}},
		{name: "--plaintext", args: []string{url, "--plaintext"}, plaintext: true},
		{name: "--plaintext=true", args: []string{"--plaintext=true", url}, plaintext: true},
		{name: "single dash -plaintext", args: []string{url, "-plaintext"}, plaintext: true},
		{name: "QBRIDGE_PLAINTEXT=true", args: []string{url}, env: map[string]string{"QBRIDGE_PLAINTEXT": "true"}, plaintext: true},
		{name: "QBRIDGE_PLAINTEXT=1", env: map[string]string{"QBRIDGE_REDIS_URL": "redis://127.0.0.1:6379/0", "QBRIDGE_PLAINTEXT": "1"}, plaintext: true},
		{name: "QBRIDGE_PLAINTEXT=false", args: []string{url}, env: map[string]string{"QBRIDGE_PLAINTEXT": "false"},
			want: []string{"--plaintext", "--tls-cert"}},
		{name: "flag --plaintext=false beats env", args: []string{url, "--plaintext=false"}, env: map[string]string{"QBRIDGE_PLAINTEXT": "true"},
			want: []string{"--plaintext", "--tls-cert"}},
		{name: "bad QBRIDGE_PLAINTEXT", args: []string{url}, env: map[string]string{"QBRIDGE_PLAINTEXT": "yes please"},
			want: []string{"QBRIDGE_PLAINTEXT", "--plaintext", "want true or false"}},
		{name: "TLS instead", args: append([]string{url}, tls...)},
		{name: "--plaintext with --tls-cert", args: append([]string{url, "--plaintext"}, tls...),
			want: []string{"--plaintext (QBRIDGE_PLAINTEXT)", "--tls-cert"}},
		{name: "QBRIDGE_PLAINTEXT with --tls-cert", args: append([]string{url}, tls...), env: map[string]string{"QBRIDGE_PLAINTEXT": "true"},
			want: []string{"--plaintext", "--tls-cert"}},
		{name: "embedded needs nothing"},
		{name: "embedded with other flags", args: []string{"--listen=127.0.0.1:0", "--key-prefix=dev:"}},
		{name: "embedded takes --plaintext too", args: []string{"--plaintext"}, plaintext: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseConfig(tt.args, envFunc(tt.env), io.Discard)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("parseConfig(%q, %v): %v", tt.args, tt.env, err)
				}
				if c.Plaintext != tt.plaintext {
					t.Errorf("Plaintext %v, want %v", c.Plaintext, tt.plaintext)
				}
				return
			}
			if err == nil {
				t.Fatalf("parseConfig(%q, %v) = %+v, want an error", tt.args, tt.env, c)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			// And run reports it instead of starting.
			if rerr := run(context.Background(), tt.args, envFunc(tt.env), io.Discard, io.Discard); rerr == nil || rerr.Error() != err.Error() {
				t.Errorf("run: %v, want %v", rerr, err)
			}
		})
	}
}

// writeConfigTestFile writes b to a new file in a temporary directory and
// returns its path.
func writeConfigTestFile(t *testing.T, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestConfigRedisCredentials: --redis-username overrides the URL's user;
// the password comes from --redis-password-file, else QBRIDGE_REDIS_PASSWORD,
// else the URL.
func TestConfigRedisCredentials(t *testing.T) {
	const withCreds = "redis://urluser:urlpass@127.0.0.1:6379/0"
	const noCreds = "redis://127.0.0.1:6379/0"
	tests := []struct {
		name     string
		url      string
		username string // --redis-username, when not empty
		file     string // contents of --redis-password-file, when not empty
		fileEnv  bool   // name the file with QBRIDGE_REDIS_PASSWORD_FILE instead
		env      string // QBRIDGE_REDIS_PASSWORD, when not empty
		user     string
		pass     string
	}{
		{name: "none", url: noCreds},
		{name: "URL", url: withCreds, user: "urluser", pass: "urlpass"},
		{name: "env beats URL", url: withCreds, env: "envpass", user: "urluser", pass: "envpass"},
		{name: "env without URL password", url: noCreds, env: "envpass", pass: "envpass"},
		{name: "file beats env and URL", url: withCreds, file: "filepass", env: "envpass", user: "urluser", pass: "filepass"},
		{name: "file without URL password", url: noCreds, file: "filepass", pass: "filepass"},
		{name: "file named in the environment", url: withCreds, file: "filepass", fileEnv: true, env: "envpass", user: "urluser", pass: "filepass"},
		{name: "trailing newline of the file trimmed", url: noCreds, file: "filepass\n", pass: "filepass"},
		{name: "trailing CRLF of the file trimmed", url: noCreds, file: "filepass\r\n", pass: "filepass"},
		{name: "inner blanks of the file kept", url: noCreds, file: " file pass \n", pass: " file pass "},
		{name: "username flag beats URL", url: withCreds, username: "flaguser", user: "flaguser", pass: "urlpass"},
		{name: "username flag with env password", url: noCreds, username: "flaguser", env: "envpass", user: "flaguser", pass: "envpass"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := []string{"--plaintext", "--redis-url", tt.url}
			env := map[string]string{}
			if tt.username != "" {
				args = append(args, "--redis-username", tt.username)
			}
			if tt.file != "" {
				p := writeConfigTestFile(t, "redis-password", []byte(tt.file))
				if tt.fileEnv {
					env["QBRIDGE_REDIS_PASSWORD_FILE"] = p
				} else {
					args = append(args, "--redis-password-file", p)
				}
			}
			if tt.env != "" {
				env[redisPasswordEnv] = tt.env
			}
			c, err := parseConfig(args, envFunc(env), io.Discard)
			if err != nil {
				t.Fatalf("parseConfig(%q, %v): %v", args, env, err)
			}
			o, err := c.redisOptions()
			if err != nil {
				t.Fatalf("redisOptions: %v", err)
			}
			if o.Username != tt.user || o.Password != tt.pass {
				t.Errorf("credentials %q/%q, want %q/%q", o.Username, o.Password, tt.user, tt.pass)
			}
		})
	}
}

func TestConfigRedisPasswordFileMissing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-such-file")
	args := []string{"--plaintext", "--redis-url=redis://127.0.0.1:6379/0", "--redis-password-file", missing}
	_, err := parseConfig(args, envFunc(map[string]string{redisPasswordEnv: "envpass"}), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--redis-password-file") || !strings.Contains(err.Error(), missing) {
		t.Fatalf("parseConfig with a missing password file: %v, want an error naming --redis-password-file and %s", err, missing)
	}
	// The environment's password is not a fallback for a file that was
	// asked for.
	if strings.Contains(err.Error(), "envpass") {
		t.Errorf("error leaks the password: %v", err)
	}
}

// selfSignedPEM returns a self-signed certificate and its key, PEM-encoded.
func selfSignedPEM(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "qbridged config test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// TestConfigRedisTLSFiles: --redis-ca, --redis-cert and --redis-key need a
// rediss:// URL, go together as they should, and must hold PEM.
func TestConfigRedisTLSFiles(t *testing.T) {
	certPEM, keyPEM := selfSignedPEM(t)
	ca := writeConfigTestFile(t, "ca.pem", certPEM)
	cert := writeConfigTestFile(t, "client.pem", certPEM)
	key := writeConfigTestFile(t, "client.key", keyPEM)
	notPEM := writeConfigTestFile(t, "not.pem", []byte("this is not a certificate\n"))
	missing := filepath.Join(t.TempDir(), "missing.pem")
	const tlsURL = "--redis-url=rediss://127.0.0.1:6380/0"

	t.Run("accepted", func(t *testing.T) {
		for _, tc := range []struct {
			name        string
			args        []string
			ca, clients bool
		}{
			{"CA", []string{tlsURL, "--redis-ca", ca}, true, false},
			{"client certificate", []string{tlsURL, "--redis-cert", cert, "--redis-key", key}, false, true},
			{"both", []string{tlsURL, "--redis-ca", ca, "--redis-cert", cert, "--redis-key", key}, true, true},
		} {
			c, err := parseConfig(append([]string{"--plaintext"}, tc.args...), envFunc(nil), io.Discard)
			if err != nil {
				t.Fatalf("%s: parseConfig: %v", tc.name, err)
			}
			o, err := c.redisOptions()
			if err != nil {
				t.Fatalf("%s: redisOptions: %v", tc.name, err)
			}
			if o.TLSConfig == nil {
				t.Fatalf("%s: no TLS config", tc.name)
			}
			if (o.TLSConfig.RootCAs != nil) != tc.ca || (len(o.TLSConfig.Certificates) == 1) != tc.clients {
				t.Errorf("%s: RootCAs %v, %d client certificates; want CA %v, client certificate %v",
					tc.name, o.TLSConfig.RootCAs != nil, len(o.TLSConfig.Certificates), tc.ca, tc.clients)
			}
		}
	})

	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"CA with redis://", []string{"--redis-url=redis://127.0.0.1:6379/0", "--redis-ca", ca},
			[]string{"--redis-ca", "rediss://"}},
		{"client certificate with redis://", []string{"--redis-url=redis://127.0.0.1:6379/0", "--redis-cert", cert, "--redis-key", key},
			[]string{"--redis-cert", "rediss://"}},
		{"CA with unix://", []string{"--redis-url=unix:///run/redis.sock", "--redis-ca", ca},
			[]string{"--redis-ca", "rediss://"}},
		{"cert without key", []string{tlsURL, "--redis-cert", cert},
			[]string{"--redis-cert", "--redis-key", "together"}},
		{"key without cert", []string{tlsURL, "--redis-key", key},
			[]string{"--redis-cert", "--redis-key", "together"}},
		{"CA not PEM", []string{tlsURL, "--redis-ca", notPEM},
			[]string{"--redis-ca", notPEM, "no PEM certificate"}},
		{"CA missing", []string{tlsURL, "--redis-ca", missing},
			[]string{"--redis-ca", missing}},
		{"cert missing", []string{tlsURL, "--redis-cert", missing, "--redis-key", key},
			[]string{"--redis-cert", missing}},
		{"key not PEM", []string{tlsURL, "--redis-cert", cert, "--redis-key", notPEM},
			[]string{"--redis-cert/--redis-key"}},
		{"cert and key swapped", []string{tlsURL, "--redis-cert", key, "--redis-key", cert},
			[]string{"--redis-cert/--redis-key"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--plaintext"}, tt.args...)
			c, err := parseConfig(args, envFunc(nil), io.Discard)
			if err == nil {
				t.Fatalf("parseConfig(%q) = %+v, want an error", args, c)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestConfigErrorsHideRedisPassword: whatever goes wrong, and wherever the
// password comes from, no error message contains it.
func TestConfigErrorsHideRedisPassword(t *testing.T) {
	const secret = "Zq9xK-not-for-logs-7731"
	passFile := writeConfigTestFile(t, "redis-password", []byte(secret+"\n"))
	// A "CA" that is the password file: its contents must not be echoed.
	certPEM, _ := selfSignedPEM(t)
	cert := writeConfigTestFile(t, "client.pem", certPEM)
	missing := filepath.Join(t.TempDir(), "missing.pem")
	envPass := map[string]string{redisPasswordEnv: secret}
	tests := []struct {
		name string
		args []string
		env  map[string]string
	}{
		{"bad db in URL", []string{"--plaintext", "--redis-url=redis://u:" + secret + "@127.0.0.1:6379/nope"}, nil},
		{"bad scheme", []string{"--plaintext", "--redis-url=http://u:" + secret + "@127.0.0.1:6379/0"}, nil},
		{"unparsable URL", []string{"--plaintext", "--redis-url=redis://u:" + secret + "@127.0.0.1:6379/0\x7f"}, nil},
		{"bad option in URL", []string{"--plaintext", "--redis-url=redis://u:" + secret + "@127.0.0.1:6379/0?nope=1"}, nil},
		{"URL in the environment", nil, map[string]string{"QBRIDGE_REDIS_URL": "redis://u:" + secret + "@127.0.0.1:6379/x", "QBRIDGE_PLAINTEXT": "true"}},
		{"no --plaintext", []string{"--redis-url=redis://u:" + secret + "@127.0.0.1:6379/0"}, nil},
		{"--plaintext and --tls-cert", []string{"--plaintext", "--tls-cert=a.pem", "--tls-key=a.key", "--redis-url=redis://u:" + secret + "@127.0.0.1:6379/0"}, nil},
		{"CA with redis:// and the password in the URL", []string{"--plaintext", "--redis-url=redis://u:" + secret + "@127.0.0.1:6379/0", "--redis-ca", cert}, nil},
		{"bad --redis-cert path, password in the URL", []string{"--plaintext", "--redis-url=rediss://u:" + secret + "@127.0.0.1:6380/0", "--redis-cert", missing, "--redis-key", missing}, nil},
		{"bad --redis-cert path, password in the environment", []string{"--plaintext", "--redis-url=rediss://127.0.0.1:6380/0", "--redis-cert", missing, "--redis-key", missing}, envPass},
		{"bad --redis-cert path, password in a file", []string{"--plaintext", "--redis-url=rediss://127.0.0.1:6380/0", "--redis-password-file", passFile, "--redis-cert", missing, "--redis-key", missing}, nil},
		{"password file as CA", []string{"--plaintext", "--redis-url=rediss://127.0.0.1:6380/0", "--redis-ca", passFile}, envPass},
		{"password file as client key", []string{"--plaintext", "--redis-url=rediss://127.0.0.1:6380/0", "--redis-cert", cert, "--redis-key", passFile}, envPass},
		{"cert without key", []string{"--plaintext", "--redis-url=rediss://u:" + secret + "@127.0.0.1:6380/0", "--redis-cert", cert}, nil},
		{"bad URL, password in a file", []string{"--plaintext", "--redis-url=redis://127.0.0.1:6379/nope", "--redis-password-file", passFile}, nil},
		{"bad URL, password in the environment", []string{"--plaintext", "--redis-url=redis://127.0.0.1:6379/nope"}, envPass},
		{"other bad values", []string{"--redis-url=redis://u:" + secret + "@127.0.0.1:6379/0", "--max-batch=0", "--redis-db=-5"}, envPass},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseConfig(tt.args, envFunc(tt.env), io.Discard)
			if err == nil {
				t.Fatalf("parseConfig(%q, %v): accepted, want an error", tt.args, tt.env)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("parse error leaks the password: %v", err)
			}
			var stderr bytes.Buffer
			if rerr := run(context.Background(), tt.args, envFunc(tt.env), io.Discard, &stderr); rerr == nil || strings.Contains(rerr.Error(), secret) || strings.Contains(stderr.String(), secret) {
				t.Errorf("run: %v (stderr %q), want an error without the password", rerr, stderr.String())
			}
		})
	}
}

// TestRedisPasswordNotLogged: qbridged on an unreachable Redis, at debug
// level, logs neither the URL's password nor the one from the environment.
func TestRedisPasswordNotLogged(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String() // nothing listens there once closed
	ln.Close()
	const urlSecret, envSecret = "url-Zq9xK-not-for-logs", "env-Zq9xK-not-for-logs"
	d := startDaemon(t, []string{"--listen", "127.0.0.1:0", "--plaintext", "--log-level", "debug",
		"--redis-url", "redis://app:" + urlSecret + "@" + dead + "/0"}, map[string]string{redisPasswordEnv: envSecret})
	if err := d.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	logs := d.logs.String()
	if !strings.Contains(logs, "using Redis") {
		t.Fatalf("no 'using Redis' line; logs:\n%s", logs)
	}
	for _, s := range []string{urlSecret, envSecret} {
		if strings.Contains(logs, s) {
			t.Errorf("the logs contain a Redis password:\n%s", logs)
		}
	}
}

func TestHelp(t *testing.T) {
	for _, arg := range []string{"--help", "-h"} {
		var stdout, stderr bytes.Buffer
		if err := run(context.Background(), []string{arg}, envFunc(nil), &stdout, &stderr); err != nil {
			t.Fatalf("run %s: %v", arg, err)
		}
		out := stdout.String()
		for _, d := range flagDefs {
			def := d.def
			if def == "" {
				def = `""`
			}
			// Flag, env var and default together, then the description.
			head := "--" + d.name + " " + d.arg + "\n      env " + d.envVar() + ", default " + def + "\n"
			if !strings.Contains(out, head) {
				t.Errorf("%s output lacks %q", arg, head)
			}
			if !strings.Contains(strings.Join(strings.Fields(out), " "), d.usage) {
				t.Errorf("%s output lacks the description of --%s", arg, d.name)
			}
		}
		if strings.Contains(stderr.String(), "EMBEDDED") {
			t.Errorf("%s started the engine: %s", arg, stderr.String())
		}
	}
}

func TestMaxRecvMsgSize(t *testing.T) {
	for _, tt := range []struct{ payload, want int }{
		{1 << 20, 16 << 20},
		{16 << 20, 33 << 20},
		{1, 16 << 20},
	} {
		c := &Config{MaxPayloadBytes: tt.payload}
		if got := c.maxRecvMsgSize(); got != tt.want {
			t.Errorf("max payload %d: MaxRecvMsgSize %d, want %d", tt.payload, got, tt.want)
		}
	}
}

// TestREADMEFlagTable keeps the configuration table of the project README
// in step with flagDefs. Regenerate with:
// go test ./cmd/qbridged -run TestREADMEFlagTable -update
func TestREADMEFlagTable(t *testing.T) {
	const readme = "../../README.md"
	const begin, end = "<!-- config-table:begin -->\n", "<!-- config-table:end -->"
	raw, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	i, j := strings.Index(doc, begin), strings.Index(doc, end)
	if i < 0 || j < i {
		t.Fatalf("README.md lacks the %q ... %q markers", begin, end)
	}
	want := markdownFlagTable()
	if got := doc[i+len(begin) : j]; got != want {
		if *updateREADME {
			doc = doc[:i+len(begin)] + want + doc[j:]
			if err := os.WriteFile(readme, []byte(doc), 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		t.Errorf("README.md flag table is stale; run: go test ./cmd/qbridged -run TestREADMEFlagTable -update\n got:\n%s\nwant:\n%s", got, want)
	}
}
