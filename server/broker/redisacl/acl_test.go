package redisacl_test

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/qbridge/qbridge/internal/redistest"
	"github.com/qbridge/qbridge/server/broker/redisacl"
)

// TestCommandsCoverScripts: every command a Lua script calls is allowed
// (Redis checks redis.call and redis.pcall against the caller's ACL).
func TestCommandsCoverScripts(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "scripts.go"))
	if err != nil {
		t.Fatal(err)
	}
	calls := regexp.MustCompile(`redis\.p?call\(\s*'([A-Za-z|]+)'`).FindAllSubmatch(src, -1)
	if len(calls) < 20 {
		t.Fatalf("found only %d redis.call in scripts.go; has the file changed shape?", len(calls))
	}
	seen := map[string]bool{}
	for _, m := range calls {
		cmd := strings.ToLower(string(m[1]))
		if seen[cmd] {
			continue
		}
		seen[cmd] = true
		if !slices.Contains(redisacl.Commands, cmd) {
			t.Errorf("scripts.go calls %s, which redisacl.Commands lacks", strings.ToUpper(cmd))
		}
	}
	// A call with a command in a variable would escape this check.
	if m := regexp.MustCompile(`redis\.p?call\(\s*[^'\s]`).Find(src); m != nil {
		t.Errorf("scripts.go has a redis.call whose command is not a literal: %q", m)
	}
}

func TestCommandsWellFormed(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range redisacl.Commands {
		if c != strings.ToLower(c) || strings.ContainsAny(c, " \t") || c == "" {
			t.Errorf("command %q: want lower case, one word", c)
		}
		if seen[c] {
			t.Errorf("command %q listed twice", c)
		}
		seen[c] = true
	}
	for _, bad := range []string{"flushall", "flushdb", "keys", "config", "debug", "script|flush", "script", "acl", "shutdown", "get"} {
		if seen[bad] {
			t.Errorf("Commands has %q, which qbridge does not send", bad)
		}
	}
}

func TestRules(t *testing.T) {
	var plus []string
	for _, c := range redisacl.Commands {
		plus = append(plus, "+"+c)
	}
	for _, tc := range []struct {
		prefix string
		want   []string // the rules before -@all
	}{
		{"", []string{"resetkeys", "~*", "resetchannels", "&*"}},
		{"app:", []string{"resetkeys", "~app:*", "~{app:*", "resetchannels", "&app:*"}},
		{"a*b", []string{"resetkeys", `~a\*b*`, `~{a\*b*`, "resetchannels", `&a\*b*`}},
		{`x?[y]\`, []string{"resetkeys", `~x\?\[y\]\\*`, `~{x\?\[y\]\\*`, "resetchannels", `&x\?\[y\]\\*`}},
		{"{t}", []string{"resetkeys", "~{t}*", "~{{t}*", "resetchannels", "&{t}*"}},
		{"my app\t", []string{"resetkeys", "~my?app?*", "~{my?app?*", "resetchannels", "&my?app?*"}},
	} {
		got := redisacl.Rules(tc.prefix)
		want := append(append(slices.Clone(tc.want), "-@all"), plus...)
		if !slices.Equal(got, want) {
			t.Errorf("Rules(%q) =\n%q\nwant\n%q", tc.prefix, got, want)
		}
	}
}

func TestSetUserAndConfigLine(t *testing.T) {
	args := redisacl.SetUser("svc", "pw", "app:")
	want := []any{"ACL", "SETUSER", "svc", "on", ">pw"}
	for _, r := range redisacl.Rules("app:") {
		want = append(want, r)
	}
	if !slices.Equal(args, want) {
		t.Fatalf("SetUser = %q, want %q", args, want)
	}

	line := redisacl.ConfigLine("svc", "pw", "app:")
	if wantLine := "user svc on >pw " + strings.Join(redisacl.Rules("app:"), " "); line != wantLine {
		t.Fatalf("ConfigLine =\n%s\nwant\n%s", line, wantLine)
	}
	// Words that the config parser would split or unquote are quoted.
	line = redisacl.ConfigLine("svc", `p w"'\`, "my app:")
	if !strings.HasPrefix(line, `user svc on ">p w\"'\\" resetkeys ~my?app:* ~{my?app:* resetchannels &my?app:* -@all +`) {
		t.Fatalf("ConfigLine with spaces and quotes = %s", line)
	}
	if line := redisacl.ConfigLine("svc", "a\tb\x01", `a*b`); !strings.HasPrefix(line, `user svc on ">a\x09b\x01" resetkeys ~a\*b* ~{a\*b* resetchannels &a\*b* -@all`) {
		t.Fatalf("ConfigLine with control characters and a glob = %s", line)
	}
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func noPerm(err error) bool { return err != nil && strings.HasPrefix(err.Error(), "NOPERM") }

func login(t *testing.T, rs *redistest.Server, user, password string) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: rs.Addr(), Username: user, Password: password, MaxRetries: -1})
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Ping(ctxT(t)).Err(); err != nil {
		t.Fatalf("log in as %s: %v", user, err)
	}
	return c
}

// TestRealRedis checks the rules on a real redis-server: a user made with
// SetUser for prefix "app:" reaches qbridge's keys and channels and
// nothing else.
func TestRealRedis(t *testing.T) {
	// A config file with a "user" line of ConfigLine, for a prefix with a
	// space and a password that needs quoting.
	dir := t.TempDir()
	conf := filepath.Join(dir, "users.conf")
	if err := os.WriteFile(conf, []byte(redisacl.ConfigLine("fromconf", `pass word"`, "my app:")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rs := redistest.Start(t, redistest.WithArgs("--include", conf))
	admin := rs.Client(t, 0)
	if err := admin.Do(ctxT(t), redisacl.SetUser("app", "secret", "app:")...).Err(); err != nil {
		t.Fatalf("ACL SETUSER: %v", err)
	}
	c := login(t, rs, "app", "secret")
	ctx := ctxT(t)

	for _, k := range []string{"app:q", "{app:q}:qb:x", "app:qbridge:queues"} {
		if err := c.RPush(ctx, k, "m").Err(); err != nil {
			t.Errorf("RPUSH %s: %v", k, err)
		}
	}
	for _, k := range []string{"other", "{other}:qb:x", "ap:q"} {
		if err := c.RPush(ctx, k, "m").Err(); !noPerm(err) {
			t.Errorf("RPUSH %s: %v; want NOPERM", k, err)
		}
	}
	if err := c.FlushAll(ctx).Err(); !noPerm(err) {
		t.Errorf("FLUSHALL: %v; want NOPERM", err)
	}
	if err := c.ConfigGet(ctx, "maxmemory").Err(); !noPerm(err) {
		t.Errorf("CONFIG GET: %v; want NOPERM", err)
	}
	if err := c.Keys(ctx, "*").Err(); !noPerm(err) {
		t.Errorf("KEYS: %v; want NOPERM", err)
	}
	if err := c.Do(ctx, "SCRIPT", "FLUSH").Err(); !noPerm(err) {
		t.Errorf("SCRIPT FLUSH: %v; want NOPERM", err)
	}
	if err := c.Publish(ctx, "app:c", "hi").Err(); err != nil {
		t.Errorf("PUBLISH app:c: %v", err)
	}
	if err := c.Publish(ctx, "x", "hi").Err(); !noPerm(err) {
		t.Errorf("PUBLISH x: %v; want NOPERM", err)
	}
	// Sharded channels (Redis 7) fall under the same channel rules.
	if err := c.SPublish(ctx, "app:c", "hi").Err(); err != nil {
		t.Errorf("SPUBLISH app:c: %v", err)
	}
	if err := c.SPublish(ctx, "x", "hi").Err(); !noPerm(err) {
		t.Errorf("SPUBLISH x: %v; want NOPERM", err)
	}

	// Scripts: their commands and keys are checked too.
	if err := c.Eval(ctx, "return redis.call('RPUSH', KEYS[1], 'm')", []string{"{app:q}:qb:y"}).Err(); err != nil {
		t.Errorf("EVAL RPUSH {app:q}:qb:y: %v", err)
	}
	if err := c.Eval(ctx, "return redis.call('RPUSH', KEYS[1], 'm')", []string{"elsewhere"}).Err(); !noPerm(err) {
		t.Errorf("EVAL RPUSH elsewhere: %v; want NOPERM", err)
	}
	if err := c.Eval(ctx, "return redis.call('GET', KEYS[1])", []string{"app:q"}).Err(); err == nil || !strings.Contains(err.Error(), "can't run this command") {
		t.Errorf("EVAL GET (not in Commands): %v; want Redis refusing the command", err)
	}
	if err := c.Eval(ctx, "return redis.call('PUBLISH', ARGV[1], 'x')", []string{"app:q"}, "app:{qbridge}:events").Err(); err != nil {
		t.Errorf("EVAL PUBLISH app:{qbridge}:events: %v", err)
	}

	// Subscriptions: channels under the prefix; patterns only literally
	// (see the package documentation).
	sub := func(pattern bool, name string) error {
		ps := c.Subscribe(ctx)
		defer ps.Close()
		if pattern {
			if err := ps.PSubscribe(ctx, name); err != nil {
				return err
			}
		} else if err := ps.Subscribe(ctx, name); err != nil {
			return err
		}
		_, err := ps.Receive(ctx)
		return err
	}
	if err := sub(false, "app:c"); err != nil {
		t.Errorf("SUBSCRIBE app:c: %v", err)
	}
	if err := sub(false, "x"); !noPerm(err) {
		t.Errorf("SUBSCRIBE x: %v; want NOPERM", err)
	}
	if err := sub(true, "app:*"); err != nil {
		t.Errorf("PSUBSCRIBE app:* (the rule itself): %v", err)
	}
	if err := sub(true, "app:news.*"); !noPerm(err) {
		t.Errorf("PSUBSCRIBE app:news.*: %v; want NOPERM (Redis matches patterns literally)", err)
	}
	ssub := func(name string) error {
		ps := c.SSubscribe(ctx)
		defer ps.Close()
		if err := ps.SSubscribe(ctx, name); err != nil {
			return err
		}
		if _, err := ps.Receive(ctx); err != nil {
			return err
		}
		// And the stream end's SUNSUBSCRIBE.
		if err := ps.SUnsubscribe(ctx, name); err != nil {
			return err
		}
		_, err := ps.Receive(ctx)
		return err
	}
	if err := ssub("app:c"); err != nil {
		t.Errorf("SSUBSCRIBE and SUNSUBSCRIBE app:c: %v", err)
	}
	if err := ssub("x"); !noPerm(err) {
		t.Errorf("SSUBSCRIBE x: %v; want NOPERM", err)
	}

	// Glob characters of the prefix are literal.
	if err := admin.Do(ctx, redisacl.SetUser("glob", "secret", "a*b")...).Err(); err != nil {
		t.Fatalf("ACL SETUSER for a*b: %v", err)
	}
	g := login(t, rs, "glob", "secret")
	if err := g.RPush(ctx, "a*b:q", "m").Err(); err != nil {
		t.Errorf("RPUSH a*b:q: %v", err)
	}
	if err := g.RPush(ctx, "{a*b:q}:qb:x", "m").Err(); err != nil {
		t.Errorf("RPUSH {a*b:q}:qb:x: %v", err)
	}
	if err := g.RPush(ctx, "aXb:q", "m").Err(); !noPerm(err) {
		t.Errorf("RPUSH aXb:q: %v; want NOPERM (the * of the prefix is literal)", err)
	}

	// The user from the config file.
	f := login(t, rs, "fromconf", `pass word"`)
	if err := f.RPush(ctx, "my app:q", "m").Err(); err != nil {
		t.Errorf("config-file user: RPUSH \"my app:q\": %v", err)
	}
	if err := f.RPush(ctx, "{my app:q}:qb:x", "m").Err(); err != nil {
		t.Errorf("config-file user: RPUSH \"{my app:q}:qb:x\": %v", err)
	}
	if err := f.RPush(ctx, "app:q", "m").Err(); !noPerm(err) {
		t.Errorf("config-file user: RPUSH app:q: %v; want NOPERM", err)
	}
}

// TestClusterRules: the cluster rule set is the plain one plus
// ClusterCommands, in every form; the plain one has none of them (a single
// Redis does not need them).
func TestClusterRules(t *testing.T) {
	for _, c := range redisacl.ClusterCommands {
		if slices.Contains(redisacl.Commands, c) {
			t.Errorf("%s is in both Commands and ClusterCommands", c)
		}
		if c != strings.ToLower(c) || strings.ContainsAny(c, " \t") || c == "" {
			t.Errorf("cluster command %q: want lower case, one word", c)
		}
	}
	for _, prefix := range []string{"", "app:"} {
		want := append(redisacl.Rules(prefix), "+cluster|slots", "+command", "+asking")
		if got := redisacl.ClusterRules(prefix); !slices.Equal(got, want) {
			t.Errorf("ClusterRules(%q) = %q, want %q", prefix, got, want)
		}
		if got, want := redisacl.ClusterConfigLine("svc", "pw", prefix), "user svc on >pw "+strings.Join(want, " "); got != want {
			t.Errorf("ClusterConfigLine = %s, want %s", got, want)
		}
		args := redisacl.ClusterSetUser("svc", "pw", prefix)
		if len(args) != 5+len(want) || args[len(args)-1] != "+asking" || args[2] != "svc" || args[4] != ">pw" {
			t.Errorf("ClusterSetUser = %v", args)
		}
	}
	// A real Redis takes the line.
	rs := redistest.Start(t)
	admin := rs.Client(t, 0)
	if err := admin.Do(ctxT(t), redisacl.ClusterSetUser("cl", "pw", "app:")...).Err(); err != nil {
		t.Fatalf("ACL SETUSER: %v", err)
	}
	c := login(t, rs, "cl", "pw")
	if err := c.Command(ctxT(t)).Err(); err != nil {
		t.Errorf("COMMAND as the cluster user: %v", err)
	}
}
