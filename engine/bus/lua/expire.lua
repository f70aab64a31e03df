#!lua flags=allow-oom
-- expire.lua: remove ONE shard's topics idle past their deadline.
--
-- KEYS[1]  the shard's idle deadlines      <prefix>:{s<N>}:expiry (zset: topic -> ms)
-- KEYS[2]  the shard's set of state topics <prefix>:{s<N>}:topics
-- KEYS[3]  the shard's stream topics' floors <prefix>:{s<N>}:streams (hash)
-- ARGV[1]  the shard's key prefix          <prefix>:{s<N>}:
-- ARGV[2]  at most this many topics per call
--
-- A topic whose rule has an idle expiry gets a deadline (its last publish +
-- the expiry, in ms) from publish.lua. Past it (Redis' clock), the topic's
-- state hash or history stream, its membership and its floor are removed, so
-- it no longer counts toward bus.max_topics and no reader loads it again.
-- (Entries of it still in the shard's stream stay until trimmed; a reader
-- that holds the topic keeps it.) The state and history keys are built from
-- ARGV[1]: they share the shard's hash tag, so they live in this node's slot.
-- `allow-oom`: it only frees memory. Returns the topics removed.
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[2]))
for _, topic in ipairs(due) do
  redis.call('DEL', ARGV[1] .. 'state:' .. topic, ARGV[1] .. 'hist:' .. topic)
  redis.call('SREM', KEYS[2], topic)
  redis.call('HDEL', KEYS[3], topic)
  redis.call('ZREM', KEYS[1], topic)
end
return due
