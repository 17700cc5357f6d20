-- wrk script for http-state: legal state reports only, so nothing is refused.
-- wrk -t2 -c64 -d10s -s benchmarks/state.lua URL -- KEY PREFIX AGENTS BASE_EPOCH THREADS
-- Agents PREFIX0..PREFIX(AGENTS-1) must already be in `idle` with older reports. Each wrk
-- thread owns a disjoint slice of agents and walks it round-robin, alternating
-- active/idle per agent with strictly increasing timestamps; an agent comes back only after
-- the thread has sent to every other agent of its slice (far more than its connections in
-- flight), so two reports of one agent are never in flight at once.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  key = args[1]
  prefix = args[2]
  local total = tonumber(args[3])
  base = tonumber(args[4])
  local nthreads = tonumber(args[5])
  slice = math.floor(total / nthreads)
  first = id * slice
  visits = {}
  cursor = 0
  tick = 0
  non2xx = 0
  headers = {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}
end

function request()
  local n = first + cursor
  cursor = (cursor + 1) % slice
  local v = (visits[n] or 0) + 1
  visits[n] = v
  tick = tick + 1
  local t = base + tick / 1000000
  local sec = math.floor(t)
  local usec = math.floor((t - sec) * 1000000 + 0.5)
  if usec >= 1000000 then sec = sec + 1; usec = usec - 1000000 end
  local ts = os.date("!%Y-%m-%dT%H:%M:%S", sec) .. string.format(".%06d+00:00", usec)
  local state = (v % 2 == 1) and "active" or "idle"
  local agent = prefix .. n
  local body = '{"agentId":"' .. agent .. '","timestamp":"' .. ts .. '","state":"' .. state .. '","details":{}}'
  return wrk.format("POST", "/v1/opscore/agent/" .. agent .. "/state", headers, body)
end

function response(status, hdrs, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + (tonumber(t:get("non2xx")) or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
