#!lua flags=allow-oom
-- allow-oom: at Redis's maxmemory a replica must still take its shards and deliver (that frees room).
-- Take or keep a shard lease.
-- KEYS: lease. ARGV: me, ttl ms.
-- Returns the previous holder ('' none, 'self', 'free:x' released), or false if another replica holds it.
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]); return 'self' end
if v and string.sub(v, 1, 5) ~= 'free:' then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return v or ''
