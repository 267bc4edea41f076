-- logout(P, user, token_hash) -> {sid, gen, node} of the session to close ({'', 0, ''} if none)
-- One step: the token is revoked; if it is the session's token, the session is marked closing
-- with a `close` deadline, so the sweep re-issues the close job until it is done (a crash after
-- this step, or a lost job, cannot leave the node out of the pool); a queued user leaves the queue.
local user, th = ARGV[2], ARGV[3]
redis.call('DEL', k_token(th))
local out = {'', 0, ''}
local sid = redis.call('HGET', k_user(user), 'session') or ''
if sid ~= '' then
  local s = k_session(sid)
  local st = redis.call('HGET', s, 'state')
  if st and st ~= 'closed' and redis.call('HGET', s, 'token') == th then
    if (redis.call('HGET', s, 'close_reason') or '') == '' then
      redis.call('HSET', s, 'close_reason', 'logout')
      event('session:' .. sid, st, st, 'logout')
    end
    local lease = setting('job_lease')
    if lease > 0 then redis.call('ZADD', K_DEADLINES, 'NX', NOW + lease, 'close|' .. sid) end
    out = {sid, tonumber(redis.call('HGET', s, 'gen')), redis.call('HGET', s, 'node') or ''}
  end
end
if redis.call('HGET', k_user(user), 'qtoken') == th then
  redis.call('LREM', K_QUEUE, 0, user)
  redis.call('HDEL', k_user(user), 'qtoken', 'qacl')
end
return out
