-- Extend a lease this replica holds.
-- KEYS: lease. ARGV: me, ttl ms. Returns 1, or 0 if the lease was lost.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
