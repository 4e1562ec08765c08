//go:build unix

package main

import (
	"os/exec"
	"syscall"
)

// terminateGroup runs cmd in a process group of its own and makes the end
// of its context send SIGTERM to the whole group (sh -c and what it
// started), not only to the shell.
func terminateGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
}
