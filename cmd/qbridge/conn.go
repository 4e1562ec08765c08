package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"

	"golang.org/x/term"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/qbridge/qbridge/client"
)

// client returns the connection to the server, dialling it on first use.
// Like grpc.NewClient, dialling does not connect: connection errors come
// from the first call, as UNAVAILABLE (exit 3).
func (a *app) client() (*client.Client, error) {
	if a.c != nil {
		return a.c, nil
	}
	var opts []client.Option
	if (a.certFile == "") != (a.keyFile == "") {
		return nil, usageErrorf("--cert-file and --key-file go together; give both or neither")
	}
	if a.useTLS || a.caFile != "" || a.certFile != "" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if a.certFile != "" {
			cert, err := tls.LoadX509KeyPair(a.certFile, a.keyFile)
			if err != nil {
				return nil, usageErrorf("--cert-file/--key-file: %v", err)
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		if a.caFile != "" {
			pem, err := os.ReadFile(a.caFile)
			if err != nil {
				return nil, usageErrorf("--ca-file: %v", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, usageErrorf("--ca-file %s: no PEM certificate in it", a.caFile)
			}
			cfg.RootCAs = pool
		}
		opts = append(opts, client.WithTransportCredentials(credentials.NewTLS(cfg)))
	}
	if a.token != "" {
		opts = append(opts, client.WithDialOptions(grpc.WithPerRPCCredentials(bearerToken(a.token))))
	}
	c, err := client.Dial(a.addr, opts...)
	if err != nil {
		return nil, usageErrorf("--addr %q: %v", a.addr, err)
	}
	a.c = c
	return c, nil
}

// bearerToken sends "authorization: Bearer <token>" with every call.
type bearerToken string

func (t bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// RequireTransportSecurity is false so that a token also works over a
// plaintext connection (to a server on localhost, or behind a proxy that
// terminates TLS); use --tls to protect it on the network.
func (bearerToken) RequireTransportSecurity() bool { return false }

// isTerminal reports whether f is a terminal.
func isTerminal(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }

// termWidth returns the width of the terminal f, or def.
func termWidth(f any, def int) int {
	file, ok := f.(*os.File)
	if !ok {
		return def
	}
	w, _, err := term.GetSize(int(file.Fd()))
	if err != nil || w <= 0 {
		return def
	}
	return w
}
