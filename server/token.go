package server

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/qbridge/qbridge/server/broker"
)

// An ack token names one delivery: the queue, the lease id the claim script
// handed out (unique per delivery, so it fences stale acks), and the instance
// and Consume stream that hold it (so that an Ack on that instance frees the
// stream's credit at once).
//
// Wire form: "v1." + base64url(no padding) of four fields, each an unsigned
// varint length followed by that many bytes, except the last, a varint:
// queue, lease id, instance id, consumer number.
type ackToken struct {
	Queue    string
	LeaseID  string
	Instance string
	Consumer uint64

	raw string // the token as the client sent it (set by parseTokens)
}

const tokenVersion = "v1."

var errBadToken = errors.New("malformed ack token")

func (t ackToken) String() string {
	var b []byte
	for _, s := range []string{t.Queue, t.LeaseID, t.Instance} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	b = binary.AppendUvarint(b, t.Consumer)
	return tokenVersion + base64.RawURLEncoding.EncodeToString(b)
}

func parseAckToken(s string) (ackToken, error) {
	var t ackToken
	if !strings.HasPrefix(s, tokenVersion) {
		return t, fmt.Errorf("%w %.40q: it does not start with %q; pass Delivery.ack_token unchanged", errBadToken, s, tokenVersion)
	}
	b, err := base64.RawURLEncoding.DecodeString(s[len(tokenVersion):])
	if err != nil {
		return t, fmt.Errorf("%w %.40q: %v", errBadToken, s, err)
	}
	fields := make([]string, 3)
	for i := range fields {
		n, k := binary.Uvarint(b)
		if k <= 0 || uint64(len(b)-k) < n {
			return t, fmt.Errorf("%w %.40q: truncated", errBadToken, s)
		}
		fields[i] = string(b[k : k+int(n)])
		b = b[k+int(n):]
	}
	c, k := binary.Uvarint(b)
	if k <= 0 || k != len(b) {
		return t, fmt.Errorf("%w %.40q: truncated or trailing bytes", errBadToken, s)
	}
	t = ackToken{Queue: fields[0], LeaseID: fields[1], Instance: fields[2], Consumer: c}
	if err := ValidateName("queue", broker.Logical(t.Queue)); err != nil {
		return t, fmt.Errorf("%w %.40q: %v", errBadToken, s, err)
	}
	if _, ok := broker.ShardIndex(t.Queue); !ok {
		return t, fmt.Errorf("%w %.40q: bad shard", errBadToken, s)
	}
	if t.LeaseID == "" || strings.Trim(t.LeaseID, "0123456789") != "" {
		return t, fmt.Errorf("%w %.40q: bad lease id", errBadToken, s)
	}
	return t, nil
}

// AckTokenQueue returns the queue an ack token (Delivery.ack_token) belongs
// to (for a sharded queue, the queue, not the shard), for authorization in
// front of Ack, Nack and ExtendLease.
func AckTokenQueue(token string) (string, error) {
	t, err := parseAckToken(token)
	if err != nil {
		return "", err
	}
	return broker.Logical(t.Queue), nil
}
