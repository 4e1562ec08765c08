package main

// All output formatting lives here: the text and JSON forms of every kind of
// record the commands print, payload rendering, tables and key/value lists.

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/qbridge/qbridge/client"
	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
)

// printer writes records to stdout: as text, or as JSON lines. It is safe
// for concurrent use; each record is written with one Write.
type printer struct {
	mu   sync.Mutex
	w    io.Writer
	json bool
}

func newPrinter(w io.Writer, json bool) *printer { return &printer{w: w, json: json} }

// write writes b at once.
func (p *printer) write(b []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, err := p.w.Write(b)
	return err
}

// jsonLine writes v as one line of JSON.
func (p *printer) jsonLine(v any) error {
	var sb strings.Builder
	enc := json.NewEncoder(&sb)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return err
	}
	return p.write([]byte(sb.String()))
}

// line writes one line of text.
func (p *printer) line(format string, args ...any) error {
	return p.write([]byte(fmt.Sprintf(format, args...) + "\n"))
}

// emit writes v as JSON in json mode, else the text that text returns.
func (p *printer) emit(v any, text func() string) error {
	if p.json {
		return p.jsonLine(v)
	}
	return p.write([]byte(text()))
}

// table renders rows under header, in aligned columns.
func table(header []string, rows [][]string) string {
	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	_ = tw.Flush()
	return trimLineEnds(sb.String())
}

// kv renders key/value pairs, keys aligned; pairs with an empty value are
// left out.
func kv(pairs ...[2]string) string {
	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	for _, p := range pairs {
		if p[1] != "" {
			fmt.Fprintf(tw, "%s\t%s\n", p[0], p[1])
		}
	}
	_ = tw.Flush()
	return trimLineEnds(sb.String())
}

// trimLineEnds removes the padding tabwriter leaves at the end of lines.
func trimLineEnds(s string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, " ")
	}
	return strings.Join(lines, "\n")
}

// --- payloads ---

// payloadText is how text output shows a payload on one line: the text
// itself when it is valid UTF-8 without control characters, Go-quoted when
// it is valid UTF-8 with some (a newline, a tab), else "base64:" and the
// standard base64 encoding.
func payloadText(b []byte) string {
	if !utf8.Valid(b) {
		return "base64:" + base64.StdEncoding.EncodeToString(b)
	}
	s := string(b)
	if strings.IndexFunc(s, unicode.IsControl) >= 0 || strings.HasPrefix(s, `"`) || strings.HasPrefix(s, "base64:") {
		return strconv.Quote(s)
	}
	return s
}

// payloadBlock is how text output shows a payload that may take several
// lines (key/value output): the text when it is valid UTF-8, else base64.
func payloadBlock(b []byte) string {
	if !utf8.Valid(b) {
		return "base64:" + base64.StdEncoding.EncodeToString(b)
	}
	if strings.ContainsAny(string(b), "\n\r\t") {
		return strconv.Quote(string(b))
	}
	return string(b)
}

// truncate shortens s to n runes with an ellipsis.
func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n-1]) + "…"
}

// jsonPayload is the JSON form of a payload: "payload" is the text when it
// is valid UTF-8 (else null), "payload_base64" always the base64.
type jsonPayload struct {
	Payload       *string `json:"payload"`
	PayloadBase64 string  `json:"payload_base64"`
}

func newJSONPayload(b []byte) jsonPayload {
	p := jsonPayload{PayloadBase64: base64.StdEncoding.EncodeToString(b)}
	if utf8.Valid(b) {
		s := string(b)
		p.Payload = &s
	}
	return p
}

// --- times and durations ---

// jsonTime formats t for JSON (RFC 3339 in UTC, milliseconds); "" for zero.
func jsonTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format("2006-01-02T15:04:05.000Z07:00")
}

// textTime formats t for text output: local time to the second; "" for
// zero.
func textTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

// tsTime converts t; zero for nil.
func tsTime(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

// textAge formats a duration for tables: whole seconds (ms under a
// second), "-" for none.
func textAge(d time.Duration) string {
	switch {
	case d <= 0:
		return "-"
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	default:
		return d.Round(time.Second).String()
	}
}

func rate(r float64) string { return strconv.FormatFloat(r, 'f', 1, 64) }

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// --- enqueue ---

type jsonEnqueued struct {
	Queue     string `json:"queue"`
	ID        string `json:"id"`
	Duplicate bool   `json:"duplicate"`
}

// printEnqueued reports one enqueued message: its id (text), or a JSON
// object. notes gets a remark about duplicates in text mode.
func (p *printer) printEnqueued(queue string, r client.EnqueueResult, notes io.Writer) error {
	if p.json {
		return p.jsonLine(jsonEnqueued{Queue: queue, ID: r.ID, Duplicate: r.Duplicate})
	}
	if r.Duplicate {
		fmt.Fprintf(notes, "qbridge: duplicate of message %s (same dedup key): nothing enqueued\n", r.ID)
	}
	return p.line("%s", r.ID)
}

// printEnqueuedBatch is printEnqueued for many messages, in one write.
func (p *printer) printEnqueuedBatch(queue string, rs []client.EnqueueResult, notes io.Writer) error {
	var sb strings.Builder
	enc := json.NewEncoder(&sb)
	enc.SetEscapeHTML(false)
	for _, r := range rs {
		switch {
		case p.json:
			if err := enc.Encode(jsonEnqueued{Queue: queue, ID: r.ID, Duplicate: r.Duplicate}); err != nil {
				return err
			}
		default:
			if r.Duplicate {
				fmt.Fprintf(notes, "qbridge: duplicate of message %s (same dedup key): nothing enqueued\n", r.ID)
			}
			sb.WriteString(r.ID + "\n")
		}
	}
	return p.write([]byte(sb.String()))
}

// --- deliveries ---

type jsonDelivery struct {
	Queue string `json:"queue"`
	ID    string `json:"id"`
	jsonPayload
	Headers       map[string]string `json:"headers,omitempty"`
	TaskType      string            `json:"task_type,omitempty"`
	Attempt       int               `json:"attempt"`
	EnqueueTime   string            `json:"enqueue_time,omitempty"`
	LeaseDeadline string            `json:"lease_deadline,omitempty"`
	LastError     string            `json:"last_error,omitempty"`
	Shard         int               `json:"shard,omitempty"`
}

// printDelivery prints a consumed message. Text: "ID<TAB>PAYLOAD", with
// "QUEUE<TAB>" in front when withQueue (several queues consumed).
func (p *printer) printDelivery(d *client.Delivery, withQueue bool) error {
	if p.json {
		return p.jsonLine(jsonDelivery{
			Queue: d.Queue, ID: d.ID, jsonPayload: newJSONPayload(d.Payload), Headers: d.Headers,
			TaskType: d.TaskType, Attempt: d.Attempt, EnqueueTime: jsonTime(d.EnqueueTime),
			LeaseDeadline: jsonTime(d.LeaseDeadline), LastError: d.LastError, Shard: d.Shard,
		})
	}
	if withQueue {
		return p.line("%s\t%s\t%s", d.Queue, d.ID, payloadText(d.Payload))
	}
	return p.line("%s\t%s", d.ID, payloadText(d.Payload))
}

// --- pub/sub ---

type jsonPublished struct {
	Channel   string `json:"channel"`
	Receivers int64  `json:"receivers"`
}

func (p *printer) printPublished(channel string, n int64) error {
	return p.emit(jsonPublished{Channel: channel, Receivers: n}, func() string { return fmt.Sprintf("%d\n", n) })
}

type jsonPubSubMessage struct {
	Time    string `json:"time"`
	Channel string `json:"channel"`
	Pattern string `json:"pattern,omitempty"`
	jsonPayload
}

// printPubSub prints a received message. Text: "HH:MM:SS.mmm  CHANNEL
// [(PATTERN)]  PAYLOAD".
func (p *printer) printPubSub(m *client.PubSubMessage, at time.Time) error {
	return p.emit(jsonPubSubMessage{Time: jsonTime(at), Channel: m.Channel, Pattern: m.Pattern, jsonPayload: newJSONPayload(m.Payload)},
		func() string {
			ch := m.Channel
			if m.Pattern != "" {
				ch += " (" + m.Pattern + ")"
			}
			return fmt.Sprintf("%s  %s  %s\n", at.Local().Format("15:04:05.000"), ch, payloadText(m.Payload))
		})
}

// --- stats ---

type jsonCounters struct {
	Enqueued     int64 `json:"enqueued"`
	Acked        int64 `json:"acked"`
	Nacked       int64 `json:"nacked"`
	LeaseExpired int64 `json:"lease_expired"`
	DeadLettered int64 `json:"dead_lettered"`
	Expired      int64 `json:"expired"`
}

func newJSONCounters(c *qbridgev1.QueueCounters) jsonCounters {
	return jsonCounters{
		Enqueued: c.GetEnqueued(), Acked: c.GetAcked(), Nacked: c.GetNacked(),
		LeaseExpired: c.GetLeaseExpired(), DeadLettered: c.GetDeadLettered(), Expired: c.GetExpired(),
	}
}

func (c jsonCounters) text() string {
	return fmt.Sprintf("enqueued %d, acked %d, nacked %d, lease expired %d, dead-lettered %d, expired %d",
		c.Enqueued, c.Acked, c.Nacked, c.LeaseExpired, c.DeadLettered, c.Expired)
}

type jsonStats struct {
	Time                  string                  `json:"time,omitempty"`
	Queue                 string                  `json:"queue"`
	Ready                 int64                   `json:"ready"`
	InFlight              int64                   `json:"in_flight"`
	Delayed               int64                   `json:"delayed"`
	Dead                  int64                   `json:"dead"`
	OldestReadyAgeSeconds float64                 `json:"oldest_ready_age_seconds"`
	EnqueueRate           float64                 `json:"enqueue_rate"`
	AckRate               float64                 `json:"ack_rate"`
	Paused                bool                    `json:"paused"`
	Consumers             int64                   `json:"consumers"`
	Counters              jsonCounters            `json:"counters"`
	TaskTypes             map[string]jsonCounters `json:"task_types,omitempty"`
	Shards                []jsonShard             `json:"shards,omitempty"`
}

type jsonShard struct {
	Shard    uint32 `json:"shard"`
	List     string `json:"list"`
	Ready    int64  `json:"ready"`
	InFlight int64  `json:"in_flight"`
	Delayed  int64  `json:"delayed"`
	Dead     int64  `json:"dead"`
}

func newJSONStats(s *qbridgev1.GetQueueStatsResponse) jsonStats {
	js := jsonStats{
		Queue: s.GetQueue(), Ready: s.GetReady(), InFlight: s.GetInFlight(), Delayed: s.GetDelayed(), Dead: s.GetDead(),
		OldestReadyAgeSeconds: s.GetOldestReadyAge().AsDuration().Seconds(),
		EnqueueRate:           s.GetEnqueueRate(), AckRate: s.GetAckRate(), Paused: s.GetPaused(),
		Consumers: s.GetConsumers(),
		Counters:  newJSONCounters(s.GetCounters()),
	}
	for _, sh := range s.GetShards() {
		js.Shards = append(js.Shards, jsonShard{Shard: sh.GetShard(), List: sh.GetList(),
			Ready: sh.GetReady(), InFlight: sh.GetInFlight(), Delayed: sh.GetDelayed(), Dead: sh.GetDead()})
	}
	for t, c := range s.GetTaskTypes() {
		if js.TaskTypes == nil {
			js.TaskTypes = map[string]jsonCounters{}
		}
		js.TaskTypes[t] = newJSONCounters(c)
	}
	return js
}

// statsText is the key/value text of one queue's stats.
func statsText(s jsonStats) string {
	out := kv(
		[2]string{"queue", s.Queue},
		[2]string{"ready", strconv.FormatInt(s.Ready, 10)},
		[2]string{"in flight", strconv.FormatInt(s.InFlight, 10)},
		[2]string{"delayed", strconv.FormatInt(s.Delayed, 10)},
		[2]string{"dead", strconv.FormatInt(s.Dead, 10)},
		[2]string{"oldest ready", textAge(time.Duration(s.OldestReadyAgeSeconds * float64(time.Second)))},
		[2]string{"enqueue rate", rate(s.EnqueueRate) + "/s (last minute)"},
		[2]string{"ack rate", rate(s.AckRate) + "/s (last minute)"},
		[2]string{"paused", yesNo(s.Paused)},
		[2]string{"consumers", strconv.FormatInt(s.Consumers, 10)},
		[2]string{"totals", s.Counters.text()},
	)
	for _, t := range slices.Sorted(maps.Keys(s.TaskTypes)) {
		out += kv([2]string{"task type " + t, s.TaskTypes[t].text()})
	}
	for _, sh := range s.Shards {
		out += kv([2]string{fmt.Sprintf("shard %d", sh.Shard), fmt.Sprintf("ready %d, in flight %d, delayed %d, dead %d (list %s)",
			sh.Ready, sh.InFlight, sh.Delayed, sh.Dead, sh.List)})
	}
	return out
}

var statsHeader = []string{"QUEUE", "READY", "IN FLIGHT", "DELAYED", "DEAD", "ENQ/S", "ACK/S", "OLDEST", "CONSUMERS", "PAUSED"}

// statsRow is one queue's row of the stats table; enq and ack are the
// rates to show.
func statsRow(s jsonStats, enq, ack float64) []string {
	paused := ""
	if s.Paused {
		paused = "paused"
	}
	return []string{
		s.Queue, strconv.FormatInt(s.Ready, 10), strconv.FormatInt(s.InFlight, 10),
		strconv.FormatInt(s.Delayed, 10), strconv.FormatInt(s.Dead, 10), rate(enq), rate(ack),
		textAge(time.Duration(s.OldestReadyAgeSeconds * float64(time.Second))), strconv.FormatInt(s.Consumers, 10), paused,
	}
}

// --- queued messages (peek, dead list) ---

type jsonQueued struct {
	Queue string `json:"queue"`
	ID    string `json:"id"`
	State string `json:"state"`
	jsonPayload
	Headers       map[string]string `json:"headers,omitempty"`
	TaskType      string            `json:"task_type,omitempty"`
	Deliveries    uint32            `json:"deliveries"`
	EnqueueTime   string            `json:"enqueue_time,omitempty"`
	DeliverTime   string            `json:"deliver_time,omitempty"`
	LeaseDeadline string            `json:"lease_deadline,omitempty"`
	ExpireTime    string            `json:"expire_time,omitempty"`
	LastError     string            `json:"last_error,omitempty"`
	DeadTime      string            `json:"dead_time,omitempty"`
	DeadReason    string            `json:"dead_reason,omitempty"`
}

func newJSONQueued(queue string, m *qbridgev1.QueuedMessage) jsonQueued {
	return jsonQueued{
		Queue: queue, ID: m.GetId(), State: stateName(m.GetState()), jsonPayload: newJSONPayload(m.GetPayload()),
		Headers: m.GetHeaders(), TaskType: m.GetTaskType(), Deliveries: m.GetDeliveries(),
		EnqueueTime:   jsonTime(tsTime(m.GetEnqueueTime())),
		DeliverTime:   jsonTime(tsTime(m.GetDeliverTime())),
		LeaseDeadline: jsonTime(tsTime(m.GetLeaseDeadline())),
		ExpireTime:    jsonTime(tsTime(m.GetExpireTime())),
		LastError:     m.GetLastError(),
		DeadTime:      jsonTime(tsTime(m.GetDeadTime())),
		DeadReason:    m.GetDeadReason(),
	}
}

// queuedTable is the text table of peeked messages in one state.
func queuedTable(state qbridgev1.MessageState, ms []*qbridgev1.QueuedMessage) string {
	header := []string{"ID", "DELIVERIES", "ENQUEUED"}
	switch state {
	case qbridgev1.MessageState_MESSAGE_STATE_DELAYED:
		header = append(header, "DELIVER AT")
	case qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT:
		header = append(header, "LEASE DEADLINE")
	case qbridgev1.MessageState_MESSAGE_STATE_DEAD:
		header = append(header, "DIED", "REASON")
	}
	header = append(header, "TASK TYPE", "LAST ERROR", "PAYLOAD")
	rows := make([][]string, 0, len(ms))
	for _, m := range ms {
		r := []string{m.GetId(), strconv.FormatUint(uint64(m.GetDeliveries()), 10), textTime(tsTime(m.GetEnqueueTime()))}
		switch state {
		case qbridgev1.MessageState_MESSAGE_STATE_DELAYED:
			r = append(r, textTime(tsTime(m.GetDeliverTime())))
		case qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT:
			r = append(r, textTime(tsTime(m.GetLeaseDeadline())))
		case qbridgev1.MessageState_MESSAGE_STATE_DEAD:
			r = append(r, textTime(tsTime(m.GetDeadTime())), orDash(m.GetDeadReason()))
		}
		r = append(r, orDash(m.GetTaskType()), orDash(truncate(oneLine(m.GetLastError()), 40)), truncate(payloadText(m.GetPayload()), 60))
		for i := range r {
			r[i] = strings.ReplaceAll(r[i], "\t", " ")
		}
		rows = append(rows, r)
	}
	return table(header, rows)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// stateName is the command-line name of a message state.
func stateName(s qbridgev1.MessageState) string {
	switch s {
	case qbridgev1.MessageState_MESSAGE_STATE_READY:
		return "ready"
	case qbridgev1.MessageState_MESSAGE_STATE_DELAYED:
		return "delayed"
	case qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT:
		return "in-flight"
	case qbridgev1.MessageState_MESSAGE_STATE_DEAD:
		return "dead"
	case qbridgev1.MessageState_MESSAGE_STATE_SUCCEEDED:
		return "succeeded"
	case qbridgev1.MessageState_MESSAGE_STATE_FAILED:
		return "failed"
	}
	return strings.ToLower(strings.TrimPrefix(s.String(), "MESSAGE_STATE_"))
}

// --- results and messages ---

type jsonResult struct {
	Queue string `json:"queue"`
	ID    string `json:"id"`
	State string `json:"state"`
	// The result payload, as payload/payload_base64.
	Result       *string `json:"result"`
	ResultBase64 string  `json:"result_base64"`
	Error        string  `json:"error,omitempty"`
	FinishTime   string  `json:"finish_time,omitempty"`
	Attempts     int     `json:"attempts"`
}

func (p *printer) printResult(queue string, r *client.Result) error {
	jp := newJSONPayload(r.Payload)
	v := jsonResult{
		Queue: queue, ID: r.ID, State: r.State.String(), Result: jp.Payload, ResultBase64: jp.PayloadBase64,
		Error: r.Error, FinishTime: jsonTime(r.FinishTime), Attempts: r.Attempts,
	}
	return p.emit(v, func() string {
		return kv(
			[2]string{"id", r.ID},
			[2]string{"state", r.State.String()},
			[2]string{"attempts", strconv.Itoa(r.Attempts)},
			[2]string{"finished", textTime(r.FinishTime)},
			[2]string{"error", oneLine(r.Error)},
			[2]string{"result", payloadBlock(r.Payload)},
		)
	})
}

type jsonMessageInfo struct {
	Queue      string `json:"queue"`
	ID         string `json:"id"`
	State      string `json:"state"`
	Deliveries int    `json:"deliveries"`
	TaskType   string `json:"task_type,omitempty"`
	LastError  string `json:"last_error,omitempty"`
}

func (p *printer) printMessageInfo(queue string, m *client.MessageInfo) error {
	state := stateName(qbridgev1.MessageState(m.State))
	return p.emit(jsonMessageInfo{Queue: queue, ID: m.ID, State: state, Deliveries: m.Deliveries, TaskType: m.TaskType, LastError: m.LastError},
		func() string {
			return kv(
				[2]string{"id", m.ID},
				[2]string{"state", state},
				[2]string{"deliveries", strconv.Itoa(m.Deliveries)},
				[2]string{"task type", m.TaskType},
				[2]string{"last error", oneLine(m.LastError)},
			)
		})
}

// --- queue config ---

type jsonConfig struct {
	Queue         string `json:"queue"`
	MaxAttempts   uint32 `json:"max_attempts"`
	MinBackoff    string `json:"min_backoff"`
	MaxBackoff    string `json:"max_backoff"`
	MaxLength     uint64 `json:"max_length"`
	ExpiredAction string `json:"expired_action"`
	DedupWindow   string `json:"dedup_window"`
	Shards        uint32 `json:"shards"`
}

func (p *printer) printConfig(queue string, c *qbridgev1.QueueConfig) error {
	rp := c.GetRetryPolicy()
	v := jsonConfig{
		Queue: queue, MaxAttempts: rp.GetMaxAttempts(),
		MinBackoff: rp.GetMinBackoff().AsDuration().String(), MaxBackoff: rp.GetMaxBackoff().AsDuration().String(),
		MaxLength: c.GetMaxLength(), ExpiredAction: expiredActionName(c.GetExpiredAction()),
		DedupWindow: c.GetDedupWindow().AsDuration().String(),
		Shards:      c.GetShards(),
	}
	return p.emit(v, func() string {
		maxLen := strconv.FormatUint(v.MaxLength, 10)
		if v.MaxLength == 0 {
			maxLen = "0 (unbounded)"
		}
		return kv(
			[2]string{"queue", queue},
			[2]string{"max attempts", strconv.FormatUint(uint64(v.MaxAttempts), 10)},
			[2]string{"min backoff", v.MinBackoff},
			[2]string{"max backoff", v.MaxBackoff},
			[2]string{"max length", maxLen},
			[2]string{"expired action", v.ExpiredAction},
			[2]string{"dedup window", v.DedupWindow},
			[2]string{"shards", strconv.FormatUint(uint64(v.Shards), 10)},
		)
	})
}

func expiredActionName(a qbridgev1.ExpiredAction) string {
	switch a {
	case qbridgev1.ExpiredAction_EXPIRED_ACTION_DROP:
		return "drop"
	case qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER:
		return "dead-letter"
	}
	return "default"
}

// --- simple admin outcomes ---

// printCount reports an admin action that affected n messages, e.g.
// "purged 3 messages from jobs".
func (p *printer) printCount(queue, verb, field string, n int64, what string) error {
	return p.emit(map[string]any{"queue": queue, field: n}, func() string {
		return fmt.Sprintf("%s %d %s of %s\n", verb, n, plural(n, what), queue)
	})
}

func plural(n int64, what string) string {
	if n == 1 {
		return what
	}
	return what + "s"
}
