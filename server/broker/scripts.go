package broker

import "github.com/redis/go-redis/v9"

// Every Lua script qbridge runs is here. Each touches only the keys of one
// queue (one cluster slot) and declares all of them in KEYS. Time always comes
// from Redis (TIME), so several qbridge instances with skewed clocks agree on
// lease deadlines and due times.
//
// Queue scripts share one KEYS layout (see Keys.script):
//
//	KEYS[1] ready list        KEYS[5] delayed zset (member -> due ms)
//	KEYS[2] inflight hash     KEYS[6] scheduled hash (member -> envelope)
//	KEYS[3] leases zset       KEYS[7] dead hash (dead id -> envelope)
//	KEYS[4] seq counter       KEYS[8] dead index zset (dead id -> dead at ms)
//	KEYS[9] config hash       KEYS[10] counters hash   KEYS[11] paused flag
//	KEYS[12] dedup hash (dedup key -> message id)
//	KEYS[13] dedup expiry zset (dedup key -> end of its window, ms)
//	KEYS[14] counters per task type (hash "<type>\x1f<counter>" -> total)
//	KEYS[15] results hash (message id -> result record)
//	KEYS[16] results expiry zset (message id -> end of retention, ms)
//
// and begin with the same ARGV block, the server defaults of the queue
// policy (a queue's config hash overrides them, a message's envelope
// overrides both):
//
//	ARGV[1] raw mode "1"/"0"      ARGV[5] expired action "drop"/"dead"
//	ARGV[2] max attempts          ARGV[6] random seed for backoff jitter
//	ARGV[3] min backoff ms        ARGV[7] dedup window ms
//	ARGV[4] max backoff ms        ARGV[8] max length (0: none)
//	ARGV[9] result retention ms   ARGV[10] channel announcing stored results,
//	                              "P{qbridge}:results:<queue>" (see announceready)
//	ARGV[11..] script-specific

// luaPrelude holds what the queue scripts share.
const luaPrelude = `
local READY, INFLIGHT, LEASES, SEQ = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local DELAYED, SCHED, DEAD, DEADIDX = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local CONFIG, COUNTERS, PAUSED = KEYS[9], KEYS[10], KEYS[11]
local DEDUP, DEDUPEXP = KEYS[12], KEYS[13]
local TYPECOUNTS, RESULTS, RESULTEXP = KEYS[14], KEYS[15], KEYS[16]
local RAW = ARGV[1] == '1'
local SEED = tonumber(ARGV[6])
local MAGIC = '\0qb\1'
local P32 = 4294967296

local function be32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                     math.floor(n / 256) % 256, n % 256)
end
local function be16(n) return string.char(math.floor(n / 256) % 256, n % 256) end
local function be64(n) return be32(math.floor(n / P32)) .. be32(n % P32) end
local function rd32(s, i)
  local a, b, c, d = string.byte(s, i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end
local function rd16(s, i)
  local a, b = string.byte(s, i, i + 1)
  return a * 256 + b
end
local function rd64(s, i) return rd32(s, i) * P32 + rd32(s, i + 4) end
local function nowms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function rnd()
  SEED = (SEED * 1103515245 + 12345) % 2147483648
  return SEED / 2147483648
end

-- The queue policy: config hash over server defaults, read once per run.
local cfg
local function policy()
  if not cfg then
    local v = redis.call('HMGET', CONFIG, 'max_attempts', 'backoff_min_ms', 'backoff_max_ms',
                         'expired_action', 'max_length', 'dedup_window_ms')
    cfg = {
      maxatt = tonumber(v[1]) or tonumber(ARGV[2]),
      bmin = tonumber(v[2]) or tonumber(ARGV[3]),
      bmax = tonumber(v[3]) or tonumber(ARGV[4]),
      expact = v[4] or ARGV[5],
      maxlen = tonumber(v[5]) or tonumber(ARGV[8]),
      dedup = tonumber(v[6]) or tonumber(ARGV[7]),
    }
  end
  return cfg
end

-- Envelope fields (see envelope.go; Lua strings are 1-based).
local function deliveries(e) return rd32(e, 5) end
local function setdeliveries(e, n) return string.sub(e, 1, 4) .. be32(n) .. string.sub(e, 9) end
local function expireat(e) return rd64(e, 17) end
local function maxattempts(e)
  local m = rd16(e, 25)
  if m > 0 then return m end
  return policy().maxatt
end
local function idof(e) return string.sub(e, 37, 36 + rd16(e, 35)) end
local function payload(e)
  local n = rd16(e, 35)
  return string.sub(e, 41 + n + rd32(e, 37 + n))
end

local function varint(n)
  local out = ''
  while n >= 128 do
    out = out .. string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  return out .. string.char(n)
end
local function readvarint(s, i)
  local n, mul = 0, 1
  while true do
    local b = string.byte(s, i)
    i = i + 1
    n = n + (b % 128) * mul
    if b < 128 then return n, i end
    mul = mul * 128
  end
end
-- setmeta replaces meta field num (2: last error, 3: dead at, 4: dead
-- reason) with value (a string, a number for field 3, or nil to remove it).
local function setmeta(e, num, value)
  local n = rd16(e, 35)
  local m = rd32(e, 37 + n)
  local meta = string.sub(e, 41 + n, 40 + n + m)
  local out, i = {}, 1
  while i <= #meta do
    local start = i
    local tag
    tag, i = readvarint(meta, i)
    local wt = tag % 8
    if wt == 2 then
      local len
      len, i = readvarint(meta, i)
      i = i + len
    elseif wt == 0 then
      local _
      _, i = readvarint(meta, i)
    else
      out[#out + 1] = string.sub(meta, start)
      break
    end
    if math.floor(tag / 8) ~= num then out[#out + 1] = string.sub(meta, start, i - 1) end
  end
  if value ~= nil then
    if num == 3 then
      out[#out + 1] = varint(num * 8) .. varint(value)
    else
      out[#out + 1] = varint(num * 8 + 2) .. varint(#value) .. value
    end
  end
  local newmeta = table.concat(out)
  return string.sub(e, 1, 36 + n) .. be32(#newmeta) .. newmeta .. string.sub(e, 41 + n + m)
end

-- readyproblem returns an error reply when the ready list's key holds
-- something other than a list. Scripts that write the ready list check it
-- before their first write: Redis does not roll back a script that fails
-- halfway, and a message removed from one place must not miss the next.
local function readyproblem()
  local t = redis.call('TYPE', READY)
  if type(t) == 'table' then t = t['ok'] end
  if t ~= 'none' and t ~= 'list' then
    return redis.error_reply('WRONGTYPE the queue key holds a ' .. tostring(t) .. ', not a list')
  end
end

local function count(field, n)
  if n ~= 0 then redis.call('HINCRBY', COUNTERS, field, n) end
end

-- getmeta returns meta field num of e: a string (length-delimited field),
-- a number (varint field), or nil.
local function getmeta(e, num)
  local n = rd16(e, 35)
  local m = rd32(e, 37 + n)
  local meta = string.sub(e, 41 + n, 40 + n + m)
  local i, found = 1, nil
  while i <= #meta do
    local tag
    tag, i = readvarint(meta, i)
    local wt, v = tag % 8, nil
    if wt == 2 then
      local len
      len, i = readvarint(meta, i)
      v = string.sub(meta, i, i + len - 1)
      i = i + len
    elseif wt == 0 then
      v, i = readvarint(meta, i)
    else
      break
    end
    if math.floor(tag / 8) == num then found = v end
  end
  return found
end
local function tasktype(e) return getmeta(e, 5) or '' end

-- typecount bumps a counter of e's task type (untyped messages: none).
local function typecount(e, field, n)
  local t = tasktype(e)
  if t ~= '' then redis.call('HINCRBY', TYPECOUNTS, t .. '\31' .. field, n) end
end

-- record keeps the outcome of e for GetResult, for the result retention,
-- and announces it. state is 'S' (succeeded), 'F' (failed) or 'D' (dead).
-- Record: state, finish ms (8), attempts (4), error length (4), error,
-- task type length (2), task type, result payload.
local function record(e, state, result, err, now)
  local id, t = idof(e), tasktype(e)
  redis.call('HSET', RESULTS, id, state .. be64(now) .. be32(deliveries(e)) .. be32(#err) .. err .. be16(#t) .. t .. result)
  redis.call('ZADD', RESULTEXP, now + tonumber(ARGV[9]), id)
  local old = redis.call('ZRANGEBYSCORE', RESULTEXP, '-inf', now, 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('HDEL', RESULTS, unpack(old))
    redis.call('ZREM', RESULTEXP, unpack(old))
  end
  redis.call('PUBLISH', ARGV[10], id)
end
local function keepresult(e) return getmeta(e, 6) == 1 end

-- announceready tells every qbridge instance that the ready list is about
-- to stop being empty: "ready <queue>" on the events channel, for the
-- dispatchers that wait without a blocking connection of their own (see
-- server/idle.go). Scripts call it before their first push to the ready
-- list. Both names come from ARGV[10], "P{qbridge}:results:<queue>" (queue
-- names have no braces).
local announced = false
local function announceready()
  if announced then return end
  announced = true
  if redis.call('LLEN', READY) > 0 then return end
  local p, q = string.match(ARGV[10], '^(.*){qbridge}:results:([^{}]*)$')
  if p then redis.call('PUBLISH', p .. '{qbridge}:events', 'ready ' .. q) end
end

local function pushready(e, head)
  announceready()
  if RAW then e = payload(e) end
  if head then redis.call('LPUSH', READY, e) else redis.call('RPUSH', READY, e) end
end

local mindue = 0
-- schedule delays e until due. Members are zero-padded so that messages
-- with the same due time are promoted in the order they were scheduled.
local function schedule(e, due)
  local member = string.format('s%015d', redis.call('INCR', SEQ))
  redis.call('ZADD', DELAYED, due, member)
  redis.call('HSET', SCHED, member, e)
  if mindue == 0 or due < mindue then mindue = due end
end

local function deadletter(e, reason, now)
  e = setmeta(setmeta(e, 3, now), 4, reason)
  typecount(e, 'dead_lettered', 1)
  if keepresult(e) then record(e, 'D', '', getmeta(e, 2) or reason, now) end
  local id = idof(e)
  if id == '' or redis.call('HEXISTS', DEAD, id) == 1 then
    id = id .. '#' .. redis.call('INCR', SEQ)
  end
  redis.call('HSET', DEAD, id, e)
  redis.call('ZADD', DEADIDX, now, id)
  count('dead_lettered', 1)
end

-- backoff is the wait before retry number deliveries(e): full jitter within
-- [10%, 100%] of min(max, min * 2^(deliveries - 1)).
local function backoff(e)
  local bmin, bmax = rd32(e, 27), rd32(e, 31)
  if bmin == 0 then bmin = policy().bmin end
  if bmax == 0 then bmax = policy().bmax end
  local bound = bmin * 2 ^ math.min(deliveries(e) - 1, 40)
  if bound > bmax then bound = bmax end
  return math.floor(bound * (0.1 + 0.9 * rnd()))
end

-- again decides the fate of a message that is to be delivered again:
-- dead-lettered when it used up its attempts, or scheduled after delay ms
-- (delay < 0: the policy's backoff), or else it goes back to the head of the
-- ready list: again then returns true and the caller pushes it, so that a
-- batch can be pushed in reverse and keep its order at the head.
local function again(e, delay, now)
  if deliveries(e) >= maxattempts(e) then
    deadletter(e, 'max attempts reached', now)
    return false
  end
  if delay < 0 then delay = backoff(e) end
  if delay > 0 then
    schedule(e, now + delay)
    return false
  end
  return true
end

-- pushheads pushes envelopes to the head of the ready list so that the
-- first of them ends up first.
local function pushheads(es)
  for i = #es, 1, -1 do pushready(es[i], true) end
end

-- bylid orders lease ids numerically, which is delivery order.
local function bylid(a, b) return tonumber(a) < tonumber(b) end

-- expired reports whether e's ttl has passed, and disposes of it if so.
local function expired(e, now)
  local at = expireat(e)
  if at == 0 or at > now then return false end
  count('expired', 1)
  if policy().expact == 'dead' then deadletter(e, 'expired', now) end
  return true
end

-- claimn takes up to count messages from the head of the ready list and
-- leases them for leasems (see claimScript).
local function claimn(count, leasems)
  if redis.call('EXISTS', PAUSED) == 1 then return {-1, 0} end
  local now = nowms()
  local deadline = now + leasems
  if count <= 0 then return {redis.call('LLEN', READY), deadline} end
  local els = redis.call('LPOP', READY, count)
  if not els then return {0, deadline} end
  local out = {0, deadline}
  local h, z = {}, {}
  local last = redis.call('INCRBY', SEQ, #els)
  for i = 1, #els do
    local e = els[i]
    local raw = not (#e >= 40 and string.sub(e, 1, 4) == MAGIC)
    local lid = string.format('%d', last - #els + i)
    if raw then
      local id = 'raw-' .. lid
      e = MAGIC .. be32(0) .. be64(now) .. be64(0) .. be16(0) .. be32(0) .. be32(0) ..
          be16(#id) .. id .. be32(0) .. e
    end
    if raw or not expired(e, now) then
      e = setdeliveries(e, deliveries(e) + 1)
      h[#h + 1] = lid; h[#h + 1] = e
      z[#z + 1] = deadline; z[#z + 1] = lid
      out[#out + 1] = lid; out[#out + 1] = e
    end
  end
  if #h > 0 then
    redis.call('HSET', INFLIGHT, unpack(h))
    redis.call('ZADD', LEASES, unpack(z))
  end
  out[1] = redis.call('LLEN', READY)
  return out
end

-- settlelist settles the lease ids at ARGV[first], ARGV[first + 2], ...
-- (each followed by its result) as what ('acked' or 'nacked'; see
-- settleScript) and returns a flag per id and how many it settled.
local function settlelist(what, errtext, first)
  local now
  local out, n = {}, 0
  local lids = {}
  for i = first, #ARGV, 2 do lids[#lids + 1] = ARGV[i] end
  if #lids == 0 then return out, 0 end
  local es = redis.call('HMGET', INFLIGHT, unpack(lids))
  local gone = {}
  for j, lid in ipairs(lids) do
    local e, res = es[j], ARGV[first + 2 * (j - 1) + 1]
    if e and not gone[lid] then
      gone[lid] = true
      n = n + 1
      typecount(e, what, 1)
      if what == 'acked' and (res ~= '' or keepresult(e)) then
        now = now or nowms()
        record(e, 'S', string.sub(res, 2), '', now)
      elseif what == 'nacked' and keepresult(e) then
        now = now or nowms()
        record(e, 'F', '', errtext, now)
      end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  if n > 0 then
    local del = {}
    for lid in pairs(gone) do del[#del + 1] = lid end
    redis.call('HDEL', INFLIGHT, unpack(del))
    redis.call('ZREM', LEASES, unpack(del))
  end
  count(what, n)
  return out, n
end
`

// enqueueScript appends messages to the ready list, or schedules them. It
// takes several groups of messages (the enqueue calls that the coalescer
// merged, see coalesce.go) and treats each group as one call would be: all
// or nothing. When the queue has a max length and a group does not fit,
// nothing of that group is written, and the groups after it are still
// tried. A message whose dedup key is still remembered (by an earlier call,
// or an earlier message of this run) is not enqueued; the id remembered for
// the key is returned instead. Dedup keys live in a hash with an expiry zset
// beside it; each run forgets up to 100 keys whose window has passed, so the
// cleanup costs O(1) per enqueue. Ready messages are appended with one
// variadic RPUSH per 1000.
//
//	KEYS    standard
//	ARGV[11] number of groups, then per group: its number of messages n, then
//	        5 per message: envelope, delay ms, deliver-at unix ms (0: none),
//	        ttl ms (0: none), dedup key ("": none)
//	returns per group, one after the other:
//	        "OK", 1 if this group created the queue's counters (a new or
//	              recreated queue) else 0, earliest due ms of the group or 0,
//	              then n times "" or the id of the earlier message with the
//	              same dedup key
//	     or "FULL", messages held, max length
var enqueueScript = redis.NewScript(luaPrelude + `
local bad = readyproblem(); if bad then return bad end
local groups = tonumber(ARGV[11])
local now = nowms()
local old = redis.call('ZRANGEBYSCORE', DEDUPEXP, '-inf', now, 'LIMIT', 0, 100)
if #old > 0 then
  redis.call('HDEL', DEDUP, unpack(old))
  redis.call('ZREM', DEDUPEXP, unpack(old))
end
local ready = {}
local function flushready()
  if #ready > 0 then announceready() end
  for i = 1, #ready, 1000 do
    redis.call('RPUSH', READY, unpack(ready, i, math.min(i + 999, #ready)))
  end
  ready = {}
end
local seen = {}
local created = 1 - redis.call('EXISTS', COUNTERS)
local out = {}
local at0 = 12
for g = 1, groups do
  local n = tonumber(ARGV[at0])
  local first = at0 + 1
  at0 = first + 5 * n
  local dups, mine, fresh = {}, {}, 0
  for i = 1, n do
    local base = first + (i - 1) * 5
    local key = ARGV[base + 4]
    dups[i] = ''
    if key ~= '' then
      local prev = seen[key] or mine[key]
      if prev then
        dups[i] = prev
      else
        prev = redis.call('HGET', DEDUP, key)
        local till = redis.call('ZSCORE', DEDUPEXP, key)
        if prev and till and tonumber(till) > now then dups[i] = prev; mine[key] = prev end
      end
    end
    if dups[i] == '' then
      fresh = fresh + 1
      if key ~= '' then mine[key] = idof(ARGV[base]) end
    end
  end
  local full = false
  local maxlen = policy().maxlen
  if maxlen > 0 and fresh > 0 then
    flushready()
    local held = redis.call('LLEN', READY) + redis.call('ZCARD', DELAYED)
    if held + fresh > maxlen then
      out[#out + 1] = 'FULL'; out[#out + 1] = held; out[#out + 1] = maxlen
      full = true
    end
  end
  if not full then
    for k, v in pairs(mine) do seen[k] = v end
    out[#out + 1] = 'OK'; out[#out + 1] = created; out[#out + 1] = 0
    local dueat = #out
    for i = 1, n do
      local base = first + (i - 1) * 5
      local e, delay, at, ttl, key = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
          tonumber(ARGV[base + 3]), ARGV[base + 4]
      if dups[i] == '' then
        if ttl > 0 then e = string.sub(e, 1, 16) .. be64(now + ttl) .. string.sub(e, 25) end
        if key ~= '' then
          redis.call('HSET', DEDUP, key, idof(e))
          redis.call('ZADD', DEDUPEXP, now + policy().dedup, key)
        end
        typecount(e, 'enqueued', 1)
        local due = 0
        if at > 0 then due = at elseif delay > 0 then due = now + delay end
        if due > now then
          schedule(e, due)
          if out[dueat] == 0 or due < out[dueat] then out[dueat] = due end
        else
          if RAW then e = payload(e) end
          ready[#ready + 1] = e
        end
      end
      out[#out + 1] = dups[i]
    end
    count('enqueued', fresh)
    if created == 1 and fresh == 0 then redis.call('HSET', COUNTERS, 'enqueued', 0) end
    created = 0
  end
end
flushready()
return out
`)

// claimScript takes up to COUNT messages from the head of the ready list and
// leases them: each gets a fresh lease id, its delivery count is
// incremented, and it is stored in the inflight hash with its deadline in the
// leases zset. Raw elements (pushed by plain Redis clients) are wrapped into
// an envelope with id "raw-<lease id>" and enqueue time = now. Messages whose
// ttl passed are dropped or dead-lettered instead. A paused queue gives
// nothing.
//
//	KEYS standard   ARGV[11] COUNT   ARGV[12] lease duration in ms
//	returns {remaining ready length (-1: paused), lease deadline ms, lid1, envelope1, ...}
var claimScript = redis.NewScript(luaPrelude + `
return claimn(tonumber(ARGV[11]), tonumber(ARGV[12]))
`)

// popScript takes up to COUNT elements from the head of the ready list for
// an auto-ack consumer: they leave Redis for good (at-most-once, like BLPOP)
// and count as acked. Expired messages are dropped or dead-lettered; a
// paused queue gives nothing.
//
//	KEYS standard   ARGV[11] COUNT
//	returns {remaining ready length (-1: paused), element1, element2, ...}
var popScript = redis.NewScript(luaPrelude + `
if redis.call('EXISTS', PAUSED) == 1 then return {-1} end
local els = redis.call('LPOP', READY, tonumber(ARGV[11]))
if not els then return {0} end
local now = nowms()
local out = {0}
for i = 1, #els do
  local e = els[i]
  local env = #e >= 40 and string.sub(e, 1, 4) == MAGIC
  if not env or not expired(e, now) then
    out[#out + 1] = e
    if env then typecount(e, 'acked', 1) end
  end
end
count('acked', #out - 1)
out[1] = redis.call('LLEN', READY)
return out
`)

// settleScript removes leases for good: Ack ("acked"), or Nack with drop
// ("nacked"). An acked message's result is kept when the ack carries one or
// the message asked for it (keep_result); a dropped message's failure is
// kept when it asked for it.
//
//	KEYS standard
//	ARGV[11] "acked" or "nacked"   ARGV[12] error text (drop)
//	ARGV[13..] pairs: lease id, result ("" none, else "=" .. payload)
//	returns one integer per lease id: 1 settled, 0 not in flight (stale token)
var settleScript = redis.NewScript(luaPrelude + `
return (settlelist(ARGV[11], ARGV[12], 13))
`)

// ackClaimScript acks lease ids like settleScript ("acked"), then claims
// like claimScript EXTRA plus as many messages as it settled, at most MAX:
// one round trip for a consumer that acks what it holds and wants as many
// more.
//
//	KEYS standard   ARGV[11] EXTRA   ARGV[12] MAX   ARGV[13] lease ms
//	ARGV[14..] pairs: lease id, result ("" none, else "=" .. payload)
//	returns {number of lease ids k, k flags as settleScript, then the reply
//	         of claimScript}
var ackClaimScript = redis.NewScript(luaPrelude + `
local flags, n = settlelist('acked', '', 14)
local out = {#flags}
for i = 1, #flags do out[#out + 1] = flags[i] end
local c = claimn(math.min(tonumber(ARGV[11]) + n, tonumber(ARGV[12])), tonumber(ARGV[13]))
for i = 1, #c do out[#out + 1] = c[i] end
return out
`)

// nackScript gives leased messages back: "requeue" (head of the ready list,
// or after ARGV[12] ms), "retry" (after the backoff, or ARGV[12] ms), "dead"
// (to the dead letters), "end" (a stream ended: like requeue, not counted
// as a nack), or "return" (taken for a stream that never sent it: back to
// the head with its delivery count restored, so it costs no attempt). Whatever is to be delivered again but used up its attempts is
// dead-lettered. Entries no longer in flight are skipped, so a stale lease
// id never touches a newer delivery.
//
//	KEYS standard
//	ARGV[11] action   ARGV[12] delay ms (-1: none)   ARGV[13] error text ("" none)
//	ARGV[14..] lease ids, oldest delivery first
//	returns {earliest due ms or 0, then one integer per lease id: 1 done, 0 not in flight}
var nackScript = redis.NewScript(luaPrelude + `
local bad = readyproblem(); if bad then return bad end
local action, delay, errtext = ARGV[11], tonumber(ARGV[12]), ARGV[13]
if action ~= 'retry' and delay < 0 then delay = 0 end
local now = nowms()
local out = {0}
local n = 0
local heads = {}
for i = 14, #ARGV do
  local lid = ARGV[i]
  local e = redis.call('HGET', INFLIGHT, lid)
  out[i - 12] = 0
  if e then
    redis.call('HDEL', INFLIGHT, lid)
    redis.call('ZREM', LEASES, lid)
    n = n + 1
    if errtext ~= '' then e = setmeta(e, 2, errtext) end
    if action ~= 'end' and action ~= 'return' then typecount(e, 'nacked', 1) end
    if action == 'return' then
      heads[#heads + 1] = setdeliveries(e, math.max(deliveries(e) - 1, 0))
    elseif action == 'dead' then
      deadletter(e, 'nacked as dead letter', now)
    elseif again(e, delay, now) then
      heads[#heads + 1] = e
    end
    out[i - 12] = 1
  end
end
pushheads(heads)
if action ~= 'end' and action ~= 'return' then count('nacked', n) end
out[1] = mindue
return out
`)

// extendScript moves lease deadlines to now + duration, for leases that are
// still held.
//
//	KEYS[1] leases zset
//	ARGV[1] lease duration in ms   ARGV[2..] lease ids
//	returns {new deadline ms, then one integer per lease id: 1 extended, 0 not in flight}
var extendScript = redis.NewScript(`
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
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

// reapScript handles up to LIMIT messages whose lease ran out (their
// consumer, or the qbridge instance serving it, is gone): each counts as a
// failed attempt and goes back to the head of the ready list, or to the dead
// letters when its attempts are used up. Safe to run from several instances
// at once: each expired lease is handled once.
//
//	KEYS standard   ARGV[11] LIMIT
//	returns the number of leases handled
var reapScript = redis.NewScript(luaPrelude + `
local bad = readyproblem(); if bad then return bad end
local now = nowms()
local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, tonumber(ARGV[11]))
table.sort(expired, bylid)
local n = 0
local heads = {}
for i = 1, #expired do
  local e = redis.call('HGET', INFLIGHT, expired[i])
  redis.call('HDEL', INFLIGHT, expired[i])
  redis.call('ZREM', LEASES, expired[i])
  if e then
    n = n + 1
    if again(e, 0, now) then heads[#heads + 1] = e end
  end
end
pushheads(heads)
count('lease_expired', n)
return n
`)

// promoteScript moves up to LIMIT delayed messages whose time has come to
// the tail of the ready list, in due order. Safe to run from several
// instances at once: each message is promoted once.
//
//	KEYS standard   ARGV[11] LIMIT
//	returns {messages promoted, next due ms (0: none left), Redis now ms}
var promoteScript = redis.NewScript(luaPrelude + `
local bad = readyproblem(); if bad then return bad end
local now = nowms()
local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, tonumber(ARGV[11]))
for i = 1, #due do
  local e = redis.call('HGET', SCHED, due[i])
  redis.call('HDEL', SCHED, due[i])
  redis.call('ZREM', DELAYED, due[i])
  if e then pushready(e, false) end
end
local nxt = redis.call('ZRANGE', DELAYED, 0, 0, 'WITHSCORES')
local nextdue = 0
if #nxt > 0 then nextdue = tonumber(nxt[2]) end
return {#due, nextdue, now}
`)

// purgeScript removes every ready and delayed message.
//
//	KEYS standard
//	returns the number of messages removed
var purgeScript = redis.NewScript(luaPrelude + `
local n = redis.call('LLEN', READY) + redis.call('ZCARD', DELAYED)
redis.call('DEL', READY, DELAYED, SCHED)
return n
`)

// replayScript moves dead letters back to the tail of the ready list with
// their delivery count reset, their ttl and dead-letter fields removed.
//
//	KEYS standard   ARGV[11] "all" or "ids"   ARGV[12..] dead ids
//	returns the number of dead letters replayed
var replayScript = redis.NewScript(luaPrelude + `
local bad = readyproblem(); if bad then return bad end
local ids = {}
if ARGV[11] == 'all' then
  ids = redis.call('ZRANGE', DEADIDX, 0, -1)
else
  for i = 12, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local n = 0
for _, id in ipairs(ids) do
  local e = redis.call('HGET', DEAD, id)
  if e then
    redis.call('HDEL', DEAD, id)
    redis.call('ZREM', DEADIDX, id)
    e = setdeliveries(setmeta(setmeta(e, 3, nil), 4, nil), 0)
    -- A replayed message gets a fresh start: no ttl either (it may be
    -- why it died).
    e = string.sub(e, 1, 16) .. be64(0) .. string.sub(e, 25)
    pushready(e, false)
    n = n + 1
  end
end
return n
`)

// deleteDeadScript removes dead letters for good.
//
//	KEYS standard   ARGV[11] "all" or "ids"   ARGV[12..] dead ids
//	returns the number of dead letters removed
var deleteDeadScript = redis.NewScript(luaPrelude + `
if ARGV[11] == 'all' then
  local n = redis.call('ZCARD', DEADIDX)
  redis.call('DEL', DEAD, DEADIDX)
  return n
end
local n = 0
for i = 12, #ARGV do
  if redis.call('HDEL', DEAD, ARGV[i]) == 1 then
    redis.call('ZREM', DEADIDX, ARGV[i])
    n = n + 1
  end
end
return n
`)

// deleteQueueScript removes a queue's keys. The lease id counter stays, so
// lease ids are never reused and old ack tokens stay stale.
//
//	KEYS standard   ARGV[11] "force" or ""
//	returns {"OK"} or {"INFLIGHT", messages in flight}
var deleteQueueScript = redis.NewScript(luaPrelude + `
local inflight = redis.call('HLEN', INFLIGHT)
if inflight > 0 and ARGV[11] ~= 'force' then return {'INFLIGHT', inflight} end
redis.call('DEL', READY, INFLIGHT, LEASES, DELAYED, SCHED, DEAD, DEADIDX, CONFIG, COUNTERS, PAUSED, DEDUP, DEDUPEXP,
  TYPECOUNTS, RESULTS, RESULTEXP)
return {'OK'}
`)

// allScripts lists every script, for loading them up front.
// growShardsScript stores queue ARGV[1]'s shard suffixes ARGV[3] in the
// shard table KEYS[1] if they are still ARGV[2] (compare-and-set: see
// GrowShards). Returns 1 if stored, 0 if the table changed meanwhile.
var growShardsScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
`)

// dedupLookupScript returns the id of the message enqueued with dedup key
// ARGV[1] if its window has not ended, else false.
//
//	KEYS[1] dedup hash   KEYS[2] dedup expiry zset
var dedupLookupScript = redis.NewScript(`
local id = redis.call('HGET', KEYS[1], ARGV[1])
local till = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not id or not till then return false end
local t = redis.call('TIME')
if tonumber(till) <= tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then return false end
return id
`)

var allScripts = []*redis.Script{
	heartbeatScript,
	enqueueScript, claimScript, popScript, settleScript, ackClaimScript, nackScript, extendScript,
	reapScript, promoteScript, purgeScript, replayScript, deleteDeadScript, deleteQueueScript,
	growShardsScript, dedupLookupScript,
}

// heartbeatScript records how many Consume streams one instance has open on a
// queue, until an expiry on Redis' clock (so instances with skewed clocks
// agree); a count of 0 removes the instance. Entries of other instances that
// expired are removed on the way.
//
//	KEYS[1] the queue's consumers hash
//	ARGV[1] instance id   ARGV[2] count   ARGV[3] time to live in ms
var heartbeatScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp = tonumber(string.match(all[i + 1], ':(%d+)$') or '0')
  if exp < now then redis.call('HDEL', KEYS[1], all[i]) end
end
return 0
`)
