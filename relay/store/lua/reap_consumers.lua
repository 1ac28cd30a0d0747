-- Remove the consumers of replicas no longer alive that hold no pending entry: every restart of a replica
-- leaves its old consumer in every group. One holding entries is never removed (they wait for a taker's
-- XAUTOCLAIM; the next sweep removes it), and the check and the removal are one step.
-- KEYS: stream. ARGV: group, then the ids of the live replicas. Returns the names removed.
local alive = {}
for i = 2, #ARGV do alive[ARGV[i]] = true end
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
  end
  if name and pending == 0 and not alive[name] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed[#removed + 1] = name
  end
end
return removed
