-- Move an entry to its dead-letter stream with the reason, ack it, maybe park its key.
-- KEYS: stream, dlq, session-done, parked, dead-last
-- ARGV: group, id, envelope, info, session key or '', after or '', park field or '', source id (the entry's
--       original id if it was replayed, else its id: the replay guard compares original ids),
--       module|key of an object with state or '' (dead-last: the newest dead-lettered source id, which with
--       the delivered marker tells the replay guard whether a newer accepted event is still queued)
--       ARGV[10]: the dead letter the key was seen parked behind, or '' (ARGV[11]: module|key);
-- Returns the dead letter's id, false if another finisher got there first, or 'unparked' when the key is no
-- longer parked behind ARGV[10] (a purge or a replay got in since the forwarder looked): nothing written.
-- include: gt.lua
if ARGV[10] ~= '' and redis.call('HGET', KEYS[4], ARGV[11]) ~= ARGV[10] then return 'unparked' end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
-- Only the first to finish the entry writes the dead letter (see finish.lua).
if redis.call('XDEL', KEYS[1], ARGV[2]) == 0 then return false end
local fields = {'e', ARGV[3], 'i', ARGV[4], 's', ARGV[8]}
if ARGV[6] ~= '' then table.insert(fields, 'a'); table.insert(fields, ARGV[6]) end
local dead = redis.call('XADD', KEYS[2], '*', unpack(fields))
if ARGV[5] ~= '' and gt(ARGV[2], redis.call('HGET', KEYS[3], ARGV[5])) then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[2])
end
if ARGV[7] ~= '' then redis.call('HSETNX', KEYS[4], ARGV[7], dead) end
if ARGV[9] ~= '' and gt(ARGV[8], redis.call('HGET', KEYS[5], ARGV[9])) then
  redis.call('HSET', KEYS[5], ARGV[9], ARGV[8])
end
return dead
