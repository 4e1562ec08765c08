package auth

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"strings"
	"time"

	grpcauth "github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

type callerKey struct{}

// caller is who made a call, as set by authentication.
type caller struct {
	p     *principal
	usage *usage
	via   string // "token", "certificate" or "" (no credentials)
}

// PrincipalName returns the name of the principal that made the call in ctx:
// "" before authentication, "anonymous" for callers without one.
func PrincipalName(ctx context.Context) string {
	if c, ok := ctx.Value(callerKey{}).(*caller); ok {
		return c.p.name
	}
	return ""
}

// UnaryInterceptors returns the guard's unary interceptors, to be chained in
// this order after logging and before the handler: authentication (the
// go-grpc-middleware auth interceptor), then limits and authorization.
func (g *Guard) UnaryInterceptors() []grpc.UnaryServerInterceptor {
	return []grpc.UnaryServerInterceptor{grpcauth.UnaryServerInterceptor(g.authenticate), g.unary}
}

// StreamInterceptors is UnaryInterceptors for streaming calls.
func (g *Guard) StreamInterceptors() []grpc.StreamServerInterceptor {
	return []grpc.StreamServerInterceptor{grpcauth.StreamServerInterceptor(g.authenticate), g.stream}
}

const (
	healthPrefix      = "/grpc.health.v1.Health/"
	reflectionPrefix  = "/grpc.reflection.v1.ServerReflection/"
	reflectionAlpha   = "/grpc.reflection.v1alpha.ServerReflection/"
	anonymousName     = "anonymous"
	unauthenticatedTo = "send the metadata 'authorization: Bearer <token>'"
)

// infrastructure reports whether method belongs to health checking or
// reflection, which any authenticated caller may use; public says whether
// callers without credentials may use it too.
func (g *Guard) infrastructure(method string) (infra, public bool) {
	switch {
	case strings.HasPrefix(method, healthPrefix):
		return true, g.cfg.PublicHealth
	case strings.HasPrefix(method, reflectionPrefix), strings.HasPrefix(method, reflectionAlpha):
		return true, g.cfg.PublicReflection
	}
	return false, false
}

// authenticate is the grpcauth.AuthFunc: it finds the principal of the call
// from its bearer token or its verified client certificate.
func (g *Guard) authenticate(ctx context.Context) (context.Context, error) {
	method, _ := grpc.Method(ctx)
	if !g.enabled {
		u := g.anonymousUsage(clientIP(ctx))
		return context.WithValue(ctx, callerKey{}, &caller{p: &principal{name: anonymousName, all: true}, usage: u}), nil
	}
	if vals := metadata.ValueFromIncomingContext(ctx, "authorization"); len(vals) > 0 {
		scheme, token, _ := strings.Cut(vals[0], " ")
		if !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(token) == "" {
			return g.reject(ctx, method, "authorization metadata is not a bearer token",
				"the authorization metadata must be 'Bearer <token>'")
		}
		p := g.byToken[sha256.Sum256([]byte(strings.TrimSpace(token)))]
		if p == nil {
			return g.reject(ctx, method, "unknown bearer token",
				"the bearer token is not one this server knows: check the token, or have its hash added to a principal in qbridged's config")
		}
		return context.WithValue(ctx, callerKey{}, &caller{p: p, usage: p.usage, via: "token"}), nil
	}
	if p := g.fromCertificate(ctx); p != nil {
		return context.WithValue(ctx, callerKey{}, &caller{p: p, usage: p.usage, via: "certificate"}), nil
	}
	if infra, public := g.infrastructure(method); infra && public {
		u := g.anonymousUsage(clientIP(ctx))
		return context.WithValue(ctx, callerKey{}, &caller{p: &principal{name: anonymousName, public: true}, usage: u}), nil
	}
	msg := "this server requires authentication: " + unauthenticatedTo
	if len(g.byCert) > 0 {
		msg += " or connect with a client certificate named in its config"
	}
	return g.reject(ctx, method, "no credentials", msg)
}

// reject fails a call that could not be authenticated. Failures count
// against the client IP's default request rate, so that guessing tokens is
// throttled like any other flood (and beyond the rate, not logged).
func (g *Guard) reject(ctx context.Context, method, why, msg string) (context.Context, error) {
	c := &caller{p: &principal{name: anonymousName}, usage: g.anonymousUsage(clientIP(ctx))}
	if err := g.admit(c, nil); err != nil {
		return nil, err
	}
	g.log.WarnContext(ctx, "unauthenticated call: "+why, "method", method, "peer", peerAddr(ctx))
	return nil, status.Error(codes.Unauthenticated, msg)
}

// fromCertificate returns the principal named by the verified client
// certificate of the call's connection, if any.
func (g *Guard) fromCertificate(ctx context.Context) *principal {
	if len(g.byCert) == 0 {
		return nil
	}
	pr, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	ti, ok := pr.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return nil
	}
	leaf := ti.State.VerifiedChains[0][0]
	names := []string{leaf.Subject.CommonName}
	names = append(names, leaf.DNSNames...)
	names = append(names, leaf.EmailAddresses...)
	for _, u := range leaf.URIs {
		names = append(names, u.String())
	}
	for _, n := range names {
		if p := g.byCert[n]; p != nil && n != "" {
			return p
		}
	}
	return nil
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

func clientIP(ctx context.Context) string {
	a := peerAddr(ctx)
	if host, _, err := net.SplitHostPort(a); err == nil {
		return host
	}
	return a
}

func callerOf(ctx context.Context) *caller {
	c, _ := ctx.Value(callerKey{}).(*caller)
	return c
}

// unary applies limits and authorization to a unary call.
func (g *Guard) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	c := callerOf(ctx)
	if c == nil {
		return nil, status.Error(codes.Internal, "qbridge: authorization ran before authentication")
	}
	notePrincipal(ctx, c.p.name)
	if err := g.admit(c, req); err != nil {
		return nil, err
	}
	r, err := g.authorize(ctx, c, info.FullMethod, req)
	if err != nil {
		return nil, err
	}
	if r.scope != nil && !c.p.all {
		ctx = r.scope(ctx, c.p)
	}
	return handler(ctx, req)
}

// stream applies limits to a streaming call, and authorization to each
// message it receives.
func (g *Guard) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	c := callerOf(ss.Context())
	if c == nil {
		return status.Error(codes.Internal, "qbridge: authorization ran before authentication")
	}
	notePrincipal(ss.Context(), c.p.name)
	if err := g.admit(c, nil); err != nil {
		return err
	}
	if infra, _ := g.infrastructure(info.FullMethod); !infra && c.p.public {
		return g.deny(ss.Context(), c, info.FullMethod, "this method needs credentials")
	}
	release, err := g.openStream(c)
	if err != nil {
		return err
	}
	defer release()
	return handler(srv, &guardedStream{ServerStream: ss, g: g, c: c, method: info.FullMethod})
}

type guardedStream struct {
	grpc.ServerStream
	g      *Guard
	c      *caller
	method string
}

func (s *guardedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if err := s.g.admitBytes(s.c, m); err != nil {
		return err
	}
	_, err := s.g.authorize(s.Context(), s.c, s.method, m)
	return err
}

func messageSize(m any) int {
	if pm, ok := m.(proto.Message); ok {
		return proto.Size(pm)
	}
	return 0
}

// authorize checks that the caller may make this request; it returns the
// method's rule (for response filtering).
func (g *Guard) authorize(ctx context.Context, c *caller, method string, req any) (rule, error) {
	if infra, _ := g.infrastructure(method); infra {
		return rule{}, nil
	}
	if c.p.public {
		return rule{}, g.deny(ctx, c, method, "this method needs credentials")
	}
	r, ok := methods[method]
	var targets []target
	if ok && r.check != nil {
		targets = r.check(req)
		if len(targets) > 0 {
			kind := "queue"
			if r.perms[0].onChannels() {
				kind = "channel"
			}
			noteTarget(ctx, kind, targets[0].name)
		}
	}
	if c.p.all {
		return r, nil
	}
	if !ok {
		return r, g.deny(ctx, c, method, "the method is not covered by qbridge's authorization")
	}
	if r.check == nil { // ListQueues: any admin grant; the response is filtered
		if !c.p.hasAny(r.perms[0]) {
			return r, g.deny(ctx, c, method, fmt.Sprintf("it holds no %s permission on any queue", r.perms[0]))
		}
		return r, nil
	}
	for _, t := range targets {
		if !c.p.may(r.perms, t.name, t.pattern) {
			what := "queue"
			if r.perms[0].onChannels() {
				what = "channel"
			}
			if t.pattern {
				what = "channel pattern"
			}
			return r, g.deny(ctx, c, method, fmt.Sprintf("it has no %s permission on %s %q", permList(r.perms), what, t.name))
		}
	}
	return r, nil
}

func permList(ps []Permission) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = string(p)
	}
	return strings.Join(s, " or ")
}

// deny logs a refused call with the principal (never a credential) and
// returns its PERMISSION_DENIED status.
func (g *Guard) deny(ctx context.Context, c *caller, method, why string) error {
	g.log.WarnContext(ctx, "permission denied", "principal", c.p.name, "method", method, "reason", why, "peer", peerAddr(ctx))
	return status.Errorf(codes.PermissionDenied, "principal %q may not call %s: %s; grants are set in qbridged's config", c.p.name, method, why)
}

// admit takes one request, and the size of msg (nil: none), from the
// caller's rates.
func (g *Guard) admit(c *caller, msg any) error {
	u := c.usage
	if u.req != nil {
		now := g.now()
		r := u.req.ReserveN(now, 1)
		if d := r.DelayFrom(now); !r.OK() || d > 0 {
			r.CancelAt(now)
			return exhausted(fmt.Sprintf("principal %q is over its request rate of %g/s (burst %d)", c.p.name, u.limits.RequestsPerSecond, u.req.Burst()), d)
		}
	}
	return g.admitBytes(c, msg)
}

// admitBytes takes msg's size from the caller's byte rate. The size is only
// computed when there is a byte rate: it walks the whole message.
func (g *Guard) admitBytes(c *caller, msg any) error {
	u := c.usage
	if u.bytes == nil || msg == nil {
		return nil
	}
	size := messageSize(msg)
	if size <= 0 {
		return nil
	}
	now := g.now()
	if size > u.bytes.Burst() {
		return status.Errorf(codes.ResourceExhausted, "the request of %d bytes is larger than principal %q may send at once (%d bytes; its bytes-per-second); send smaller requests", size, c.p.name, u.bytes.Burst())
	}
	r := u.bytes.ReserveN(now, size)
	if d := r.DelayFrom(now); !r.OK() || d > 0 {
		r.CancelAt(now)
		return exhausted(fmt.Sprintf("principal %q is over its byte rate of %g bytes/s (this request: %d bytes)", c.p.name, u.limits.BytesPerSecond, size), d)
	}
	return nil
}

func exhausted(msg string, retry time.Duration) error {
	if retry <= 0 {
		retry = time.Second
	}
	st := status.New(codes.ResourceExhausted, fmt.Sprintf("%s; retry in %v", msg, retry.Round(time.Millisecond)))
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(retry)}); err == nil {
		st = d
	}
	return st.Err()
}

// openStream counts a stream against the caller's bound; release uncounts it.
func (g *Guard) openStream(c *caller) (release func(), err error) {
	if c.usage.limits.MaxStreams == 0 {
		return func() {}, nil // unbounded: no need to count (nor to lock)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	u := c.usage
	if u.limits.MaxStreams > 0 && u.streams >= u.limits.MaxStreams {
		return nil, status.Errorf(codes.ResourceExhausted, "principal %q already has %d streams open, its limit; end one before opening another", c.p.name, u.streams)
	}
	u.streams++
	return func() {
		g.mu.Lock()
		u.streams--
		u.last = g.now()
		g.mu.Unlock()
	}, nil
}
