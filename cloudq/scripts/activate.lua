-- activate(P, node, sid, gen) -> 'ok' | 'stale'
-- The node has the user's data mounted and its app running: node and session become active.
local node, sid, gen = ARGV[2], ARGV[3], ARGV[4]
local s = k_session(sid)
if redis.call('HGET', s, 'state') ~= 'starting' or redis.call('HGET', s, 'gen') ~= gen
  or redis.call('HGET', s, 'node') ~= node or redis.call('HGET', k_node(node), 'session') ~= sid
  or (redis.call('HGET', s, 'close_reason') or '') ~= '' then
  return 'stale'
end
undeadline('mount', sid)
if setting('autosave') > 0 then deadline('save', sid, setting('autosave')) end
-- the idle clock did not judge the session while it was starting: it does from now on
-- (at most its clock away: a client can SET its activity key with any TTL, see sweep.lua)
local idle = setting('idle_timeout')
if idle > 0 then deadline('act', sid, math.min(pttl_s(k_activity(sid)) or 0, idle)) end
node_state(node, 'active', 'session ' .. sid .. ' started')
session_state(sid, 'active', 'node ' .. node .. ' ready')
return 'ok'
