-- release(P, sid, gen) -> node id freed ('' if none)
-- Last step of closing, after the user's data is saved: session closed, node back to the pool.
local sid, gen = ARGV[2], ARGV[3]
local s = k_session(sid)
local st = redis.call('HGET', s, 'state')
if not st or st == 'closed' or redis.call('HGET', s, 'gen') ~= gen then return '' end
local user = redis.call('HGET', s, 'user')
local reason = redis.call('HGET', s, 'close_reason') or ''
session_state(sid, 'closed', reason)
redis.call('HSET', s, 'closed', string.format('%.3f', NOW))
redis.call('SREM', K_SESSIONS, sid)
-- who closed lately, for whoever cleans up after sessions (the central server's ACL users)
redis.call('ZADD', K_CLOSED, NOW, sid)
redis.call('ZREMRANGEBYSCORE', K_CLOSED, '-inf', NOW - 3600)
redis.call('LREM', K_MOVES, 0, sid)
undeadline('close', sid)
if redis.call('HGET', k_user(user), 'session') == sid then redis.call('HDEL', k_user(user), 'session') end
if reason == 'user_deleted' then
  -- saved for the last time: what is stored now belongs to the deleted account
  redis.call('SET', k_user_deleted(user), string.format('%.3f', NOW))
end
redis.call('DEL', k_heartbeat(sid), k_activity(sid))
redis.call('PEXPIRE', s, 3600000)
-- its streams (video, input, ...) are released by release_streams.lua, on the server that holds
-- them (a media server, cloudq/media.py, or this one), by whoever ran this (the close job)
local node = redis.call('HGET', s, 'node') or ''
if node ~= '' and redis.call('HGET', k_node(node), 'session') == sid then
  if redis.call('HGET', k_node(node), 'state') ~= 'offline' then
    free_node(node, 'session ' .. sid .. ' closed')
  else
    redis.call('HSET', k_node(node), 'session', '')
  end
  return node
end
return ''
