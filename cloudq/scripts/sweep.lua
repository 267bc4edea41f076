-- sweep(P, limit, run_id, longest, least, closed_after) -> {when, actions}: `actions` a flat list
-- of {action, sid, gen, reason, node, host, issue} for the caller to enqueue; `when` what the
-- sweeper needs to plan its next pass without another round trip: {now, the planned wait, free
-- nodes, queued users, moved sessions, first ACL expiry, first close from `closed_after` on}
-- ('' where none; the ACL ones only when `closed_after` is given). The pass also records when
-- the sweeper means to look next (`next` in K_SWEEPER: the first deadline, at most `longest` s
-- and at least `least` s from now): a script adding an earlier deadline wakes it (_lib.lua).
-- Claims due deadlines atomically (two central replicas never both act on one entry) and
-- checks each against the key it stands for: a refreshed key only moves the deadline.
--
-- Blind periods: liveness is judged only over time in which someone could see Redis. When no
-- sweep ran for longer than a beat (Redis paused or unreachable, every central replica down) or
-- the server restarted (`run_id` changed), nobody could refresh a TTL key meanwhile. Deadlines
-- that fell inside that period are moved past it: a TTL key's (node liveness, heartbeat,
-- activity) to a full TTL from now, so its owner gets a fair chance to refresh it first; the
-- other clocks (grace, idle, autosave, leases, max) by the length of the blind period, as if
-- their clock had stopped.
local limit = tonumber(ARGV[2])
local run_id = ARGV[3] or ''
local longest, least = tonumber(ARGV[4] or '') or 1.0, tonumber(ARGV[5] or '') or 0
local closed_after = ARGV[6] or ''  -- the closes' lower bound (ZRANGEBYSCORE syntax), '' = no ACLs
local D = K_DEADLINES
local W = K_SWEEPER
do
  local last = tonumber(redis.call('HGET', W, 'last') or '')
  local known = redis.call('HGET', W, 'run_id') or ''
  local restarted = run_id ~= '' and known ~= '' and known ~= run_id
  local blind_after = math.max(1.0, setting('heartbeat_interval'))
  if last and last < NOW and (NOW - last > blind_after or restarted) then
    local blind = NOW - last
    local ttl = {alive = setting('node_ttl'), hb = setting('heartbeat_ttl'), act = setting('idle_timeout')}
    local inside = redis.call('ZRANGEBYSCORE', D, last, NOW, 'WITHSCORES')
    for i = 1, #inside, 2 do
      local member, score = inside[i], tonumber(inside[i + 1])
      local kind = string.sub(member, 1, string.find(member, '|', 1, true) - 1)
      local full = ttl[kind]
      local due
      if full then
        due = NOW + math.max(full, 0.05)
      else
        due = score + blind
        if kind == 'grace' or kind == 'idle' then due = math.max(due, NOW + setting('heartbeat_ttl')) end
      end
      redis.call('ZADD', D, due, member)
    end
    local why = 'no sweep'
    if restarted then why = 'server restarted' end
    event('central', '', 'blind', string.format('blind period of %.1f s (%s): %d deadlines moved past it',
      blind, why, #inside / 2))
  end
  -- `next` = now while this pass runs: the deadlines it sets itself wake nobody
  local now = string.format('%.6f', NOW)
  if run_id ~= '' then
    redis.call('HSET', W, 'last', now, 'next', now, 'run_id', run_id)
  else
    redis.call('HSET', W, 'last', now, 'next', now)
  end
end
local due = redis.call('ZRANGEBYSCORE', D, '-inf', NOW, 'WITHSCORES', 'LIMIT', 0, limit)
local out = {}
local lease = setting('job_lease')
local hb_interval = setting('heartbeat_interval')
local hb_ttl, idle_timeout = setting('heartbeat_ttl'), setting('idle_timeout')

-- The heartbeat and activity keys are the client's to SET, with any PX: a TTL longer than the
-- key's clock (plus a second of slack) is liveness the client made up (issue 20). It counts as
-- lapsed and the key goes, so the session is disconnected or idle on the normal schedule.
local function live_left(key, clock)
  local left = pttl_s(key)
  if left and clock > 0 and left > clock + 1.0 then
    redis.call('DEL', key)
    return nil
  end
  return left
end

-- `issue` numbers re-issues of a job (a close or mount whose lease ran out): each gets its own
-- job id, so RQ does not refuse it while the previous run's finished or failed job still exists
local function act(action, sid, gen, reason, node, issue)
  local host = ''
  if node and node ~= '' then host = redis.call('HGET', k_node(node), 'host') or '' end
  for _, v in ipairs({action, sid, tostring(gen), reason, node or '', host, tostring(issue or 0)}) do
    table.insert(out, v)
  end
end
local function reissue(sid, action)
  return redis.call('HINCRBY', k_session(sid), 'issued_' .. action, 1)
end

local function close_later(sid, reason)
  -- the close job removes this entry when done; until then it is re-issued after each lease
  local s = k_session(sid)
  if (redis.call('HGET', s, 'close_reason') or '') == '' then redis.call('HSET', s, 'close_reason', reason) end
  deadline('close', sid, lease)
  act('close', sid, redis.call('HGET', s, 'gen'), redis.call('HGET', s, 'close_reason'), redis.call('HGET', s, 'node'),
    reissue(sid, 'close'))
end

local function save_later(sid, why)
  local n = redis.call('HINCRBY', k_session(sid), 'saves', 1)
  act('save', sid, redis.call('HGET', k_session(sid), 'gen'), why .. '#' .. n, redis.call('HGET', k_session(sid), 'node'))
end

local function to_sleep(sid, node, reason)
  if node ~= '' and redis.call('HGET', k_node(node), 'session') == sid then
    if redis.call('HGET', k_node(node), 'state') == 'active' then node_state(node, 'sleeping', reason) end
    control(node, 'sleep', sid, redis.call('HGET', k_session(sid), 'gen'))
  end
end

for i = 1, #due, 2 do
  local member, score = due[i], tonumber(due[i + 1])
  local sep = string.find(member, '|', 1, true)
  local kind, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  redis.call('ZREM', D, member)
  if kind == 'forget' then
    forget_node(id, 'offline for longer than node_forget')
  elseif kind == 'alive' then
    local left = pttl_s(k_node_alive(id))
    if left then
      redis.call('ZADD', D, NOW + left, member)
    elseif redis.call('EXISTS', k_node(id)) == 1 and redis.call('HGET', k_node(id), 'state') ~= 'offline' then
      node_state(id, 'offline', 'liveness lapsed')
      forget_later(id)
      redis.call('ZREM', K_POOL, id)
      local sid = redis.call('HGET', k_node(id), 'session') or ''
      redis.call('HSET', k_node(id), 'session', '')
      if sid ~= '' then
        local st = redis.call('HGET', k_session(sid), 'state')
        if st and st ~= 'closed' then
          if (redis.call('HGET', k_session(sid), 'close_reason') or '') ~= '' then
            -- it was closing: nothing left to save on a dead node; the close job finishes it
            act('close', sid, redis.call('HGET', k_session(sid), 'gen'), redis.call('HGET', k_session(sid), 'close_reason'), '',
              reissue(sid, 'close'))
          else
            redis.call('HSET', k_session(sid), 'move', '1', 'node', '')
            undeadline('mount', sid)
            if st ~= 'disconnected' then session_state(sid, 'disconnected', 'node ' .. id .. ' offline') end
            redis.call('RPUSH', K_MOVES, sid)
            local grace = setting('grace')
            if grace > 0 and not redis.call('ZSCORE', D, 'grace|' .. sid) then deadline('grace', sid, grace) end
          end
        end
      end
    end
  else
    local s = k_session(id)
    local state = redis.call('HGET', s, 'state')
    if state and state ~= 'closed' then
      local node = redis.call('HGET', s, 'node') or ''
      local gen = redis.call('HGET', s, 'gen')
      local closing = (redis.call('HGET', s, 'close_reason') or '') ~= ''
      if kind == 'close' then
        close_later(id, redis.call('HGET', s, 'close_reason'))
      elseif closing then
        -- a close is under way: other clocks no longer matter
      elseif kind == 'hb' then
        local left = live_left(k_heartbeat(id), hb_ttl)
        if left then
          if state == 'disconnected' and redis.call('HGET', s, 'move') ~= '1' then
            session_state(id, 'sleeping', 'heartbeat back')
            undeadline('grace', id)
            local idle = setting('idle_timeout')
            if idle > 0 then deadline('act', id, live_left(k_activity(id), idle) or 0) end
          end
          redis.call('ZADD', D, NOW + left, member)
        elseif state == 'starting' then
          -- the mount is still running: the session goes on (or is found gone) once it is active
          deadline('hb', id, math.max(hb_interval, 0.05))
        else
          if state ~= 'disconnected' then
            to_sleep(id, node, 'client heartbeat lapsed')
            -- work done up to now is saved at once, not only when the session closes
            if node ~= '' and state ~= 'starting' then save_later(id, 'disconnect') end
            session_state(id, 'disconnected', 'heartbeat lapsed')
            undeadline('act', id)
            local grace = setting('grace')
            if grace > 0 then deadline('grace', id, grace) end
            -- a session nobody uses is idle too, whether or not the grace clock is on
            local idle_close = setting('idle_close')
            if idle_close > 0 then redis.call('ZADD', D, 'NX', NOW + idle_close, 'idle|' .. id) end
          end
          -- keep looking for the client's return
          deadline('hb', id, math.max(hb_interval, 0.05))
        end
      elseif kind == 'act' then
        local left = live_left(k_activity(id), idle_timeout)
        if left then
          redis.call('ZADD', D, NOW + left, member)
        elseif state == 'sleeping' or state == 'disconnected' then
          -- e.g. a reconnect into a sleeping session that gave no input since: close it when idle
          local idle_close = setting('idle_close')
          if idle_close > 0 then
            redis.call('ZADD', D, 'NX', score - setting('idle_timeout') + idle_close, 'idle|' .. id)
          end
        elseif state == 'active' then
          -- (a `starting` session's idle clock is re-armed by activate.lua once it runs)
          to_sleep(id, node, 'user idle')
          session_state(id, 'sleeping', 'activity lapsed')
          if node ~= '' then save_later(id, 'sleep') end  -- a sleeping session's data is saved
          local idle_close = setting('idle_close')
          if idle_close > 0 then
            -- measured from the last activity, which ended idle_timeout before the key lapsed
            redis.call('ZADD', D, score - setting('idle_timeout') + idle_close, 'idle|' .. id)
          end
        end
      elseif kind == 'idle' then
        if not live_left(k_activity(id), idle_timeout) and state ~= 'active' then
          close_later(id, 'idle')
        end
      elseif kind == 'grace' then
        if state == 'disconnected' and not live_left(k_heartbeat(id), hb_ttl) then
          close_later(id, 'grace')
        end
      elseif kind == 'max' then
        close_later(id, 'max_session')
      elseif kind == 'warn' then
        redis.call('HSET', s, 'warning', 'max_session')
        event('session:' .. id, state, state, 'warning: max session length soon')
      elseif kind == 'save' then
        local every = setting('autosave')
        if every > 0 then
          if state == 'active' and node ~= '' then save_later(id, 'autosave') end
          -- always re-armed: a session that sleeps or is disconnected autosaves again once active
          deadline('save', id, every)
        end
      elseif kind == 'mount' then
        if state == 'starting' and node ~= '' then
          deadline('mount', id, lease)
          act('mount', id, gen, 'mount', node, reissue(id, 'mount'))
        end
      end
    end
  end
end

-- the next pass: at the first deadline, at most `longest` and at least `least` s from now
local next_due = redis.call('ZRANGE', D, 0, 0, 'WITHSCORES')
local wait = longest
if next_due[2] then wait = math.min(wait, tonumber(next_due[2]) - NOW) end
wait = math.max(least, wait)
redis.call('HSET', W, 'next', string.format('%.6f', NOW + wait))
local when = {string.format('%.6f', NOW), string.format('%.6f', wait), redis.call('ZCARD', K_POOL),
  redis.call('LLEN', K_QUEUE), redis.call('LLEN', K_MOVES), '', ''}
if closed_after ~= '' then
  when[6] = redis.call('ZRANGE', K_ACL_EXPIRY, 0, 0, 'WITHSCORES')[2] or ''
  when[7] = redis.call('ZRANGEBYSCORE', K_CLOSED, closed_after, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)[2] or ''
end
return {when, out}
