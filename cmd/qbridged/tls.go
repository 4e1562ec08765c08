package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// tlsFiles serves the gRPC listener's certificate (and, for mTLS, the
// client CA) from files, and picks up new files without a restart: a
// handshake looks at the files' modification times (at most once a second)
// and reload (on SIGHUP) reads them at once. Connections and streams that
// are open keep the certificate they were made with; new handshakes get
// the new one. A file that cannot be read or parsed leaves the previous
// material in use, and says so in the log.
type tlsFiles struct {
	certFile, keyFile, clientCAFile string
	log                             *slog.Logger

	mu       sync.Mutex
	cert     *tls.Certificate
	clientCA *x509.CertPool
	stamp    string // modification times of the files loaded
	checked  time.Time
}

func newTLSFiles(cfg *Config, log *slog.Logger) (*tlsFiles, error) {
	f := &tlsFiles{certFile: cfg.TLSCert, keyFile: cfg.TLSKey, clientCAFile: cfg.TLSClientCA, log: log}
	if err := f.load(); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *tlsFiles) stampNow() string {
	s := ""
	for _, name := range []string{f.certFile, f.keyFile, f.clientCAFile} {
		if name == "" {
			continue
		}
		if st, err := os.Stat(name); err == nil {
			s += st.ModTime().String() + fmt.Sprint(st.Size()) + ";"
		}
	}
	return s
}

// load reads the files.
func (f *tlsFiles) load() error {
	stamp := f.stampNow()
	cert, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
	if err != nil {
		return fmt.Errorf("--tls-cert %s / --tls-key %s: %w", f.certFile, f.keyFile, err)
	}
	var pool *x509.CertPool
	if f.clientCAFile != "" {
		pem, err := os.ReadFile(f.clientCAFile)
		if err != nil {
			return fmt.Errorf("--tls-client-ca: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return errors.New("--tls-client-ca " + f.clientCAFile + ": no PEM certificate in it")
		}
	}
	f.mu.Lock()
	f.cert, f.clientCA, f.stamp = &cert, pool, stamp
	f.mu.Unlock()
	return nil
}

// reload reads the files again, keeping what is in use if they are bad.
func (f *tlsFiles) reload() {
	if err := f.load(); err != nil {
		f.log.Error("cannot reload TLS files; keeping the ones in use", "err", err)
		return
	}
	f.log.Info("TLS certificate reloaded", "cert", f.certFile)
}

// current returns the material to use, reloading first if the files
// changed since they were loaded (looked at once a second at most).
func (f *tlsFiles) current() (*tls.Certificate, *x509.CertPool) {
	f.mu.Lock()
	look := time.Since(f.checked) >= time.Second
	if look {
		f.checked = time.Now()
	}
	stamp := f.stamp
	f.mu.Unlock()
	if look && f.stampNow() != stamp {
		f.reload()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cert, f.clientCA
}

// config is the listener's TLS configuration: every handshake gets the
// current certificate and client CA.
func (f *tlsFiles) config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			cert, pool := f.current()
			c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2"}}
			if pool != nil {
				c.ClientCAs, c.ClientAuth = pool, tls.RequireAndVerifyClientCert
			}
			return c, nil
		},
	}
}
