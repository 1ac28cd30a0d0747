-- Retention (relay/retention.py): forget marker fields (delivered, accepted, dead-last) the sweeper found
-- older than its window, each only if it still holds the id the sweeper saw: a field written since (a newer
-- event of its key) is kept.
-- KEYS: the marker hash; for the accepted hash also the delivered and dead-last hashes: an accepted id above
--       both (the key's newest event is still queued, however old) is kept, or a replay of an older dead letter
--       of the key would no longer see it queued and go after it (the replay guard, replay.lua).
-- ARGV: field, id seen, field, id seen, ...
-- Returns how many fields were deleted.
-- include: gt.lua
local n = 0
for i = 1, #ARGV, 2 do
  local f, seen = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[1], f) == seen then
    local queued = KEYS[3] ~= nil and gt(seen, redis.call('HGET', KEYS[2], f))
        and gt(seen, redis.call('HGET', KEYS[3], f))
    if not queued then n = n + redis.call('HDEL', KEYS[1], f) end
  end
end
return n
