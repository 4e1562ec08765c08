//go:build qbridge_faults

package server

import (
	"context"
	"os"
	"strconv"
	"sync/atomic"

	"github.com/qbridge/qbridge/server/broker"
)

// This file is compiled only with the build tag qbridge_faults, into test
// binaries of the chaos suite, to show that its checker catches a broken
// delivery path. Never in a release build.

var (
	faultEvery, _ = strconv.Atoi(os.Getenv("QBRIDGE_FAULT_LOSE_EVERY"))
	faultCount    atomic.Int64
)

// faultLose loses every QBRIDGE_FAULT_LOSE_EVERY-th delivery: it is acked in
// Redis and forgotten instead of being sent.
func (s *Server) faultLose(c *consumer, ls []broker.Lease) []broker.Lease {
	if faultEvery <= 0 || c.autoAck {
		return ls
	}
	kept := ls[:0:0]
	for _, l := range ls {
		if faultCount.Add(1)%int64(faultEvery) != 0 {
			kept = append(kept, l)
			continue
		}
		_, _ = s.b.Ack(context.Background(), l.Queue, []string{l.LeaseID}, nil)
		c.forget(l.Queue, l.LeaseID)
	}
	return kept
}
