-- drain(P, id, on, who, why) -> 'ok' | 'unknown'
-- An operator takes a node out of rotation (on = '1') or puts it back ('0'). A drained node keeps
-- its current session; it leaves the pool now if free, or when that session ends (free_node).
local id, on, who, why = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local k = k_node(id)
if redis.call('SISMEMBER', K_NODES, id) == 0 then return 'unknown' end
local state = redis.call('HGET', k, 'state') or ''
if on == '1' then
  redis.call('HSET', k, 'drained', '1')
  redis.call('ZREM', K_POOL, id)
  event('node:' .. id, state, state, 'drained by ' .. who .. (why ~= '' and (': ' .. why) or ''))
else
  redis.call('HDEL', k, 'drained')
  if state == 'free' and redis.call('EXISTS', k_node_alive(id)) == 1 then
    redis.call('ZADD', K_POOL, NOW, id)
  end
  event('node:' .. id, state, state, 'undrained by ' .. who .. (why ~= '' and (': ' .. why) or ''))
end
return 'ok'
