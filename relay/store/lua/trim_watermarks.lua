-- Retention (relay/retention.py): forget the watermarks of sessions the sweeper found older than its window,
-- only when nothing of the session is undelivered (session-done >= session-last: a CDR waiting for an update
-- keeps them), and each only if it still holds the id the sweeper saw (an update accepted since is kept).
-- KEYS: session-last, session-done.
-- ARGV: mode ('last': the ids seen are session-last's, both fields go together; 'done': the ids seen are
--       session-done's of sessions without a session-last field), then field, id seen, field, id seen, ...
-- Returns how many sessions were forgotten.
-- include: gt.lua
local n = 0
for i = 2, #ARGV, 2 do
  local f, seen = ARGV[i], ARGV[i + 1]
  if ARGV[1] == 'last' then
    if redis.call('HGET', KEYS[1], f) == seen and not gt(seen, redis.call('HGET', KEYS[2], f)) then
      redis.call('HDEL', KEYS[1], f)
      redis.call('HDEL', KEYS[2], f)
      n = n + 1
    end
  elseif redis.call('HGET', KEYS[2], f) == seen and redis.call('HEXISTS', KEYS[1], f) == 0 then
    n = n + redis.call('HDEL', KEYS[2], f)
  end
end
return n
