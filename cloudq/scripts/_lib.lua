-- Shared prelude, prepended to every script (cloudq/state.py). Before it come the key prefix
-- `P` (always ARGV[1]) and the key helpers generated from cloudq.keys.Keys (`K_POOL`,
-- `k_session(sid)`, ...): scripts name keys only through those helpers.
-- Times are Redis server time in seconds (float), so hosts with skewed clocks agree.
local T = redis.call('TIME')
local NOW = tonumber(T[1]) + tonumber(T[2]) / 1e6

local function setting(name)
  return tonumber(redis.call('HGET', K_SETTINGS, name) or '0') or 0
end

local function event(obj, from, to, reason)
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', 10000, '*',
    't', string.format('%.3f', NOW), 'obj', obj, 'from', from or '', 'to', to, 'reason', reason or '')
end
local function node_state(id, to, reason)
  local from = redis.call('HGET', k_node(id), 'state') or ''
  redis.call('HSET', k_node(id), 'state', to, 'since', string.format('%.3f', NOW))
  event('node:' .. id, from, to, reason)
end
local function session_state(sid, to, reason)
  local from = redis.call('HGET', k_session(sid), 'state') or ''
  redis.call('HSET', k_session(sid), 'state', to, 'since', string.format('%.3f', NOW))
  event('session:' .. sid, from, to, reason)
end
local function control(id, cmd, sid, gen)
  redis.call('XADD', k_node_control(id), 'MAXLEN', '~', 1000, '*',
    'cmd', cmd, 'sid', sid or '', 'gen', tostring(gen or 0))
end
-- A deadline due before the sweeper's next planned pass (``next`` in K_SWEEPER, written by
-- sweep.lua) wakes it: it sleeps until its first deadline, so nothing else would (issue 23).
-- Best effort (redis.pcall: a role user without the channel, nobody subscribed): the sweeper's
-- longest sleep bounds how late such a deadline is then.
local woke = false
local function deadline(kind, id, after)
  local due = NOW + after
  redis.call('ZADD', K_DEADLINES, due, kind .. '|' .. id)
  if not woke and due < (tonumber(redis.call('HGET', K_SWEEPER, 'next') or '') or -1) then
    woke = true
    redis.pcall('PUBLISH', K_WAKE, 'deadline')
  end
end
local function undeadline(kind, id)
  redis.call('ZREM', K_DEADLINES, kind .. '|' .. id)
end
local function pttl_s(key)
  local ms = redis.call('PTTL', key)
  if ms < 0 then return nil end
  return ms / 1000
end
local function set_ttl_key(key, value, seconds)
  if seconds > 0 then
    redis.call('SET', key, value, 'PX', math.max(1, math.floor(seconds * 1000)))
  end
end

-- Give `node` to `user` as a new session; returns sid, gen. `acl_hash`: SHA-256 of the session
-- ACL user's password (kept so the user can be re-created after a Redis restart).
-- The media server of a new session (cloudq/media.py): the published ones in turn by session
-- number, skipping those the central server cannot reach; '' = this server.
local function place_media(n)
  local servers = {}
  for u in string.gmatch(redis.call('HGET', K_SETTINGS, 'media') or '', '%S+') do
    table.insert(servers, u)
  end
  if #servers == 0 then return '' end
  for i = 0, #servers - 1 do
    local u = servers[(n + i) % #servers + 1]
    if redis.call('SISMEMBER', K_MEDIA_DOWN, u) == 0 then return u end
  end
  return servers[n % #servers + 1]
end

local function create_session(user, node, token_hash, acl_hash)
  local n = redis.call('INCR', K_SEQ)
  local sid = 's' .. n
  local s = k_session(sid)
  redis.call('HSET', s, 'user', user, 'node', node, 'gen', 1, 'created', string.format('%.3f', NOW),
    'token', token_hash or '', 'acl', acl_hash or '', 'media', place_media(n))
  session_state(sid, 'starting', 'assigned')
  redis.call('SADD', K_SESSIONS, sid)
  redis.call('HSET', k_user(user), 'session', sid, 'last_node', node)
  redis.call('HSET', k_node(node), 'session', sid)
  node_state(node, 'assigned', 'session ' .. sid)
  -- login counts as the first heartbeat and the first activity
  local hb_ttl, idle = setting('heartbeat_ttl'), setting('idle_timeout')
  set_ttl_key(k_heartbeat(sid), '1', hb_ttl)
  set_ttl_key(k_activity(sid), '1', idle)
  if hb_ttl > 0 then deadline('hb', sid, hb_ttl) end
  if idle > 0 then deadline('act', sid, idle) end
  local max = setting('max_session')
  if max > 0 then
    deadline('max', sid, max)
    local warn = setting('max_warning')
    if warn > 0 and warn < max then deadline('warn', sid, max - warn) end
  end
  deadline('mount', sid, setting('job_lease'))
  return sid, 1
end

-- Free node `node` that was serving `sid`: back to the pool (unless an operator drained it).
local function free_node(node, reason)
  redis.call('HSET', k_node(node), 'session', '')
  node_state(node, 'free', reason)
  if redis.call('HGET', k_node(node), 'drained') ~= '1' then redis.call('ZADD', K_POOL, NOW, node) end
end

-- Forget offline node `id` (its hash, control stream, pool and set membership): 'forgotten',
-- or 'alive'/'not-offline' when it must not be forgotten.
local function forget_node(id, reason)
  local k = k_node(id)
  if redis.call('EXISTS', k_node_alive(id)) == 1 then return 'alive' end
  local st = redis.call('HGET', k, 'state')
  if st and st ~= 'offline' then return 'not-offline' end
  redis.call('DEL', k, k_node_control(id))
  redis.call('SREM', K_NODES, id)
  redis.call('ZREM', K_POOL, id)
  redis.call('ZREM', K_DEADLINES, 'alive|' .. id, 'forget|' .. id)
  event('node:' .. id, st or '', 'forgotten', reason)
  return 'forgotten'
end
local function forget_later(id)
  local f = setting('node_forget')
  if f > 0 then deadline('forget', id, f) end
end

-- A login token: `token:<hash>` holds the user name, for `token_ttl` s (0: for ever).
local function issue_token_for(user, token_hash)
  local k = k_token(token_hash)
  redis.call('SET', k, user)
  local ttl = setting('token_ttl')
  if ttl > 0 then redis.call('PEXPIRE', k, math.floor(ttl * 1000)) end
end

-- Online reconnection into `sid` (live, not closing), `user`'s session in `state`: the old token
-- is revoked and `token_hash` issued, the generation bumped (stale jobs do nothing), the liveness
-- keys and deadlines set again; a session that lost its node takes a free one (or waits, 'moving').
-- Returns the login reply {status, sid, node, gen, position} (login.lua, resume.lua).
local function reconnect_session(user, sid, state, token_hash, acl_hash)
  local s = k_session(sid)
  local old = redis.call('HGET', s, 'token')
  if old and old ~= '' then redis.call('DEL', k_token(old)) end
  redis.call('HSET', s, 'token', token_hash, 'acl', acl_hash)
  local gen = redis.call('HINCRBY', s, 'gen', 1)
  issue_token_for(user, token_hash)
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
