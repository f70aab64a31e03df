#!lua
-- history.lua: a stream topic's retained events after a position, and its
-- floor, read in one atomic step (so no event can be trimmed in between).
--
-- KEYS[1]  the topic's history stream          <prefix>:{s<N>}:hist:<topic>
-- KEYS[2]  the shard's stream topics' floors   <prefix>:{s<N>}:streams (hash)
-- ARGV[1]  the topic
-- ARGV[2]  after: only events with an ID after this one
-- ARGV[3]  upto: only events with an ID at or before this one ('+': no bound)
-- ARGV[4]  count: 0 for every event, else the newest `count` at most
--
-- Returns {floor, events}: floor is the ID of the newest event no longer
-- retained ('0-0': none; '': the topic was never published as a stream
-- topic); events are [id, [field, value, ...]], oldest first when count is 0,
-- newest first otherwise.
local floor = redis.call('HGET', KEYS[2], ARGV[1]) or ''
local count = tonumber(ARGV[4])
local events
if count > 0 then
  events = redis.call('XREVRANGE', KEYS[1], ARGV[3], '(' .. ARGV[2], 'COUNT', count)
else
  events = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], ARGV[3])
end
return {floor, events}
