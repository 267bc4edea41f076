-- close_begin(P, sid, gen, reason) -> {'ok'|'gone'|'stale', node}
-- First step of closing: the node stops the app and goes `closing`; the token is revoked so
-- nobody can reconnect into a session whose data is being saved.
local sid, gen, reason = ARGV[2], ARGV[3], ARGV[4]
local s = k_session(sid)
local st = redis.call('HGET', s, 'state')
if not st or st == 'closed' then return {'gone', ''} end
if redis.call('HGET', s, 'gen') ~= gen then
  if (redis.call('HGET', s, 'close_reason') or '') == reason then redis.call('HDEL', s, 'close_reason') end
  undeadline('close', sid)
  return {'stale', ''}
end
redis.call('HSET', s, 'close_reason', reason)
local tok = redis.call('HGET', s, 'token')
if tok and tok ~= '' then redis.call('DEL', k_token(tok)) end
for _, kind in ipairs({'hb', 'act', 'idle', 'grace', 'max', 'warn', 'mount', 'save'}) do undeadline(kind, sid) end
local node = redis.call('HGET', s, 'node') or ''
if node ~= '' and redis.call('HGET', k_node(node), 'session') == sid then
  local ns = redis.call('HGET', k_node(node), 'state')
  if ns ~= 'closing' and ns ~= 'offline' then node_state(node, 'closing', reason) end
  control(node, 'stop', sid, gen)
end
return {'ok', node}
