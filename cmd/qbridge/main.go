// Command qbridge is the command-line client of qbridge: it enqueues,
// consumes, publishes, subscribes and administers queues of a qbridged
// server, built on the Go client in package client. Run `qbridge --help`
// for the commands and the exit codes scripts can rely on.
//
// It uses github.com/spf13/cobra rather than the standard flag package
// because the command tree is nested (dead list|replay|delete, config
// get|set), every command needs its own help with examples, flags are
// shared down the tree (--addr, --output, ...), and cobra generates shell
// completions (bash, zsh, fish, powershell) for all of it, including queue
// names asked from the server.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}
