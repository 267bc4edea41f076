-- login(P, user, token_hash, acl_hash) -> {status, sid, node, gen, position}
-- status: 'reconnect' (same session and node, new token), 'assigned' (new session on a free node),
-- 'moving' (session lost its node and got a new one), 'queued' (position in the FIFO).
local user, token_hash, acl_hash = ARGV[2], ARGV[3], ARGV[4] or ''
local function issue_token() issue_token_for(user, token_hash) end

local sid = redis.call('HGET', k_user(user), 'session')
if sid and sid ~= '' then
  local s = k_session(sid)
  local state = redis.call('HGET', s, 'state')
  local closing = redis.call('HGET', s, 'close_reason')
  if state and state ~= 'closed' and (not closing or closing == '') then
    return reconnect_session(user, sid, state, token_hash, acl_hash)
  end
end

-- already waiting: refresh the ticket, report the position
local pos = redis.call('LPOS', K_QUEUE, user)
if pos then
  issue_token()
  local old = redis.call('HGET', k_user(user), 'qtoken')
  if old and old ~= token_hash then redis.call('DEL', k_token(old)) end
  redis.call('HSET', k_user(user), 'qtoken', token_hash, 'qacl', acl_hash)
  return {'queued', '', '', 0, pos + 1}
end

-- nobody may jump the queue: only take a node when nobody is waiting
local node = nil
if redis.call('LLEN', K_QUEUE) == 0 then
  local last = redis.call('HGET', k_user(user), 'last_node')
  if last and last ~= '' and redis.call('ZSCORE', K_POOL, last) then
    redis.call('ZREM', K_POOL, last)
    node = last
  else
    local picked = redis.call('ZPOPMIN', K_POOL)
    if #picked > 0 then node = picked[1] end
  end
end
issue_token()
if not node then
  redis.call('RPUSH', K_QUEUE, user)
  redis.call('HSET', k_user(user), 'qtoken', token_hash, 'qacl', acl_hash, 'queued_at', string.format('%.3f', NOW))
  event('user:' .. user, '', 'queued', 'no free node')
  return {'queued', '', '', 0, redis.call('LLEN', K_QUEUE)}
end
local new_sid, gen = create_session(user, node, token_hash, acl_hash)
return {'assigned', new_sid, node, gen, 0}
