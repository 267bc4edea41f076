-- forget_node(P, id) -> 'forgotten' | 'alive' | 'not-offline' | 'unknown'
-- `cloudq node forget ID`: an operator removes an offline node's records now.
local id = ARGV[2]
if redis.call('EXISTS', k_node(id)) == 0 and redis.call('SISMEMBER', K_NODES, id) == 0 then return 'unknown' end
return forget_node(id, 'forgotten by an operator')
