package main

import (
	"os"

	"golang.org/x/term"

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
		if _, err := client.TLSConfig(a.caFile, a.certFile, a.keyFile); err != nil {
			return nil, usageErrorf("--ca-file/--cert-file/--key-file: %v", err)
		}
		opts = append(opts, client.WithTLS(a.caFile, a.certFile, a.keyFile))
	}
	if a.token != "" {
		opts = append(opts, client.WithToken(a.token))
	}
	c, err := client.Dial(a.addr, opts...)
	if err != nil {
		return nil, usageErrorf("--addr %q: %v", a.addr, err)
	}
	a.c = c
	return c, nil
}

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
