package broker

import (
	"bytes"
	"reflect"
	"testing"
)

// Every message qbridge writes decodes to itself.
func FuzzEnvelopeRoundTrip(f *testing.F) {
	f.Add("id-1", []byte("payload"), uint32(3), int64(1700000000000), "key", "value", "last error", "task", true)
	f.Add("", []byte{}, uint32(0), int64(0), "", "", "", "", false)
	f.Fuzz(func(t *testing.T, id string, payload []byte, deliveries uint32, at int64, hk, hv, lastErr, taskType string, keep bool) {
		if len(id) > 65535 { // the id length is a 16-bit field; names are validated far below it
			return
		}
		if at < 0 {
			at = -at
		}
		m := &Message{ID: id, Payload: payload, Deliveries: deliveries, EnqueuedAt: at, LastError: lastErr, TaskType: taskType, KeepResult: keep}
		if hk != "" {
			m.Headers = map[string]string{hk: hv}
		}
		got, err := decodeEnvelope(encodeEnvelope(m))
		if err != nil {
			t.Fatalf("decode(encode(%+v)): %v", m, err)
		}
		if !sameMessage(m, got) {
			t.Fatalf("round trip changed the message:\n%+v\n%+v", m, got)
		}
	})
}

func sameMessage(a, b *Message) bool {
	if !bytes.Equal(a.Payload, b.Payload) || len(a.Headers) != len(b.Headers) {
		return false
	}
	if len(a.Headers) > 0 && !reflect.DeepEqual(a.Headers, b.Headers) {
		return false
	}
	x, y := *a, *b
	x.Payload, y.Payload, x.Headers, y.Headers = nil, nil, nil, nil
	return reflect.DeepEqual(x, y)
}
