-- One event and the current state of its object, in one step (so they never disagree).
-- KEYS: stream, session-last, state hash, index zset, accepted
-- ARGV: envelope, kind ('session'|'cdr'|''), ordering key, mode ('put'|'cas'|'del'|'none'),
--       state field, expected version (cas), document, score (last_updated ms), index member,
--       accepted field (module|key of a Location or Tariff: its newest accepted id, the replay guard) or ''
--       idempotency answer ('' = no Idempotency-Key; KEYS[6] is then any key of the shard), its TTL (s),
--       resend ('1': X-Relay-Resend, stored even when the object already is this document)
-- KEYS[6]: the request's Idempotency-Key (per operator and route). Returns {'replay', stored answer} when a
-- request with it was answered before (nothing written), {'dup'} when the object already is this document
-- (a retried PUT or PATCH: nothing stored but the key's answer, 'd' .. answer; an accepted one is 'a' .. answer).
-- Returns the stream id, or false when a 'cas' or 'none' finds another version than the one the
-- caller read (the caller reads and merges again): 'none' (nothing to merge into) is a decision
-- taken on that read too, and must not stand if the object appeared or changed in between.
local mode = ARGV[4]
if ARGV[11] ~= '' then
  local prior = redis.call('GET', KEYS[6])
  -- The caller confirms an accepted replay with touch.lua (the kept answer may belong to another body: a 422
  -- writes nothing).
  if prior then return {'replay', prior} end
end
local ver = 0
local cur = redis.call('HGET', KEYS[3], ARGV[5])
if cur then ver = tonumber(string.match(cur, '^(%d+)|')) or 0 end
if (mode == 'cas' or mode == 'none') and ver ~= tonumber(ARGV[6]) then return false end
if (mode == 'put' or mode == 'cas') and cur and ARGV[13] ~= '1' then
  local bar = string.find(cur, '|', 1, true)
  if bar and string.sub(cur, bar + 1) == ARGV[7] then
    if ARGV[11] ~= '' then redis.call('SET', KEYS[6], 'd' .. ARGV[11], 'NX', 'EX', ARGV[12]) end
    redis.call('HSET', KEYS[3], ARGV[5], cur)  -- unchanged, but a replicated write: as for a replay above
    return {'dup'}
  end
end
local id
if ARGV[2] == 'cdr' then
  local after = redis.call('HGET', KEYS[2], ARGV[3])
  if after then id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'a', after)
  else id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1]) end
else
  id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
  if ARGV[2] == 'session' then redis.call('HSET', KEYS[2], ARGV[3], id) end
end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[5], ARGV[10], id) end
if mode == 'put' or mode == 'cas' then
  redis.call('HSET', KEYS[3], ARGV[5], (ver + 1) .. '|' .. ARGV[7])
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[9])
elseif mode == 'del' then
  redis.call('HDEL', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[9])
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[6], 'a' .. ARGV[11], 'NX', 'EX', ARGV[12]) end
return id
