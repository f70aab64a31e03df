#!lua
-- publish.lua: publish requests' updates to ONE shard, each request atomically,
-- as ONE stream entry per call (layout 2, engine/bus/redis/layout.py).
--
-- KEYS[1]      the shard's stream                    <prefix>:{s<N>}:log
-- KEYS[2]      the shard's set of state topics       <prefix>:{s<N>}:topics
-- KEYS[3]      the shard's stream topics' floors     <prefix>:{s<N>}:streams (hash)
-- KEYS[4]      the shard's meta hash                 <prefix>:{s<N>}:meta
--              (added: data bytes since the last byte check; trimmed: the ID
--              of the newest entry a byte trim removed)
-- KEYS[5]      the shard's idle deadlines            <prefix>:{s<N>}:expiry (zset)
-- KEYS[5 + g]  run g's (1-based) topic state hash              <prefix>:{s<N>}:state:<topic>
--              or, for a stream topic, its history   <prefix>:{s<N>}:hist:<topic>
-- ARGV[1]      MAXLEN ~ of the shard's stream (entries)
-- ARGV[2]      keys a state topic may hold (0: no limit)
-- ARGV[3]      topics the shard may hold (0: no limit)
-- ARGV[4]      bytes the shard's stream may take (0: no byte checks)
-- ARGV[5]      data bytes added between two byte checks
-- ARGV[6]      the requests' run counts (msgpack array); G runs in all
--              (a run: a request's updates of one topic, in order)
-- ARGV[7]      idle expiries: "g:ms" pairs, comma-separated, for the runs of
--              topics with one ("": none)
-- ARGV[8]      the runs' update counts (msgpack array); U updates in all
-- ARGV[9]      the runs' history (msgpack array; -1: a state topic; >= 0: a
--              stream topic retaining that many events)
-- ARGV[10..9+G] the runs' topics
-- ARGV[10+G..9+G+2U] the updates, 2 each: key, "+<j> <data>" (j: the update's
--              index in its request's part of this call, data: msgpack bytes)
-- ARGV[10+G+2U+r-1] request r's updates packed by the client: msgpack arrays
--              [topic, [key, data, ...]], one per run (the entry's `b` is the
--              accepted requests' parts one after another; Redis never
--              decodes them)
--
-- Positions: the call's accepted updates get consecutive IDs ms-seq, ms-seq+1,
-- ... after the stream's newest entry (ms: Redis' clock, or the newest
-- entry's ms if that is later), and the call adds ONE entry to the stream,
-- whose ID is its last update's position: {n = updates, b = packed updates}.
-- So an entry's updates have the positions (previous entry's ID, its ID], and
-- the stream IDs stay the read positions of the readers. A state hash's value
-- is "<first>+<j> <data>": the position of its request's first update, plus j
-- (the client writes "+<j> <data>": Lua formats one number per request, not
-- one per update, which cost ~0.4 us each).
--
-- Each request is checked whole, then applied whole (engine/bus/limits.py
-- rules 2-3): a request that would add a key to a full topic, or a topic to
-- a full shard, is refused with nothing of it applied, and the next request
-- is checked as if the ones accepted before it were applied. The key count
-- of a topic costs one HLEN per topic and call while the topic is far from
-- its limit (its keys plus every update of it in this call fit), and one
-- HEXISTS per key near it; nothing per update far from it. Applied: the entry (XADD, before any other
-- write: an error there applies nothing), each state topic's keys in one
-- HSET ("<position> <data>", the newest value of a key last) and the topic
-- remembered in the shard's topic set (what a reader loads on connect); a
-- stream topic's events appended to its history stream with their own
-- positions, trimmed to `history` events exactly, the floors hash holding
-- the ID of the newest event trimmed ('0-0' until one is). A topic with an
-- idle expiry gets its deadline (ms) in the idle zset (expire.lua).
-- Returns, per request, the position of its first update ("ms-seq"; the
-- others follow it, seq + 1 each), or {'!', code, topic, key} when refused;
-- then 1 when ARGV[5] data bytes were added since the last byte check (the
-- caller runs trim.lua now), else 0.
--
-- Every key shares the shard's hash tag, so this runs on one Redis Cluster
-- node. The `#!lua` line makes Redis refuse the whole script up front when it
-- is out of memory (deny-oom), instead of failing between two writes;
-- trim.lua (allow-oom) then frees memory.
local stream = KEYS[1]
local topics = KEYS[2]
local floors = KEYS[3]
local meta = KEYS[4]
local idle = KEYS[5]
local maxlen = ARGV[1]
local max_keys = tonumber(ARGV[2])
local max_topics = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4])
local check_every = tonumber(ARGV[5])
local UNPACK_MAX = 1000 -- arguments per HSET / SADD (Lua's stack is bounded)

-- msgpack arrays, unpacked in C (string.gmatch and tonumber per run cost ~0.3 us each)
local runs = cmsgpack.unpack(ARGV[6]) -- per request
local lengths = cmsgpack.unpack(ARGV[8]) -- per run
local histories = cmsgpack.unpack(ARGV[9]) -- per run
local expiries = {}
for g, ms in string.gmatch(ARGV[7], '(%d+):(%d+)') do
  expiries[tonumber(g)] = tonumber(ms)
end
local G = #lengths
local starts = {} -- run g's first update's ARGV index (key; its value follows)
local at = 10 + G
for g = 1, G do
  starts[g] = at
  at = at + 2 * lengths[g]
end
local packed = at -- ARGV index of request 1's packed updates

local hlen = {} -- state key -> HLEN, read when first needed
local bound = {} -- state key -> at most this many keys once the accepted requests apply
local known = {} -- topic -> true/false: in the shard (or accepted in this call)
local accepted = {} -- runs of accepted requests, in order
local ntopics = nil -- the shard's topic count, read when first needed

local function len_of(tkey)
  local n = hlen[tkey]
  if not n then
    n = redis.call('HLEN', tkey)
    hlen[tkey] = n
  end
  return n
end

local function is_known(g)
  local topic = ARGV[9 + g]
  local k = known[topic]
  if k == nil then
    if histories[g] < 0 then
      k = len_of(KEYS[5 + g]) > 0 or redis.call('SISMEMBER', topics, topic) == 1
    else
      k = redis.call('HEXISTS', floors, topic) == 1
    end
    known[topic] = k
  end
  return k
end

-- the keys of `tkey` the accepted runs add (exact: HEXISTS each), as a set, and their count
local function pending_of(tkey)
  local mine = {}
  local n = 0
  for _, g in ipairs(accepted) do
    if KEYS[5 + g] == tkey then
      for a = starts[g], starts[g] + 2 * lengths[g] - 1, 2 do
        local key = ARGV[a]
        if not mine[key] then
          mine[key] = true
          if redis.call('HEXISTS', tkey, key) == 0 then
            n = n + 1
          end
        end
      end
    end
  end
  return mine, n
end

-- 1. check a request whole (runs g0 + 1 .. g0 + n): its refusal, or nil
local function check(g0, n)
  local fresh = 0
  for g = g0 + 1, g0 + n do
    local tkey = KEYS[5 + g]
    if max_keys > 0 and histories[g] < 0
        and (bound[tkey] or len_of(tkey)) + lengths[g] > max_keys then
      -- near the limit: count exactly (a request holds one run per topic)
      local mine, count = pending_of(tkey)
      count = count + len_of(tkey)
      for a = starts[g], starts[g] + 2 * lengths[g] - 1, 2 do
        local key = ARGV[a]
        if not mine[key] then
          mine[key] = true
          if redis.call('HEXISTS', tkey, key) == 0 then
            count = count + 1
            if count > max_keys then
              return {'!', 'too_many_keys', ARGV[9 + g], key}
            end
          end
        end
      end
    end
    if max_topics > 0 and not is_known(g) then
      fresh = fresh + 1
      if not ntopics then
        ntopics = redis.call('SCARD', topics) + redis.call('HLEN', floors)
      end
      if ntopics + fresh > max_topics then
        return {'!', 'too_many_topics', ARGV[9 + g], ARGV[starts[g]]}
      end
    end
  end
  return nil
end

-- the positions: after the stream's newest entry, at Redis' clock at the earliest
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local seq = -1 -- the last seq taken
local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
if top then
  local tms, tseq = string.match(top[1], '^(%d+)-(%d+)$')
  tms = tonumber(tms)
  if tms >= ms then
    ms = tms
    seq = tonumber(tseq)
  end
end
local prefix = ms .. '-'

local out = {}
local blobs = {}
local firsts = {} -- accepted run g -> its request's first position ("ms-seq")
local total = 0 -- updates accepted
local g0 = 0
for r, n in ipairs(runs) do
  local refusal = check(g0, n)
  if refusal then
    out[#out + 1] = refusal
  else
    local first = prefix .. (seq + 1)
    out[#out + 1] = first
    for g = g0 + 1, g0 + n do
      accepted[#accepted + 1] = g
      firsts[g] = first
      seq = seq + lengths[g]
      total = total + lengths[g]
      if max_keys > 0 and histories[g] < 0 then
        local tkey = KEYS[5 + g]
        bound[tkey] = (bound[tkey] or len_of(tkey)) + lengths[g]
      end
      if max_topics > 0 and not known[ARGV[9 + g]] then -- checked: ntopics was read
        known[ARGV[9 + g]] = true
        ntopics = ntopics + 1
      end
    end
    blobs[#blobs + 1] = ARGV[packed + r - 1]
  end
  g0 = g0 + n
end

-- 2. apply the accepted requests: the entry first (an error there applies nothing)
local added = 0
if total > 0 then
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, prefix .. seq,
             'n', total, 'b', table.concat(blobs))
  local fields = {} -- state key -> {key, "<first>+<j> <data>", ...}
  local order = {}
  local state_topics = {}
  for _, g in ipairs(accepted) do
    local first = firsts[g]
    local topic = ARGV[9 + g]
    local tkey = KEYS[5 + g]
    local history = histories[g]
    local a0, a1 = starts[g], starts[g] + 2 * lengths[g] - 1
    if history < 0 then
      local f = fields[tkey]
      if not f then
        f = {}
        fields[tkey] = f
        order[#order + 1] = tkey
        state_topics[#state_topics + 1] = topic
      end
      local k = #f
      for a = a0, a1, 2 do
        local value = ARGV[a + 1]
        added = added + #value
        f[k + 1] = ARGV[a]
        f[k + 2] = first .. value
        k = k + 2
      end
    else
      -- a stream topic: each event with its own ID, its data without "+<j> "
      local fms, fseq = string.match(first, '^(%d+)-(%d+)$')
      fseq = tonumber(fseq)
      for a = a0, a1, 2 do
        local value = ARGV[a + 1]
        added = added + #value
        local space = string.find(value, ' ', 1, true)
        local id = fms .. '-' .. (fseq + tonumber(string.sub(value, 2, space - 1)))
        local data = string.sub(value, space + 1)
        if history == 0 then
          redis.call('HSET', floors, topic, id) -- retained: nothing
        else
          local len = redis.call('XLEN', tkey)
          if len >= history then
            local gone = redis.call('XRANGE', tkey, '-', '+', 'COUNT', len - history + 1)
            redis.call('HSET', floors, topic, gone[#gone][1])
          else
            redis.call('HSETNX', floors, topic, '0-0')
          end
          redis.call('XADD', tkey, 'MAXLEN', history, id, 'k', ARGV[a], 'd', data)
        end
      end
    end
    local expiry = expiries[g]
    if expiry then
      redis.call('ZADD', idle, ms + expiry, topic)
    end
  end
  for _, tkey in ipairs(order) do
    local f = fields[tkey]
    for s = 1, #f, UNPACK_MAX do
      redis.call('HSET', tkey, unpack(f, s, math.min(s + UNPACK_MAX - 1, #f)))
    end
  end
  for s = 1, #state_topics, UNPACK_MAX do
    redis.call('SADD', topics, unpack(state_topics, s, math.min(s + UNPACK_MAX - 1, #state_topics)))
  end
end
local due = 0
if max_bytes > 0 and added > 0 then
  if redis.call('HINCRBY', meta, 'added', added) >= check_every then
    redis.call('HSET', meta, 'added', 0)
    due = 1
  end
end
out[#out + 1] = due
return out
