-- A compacted unit's dead letter (relay.compaction): the ids it supersedes acknowledged and deleted, then
-- dead_letter.lua for the unit itself (its envelope is the request that carried the run's effect).
-- KEYS, ARGV: as dead_letter.lua's; ARGV[12..]: the superseded ids.
if ARGV[10] ~= '' and redis.call('HGET', KEYS[4], ARGV[11]) ~= ARGV[10] then return 'unparked' end
for i = 12, #ARGV, 500 do
  local j = math.min(i + 499, #ARGV)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, j))
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, j))
end
-- include: dead_letter.lua
