-- resume(P, sid, old_token_hash, token_hash, acl_hash) -> {status, sid, node, gen, reason}
-- A client that held session `sid` with the token hashed `old_token_hash` comes back after an
-- outage. It goes back into that session or learns why it cannot; it never starts another
-- session nor joins the queue (that is login.lua's, and needs the password):
-- 'reconnect' | 'assigned' | 'moving' as login.lua (a new token `token_hash` replaces the old);
-- 'closed' with the reason: the session is closed or closing ('taken_over' when another login
-- holds it now); 'expired': the session lives but the old token lapsed (token_ttl): log in again.
local sid, old, token_hash, acl_hash = ARGV[2], ARGV[3], ARGV[4], ARGV[5] or ''
local s = k_session(sid)
local user = redis.call('HGET', s, 'user')
if not user then return {'closed', sid, '', 0, 'closed'} end
if (redis.call('HGET', s, 'token') or '') ~= old then return {'closed', sid, '', 0, 'taken_over'} end
local state = redis.call('HGET', s, 'state') or ''
local reason = redis.call('HGET', s, 'close_reason') or ''
if state == 'closed' or state == '' or reason ~= '' then
  if reason == '' then reason = 'closed' end
  return {'closed', sid, '', 0, reason}
end
if redis.call('GET', k_token(old)) ~= user then return {'expired', sid, '', 0, ''} end
return reconnect_session(user, sid, state, token_hash, acl_hash)
