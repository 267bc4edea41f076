-- release_streams(P, sid, reason): a closed session's streams, on the server that holds them
-- (its media server, or the control server): run by the close job right after release.lua.
local sid, reason = ARGV[2], ARGV[3]
-- the session's video goes after a while, so a client can still read why it ended; its input
-- has no reader left: emptied now, so a flood's memory returns at once (issue 20), and gone soon
-- with what a client writes until the central server drops its user (within a second; XTRIM,
-- not DEL: a DEL would let it start a new stream without this TTL). A flooding client writes
-- ~1 GB/s meanwhile: its input becomes an empty stream at the largest possible id for a while,
-- so each XADD fails ("exhausted the last possible ID") and stores nothing.
local keep = 60000
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
