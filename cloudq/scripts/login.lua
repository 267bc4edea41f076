-- login(P, user, token_hash, acl_hash) -> {status, sid, node, gen, position}
-- status: 'reconnect' (same session and node, new token), 'assigned' (new session on a free node),
-- 'moving' (session lost its node and got a new one), 'queued' (position in the FIFO).
local user, token_hash, acl_hash = ARGV[2], ARGV[3], ARGV[4] or ''
local token_ttl = setting('token_ttl')
local function issue_token()
  local k = k_token(token_hash)
  redis.call('SET', k, user)
  if token_ttl > 0 then redis.call('PEXPIRE', k, math.floor(token_ttl * 1000)) end
end

local sid = redis.call('HGET', k_user(user), 'session')
if sid and sid ~= '' then
  local s = k_session(sid)
  local state = redis.call('HGET', s, 'state')
  local closing = redis.call('HGET', s, 'close_reason')
  if state and state ~= 'closed' and (not closing or closing == '') then
    -- online reconnection: revoke the old token, bump the generation so stale jobs do nothing
    local old = redis.call('HGET', s, 'token')
    if old and old ~= '' then redis.call('DEL', k_token(old)) end
    redis.call('HSET', s, 'token', token_hash, 'acl', acl_hash)
    local gen = redis.call('HINCRBY', s, 'gen', 1)
    issue_token()
    local hb_ttl = setting('heartbeat_ttl')
    set_ttl_key(k_heartbeat(sid), '1', hb_ttl)
    set_ttl_key(k_activity(sid), '1', setting('idle_timeout'))
    undeadline('grace', sid)
    if hb_ttl > 0 then deadline('hb', sid, hb_ttl) end
    if setting('idle_timeout') > 0 then deadline('act', sid, setting('idle_timeout')) end
    undeadline('idle', sid)
    local node = redis.call('HGET', s, 'node') or ''
    if redis.call('HGET', s, 'move') == '1' then
      local picked = redis.call('ZPOPMIN', K_POOL)
      if #picked == 0 then
        return {'moving', sid, '', gen, 0}
      end
      node = picked[1]
      redis.call('LREM', K_MOVES, 0, sid)
      redis.call('HSET', s, 'node', node, 'move', '0')
      redis.call('HSET', k_node(node), 'session', sid)
      redis.call('HSET', k_user(user), 'last_node', node)
      node_state(node, 'assigned', 'moved session ' .. sid)
      session_state(sid, 'starting', 'moved to node ' .. node)
      deadline('mount', sid, setting('job_lease'))
      return {'assigned', sid, node, gen, 0}
    end
    if state == 'disconnected' then session_state(sid, 'sleeping', 'reconnected') end
    event('session:' .. sid, state, state, 'reconnect (gen ' .. gen .. ')')
    return {'reconnect', sid, node, gen, 0}
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
