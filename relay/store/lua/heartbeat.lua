#!lua flags=allow-oom
-- Record a replica as alive and forget the dead ones; returns how many are alive.
-- allow-oom: at Redis's maxmemory (noeviction) the replicas must keep their shards and deliver, which is
-- what frees room; a refused heartbeat would stop the drain. One zset member per replica.
-- KEYS: replicas zset. ARGV: me, now (ms), dead after (ms).
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, tonumber(ARGV[2]) - tonumber(ARGV[3]))
return redis.call('ZCARD', KEYS[1])
