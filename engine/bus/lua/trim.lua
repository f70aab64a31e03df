#!lua flags=allow-oom
-- trim.lua: keep ONE shard's stream within a memory budget.
--
-- KEYS[1]  the shard's stream              <prefix>:{s<N>}:log
-- KEYS[2]  the shard's meta hash           <prefix>:{s<N>}:meta
-- ARGV[1]  the budget: bytes the stream may take (MEMORY USAGE)
-- ARGV[2]  entries to keep at least (the newest ones)
--
-- Measures the stream (MEMORY USAGE, every node) and, when it takes more than
-- the budget, removes its oldest entries until about that much was freed:
-- they are read in chunks of 16 (bounded memory) to learn their size and the
-- ID of the newest one removed, which is recorded as `trimmed` in the meta
-- hash: a reader whose last ID is below it lost entries and loads the shard
-- again (redis_streams.py rule 8). `allow-oom`: Redis runs it even when out
-- of memory, when the publish script is refused; it only frees memory.
-- Returns {entries removed, the stream's bytes before}.
local stream = KEYS[1]
local meta = KEYS[2]
local budget = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local usage = redis.call('MEMORY', 'USAGE', stream, 'SAMPLES', 0)
if not usage or usage <= budget then
  return {0, usage or 0}
end
local removable = redis.call('XLEN', stream) - keep
local excess = usage - budget
local freed = 0
local removed = 0
local last = nil
local start = '-'
while freed < excess and removed < removable do
  local rows = redis.call('XRANGE', stream, start, '+', 'COUNT', 16)
  if #rows == 0 then
    break
  end
  for _, row in ipairs(rows) do
    local size = 64 -- about what an entry costs beside its fields
    for j = 1, #row[2] do
      size = size + #row[2][j]
    end
    freed = freed + size
    last = row[1]
    removed = removed + 1
    if freed >= excess or removed >= removable then
      break
    end
  end
  start = '(' .. last
end
if last then
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  redis.call('XTRIM', stream, 'MINID', ms .. '-' .. (tonumber(seq) + 1))
  redis.call('HSET', meta, 'trimmed', last)
end
return {removed, usage}
