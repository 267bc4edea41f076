-- Shared prelude, prepended to every script. ARGV[1] is always the key prefix.
-- Times are Redis server time in seconds (float), so hosts with skewed clocks agree.
local P = ARGV[1]
local T = redis.call('TIME')
local NOW = tonumber(T[1]) + tonumber(T[2]) / 1e6

local function setting(name)
  return tonumber(redis.call('HGET', P .. 'settings', name) or '0') or 0
end
local function skey(sid) return P .. 'session:{' .. sid .. '}' end
local function nkey(id) return P .. 'node:' .. id end
local function ukey(u) return P .. 'user:' .. u end

local function event(obj, from, to, reason)
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*',
    't', string.format('%.3f', NOW), 'obj', obj, 'from', from or '', 'to', to, 'reason', reason or '')
end
local function node_state(id, to, reason)
  local from = redis.call('HGET', nkey(id), 'state') or ''
  redis.call('HSET', nkey(id), 'state', to, 'since', string.format('%.3f', NOW))
  event('node:' .. id, from, to, reason)
end
local function session_state(sid, to, reason)
  local from = redis.call('HGET', skey(sid), 'state') or ''
  redis.call('HSET', skey(sid), 'state', to, 'since', string.format('%.3f', NOW))
  event('session:' .. sid, from, to, reason)
end
local function control(id, cmd, sid, gen)
  redis.call('XADD', P .. 'node:' .. id .. ':control', 'MAXLEN', '~', 1000, '*',
    'cmd', cmd, 'sid', sid or '', 'gen', tostring(gen or 0))
end
local function deadline(kind, id, after)
  redis.call('ZADD', P .. 'deadlines', NOW + after, kind .. '|' .. id)
end
local function undeadline(kind, id)
  redis.call('ZREM', P .. 'deadlines', kind .. '|' .. id)
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
local function create_session(user, node, token_hash, acl_hash)
  local sid = 's' .. redis.call('INCR', P .. 'seq')
  local s = skey(sid)
  redis.call('HSET', s, 'user', user, 'node', node, 'gen', 1, 'created', string.format('%.3f', NOW),
    'token', token_hash or '', 'acl', acl_hash or '')
  session_state(sid, 'starting', 'assigned')
  redis.call('SADD', P .. 'sessions', sid)
  redis.call('HSET', ukey(user), 'session', sid, 'last_node', node)
  redis.call('HSET', nkey(node), 'session', sid)
  node_state(node, 'assigned', 'session ' .. sid)
  -- login counts as the first heartbeat and the first activity
  local hb_ttl, idle = setting('heartbeat_ttl'), setting('idle_timeout')
  set_ttl_key(s .. ':hb', '1', hb_ttl)
  set_ttl_key(s .. ':act', '1', idle)
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
  redis.call('HSET', nkey(node), 'session', '')
  node_state(node, 'free', reason)
  if redis.call('HGET', nkey(node), 'drained') ~= '1' then redis.call('ZADD', P .. 'pool', NOW, node) end
end

-- Forget offline node `id` (its hash, control stream, pool and set membership): 'forgotten',
-- or 'alive'/'not-offline' when it must not be forgotten.
local function forget_node(id, reason)
  local k = nkey(id)
  if redis.call('EXISTS', P .. 'node:' .. id .. ':alive') == 1 then return 'alive' end
  local st = redis.call('HGET', k, 'state')
  if st and st ~= 'offline' then return 'not-offline' end
  redis.call('DEL', k, P .. 'node:' .. id .. ':control')
  redis.call('SREM', P .. 'nodes', id)
  redis.call('ZREM', P .. 'pool', id)
  redis.call('ZREM', P .. 'deadlines', 'alive|' .. id, 'forget|' .. id)
  event('node:' .. id, st or '', 'forgotten', reason)
  return 'forgotten'
end
local function forget_later(id)
  local f = setting('node_forget')
  if f > 0 then deadline('forget', id, f) end
end
