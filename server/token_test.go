package server

import (
	"strings"
	"testing"
)

func TestAckTokenRoundTrip(t *testing.T) {
	for _, tok := range []ackToken{
		{Queue: "task:prodcons:queue", LeaseID: "1", Instance: "abcdef0123456789", Consumer: 1},
		{Queue: strings.Repeat("q", MaxNameLen), LeaseID: "18446744073709551615", Instance: "", Consumer: 1 << 63},
	} {
		got, err := parseAckToken(tok.String())
		if err != nil {
			t.Fatalf("parse(%v): %v", tok, err)
		}
		if got != tok {
			t.Fatalf("round trip: got %+v want %+v", got, tok)
		}
	}
}

func FuzzParseAckToken(f *testing.F) {
	f.Add(ackToken{Queue: "q", LeaseID: "7", Instance: "i", Consumer: 3}.String())
	f.Add("v1.")
	f.Add("garbage")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := parseAckToken(s)
		if err != nil {
			return
		}
		// Whatever parses names a valid queue and a numeric lease, and
		// re-encodes to a token that parses to the same thing.
		if ValidateName("queue", tok.Queue) != nil || strings.Trim(tok.LeaseID, "0123456789") != "" || tok.LeaseID == "" {
			t.Fatalf("accepted %+v", tok)
		}
		again, err := parseAckToken(tok.String())
		if err != nil || again != tok {
			t.Fatalf("re-encode of %+v: %+v, %v", tok, again, err)
		}
	})
}
