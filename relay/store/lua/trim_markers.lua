-- Retention (relay/retention.py): forget marker fields (delivered, accepted, dead-last) the sweeper found
-- older than its window, each only if it still holds the id the sweeper saw: a field written since (a newer
-- event of its key) is kept.
-- KEYS: the marker hash. ARGV: field, id seen, field, id seen, ...
-- Returns how many fields were deleted.
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
