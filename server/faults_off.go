//go:build !qbridge_faults

package server

import "github.com/qbridge/qbridge/server/broker"

// faultLose is the hook of a deliberately broken delivery path that only
// test builds have (build tag qbridge_faults; see faults_on.go). Here it
// does nothing.
func (s *Server) faultLose(_ *consumer, ls []broker.Lease) []broker.Lease { return ls }
