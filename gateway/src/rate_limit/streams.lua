-- The concurrent streams of one key, shared by every replica: a sorted set of stream
-- ids scored by the end of their lease, in milliseconds of the Redis server's clock.
-- A live stream renews its lease periodically; a stream whose replica died stops
-- renewing and stops counting once its lease ends, so crashed replicas leak nothing
-- for longer than one lease.
--
-- KEYS[1]  the key's set of live streams
-- ARGV[1]  "acquire": add the stream if fewer than ARGV[4] streams are live;
--          "renew": extend the stream's lease (re-adding it if it was lost, e.g. when
--          Redis restarted empty: the stream is still running, so it counts)
-- ARGV[2]  the stream's id
-- ARGV[3]  lease, in milliseconds
-- ARGV[4]  the key's limit ("acquire" only)
-- Returns 1 when the stream holds a slot, 0 when all are taken.
if redis.replicate_commands then
  redis.replicate_commands() -- TIME before a write: replicate effects (Redis < 5)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'acquire' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
-- Every lease ends by now + lease: the set lives no longer than its newest lease.
redis.call('PEXPIRE', KEYS[1], lease)
return 1
