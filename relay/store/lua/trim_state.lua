-- Retention (relay/retention.py): forget Sessions and CDRs whose last_updated is older than the window: the
-- state field and its index member in one step, each only if its score is still the one the sweeper saw (an
-- object updated since is kept). A Session with an update still undelivered (session-last newer than
-- session-done) is kept too: its delivery may need the state (PATCH as PUT).
-- KEYS: index zset, state hash, session-last, session-done.
-- ARGV: state field prefix 'CC:PID:', session key prefix 'ses:CC:PID:' ('' for CDRs), then
--       member, score seen, member, score seen, ...
-- Returns {members forgotten, members whose score changed since (or gone)}: the caller's paging counts the others.
-- include: gt.lua
local gone, moved = {}, {}
for i = 3, #ARGV, 2 do
  local m = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    local waiting = false
    if ARGV[2] ~= '' then
      local last = redis.call('HGET', KEYS[3], ARGV[2] .. m)
      waiting = last and gt(last, redis.call('HGET', KEYS[4], ARGV[2] .. m))
    end
    if not waiting then
      redis.call('HDEL', KEYS[2], ARGV[1] .. m)
      redis.call('ZREM', KEYS[1], m)
      table.insert(gone, m)
    end
  else
    table.insert(moved, m)
  end
end
return {gone, moved}
