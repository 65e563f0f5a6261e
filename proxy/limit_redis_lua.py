"""The Lua scripts of the Redis permit store (limit_redis.py): each change to a limiter's
`:held` and `:queue` sorted sets runs as one script, so it is atomic across replicas, and
reads Redis's clock (`TIME`), so the replicas' clocks do not matter."""

from __future__ import annotations

from typing import Final

# Shared by the scripts: drop expired leases and tickets, then hand free permits to the
# head of the queue, telling each new holder on its channel.
GRANT: Final = """
local held, queue = KEYS[1], KEYS[2]
local limit, lease_ms, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
redis.call('ZREMRANGEBYSCORE', queue, '-inf', now)
local free = limit - redis.call('ZCARD', held)
while free > 0 do
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if not head then break end
  redis.call('ZREM', queue, head)
  redis.call('ZADD', held, now + lease_ms, head)
  redis.call('PUBLISH', prefix .. 'grant:' .. string.match(head, '^[^/]+'), head)
  free = free - 1
end
"""

# KEYS: held, queue, epoch. ARGV: limit, lease_ms, prefix, id, mode ('new' | 'check'),
# queue_max, max_wait_ms, the epoch the caller knows. Returns {1}: granted; {0, queued}:
# waiting; {-1, queued}: queue full; {-2, 0}: ticket gone; {-3, 0}: another epoch (Redis
# lost its data since the caller's last renewal: what is left of `held` is not the truth).
TAKE: Final = (
    """
if redis.call('GET', KEYS[3]) ~= ARGV[8] then return {-3, 0} end
"""
    + GRANT
    + """
local id, mode = ARGV[4], ARGV[5]
if redis.call('ZSCORE', held, id) then return {1, 0} end
local waiting = redis.call('ZCARD', queue)
if mode == 'check' then
  if not redis.call('ZSCORE', queue, id) then return {-2, 0} end
  -- every waiter reminds the processes that keep permits that somebody waits (not only
  -- the head: a dead process's ticket can stay at the head until its deadline)
  redis.call('PUBLISH', prefix .. 'want', held)
  return {0, waiting}
end
if free > 0 then
  redis.call('ZADD', held, now + lease_ms, id)
  return {1, 0}
end
if waiting >= tonumber(ARGV[6]) then return {-1, waiting} end
redis.call('ZADD', queue, now + tonumber(ARGV[7]), id)
if waiting == 0 then redis.call('PUBLISH', prefix .. 'want', held) end
return {0, waiting + 1}
"""
)

# ARGV: limit, lease_ms, prefix, id. Gives the permit (or the queue place) back.
GIVE: Final = (
    """
redis.call('ZREM', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[4])
"""
    + GRANT
)

# KEYS: procs, epoch, then held and queue of each limiter. ARGV: lease_ms, process id,
# process ttl_ms, a new epoch (set if there is none: Redis lost its data, or never had
# any), then two space-separated id lists per limiter: its leases in use, and the ids to
# remove (leases and tickets this process could not give back). Renews the leases and this
# process's heartbeat; returns the epoch, the number of live processes, then each
# limiter's count of leases.
RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
redis.call('SET', KEYS[2], ARGV[4], 'NX')
local n = (#KEYS - 2) / 2
for i = 1, n do
  local held, queue = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  for id in string.gmatch(ARGV[4 + 2 * i], '%S+') do
    redis.call('ZREM', held, id)
    redis.call('ZREM', queue, id)
  end
  redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
  for id in string.gmatch(ARGV[3 + 2 * i], '%S+') do
    redis.call('ZADD', held, now + lease_ms, id)
  end
end
local procs = KEYS[1]
redis.call('ZADD', procs, now + tonumber(ARGV[3]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', procs, '-inf', now)
local out = {redis.call('GET', KEYS[2]), redis.call('ZCARD', procs)}
for i = 1, n do out[i + 2] = redis.call('ZCARD', KEYS[1 + 2 * i]) end
return out
"""
