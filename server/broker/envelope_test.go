package broker

import (
	"bytes"
	"reflect"
	"testing"
)

func TestEnvelopeRoundTrip(t *testing.T) {
	for _, m := range []*Message{
		{ID: "id-1", Deliveries: 0, EnqueuedAt: 1700000000123, Payload: []byte("hello")},
		{ID: "", Deliveries: 7, EnqueuedAt: 0, Payload: nil, Headers: map[string]string{"a": "1", "": "empty key", "k": ""}},
		{ID: "x", Deliveries: 1<<32 - 1, EnqueuedAt: 1 << 52, Payload: []byte("\x00qb\x01 looks like a magic"), Headers: map[string]string{"trace": "00-abc"}},
	} {
		b := encodeEnvelope(m)
		got, err := decodeEnvelope(b)
		if err != nil {
			t.Fatalf("decode(%+v): %v", m, err)
		}
		if got.ID != m.ID || got.Deliveries != m.Deliveries || got.EnqueuedAt != m.EnqueuedAt || !bytes.Equal(got.Payload, m.Payload) {
			t.Fatalf("round trip: got %+v want %+v", got, m)
		}
		if len(m.Headers) > 0 && !reflect.DeepEqual(got.Headers, m.Headers) {
			t.Fatalf("headers: got %v want %v", got.Headers, m.Headers)
		}
	}
}

func TestRawPayloadIsNotAnEnvelope(t *testing.T) {
	for _, raw := range []string{"", "5", "{\"task_type\":\"parse_log_file\"}", "\x00qb\x01short"} {
		if isEnvelope([]byte(raw)) {
			t.Errorf("%q taken for an envelope", raw)
		}
	}
}

func FuzzDecodeEnvelope(f *testing.F) {
	f.Add(encodeEnvelope(&Message{ID: "a", Payload: []byte("p"), Headers: map[string]string{"h": "v"}}))
	f.Add([]byte("\x00qb\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeEnvelope(b)
		if err != nil {
			return
		}
		// What decodes re-encodes to something that decodes the same.
		again, err := decodeEnvelope(encodeEnvelope(m))
		if err != nil || !sameMessage(m, again) {
			t.Fatalf("unstable: %+v -> %+v, %v", m, again, err)
		}
	})
}
