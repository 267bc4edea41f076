-- app_exit(P, node, sid, gen, reason) -> 'ok'|'gone'|'stale'|'closing'
-- The node's app ended on its own (the program exited or crashed, or could not start): close the
-- session with `reason`, data saved. A close deadline due now makes the sweeper enqueue the close
-- job (which saves and frees the node) on its next pass, exactly as for any other close reason.
local node, sid, gen, reason = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local s = k_session(sid)
local st = redis.call('HGET', s, 'state')
if not st or st == 'closed' then return 'gone' end
if redis.call('HGET', s, 'gen') ~= gen or redis.call('HGET', s, 'node') ~= node then return 'stale' end
if (redis.call('HGET', s, 'close_reason') or '') ~= '' then return 'closing' end
redis.call('HSET', s, 'close_reason', reason)
event('session:' .. sid, st, st, reason)
deadline('close', sid, 0)
return 'ok'
