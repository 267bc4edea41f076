-- request_close(P, sid, gen, reason) -> 'ok' | 'gone' | 'stale' | 'closing'
-- A node asks for its session to be closed (e.g. the client flooded its input stream): the
-- reason is recorded and the close deadline is due now, so the sweeper enqueues the close job
-- (which saves the user's data as on any other close).
local sid, gen, reason = ARGV[2], ARGV[3], ARGV[4]
local s = k_session(sid)
local st = redis.call('HGET', s, 'state')
if not st or st == 'closed' then return 'gone' end
if redis.call('HGET', s, 'gen') ~= gen then return 'stale' end
if (redis.call('HGET', s, 'close_reason') or '') ~= '' then return 'closing' end
redis.call('HSET', s, 'close_reason', reason)
deadline('close', sid, 0)
event('session:' .. sid, st, st, 'close requested: ' .. reason)
return 'ok'
