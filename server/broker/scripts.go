package broker

import "github.com/redis/go-redis/v9"

// Every Lua script qbridge runs is here. Each touches only the keys of one
// queue (one cluster slot) and declares all of them in KEYS. Time always comes
// from Redis (TIME), so several qbridge instances with skewed clocks agree on
// lease deadlines.

// luaPrelude holds helpers shared by the scripts: big-endian integer codecs
// for the envelope's fixed fields (see envelope.go), the clock, and
// requeue, which moves one inflight entry back to the head of the ready list.
const luaPrelude = `
local MAGIC = '\0qb\1'
local function be32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                     math.floor(n / 256) % 256, n % 256)
end
local function be16(n)
  return string.char(math.floor(n / 256) % 256, n % 256)
end
local function rd32(s, i)
  local a, b, c, d = string.byte(s, i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end
local function rd16(s, i)
  local a, b = string.byte(s, i, i + 1)
  return a * 256 + b
end
local function nowms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- payload cuts the payload out of an envelope (for raw-mode queues).
local function payload(e)
  local idlen = rd16(e, 17)
  local metalen = rd32(e, 19 + idlen)
  return string.sub(e, 23 + idlen + metalen)
end
-- requeue moves inflight entry lid back to the head of the ready list.
-- Returns 1 when it did, 0 when lid is not in flight (settled, or already
-- requeued by someone else).
local function requeue(ready, inflight, leases, lid, raw)
  local e = redis.call('HGET', inflight, lid)
  if not e then return 0 end
  redis.call('HDEL', inflight, lid)
  redis.call('ZREM', leases, lid)
  if raw == '1' then e = payload(e) end
  redis.call('LPUSH', ready, e)
  return 1
end
`

// claimScript takes up to COUNT messages from the head of the ready list and
// leases them: each gets a fresh lease id, its envelope's delivery count is
// incremented, and it is stored in the inflight hash with its deadline in the
// leases zset. Raw elements (pushed by plain Redis clients) are wrapped into an
// envelope with id "raw-<lease id>" and enqueue time = now.
//
//	KEYS[1] ready list   KEYS[2] inflight hash   KEYS[3] leases zset   KEYS[4] seq
//	ARGV[1] COUNT        ARGV[2] lease duration in ms
//	returns {remaining ready length, lease deadline ms, lid1, envelope1, lid2, envelope2, ...}
var claimScript = redis.NewScript(luaPrelude + `
local els = redis.call('LPOP', KEYS[1], tonumber(ARGV[1]))
local now = nowms()
local deadline = now + tonumber(ARGV[2])
if not els then return {0, deadline} end
local last = redis.call('INCRBY', KEYS[4], #els)
local out = {redis.call('LLEN', KEYS[1]), deadline}
local h, z = {}, {}
for i = 1, #els do
  local e = els[i]
  local lid = string.format('%d', last - #els + i)
  if #e >= 22 and string.sub(e, 1, 4) == MAGIC then
    e = MAGIC .. be32(rd32(e, 5) + 1) .. string.sub(e, 9)
  else
    local id = 'raw-' .. lid
    e = MAGIC .. be32(1) .. be32(math.floor(now / 4294967296)) .. be32(now % 4294967296) ..
        be16(#id) .. id .. be32(0) .. e
  end
  h[#h + 1] = lid; h[#h + 1] = e
  z[#z + 1] = deadline; z[#z + 1] = lid
  out[#out + 1] = lid; out[#out + 1] = e
end
redis.call('HSET', KEYS[2], unpack(h))
redis.call('ZADD', KEYS[3], unpack(z))
return out
`)

// popScript takes up to COUNT elements from the head of the ready list for
// an auto-ack consumer: they leave Redis for good (at-most-once, like BLPOP).
//
//	KEYS[1] ready list
//	ARGV[1] COUNT
//	returns {remaining ready length, element1, element2, ...}
var popScript = redis.NewScript(`
local els = redis.call('LPOP', KEYS[1], tonumber(ARGV[1]))
if not els then return {0} end
local out = {redis.call('LLEN', KEYS[1])}
for i = 1, #els do out[#out + 1] = els[i] end
return out
`)

// settleScript removes leases for good (Ack, and Nack with drop).
//
//	KEYS[1] inflight hash   KEYS[2] leases zset
//	ARGV    lease ids
//	returns one integer per lease id: 1 settled, 0 not in flight (stale token)
var settleScript = redis.NewScript(`
local out = {}
for i = 1, #ARGV do
  out[i] = redis.call('HDEL', KEYS[1], ARGV[i])
  if out[i] == 1 then redis.call('ZREM', KEYS[2], ARGV[i]) end
end
return out
`)

// requeueScript puts leased messages back at the head of the ready list, in
// their original order (Nack with requeue, a Consume stream that ended,
// shutdown). Entries no longer in flight are skipped, so a stale lease id can
// never touch a newer delivery.
//
//	KEYS[1] ready list   KEYS[2] inflight hash   KEYS[3] leases zset
//	ARGV[1] "1" if the queue is in raw mode (push bare payloads), else "0"
//	ARGV[2..] lease ids, oldest delivery first
//	returns one integer per lease id: 1 requeued, 0 not in flight
var requeueScript = redis.NewScript(luaPrelude + `
local out = {}
for i = #ARGV, 2, -1 do
  out[i - 1] = requeue(KEYS[1], KEYS[2], KEYS[3], ARGV[i], ARGV[1])
end
return out
`)

// extendScript moves lease deadlines to now + duration, for leases that are
// still held.
//
//	KEYS[1] leases zset
//	ARGV[1] lease duration in ms   ARGV[2..] lease ids
//	returns {new deadline ms, then one integer per lease id: 1 extended, 0 not in flight}
var extendScript = redis.NewScript(luaPrelude + `
local deadline = nowms() + tonumber(ARGV[1])
local out = {deadline}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], deadline, ARGV[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
`)

// reapScript requeues up to LIMIT messages whose lease deadline has passed
// (their consumer, or the qbridge instance serving it, is gone). Safe to run
// from several instances at once: each expired lease is requeued once.
//
//	KEYS[1] ready list   KEYS[2] inflight hash   KEYS[3] leases zset
//	ARGV[1] raw mode "1"/"0"   ARGV[2] LIMIT
//	returns the number of messages requeued
var reapScript = redis.NewScript(luaPrelude + `
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', nowms(), 'LIMIT', 0, tonumber(ARGV[2]))
local n = 0
for i = #expired, 1, -1 do
  n = n + requeue(KEYS[1], KEYS[2], KEYS[3], expired[i], ARGV[1])
end
return n
`)

// allScripts lists every script, for loading them up front.
var allScripts = []*redis.Script{claimScript, popScript, settleScript, requeueScript, extendScript, reapScript}
