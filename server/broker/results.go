package broker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// ResultState is how a message finished.
type ResultState byte

// Result states, as stored in result records.
const (
	Succeeded ResultState = 'S'
	Failed    ResultState = 'F'
	Dead      ResultState = 'D'
)

// Result is a kept message outcome.
type Result struct {
	ID       string
	State    ResultState
	Finished time.Time
	Attempts uint32
	Error    string
	TaskType string
	Payload  []byte
}

// ErrNoResult means no result is kept for the message (yet, or any more).
var ErrNoResult = errors.New("no result")

// GetResult reads the kept result of message id in queue.
func (b *Broker) GetResult(ctx context.Context, queue, id string) (*Result, error) {
	var rec *redis.StringCmd
	var until *redis.FloatCmd
	_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		rec = p.HGet(ctx, b.keys.Results(queue), id)
		until = p.ZScore(ctx, b.keys.ResultExpiry(queue), id)
		return nil
	})
	if errors.Is(err, redis.Nil) { // no record, or no retention entry
		return nil, ErrNoResult
	}
	if err != nil {
		return nil, wrap(err, "read result of %q in %q", id, queue)
	}
	if time.UnixMilli(int64(until.Val())).Before(time.Now().Add(-time.Second)) {
		return nil, ErrNoResult // expired; the next store forgets it
	}
	return decodeResult(id, []byte(rec.Val()))
}

// decodeResult parses a result record (see record in scripts.go).
func decodeResult(id string, b []byte) (*Result, error) {
	if len(b) < 17 {
		return nil, fmt.Errorf("result of %q: record too short", id)
	}
	r := &Result{ID: id, State: ResultState(b[0])}
	r.Finished = time.UnixMilli(int64(binary.BigEndian.Uint64(b[1:9])))
	r.Attempts = binary.BigEndian.Uint32(b[9:13])
	n := int(binary.BigEndian.Uint32(b[13:17]))
	if len(b) < 17+n {
		return nil, fmt.Errorf("result of %q: error text exceeds record", id)
	}
	r.Error = string(b[17 : 17+n])
	b = b[17+n:]
	if len(b) < 2 || len(b) < 2+int(binary.BigEndian.Uint16(b)) {
		return nil, fmt.Errorf("result of %q: task type exceeds record", id)
	}
	t := int(binary.BigEndian.Uint16(b))
	r.TaskType = string(b[2 : 2+t])
	r.Payload = b[2+t:]
	return r, nil
}

// Located is where FindMessage found a message.
type Located struct {
	State   State // StateReady, StateDelayed, StateInFlight or StateDead; 0 when only a result is kept
	Message *Message
	Result  *Result // the kept result, if any
}

// findScanLimit bounds how many list elements FindMessage reads.
const findScanLimit = 1_000_000

// FindMessage looks for message id in queue: in flight, delayed, dead,
// ready (reading up to findScanLimit elements), and among kept results.
// It returns ErrNoResult when the message is nowhere.
func (b *Broker) FindMessage(ctx context.Context, queue, id string) (*Located, error) {
	k := b.keys
	match := func(el string) *Message {
		if m, err := decodeEnvelope([]byte(el)); err == nil && m.ID == id {
			return m
		}
		return nil
	}
	// Hashes of envelopes: in flight and delayed.
	for _, h := range []struct {
		key   string
		state State
	}{{k.InFlight(queue), StateInFlight}, {k.Scheduled(queue), StateDelayed}} {
		var cursor uint64
		for {
			kvs, next, err := b.rdb.HScan(ctx, h.key, cursor, "", 500).Result()
			if err != nil {
				return nil, wrap(err, "find %q in %q", id, queue)
			}
			for i := 1; i < len(kvs); i += 2 {
				if m := match(kvs[i]); m != nil {
					return &Located{State: h.state, Message: m}, nil
				}
			}
			if cursor = next; cursor == 0 {
				break
			}
		}
	}
	// Dead letters are keyed by id (or id#n).
	if el, err := b.rdb.HGet(ctx, k.Dead(queue), id).Result(); err == nil {
		if m, derr := decodeEnvelope([]byte(el)); derr == nil {
			return &Located{State: StateDead, Message: m}, nil
		}
	} else if !errors.Is(err, redis.Nil) {
		return nil, wrap(err, "find %q in %q", id, queue)
	}
	// The ready list, in chunks.
	for off := int64(0); off < findScanLimit; off += 1000 {
		els, err := b.rdb.LRange(ctx, k.Ready(queue), off, off+999).Result()
		if err != nil {
			return nil, wrap(err, "find %q in %q", id, queue)
		}
		for _, el := range els {
			if m := match(el); m != nil {
				return &Located{State: StateReady, Message: m}, nil
			}
		}
		if len(els) < 1000 {
			break
		}
	}
	r, err := b.GetResult(ctx, queue, id)
	if err != nil {
		return nil, err
	}
	return &Located{Result: r}, nil
}

// TypeCounters reads queue's counters per task type (at most limit types).
func (b *Broker) TypeCounters(ctx context.Context, queue string, limit int) (map[string]Counters, error) {
	vals, err := b.rdb.HGetAll(ctx, b.keys.TypeCounts(queue)).Result()
	if err != nil {
		return nil, wrap(err, "read task type counters of %q", queue)
	}
	out := map[string]Counters{}
	for f, v := range vals {
		typ, counter, ok := strings.Cut(f, "\x1f")
		if !ok {
			continue
		}
		c, seen := out[typ]
		if !seen && len(out) >= limit {
			continue
		}
		var n int64
		_, _ = fmt.Sscan(v, &n)
		switch counter {
		case "enqueued":
			c.Enqueued = n
		case "acked":
			c.Acked = n
		case "nacked":
			c.Nacked = n
		case "dead_lettered":
			c.DeadLettered = n
		}
		out[typ] = c
	}
	return out, nil
}
