-- admin_close(P, sid, reason, who) -> 'ok' | 'gone' | 'closing'
-- An operator closes a live session: it is marked closing (no reconnection into it) and a close
-- deadline is armed now, so the sweeper issues the close job (save, free the node) and re-issues
-- it after each job lease until it is done. The client shows `reason`.
local sid, reason, who = ARGV[2], ARGV[3], ARGV[4]
local s = k_session(sid)
local state = redis.call('HGET', s, 'state')
if not state or state == 'closed' then return 'gone' end
if (redis.call('HGET', s, 'close_reason') or '') ~= '' then return 'closing' end
redis.call('HSET', s, 'close_reason', reason)
redis.call('ZADD', K_DEADLINES, NOW, 'close|' .. sid)
event('session:' .. sid, state, state, 'close requested by ' .. who .. ': ' .. reason)
return 'ok'
