-- Put a dead letter back on the ordered path (a new id at the end of its stream) and unpark its key.
-- KEYS: dlq, stream, parked. ARGV: dead id, park field.
-- Returns the new stream id, or false if the dead letter is gone.
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #rows == 0 then return false end
local f = rows[1][2]
local e, a, s
for i = 1, #f, 2 do
  if f[i] == 'e' then e = f[i + 1] elseif f[i] == 'a' then a = f[i + 1] elseif f[i] == 's' then s = f[i + 1] end
end
local id
if a then id = redis.call('XADD', KEYS[2], '*', 'e', e, 'a', a, 'o', s)
else id = redis.call('XADD', KEYS[2], '*', 'e', e, 'o', s) end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
return id
