//! The job store's operations as Lua scripts, each atomic in Redis: a job
//! and its queue entries change together or not at all, so a crash of the
//! gateway (or of Redis, with AOF `appendfsync always`) between two writes
//! cannot leave a job without its queue token, or a completed job without
//! its webhook.
//!
//! Keys (prefix `P`, `sd` by default):
//! - `P:jobs` — the Redis Stream of *tokens*, one per queued job, read by
//!   the consumer group `gateways`. A token is a claim on "one job's worth
//!   of work", not on a job: the job is chosen when a gateway takes the
//!   token (round-robin across owners), and bound to it in `P:claims`
//!   (token → job) until it is finished. A gateway that dies leaves its
//!   token pending; another claims it after the lease (`XAUTOCLAIM`) and
//!   runs the bound job again. KEDA scales gateways on this stream.
//! - `P:job:{id}` — the job (a hash); expires `ttl` after it finishes.
//! - `P:q:{owner}` — an owner's queued job ids, oldest first; `P:ring` the
//!   owners with queued jobs, taken in turn (`P:ringset` the same, as a
//!   set); `P:queued` every queued id scored by its creation time (the
//!   bound on all queued jobs, the oldest's age).
//! - `P:owner:{owner}` — an owner's jobs by creation time (listing).
//! - `P:idem:{owner}:{key}` — an idempotency key's job, for a day.
//! - `P:ev:{id}` — a running job's events (progress, previews), capped.
//! - `P:hooks` — webhooks to deliver (a stream, group `gateways`).
//! - `P:ck:{id}` — a running job's checkpoint: the denoiser's predictions
//!   so far (f32 little-endian each), replayed by the gateway that takes
//!   the job over; dropped when the job finishes.

/// Queue a job: `ARGV` prefix, id, owner, now (ms), idempotency key (or
/// ""), its lifetime (s), the limit per owner, the limit in all, a
/// finished job's lifetime (ms), then the job's fields. The owner's index
/// forgets entries older than twice that lifetime (their jobs are gone). `{"queued", id}`, `{"existing", id}` (the idempotency
/// key's job) or `{"full", "key" | "all"}`.
pub const SUBMIT: &str = r"
local p, id, owner, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local idem, idem_ttl = ARGV[5], tonumber(ARGV[6])
local per_key, all, ttl_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local idem_key = p .. ':idem:' .. owner .. ':' .. idem
-- Sent again after a lost answer: the job is there already.
if redis.call('EXISTS', p .. ':job:' .. id) == 1 then return {'queued', id} end
if idem ~= '' then
  local prev = redis.call('GET', idem_key)
  if prev and redis.call('EXISTS', p .. ':job:' .. prev) == 1 then
    return {'existing', prev}
  end
end
if redis.call('ZCARD', p .. ':queued') >= all then return {'full', 'all'} end
if redis.call('LLEN', p .. ':q:' .. owner) >= per_key then return {'full', 'key'} end
local job = p .. ':job:' .. id
redis.call('HSET', job, unpack(ARGV, 10))
redis.call('RPUSH', p .. ':q:' .. owner, id)
if redis.call('SADD', p .. ':ringset', owner) == 1 then
  redis.call('RPUSH', p .. ':ring', owner)
end
redis.call('ZADD', p .. ':queued', now, id)
local index = p .. ':owner:' .. owner
redis.call('ZREMRANGEBYSCORE', index, '-inf', tonumber(now) - 2 * ttl_ms)
redis.call('ZADD', index, now, id)
redis.call('PEXPIRE', index, 2 * ttl_ms)
redis.call('XADD', p .. ':jobs', '*', 'job', id)
if idem ~= '' then redis.call('SET', idem_key, id, 'EX', idem_ttl) end
return {'queued', id}
";

/// Bind a token to the next job, round-robin across owners: `ARGV`
/// prefix, token, now (ms), worker. The job's id; `false` when nothing is
/// queued (the token is surplus — a cancelled job's — and acknowledged);
/// `'retry'` when jobs are queued but none could be taken this time.
pub const TAKE: &str = r"
local p, token, now, who = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- Bound already (delivered again after its group was made anew): it is
-- resumed when claimed after the lease, never bound to a second job.
if redis.call('HEXISTS', p .. ':claims', token) == 1 then return 'retry' end
local ring = p .. ':ring'
local tries = redis.call('LLEN', ring) + redis.call('ZCARD', p .. ':queued') + 1
for _ = 1, tries do
  local owner = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  if not owner then break end
  local q = p .. ':q:' .. owner
  local id = redis.call('LPOP', q)
  if redis.call('LLEN', q) == 0 then
    redis.call('LREM', ring, 0, owner)
    redis.call('SREM', p .. ':ringset', owner)
  end
  if id then
    redis.call('ZREM', p .. ':queued', id)
    local job = p .. ':job:' .. id
    if redis.call('HGET', job, 'status') == 'queued' then
      redis.call('HSET', job, 'status', 'in_progress', 'started_ms', now,
        'token', token, 'worker', who)
      redis.call('HINCRBY', job, 'attempts', 1)
      redis.call('HSET', p .. ':claims', token, id)
      return id
    end
  end
end
if redis.call('ZCARD', p .. ':queued') == 0 then
  redis.call('XACK', p .. ':jobs', 'gateways', token)
  redis.call('XDEL', p .. ':jobs', token)
  return false
end
return 'retry'
";

/// A token claimed from a gateway that stopped renewing it: `ARGV`
/// prefix, token, now (ms), worker. `{'run', id}` (the bound job, to run
/// again), `{'take'}` (bound to none yet: take one) or `{'done'}` (its job
/// had finished; the token is acknowledged).
pub const RESUME: &str = r"
local p, token, now, who = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id = redis.call('HGET', p .. ':claims', token)
if not id then return {'take'} end
local job = p .. ':job:' .. id
if redis.call('HGET', job, 'status') ~= 'in_progress' then
  redis.call('HDEL', p .. ':claims', token)
  redis.call('XACK', p .. ':jobs', 'gateways', token)
  redis.call('XDEL', p .. ':jobs', token)
  return {'done'}
end
redis.call('HSET', job, 'worker', who, 'started_ms', now, 'token', token)
redis.call('HINCRBY', job, 'attempts', 1)
return {'run', id}
";

/// Keep a running job's token: `ARGV` prefix, token, id, worker. 1 (kept),
/// 0 (the job is no longer running: cancelled) or -1 (another worker has
/// it now).
pub const HEARTBEAT: &str = r"
local p, token, id, who = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job = p .. ':job:' .. id
local h = redis.call('HMGET', job, 'worker', 'status', 'token')
if h[1] ~= who or h[3] ~= token then return -1 end
if h[2] ~= 'in_progress' then return 0 end
redis.call('XCLAIM', p .. ':jobs', 'gateways', who, 0, token, 'JUSTID')
return 1
";

/// A step done: `ARGV` prefix, id, worker, progress (negative: unchanged,
/// for previews), ttl (s), then the event's fields. 1, or 0 when the job should stop (cancelled, or
/// another worker has it).
pub const PROGRESS: &str = r"
local p, id, who, progress, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local job = p .. ':job:' .. id
local h = redis.call('HMGET', job, 'worker', 'status')
if h[1] ~= who or h[2] ~= 'in_progress' then return 0 end
if tonumber(progress) >= 0 then redis.call('HSET', job, 'progress', progress) end
local ev = p .. ':ev:' .. id
redis.call('XADD', ev, 'MAXLEN', '~', 32, '*', unpack(ARGV, 6))
redis.call('EXPIRE', ev, ttl)
return 1
";

/// Finish a running job: `ARGV` prefix, token, id, worker, status, now
/// (ms), ttl (s), then fields to set. 1 (finished), 0 (it had already
/// stopped — cancelled — and its token is acknowledged), -1 (another
/// worker has it: nothing is touched).
pub const FINISH: &str = r"
local p, token, id, who, status, now, ttl =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local job = p .. ':job:' .. id
local h = redis.call('HMGET', job, 'worker', 'status', 'token', 'webhook_url')
if h[1] ~= who or h[3] ~= token then return -1 end
-- First, and not refused when Redis is out of memory: frees what the
-- writes below need.
redis.call('DEL', p .. ':ck:' .. id)
local done = 0
if h[2] == 'in_progress' then
  redis.call('HSET', job, 'status', status, 'completed_ms', now, unpack(ARGV, 8))
  redis.call('EXPIRE', job, ttl)
  if h[4] and h[4] ~= '' then redis.call('XADD', p .. ':hooks', '*', 'job', id) end
  local ev = p .. ':ev:' .. id
  redis.call('XADD', ev, 'MAXLEN', '~', 32, '*', 'end', status)
  redis.call('EXPIRE', ev, ttl)
  done = 1
end
redis.call('HDEL', p .. ':claims', token)
redis.call('XACK', p .. ':jobs', 'gateways', token)
redis.call('XDEL', p .. ':jobs', token)
return done
";

/// Keep a running job's new predictions: `ARGV` prefix, id, worker, ttl
/// (s), a note of how many predictions were replayed (or ""), then the
/// predictions. 1, or 0 when the job is no longer this worker's.
pub const CHECKPOINT: &str = r"
local p, id, who, ttl, replayed = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local job = p .. ':job:' .. id
local h = redis.call('HMGET', job, 'worker', 'status')
if h[1] ~= who or h[2] ~= 'in_progress' then return 0 end
if replayed ~= '' then redis.call('HSET', job, 'resumed_from', replayed) end
if #ARGV > 5 then
  local ck = p .. ':ck:' .. id
  redis.call('RPUSH', ck, unpack(ARGV, 6))
  redis.call('EXPIRE', ck, ttl)
end
return 1
";

/// Cancel: `ARGV` prefix, id, owner, now (ms), ttl (s). `'cancelled'`,
/// `'missing'` (no such job of this owner) or the finished job's status.
/// A queued job leaves the queue (its token becomes surplus); a running
/// one is marked, and its worker stops at its next step or heartbeat.
pub const CANCEL: &str = r"
local p, id, owner, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local job = p .. ':job:' .. id
local h = redis.call('HMGET', job, 'owner', 'status', 'webhook_url')
if h[1] ~= owner then return 'missing' end
if h[2] == 'queued' or h[2] == 'in_progress' then redis.call('DEL', p .. ':ck:' .. id) end
if h[2] == 'queued' then
  redis.call('LREM', p .. ':q:' .. owner, 0, id)
  redis.call('ZREM', p .. ':queued', id)
elseif h[2] ~= 'in_progress' then
  return h[2]
end
redis.call('HSET', job, 'status', 'cancelled', 'completed_ms', now)
redis.call('EXPIRE', job, ttl)
if h[3] and h[3] ~= '' then redis.call('XADD', p .. ':hooks', '*', 'job', id) end
local ev = p .. ':ev:' .. id
redis.call('XADD', ev, 'MAXLEN', '~', 32, '*', 'end', 'cancelled')
redis.call('EXPIRE', ev, ttl)
return 'cancelled'
";

/// A webhook delivered or given up: `ARGV` prefix, stream entry, job id,
/// outcome. Noted on the job if it is still kept (an expired job is not
/// made anew), the entry acknowledged and dropped.
pub const HOOK_DONE: &str = r"
local p, entry, id, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job = p .. ':job:' .. id
if redis.call('EXISTS', job) == 1 then redis.call('HSET', job, 'webhook', outcome) end
redis.call('XACK', p .. ':hooks', 'gateways', entry)
redis.call('XDEL', p .. ':hooks', entry)
return 1
";

/// Forget the consumers of gateways long gone: `ARGV` prefix, idle (ms).
/// A consumer with nothing pending, idle that long, is deleted from both
/// streams' groups (atomically with the check: one that just took an entry
/// has it pending, and stays). The count deleted.
pub const PRUNE: &str = r"
local p, idle = ARGV[1], tonumber(ARGV[2])
local n = 0
for _, stream in ipairs({p .. ':jobs', p .. ':hooks'}) do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, 'gateways')
  if ok then
    for _, c in ipairs(consumers) do
      local f = {}
      for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
      if tonumber(f['pending']) == 0 and tonumber(f['idle']) > idle then
        redis.call('XGROUP', 'DELCONSUMER', stream, 'gateways', f['name'])
        n = n + 1
      end
    end
  end
end
return n
";

/// An owner's job ids, newest first, with the expired ones forgotten:
/// `ARGV` prefix, owner, limit, status filter (or ""). Scans at most a
/// few hundred entries past the limit.
pub const LIST: &str = r"
local p, owner, limit, want = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local idx = p .. ':owner:' .. owner
local out = {}
local ids = redis.call('ZREVRANGE', idx, 0, limit + 500)
for _, id in ipairs(ids) do
  local st = redis.call('HGET', p .. ':job:' .. id, 'status')
  if not st then
    redis.call('ZREM', idx, id)
  elseif want == '' or st == want then
    out[#out + 1] = id
    if #out >= limit then break end
  end
end
return out
";
