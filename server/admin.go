package server

import (
	"cmp"
	"context"
	"encoding/base64"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	qbridgev1 "github.com/qbridge/qbridge/gen/qbridge/v1"
	"github.com/qbridge/qbridge/server/broker"
)

// Admin implements qbridge.v1.AdminService over the same broker as Server.
type Admin struct {
	qbridgev1.UnimplementedAdminServiceServer
	s *Server
}

var _ qbridgev1.AdminServiceServer = (*Admin)(nil)

// Admin returns the AdminService of this server.
func (s *Server) Admin() *Admin { return &Admin{s: s} }

const (
	defaultPageSize = 50
	maxPageSize     = 1000
	maxDeadIDs      = 1000
)

// known validates queue and checks that qbridge knows it.
func (a *Admin) known(ctx context.Context, queue string) error {
	if err := ValidateName("queue", queue); err != nil {
		return invalidError{err}
	}
	ok, err := a.s.b.Known(ctx, queue)
	if err != nil {
		return err
	}
	if !ok {
		// A sharded queue is known when any of its shards is.
		shards, err := a.s.b.QueueShards(ctx, queue)
		if err != nil {
			return err
		}
		for _, q := range shards[1:] {
			if ok, err = a.s.b.Known(ctx, q); err != nil || ok {
				break
			}
		}
		if err != nil {
			return err
		}
	}
	if !ok {
		return notFoundError{queue}
	}
	return nil
}

func pageSize(n uint32, def int) (int, error) {
	switch {
	case n == 0:
		return def, nil
	case n > maxPageSize:
		return 0, invalidf("page_size %d is above the limit %d", n, maxPageSize)
	}
	return int(n), nil
}

// Page tokens are opaque to clients: "p1." + base64url of the position.
const pageTokenPrefix = "p1."

func encodePageToken(pos string) string {
	return pageTokenPrefix + base64.RawURLEncoding.EncodeToString([]byte(pos))
}

func decodePageToken(tok string) (string, error) {
	if tok == "" {
		return "", nil
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(tok, pageTokenPrefix))
	if !strings.HasPrefix(tok, pageTokenPrefix) || err != nil || len(b) == 0 {
		return "", invalidf("page_token %.40q is not one this server handed out; pass next_page_token unchanged, or nothing for the first page", tok)
	}
	return string(b), nil
}

// ListQueues implements AdminService.ListQueues.
func (a *Admin) ListQueues(ctx context.Context, req *qbridgev1.ListQueuesRequest) (*qbridgev1.ListQueuesResponse, error) {
	n, err := pageSize(req.GetPageSize(), 100)
	if err != nil {
		return nil, toStatus(err)
	}
	after, err := decodePageToken(req.GetPageToken())
	if err != nil {
		return nil, toStatus(err)
	}
	qs, err := a.s.queueNames(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	if visible, ok := ctx.Value(queueFilterKey{}).(func(string) bool); ok {
		qs = slices.DeleteFunc(qs, func(q string) bool { return !visible(q) })
	}
	slices.Sort(qs)
	i, _ := slices.BinarySearch(qs, after)
	if after != "" && i < len(qs) && qs[i] == after {
		i++
	}
	resp := &qbridgev1.ListQueuesResponse{}
	end := min(len(qs), i+n)
	resp.Queues = qs[i:end]
	if end < len(qs) {
		resp.NextPageToken = encodePageToken(qs[end-1])
	}
	return resp, nil
}

type queueFilterKey struct{}

// WithQueueFilter returns a context under which ListQueues lists only the
// queues for which visible returns true, paging over those alone (so that
// page tokens name no other queue). Authorization uses it to show a caller
// only the queues it administers.
func WithQueueFilter(ctx context.Context, visible func(queue string) bool) context.Context {
	return context.WithValue(ctx, queueFilterKey{}, visible)
}

// PeekMessages implements AdminService.PeekMessages.
func (a *Admin) PeekMessages(ctx context.Context, req *qbridgev1.PeekMessagesRequest) (*qbridgev1.PeekMessagesResponse, error) {
	var state broker.State
	switch req.GetState() {
	case qbridgev1.MessageState_MESSAGE_STATE_READY:
		state = broker.StateReady
	case qbridgev1.MessageState_MESSAGE_STATE_DELAYED:
		state = broker.StateDelayed
	case qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT:
		state = broker.StateInFlight
	case qbridgev1.MessageState_MESSAGE_STATE_DEAD:
		state = broker.StateDead
	default:
		return nil, toStatus(invalidf("state %v: use MESSAGE_STATE_READY, _DELAYED, _IN_FLIGHT or _DEAD", req.GetState()))
	}
	n, err := pageSize(req.GetPageSize(), defaultPageSize)
	if err != nil {
		return nil, toStatus(err)
	}
	pos, err := decodePageToken(req.GetPageToken())
	if err != nil {
		return nil, toStatus(err)
	}
	// A position is "<offset>" in an unsharded queue, "<shard>/<offset>"
	// in a sharded one, whose shards are paged one after the other.
	var shard int
	var offset int64
	if pos != "" {
		sh, off, sharded := strings.Cut(pos, "/")
		if !sharded {
			sh, off = "0", pos
		}
		var err1, err2 error
		shard, err1 = strconv.Atoi(sh)
		offset, err2 = strconv.ParseInt(off, 10, 64)
		if err1 != nil || err2 != nil || offset < 0 || shard < 0 {
			return nil, toStatus(invalidf("page_token is not one this server handed out"))
		}
	}
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	shards, err := a.s.b.QueueShards(ctx, req.GetQueue())
	if err != nil {
		return nil, toStatus(err)
	}
	// Read one position more than the page: it tells whether there is a
	// next page, and where it starts.
	resp := &qbridgev1.PeekMessagesResponse{}
	read := 0
	for shard < len(shards) && read <= n {
		want := n + 1 - read
		ps, got, err := a.s.b.Peek(ctx, shards[shard], state, offset, int64(want))
		if err != nil {
			return nil, toStatus(err)
		}
		for _, p := range ps {
			if read+int(p.Pos-offset) < n {
				m := queuedMessage(p, req.GetState())
				m.Shard = uint32(shard)
				resp.Messages = append(resp.Messages, m)
			}
		}
		read += got
		if got < want {
			shard, offset = shard+1, 0
			continue
		}
		offset += int64(got)
	}
	if read > n {
		next := strconv.FormatInt(offset-1, 10)
		if len(shards) > 1 {
			next = strconv.Itoa(shard) + "/" + next
		}
		resp.NextPageToken = encodePageToken(next)
	}
	return resp, nil
}

func queuedMessage(p broker.Peeked, state qbridgev1.MessageState) *qbridgev1.QueuedMessage {
	m := p.Message
	q := &qbridgev1.QueuedMessage{
		Id: m.ID, Payload: m.Payload, Headers: m.Headers, Deliveries: m.Deliveries, State: state,
		LastError: m.LastError, DeadReason: m.DeadReason, TaskType: m.TaskType,
	}
	if m.EnqueuedAt > 0 {
		q.EnqueueTime = ts(time.UnixMilli(m.EnqueuedAt))
	}
	if m.ExpireAt > 0 {
		q.ExpireTime = ts(time.UnixMilli(m.ExpireAt))
	}
	switch state {
	case qbridgev1.MessageState_MESSAGE_STATE_DELAYED:
		q.DeliverTime = ts(p.When)
	case qbridgev1.MessageState_MESSAGE_STATE_IN_FLIGHT:
		q.LeaseDeadline = ts(p.When)
	case qbridgev1.MessageState_MESSAGE_STATE_DEAD:
		q.Id = p.Key // the dead id, which Replay/DeleteDeadLetters take
		if m.DeadAt > 0 {
			q.DeadTime = ts(time.UnixMilli(m.DeadAt))
		}
	}
	return q
}

// PurgeQueue implements AdminService.PurgeQueue.
func (a *Admin) PurgeQueue(ctx context.Context, req *qbridgev1.PurgeQueueRequest) (*qbridgev1.PurgeQueueResponse, error) {
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	n, err := a.eachShard(ctx, req.GetQueue(), func(q string) (int64, error) {
		n, err := a.s.b.Purge(ctx, q)
		if err == nil {
			_ = a.s.b.SetDue(ctx, q, time.Time{})
		}
		return n, err
	})
	if err != nil {
		return nil, toStatus(err)
	}
	a.s.log.Info("queue purged", "queue", req.GetQueue(), "messages", n)
	return &qbridgev1.PurgeQueueResponse{Purged: n}, nil
}

// PauseQueue implements AdminService.PauseQueue.
func (a *Admin) PauseQueue(ctx context.Context, req *qbridgev1.PauseQueueRequest) (*qbridgev1.PauseQueueResponse, error) {
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	if _, err := a.eachShard(ctx, req.GetQueue(), func(q string) (int64, error) {
		return 0, a.s.b.SetPaused(ctx, q, true)
	}); err != nil {
		return nil, toStatus(err)
	}
	a.s.log.Info("queue paused", "queue", req.GetQueue())
	return &qbridgev1.PauseQueueResponse{}, nil
}

// ResumeQueue implements AdminService.ResumeQueue.
func (a *Admin) ResumeQueue(ctx context.Context, req *qbridgev1.ResumeQueueRequest) (*qbridgev1.ResumeQueueResponse, error) {
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	// Wake the queue's dispatchers on every instance now, rather than at
	// their next periodic look.
	if _, err := a.eachShard(ctx, req.GetQueue(), func(q string) (int64, error) {
		err := a.s.b.SetPaused(ctx, q, false)
		if err == nil {
			a.s.broadcastKick(ctx, q)
		}
		return 0, err
	}); err != nil {
		return nil, toStatus(err)
	}
	a.s.log.Info("queue resumed", "queue", req.GetQueue())
	return &qbridgev1.ResumeQueueResponse{}, nil
}

// DeleteQueue implements AdminService.DeleteQueue.
func (a *Admin) DeleteQueue(ctx context.Context, req *qbridgev1.DeleteQueueRequest) (*qbridgev1.DeleteQueueResponse, error) {
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	shards, err := a.s.b.QueueShards(ctx, req.GetQueue())
	if err != nil {
		return nil, toStatus(err)
	}
	if len(shards) > 1 && !req.GetForce() {
		// Refuse before deleting any shard, rather than half way.
		var held int64
		for _, q := range shards {
			st, err := a.s.b.Stats(ctx, q)
			if err != nil {
				return nil, toStatus(err)
			}
			held += st.InFlight
		}
		if held > 0 {
			return nil, toStatus(&broker.InFlightError{Queue: req.GetQueue(), InFlight: held})
		}
	}
	// The last shards first: until shard 0 is gone the queue still exists.
	for i := len(shards) - 1; i >= 0; i-- {
		if err := a.s.b.DeleteQueue(ctx, shards[i], req.GetForce()); err != nil {
			return nil, toStatus(err)
		}
		// Every instance must register the queue again if it is recreated.
		a.s.broadcast(ctx, "forget", shards[i])
	}
	// The shard table keeps the queue's shards: an instance that had not
	// heard of a removal would enqueue to a shard nobody reads. Shards are
	// never removed.
	a.s.log.Info("queue deleted", "queue", req.GetQueue(), "force", req.GetForce())
	return &qbridgev1.DeleteQueueResponse{}, nil
}

func deadSelection(ids []string, all bool) error {
	switch {
	case all && len(ids) > 0:
		return invalidf("give ids or all, not both")
	case !all && len(ids) == 0:
		return invalidf("no ids; give the ids of dead letters (PeekMessages with MESSAGE_STATE_DEAD), or all")
	case len(ids) > maxDeadIDs:
		return invalidf("%d ids; the limit is %d per call (or use all)", len(ids), maxDeadIDs)
	}
	for i, id := range ids {
		if id == "" || len(id) > 2*maxIDLen {
			return invalidf("ids[%d] %.40q is not a dead letter id", i, id)
		}
	}
	return nil
}

// ReplayDeadLetters implements AdminService.ReplayDeadLetters.
func (a *Admin) ReplayDeadLetters(ctx context.Context, req *qbridgev1.ReplayDeadLettersRequest) (*qbridgev1.ReplayDeadLettersResponse, error) {
	if err := deadSelection(req.GetIds(), req.GetAll()); err != nil {
		return nil, toStatus(err)
	}
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	n, err := a.eachShard(ctx, req.GetQueue(), func(q string) (int64, error) {
		return a.s.b.ReplayDead(ctx, q, req.GetIds(), req.GetAll())
	})
	if err != nil {
		return nil, toStatus(err)
	}
	a.s.log.Info("dead letters replayed", "queue", req.GetQueue(), "count", n)
	return &qbridgev1.ReplayDeadLettersResponse{Replayed: n}, nil
}

// DeleteDeadLetters implements AdminService.DeleteDeadLetters.
func (a *Admin) DeleteDeadLetters(ctx context.Context, req *qbridgev1.DeleteDeadLettersRequest) (*qbridgev1.DeleteDeadLettersResponse, error) {
	if err := deadSelection(req.GetIds(), req.GetAll()); err != nil {
		return nil, toStatus(err)
	}
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	n, err := a.eachShard(ctx, req.GetQueue(), func(q string) (int64, error) {
		return a.s.b.DeleteDead(ctx, q, req.GetIds(), req.GetAll())
	})
	if err != nil {
		return nil, toStatus(err)
	}
	a.s.log.Info("dead letters deleted", "queue", req.GetQueue(), "count", n)
	return &qbridgev1.DeleteDeadLettersResponse{Deleted: n}, nil
}

// GetQueueConfig implements AdminService.GetQueueConfig.
func (a *Admin) GetQueueConfig(ctx context.Context, req *qbridgev1.GetQueueConfigRequest) (*qbridgev1.GetQueueConfigResponse, error) {
	if err := a.known(ctx, req.GetQueue()); err != nil {
		return nil, toStatus(err)
	}
	cfg, err := a.effectiveConfig(ctx, req.GetQueue())
	if err != nil {
		return nil, toStatus(err)
	}
	return &qbridgev1.GetQueueConfigResponse{Config: cfg}, nil
}

// UpdateQueueConfig implements AdminService.UpdateQueueConfig.
func (a *Admin) UpdateQueueConfig(ctx context.Context, req *qbridgev1.UpdateQueueConfigRequest) (*qbridgev1.UpdateQueueConfigResponse, error) {
	if err := ValidateName("queue", req.GetQueue()); err != nil {
		return nil, toStatus(invalidError{err})
	}
	c := req.GetConfig()
	p, err := retryPolicy(c.GetRetryPolicy())
	if err != nil {
		return nil, toStatus(invalidf("config.%v", err))
	}
	if p.DedupWindow, err = durationIn("config.dedup_window", c.GetDedupWindow(), time.Second, 7*24*time.Hour); err != nil {
		return nil, toStatus(invalidError{err})
	}
	d := a.s.b.Defaults()
	effMin, effMax := cmp.Or(p.BackoffMin, d.BackoffMin), cmp.Or(p.BackoffMax, d.BackoffMax)
	if effMin > effMax {
		return nil, toStatus(invalidf("config.retry_policy: min_backoff %v would be above max_backoff %v", effMin, effMax))
	}
	if c.GetMaxLength() > 1<<40 {
		return nil, toStatus(invalidf("config.max_length %d is absurd; the limit is %d", c.GetMaxLength(), int64(1)<<40))
	}
	p.MaxLength = int64(c.GetMaxLength())
	expired := ""
	switch c.GetExpiredAction() {
	case qbridgev1.ExpiredAction_EXPIRED_ACTION_UNSPECIFIED:
	case qbridgev1.ExpiredAction_EXPIRED_ACTION_DROP:
		expired = "drop"
	case qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER:
		expired = "dead"
	default:
		return nil, toStatus(invalidf("config.expired_action %d is unknown", c.GetExpiredAction()))
	}
	q := req.GetQueue()
	if c.GetShards() > broker.MaxShards {
		return nil, toStatus(invalidf("config.shards %d is above the limit %d", c.GetShards(), broker.MaxShards))
	}
	shards, err := a.s.b.QueueShards(ctx, q)
	if err != nil {
		return nil, toStatus(err)
	}
	if n := int(c.GetShards()); n != 0 && n < len(shards) {
		return nil, toStatus(&broker.ShrinkError{Queue: q, Have: len(shards), Ask: n})
	}
	for _, sq := range shards {
		if err := a.s.b.SetConfig(ctx, sq, p, expired); err != nil {
			return nil, toStatus(err)
		}
	}
	a.s.registerQueue(ctx, q)
	if n := int(c.GetShards()); n > len(shards) {
		paused, err := a.s.b.Stats(ctx, q)
		if err != nil {
			return nil, toStatus(err)
		}
		// The new shards get the queue's config (and pause) before any
		// instance can see them.
		shards, err = a.s.b.GrowShards(ctx, q, n, func(more []string) error {
			for _, sq := range more {
				if err := a.s.b.SetConfig(ctx, sq, p, expired); err != nil {
					return err
				}
				if paused.Paused {
					if err := a.s.b.SetPaused(ctx, sq, true); err != nil {
						return err
					}
				}
			}
			return a.s.b.RegisterQueue(ctx, more...)
		})
		if err != nil {
			return nil, toStatus(err)
		}
		// This instance serves the new shards before the call returns;
		// the others as soon as they hear.
		a.s.refreshShards(ctx, q)
		a.s.announce(ctx, "shards", q)
		a.s.log.Info("queue sharded", "queue", q, "shards", len(shards))
	}
	cfg, err := a.effectiveConfig(ctx, q)
	if err != nil {
		return nil, toStatus(err)
	}
	a.s.log.Info("queue config updated", "queue", q)
	return &qbridgev1.UpdateQueueConfigResponse{Config: cfg}, nil
}

// effectiveConfig is the queue's stored policy over the server defaults.
func (a *Admin) effectiveConfig(ctx context.Context, queue string) (*qbridgev1.QueueConfig, error) {
	p, storedExpired, err := a.s.b.Config(ctx, queue)
	if err != nil {
		return nil, err
	}
	shards, err := a.s.b.QueueShards(ctx, queue)
	if err != nil {
		return nil, err
	}
	d := a.s.b.Defaults()
	pick := func(v, def time.Duration) *durationpb.Duration {
		if v == 0 {
			v = def
		}
		return durationpb.New(v)
	}
	maxAtt := p.MaxAttempts
	if maxAtt == 0 {
		maxAtt = d.MaxAttempts
	}
	maxLen := p.MaxLength
	if maxLen == 0 {
		maxLen = d.MaxLength
	}
	expired := qbridgev1.ExpiredAction_EXPIRED_ACTION_DROP
	if storedExpired == "dead" || storedExpired == "" && d.ExpiredDeadLetter {
		expired = qbridgev1.ExpiredAction_EXPIRED_ACTION_DEAD_LETTER
	}
	return &qbridgev1.QueueConfig{
		RetryPolicy: &qbridgev1.RetryPolicy{
			MaxAttempts: uint32(maxAtt),
			MinBackoff:  pick(p.BackoffMin, d.BackoffMin),
			MaxBackoff:  pick(p.BackoffMax, d.BackoffMax),
		},
		MaxLength:     uint64(maxLen),
		ExpiredAction: expired,
		DedupWindow:   pick(p.DedupWindow, d.DedupWindow),
		Shards:        uint32(len(shards)),
	}, nil
}

// eachShard runs op on every shard of queue (the queue itself when it is
// not sharded), reading the shard table from Redis rather than this
// instance's copy, and adds up what op returns. It stops at the first error.
func (a *Admin) eachShard(ctx context.Context, queue string, op func(q string) (int64, error)) (int64, error) {
	shards, err := a.s.b.QueueShards(ctx, queue)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, q := range shards {
		n, err := op(q)
		total += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// broadcastKick wakes queue's dispatchers on every instance.
func (s *Server) broadcastKick(ctx context.Context, queue string) {
	s.broadcast(ctx, "kick", queue)
}

// broadcast applies an event here and announces it to every instance.
func (s *Server) broadcast(ctx context.Context, verb, queue string) {
	s.applyEvent(verb + " " + queue)
	s.announce(ctx, verb, queue)
}

// announce publishes an event to every instance (this one included, when
// its pub/sub connection gets it back), without applying it here first.
func (s *Server) announce(ctx context.Context, verb, queue string) {
	if _, err := s.b.Publish(ctx, eventsChannel, []byte(verb+" "+queue)); err != nil {
		s.log.Debug("cannot broadcast an event", "event", verb, "queue", queue, "err", err)
	}
}

// eventsChannel carries events for every instance: "kick <queue>" (look
// at the queue again: it was resumed), "forget <queue>" (it was deleted:
// register it again when it is used), "shards <queue>" (its shards changed:
// reload them) and "ready <queue>" (published by the scripts when a push
// finds the ready list empty; see idle.go).
const eventsChannel = "{qbridge}:events"

func (s *Server) applyEvent(payload string) {
	verb, arg, _ := strings.Cut(payload, " ")
	switch verb {
	case "kick":
		s.kickQueue(arg)
	case "forget":
		s.known.Delete(arg)
	case "ready":
		s.idleQueues.wake(arg)
	case "shards":
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s.refreshShards(ctx, arg)
		}()
	default:
		s.log.Debug("unknown event", "event", fmt.Sprintf("%.64q", payload))
	}
}
