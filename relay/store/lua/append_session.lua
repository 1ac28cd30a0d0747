-- Append an event and record its id as its key's latest accepted: a session update in session-last
-- (the id a later CDR waits for), a Location or Tariff (without the state store) in accepted (the replay
-- guard's "a newer event is queued").
-- KEYS: stream, session-last or accepted
-- ARGV: envelope, session ordering key or module|key
-- Returns the stream id.
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], id)
return id
