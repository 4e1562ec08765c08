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
//	16      2     id length n
//	18      n     id
//	18+n    4     meta length m
//	22+n    m     meta: protobuf wire format of
//	                message Meta { map<string,string> headers = 1; }
//	22+n+m  rest  payload, unchanged
//
// The fixed part lets Lua scripts bump the delivery count and cut out the
// payload with plain string operations. A list element that does not start
// with the magic is a raw payload pushed by a plain Redis client; the claim
// script wraps it into an envelope when it first delivers it.
const (
	envelopeMagic   = "\x00qb\x01"
	envelopeMinSize = 22
	// metaHeadersField is the protobuf field number of Meta.headers.
	metaHeadersField = 1
)

// Message is a queue message as qbridge sees it.
type Message struct {
	ID         string
	Deliveries uint32 // times delivered before (in a list) or including this delivery (in flight)
	EnqueuedAt int64  // unix ms
	Headers    map[string]string
	Payload    []byte
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
	b := make([]byte, 0, envelopeMinSize+len(m.ID)+len(meta)+len(m.Payload))
	b = append(b, envelopeMagic...)
	b = binary.BigEndian.AppendUint32(b, m.Deliveries)
	b = binary.BigEndian.AppendUint64(b, uint64(m.EnqueuedAt))
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
		Deliveries: binary.BigEndian.Uint32(b[4:8]),
		EnqueuedAt: int64(binary.BigEndian.Uint64(b[8:16])),
	}
	n := int(binary.BigEndian.Uint16(b[16:18]))
	if len(b) < 18+n+4 {
		return nil, fmt.Errorf("%w: id length %d exceeds element", errBadEnvelope, n)
	}
	m.ID = string(b[18 : 18+n])
	off := 18 + n
	ml := int(binary.BigEndian.Uint32(b[off : off+4]))
	off += 4
	if ml < 0 || len(b) < off+ml {
		return nil, fmt.Errorf("%w: meta length %d exceeds element", errBadEnvelope, ml)
	}
	if ml > 0 {
		h, err := decodeMeta(b[off : off+ml])
		if err != nil {
			return nil, err
		}
		m.Headers = h
	}
	m.Payload = b[off+ml:]
	return m, nil
}

func decodeMeta(meta []byte) (map[string]string, error) {
	headers := map[string]string{}
	for len(meta) > 0 {
		num, typ, n := protowire.ConsumeTag(meta)
		if n < 0 {
			return nil, fmt.Errorf("%w: meta: %v", errBadEnvelope, protowire.ParseError(n))
		}
		meta = meta[n:]
		if num != metaHeadersField || typ != protowire.BytesType {
			// A field from a newer format: skip it.
			n = protowire.ConsumeFieldValue(num, typ, meta)
			if n < 0 {
				return nil, fmt.Errorf("%w: meta: %v", errBadEnvelope, protowire.ParseError(n))
			}
			meta = meta[n:]
			continue
		}
		entry, n := protowire.ConsumeBytes(meta)
		if n < 0 {
			return nil, fmt.Errorf("%w: meta: %v", errBadEnvelope, protowire.ParseError(n))
		}
		meta = meta[n:]
		var k, v string
		for len(entry) > 0 {
			en, et, n := protowire.ConsumeTag(entry)
			if n < 0 {
				return nil, fmt.Errorf("%w: header entry: %v", errBadEnvelope, protowire.ParseError(n))
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
				return nil, fmt.Errorf("%w: header entry: %v", errBadEnvelope, protowire.ParseError(n))
			}
			entry = entry[n:]
		}
		headers[k] = v
	}
	return headers, nil
}
