-- rejoin_node(P, id, instance, sid) -> session state after rejoining | 'taken' | 'gone' | 'not-owner'
-- A node that was declared offline while it still held session `sid` (it stalled, Redis did not
-- hear from it in time) comes back. If nobody took the session meanwhile (it is waiting in
-- `moves`), the node takes it back with the app's live state: no mount, nothing lost.
local id, instance, sid = ARGV[2], ARGV[3], ARGV[4]
local k = k_node(id)
if redis.call('HGET', k, 'instance') ~= instance then return 'not-owner' end
local s = k_session(sid)
local st = redis.call('HGET', s, 'state')
if not st or st == 'closed' or (redis.call('HGET', s, 'close_reason') or '') ~= '' then return 'gone' end
if redis.call('HGET', s, 'move') ~= '1' or (redis.call('HGET', s, 'node') or '') ~= ''
  or redis.call('HGET', k, 'state') ~= 'offline' then
  return 'taken'
end
local ttl = setting('node_ttl')
if ttl <= 0 then ttl = 3600 end
redis.call('SET', k_node_alive(id), instance, 'PX', math.floor(ttl * 1000))
redis.call('ZADD', K_DEADLINES, NOW + ttl, 'alive|' .. id)
undeadline('forget', id)
redis.call('LREM', K_MOVES, 0, sid)
redis.call('HSET', s, 'node', id, 'move', '0')
redis.call('HSET', k, 'session', sid)
redis.call('HSET', k_user(redis.call('HGET', s, 'user')), 'last_node', id)
node_state(id, 'sleeping', 'rejoined with session ' .. sid)
if redis.call('EXISTS', k_heartbeat(sid)) == 1 then
  -- the client is still there: a sleeping session (its input wakes the node)
  undeadline('grace', sid)
  session_state(sid, 'sleeping', 'node ' .. id .. ' rejoined')
else
  event('session:' .. sid, st, st, 'node ' .. id .. ' rejoined')
end
return redis.call('HGET', s, 'state')
