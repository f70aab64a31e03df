#!lua
-- publish.lua: publish requests' updates to ONE shard, each request atomically.
--
-- KEYS[1]      the shard's stream                    <prefix>:{s<N>}:log
-- KEYS[2]      the shard's set of state topics       <prefix>:{s<N>}:topics
-- KEYS[3]      the shard's stream topics' floors     <prefix>:{s<N>}:streams (hash)
-- KEYS[4]      the shard's meta hash                 <prefix>:{s<N>}:meta
--              (added: data bytes since the last byte check; trimmed: the ID
--              of the newest entry a byte trim removed)
-- KEYS[5]      the shard's idle deadlines            <prefix>:{s<N>}:expiry (zset)
-- KEYS[5 + i]  update i's (1-based) topic state hash           <prefix>:{s<N>}:state:<topic>
--              or, for a stream topic, its history   <prefix>:{s<N>}:hist:<topic>
-- ARGV[1]      MAXLEN ~ of the shard's stream
-- ARGV[2]      keys a state topic may hold (0: no limit)
-- ARGV[3]      topics the shard may hold (0: no limit)
-- ARGV[4]      bytes the shard's stream may take (0: no byte checks)
-- ARGV[5]      data bytes added between two byte checks
-- ARGV[6]      the requests' update counts, comma-separated ("1,1,3")
-- ARGV[7]      idle expiries: "i:ms" pairs, comma-separated, for the updates
--              (1-based in this call) of topics with one ("": none)
-- ARGV[8..]    the updates, 4 each: topic, key, data (msgpack bytes), history
--              (-1: a state topic; >= 0: a stream topic retaining that many events)
--              (two strings instead of 2 values per update: each argument
--              costs the client an encode and Redis a copy)
--
-- Each request is checked whole, then applied whole (engine/bus/limits.py
-- rules 2-3): a request that would add a key to a full topic, or a topic to
-- a full shard, is refused with nothing of it applied, and the next request
-- is checked on its own. For each update of an accepted request, in order:
-- XADD the entry to the shard's stream (its ID is the position). A state
-- topic: record the key's latest "<id> <data>" in the topic's state hash and
-- remember the topic in the shard's topic set (what a reader loads on
-- connect). A stream topic: append the event to the topic's history stream
-- with the same ID, trimmed to `history` events exactly, and record in the
-- floors hash the ID of the newest event trimmed ('0-0' until one is). A topic
-- with an idle expiry gets its deadline (ms) in the idle zset (expire.lua).
-- Returns, per request, its IDs, or {'!', code, topic, key} when refused;
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

local counts = {}
for c in string.gmatch(ARGV[6], '%d+') do
  counts[#counts + 1] = tonumber(c)
end
local expiries = {}
for i, ms in string.gmatch(ARGV[7], '(%d+):(%d+)') do
  expiries[tonumber(i)] = tonumber(ms)
end

local out = {}
local u = 0 -- updates of this call before the current request
local added = 0
local ntopics = nil -- the shard's topic count, read when first needed
for _, n in ipairs(counts) do
  -- 1. check the request whole
  local refusal = nil
  if max_keys > 0 or max_topics > 0 then
    local new_topics = {}
    local fresh = 0
    local new_keys = {} -- state key -> keys this request adds
    local seen = {}
    for i = u + 1, u + n do
      local topic = ARGV[4 * i + 4]
      local key = ARGV[4 * i + 5]
      local history = tonumber(ARGV[4 * i + 7])
      local tkey = KEYS[5 + i]
      local known = true
      if history < 0 then
        -- the common case, a key rewritten, costs one HEXISTS
        if redis.call('HEXISTS', tkey, key) == 0 then
          known = redis.call('SISMEMBER', topics, topic) == 1
          if max_keys > 0 and not seen[tkey .. '\0' .. key] then
            seen[tkey .. '\0' .. key] = true
            local count = (new_keys[tkey] or redis.call('HLEN', tkey)) + 1
            new_keys[tkey] = count
            if count > max_keys then
              refusal = {'!', 'too_many_keys', topic, key}
              break
            end
          end
        end
      else
        known = redis.call('HEXISTS', floors, topic) == 1
      end
      if max_topics > 0 and not known and not new_topics[topic] then
        new_topics[topic] = true
        fresh = fresh + 1
        if not ntopics then
          ntopics = redis.call('SCARD', topics) + redis.call('HLEN', floors)
        end
        if ntopics + fresh > max_topics then
          refusal = {'!', 'too_many_topics', topic, key}
          break
        end
      end
    end
    if not refusal and ntopics then
      ntopics = ntopics + fresh
    end
  end
  -- 2. apply it
  if refusal then
    out[#out + 1] = refusal
  else
    local ids = {}
    for i = u + 1, u + n do
      local topic = ARGV[4 * i + 4]
      local key = ARGV[4 * i + 5]
      local data = ARGV[4 * i + 6]
      local history = tonumber(ARGV[4 * i + 7])
      local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
                            't', topic, 'k', key, 'd', data)
      added = added + #data
      if history < 0 then
        redis.call('HSET', KEYS[5 + i], key, id .. ' ' .. data)
        redis.call('SADD', topics, topic)
      elseif history == 0 then
        redis.call('HSET', floors, topic, id) -- retained: nothing
      else
        local hist = KEYS[5 + i]
        local len = redis.call('XLEN', hist)
        if len >= history then
          local gone = redis.call('XRANGE', hist, '-', '+', 'COUNT', len - history + 1)
          redis.call('HSET', floors, topic, gone[#gone][1])
        else
          redis.call('HSETNX', floors, topic, '0-0')
        end
        redis.call('XADD', hist, 'MAXLEN', history, id, 'k', key, 'd', data)
      end
      local expiry = expiries[i]
      if expiry then
        local ms = tonumber(string.match(id, '^(%d+)-'))
        redis.call('ZADD', idle, ms + expiry, topic)
      end
      ids[#ids + 1] = id
    end
    out[#out + 1] = ids
  end
  u = u + n
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
