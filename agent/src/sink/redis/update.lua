-- The mirror's update script (sink/redis/mod.rs, UPDATE_SCRIPT, says what it takes and returns).
local n = tonumber(ARGV[3])
local changed = {}
for i = 0, n - 1 do
  local name, value, ts, ord = ARGV[4 + 4 * i], ARGV[5 + 4 * i], ARGV[6 + 4 * i], ARGV[7 + 4 * i]
  local stored = tonumber(redis.call('HGET', KEYS[2], name))
  local t = tonumber(ts)
  if value == '' then
    -- Only what the mirror wrote up to the forgotten value goes; a newer value stays.
    local stored_ord = redis.call('HGET', KEYS[5], 'm:' .. name)
    if stored_ord and stored_ord <= ord then
      redis.call('HDEL', KEYS[1], name)
      redis.call('HDEL', KEYS[2], name)
      redis.call('HDEL', KEYS[5], 'm:' .. name)
      changed[#changed + 1] = cjson.encode(name)
    end
  else
    local newer = not stored or t > stored
    if stored and t == stored then
      local stored_ord = redis.call('HGET', KEYS[5], 'm:' .. name)
      newer = not stored_ord or ord > stored_ord
    end
    if newer then
      local old = redis.call('HGET', KEYS[1], name)
      redis.call('HSET', KEYS[1], name, value)
      redis.call('HSET', KEYS[2], name, ts)
      redis.call('HSET', KEYS[5], 'm:' .. name, ord)
      if old ~= value or stored ~= t then
        changed[#changed + 1] = cjson.encode(name)
      end
    end
  end
end
local trade_changed = false
local json = ARGV[4 + 4 * n]
if json then
  local ord, closed_at = ARGV[5 + 4 * n], ARGV[6 + 4 * n]
  local old = redis.call('GET', KEYS[4])
  local stored_ord = redis.call('HGET', KEYS[5], 'trade')
  local newer = not old
  if old and stored_ord then
    newer = ord > stored_ord
  elseif old then
    local ok, decoded = pcall(cjson.decode, old)
    newer = not (ok and type(decoded) == 'table' and type(decoded.closed_at) == 'string') or closed_at >= decoded.closed_at
  end
  if newer then
    redis.call('SET', KEYS[4], json)
    redis.call('HSET', KEYS[5], 'trade', ord)
    trade_changed = old ~= json
  end
end
redis.call('SADD', KEYS[3], ARGV[2])
if ARGV[1] ~= '' and (#changed > 0 or trade_changed) then
  redis.call('PUBLISH', ARGV[1], '{"profile_id":' .. cjson.encode(ARGV[2]) .. ',"metrics":[' ..
    table.concat(changed, ',') .. '],"last_trade":' .. tostring(trade_changed) .. '}')
end
return #changed + (trade_changed and 1 or 0)
