#!lua
-- epoch.lua: read the bus epoch, creating or replacing it atomically.
--
-- KEYS[1]  the epoch key                    <prefix>:epoch
-- ARGV[1]  a fresh random epoch
-- ARGV[2]  the epoch to replace, or '' (only create a missing one)
--
-- A missing epoch (Redis lost its data, or a new deployment) is created; an
-- epoch equal to ARGV[2] (a reader found that Redis lost entries it had
-- acknowledged) is replaced. Many clients may race: exactly one value wins and
-- every caller gets it. Returns the current epoch.
local cur = redis.call('GET', KEYS[1])
if (not cur) or (ARGV[2] ~= '' and cur == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return cur
