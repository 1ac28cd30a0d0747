#!lua flags=allow-oom
-- Compare-and-set: take back a pending token A if it is still this one, putting another back in its place
-- (also used to replace a registration stored in clear by an older version with its hashed form).
-- KEYS: token-a (or the registration). ARGV: the value expected there (a token A's digest), the one to put
-- in its place ('' deletes the key).
-- Returns 1, or 0 if the key holds another value (or none).
-- allow-oom: at Redis's maxmemory (noeviction) a registration must still be possible. Tiny writes.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
