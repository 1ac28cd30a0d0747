-- Append a session update and record it as its session's latest (the id a later CDR waits for).
-- KEYS: stream, session-last
-- ARGV: envelope, session ordering key
-- Returns the stream id.
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], id)
return id
