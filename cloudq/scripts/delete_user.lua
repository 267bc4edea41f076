-- delete_user(P, name) -> {status, sid}: 'unknown' | 'deleted' | 'closing' (sid = its live session)
-- `cloudq user del`: the account goes, its tokens are revoked, its place in the queue is left,
-- and a live session is closed (reason `user_deleted`) through the usual close job, which saves
-- the user's data first; the sweep issues that job at once and re-issues it until it is done.
local name = ARGV[2]
local u = k_user(name)
if redis.call('HEXISTS', u, 'hash') == 0 then return {'unknown', ''} end
local out = {'deleted', ''}
local sid = redis.call('HGET', u, 'session') or ''
if sid ~= '' then
  local s = k_session(sid)
  local st = redis.call('HGET', s, 'state')
  if st and st ~= 'closed' then
    local tok = redis.call('HGET', s, 'token')
    if tok and tok ~= '' then redis.call('DEL', k_token(tok)) end
    if (redis.call('HGET', s, 'close_reason') or '') == '' then
      redis.call('HSET', s, 'close_reason', 'user_deleted')
      event('session:' .. sid, st, st, 'user ' .. name .. ' deleted')
    end
    redis.call('ZADD', K_DEADLINES, NOW, 'close|' .. sid)
    out = {'closing', sid}
  end
end
local q = redis.call('HGET', u, 'qtoken')
if q and q ~= '' then redis.call('DEL', k_token(q)) end
redis.call('LREM', K_QUEUE, 0, name)
redis.call('DEL', u, k_user_lock(name), k_user_fails(name), k_queued(name))
-- versions saved until now belong to this account: a new account of the same name starts empty
-- (with a live session, release.lua stamps this after the session's final save)
if out[1] == 'deleted' then redis.call('SET', k_user_deleted(name), string.format('%.3f', NOW)) end
redis.call('SREM', K_USERS, name)
event('user:' .. name, '', 'deleted', out[1])
return out
