-- dispatch(P, limit) -> flat list of {sid, node, gen, user, token_hash}
-- Hands free nodes to sessions that lost their node (moves) first, then to the queue head.
-- A queued user whose client stopped beating its `queued:<user>` key is dropped. The caller pushes
-- each new session's id to `notify:<token_hash>` after creating its Redis user (the central server).
local limit = tonumber(ARGV[2])
local out = {}
local n = 0
while n < limit and redis.call('ZCARD', K_POOL) > 0 do
  local sid = redis.call('LPOP', K_MOVES)
  if sid then
    local s = k_session(sid)
    if redis.call('HGET', s, 'move') == '1' and redis.call('HGET', s, 'state') == 'disconnected' then
      local node = redis.call('ZPOPMIN', K_POOL)[1]
      local gen = redis.call('HINCRBY', s, 'gen', 1)
      redis.call('HSET', s, 'node', node, 'move', '0')
      redis.call('HSET', k_node(node), 'session', sid)
      redis.call('HSET', k_user(redis.call('HGET', s, 'user')), 'last_node', node)
      node_state(node, 'assigned', 'moved session ' .. sid)
      session_state(sid, 'starting', 'moved to node ' .. node)
      deadline('mount', sid, setting('job_lease'))
      table.insert(out, sid); table.insert(out, node); table.insert(out, gen)
      table.insert(out, redis.call('HGET', s, 'user')); table.insert(out, '')
      n = n + 1
    end
  else
    local user = redis.call('LPOP', K_QUEUE)
    if not user then break end
    local th = redis.call('HGET', k_user(user), 'qtoken') or ''
    local acl = redis.call('HGET', k_user(user), 'qacl') or ''
    redis.call('HDEL', k_user(user), 'qtoken', 'qacl')
    if redis.call('EXISTS', k_queued(user)) == 1 and redis.call('EXISTS', k_token(th)) == 1 then
      local node = nil
      local last = redis.call('HGET', k_user(user), 'last_node')
      if last and last ~= '' and redis.call('ZSCORE', K_POOL, last) then
        redis.call('ZREM', K_POOL, last)
        node = last
      else
        node = redis.call('ZPOPMIN', K_POOL)[1]
      end
      local sid2, gen = create_session(user, node, th, acl)
      -- the caller notifies the client (notify:<token hash>), once the session's Redis user exists
      table.insert(out, sid2); table.insert(out, node); table.insert(out, gen)
      table.insert(out, user); table.insert(out, th)
      n = n + 1
      -- how long the user waited, for the central server's queue-wait histogram (bounded)
      local since = tonumber(redis.call('HGET', k_user(user), 'queued_at') or '')
      if since then
        redis.call('LPUSH', K_QUEUE_WAITS, string.format('%.3f', NOW - since))
        redis.call('LTRIM', K_QUEUE_WAITS, 0, 999)
      end
    else
      event('user:' .. user, 'queued', 'left', 'client stopped waiting')
    end
  end
end
return out
