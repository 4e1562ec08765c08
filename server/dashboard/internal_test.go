package dashboard

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

func TestHTTPStatus(t *testing.T) {
	for c, want := range map[codes.Code]int{
		codes.Unauthenticated:    401,
		codes.PermissionDenied:   403,
		codes.InvalidArgument:    400,
		codes.NotFound:           404,
		codes.FailedPrecondition: 409,
		codes.ResourceExhausted:  429,
		codes.Unavailable:        503,
		codes.DeadlineExceeded:   504,
		codes.Unimplemented:      501,
		codes.Internal:           500,
		codes.Unknown:            500,
	} {
		if got := httpStatus(c); got != want {
			t.Errorf("%v: %d, want %d", c, got, want)
		}
	}
}

func TestGRPCErrorRetryAfter(t *testing.T) {
	d := New(nil, nil)
	st, err := status.New(codes.ResourceExhausted, "slow down").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(2300 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	d.grpcError(w, httptest.NewRequest("GET", "/api/queues", nil), st.Err())
	if w.Code != 429 || w.Header().Get("Retry-After") != "3" || strings.TrimSpace(w.Body.String()) != `{"error":"slow down"}` {
		t.Fatalf("%d %q %s", w.Code, w.Header().Get("Retry-After"), w.Body)
	}
	w = httptest.NewRecorder()
	d.grpcError(w, httptest.NewRequest("GET", "/api/queues", nil), status.Error(codes.Unavailable, "redis is down"))
	if w.Code != http.StatusServiceUnavailable || strings.TrimSpace(w.Body.String()) != `{"error":"redis is down"}` {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}

func TestShowPayload(t *testing.T) {
	for _, c := range []struct {
		name string
		in   []byte
		want payloadJSON
	}{
		{"empty", nil, payloadJSON{Payload: "", Encoding: "text", Bytes: 0}},
		{"text", []byte("héllo"), payloadJSON{Payload: "héllo", Encoding: "text", Bytes: 6}},
		{"binary", []byte{0xff, 0xfe}, payloadJSON{Payload: "//4=", Encoding: "base64", Bytes: 2}},
		{"long text", []byte(strings.Repeat("a", 5000)), payloadJSON{Payload: strings.Repeat("a", 4096), Encoding: "text", Bytes: 5000, Truncated: true}},
		// A 3-byte character across the 4 KiB line is left out whole.
		{"cut character", []byte(strings.Repeat("a", 4095) + "€"), payloadJSON{Payload: strings.Repeat("a", 4095), Encoding: "text", Bytes: 4098, Truncated: true}},
		// Valid UTF-8 is decided on the whole payload, not the part shown.
		{"binary tail", append([]byte(strings.Repeat("a", 4096)), 0xff), payloadJSON{Payload: strings.Repeat("YWFh", 1365) + "YQ==", Encoding: "base64", Bytes: 4097, Truncated: true}},
	} {
		if got := showPayload(c.in); got != c.want {
			t.Errorf("%s: got %+v", c.name, got)
		}
	}
}

func TestRing(t *testing.T) {
	h := newHistory(3)
	at := time.Unix(1000, 0)
	for i := range 5 {
		h.record(at.Add(time.Duration(i)*time.Second), []*qbridgev1.GetQueueStatsResponse{{Queue: "q", Ready: int64(i)}}, false)
	}
	s, ok := h.samples("q")
	if !ok || len(s) != 3 || s[0].Ready != 2 || s[2].Ready != 4 {
		t.Fatalf("%v %+v", ok, s)
	}
	// A queue that is gone from the snapshot is forgotten.
	h.record(at.Add(10*time.Second), []*qbridgev1.GetQueueStatsResponse{{Queue: "other"}}, false)
	if s, ok := h.samples("q"); ok || len(s) != 0 {
		t.Fatalf("q kept: %+v", s)
	}
	// A partial snapshot (a node down) adds what it read and forgets
	// nothing.
	h.recordPartial(at.Add(11*time.Second), []*qbridgev1.GetQueueStatsResponse{{Queue: "third", Ready: 7}})
	if s, ok := h.samples("other"); !ok || len(s) != 1 {
		t.Fatalf("other after a partial snapshot: %v %+v", ok, s)
	}
	if s, ok := h.samples("third"); !ok || len(s) != 1 || s[0].Ready != 7 {
		t.Fatalf("third after a partial snapshot: %v %+v", ok, s)
	}
	if !h.failed(nil) || h.failed(nil) {
		t.Fatal("failed should report the first failure only")
	}
	if !h.record(at, nil, false) {
		t.Fatal("record should report the recovery")
	}
}
