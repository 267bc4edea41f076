-- unregister_node(P, id, instance) -> 'ok' | 'busy' | 'not-owner'
-- A clean shutdown of a free node: out of the pool, state offline.
local id, instance = ARGV[2], ARGV[3]
if redis.call('HGET', k_node(id), 'instance') ~= instance then return 'not-owner' end
local sid = redis.call('HGET', k_node(id), 'session') or ''
redis.call('ZREM', K_POOL, id)
redis.call('DEL', k_node_alive(id))
if sid ~= '' then
  -- leave the session to the liveness path so it moves to another node
  redis.call('ZADD', K_DEADLINES, NOW, 'alive|' .. id)
  return 'busy'
end
node_state(id, 'offline', 'shut down')
undeadline('alive', id)
forget_later(id)
return 'ok'
