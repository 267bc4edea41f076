-- wake(P, node, sid) -> 'ok' | 'stale'
-- Input reached a sleeping node: it woke itself; record it and restart the idle clock.
local node, sid = ARGV[2], ARGV[3]
local s = k_session(sid)
local st = redis.call('HGET', s, 'state')
if redis.call('HGET', k_node(node), 'session') ~= sid or not st or st == 'closed'
  or (redis.call('HGET', s, 'close_reason') or '') ~= '' then
  return 'stale'
end
if redis.call('HGET', k_node(node), 'state') == 'sleeping' then node_state(node, 'active', 'input') end
if st == 'sleeping' or st == 'disconnected' then session_state(sid, 'active', 'input') end
undeadline('idle', sid)
local idle = setting('idle_timeout')
if idle > 0 then
  local left = pttl_s(k_activity(sid))
  deadline('act', sid, math.min(left or idle, idle))  -- a client's TTL may be longer: see sweep.lua
  if not left then set_ttl_key(k_activity(sid), '1', idle) end
end
return 'ok'
