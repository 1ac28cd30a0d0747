#!lua flags=allow-oom
-- A new one-time token A (its digest), or (ARGV[2] = '1') put one back unless a newer one was made
-- meanwhile, un-spending it (release after a failed handshake).
-- allow-oom: at Redis's maxmemory (noeviction) a registration must still be possible. Tiny writes.
-- KEYS: token-a, token-a-used. ARGV: the token's digest, mode: '' set, '1' release a pending one,
-- '0' release the configured one.
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
redis.call('SREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[1], 'NX') end
return 1
