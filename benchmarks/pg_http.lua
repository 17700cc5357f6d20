-- wrk script: legal state reports only (idle <-> active), so nothing is refused.
--   wrk -t T -c C -d 30s -s benchmarks/pg_http.lua URL -- KEY PREFIX AGENTS BASE_EPOCH T
-- Agents PREFIX0 .. PREFIX(AGENTS-1) must already be `idle` with a report older than
-- BASE_EPOCH (benchmarks/pg_http.py does that). Each wrk thread owns a disjoint slice of the
-- agents and walks it round-robin, alternating active/idle per agent, with a timestamp that
-- grows by 1 us per request of the thread: an agent is revisited only after every other agent
-- of the slice, far more than the thread's connections, so no agent has two reports in flight
-- and none is ever stale or illegal. Prints one line `RESULT {json}` at the end.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local key = args[1]
  prefix = args[2]
  local agents = tonumber(args[3])
  base = tonumber(args[4])
  local nthreads = tonumber(args[5])
  slice = math.floor(agents / nthreads)
  first = id * slice
  cursor = 0
  tick = 0
  visits = {}
  bad = 0
  headers = {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}
end

local function timestamp()
  tick = tick + 1
  local sec = base + math.floor(tick / 1000000)
  local usec = tick % 1000000
  return os.date("!%Y-%m-%dT%H:%M:%S", sec) .. string.format(".%06d+00:00", usec)
end

function request()
  local n = first + cursor
  cursor = (cursor + 1) % slice
  local v = (visits[n] or 0) + 1
  visits[n] = v
  local agent = prefix .. n
  local state = (v % 2 == 1) and "active" or "idle"
  local body = '{"agentId":"' .. agent .. '","timestamp":"' .. timestamp() ..
    '","state":"' .. state .. '","details":{}}'
  return wrk.format("POST", "/v1/opscore/agent/" .. agent .. "/state", headers, body)
end

function response(status, hdrs, body)
  if status ~= 200 then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local non200 = 0
  for _, t in ipairs(threads) do
    non200 = non200 + (tonumber(t:get("bad")) or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"non200":%d,"errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, non200, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
