-- Token bucket as GCRA (generic cell rate algorithm), decided in one round trip.
--
-- KEYS[1]  the bucket key; it holds the theoretical arrival time (TAT) in microseconds.
-- ARGV[1]  capacity: tokens in a full bucket (the burst), a positive integer.
-- ARGV[2]  period in microseconds: a full bucket refills in this time.
-- ARGV[3]  cost: tokens to take (0 only peeks).
-- ARGV[4]  "1" to consume on success, "0" to only test.
--
-- Returns one status line "<allowed 0/1> <remaining> <retry after us, -1 = never> <TAT us>".
-- All arithmetic stays on integers below 2^53, so Lua's doubles keep it exact.

-- Redis < 5 replicates scripts verbatim; TIME would then differ on replicas.
if redis.replicate_commands then
    redis.replicate_commands()
end

-- One status line rather than an array: redis-py parses it in a single read where an
-- array costs a read per element, a measurable share of a round trip on a local socket.
local function reply(allowed, remaining, wait, tat)
    return redis.status_reply(string.format("%d %d %.0f %.0f", allowed, remaining, wait, tat))
end

local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local consume = ARGV[4] == "1"

-- The server's clock, never the caller's: every client sees one timeline.
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- Rounding the interval up keeps it an integer; the bucket then refills at most
-- `capacity` microseconds slower per period than asked, never faster.
local interval = math.ceil(period / capacity)
local tolerance = interval * capacity

local tat = tonumber(redis.call("GET", KEYS[1])) or now
if tat < now then
    tat = now
end

if cost > capacity then
    return reply(0, math.floor((tolerance - (tat - now)) / interval), -1, tat)
end

local new_tat = tat + cost * interval
local wait = new_tat - tolerance - now
if wait > 0 then
    -- Denied: nothing is written, so a rejected call costs the caller nothing.
    return reply(0, math.floor((tolerance - (tat - now)) / interval), wait, tat)
end

if consume and cost > 0 then
    -- The key lives exactly until the bucket is full again: no longer than one refill.
    local ttl_ms = math.ceil((new_tat - now) / 1000)
    redis.call("SET", KEYS[1], string.format("%.0f", new_tat), "PX", ttl_ms)
    tat = new_tat
end
return reply(1, math.floor((tolerance - (tat - now)) / interval), 0, tat)
