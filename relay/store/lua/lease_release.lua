#!lua flags=allow-oom
-- allow-oom: at Redis's maxmemory a replica must still take its shards and deliver (that frees room).
-- Hand a shard back cleanly ('free:<me>'): the next owner need not wait for our in-flight attempts.
-- KEYS: lease. ARGV: me, ttl ms. Returns 1, or 0 if the lease was not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'free:' .. ARGV[1], 'PX', ARGV[2]); return 1
end
return 0
