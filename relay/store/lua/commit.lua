-- One event and the current state of its object, in one step (so they never disagree).
-- KEYS: stream, session-last, state hash, index zset
-- ARGV: envelope, kind ('session'|'cdr'|''), ordering key, mode ('put'|'cas'|'del'|'none'),
--       state field, expected version (cas), document, score (last_updated ms), index member
-- Returns the stream id, or false when a 'cas' or 'none' finds another version than the one the
-- caller read (the caller reads and merges again): 'none' (nothing to merge into) is a decision
-- taken on that read too, and must not stand if the object appeared or changed in between.
local mode = ARGV[4]
local ver = 0
local cur = redis.call('HGET', KEYS[3], ARGV[5])
if cur then ver = tonumber(string.match(cur, '^(%d+)|')) or 0 end
if (mode == 'cas' or mode == 'none') and ver ~= tonumber(ARGV[6]) then return false end
local id
if ARGV[2] == 'cdr' then
  local after = redis.call('HGET', KEYS[2], ARGV[3])
  if after then id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'a', after)
  else id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1]) end
else
  id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
  if ARGV[2] == 'session' then redis.call('HSET', KEYS[2], ARGV[3], id) end
end
if mode == 'put' or mode == 'cas' then
  redis.call('HSET', KEYS[3], ARGV[5], (ver + 1) .. '|' .. ARGV[7])
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[9])
elseif mode == 'del' then
  redis.call('HDEL', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[9])
end
return id
