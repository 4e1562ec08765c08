package server

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server/broker"
)

// Name rules, in one place.
//
// A queue or channel name is 1 to MaxNameLen bytes of ASCII letters, digits
// and `_ - . : / @ + =`. That admits legacy names such as
// `task:prodcons:queue`, and excludes whitespace, glob characters (`* ? [ ]`)
// and braces (which would break the cluster hash tag of the key layout).
// A pattern may in addition use the glob characters `* ? [ ] ^ \`.
const (
	MaxNameLen    = 256
	maxIDLen      = 128
	maxHeaders    = 64
	maxHeaderKey  = 256
	maxHeaderSize = 64 << 10
	maxTokens     = 1000
	maxSubscribe  = 256
	maxErrorText  = 4 << 10
	maxAttempts   = 1000
	maxQueues     = 16
	maxDelay      = 365 * 24 * time.Hour
	maxTaskType   = 128
	maxResultWait = 5 * time.Minute
	// maxStatsTaskTypes bounds the per-task-type breakdown of stats.
	maxStatsTaskTypes = 100
)

func nameChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '_', '-', '.', ':', '/', '@', '+', '=':
		return true
	}
	return false
}

func globChar(c byte) bool {
	switch c {
	case '*', '?', '[', ']', '^', '\\':
		return true
	}
	return false
}

// ValidateName checks a queue or channel name; what is "queue" or "channel".
func ValidateName(what, name string) error {
	if name == "" {
		return fmt.Errorf("%s name is empty", what)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%s name is %d bytes; the limit is %d", what, len(name), MaxNameLen)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; !nameChar(c) {
			return fmt.Errorf("%s name %q has %s at byte %d; names use letters, digits and _ - . : / @ + =", what, name, describeByte(c), i)
		}
	}
	return nil
}

// ValidatePattern checks a Subscribe glob pattern.
func ValidatePattern(p string) error {
	if p == "" {
		return fmt.Errorf("pattern is empty")
	}
	if len(p) > MaxNameLen {
		return fmt.Errorf("pattern is %d bytes; the limit is %d", len(p), MaxNameLen)
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; !nameChar(c) && !globChar(c) {
			return fmt.Errorf("pattern %q has %s at byte %d; patterns use letters, digits, _ - . : / @ + = and the glob characters * ? [ ] ^ \\", p, describeByte(c), i)
		}
	}
	return nil
}

func describeByte(c byte) string {
	switch {
	case c == ' ':
		return "a space"
	case c == '{' || c == '}':
		return fmt.Sprintf("the brace %q (reserved for Redis Cluster hash tags)", c)
	case globChar(c):
		return fmt.Sprintf("the glob character %q (not allowed in names)", c)
	case c < 0x20 || c >= 0x7f:
		return fmt.Sprintf("the byte 0x%02x", c)
	}
	return fmt.Sprintf("the character %q", c)
}

func validateID(id string) error {
	if id == "" {
		return nil
	}
	if len(id) > maxIDLen {
		return fmt.Errorf("message id is %d bytes; the limit is %d", len(id), maxIDLen)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c >= 0x7f {
			return fmt.Errorf("message id %q has %s at byte %d; ids are printable ASCII without spaces", id, describeByte(c), i)
		}
	}
	return nil
}

func validateHeaders(h map[string]string) error {
	if len(h) > maxHeaders {
		return fmt.Errorf("%d headers; the limit is %d", len(h), maxHeaders)
	}
	size := 0
	for k, v := range h {
		if k == "" {
			return fmt.Errorf("a header has an empty key")
		}
		if len(k) > maxHeaderKey {
			return fmt.Errorf("header key %.32q... is %d bytes; the limit is %d", k, len(k), maxHeaderKey)
		}
		size += len(k) + len(v)
	}
	if size > maxHeaderSize {
		return fmt.Errorf("headers total %d bytes; the limit is %d", size, maxHeaderSize)
	}
	return nil
}

// leaseFrom turns an optional Duration into a lease within [min, max].
func leaseFrom(d *durationpb.Duration, def, min, max time.Duration) (time.Duration, error) {
	if d == nil {
		return def, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, fmt.Errorf("lease_duration: %v", err)
	}
	v := d.AsDuration()
	if v == 0 {
		return def, nil
	}
	if v < min || v > max {
		return 0, fmt.Errorf("lease_duration %v is out of range; use %v to %v (or leave it unset for %v)", v, min, max, def)
	}
	return v, nil
}

// durationIn converts an optional Duration, which must lie in [min, max]
// when set (0 counts as unset).
func durationIn(field string, d *durationpb.Duration, min, max time.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, fmt.Errorf("%s: %v", field, err)
	}
	v := d.AsDuration()
	if v == 0 {
		return 0, nil
	}
	if v < min || v > max {
		return 0, fmt.Errorf("%s %v is out of range; use %v to %v", field, v, min, max)
	}
	return v, nil
}

// retryPolicy validates a RetryPolicy; zero fields stay zero ("inherit").
func retryPolicy(p *qbridgev1.RetryPolicy) (broker.Policy, error) {
	var out broker.Policy
	if p == nil {
		return out, nil
	}
	if p.GetMaxAttempts() > maxAttempts {
		return out, fmt.Errorf("retry_policy.max_attempts %d is above the limit %d", p.GetMaxAttempts(), maxAttempts)
	}
	out.MaxAttempts = int(p.GetMaxAttempts())
	var err error
	if out.BackoffMin, err = durationIn("retry_policy.min_backoff", p.GetMinBackoff(), time.Millisecond, 24*time.Hour); err != nil {
		return out, err
	}
	if out.BackoffMax, err = durationIn("retry_policy.max_backoff", p.GetMaxBackoff(), time.Millisecond, 7*24*time.Hour); err != nil {
		return out, err
	}
	if out.BackoffMin > 0 && out.BackoffMax > 0 && out.BackoffMin > out.BackoffMax {
		return out, fmt.Errorf("retry_policy.min_backoff %v is above max_backoff %v", out.BackoffMin, out.BackoffMax)
	}
	return out, nil
}
