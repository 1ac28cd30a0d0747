-- Delete a dead letter for good; if it is the one that parked its key, unpark the key in the same step.
-- KEYS: dlq, parked. ARGV: dead id, module|key.
-- Returns {deleted 0|1, unparked 0|1}.
local deleted = redis.call('XDEL', KEYS[1], ARGV[1])
local unparked = 0
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then unparked = redis.call('HDEL', KEYS[2], ARGV[2]) end
return {deleted, unparked}
