#!lua
-- publish.lua: publish a batch of updates to ONE shard, atomically.
--
-- KEYS[1]      the shard's stream            <prefix>:{s<N>}:log
-- KEYS[2]      the shard's set of topics     <prefix>:{s<N>}:topics
-- KEYS[2 + i]  update i's topic state hash   <prefix>:{s<N>}:state:<topic>
-- ARGV[1]      MAXLEN ~ of the stream
-- ARGV[2 + 3(i-1) .. 4 + 3(i-1)]  update i: topic, key, data (msgpack bytes)
--
-- For each update, in order: XADD the entry (its ID is the position), record
-- the key's latest "<id> <data>" in the topic's state hash, and remember the
-- topic in the shard's topic set (what a reader loads on connect). Returns
-- the IDs. Every key shares the shard's hash tag, so this runs on one Redis
-- Cluster node. The `#!lua` line makes Redis refuse the whole script up front
-- when it is out of memory (deny-oom), instead of failing between two writes.
local stream = KEYS[1]
local topics = KEYS[2]
local maxlen = ARGV[1]
local ids = {}
local n = (#ARGV - 1) / 3
for i = 1, n do
  local topic = ARGV[3 * i - 1]
  local key = ARGV[3 * i]
  local data = ARGV[3 * i + 1]
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
                        't', topic, 'k', key, 'd', data)
  redis.call('HSET', KEYS[2 + i], key, id .. ' ' .. data)
  redis.call('SADD', topics, topic)
  ids[i] = id
end
return ids
