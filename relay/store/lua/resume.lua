#!lua flags=allow-oom
-- `relay link resume`: ask every replica to resume a paused or auth-failed link.
-- allow-oom: at Redis's maxmemory (noeviction) a stopped link must still be resumable, since delivering
-- is what frees room. One hash field.
-- KEYS: the link hash. ARGV: the resume field, when (epoch seconds).
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
