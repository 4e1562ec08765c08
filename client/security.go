package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// WithToken sends "authorization: Bearer <token>" with every call, for a
// qbridged whose config names principals by token. The token also travels
// over a plaintext connection (to a server on localhost, or behind a proxy
// that terminates TLS); use WithTLS to protect it on a network.
func WithToken(token string) Option {
	return func(c *dialConfig) { c.extra = append(c.extra, grpc.WithPerRPCCredentials(bearerToken(token))) }
}

// WithTLS connects with TLS. caFile holds the PEM CA certificates that
// verify the server ("" for the system's); certFile and keyFile are the
// client certificate and key for mutual TLS ("" for none). Dial fails when a
// file cannot be read.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(c *dialConfig) {
		cfg, err := TLSConfig(caFile, certFile, keyFile)
		if err != nil {
			c.err = err
			return
		}
		c.creds = credentials.NewTLS(cfg)
	}
}

// TLSConfig builds the client TLS configuration WithTLS uses.
func TLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if (certFile == "") != (keyFile == "") {
		return nil, fmt.Errorf("qbridge: a client certificate needs both its certificate and key file")
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("qbridge: client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("qbridge: CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("qbridge: CA file %s holds no PEM certificate", caFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// bearerToken is the per-call credential of WithToken.
type bearerToken string

func (t bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// RequireTransportSecurity is false: see WithToken.
func (bearerToken) RequireTransportSecurity() bool { return false }
