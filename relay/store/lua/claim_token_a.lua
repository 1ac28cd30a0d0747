#!lua flags=allow-oom
-- Spend a one-time token A as a registration starts: only one caller gets it, however many race.
-- allow-oom: at Redis's maxmemory (noeviction) a registration must still be possible. Tiny writes.
-- KEYS: token-a, token-a-used. ARGV: the token's digest (token-a holds a digest too, never the token),
-- '1' if it is the configured [ocpi] token_a.
-- Returns 0 (spent already, or no longer a token A), 1 (the configured one), 2 (the pending one, now deleted).
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
local pending = redis.call('GET', KEYS[1]) == ARGV[1]
if not pending and ARGV[2] ~= '1' then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
if pending then
  redis.call('DEL', KEYS[1])
  return 2
end
return 1
