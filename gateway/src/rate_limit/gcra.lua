-- One per-minute budget (requests or tokens) of one key, shared by every replica: the
-- same GCRA as the in-memory `Budget` in rate_limit.rs, run atomically on the Redis
-- server's clock (TIME), so the replicas' clocks do not matter.
--
-- KEYS[1]  the budget's "full at" instant (GCRA's theoretical arrival time), in
--          microseconds of the server's clock; absent while the budget is full.
-- ARGV[1]  units per minute (at least 1)
-- ARGV[2]  units (at most ARGV[1]: larger charges are refused before asking Redis)
-- ARGV[3]  "take": charge the units when there is room; "refund": give them back
--          (work refused after its charge, or a charge settled lower); "debit": charge
--          them whether or not there is room (a charge settled higher: the key owes
--          them); "peek": charge nothing
-- Returns {taken (1 or 0), remaining whole units, microseconds until full again,
--          microseconds to wait before the units fit (when not taken)}.
if redis.replicate_commands then
  redis.replicate_commands() -- TIME before a write: replicate effects (Redis < 5)
end
local per_minute = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local mode = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- The time one unit takes to come back.
local unit = 60000000 / per_minute
local stored = redis.call('GET', KEYS[1])
local full_at = now
if stored then
  full_at = tonumber(stored) or now
end
local taken = 0
local wait = 0
local write = false
if mode == 'take' then
  local owed = math.max(full_at - now, 0)
  -- Room for n units while no more than (per_minute - n) units' time is owed.
  local allowed = unit * (per_minute - n)
  if owed > allowed then
    wait = owed - allowed
  else
    full_at = math.max(full_at, now) + unit * n
    taken = 1
    write = true
  end
elseif mode == 'refund' then
  full_at = full_at - unit * n
  write = true
elseif mode == 'debit' then
  full_at = math.max(full_at, now) + unit * n
  write = true
end
if write then
  if full_at > now then
    -- Whole microseconds; the key expires once the budget is full again.
    full_at = math.ceil(full_at)
    redis.call('SET', KEYS[1], string.format('%d', full_at),
      'PX', math.ceil((full_at - now) / 1000) + 1000)
  else
    redis.call('DEL', KEYS[1])
  end
end
local owed = math.max(full_at - now, 0)
-- Units still missing, rounded up: a unit is usable only once wholly back.
local missing = math.ceil(owed / unit)
local remaining = math.max(per_minute - missing, 0)
return {taken, remaining, math.ceil(owed), math.ceil(wait)}
