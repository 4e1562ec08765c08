package dashboard

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

const (
	// callTimeout bounds each gRPC call the API makes for a request.
	callTimeout = 10 * time.Second
	// maxBody bounds the body of a POST.
	maxBody = 256 << 10
	// maxListed bounds how many queues GET /api/queues shows.
	maxListed = 1000
	// listPageSize is the ListQueues page size used to page through.
	listPageSize = 500
	// statsParallelism bounds concurrent GetQueueStats calls of one list.
	statsParallelism = 8
	// payloadPreview is how much of a payload the API shows.
	payloadPreview = 4 << 10
	// keepAliveEvery is how often an idle tail sends an SSE comment.
	keepAliveEvery = 15 * time.Second
)

// routes builds the handler of the UI and the API.
func (d *Dashboard) routes() http.Handler {
	mux := http.NewServeMux()
	api := func(pattern string, method string, h func(w http.ResponseWriter, r *http.Request)) {
		mux.Handle(pattern, d.apiHandler(method, h))
	}
	mux.Handle("/api/info", d.apiHandler(http.MethodGet, d.info))
	api("/api/queues", http.MethodGet, d.needAuth(d.listQueues))
	api("/api/queues/{q}", http.MethodGet, d.needAuth(d.queueStats))
	api("/api/queues/{q}/history", http.MethodGet, d.needAuth(d.queueHistory))
	api("/api/queues/{q}/messages", http.MethodGet, d.needAuth(d.queueMessages))
	api("/api/queues/{q}/pause", http.MethodPost, d.needAuth(d.pause))
	api("/api/queues/{q}/resume", http.MethodPost, d.needAuth(d.resume))
	api("/api/queues/{q}/purge", http.MethodPost, d.needAuth(d.purge))
	api("/api/queues/{q}/dead/replay", http.MethodPost, d.needAuth(d.replayDead))
	api("/api/queues/{q}/dead/delete", http.MethodPost, d.needAuth(d.deleteDead))
	api("/api/channels/{c}/tail", http.MethodGet, d.needAuth(d.tail))
	mux.Handle("/api/", d.apiHandler("", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such API endpoint: "+r.URL.Path)
	}))
	mux.Handle("/", d.static)
	return securityHeaders(mux)
}

// securityHeaders sets headers every response carries: the UI loads only
// its own files and cannot be framed.
func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Referrer-Policy", "no-referrer")
		h.ServeHTTP(w, r)
	})
}

var crossOrigin = http.NewCrossOriginProtection()

// apiHandler checks the method (method "" accepts any) and, for POST, the
// content type, body size and origin, then calls h.
func (d *Dashboard) apiHandler(method string, h func(w http.ResponseWriter, r *http.Request)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		if method != "" && r.Method != method && !(method == http.MethodGet && r.Method == http.MethodHead) {
			w.Header().Set("Allow", method)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s %s: use %s", r.Method, r.URL.Path, method))
			return
		}
		if r.Method == http.MethodPost {
			mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
			if err != nil || mt != "application/json" {
				writeError(w, http.StatusUnsupportedMediaType, "send the request body as Content-Type: application/json")
				return
			}
			if err := crossOrigin.Check(r); err != nil {
				writeError(w, http.StatusForbidden, "cross-origin request refused: "+err.Error())
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		}
		h(w, r)
	})
}

// needAuth answers 401 when the dashboard requires a token and the request
// has no Authorization header, and 400 when the header could not be sent as
// gRPC metadata.
func (d *Dashboard) needAuth(h func(w http.ResponseWriter, r *http.Request)) func(w http.ResponseWriter, r *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		a := r.Header.Get("Authorization")
		if a == "" && d.authRequired {
			w.Header().Set("WWW-Authenticate", `Bearer realm="qbridge"`)
			writeError(w, http.StatusUnauthorized, "this dashboard requires authentication: send the header 'Authorization: Bearer <token>' (the UI asks for the token)")
			return
		}
		for i := 0; i < len(a); i++ {
			if a[i] < 0x20 || a[i] > 0x7e {
				writeError(w, http.StatusBadRequest, "the Authorization header must be printable ASCII")
				return
			}
		}
		h(w, r)
	}
}

// callCtx is the context of a gRPC call made for r: the request's
// Authorization header forwarded as metadata, and a deadline.
func callCtx(r *http.Request) (context.Context, context.CancelFunc) {
	ctx := r.Context()
	if a := r.Header.Get("Authorization"); a != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", a)
	}
	return context.WithTimeout(ctx, callTimeout)
}

// writeJSON writes v as the JSON response with the given status.
func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"error":"cannot encode the response"}`)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

type errorJSON struct {
	Error string `json:"error"`
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, errorJSON{Error: msg})
}

// httpStatus maps a gRPC code to the HTTP status the API answers with.
func httpStatus(c codes.Code) int {
	switch c {
	case codes.OK:
		return http.StatusOK
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.InvalidArgument, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.NotFound:
		return http.StatusNotFound
	case codes.FailedPrecondition, codes.AlreadyExists, codes.Aborted:
		return http.StatusConflict
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.Unimplemented:
		return http.StatusNotImplemented
	}
	return http.StatusInternalServerError
}

// grpcError answers with the HTTP form of a gRPC call's error.
func (d *Dashboard) grpcError(w http.ResponseWriter, r *http.Request, err error) {
	st := status.Convert(err)
	code := httpStatus(st.Code())
	switch st.Code() {
	case codes.Unauthenticated:
		w.Header().Set("WWW-Authenticate", `Bearer realm="qbridge"`)
	case codes.ResourceExhausted:
		for _, det := range st.Details() {
			if ri, ok := det.(*errdetails.RetryInfo); ok && ri.GetRetryDelay() != nil {
				secs := int(math.Ceil(ri.GetRetryDelay().AsDuration().Seconds()))
				w.Header().Set("Retry-After", strconv.Itoa(max(1, secs)))
			}
		}
	}
	if code >= 500 && r.Context().Err() == nil {
		d.log.Warn("dashboard: API call failed", "path", r.URL.Path, "code", st.Code().String(), "err", st.Message())
	}
	writeError(w, code, st.Message())
}

type infoJSON struct {
	Version      string      `json:"version"`
	AuthRequired bool        `json:"auth_required"`
	History      historyInfo `json:"history"`
	MaxQueues    int         `json:"max_queues"`
}

type historyInfo struct {
	IntervalSeconds float64 `json:"interval_seconds"`
	Samples         int     `json:"samples"`
}

func (d *Dashboard) info(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, infoJSON{
		Version: d.version, AuthRequired: d.authRequired,
		History:   historyInfo{IntervalSeconds: d.interval.Seconds(), Samples: d.samples},
		MaxQueues: d.maxQueues,
	})
}

// countersJSON is QueueCounters.
type countersJSON struct {
	Enqueued     int64 `json:"enqueued"`
	Acked        int64 `json:"acked"`
	Nacked       int64 `json:"nacked"`
	LeaseExpired int64 `json:"lease_expired"`
	DeadLettered int64 `json:"dead_lettered"`
	Expired      int64 `json:"expired"`
}

func counters(c *qbridgev1.QueueCounters) countersJSON {
	return countersJSON{
		Enqueued: c.GetEnqueued(), Acked: c.GetAcked(), Nacked: c.GetNacked(),
		LeaseExpired: c.GetLeaseExpired(), DeadLettered: c.GetDeadLettered(), Expired: c.GetExpired(),
	}
}

// queueJSON is GetQueueStatsResponse.
type queueJSON struct {
	Queue          string                  `json:"queue"`
	Ready          int64                   `json:"ready"`
	InFlight       int64                   `json:"in_flight"`
	Delayed        int64                   `json:"delayed"`
	Dead           int64                   `json:"dead"`
	OldestReadyAge *float64                `json:"oldest_ready_age_seconds"`
	EnqueueRate    float64                 `json:"enqueue_rate"`
	AckRate        float64                 `json:"ack_rate"`
	Paused         bool                    `json:"paused"`
	Consumers      int64                   `json:"consumers"`
	Counters       countersJSON            `json:"counters"`
	TaskTypes      map[string]countersJSON `json:"task_types,omitempty"`
	Shards         []shardJSON             `json:"shards,omitempty"`
}

// shardJSON is one shard of a sharded queue (ShardStats).
type shardJSON struct {
	Shard    uint32 `json:"shard"`
	List     string `json:"list"`
	Ready    int64  `json:"ready"`
	InFlight int64  `json:"in_flight"`
	Delayed  int64  `json:"delayed"`
	Dead     int64  `json:"dead"`
}

func queueStats(st *qbridgev1.GetQueueStatsResponse) queueJSON {
	q := queueJSON{
		Queue: st.GetQueue(), Ready: st.GetReady(), InFlight: st.GetInFlight(), Delayed: st.GetDelayed(), Dead: st.GetDead(),
		EnqueueRate: finite(st.GetEnqueueRate()), AckRate: finite(st.GetAckRate()), Paused: st.GetPaused(), Consumers: st.GetConsumers(),
		Counters: counters(st.GetCounters()),
	}
	if st.GetOldestReadyAge() != nil {
		age := st.GetOldestReadyAge().AsDuration().Seconds()
		q.OldestReadyAge = &age
	}
	for _, sh := range st.GetShards() {
		q.Shards = append(q.Shards, shardJSON{Shard: sh.GetShard(), List: sh.GetList(),
			Ready: sh.GetReady(), InFlight: sh.GetInFlight(), Delayed: sh.GetDelayed(), Dead: sh.GetDead()})
	}
	if len(st.GetTaskTypes()) > 0 {
		q.TaskTypes = make(map[string]countersJSON, len(st.GetTaskTypes()))
		for t, c := range st.GetTaskTypes() {
			q.TaskTypes[t] = counters(c)
		}
	}
	return q
}

// finite keeps NaN and infinities out of the JSON (which cannot hold them).
func finite(f float64) float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return 0
	}
	return f
}

type queueListJSON struct {
	Queues    []queueJSON `json:"queues"`
	Truncated bool        `json:"truncated"`
}

func (d *Dashboard) listQueues(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := callCtx(r)
	defer cancel()
	var names []string
	truncated := false
	token := ""
	for {
		resp, err := d.admin.ListQueues(ctx, &qbridgev1.ListQueuesRequest{PageSize: listPageSize, PageToken: token})
		if err != nil {
			d.grpcError(w, r, err)
			return
		}
		names = append(names, resp.GetQueues()...)
		token = resp.GetNextPageToken()
		if len(resp.GetQueues()) == 0 {
			break // no progress: do not loop on a page token
		}
		if len(names) >= maxListed {
			truncated = len(names) > maxListed || token != ""
			names = names[:maxListed]
			break
		}
		if token == "" {
			break
		}
	}
	out := queueListJSON{Queues: make([]queueJSON, len(names)), Truncated: truncated}
	errs := make([]error, len(names))
	sem := make(chan struct{}, statsParallelism)
	var wg sync.WaitGroup
	for i, q := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			st, err := d.queues.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q})
			if err != nil {
				errs[i] = err
				cancel() // no point in asking for the others
				return
			}
			out.Queues[i] = queueStats(st)
		}()
	}
	wg.Wait()
	// Report the first real error, not the cancellations it caused.
	var first error
	for _, err := range errs {
		if err != nil && (first == nil || status.Code(first) == codes.Canceled) {
			first = err
		}
	}
	if first != nil {
		d.grpcError(w, r, first)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Dashboard) queueStats(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := callCtx(r)
	defer cancel()
	st, err := d.queues.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: r.PathValue("q")})
	if err != nil {
		d.grpcError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, queueStats(st))
}

type historyJSON struct {
	Queue           string   `json:"queue"`
	IntervalSeconds float64  `json:"interval_seconds"`
	Capacity        int      `json:"capacity"`
	Sampled         bool     `json:"sampled"`
	Samples         []sample `json:"samples"`
}

func (d *Dashboard) queueHistory(w http.ResponseWriter, r *http.Request) {
	q := r.PathValue("q")
	ctx, cancel := callCtx(r)
	defer cancel()
	// The caller must be allowed to see this queue's stats.
	if _, err := d.queues.GetQueueStats(ctx, &qbridgev1.GetQueueStatsRequest{Queue: q}); err != nil {
		d.grpcError(w, r, err)
		return
	}
	samples, sampled := d.hist.samples(q)
	writeJSON(w, http.StatusOK, historyJSON{
		Queue: q, IntervalSeconds: d.interval.Seconds(), Capacity: d.samples, Sampled: sampled, Samples: samples,
	})
}

// messageStates maps the API's state names to MessageState.
var messageStates = map[string]qbridgev1.MessageState{
	"ready":     qbridgev1.MessageState_MESSAGE_STATE_READY,
	"delayed":   qbridgev1.MessageState_MESSAGE_STATE_DELAYED,
	"in_flight": qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT,
	"dead":      qbridgev1.MessageState_MESSAGE_STATE_DEAD,
}

// payloadJSON is a payload as the API shows it.
type payloadJSON struct {
	Payload   string `json:"payload"`
	Encoding  string `json:"payload_encoding"`
	Bytes     int    `json:"payload_bytes"`
	Truncated bool   `json:"payload_truncated"`
}

// showPayload returns the first payloadPreview bytes of p: as text when p is
// valid UTF-8 (cut at a character boundary), else as base64.
func showPayload(p []byte) payloadJSON {
	out := payloadJSON{Bytes: len(p), Encoding: "text"}
	shown := p
	if len(shown) > payloadPreview {
		shown, out.Truncated = shown[:payloadPreview], true
	}
	if utf8.Valid(p) {
		for len(shown) > 0 && !utf8.Valid(shown) { // cut inside a character
			shown = shown[:len(shown)-1]
		}
		out.Payload = string(shown)
		return out
	}
	out.Encoding, out.Payload = "base64", base64.StdEncoding.EncodeToString(shown)
	return out
}

type messageJSON struct {
	ID    string `json:"id"`
	State string `json:"state"`
	payloadJSON
	Headers       map[string]string `json:"headers,omitempty"`
	TaskType      string            `json:"task_type,omitempty"`
	EnqueueTime   *time.Time        `json:"enqueue_time,omitempty"`
	Deliveries    uint32            `json:"deliveries"`
	DeliverTime   *time.Time        `json:"deliver_time,omitempty"`
	LeaseDeadline *time.Time        `json:"lease_deadline,omitempty"`
	ExpireTime    *time.Time        `json:"expire_time,omitempty"`
	LastError     string            `json:"last_error,omitempty"`
	DeadTime      *time.Time        `json:"dead_time,omitempty"`
	DeadReason    string            `json:"dead_reason,omitempty"`
}

func timeOf(ts *timestamppb.Timestamp) *time.Time {
	if ts == nil {
		return nil
	}
	t := ts.AsTime().UTC()
	return &t
}

type messagesJSON struct {
	Queue         string        `json:"queue"`
	State         string        `json:"state"`
	Messages      []messageJSON `json:"messages"`
	NextPageToken string        `json:"next_page_token"`
}

func (d *Dashboard) queueMessages(w http.ResponseWriter, r *http.Request) {
	q := r.PathValue("q")
	name := r.URL.Query().Get("state")
	state, ok := messageStates[name]
	if !ok {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("state %q: use state=ready, delayed, in_flight or dead", name))
		return
	}
	var size uint32
	if s := r.URL.Query().Get("page_size"); s != "" {
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("page_size %q is not a number", s))
			return
		}
		size = uint32(n)
	}
	ctx, cancel := callCtx(r)
	defer cancel()
	resp, err := d.admin.PeekMessages(ctx, &qbridgev1.PeekMessagesRequest{
		Queue: q, State: state, PageSize: size, PageToken: r.URL.Query().Get("page_token"),
	})
	if err != nil {
		d.grpcError(w, r, err)
		return
	}
	out := messagesJSON{Queue: q, State: name, Messages: make([]messageJSON, 0, len(resp.GetMessages())), NextPageToken: resp.GetNextPageToken()}
	for _, m := range resp.GetMessages() {
		out.Messages = append(out.Messages, messageJSON{
			ID: m.GetId(), State: name, payloadJSON: showPayload(m.GetPayload()), Headers: m.GetHeaders(), TaskType: m.GetTaskType(),
			EnqueueTime: timeOf(m.GetEnqueueTime()), Deliveries: m.GetDeliveries(), DeliverTime: timeOf(m.GetDeliverTime()),
			LeaseDeadline: timeOf(m.GetLeaseDeadline()), ExpireTime: timeOf(m.GetExpireTime()), LastError: m.GetLastError(),
			DeadTime: timeOf(m.GetDeadTime()), DeadReason: m.GetDeadReason(),
		})
	}
	writeJSON(w, http.StatusOK, out)
}

// readBody decodes the JSON body of a POST into v. An empty body leaves v
// as it is when emptyOK. It writes the error response and returns false when
// the body is unusable.
func readBody(w http.ResponseWriter, r *http.Request, v any, emptyOK bool) bool {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("the request body is over %d bytes", tooBig.Limit))
			return false
		}
		writeError(w, http.StatusBadRequest, "cannot read the request body: "+err.Error())
		return false
	}
	if len(bytes.TrimSpace(b)) == 0 {
		if emptyOK {
			return true
		}
		writeError(w, http.StatusBadRequest, "the request body is empty; send a JSON object")
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "the request body is not the JSON object expected: "+err.Error())
		return false
	}
	if dec.More() {
		writeError(w, http.StatusBadRequest, "the request body has more than one JSON value")
		return false
	}
	return true
}

// noBody is the body of pause, resume and purge: an empty object, or
// nothing.
type noBody struct{}

type pausedJSON struct {
	Queue  string `json:"queue"`
	Paused bool   `json:"paused"`
}

func (d *Dashboard) pause(w http.ResponseWriter, r *http.Request) {
	if !readBody(w, r, &noBody{}, true) {
		return
	}
	ctx, cancel := callCtx(r)
	defer cancel()
	q := r.PathValue("q")
	if _, err := d.admin.PauseQueue(ctx, &qbridgev1.PauseQueueRequest{Queue: q}); err != nil {
		d.grpcError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, pausedJSON{Queue: q, Paused: true})
}

func (d *Dashboard) resume(w http.ResponseWriter, r *http.Request) {
	if !readBody(w, r, &noBody{}, true) {
		return
	}
	ctx, cancel := callCtx(r)
	defer cancel()
	q := r.PathValue("q")
	if _, err := d.admin.ResumeQueue(ctx, &qbridgev1.ResumeQueueRequest{Queue: q}); err != nil {
		d.grpcError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, pausedJSON{Queue: q, Paused: false})
}

type purgedJSON struct {
	Queue  string `json:"queue"`
	Purged int64  `json:"purged"`
}

func (d *Dashboard) purge(w http.ResponseWriter, r *http.Request) {
	if !readBody(w, r, &noBody{}, true) {
		return
	}
	ctx, cancel := callCtx(r)
	defer cancel()
	q := r.PathValue("q")
	resp, err := d.admin.PurgeQueue(ctx, &qbridgev1.PurgeQueueRequest{Queue: q})
	if err != nil {
		d.grpcError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, purgedJSON{Queue: q, Purged: resp.GetPurged()})
}

// deadSelection is the body of the dead-letter actions.
type deadSelection struct {
	IDs []string `json:"ids"`
	All bool     `json:"all"`
}

type replayedJSON struct {
	Queue    string `json:"queue"`
	Replayed int64  `json:"replayed"`
}

func (d *Dashboard) replayDead(w http.ResponseWriter, r *http.Request) {
	var sel deadSelection
	if !readBody(w, r, &sel, false) {
		return
	}
	ctx, cancel := callCtx(r)
	defer cancel()
	q := r.PathValue("q")
	resp, err := d.admin.ReplayDeadLetters(ctx, &qbridgev1.ReplayDeadLettersRequest{Queue: q, Ids: sel.IDs, All: sel.All})
	if err != nil {
		d.grpcError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, replayedJSON{Queue: q, Replayed: resp.GetReplayed()})
}

type deletedJSON struct {
	Queue   string `json:"queue"`
	Deleted int64  `json:"deleted"`
}

func (d *Dashboard) deleteDead(w http.ResponseWriter, r *http.Request) {
	var sel deadSelection
	if !readBody(w, r, &sel, false) {
		return
	}
	ctx, cancel := callCtx(r)
	defer cancel()
	q := r.PathValue("q")
	resp, err := d.admin.DeleteDeadLetters(ctx, &qbridgev1.DeleteDeadLettersRequest{Queue: q, Ids: sel.IDs, All: sel.All})
	if err != nil {
		d.grpcError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, deletedJSON{Queue: q, Deleted: resp.GetDeleted()})
}

// flagValue reports whether a query flag such as pattern=1 is set.
func flagValue(s string) bool {
	switch strings.ToLower(s) {
	case "1", "true", "yes", "on":
		return true
	}
	return false
}
