-- user_disable(P, user, on, who, why) -> live session id being closed ('' if none) | 'unknown'
-- Disabling refuses the user's logins, revokes the live session's token, drops them from the
-- queue and closes the live session (reason `disabled`, data saved); enabling only clears the flag.
local user, on, who, why = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local u = k_user(user)
if redis.call('EXISTS', u) == 0 then return 'unknown' end
local note = (why ~= '' and (': ' .. why) or '')
if on ~= '1' then
  redis.call('HSET', u, 'disabled', '0')
  event('user:' .. user, 'disabled', 'enabled', 'enabled by ' .. who .. note)
  return ''
end
redis.call('HSET', u, 'disabled', '1')
redis.call('LREM', K_QUEUE, 0, user)
event('user:' .. user, 'enabled', 'disabled', 'disabled by ' .. who .. note)
local sid = redis.call('HGET', u, 'session') or ''
if sid == '' then return '' end
local s = k_session(sid)
local state = redis.call('HGET', s, 'state')
if not state or state == 'closed' then return '' end
local th = redis.call('HGET', s, 'token') or ''
if th ~= '' then redis.call('DEL', k_token(th)) end
if (redis.call('HGET', s, 'close_reason') or '') == '' then
  redis.call('HSET', s, 'close_reason', 'disabled')
  redis.call('ZADD', K_DEADLINES, NOW, 'close|' .. sid)
  event('session:' .. sid, state, state, 'close requested by ' .. who .. ': account disabled')
end
return sid
