-- Append a CDR, noting the id of its session's latest update (accepted before it) in field 'a'.
-- KEYS: stream, session-last
-- ARGV: envelope, session ordering key
-- Returns the stream id.
local after = redis.call('HGET', KEYS[2], ARGV[2])
if after then
  return redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'a', after)
end
return redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
