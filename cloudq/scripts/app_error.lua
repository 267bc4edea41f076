-- app_error(P, node, sid, detail) -> 'ok' | 'closing' | 'stale'
-- The node's app raised or cannot go on (render, input, load: e.g. its program cannot start): the
-- session closes with reason `app_error: <detail>` through the usual close (the sweep issues the
-- job at once, and re-issues it until done).
local node, sid, detail = ARGV[2], ARGV[3], ARGV[4]
local s = k_session(sid)
local st = redis.call('HGET', s, 'state')
if not st or st == 'closed' or redis.call('HGET', k_node(node), 'session') ~= sid then return 'stale' end
if (redis.call('HGET', s, 'close_reason') or '') ~= '' then return 'closing' end
redis.call('HSET', s, 'close_reason', detail ~= '' and ('app_error: ' .. detail) or 'app_error')
event('session:' .. sid, st, st, 'app_error: ' .. detail)
redis.call('ZADD', K_DEADLINES, NOW, 'close|' .. sid)
return 'ok'
