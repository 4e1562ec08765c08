package auth

import (
	"context"
	"sync"

	"google.golang.org/grpc"
)

// Call logging wants to say who called and on what queue or channel, but
// the request logger runs outside the guard, which learns both. A callInfo
// placed in the context before the logger (CallInfoUnary/CallInfoStream,
// outermost in the chain) is filled in by the guard and read by the logger
// when the call finishes (CallFields).

type callInfoKey struct{}

type callInfo struct {
	mu        sync.Mutex
	principal string
	kind      string // "queue" or "channel"
	target    string // the first queue or channel the request names
}

// CallInfoUnary puts an empty call record in the context of each unary
// call; chain it before the logging interceptor.
func CallInfoUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	return handler(context.WithValue(ctx, callInfoKey{}, &callInfo{}), req)
}

// CallInfoStream is CallInfoUnary for streams.
func CallInfoStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, &ctxStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), callInfoKey{}, &callInfo{})})
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// CallFields returns the principal and the queue or channel of the call in
// ctx as slog key-value pairs (none when unknown). Never a credential.
func CallFields(ctx context.Context) []any {
	ci, ok := ctx.Value(callInfoKey{}).(*callInfo)
	if !ok {
		return nil
	}
	ci.mu.Lock()
	defer ci.mu.Unlock()
	var f []any
	if ci.principal != "" {
		f = append(f, "principal", ci.principal)
	}
	if ci.target != "" {
		f = append(f, ci.kind, ci.target)
	}
	return f
}

func notePrincipal(ctx context.Context, name string) {
	if ci, ok := ctx.Value(callInfoKey{}).(*callInfo); ok {
		ci.mu.Lock()
		ci.principal = name
		ci.mu.Unlock()
	}
}

func noteTarget(ctx context.Context, kind, name string) {
	if ci, ok := ctx.Value(callInfoKey{}).(*callInfo); ok {
		ci.mu.Lock()
		if ci.target == "" {
			ci.kind, ci.target = kind, name
		}
		ci.mu.Unlock()
	}
}
