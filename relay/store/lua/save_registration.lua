#!lua flags=allow-oom
-- Replace the registration; a token A that was just used is retired in the same step.
-- allow-oom: at Redis's maxmemory (noeviction) the credentials handshake must still complete (a link
-- without a registration cannot deliver, which is what frees room). One small document.
-- KEYS: registration, token-a, token-a-used. ARGV: the registration JSON, the used token A's digest ('' none).
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('DEL', KEYS[2])
  redis.call('SADD', KEYS[3], ARGV[2])
end
return 1
