-- unregister_node(P, id, instance) -> 'ok' | 'busy' | 'not-owner'
-- A clean shutdown of a free node: out of the pool, state offline.
local id, instance = ARGV[2], ARGV[3]
if redis.call('HGET', nkey(id), 'instance') ~= instance then return 'not-owner' end
local sid = redis.call('HGET', nkey(id), 'session') or ''
redis.call('ZREM', P .. 'pool', id)
redis.call('DEL', P .. 'node:' .. id .. ':alive')
if sid ~= '' then
  -- leave the session to the liveness path so it moves to another node
  redis.call('ZADD', P .. 'deadlines', NOW, 'alive|' .. id)
  return 'busy'
end
node_state(id, 'offline', 'shut down')
undeadline('alive', id)
forget_later(id)
return 'ok'
