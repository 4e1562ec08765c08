// Package testcerts makes throwaway X.509 material for tests: a certificate
// authority, server certificates for the loopback address and client
// certificates, as PEM (to write into files for processes such as
// redis-server or qbridged) and as crypto/tls values (for in-process
// clients and servers).
//
// Keys are ECDSA P-256, certificates are valid from an hour ago for a day.
// Every function takes the test and fails it on error; nothing here is
// meant for production use.
package testcerts

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// validity is how long certificates made here stay valid (from an hour ago
// on, so a slightly skewed clock does not matter).
const validity = 24 * time.Hour

// CA is a certificate authority made for one test.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// PEM is the CA certificate, PEM encoded.
	PEM []byte
}

// Pair is a certificate issued by a CA and its private key.
type Pair struct {
	CertPEM []byte // the certificate, PEM encoded
	KeyPEM  []byte // the private key, PEM encoded (PKCS #8)
	// TLS is the same pair for crypto/tls.
	TLS tls.Certificate
}

// NewCA makes a self-signed certificate authority named name.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("testcerts: create CA %q: %v", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("testcerts: parse CA %q: %v", name, err)
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// Pool returns a certificate pool holding only this CA, for
// tls.Config.RootCAs or ClientCAs.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// Server issues a server certificate named name, valid for 127.0.0.1, ::1
// and localhost.
func (ca *CA) Server(t testing.TB, name string) *Pair {
	t.Helper()
	return ca.issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: name},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:    []string{"localhost"},
	})
}

// Client issues a client certificate with CommonName commonName and, if
// given, these DNS names as subject alternative names.
func (ca *CA) Client(t testing.TB, commonName string, dnsNames ...string) *Pair {
	t.Helper()
	return ca.issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: commonName},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		DNSNames:    dnsNames,
	})
}

func (ca *CA) issue(t testing.TB, tmpl *x509.Certificate) *Pair {
	t.Helper()
	key := newKey(t)
	tmpl.SerialNumber = serial(t)
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(validity)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatalf("testcerts: issue %q: %v", tmpl.Subject.CommonName, err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatalf("testcerts: marshal key of %q: %v", tmpl.Subject.CommonName, err)
	}
	p := &Pair{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
	}
	if p.TLS, err = tls.X509KeyPair(p.CertPEM, p.KeyPEM); err != nil {
		t.Fatalf("testcerts: key pair of %q: %v", tmpl.Subject.CommonName, err)
	}
	return p
}

// WriteCA writes the CA certificate to dir/name and returns its path.
func (ca *CA) WriteCA(t testing.TB, dir, name string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	WriteFile(t, path, ca.PEM)
	return path
}

// Write writes the pair to dir/base.crt and dir/base.key and returns both
// paths.
func (p *Pair) Write(t testing.TB, dir, base string) (certFile, keyFile string) {
	t.Helper()
	certFile, keyFile = filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key")
	WriteFile(t, certFile, p.CertPEM)
	WriteFile(t, keyFile, p.KeyPEM)
	return certFile, keyFile
}

// WriteFile writes data to path (mode 0600) the way certificate tools
// replace files: into a temporary file first, then renamed over path, so a
// reader never sees half a file.
func WriteFile(t testing.TB, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatalf("testcerts: %v", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatalf("testcerts: %v", err)
	}
}

// Files are the PEM files of a CA, a server certificate and a client
// certificate written by WriteSet.
type Files struct {
	CA                    string // the CA certificate
	ServerCert, ServerKey string // the server's certificate (127.0.0.1, ::1, localhost) and key
	ClientCert, ClientKey string // the client's certificate and key
}

// Set is a CA with one server and one client certificate.
type Set struct {
	CA     *CA
	Server *Pair
	Client *Pair
	Files  Files
}

// WriteSet makes a CA, a server certificate for the loopback address and a
// client certificate with CommonName clientName, and writes them into dir as
// ca.crt, server.crt/server.key and client.crt/client.key.
func WriteSet(t testing.TB, dir, clientName string) *Set {
	t.Helper()
	ca := NewCA(t, "test CA")
	s := &Set{CA: ca, Server: ca.Server(t, "test server"), Client: ca.Client(t, clientName)}
	s.Files.CA = ca.WriteCA(t, dir, "ca.crt")
	s.Files.ServerCert, s.Files.ServerKey = s.Server.Write(t, dir, "server")
	s.Files.ClientCert, s.Files.ClientKey = s.Client.Write(t, dir, "client")
	return s
}

// ClientConfig returns a tls.Config that trusts the set's CA and presents
// its client certificate.
func (s *Set) ClientConfig() *tls.Config {
	return &tls.Config{
		RootCAs:      s.CA.Pool(),
		Certificates: []tls.Certificate{s.Client.TLS},
		MinVersion:   tls.VersionTLS12,
	}
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("testcerts: generate key: %v", err)
	}
	return key
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatalf("testcerts: serial: %v", err)
	}
	return n.Add(n, big.NewInt(1))
}
