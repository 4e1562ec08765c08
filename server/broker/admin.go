package broker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// State is where a message is.
type State int

// Message states.
const (
	StateReady State = iota + 1
	StateDelayed
	StateInFlight
	StateDead
)

// Peeked is a message seen by Peek.
type Peeked struct {
	Message *Message
	// Key is the dead id for dead letters, the lease id for in-flight
	// messages, empty otherwise.
	Key string
	// When is the due time (delayed), the lease deadline (in flight), or
	// zero.
	When time.Time
	// Pos is the message's position in its state's order.
	Pos int64
}

// Peek returns the messages at positions offset to offset+n-1 of queue's
// messages in state, without changing anything, and how many positions it
// read (a message settled between the two reads is skipped, so fewer
// messages than positions may come back).
func (b *Broker) Peek(ctx context.Context, queue string, state State, offset, n int64) ([]Peeked, int, error) {
	k := b.keys
	var out []Peeked
	decode := func(el string, p Peeked) {
		m, err := decodeEnvelope([]byte(el))
		if err != nil {
			m = &Message{Payload: []byte(el)} // a plain client's element
		}
		p.Message = m
		out = append(out, p)
	}
	switch state {
	case StateReady:
		els, err := b.rdb.LRange(ctx, k.Ready(queue), offset, offset+n-1).Result()
		if err != nil {
			return nil, 0, wrap(err, "peek %q", queue)
		}
		for i, el := range els {
			decode(el, Peeked{Pos: offset + int64(i)})
		}
		return out, len(els), nil
	case StateDelayed, StateInFlight, StateDead:
		index, store := k.Delayed(queue), k.Scheduled(queue)
		if state == StateInFlight {
			index, store = k.Leases(queue), k.InFlight(queue)
		} else if state == StateDead {
			index, store = k.DeadIndex(queue), k.Dead(queue)
		}
		zs, err := b.rdb.ZRangeWithScores(ctx, index, offset, offset+n-1).Result()
		if err != nil {
			return nil, 0, wrap(err, "peek %q", queue)
		}
		if len(zs) == 0 {
			return nil, 0, nil
		}
		members := make([]string, len(zs))
		for i, z := range zs {
			members[i], _ = z.Member.(string)
		}
		els, err := b.rdb.HMGet(ctx, store, members...).Result()
		if err != nil {
			return nil, 0, wrap(err, "peek %q", queue)
		}
		for i, el := range els {
			s, ok := el.(string)
			if !ok {
				continue // settled or moved between the two reads
			}
			p := Peeked{Pos: offset + int64(i)}
			if state != StateDelayed {
				p.Key = members[i]
			}
			if state != StateDead {
				p.When = time.UnixMilli(int64(zs[i].Score))
			}
			decode(s, p)
		}
		return out, len(zs), nil
	}
	return nil, 0, fmt.Errorf("peek %q: unknown state %d", queue, state)
}

// Purge removes every ready and delayed message of queue.
func (b *Broker) Purge(ctx context.Context, queue string) (int64, error) {
	n, err := b.run(ctx, purgeScript, queue).Int64()
	return n, wrap(err, "purge %q", queue)
}

// SetPaused pauses or resumes queue.
func (b *Broker) SetPaused(ctx context.Context, queue string, paused bool) error {
	var err error
	if paused {
		err = b.rdb.Set(ctx, b.keys.Paused(queue), "1", 0).Err()
	} else {
		err = b.rdb.Del(ctx, b.keys.Paused(queue)).Err()
	}
	return wrap(err, "pause/resume %q", queue)
}

// InFlightError means a queue cannot be deleted while messages are in
// flight.
type InFlightError struct {
	Queue    string
	InFlight int64
}

func (e *InFlightError) Error() string {
	noun := "messages"
	if e.InFlight == 1 {
		noun = "message"
	}
	return fmt.Sprintf("queue %q has %d %s in flight; wait for them to be settled, or delete with force", e.Queue, e.InFlight, noun)
}

// DeleteQueue removes queue's keys and forgets the queue.
func (b *Broker) DeleteQueue(ctx context.Context, queue string, force bool) error {
	flag := ""
	if force {
		flag = "force"
	}
	res, err := b.run(ctx, deleteQueueScript, queue, flag).Slice()
	if err != nil {
		return wrap(err, "delete %q", queue)
	}
	if len(res) == 2 && res[0] == "INFLIGHT" {
		n, _ := res[1].(int64)
		return &InFlightError{Queue: queue, InFlight: n}
	}
	_, err = b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.SRem(ctx, b.keys.Queues(), queue)
		p.ZRem(ctx, b.keys.Due(), queue)
		return nil
	})
	return wrap(err, "forget %q", queue)
}

// ReplayDead moves dead letters (all, or those with the given ids) back to
// the ready list.
func (b *Broker) ReplayDead(ctx context.Context, queue string, ids []string, all bool) (int64, error) {
	n, err := b.run(ctx, replayScript, queue, deadArgs(ids, all)...).Int64()
	return n, wrap(err, "replay dead letters of %q", queue)
}

// DeleteDead removes dead letters (all, or those with the given ids).
func (b *Broker) DeleteDead(ctx context.Context, queue string, ids []string, all bool) (int64, error) {
	n, err := b.run(ctx, deleteDeadScript, queue, deadArgs(ids, all)...).Int64()
	return n, wrap(err, "delete dead letters of %q", queue)
}

func deadArgs(ids []string, all bool) []any {
	if all {
		return []any{"all"}
	}
	return append([]any{"ids"}, strArgs(ids)...)
}

// Config reads queue's stored policy; zero fields are not set.
// expiredAction is "" (not set), "drop" or "dead".
func (b *Broker) Config(ctx context.Context, queue string) (p Policy, expiredAction string, err error) {
	vals, err := b.rdb.HGetAll(ctx, b.keys.Config(queue)).Result()
	if err != nil {
		return Policy{}, "", wrap(err, "read config of %q", queue)
	}
	ms := func(f string) time.Duration {
		v, _ := strconv.ParseInt(vals[f], 10, 64)
		return time.Duration(v) * time.Millisecond
	}
	p = Policy{
		BackoffMin:        ms("backoff_min_ms"),
		BackoffMax:        ms("backoff_max_ms"),
		DedupWindow:       ms("dedup_window_ms"),
		ExpiredDeadLetter: vals["expired_action"] == "dead",
	}
	p.MaxAttempts, _ = strconv.Atoi(vals["max_attempts"])
	p.MaxLength, _ = strconv.ParseInt(vals["max_length"], 10, 64)
	return p, vals["expired_action"], nil
}

// SetConfig replaces queue's stored policy. Zero fields are left to the
// server default; expiredAction is "", "drop" or "dead".
func (b *Broker) SetConfig(ctx context.Context, queue string, p Policy, expiredAction string) error {
	fields := map[string]any{}
	if p.MaxAttempts > 0 {
		fields["max_attempts"] = p.MaxAttempts
	}
	if p.BackoffMin > 0 {
		fields["backoff_min_ms"] = p.BackoffMin.Milliseconds()
	}
	if p.BackoffMax > 0 {
		fields["backoff_max_ms"] = p.BackoffMax.Milliseconds()
	}
	if p.MaxLength > 0 {
		fields["max_length"] = p.MaxLength
	}
	if p.DedupWindow > 0 {
		fields["dedup_window_ms"] = p.DedupWindow.Milliseconds()
	}
	if expiredAction != "" {
		fields["expired_action"] = expiredAction
	}
	_, err := b.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Del(ctx, b.keys.Config(queue))
		if len(fields) > 0 {
			p.HSet(ctx, b.keys.Config(queue), fields)
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return wrap(err, "write config of %q", queue)
	}
	return nil
}
