-- Take back a pending token A if it is still this one, putting another back in its place.
-- KEYS: token-a. ARGV: the token, the one to restore ('' deletes the key).
-- Returns 1, or 0 if the pending token A is another one (or none).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
