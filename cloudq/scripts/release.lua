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
-- the session's video goes after a while, so a client can still read why it ended; its input
-- has no reader left: emptied now, so a flood's memory returns at once (issue 20), and gone soon
-- with what a client writes until the central server drops its user (within a second; XTRIM,
-- not DEL: a DEL would let it start a new stream without this TTL). A flooding client writes
-- ~1 GB/s meanwhile: its input becomes an empty stream at the largest possible id for a while,
-- so each XADD fails ("exhausted the last possible ID") and stores nothing.
local keep = 60000
redis.call('PEXPIRE', s, 3600000)
redis.call('PEXPIRE', k_video(sid), keep)
redis.call('PEXPIRE', k_audio(sid), keep)
redis.call('PEXPIRE', k_clip(sid), keep)
redis.call('DEL', k_files(sid), k_fileout(sid))  -- transfers end with the session
if reason == 'input_flood' then
  redis.call('DEL', k_input(sid))
  redis.call('XADD', k_input(sid), 'MAXLEN', 0, '18446744073709551615-18446744073709551615', 'closed', reason)
  redis.call('PEXPIRE', k_input(sid), keep)
else
  redis.call('XTRIM', k_input(sid), 'MAXLEN', 0)
  redis.call('PEXPIRE', k_input(sid), 2000)
end
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
