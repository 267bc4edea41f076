-- lost_session(P, sid, user, node) -> 'closed' | 'exists'
-- The server restarted without the session's keys (no persistence): the node that still runs
-- it records it as closed with a reason, so its client can say why (the node saved its work).
local sid, user, node = ARGV[2], ARGV[3], ARGV[4]
local s = k_session(sid)
if redis.call('EXISTS', s) == 1 then return 'exists' end
redis.call('HSET', s, 'user', user, 'node', node, 'gen', 0, 'close_reason', 'server_restarted',
  'closed', string.format('%.3f', NOW))
session_state(sid, 'closed', 'server_restarted')
redis.call('PEXPIRE', s, 3600000)
return 'closed'
