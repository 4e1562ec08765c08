package broker

import (
	"encoding/binary"
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// Envelope format, version 1. Every list element qbridge writes (unless the
// queue is in raw mode) and every inflight hash value is one of these. All
// integers are big-endian:
//
//	offset  size  field
//	0       4     magic "\x00qb\x01" (the last byte is the format version)
//	4       4     deliveries: how many times the message has been delivered
//	8       8     enqueue time, unix milliseconds
//	16      8     expire time, unix ms (0: never); the enqueue script fills it from the ttl
//	24      2     max attempts (0: the queue's policy)
//	26      4     min backoff, ms (0: the queue's policy)
//	30      4     max backoff, ms (0: the queue's policy)
//	34      2     id length n
//	36      n     id
//	36+n    4     meta length m
//	40+n    m     meta: protobuf wire format of
//	                message Meta {
//	                  map<string,string> headers = 1;
//	                  string last_error = 2;   // of the latest Nack
//	                  int64 dead_at_ms = 3;    // dead letters only
//	                  string dead_reason = 4;  // dead letters only
//	                  string task_type = 5;
//	                  bool keep_result = 6;
//	                }
//	40+n+m  rest  payload, unchanged
//
// The fixed part lets Lua scripts apply the retry and expiry policy, bump
// the delivery count and cut out the payload with plain string operations;
// the scripts rewrite meta fields 2-4 (dropping older copies). A list element
// that does not start with the magic is a raw payload pushed by a plain Redis
// client; the claim script wraps it into an envelope when it first delivers
// it.
const (
	envelopeMagic   = "\x00qb\x01"
	envelopeMinSize = 40
	// Meta field numbers.
	metaHeadersField    = 1
	metaLastErrorField  = 2
	metaDeadAtField     = 3
	metaDeadReasonField = 4
	metaTaskTypeField   = 5
	metaKeepResultField = 6
)

// Message is a queue message as qbridge sees it.
type Message struct {
	ID          string
	Deliveries  uint32 // times delivered before (in a list) or including this delivery (in flight)
	EnqueuedAt  int64  // unix ms
	ExpireAt    int64  // unix ms, 0: never
	MaxAttempts uint16 // 0: the queue's policy
	BackoffMin  uint32 // ms, 0: the queue's policy
	BackoffMax  uint32 // ms, 0: the queue's policy
	Headers     map[string]string
	Payload     []byte

	LastError  string
	DeadAt     int64 // unix ms; dead letters only
	DeadReason string
	TaskType   string
	KeepResult bool
}

var errBadEnvelope = errors.New("malformed envelope")

// encodeEnvelope serialises m.
func encodeEnvelope(m *Message) []byte {
	var meta []byte
	for k, v := range m.Headers {
		var entry []byte
		entry = protowire.AppendTag(entry, 1, protowire.BytesType)
		entry = protowire.AppendString(entry, k)
		entry = protowire.AppendTag(entry, 2, protowire.BytesType)
		entry = protowire.AppendString(entry, v)
		meta = protowire.AppendTag(meta, metaHeadersField, protowire.BytesType)
		meta = protowire.AppendBytes(meta, entry)
	}
	if m.LastError != "" {
		meta = protowire.AppendTag(meta, metaLastErrorField, protowire.BytesType)
		meta = protowire.AppendString(meta, m.LastError)
	}
	if m.DeadAt != 0 {
		meta = protowire.AppendTag(meta, metaDeadAtField, protowire.VarintType)
		meta = protowire.AppendVarint(meta, uint64(m.DeadAt))
	}
	if m.DeadReason != "" {
		meta = protowire.AppendTag(meta, metaDeadReasonField, protowire.BytesType)
		meta = protowire.AppendString(meta, m.DeadReason)
	}
	if m.TaskType != "" {
		meta = protowire.AppendTag(meta, metaTaskTypeField, protowire.BytesType)
		meta = protowire.AppendString(meta, m.TaskType)
	}
	if m.KeepResult {
		meta = protowire.AppendTag(meta, metaKeepResultField, protowire.VarintType)
		meta = protowire.AppendVarint(meta, 1)
	}
	b := make([]byte, 0, envelopeMinSize+len(m.ID)+len(meta)+len(m.Payload))
	b = append(b, envelopeMagic...)
	b = binary.BigEndian.AppendUint32(b, m.Deliveries)
	b = binary.BigEndian.AppendUint64(b, uint64(m.EnqueuedAt))
	b = binary.BigEndian.AppendUint64(b, uint64(m.ExpireAt))
	b = binary.BigEndian.AppendUint16(b, m.MaxAttempts)
	b = binary.BigEndian.AppendUint32(b, m.BackoffMin)
	b = binary.BigEndian.AppendUint32(b, m.BackoffMax)
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.ID)))
	b = append(b, m.ID...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(meta)))
	b = append(b, meta...)
	b = append(b, m.Payload...)
	return b
}

// isEnvelope reports whether b starts like an envelope.
func isEnvelope(b []byte) bool {
	return len(b) >= envelopeMinSize && string(b[:4]) == envelopeMagic
}

// decodeEnvelope parses an envelope. The payload aliases b.
func decodeEnvelope(b []byte) (*Message, error) {
	if !isEnvelope(b) {
		return nil, errBadEnvelope
	}
	m := &Message{
		Deliveries:  binary.BigEndian.Uint32(b[4:8]),
		EnqueuedAt:  int64(binary.BigEndian.Uint64(b[8:16])),
		ExpireAt:    int64(binary.BigEndian.Uint64(b[16:24])),
		MaxAttempts: binary.BigEndian.Uint16(b[24:26]),
		BackoffMin:  binary.BigEndian.Uint32(b[26:30]),
		BackoffMax:  binary.BigEndian.Uint32(b[30:34]),
	}
	n := int(binary.BigEndian.Uint16(b[34:36]))
	if len(b) < 36+n+4 {
		return nil, fmt.Errorf("%w: id length %d exceeds element", errBadEnvelope, n)
	}
	m.ID = string(b[36 : 36+n])
	off := 36 + n
	ml := int(binary.BigEndian.Uint32(b[off : off+4]))
	off += 4
	if ml < 0 || len(b) < off+ml {
		return nil, fmt.Errorf("%w: meta length %d exceeds element", errBadEnvelope, ml)
	}
	if ml > 0 {
		if err := decodeMeta(m, b[off:off+ml]); err != nil {
			return nil, err
		}
	}
	m.Payload = b[off+ml:]
	return m, nil
}

func decodeMeta(m *Message, meta []byte) error {
	bad := func(n int) error { return fmt.Errorf("%w: meta: %v", errBadEnvelope, protowire.ParseError(n)) }
	for len(meta) > 0 {
		num, typ, n := protowire.ConsumeTag(meta)
		if n < 0 {
			return bad(n)
		}
		meta = meta[n:]
		switch {
		case num == metaHeadersField && typ == protowire.BytesType:
			entry, n := protowire.ConsumeBytes(meta)
			if n < 0 {
				return bad(n)
			}
			meta = meta[n:]
			k, v, err := decodeHeaderEntry(entry)
			if err != nil {
				return err
			}
			if m.Headers == nil {
				m.Headers = map[string]string{}
			}
			m.Headers[k] = v
		case (num == metaLastErrorField || num == metaDeadReasonField || num == metaTaskTypeField) && typ == protowire.BytesType:
			v, n := protowire.ConsumeString(meta)
			if n < 0 {
				return bad(n)
			}
			meta = meta[n:]
			switch num {
			case metaLastErrorField:
				m.LastError = v
			case metaDeadReasonField:
				m.DeadReason = v
			default:
				m.TaskType = v
			}
		case (num == metaDeadAtField || num == metaKeepResultField) && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(meta)
			if n < 0 {
				return bad(n)
			}
			meta = meta[n:]
			if num == metaDeadAtField {
				m.DeadAt = int64(v)
			} else {
				m.KeepResult = v == 1
			}
		default:
			// A field from a newer format: skip it.
			n = protowire.ConsumeFieldValue(num, typ, meta)
			if n < 0 {
				return bad(n)
			}
			meta = meta[n:]
		}
	}
	return nil
}

func decodeHeaderEntry(entry []byte) (k, v string, err error) {
	for len(entry) > 0 {
		en, et, n := protowire.ConsumeTag(entry)
		if n < 0 {
			return "", "", fmt.Errorf("%w: header entry: %v", errBadEnvelope, protowire.ParseError(n))
		}
		entry = entry[n:]
		if et != protowire.BytesType {
			n = protowire.ConsumeFieldValue(en, et, entry)
		} else {
			var s []byte
			s, n = protowire.ConsumeBytes(entry)
			switch en {
			case 1:
				k = string(s)
			case 2:
				v = string(s)
			}
		}
		if n < 0 {
			return "", "", fmt.Errorf("%w: header entry: %v", errBadEnvelope, protowire.ParseError(n))
		}
		entry = entry[n:]
	}
	return k, v, nil
}
