-- Rewrite a key with its own value and TTL: nothing changes, but it is a write that is replicated and fsynced
-- after every earlier one, so the WAIT/WAITAOF that follows on this connection covers them too. Used for a
-- retried request answered from its Idempotency-Key: the event its first attempt stored (on another connection)
-- is then confirmed as the policy asks before this one's 202.
-- KEYS: the key. Returns 1 if it existed.
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
redis.call('SET', KEYS[1], v, 'KEEPTTL')
return 1
