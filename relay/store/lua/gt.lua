-- Included by finish.lua, dead_letter.lua and replay.lua (see relay/store/scripts.py).
-- Stream ids compare as (milliseconds, sequence), not as strings.
local function gt(a, b)
  if not b then return true end
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
