#!lua
-- publish.lua: publish a batch of updates to ONE shard, atomically.
--
-- KEYS[1]      the shard's stream                    <prefix>:{s<N>}:log
-- KEYS[2]      the shard's set of state topics       <prefix>:{s<N>}:topics
-- KEYS[3]      the shard's stream topics' floors     <prefix>:{s<N>}:streams (hash)
-- KEYS[3 + i]  update i's topic state hash           <prefix>:{s<N>}:state:<topic>
--              or, for a stream topic, its history   <prefix>:{s<N>}:hist:<topic>
-- ARGV[1]      MAXLEN ~ of the shard's stream
-- ARGV[2 + 4(i-1) .. 5 + 4(i-1)]  update i: topic, key, data (msgpack bytes),
--              history (-1: a state topic; >= 0: a stream topic retaining that many events)
--
-- For each update, in order: XADD the entry to the shard's stream (its ID is
-- the position). A state topic: record the key's latest "<id> <data>" in the
-- topic's state hash and remember the topic in the shard's topic set (what a
-- reader loads on connect). A stream topic: append the event to the topic's
-- history stream with the same ID, trimmed to `history` events exactly, and
-- record in the floors hash the ID of the newest event trimmed ('0-0' until
-- one is): what a reader needs to know what it lost. Returns the IDs. Every key
-- shares the shard's hash tag, so this runs on one Redis Cluster node. The
-- `#!lua` line makes Redis refuse the whole script up front when it is out of
-- memory (deny-oom), instead of failing between two writes.
local stream = KEYS[1]
local topics = KEYS[2]
local floors = KEYS[3]
local maxlen = ARGV[1]
local ids = {}
local n = (#ARGV - 1) / 4
for i = 1, n do
  local topic = ARGV[4 * i - 2]
  local key = ARGV[4 * i - 1]
  local data = ARGV[4 * i]
  local history = tonumber(ARGV[4 * i + 1])
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
                        't', topic, 'k', key, 'd', data)
  if history < 0 then
    redis.call('HSET', KEYS[3 + i], key, id .. ' ' .. data)
    redis.call('SADD', topics, topic)
  elseif history == 0 then
    redis.call('HSET', floors, topic, id)  -- retained: nothing
  else
    local hist = KEYS[3 + i]
    local len = redis.call('XLEN', hist)
    if len >= history then
      local gone = redis.call('XRANGE', hist, '-', '+', 'COUNT', len - history + 1)
      redis.call('HSET', floors, topic, gone[#gone][1])
    else
      redis.call('HSETNX', floors, topic, '0-0')
    end
    redis.call('XADD', hist, 'MAXLEN', history, id, 'k', key, 'd', data)
  end
  ids[i] = id
end
return ids
