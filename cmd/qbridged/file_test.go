package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/qbridge/qbridge/server/auth"
)

// Token hashes for the config files of these tests (hashes of made-up
// tokens: the config never holds a token).
var (
	fileTestHashA = auth.HashToken("file-test-token-a")
	fileTestHashB = auth.HashToken("file-test-token-b")
	fileTestHashC = auth.HashToken("file-test-token-c")
)

// writeTOML writes body to config.toml in a new temporary directory and
// returns its path.
func writeTOML(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// parseWithFile runs parseConfig with --config=path, args and env.
func parseWithFile(path string, args []string, env map[string]string) (*Config, error) {
	return parseConfig(append([]string{"--config=" + path}, args...), func(k string) string { return env[k] }, io.Discard)
}

// TestConfigFileValueKinds: every kind of TOML value a setting can take
// lands in Config as its flag would have set it.
func TestConfigFileValueKinds(t *testing.T) {
	tests := []struct {
		name string
		toml string
		get  func(*Config) any
		want any
	}{
		{"string", `listen = "127.0.0.1:9100"`, func(c *Config) any { return c.Listen }, "127.0.0.1:9100"},
		{"string prefix", `key-prefix = "qb:"`, func(c *Config) any { return c.KeyPrefix }, "qb:"},
		{"int", `max-batch = 50`, func(c *Config) any { return c.MaxBatch }, 50},
		{"negative int", `redis-db = -1`, func(c *Config) any { return c.RedisDB }, -1},
		{"float", `requests-per-second = 2.5`, func(c *Config) any { return c.RequestsPerSec }, 2.5},
		{"int for a float setting", `bytes-per-second = 1000`, func(c *Config) any { return c.BytesPerSec }, 1000.0},
		{"bool true", `public-reflection = true`, func(c *Config) any { return c.PublicReflection }, true},
		{"bool false over a true default", `public-health = false`, func(c *Config) any { return c.PublicHealth }, false},
		{"duration string", `default-lease = "45s"`, func(c *Config) any { return c.DefaultLease }, 45 * time.Second},
		{"compound duration", `retry-backoff-max = "1m30s"`, func(c *Config) any { return c.RetryBackoffMax }, 90 * time.Second},
		{"list", `raw-queues = ["legacy", "imports"]`, func(c *Config) any { return c.RawQueues }, []string{"legacy", "imports"}},
		{"list as a comma string", `raw-queues = "legacy, imports"`, func(c *Config) any { return c.RawQueues }, []string{"legacy", "imports"}},
		{"empty list", `raw-queues = []`, func(c *Config) any { return c.RawQueues }, []string(nil)},
		{"list of patterns", "redis-url = \"redis://127.0.0.1:6379\"\nplaintext = true\n" + `sharded-channels = ["metrics.*", "prices"]`,
			func(c *Config) any { return c.ShardedChannels }, []string{"metrics.*", "prices"}},
		{"level", `log-level = "debug"`, func(c *Config) any { return c.LogLevel }, slog.LevelDebug},
		{"format", `log-format = "json"`, func(c *Config) any { return c.LogFormat }, "json"},
		{"comment and blank lines", "# qbridged\n\nmax-in-flight = 64 # per stream\n", func(c *Config) any { return c.MaxInFlight }, 64},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := writeTOML(t, tc.toml+"\n")
			c, err := parseWithFile(path, nil, nil)
			if err != nil {
				t.Fatalf("parseConfig with %q: %v", tc.toml, err)
			}
			if got := tc.get(c); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("%s: got %#v, want %#v", tc.toml, got, tc.want)
			}
			if c.ConfigFile != path {
				t.Errorf("ConfigFile = %q, want %q", c.ConfigFile, path)
			}
			if len(c.Principals) != 0 {
				t.Errorf("Principals = %+v, want none", c.Principals)
			}
		})
	}
}

// TestConfigFileAllSettings: a file setting many keys at once leaves every
// other field at its default.
func TestConfigFileAllSettings(t *testing.T) {
	path := writeTOML(t, `
listen = "127.0.0.1:9200"
max-batch = 10
wait-slice = "2s"
expired-action = "dead-letter"
`)
	got, err := parseWithFile(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want, err := parseConfig([]string{"--listen=127.0.0.1:9200", "--max-batch=10", "--wait-slice=2s", "--expired-action=dead-letter"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// A file without [[principal]] tables gives no principals (nil or
	// empty: both mean authentication off).
	if len(got.Principals) != 0 {
		t.Fatalf("Principals = %+v, want none", got.Principals)
	}
	got.Principals, want.ConfigFile = nil, path
	got.fileKeys = nil // which keys came from the file: for error messages only
	if !reflect.DeepEqual(got, want) {
		t.Errorf("from the file:\n got %+v\nfrom the same flags:\nwant %+v", got, want)
	}
}

// TestConfigFilePrecedence: defaults < file < environment < flags, for one
// setting.
func TestConfigFilePrecedence(t *testing.T) {
	path := writeTOML(t, "max-batch = 50\nrequests-per-second = 100\n")
	env := map[string]string{"QBRIDGE_MAX_BATCH": "60"}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want int
	}{
		{"file over default", nil, nil, 50},
		{"env over file", nil, env, 60},
		{"flag over env and file", []string{"--max-batch=70"}, env, 70},
		{"flag over file", []string{"--max-batch", "80"}, nil, 80},
		{"empty env is unset", nil, map[string]string{"QBRIDGE_MAX_BATCH": ""}, 50},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseWithFile(path, tc.args, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			if c.MaxBatch != tc.want {
				t.Errorf("MaxBatch = %d, want %d", c.MaxBatch, tc.want)
			}
			if c.RequestsPerSec != 100 {
				t.Errorf("RequestsPerSec = %g, want the file's 100 (untouched by the other layers)", c.RequestsPerSec)
			}
		})
	}
	// Without a file, the default.
	c, err := parseConfig(nil, func(string) string { return "" }, io.Discard)
	if err != nil || c.MaxBatch != 1000 {
		t.Fatalf("no file: MaxBatch %v, %v; want the default 1000", c, err)
	}
}

// TestConfigFileArgForms: the file is named by --config=path, --config path,
// -config path or QBRIDGE_CONFIG; a flag beats the environment.
func TestConfigFileArgForms(t *testing.T) {
	a := writeTOML(t, "max-batch = 11\n")
	b := writeTOML(t, "max-batch = 22\n")
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want int
		file string
	}{
		{"--config=path", []string{"--config=" + a}, nil, 11, a},
		{"--config path", []string{"--config", a}, nil, 11, a},
		{"-config path", []string{"-config", a}, nil, 11, a},
		{"-config=path", []string{"-config=" + a}, nil, 11, a},
		{"after other flags", []string{"--plaintext", "--max-in-flight", "7", "--config", a}, nil, 11, a},
		{"QBRIDGE_CONFIG", nil, map[string]string{"QBRIDGE_CONFIG": a}, 11, a},
		{"flag beats QBRIDGE_CONFIG", []string{"--config", b}, map[string]string{"QBRIDGE_CONFIG": a}, 22, b},
		{"last --config wins", []string{"--config", a, "--config=" + b}, nil, 22, b},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseConfig(tc.args, func(k string) string { return tc.env[k] }, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if c.MaxBatch != tc.want || c.ConfigFile != tc.file {
				t.Errorf("MaxBatch %d from %q; want %d from %q", c.MaxBatch, c.ConfigFile, tc.want, tc.file)
			}
		})
	}
}

// TestConfigFileErrors: every mistake in a file is an error that names the
// file and what is wrong in it.
func TestConfigFileErrors(t *testing.T) {
	tests := []struct {
		name string
		toml string
		want []string // each must be in the error; "$FILE" is the file's path
	}{
		{"unknown top-level key", "listen = \"127.0.0.1:7070\"\nmax-batchs = 5\n",
			[]string{"$FILE", `unknown setting "max-batchs"`}},
		{"config inside the config", `config = "other.toml"` + "\n",
			[]string{"$FILE", `unknown setting "config"`}},
		{"unknown table", "[server]\nlisten = \"x\"\n",
			[]string{"$FILE", `unknown setting "server"`}},
		{"unknown key in a principal", "[[principal]]\nname = \"p\"\ntokens = [\"" + fileTestHashA + "\"]\nalow = [\"produce\"]\n",
			[]string{"$FILE", "alow", "[[principal]]"}},
		{"unknown key in a grant", "[[principal]]\nname = \"p\"\ntokens = [\"" + fileTestHashA + "\"]\n[[principal.grant]]\nqueues = [\"a\"]\nalow = [\"produce\"]\n",
			[]string{"$FILE", "alow"}},
		{"syntax error", "listen = \"127.0.0.1:7070\"\nmax-batch = = 5\n",
			[]string{"$FILE", "line 2"}},
		{"unterminated string", "listen = \"127.0.0.1:7070\n",
			[]string{"$FILE", "line 1"}},
		{"duplicate key", "max-batch = 1\nmax-batch = 2\n",
			[]string{"$FILE", "max-batch"}},
		{"int setting given text", `max-batch = "many"` + "\n",
			[]string{"$FILE", "max-batch", `"many"`, "want an integer"}},
		{"int setting given a fraction", "max-batch = 1.5\n",
			[]string{"$FILE", "max-batch", "want an integer"}},
		{"duration given a bare number", "default-lease = 30\n",
			[]string{"$FILE", "default-lease", "want a duration"}},
		{"bool given text", `plaintext = "yes"` + "\n",
			[]string{"$FILE", "plaintext", "want true or false"}},
		{"list of numbers", "raw-queues = [1, 2]\n",
			[]string{"$FILE", "raw-queues", "list of strings"}},
		{"list entry with a comma", `raw-queues = ["a,b"]` + "\n",
			[]string{"$FILE", "raw-queues", "without commas"}},
		{"date", "drain-timeout = 2024-01-01\n",
			[]string{"$FILE", "drain-timeout", "want a duration"}},
		{"inline table", "listen = { host = \"x\" }\n",
			[]string{"$FILE", "listen", "want a string"}},
		{"file value out of range", "max-batch = 0\n",
			[]string{"--max-batch", "must be a positive number"}},
		{"principal limit of the wrong type", "[[principal]]\nname = \"p\"\ntokens = [\"" + fileTestHashA + "\"]\nrequests-per-second = \"fast\"\n",
			[]string{"$FILE", "requests-per-second"}},
		{"principal as a single table", "[principal]\nname = \"p\"\n",
			[]string{"$FILE", "principal"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := writeTOML(t, tc.toml)
			_, err := parseWithFile(path, nil, nil)
			if err == nil {
				t.Fatalf("parseConfig accepted:\n%s", tc.toml)
			}
			t.Logf("error: %v", err)
			for _, w := range tc.want {
				w = strings.ReplaceAll(w, "$FILE", path)
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestConfigFileWrongTypeForString: a number where a string setting is
// expected. The file layer turns every value into the text its flag parses,
// so `listen = 5` is not rejected as a type error; what matters is that the
// operator learns what is wrong before serving: qbridged must not start,
// and its error must name the setting and the value.
func TestConfigFileWrongTypeForString(t *testing.T) {
	path := writeTOML(t, "listen = 5\n")
	c, err := parseWithFile(path, nil, nil)
	if err != nil {
		// Rejected at parse time: then the message names file and key.
		for _, w := range []string{path, "listen"} {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not name %q", err, w)
			}
		}
		return
	}
	t.Logf("parseConfig accepts listen = 5 as Listen %q; checking that run refuses it", c.Listen)
	ctx, cancel := contextWithTimeout(10 * time.Second)
	defer cancel()
	var logs syncBuffer
	err = run(ctx, []string{"--config", path}, func(string) string { return "" }, io.Discard, &logs)
	if err == nil {
		t.Fatal("run served with listen = 5")
	}
	for _, w := range []string{"--listen", `5`, "missing port"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("run: %q does not contain %q", err, w)
		}
	}
}

// TestConfigFileMissing: a --config file that cannot be read is an error
// naming --config and the path, also when named by QBRIDGE_CONFIG.
func TestConfigFileMissing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.toml")
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
	}{
		{"flag", []string{"--config", missing}, nil},
		{"env", nil, map[string]string{"QBRIDGE_CONFIG": missing}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig(tc.args, func(k string) string { return tc.env[k] }, io.Discard)
			if err == nil {
				t.Fatal("parseConfig accepted a missing config file")
			}
			for _, w := range []string{"--config", missing, "no such file"} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestConfigFilePrincipals: principals come from [[principal]] tables;
// limits they leave out take the defaults (flags, environment or top-level
// keys), those they set, including 0 (unlimited), are theirs.
func TestConfigFilePrincipals(t *testing.T) {
	body := `
requests-per-second = 100
request-burst = 20
bytes-per-second = 5000
max-streams = 8

[[principal]]
name = "inherits"
tokens = ["` + fileTestHashA + `"]
  [[principal.grant]]
  queues = ["orders.*"]
  allow = ["produce"]
  [[principal.grant]]
  channels = ["news.*", "alerts"]
  allow = ["publish", "subscribe"]

[[principal]]
name = "own-limits"
tokens = ["` + fileTestHashB + `"]
cert-names = ["worker.internal"]
requests-per-second = 5
request-burst = 2
bytes-per-second = 64
max-streams = 1
  [[principal.grant]]
  queues = ["*"]
  allow = ["consume", "admin"]

[[principal]]
name = "unlimited"
cert-names = ["batch"]
tokens = ["` + fileTestHashC + `"]
requests-per-second = 0
request-burst = 0
bytes-per-second = 0
max-streams = 0
  [[principal.grant]]
  queues = ["batch"]
  allow = ["produce"]
`
	path := writeTOML(t, body)
	defaults := auth.Limits{RequestsPerSecond: 100, RequestBurst: 20, BytesPerSecond: 5000, MaxStreams: 8}
	want := []auth.Principal{
		{Name: "inherits", TokenHashes: []string{fileTestHashA}, Limits: defaults, Grants: []auth.Grant{
			{Queues: []string{"orders.*"}, Allow: []auth.Permission{auth.Produce}},
			{Channels: []string{"news.*", "alerts"}, Allow: []auth.Permission{auth.Publish, auth.Subscribe}},
		}},
		{Name: "own-limits", TokenHashes: []string{fileTestHashB}, CertNames: []string{"worker.internal"},
			Limits: auth.Limits{RequestsPerSecond: 5, RequestBurst: 2, BytesPerSecond: 64, MaxStreams: 1},
			Grants: []auth.Grant{{Queues: []string{"*"}, Allow: []auth.Permission{auth.Consume, auth.Admin}}}},
		{Name: "unlimited", TokenHashes: []string{fileTestHashC}, CertNames: []string{"batch"},
			Limits: auth.Limits{},
			Grants: []auth.Grant{{Queues: []string{"batch"}, Allow: []auth.Permission{auth.Produce}}}},
	}
	c, err := parseWithFile(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c.Principals, want) {
		t.Errorf("principals:\n got %+v\nwant %+v", c.Principals, want)
	}
	if c.defaultLimits() != defaults {
		t.Errorf("default limits %+v, want %+v", c.defaultLimits(), defaults)
	}

	// Defaults given by a flag or the environment reach the principals
	// that set none, and only those.
	c, err = parseWithFile(path, []string{"--requests-per-second=7"}, map[string]string{"QBRIDGE_MAX_STREAMS": "3"})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]auth.Limits{}
	for _, p := range c.Principals {
		got[p.Name] = p.Limits
	}
	wantLimits := map[string]auth.Limits{
		"inherits":   {RequestsPerSecond: 7, RequestBurst: 20, BytesPerSecond: 5000, MaxStreams: 3},
		"own-limits": {RequestsPerSecond: 5, RequestBurst: 2, BytesPerSecond: 64, MaxStreams: 1},
		"unlimited":  {},
	}
	if !reflect.DeepEqual(got, wantLimits) {
		t.Errorf("with --requests-per-second=7 and QBRIDGE_MAX_STREAMS=3:\n got %+v\nwant %+v", got, wantLimits)
	}

	// A principal that sets some limits inherits the others.
	path = writeTOML(t, `
max-streams = 4
requests-per-second = 9
[[principal]]
name = "partial"
tokens = ["`+fileTestHashA+`"]
max-streams = 0
  [[principal.grant]]
  queues = ["q"]
  allow = ["consume"]
`)
	c, err = parseWithFile(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if l := c.Principals[0].Limits; l != (auth.Limits{RequestsPerSecond: 9, MaxStreams: 0}) {
		t.Errorf("partial: %+v, want requests-per-second 9 inherited and max-streams 0 (unlimited) its own", l)
	}
}

// TestConfigFileNoPrincipals: a file without principals leaves
// authentication off (and Principals empty).
func TestConfigFileNoPrincipals(t *testing.T) {
	c, err := parseWithFile(writeTOML(t, "max-batch = 5\n"), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	g, err := auth.New(c.authConfig())
	if err != nil {
		t.Fatal(err)
	}
	if g.Enabled() || len(c.Principals) != 0 {
		t.Errorf("no [[principal]]: Enabled %v, Principals %+v; want authentication off", g.Enabled(), c.Principals)
	}
}

// TestConfigFileInvalidPrincipals: a principal auth.New refuses makes
// parseConfig fail, naming the file and the principal.
func TestConfigFileInvalidPrincipals(t *testing.T) {
	grant := "\n  [[principal.grant]]\n  queues = [\"q\"]\n  allow = [\"produce\"]\n"
	tests := []struct {
		name string
		toml string
		want []string
	}{
		{"token not a hash", "[[principal]]\nname = \"orders-api\"\ntokens = [\"sha1:abc\"]" + grant,
			[]string{`principal "orders-api"`, "qbridge token hash"}},
		{"hash too short", "[[principal]]\nname = \"orders-api\"\ntokens = [\"sha256:abcd\"]" + grant,
			[]string{`principal "orders-api"`, "64 hex digits"}},
		{"publish on queues", "[[principal]]\nname = \"pub\"\ntokens = [\"" + fileTestHashA + "\"]\n  [[principal.grant]]\n  queues = [\"q\"]\n  allow = [\"publish\"]\n",
			[]string{`principal "pub"`, "grant #1", "publish applies to channels"}},
		{"unknown permission", "[[principal]]\nname = \"typo\"\ntokens = [\"" + fileTestHashA + "\"]\n  [[principal.grant]]\n  queues = [\"q\"]\n  allow = [\"produse\"]\n",
			[]string{`principal "typo"`, `unknown permission "produse"`}},
		{"bad pattern", "[[principal]]\nname = \"glob\"\ntokens = [\"" + fileTestHashA + "\"]\n  [[principal.grant]]\n  queues = [\"or?ers\"]\n  allow = [\"produce\"]\n",
			[]string{`principal "glob"`, `pattern "or?ers"`}},
		{"no credentials", "[[principal]]\nname = \"nobody\"" + grant,
			[]string{`principal "nobody"`, "neither tokens nor cert-names"}},
		{"no name", "[[principal]]\ntokens = [\"" + fileTestHashA + "\"]" + grant,
			[]string{"principal #1", "no name"}},
		{"same name twice", "[[principal]]\nname = \"twin\"\ntokens = [\"" + fileTestHashA + "\"]" + grant +
			"[[principal]]\nname = \"twin\"\ntokens = [\"" + fileTestHashB + "\"]" + grant,
			[]string{`principal "twin" is defined twice`}},
		{"token of two principals", "[[principal]]\nname = \"one\"\ntokens = [\"" + fileTestHashA + "\"]" + grant +
			"[[principal]]\nname = \"two\"\ntokens = [\"" + fileTestHashA + "\"]" + grant,
			[]string{`principal "two"`, `also given to principal "one"`}},
		{"negative own limit", "[[principal]]\nname = \"neg\"\ntokens = [\"" + fileTestHashA + "\"]\nmax-streams = -1" + grant,
			[]string{`principal "neg"`, "cannot be negative"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := writeTOML(t, tc.toml)
			_, err := parseWithFile(path, nil, nil)
			if err == nil {
				t.Fatalf("parseConfig accepted:\n%s", tc.toml)
			}
			for _, w := range append([]string{"config file " + path}, tc.want...) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q spans lines; want one line", err)
			}
		})
	}
}

// TestConfigFileTokenInsteadOfHash: a token pasted where its hash belongs
// is refused with a pointer to `qbridge token hash`, and the error (which
// ends up in logs) shows no more of the token than its first characters.
func TestConfigFileTokenInsteadOfHash(t *testing.T) {
	const token = "qbt_Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5"
	path := writeTOML(t, "[[principal]]\nname = \"leaky\"\ntokens = [\""+token+"\"]\n  [[principal.grant]]\n  queues = [\"q\"]\n  allow = [\"produce\"]\n")
	_, err := parseWithFile(path, nil, nil)
	if err == nil {
		t.Fatal("parseConfig accepted a token as a token hash")
	}
	if !strings.Contains(err.Error(), "qbridge token hash") || !strings.Contains(err.Error(), `principal "leaky"`) {
		t.Errorf("error %q does not name the principal and point to `qbridge token hash`", err)
	}
	if strings.Contains(err.Error(), token) {
		t.Errorf("error %q contains the whole token", err)
	}
}

// TestConfigDefaultLimitErrorsWithoutFile: out-of-range default limits
// without any config file are reported against their flags, not against a
// config file that does not exist.
func TestConfigDefaultLimitErrorsWithoutFile(t *testing.T) {
	_, err := parseConfig([]string{"--max-streams=-1"}, func(string) string { return "" }, io.Discard)
	if err == nil {
		t.Fatal("parseConfig accepted --max-streams=-1")
	}
	if !strings.Contains(err.Error(), "--max-streams (QBRIDGE_MAX_STREAMS) must be 0 (unlimited) or positive") {
		t.Errorf("error %q does not name --max-streams", err)
	}
	if strings.Contains(err.Error(), "config file :") || strings.Contains(err.Error(), "config file ;") {
		t.Errorf("error %q blames a config file, but none was given", err)
	}
}

// tomlBlockRE finds the ```toml blocks of a Markdown document.
var tomlBlockRE = regexp.MustCompile("(?ms)^```toml[ \t]*\n(.*?)^```[ \t]*$")

// TestREADMEConfigExamples: every TOML example in README.md (the
// production config of its Security section) is a valid config file: it
// parses, its settings take their flags' values, and auth.New accepts its
// principals. Files it names (certificates) need not exist.
func TestREADMEConfigExamples(t *testing.T) {
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := tomlBlockRE.FindAllStringSubmatch(string(raw), -1)
	if len(blocks) == 0 {
		t.Fatal("README.md has no ```toml block: its Security section should show a production config file")
	}
	principals := 0
	for i, b := range blocks {
		path := writeTOML(t, b[1])
		f, err := loadConfigFile(path)
		if err != nil {
			t.Errorf("README.md toml block #%d: %v\n%s", i+1, err, b[1])
			continue
		}
		c := &Config{}
		for _, d := range flagDefs {
			if err := d.value(c).Set(d.def); err != nil {
				t.Fatal(err)
			}
		}
		for _, s := range f.settings {
			if err := lookupFlag(s.name).value(c).Set(s.value); err != nil {
				t.Errorf("README.md toml block #%d: %s = %q: %v", i+1, s.name, s.value, err)
			}
		}
		c.Principals = f.principals(c.defaultLimits())
		principals += len(c.Principals)
		if _, err := auth.New(c.authConfig()); err != nil {
			t.Errorf("README.md toml block #%d: principals: %v\n%s", i+1, err, b[1])
		}
		t.Logf("README.md toml block #%d: %d settings, %d principals", i+1, len(f.settings), len(c.Principals))
	}
	if principals == 0 {
		t.Error("no ```toml block of README.md defines a [[principal]]: the production example should show some")
	}
}
