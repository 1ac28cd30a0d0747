-- Ack + delete a delivered entry and advance its watermarks.
-- KEYS: stream, delivered, session-done, session-last
-- ARGV: group, id, module|key, session key ('' unless a session), cdr key ('' unless a CDR), cdr's after id,
--       the id the delivered marker records (a replayed entry's original id, else its id: the replay guard
--       compares original ids, or a replayed update would make the key's other dead letters look older),
--       then, for a compacted unit (relay.compaction), the ids of the entries it supersedes: acknowledged and
--       deleted with it (the marker and session-done above are already the newest of them all)
-- Returns what XACK counted.
-- include: gt.lua
for i = 8, #ARGV, 500 do
  local j = math.min(i + 499, #ARGV)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, j))
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, j))
end
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
-- The first to finish an entry is the one that deletes it. (XACK alone cannot tell: it counts 0
-- when the group was recreated after NOGROUP, and a delivered session update must still count.)
local d = redis.call('XDEL', KEYS[1], ARGV[2])
if d == 1 then
  if gt(ARGV[7], redis.call('HGET', KEYS[2], ARGV[3])) then redis.call('HSET', KEYS[2], ARGV[3], ARGV[7]) end
  if ARGV[4] ~= '' and gt(ARGV[2], redis.call('HGET', KEYS[3], ARGV[4])) then
    redis.call('HSET', KEYS[3], ARGV[4], ARGV[2])
  end
  if ARGV[5] ~= '' and redis.call('HGET', KEYS[4], ARGV[5]) == ARGV[6] then
    -- the session is over: its CDR is out and no update came after it; forget its watermarks
    redis.call('HDEL', KEYS[4], ARGV[5])
    redis.call('HDEL', KEYS[3], ARGV[5])
  end
end
return n
