-- Put a dead letter back on the ordered path (a new id at the end of its stream) and unpark its key,
-- unless (guard) a newer event of its key was delivered or is still queued; the dead letters it supersedes
-- (older ones of the same key, replayed as one with it) leave the DLQ in the same step.
-- The guard is asked only for an object with state (never a CDR or a command result: immutable), and
-- it is waived for a replay from state whose object has a stored state: that replay sends the current
-- state at the end of the stream, so it cannot roll the IOP back (docs/delivery.md, "Replaying").
-- KEYS: dlq, stream, parked, delivered, dead-last, accepted (the accepted hash, or session-last for a session),
--       state (the module's state hash of the shard)
-- ARGV: dead id, module|key, envelope to queue ('' = the stored one), guard ('1' or ''), field of the key in
--       KEYS[6] ('' = none recorded), dry run ('1': decide only), field of the object in KEYS[7] ('' = a
--       replay as it was), then the ids of the superseded dead letters
-- Returns {'replayed', new id, unparked 0|1, {ids of the superseded deleted}}, {'gone'}, {'newer', 'delivered'|'queued'}
-- or (dry run) {'would_replay'}.
-- include: gt.lua
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #rows == 0 then return {'gone'} end
local f = rows[1][2]
local e, a, s
for i = 1, #f, 2 do
  if f[i] == 'e' then e = f[i + 1] elseif f[i] == 'a' then a = f[i + 1] elseif f[i] == 's' then s = f[i + 1] end
end
local guard = ARGV[4] == '1'
if guard and ARGV[7] ~= '' then
  local st = redis.call('HGET', KEYS[7], ARGV[7])
  if st then
    local bar = string.find(st, '|', 1, true)
    if bar and bar < #st then guard = false end  -- a stored document: the replay sends it
  end
end
if guard then
  -- Original ids of one stream compare exactly. A key's events finish in stream order, so everything
  -- accepted after the last finished one (delivered or dead-lettered) is still queued.
  local delivered = redis.call('HGET', KEYS[4], ARGV[2])
  if delivered and gt(delivered, s) then return {'newer', 'delivered'} end
  if ARGV[5] ~= '' then
    local accepted = redis.call('HGET', KEYS[6], ARGV[5])
    if accepted and gt(accepted, s) and gt(accepted, delivered)
        and gt(accepted, redis.call('HGET', KEYS[5], ARGV[2])) then
      return {'newer', 'queued'}
    end
  end
end
if ARGV[6] == '1' then return {'would_replay'} end
if ARGV[3] ~= '' then e = ARGV[3] end
local id
if a then id = redis.call('XADD', KEYS[2], '*', 'e', e, 'a', a, 'o', s)
else id = redis.call('XADD', KEYS[2], '*', 'e', e, 'o', s) end
redis.call('XDEL', KEYS[1], ARGV[1])
local unparked = redis.call('HDEL', KEYS[3], ARGV[2])
local superseded = {}
for i = 8, #ARGV do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then table.insert(superseded, ARGV[i]) end
end
return {'replayed', id, unparked, superseded}
