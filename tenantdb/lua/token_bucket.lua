-- Token bucket as GCRA (generic cell rate algorithm), decided in one round trip.
--
-- Time is counted in ticks of 1/ARGV[1] microsecond, a unit the caller picks so that one
-- token's refill time is a whole number of ticks: refill is exact at any rate, with no
-- rounded interval. The key holds "<Redis time, us> <debt, ticks>": how far the bucket's
-- theoretical arrival time was ahead of that time, i.e. the tokens owed, in ticks.
--
-- KEYS[1]  the bucket key.
-- ARGV[1]  ticks per microsecond.
-- ARGV[2]  ticks per token: the refill time of one token.
-- ARGV[3]  capacity: tokens in a full bucket (the burst).
-- ARGV[4]  cost: tokens to take (0 only looks).
-- ARGV[5]  "1" to take them if allowed, "0" to only test.
--
-- Returns one status line: "<remaining> <us until full>" when allowed, and
-- "<remaining> <us until full> <retry after us, -1 = never>" when not. The caller keeps capacity * ticks per token below 2^52, so every
-- number here is an integer a Lua double holds exactly, and "%d" (a C long, 64 bits on
-- the platforms Redis ships for) prints it whole; "%.0f" would go through the C library's
-- slow floating-point printing. Needs Redis >= 5, where scripts replicate their effects,
-- so TIME before a write is allowed.

local per_us = tonumber(ARGV[1])
local per_token = tonumber(ARGV[2])
local burst = per_token * tonumber(ARGV[3])
local need = per_token * tonumber(ARGV[4])

-- The server's clock, never the caller's: every client sees one timeline.
local clock = redis.call("TIME")
local now = clock[1] * 1000000 + clock[2]

local debt = 0
local saved = redis.call("GET", KEYS[1])
if saved then
    -- A plain find and two subs cost less than a pattern with captures.
    local space = string.find(saved, " ", 1, true)
    if space then
        local at = tonumber(string.sub(saved, 1, space - 1))
        local owed = tonumber(string.sub(saved, space + 1))
        -- max(): a clock that went back (a failover) refills nothing rather than adds debt.
        debt = math.max(owed - math.max(now - at, 0) * per_us, 0)
    end
end

local after = debt + need
local wait = 0
if after > burst then
    -- Denied: nothing is written, so a refused call costs the caller nothing.
    wait = need > burst and -1 or math.ceil((after - burst) / per_us)
elseif need > 0 and ARGV[5] == "1" then
    -- The key lives until the bucket is full again, never longer.
    redis.call("SET", KEYS[1], string.format("%d %d", now, after),
               "PX", math.ceil(after / per_us / 1000))
    debt = after
end

-- One status line rather than an array: redis-py parses it in a single read. Only a
-- refusal has a wait, so an allowed call's line carries two numbers, not four.
local remaining = math.floor((burst - debt) / per_token)
local full = math.ceil(debt / per_us)
if wait == 0 then
    return redis.status_reply(string.format("%d %d", remaining, full))
end
return redis.status_reply(string.format("%d %d %d", remaining, full, wait))
