// Package auth guards qbridge's gRPC API. It authenticates each call (a
// bearer token, or the verified client certificate of a mutual-TLS
// connection), authorizes each request against the caller's grants (queue
// and channel name patterns, each with permissions), and enforces
// per-principal request, byte and open-stream limits.
//
// # Principals and grants
//
// A principal is a named caller. It is known by the SHA-256 hashes of its
// bearer tokens (the server never stores a token) and/or by names in its
// client certificate (subject common name, DNS, URI or e-mail SANs). A grant
// gives permissions on queues or channels named by patterns:
//
//	produce    Enqueue, EnqueueBatch                               (queues)
//	consume    Consume, Ack, Nack, ExtendLease                     (queues)
//	admin      every AdminService call on the queue; ListQueues     (queues)
//	           lists only the queues the caller administers
//	publish    Publish                                             (channels)
//	subscribe  Subscribe                                           (channels)
//
// Any queue permission also allows GetQueueStats and GetMessage on that
// queue; produce or consume allows GetResult.
//
// A pattern is a name, a name prefix followed by "*" ("orders.*" matches
// "orders.eu" and "orders.us.east"), or "*" alone (everything). No other glob
// characters are allowed, so what a grant covers is plain to see.
//
// A Subscribe pattern (a Redis glob such as "news.[ab]*") is allowed only
// when every channel it could match is allowed: when a subscribe grant's
// prefix is a prefix of the pattern's literal start (the characters before
// its first glob character). So "news.*" covers the patterns "news.*" and
// "news.sport.?", but not "n*".
//
// Everything not granted is denied with PERMISSION_DENIED, logged with the
// principal's name (never a token). A call to a method the guard does not
// know is denied too.
//
// # Limits
//
// Each principal has a token-bucket request rate (every unary call and every
// stream opened counts one), a byte rate (the size of each request message),
// and a bound on its open streams. Over a rate, a call fails with
// RESOURCE_EXHAUSTED and a RetryInfo detail saying when to try again; past
// the stream bound, the new stream fails with RESOURCE_EXHAUSTED. Callers
// without a principal (authentication off, or public health and reflection
// calls) are limited per client IP address with the default limits.
package auth

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/qbridge/qbridge/server"
)

// Permission is one kind of access a grant gives.
type Permission string

// The permissions. Produce, Consume and Admin apply to queues; Publish and
// Subscribe to channels.
const (
	Produce   Permission = "produce"
	Consume   Permission = "consume"
	Admin     Permission = "admin"
	Publish   Permission = "publish"
	Subscribe Permission = "subscribe"
)

func (p Permission) onQueues() bool   { return p == Produce || p == Consume || p == Admin }
func (p Permission) onChannels() bool { return p == Publish || p == Subscribe }

// Grant gives the permissions in Allow on the queues and channels matching
// the patterns in Queues and Channels.
type Grant struct {
	Queues   []string     `toml:"queues"`
	Channels []string     `toml:"channels"`
	Allow    []Permission `toml:"allow"`
}

// Limits bound what one principal may use. Zero means unlimited.
type Limits struct {
	// RequestsPerSecond is the sustained rate of unary calls and stream
	// openings; RequestBurst how many may come at once (at least 1; 0
	// takes max(1, RequestsPerSecond)).
	RequestsPerSecond float64
	RequestBurst      int
	// BytesPerSecond is the sustained rate of request bytes. The burst is
	// one second's worth, but at least MaxMessageBytes of the Guard, so
	// that a single largest message always fits.
	BytesPerSecond float64
	// MaxStreams bounds the Consume, Subscribe and other streams the
	// principal has open at once, across all its connections.
	MaxStreams int
}

// Principal is a named caller and what it may do.
type Principal struct {
	Name string
	// TokenHashes are HashToken values of the principal's bearer tokens.
	TokenHashes []string
	// CertNames identify the principal by its client certificate: the
	// subject common name, or any DNS, URI or e-mail SAN, of a
	// certificate verified against the server's client CA.
	CertNames []string
	Grants    []Grant
	Limits    Limits
}

// Config is what a Guard enforces.
type Config struct {
	// Principals are the known callers. With none, authentication is off:
	// every caller may do everything (limited per client IP by Defaults).
	Principals []Principal
	// Defaults are the limits of callers without a principal.
	Defaults Limits
	// PublicHealth lets callers without credentials use the gRPC health
	// service; PublicReflection, server reflection (grpcurl's list and
	// describe).
	PublicHealth     bool
	PublicReflection bool
	// MaxMessageBytes is the largest request message the server accepts;
	// byte-rate bursts are never smaller.
	MaxMessageBytes int
}

// tokenHashPrefix starts every HashToken value.
const tokenHashPrefix = "sha256:"

// HashToken returns the form in which a bearer token is configured:
// "sha256:" and the hex SHA-256 of the token. Tokens should be long random
// strings (`qbridge token new` draws 256 bits); a fast hash is then as safe
// as a slow one.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return tokenHashPrefix + hex.EncodeToString(sum[:])
}

// parseTokenHash parses a configured token hash. Its errors never quote
// the value: it might be a token pasted by mistake.
func parseTokenHash(s string) ([32]byte, error) {
	var h [32]byte
	hexPart, ok := strings.CutPrefix(strings.TrimSpace(s), tokenHashPrefix)
	if !ok {
		return h, fmt.Errorf("a token hash does not start with %q: configure the output of `qbridge token hash`, never the token itself", tokenHashPrefix)
	}
	b, err := hex.DecodeString(hexPart)
	if err != nil || len(b) != len(h) {
		return h, fmt.Errorf("a token hash is not %q followed by 64 hex digits", tokenHashPrefix)
	}
	copy(h[:], b)
	return h, nil
}

// Guard enforces a Config. Create it with New; use its interceptors.
type Guard struct {
	log     *slog.Logger
	enabled bool
	cfg     Config

	byToken map[[32]byte]*principal
	byCert  map[string]*principal

	mu        sync.Mutex
	anonymous map[string]*usage // by client IP
	unlimited *usage            // shared by all anonymous callers when Defaults has no limits
	lastSweep time.Time
	now       func() time.Time
}

// principal is a Principal compiled for checks, with its usage.
type principal struct {
	name   string
	all    bool // may do everything (authentication off)
	public bool // no credentials: only public methods
	grants []grant
	usage  *usage
}

type grant struct {
	queues, channels []pattern
	allow            map[Permission]bool
}

// pattern is a compiled grant pattern: an exact name, or a prefix.
type pattern struct {
	text   string
	prefix bool
}

func (p pattern) matches(name string) bool {
	if p.prefix {
		return strings.HasPrefix(name, p.text)
	}
	return name == p.text
}

// covers reports whether every channel a Redis glob could match is matched
// by p: p is a prefix of the glob's literal start.
func (p pattern) covers(glob string) bool {
	literal := glob
	if i := strings.IndexAny(glob, `*?[]^\`); i >= 0 {
		literal = glob[:i]
	} else {
		return p.matches(glob) // no glob characters: one channel
	}
	return p.prefix && strings.HasPrefix(literal, p.text)
}

func compilePattern(what, s string) (pattern, error) {
	if s == "*" {
		return pattern{prefix: true}, nil
	}
	text, prefix := strings.CutSuffix(s, "*")
	if err := server.ValidateName(what, text); err != nil {
		return pattern{}, fmt.Errorf("pattern %q: %v (a pattern is a name, a name prefix followed by *, or * alone)", s, err)
	}
	return pattern{text: text, prefix: prefix}, nil
}

// usage is the state behind one principal's (or client IP's) limits.
type usage struct {
	limits  Limits
	req     *rate.Limiter // nil: unlimited
	bytes   *rate.Limiter // nil: unlimited
	streams int           // open streams; guarded by Guard.mu
	last    time.Time     // last use; guarded by Guard.mu (anonymous only)
}

func newUsage(l Limits, maxMessage int) *usage {
	u := &usage{limits: l}
	if l.RequestsPerSecond > 0 {
		burst := l.RequestBurst
		if burst <= 0 {
			burst = max(1, int(l.RequestsPerSecond))
		}
		u.req = rate.NewLimiter(rate.Limit(l.RequestsPerSecond), burst)
	}
	if l.BytesPerSecond > 0 {
		u.bytes = rate.NewLimiter(rate.Limit(l.BytesPerSecond), max(int(l.BytesPerSecond), maxMessage, 1))
	}
	return u
}

// Option configures a Guard.
type Option func(*Guard)

// WithLogger sets where denials are logged.
func WithLogger(l *slog.Logger) Option { return func(g *Guard) { g.log = l } }

// New checks cfg and returns its Guard. Errors name the principal and the
// setting at fault.
func New(cfg Config, opts ...Option) (*Guard, error) {
	g := &Guard{
		log:       slog.Default(),
		enabled:   len(cfg.Principals) > 0,
		cfg:       cfg,
		byToken:   map[[32]byte]*principal{},
		byCert:    map[string]*principal{},
		anonymous: map[string]*usage{},
		now:       time.Now,
	}
	for _, o := range opts {
		o(g)
	}
	if err := checkLimits("default limits", cfg.Defaults); err != nil {
		return nil, err
	}
	if cfg.Defaults == (Limits{}) {
		g.unlimited = newUsage(Limits{}, cfg.MaxMessageBytes)
	}
	var errs []error
	names := map[string]bool{}
	for i, p := range cfg.Principals {
		where := fmt.Sprintf("principal %q", p.Name)
		if p.Name == "" {
			where = fmt.Sprintf("principal #%d", i+1)
			errs = append(errs, fmt.Errorf("%s has no name", where))
		} else if names[p.Name] {
			errs = append(errs, fmt.Errorf("%s is defined twice", where))
		}
		names[p.Name] = true
		if len(p.TokenHashes) == 0 && len(p.CertNames) == 0 {
			errs = append(errs, fmt.Errorf("%s has neither tokens nor cert-names: nobody could act as it", where))
		}
		if err := checkLimits(where, p.Limits); err != nil {
			errs = append(errs, err)
		}
		cp := &principal{name: p.Name, usage: newUsage(p.Limits, cfg.MaxMessageBytes)}
		for _, t := range p.TokenHashes {
			h, err := parseTokenHash(t)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", where, err))
				continue
			}
			if other, dup := g.byToken[h]; dup {
				if other == cp {
					errs = append(errs, fmt.Errorf("%s: a token hash is listed twice", where))
				} else {
					errs = append(errs, fmt.Errorf("%s: a token hash is also given to principal %q; each token must name one principal", where, other.name))
				}
				continue
			}
			g.byToken[h] = cp
		}
		for _, n := range p.CertNames {
			if n == "" {
				errs = append(errs, fmt.Errorf("%s: empty cert name", where))
				continue
			}
			if other, dup := g.byCert[n]; dup {
				if other == cp {
					errs = append(errs, fmt.Errorf("%s: cert name %q is listed twice", where, n))
				} else {
					errs = append(errs, fmt.Errorf("%s: cert name %q is also given to principal %q", where, n, other.name))
				}
				continue
			}
			g.byCert[n] = cp
		}
		for j, gr := range p.Grants {
			c, err := compileGrant(gr)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s, grant #%d: %w", where, j+1, err))
				continue
			}
			cp.grants = append(cp.grants, c)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return g, nil
}

func checkLimits(where string, l Limits) error {
	if l.RequestsPerSecond < 0 || l.RequestBurst < 0 || l.BytesPerSecond < 0 || l.MaxStreams < 0 {
		return fmt.Errorf("%s: limits cannot be negative (0 means unlimited)", where)
	}
	return nil
}

func compileGrant(g Grant) (grant, error) {
	c := grant{allow: map[Permission]bool{}}
	if len(g.Allow) == 0 {
		return c, errors.New("allows nothing: list permissions in allow (produce, consume, admin, publish, subscribe)")
	}
	if len(g.Queues) == 0 && len(g.Channels) == 0 {
		return c, errors.New("names no queues and no channels")
	}
	for _, p := range g.Allow {
		switch {
		case p.onQueues():
			if len(g.Queues) == 0 {
				return c, fmt.Errorf("%s applies to queues, and the grant lists none", p)
			}
		case p.onChannels():
			if len(g.Channels) == 0 {
				return c, fmt.Errorf("%s applies to channels, and the grant lists none", p)
			}
		default:
			return c, fmt.Errorf("unknown permission %q (want produce, consume, admin, publish or subscribe)", p)
		}
		c.allow[p] = true
	}
	for _, q := range g.Queues {
		p, err := compilePattern("queue", q)
		if err != nil {
			return c, err
		}
		c.queues = append(c.queues, p)
	}
	for _, ch := range g.Channels {
		p, err := compilePattern("channel", ch)
		if err != nil {
			return c, err
		}
		c.channels = append(c.channels, p)
	}
	return c, nil
}

// Enabled reports whether callers must authenticate (Config has principals).
func (g *Guard) Enabled() bool { return g.enabled }

// may reports whether p holds any of perms on the queue or channel name.
// For a Subscribe pattern (isPattern), every channel it can match must be
// allowed.
func (p *principal) may(perms []Permission, name string, isPattern bool) bool {
	if p.all {
		return true
	}
	for _, g := range p.grants {
		held := false
		for _, perm := range perms {
			held = held || g.allow[perm]
		}
		if !held {
			continue
		}
		list := g.queues
		if perms[0].onChannels() {
			list = g.channels
		}
		for _, pat := range list {
			if isPattern && pat.covers(name) || !isPattern && pat.matches(name) {
				return true
			}
		}
	}
	return false
}

// hasAny reports whether p holds perm on any queue at all.
func (p *principal) hasAny(perm Permission) bool {
	if p.all {
		return true
	}
	for _, g := range p.grants {
		if g.allow[perm] {
			return true
		}
	}
	return false
}

// anonymousUsage returns the usage of callers without a principal at ip.
// Entries idle for a while are dropped now and then, so that many
// short-lived clients do not grow the map forever.
func (g *Guard) anonymousUsage(ip string) *usage {
	if g.unlimited != nil {
		return g.unlimited // no default limits: nothing to keep per IP
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	u := g.anonymous[ip]
	if u == nil {
		if now.Sub(g.lastSweep) > anonymousIdle {
			for k, v := range g.anonymous {
				if v.streams == 0 && now.Sub(v.last) > anonymousIdle {
					delete(g.anonymous, k)
				}
			}
			g.lastSweep = now
		}
		u = newUsage(g.cfg.Defaults, g.cfg.MaxMessageBytes)
		g.anonymous[ip] = u
	}
	u.last = now
	return u
}

// anonymousIdle is how long the limiter state of a client IP without a
// principal is kept after its last call.
const anonymousIdle = 5 * time.Minute
