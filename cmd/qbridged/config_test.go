package main

import (
	"bytes"
	"context"
	"flag"
	"io"
	"log/slog"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
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
		MaxAttempts:      25,
		RetryBackoffMin:  time.Second,
		RetryBackoffMax:  10 * time.Minute,
		ExpiredAction:    "drop",
		DedupWindow:      10 * time.Minute,
		ResultRetention:  24 * time.Hour,
		LogLevel:         slog.LevelInfo,
		LogFormat:        "text",
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
	// Every Config field is set by exactly one flag.
	n := reflect.TypeOf(Config{}).NumField()
	if len(flagDefs) != n {
		t.Errorf("%d flags for %d Config fields", len(flagDefs), n)
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
		{"redis url scheme", []string{"--redis-url=http://127.0.0.1:6379"}, nil,
			[]string{"--redis-url (QBRIDGE_REDIS_URL)", "scheme", "redis://"}},
		{"redis url db", []string{"--redis-url=redis://127.0.0.1:6379/nope"}, nil,
			[]string{"--redis-url", "database"}},
		{"raw queue name", []string{"--raw-queues=ok,no{braces}"}, nil,
			[]string{"--raw-queues (QBRIDGE_RAW_QUEUES)", "no{braces}"}},
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
			c, err := parseConfig(tt.args, envFunc(tt.env), io.Discard)
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			o, err := c.redisOptions()
			if err != nil {
				t.Fatalf("redisOptions: %v", err)
			}
			if o.Network != tt.network || o.Addr != tt.addr || o.DB != tt.db {
				t.Errorf("got %s %s db %d, want %s %s db %d", o.Network, o.Addr, o.DB, tt.network, tt.addr, tt.db)
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
		_, err := parseConfig([]string{"--redis-url", u}, envFunc(nil), io.Discard)
		if err == nil {
			t.Errorf("%q: accepted", u)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%q: error leaks the password: %v", u, err)
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
