package auth

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/internal/redistest"
)

// okPrincipal is a valid principal for tables to vary.
func okPrincipal(name string) Principal {
	return Principal{
		Name:        name,
		TokenHashes: []string{HashToken("token-of-" + name)},
		Grants:      []Grant{{Queues: []string{"q"}, Allow: []Permission{Produce}}},
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	with := func(name string, f func(*Principal)) Principal {
		p := okPrincipal(name)
		f(&p)
		return p
	}
	const rawToken = "qbt_Zx8ePq3LmN0aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"
	tests := []struct {
		name string
		cfg  Config
		// want are substrings the error must contain (the principal, the
		// grant and what is wrong).
		want []string
	}{
		{"no name",
			Config{Principals: []Principal{with("", func(*Principal) {})}},
			[]string{"principal #1 has no name"}},
		{"no name, second principal",
			Config{Principals: []Principal{okPrincipal("a"), with("", func(p *Principal) { p.TokenHashes = []string{HashToken("other")} })}},
			[]string{"principal #2 has no name"}},
		{"duplicate names",
			Config{Principals: []Principal{okPrincipal("a"), with("a", func(p *Principal) { p.TokenHashes = []string{HashToken("other")} })}},
			[]string{`principal "a" is defined twice`}},
		{"neither tokens nor cert names",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = nil })}},
			[]string{`principal "a" has neither tokens nor cert-names`}},
		{"empty token and cert lists",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes, p.CertNames = []string{}, []string{} })}},
			[]string{`principal "a" has neither tokens nor cert-names`}},
		{"raw token instead of hash",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = []string{rawToken} })}},
			[]string{`principal "a": a token hash`, `does not start with "sha256:"`, "qbridge token hash"}},
		{"empty token hash",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = []string{""} })}},
			[]string{`principal "a": a token hash`, `does not start with "sha256:"`}},
		{"hash prefix in upper case",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = []string{"SHA256:" + strings.Repeat("a", 64)} })}},
			[]string{`principal "a": a token hash`, `does not start with "sha256:"`}},
		{"hash too short",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = []string{"sha256:abcd"} })}},
			[]string{`principal "a": a token hash`, "followed by 64 hex digits"}},
		{"hash too long",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = []string{HashToken("x") + "00"} })}},
			[]string{`principal "a": a token hash`, "followed by 64 hex digits"}},
		{"hash not hex",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = []string{"sha256:" + strings.Repeat("z", 64)} })}},
			[]string{`principal "a": a token hash`, "followed by 64 hex digits"}},
		{"hash without digits",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.TokenHashes = []string{"sha256:"} })}},
			[]string{`principal "a": a token hash`, "followed by 64 hex digits"}},
		{"token hash on two principals",
			Config{Principals: []Principal{
				with("a", func(p *Principal) { p.TokenHashes = []string{HashToken("shared")} }),
				with("b", func(p *Principal) { p.TokenHashes = []string{HashToken("other"), HashToken("shared")} }),
			}},
			[]string{`principal "b": a token hash is also given to principal "a"`}},
		{"token hash on two principals, upper-case hex",
			Config{Principals: []Principal{
				with("a", func(p *Principal) { p.TokenHashes = []string{HashToken("shared")} }),
				with("b", func(p *Principal) { p.TokenHashes = []string{"sha256:" + strings.ToUpper(HashToken("shared")[7:])} }),
			}},
			[]string{`principal "b": a token hash is also given to principal "a"`}},
		{"cert name on two principals",
			Config{Principals: []Principal{
				with("a", func(p *Principal) { p.CertNames = []string{"worker-1"} }),
				with("b", func(p *Principal) { p.CertNames = []string{"worker-1"} }),
			}},
			[]string{`principal "b": cert name "worker-1" is also given to principal "a"`}},
		{"empty cert name",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.CertNames = []string{""} })}},
			[]string{`principal "a": empty cert name`}},
		{"unknown permission",
			Config{Principals: []Principal{with("a", func(p *Principal) {
				p.Grants = append(p.Grants, Grant{Queues: []string{"q"}, Allow: []Permission{"write"}})
			})}},
			[]string{`principal "a", grant #2: unknown permission "write"`, "produce, consume, admin, publish or subscribe"}},
		{"permission in the wrong case",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.Grants[0].Allow = []Permission{"Produce"} })}},
			[]string{`principal "a", grant #1: unknown permission "Produce"`}},
		{"publish with only queues",
			Config{Principals: []Principal{with("a", func(p *Principal) {
				p.Grants = append(p.Grants, Grant{Queues: []string{"q"}, Allow: []Permission{Publish}})
			})}},
			[]string{`principal "a", grant #2: publish applies to channels, and the grant lists none`}},
		{"subscribe with only queues",
			Config{Principals: []Principal{with("a", func(p *Principal) {
				p.Grants = []Grant{{Queues: []string{"q"}, Allow: []Permission{Subscribe}}}
			})}},
			[]string{`principal "a", grant #1: subscribe applies to channels, and the grant lists none`}},
		{"produce with only channels",
			Config{Principals: []Principal{with("a", func(p *Principal) {
				p.Grants = []Grant{{Channels: []string{"c"}, Allow: []Permission{Publish, Produce}}}
			})}},
			[]string{`principal "a", grant #1: produce applies to queues, and the grant lists none`}},
		{"admin with only channels",
			Config{Principals: []Principal{with("a", func(p *Principal) {
				p.Grants = []Grant{{Channels: []string{"c"}, Allow: []Permission{Admin}}}
			})}},
			[]string{`principal "a", grant #1: admin applies to queues`}},
		{"grant allows nothing",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.Grants[0].Allow = nil })}},
			[]string{`principal "a", grant #1: allows nothing`}},
		{"grant names nothing",
			Config{Principals: []Principal{with("a", func(p *Principal) { p.Grants[0].Queues = nil })}},
			[]string{`principal "a", grant #1: names no queues and no channels`}},
		{"negative default limits",
			Config{Defaults: Limits{RequestsPerSecond: -1}},
			[]string{"default limits: limits cannot be negative"}},
		{"several errors at once",
			Config{Principals: []Principal{
				with("", func(*Principal) {}),
				with("b", func(p *Principal) { p.Grants[0].Queues = []string{"a b"} }),
			}},
			[]string{"principal #1 has no name", `principal "b", grant #1: pattern "a b"`}},
	}
	for _, pat := range []string{"a*b", "?", "a b", "", "**", "*a", "a**", "news.[ab]", "news.?", "a{b}", "é", strings.Repeat("x", 257) + "*", "a\\*"} {
		for _, kind := range []string{"queue", "channel"} {
			g := Grant{Allow: []Permission{Produce}, Queues: []string{"ok", pat}}
			if kind == "channel" {
				g = Grant{Allow: []Permission{Publish}, Channels: []string{"ok.*", pat}}
			}
			tests = append(tests, struct {
				name string
				cfg  Config
				want []string
			}{"bad " + kind + " pattern " + pat,
				Config{Principals: []Principal{with("a", func(p *Principal) { p.Grants = append(p.Grants, g) })}},
				[]string{fmt.Sprintf(`principal "a", grant #2: pattern %q: `, pat), kind + " name", "a pattern is a name, a name prefix followed by *, or * alone"}})
		}
	}
	neg := map[string]Limits{
		"requests-per-second": {RequestsPerSecond: -0.5},
		"request-burst":       {RequestBurst: -1},
		"bytes-per-second":    {BytesPerSecond: -1},
		"max-streams":         {MaxStreams: -2},
	}
	for what, l := range neg {
		tests = append(tests, struct {
			name string
			cfg  Config
			want []string
		}{"negative " + what,
			Config{Principals: []Principal{with("a", func(p *Principal) { p.Limits = l })}},
			[]string{`principal "a": limits cannot be negative`}})
		tests = append(tests, struct {
			name string
			cfg  Config
			want []string
		}{"negative default " + what, Config{Defaults: l}, []string{"default limits: limits cannot be negative"}})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := New(tt.cfg)
			if err == nil {
				t.Fatalf("New accepted the config (guard %v)", g != nil)
			}
			if g != nil {
				t.Errorf("New returned a guard with the error %v", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not contain %q", err, w)
				}
			}
			// A token configured by mistake (in place of its hash) is
			// never quoted, not even in part.
			if strings.Contains(err.Error(), rawToken[:8]) {
				t.Errorf("error %q quotes the configured token", err)
			}
		})
	}
}

func TestNewAcceptsGoodConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		enabled bool
	}{
		{"empty: authentication off", Config{}, false},
		{"defaults only", Config{Defaults: Limits{RequestsPerSecond: 10, MaxStreams: 3}, PublicHealth: true}, false},
		{"one token principal", Config{Principals: []Principal{okPrincipal("a")}}, true},
		{"cert-only principal", Config{Principals: []Principal{{
			Name: "w", CertNames: []string{"worker-1", "spiffe://example.org/w"},
			Grants: []Grant{{Queues: []string{"*"}, Allow: []Permission{Consume}}},
		}}}, true},
		{"every pattern form and permission", Config{Principals: []Principal{{
			Name: "all", TokenHashes: []string{HashToken("t"), " " + HashToken("u") + "\n", "sha256:" + strings.ToUpper(HashToken("v")[7:])},
			Grants: []Grant{
				{Queues: []string{"*", "orders.*", "orders", "task:prodcons:queue", "a@b+c=d/e_f-g"}, Allow: []Permission{Produce, Consume, Admin}},
				{Channels: []string{"*", "news.*", "news"}, Allow: []Permission{Publish, Subscribe}},
				{Queues: []string{"q"}, Channels: []string{"c"}, Allow: []Permission{Produce, Publish}},
			},
			Limits: Limits{RequestsPerSecond: 0.5, RequestBurst: 3, BytesPerSecond: 1e6, MaxStreams: 10},
		}}}, true},
		{"principal without grants (may only use health)", Config{Principals: []Principal{{Name: "h", TokenHashes: []string{HashToken("h")}}}}, true},
		{"two principals", Config{Principals: []Principal{okPrincipal("a"), okPrincipal("b")}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := New(tt.cfg)
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if g.Enabled() != tt.enabled {
				t.Fatalf("Enabled() = %v, want %v", g.Enabled(), tt.enabled)
			}
		})
	}
}

func TestHashToken(t *testing.T) {
	// SHA-256("abc"), FIPS 180-2 test vector.
	if got, want := HashToken("abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; got != want {
		t.Fatalf("HashToken(abc) = %q, want %q", got, want)
	}
	form := regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	seen := map[string]string{}
	for _, tok := range []string{"", "t", "qbt_Zx8ePq3LmN0aBcDeFgHiJkLmNoPqRsTuVwXyZ012345", "T", "t "} {
		h := HashToken(tok)
		if !form.MatchString(h) {
			t.Errorf("HashToken(%q) = %q, not sha256: and 64 lower-case hex digits", tok, h)
		}
		if strings.Contains(h, tok) && tok != "" {
			t.Errorf("HashToken(%q) = %q contains the token", tok, h)
		}
		if other, dup := seen[h]; dup {
			t.Errorf("HashToken(%q) = HashToken(%q)", tok, other)
		}
		seen[h] = tok
		sum := sha256.Sum256([]byte(tok))
		parsed, err := parseTokenHash(h)
		if err != nil || parsed != sum {
			t.Errorf("parseTokenHash(HashToken(%q)) = %x, %v; want %s", tok, parsed, err, hex.EncodeToString(sum[:]))
		}
	}
}

func TestPatternMatches(t *testing.T) {
	tests := []struct {
		grant string
		name  string
		want  bool
	}{
		{"news", "news", true},
		{"news", "news.sport", false},
		{"news", "new", false},
		{"news", "NEWS", false},
		{"news", "", false},
		{"news.*", "news.sport", true},
		{"news.*", "news.sport.eu", true},
		{"news.*", "news.", true},
		{"news.*", "news", false},
		{"news.*", "newsx", false},
		{"news.*", "xnews.sport", false},
		{"news*", "newsletter", true},
		{"news*", "news", true},
		{"news*", "new", false},
		{"*", "anything", true},
		{"*", "a", true},
		{"task:prodcons:queue", "task:prodcons:queue", true},
		{"task:*", "task:prodcons:queue", true},
	}
	for _, tt := range tests {
		p, err := compilePattern("queue", tt.grant)
		if err != nil {
			t.Fatalf("compilePattern(%q): %v", tt.grant, err)
		}
		if got := p.matches(tt.name); got != tt.want {
			t.Errorf("grant %q matches %q = %v, want %v", tt.grant, tt.name, got, tt.want)
		}
	}
}

func TestPatternCovers(t *testing.T) {
	tests := []struct {
		grant string
		glob  string
		want  bool
	}{
		{"news.*", "news.*", true},
		{"news.*", "news.sport.?", true},
		{"news.*", "news.[ab]", true},
		{"news.*", "news.[ab]*", true},
		{"news.*", "news.sport", true}, // no glob characters: one channel
		{"news.*", "news.", true},
		{"news.*", `news.\*`, true},
		{"news.*", "news.s[^x]ort*", true},
		{"news.*", "n*", false},
		{"news.*", "*", false},
		{"news.*", "new?", false},
		{"news.*", "news", false},
		{"news.*", "news*", false},
		{"news.*", "news?sport", false},
		{"news.*", "news[.]sport", false},
		{"news.*", `news\.sport`, false},
		{"news.*", "?news.sport", false},
		{"news.*", "[n]ews.sport", false},
		{"news.*", "newsroom.*", false},
		{"news", "news", true},
		{"news", "news.*", false},
		{"news", "news?", false},
		{"news", "new[s]", false},
		{"news", "news*", false},
		{"news", "n*", false},
		{"news", "*", false},
		{"news", "news.sport", false},
		{"news", `news\`, false},
		{"*", "*", true},
		{"*", "?", true},
		{"*", "[a-z]*", true},
		{"*", "anything", true},
		{"*", `\*`, true},
		{"*", "^", true},
		{"news*", "news*", true},
		{"news*", "newsletter.?", true},
		{"news*", "news.*", true},
		{"news*", "new*", false},
		{"news*", "ne[w]s*", false},
	}
	for _, tt := range tests {
		p, err := compilePattern("channel", tt.grant)
		if err != nil {
			t.Fatalf("compilePattern(%q): %v", tt.grant, err)
		}
		if got := p.covers(tt.glob); got != tt.want {
			t.Errorf("grant %q covers %q = %v, want %v", tt.grant, tt.glob, got, tt.want)
		}
	}
}

// TestMethodsCoverServices checks that every QueueService and AdminService
// method has a rule, and that every rule names a real method.
func TestMethodsCoverServices(t *testing.T) {
	want := map[string]bool{}
	for _, sd := range []grpc.ServiceDesc{qbridgev1.QueueService_ServiceDesc, qbridgev1.AdminService_ServiceDesc} {
		var names []string
		for _, m := range sd.Methods {
			names = append(names, m.MethodName)
		}
		for _, s := range sd.Streams {
			names = append(names, s.StreamName)
		}
		if len(names) == 0 {
			t.Fatalf("service %s has no methods", sd.ServiceName)
		}
		for _, n := range names {
			full := "/" + sd.ServiceName + "/" + n
			want[full] = true
			r, ok := methods[full]
			if !ok {
				t.Errorf("method %s has no authorization rule in methods", full)
				continue
			}
			if len(r.perms) == 0 {
				t.Errorf("method %s: rule lists no permissions", full)
			}
			if r.check == nil && r.scope == nil {
				t.Errorf("method %s: rule has neither a check nor a scope", full)
			}
		}
	}
	var extra []string
	for m := range methods {
		if !want[m] {
			extra = append(extra, m)
		}
	}
	sort.Strings(extra)
	if len(extra) > 0 {
		t.Errorf("methods has rules for methods of neither service: %v", extra)
	}
}

// TestRuleTargets checks what each rule's check extracts from a request.
func TestRuleTargets(t *testing.T) {
	tok := func(queue string) string {
		// Wire form of an ack token (see server/token.go): "v1." and
		// base64url of length-prefixed queue, lease id, instance, and a
		// varint consumer number.
		b := []byte{byte(len(queue))}
		b = append(b, queue...)
		b = append(b, 2, '4', '2', 1, 'i', 7)
		return "v1." + base64.RawURLEncoding.EncodeToString(b)
	}
	tests := []struct {
		method string
		req    any
		want   []target
	}{
		{qbridgev1.QueueService_Enqueue_FullMethodName, &qbridgev1.EnqueueRequest{Queue: "a"}, []target{{name: "a"}}},
		{qbridgev1.QueueService_Enqueue_FullMethodName, &qbridgev1.EnqueueRequest{Queue: "a b"}, nil},
		{qbridgev1.QueueService_Consume_FullMethodName, &qbridgev1.ConsumeRequest{Queues: []string{"a", "b"}}, []target{{name: "a"}, {name: "b"}}},
		{qbridgev1.QueueService_Consume_FullMethodName, &qbridgev1.ConsumeRequest{Queue: "a", Queues: []string{"b"}}, []target{{name: "a"}, {name: "b"}}},
		{qbridgev1.QueueService_Ack_FullMethodName, &qbridgev1.AckRequest{AckTokens: []string{tok("a"), tok("b"), tok("a"), "v1.!!"}}, []target{{name: "a"}, {name: "b"}}},
		{qbridgev1.QueueService_Nack_FullMethodName, &qbridgev1.NackRequest{AckTokens: []string{tok("q.1")}}, []target{{name: "q.1"}}},
		{qbridgev1.QueueService_ExtendLease_FullMethodName, &qbridgev1.ExtendLeaseRequest{AckTokens: []string{tok("q.2")}}, []target{{name: "q.2"}}},
		{qbridgev1.QueueService_Subscribe_FullMethodName, &qbridgev1.SubscribeRequest{Channels: []string{"c"}, Patterns: []string{"n*", "a b"}}, []target{{name: "c"}, {name: "n*", pattern: true}}},
		{qbridgev1.QueueService_Publish_FullMethodName, &qbridgev1.PublishRequest{Channel: "c"}, []target{{name: "c"}}},
		{qbridgev1.AdminService_PurgeQueue_FullMethodName, &qbridgev1.PurgeQueueRequest{Queue: "a"}, []target{{name: "a"}}},
		{qbridgev1.AdminService_PurgeQueue_FullMethodName, &qbridgev1.EnqueueRequest{Queue: "a"}, nil}, // wrong type: nothing
	}
	for _, tt := range tests {
		got := methods[tt.method].check(tt.req)
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s(%v): targets %v, want %v", tt.method, tt.req, got, tt.want)
		}
	}
}

func TestPrincipalNameOutsideACall(t *testing.T) {
	if n := PrincipalName(context.Background()); n != "" {
		t.Fatalf("PrincipalName of a context without a call = %q, want empty", n)
	}
}

// TestAnonymousUsageSweep checks that the per-IP state of callers without a
// principal is dropped once idle, unless a stream is still open.
func TestAnonymousUsageSweep(t *testing.T) {
	g, err := New(Config{Defaults: Limits{RequestsPerSecond: 1}})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_000_000, 0)
	g.now = func() time.Time { return now }
	a := g.anonymousUsage("10.0.0.1")
	busy := g.anonymousUsage("10.0.0.2")
	if g.anonymousUsage("10.0.0.1") != a {
		t.Fatal("the same IP got a new usage")
	}
	busy.streams = 1
	now = now.Add(anonymousIdle + time.Second)
	g.anonymousUsage("10.0.0.3") // a new IP triggers the sweep
	g.mu.Lock()
	_, keptA := g.anonymous["10.0.0.1"]
	_, keptBusy := g.anonymous["10.0.0.2"]
	n := len(g.anonymous)
	g.mu.Unlock()
	if keptA || !keptBusy || n != 2 {
		t.Fatalf("after the sweep: idle kept %v, busy kept %v, %d entries; want false, true, 2", keptA, keptBusy, n)
	}
}

// redisGlobMatch reports whether Redis matches s against the glob pattern,
// following stringmatchlen (util.c) case-sensitively: * ? [abc] [^a]
// [a-z] (ends swapped when reversed), \ escapes (inside and outside
// classes), an unclosed [ running to the end of the pattern.
func redisGlobMatch(pattern, s string) bool {
	skip := false
	return globMatch(pattern, s, &skip, 0)
}

func globMatch(p, s string, skipLonger *bool, nesting int) bool {
	if nesting > 1000 { // Redis gives up here too
		return false
	}
	for len(p) > 0 && len(s) > 0 {
		switch p[0] {
		case '*':
			for len(p) > 1 && p[1] == '*' {
				p = p[1:]
			}
			if len(p) == 1 {
				return true
			}
			for len(s) > 0 {
				if globMatch(p[1:], s, skipLonger, nesting+1) {
					return true
				}
				if *skipLonger {
					return false
				}
				s = s[1:]
			}
			*skipLonger = true
			return false
		case '?':
			p, s = p[1:], s[1:]
		case '[':
			q := p[1:]
			not := len(q) > 0 && q[0] == '^'
			if not {
				q = q[1:]
			}
			match := false
		class:
			for len(q) > 0 { // unclosed: the class runs to the end
				switch {
				case q[0] == '\\' && len(q) >= 2:
					if q[1] == s[0] {
						match = true
					}
					q = q[2:]
				case q[0] == ']':
					q = q[1:]
					break class
				case len(q) >= 3 && q[1] == '-':
					lo, hi := q[0], q[2]
					if lo > hi {
						lo, hi = hi, lo
					}
					if lo <= s[0] && s[0] <= hi {
						match = true
					}
					q = q[3:]
				default:
					if q[0] == s[0] {
						match = true
					}
					q = q[1:]
				}
			}
			if not {
				match = !match
			}
			if !match {
				return false
			}
			p, s = q, s[1:]
		case '\\':
			if len(p) >= 2 {
				p = p[1:]
			}
			fallthrough
		default:
			if p[0] != s[0] {
				return false
			}
			p, s = p[1:], s[1:]
		}
		if len(s) == 0 {
			for len(p) > 0 && p[0] == '*' {
				p = p[1:]
			}
			break
		}
	}
	return len(p) == 0 && len(s) == 0
}

var globCases = []struct {
	glob, s string
	want    bool
}{
	{"news.*", "news.sport", true},
	{"news.*", "news.", true},
	{"news.*", "news", false},
	{"*", "x", true},
	{"*", "", false}, // the loop never runs on an empty string
	{"a*", "a", true},
	{"a**b", "ab", true},
	{"a*b*c", "axxbyyc", true},
	{"a*b*c", "axxbyy", false},
	{"?", "a", true},
	{"?", "ab", false},
	{"news.[ab]", "news.a", true},
	{"news.[ab]", "news.c", false},
	{"[^a]", "b", true},
	{"[^a]", "a", false},
	{"[a-c]x", "bx", true},
	{"[c-a]x", "bx", true}, // reversed range
	{"[a-c]x", "dx", false},
	{`\*`, "*", true},
	{`\*`, "a", false},
	{`a\`, `a\`, true}, // a trailing backslash is literal
	{`[\]]`, "]", true},
	{`[\-]`, "-", true},
	{`[\-]`, "a", false},
	{"[]a]", "a", false}, // ']' first closes an empty class
	{"[]a]", "]a]", false},
	{"ab[cd", "abc", true}, // unclosed class runs to the end
	{"ab[cd", "abd", true},
	{"ab[cd", "abcd", false},
	{"[a-]", "b", false},
	{"[a-]", "]", true}, // range ']'..'a' after the swap
	{"[^]", "x", true},
	{"x[", "x", false},
	{"x[", "xa", false},
	{"news.?port*", "news.sport.eu", true},
	{"^x", "^x", true},
	{"]", "]", true},
	{"a?c", "abc", true},
}

func TestRedisGlobMatch(t *testing.T) {
	for _, c := range globCases {
		if got := redisGlobMatch(c.glob, c.s); got != c.want {
			t.Errorf("redisGlobMatch(%q, %q) = %v, want %v", c.glob, c.s, got, c.want)
		}
	}
}

// TestRedisGlobMatchAgreesWithRedis checks the test's matcher against a
// real redis-server: KEYS uses the same stringmatchlen as PSUBSCRIBE.
func TestRedisGlobMatchAgreesWithRedis(t *testing.T) {
	rs := redistest.Start(t)
	rdb := rs.Client(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	keys := map[string]bool{}
	for _, c := range globCases {
		if c.s != "" {
			keys[c.s] = true
		}
	}
	for _, extra := range []string{"news.a", "news.b", "news.sport.x", "n", "newsroom", "a]", "-", "*", "?", "[", `\`, "ab", "abcd", "axbxc", "^", "b", "x"} {
		keys[extra] = true
	}
	var all []string
	for k := range keys {
		if err := rdb.Set(ctx, k, "1", 0).Err(); err != nil {
			t.Fatal(err)
		}
		all = append(all, k)
	}
	globs := map[string]bool{}
	for _, c := range globCases {
		globs[c.glob] = true
	}
	for _, extra := range []string{"news.*", "n*", "*a*", "[a-]*", `\?`, `[\`, "[^a-c]*", "?]", "a*[cd]"} {
		globs[extra] = true
	}
	for glob := range globs {
		got, err := rdb.Keys(ctx, glob).Result()
		if err != nil {
			t.Fatalf("KEYS %q: %v", glob, err)
		}
		var want []string
		for _, k := range all {
			if redisGlobMatch(glob, k) {
				want = append(want, k)
			}
		}
		sort.Strings(got)
		sort.Strings(want)
		if !slices.Equal(got, want) {
			t.Errorf("glob %q: redis matches %q, the test's matcher %q", glob, got, want)
		}
	}
}

// FuzzSubscribeCoverage checks that covers is sound: when a subscribe grant
// covers a Subscribe pattern, every channel the pattern matches in Redis is
// one the grant matches.
func FuzzSubscribeCoverage(f *testing.F) {
	seeds := []struct{ prefix, glob, fill string }{
		{"news.", "news.*", "sport"},
		{"news.", "news.sport.?", "x"},
		{"news.", "news.[ab]", "a"},
		{"news.", "news.[ab]*", "b.eu"},
		{"news.", "n*", "ews.x"},
		{"news.", "*", "news.x"},
		{"news.", "new?", "s"},
		{"news.", `news.\*`, "*"},
		{"news.", `news\.x`, ".x"},
		{"news", "news", ""},
		{"news", "news?", "x"},
		{"", "*", "anything"},
		{"", "?", "z"},
		{"a", "a[^b]c", "x"},
		{"a", "a[a-z]", "q"},
		{"ab", "ab[", "c"},
		{"x", `x\`, `\`},
		{"q", `q[\]]`, "]"},
		{"q", "q[z-a]", "m"},
		{"news.", "news.[", "["},
		{"o", "o]", "]"},
		{"o", "o^", "^"},
		{"a", "a*b*c", "xbyc"},
		{"[", "[a]", "a"},
		{"*", "*", "*"},
	}
	for _, s := range seeds {
		f.Add(s.prefix, s.glob, s.fill)
	}
	f.Fuzz(func(t *testing.T, prefix, glob, fill string) {
		if len(glob) > 64 || len(fill) > 64 || len(prefix) > 64 {
			return // long inputs find nothing new and slow the matcher
		}
		for _, p := range []pattern{{text: prefix, prefix: true}, {text: prefix}} {
			if !p.covers(glob) {
				continue
			}
			for _, ch := range channelsFor(prefix, glob, fill) {
				if redisGlobMatch(glob, ch) && !p.matches(ch) {
					t.Fatalf("grant %+v covers pattern %q, which matches channel %q, which the grant does not match", p, glob, ch)
				}
			}
		}
	})
}

// channelsFor builds channels to try against glob: the fuzzer's fill as is,
// after the prefix and after the glob's literal start, and the glob with
// its wildcards filled in from fill.
func channelsFor(prefix, glob, fill string) []string {
	lit := glob
	if i := strings.IndexAny(glob, `*?[\`); i >= 0 {
		lit = glob[:i]
	}
	chs := []string{fill, prefix + fill, lit + fill, glob, instantiate(glob, fill), instantiate(glob, "")}
	for i := 0; i <= len(fill); i++ {
		chs = append(chs, lit+fill[:i], instantiate(glob, fill[i:]))
	}
	return chs
}

// instantiate turns glob into a channel it is likely to match: each * takes
// a byte of fill (or nothing), ? and classes take a byte of fill or a
// class member, escapes their character.
func instantiate(glob, fill string) string {
	var b strings.Builder
	next := func(def byte) byte {
		if fill == "" {
			return def
		}
		c := fill[0]
		fill = fill[1:]
		return c
	}
	for i := 0; i < len(glob); i++ {
		switch c := glob[i]; c {
		case '*':
			if fill != "" {
				b.WriteByte(next('x'))
			}
		case '?':
			b.WriteByte(next('x'))
		case '[':
			j := i + 1
			if j < len(glob) && glob[j] == '^' {
				b.WriteByte(next('x'))
				for j < len(glob) && glob[j] != ']' {
					j++
				}
				i = j
				continue
			}
			if j < len(glob) && glob[j] == '\\' && j+1 < len(glob) {
				j++
			}
			if j < len(glob) {
				b.WriteByte(glob[j])
			}
			for j < len(glob) && glob[j] != ']' {
				j++
			}
			i = j
		case '\\':
			if i+1 < len(glob) {
				i++
			}
			b.WriteByte(glob[i])
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}
