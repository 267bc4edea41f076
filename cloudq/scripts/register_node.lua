-- register_node(P, id, host, app, instance) -> 'ok' | 'alive' (another process holds this id)
local id, host, app, instance = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local alive = k_node_alive(id)
local holder = redis.call('GET', alive)
if holder and holder ~= instance then return 'alive' end
local ttl = setting('node_ttl')
if ttl <= 0 then ttl = 3600 end
redis.call('SET', alive, instance, 'PX', math.floor(ttl * 1000))
local k = k_node(id)
local old = redis.call('HGET', k, 'session') or ''
if old ~= '' then
  -- a restarted node has lost its app: its session moves on as after an offline node
  local s = k_session(old)
  if redis.call('HGET', s, 'state') and redis.call('HGET', s, 'state') ~= 'closed' then
    redis.call('HSET', s, 'move', '1', 'node', '')
    undeadline('mount', old)
    session_state(old, 'disconnected', 'node ' .. id .. ' restarted')
    redis.call('RPUSH', K_MOVES, old)
  end
end
redis.call('HSET', k, 'host', host, 'app', app, 'instance', instance, 'session', '')
redis.call('HINCRBY', k, 'gen', 1)
redis.call('SADD', K_NODES, id)
free_node(id, 'registered')
redis.call('ZADD', K_DEADLINES, NOW + ttl, 'alive|' .. id)
undeadline('forget', id)
return 'ok'
