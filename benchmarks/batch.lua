-- wrk script for the batch scenario: POST /v1/opscore/state-reports with SIZE legal reports.
-- wrk -t2 -c16 -d10s -s benchmarks/batch.lua URL -- KEY PREFIX AGENTS BASE_EPOCH THREADS SIZE
-- As state.lua: each thread walks its own slice of pre-registered `idle` agents, SIZE agents
-- per request, alternating active/idle per agent with increasing timestamps. `bad` counts
-- results whose status is not 200 (parsed from the body).
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
  size = tonumber(args[6])
  slice = math.floor(total / nthreads)
  first = id * slice
  visits = {}
  cursor = 0
  tick = 0
  bad = 0
  ok = 0
  headers = {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}
end

function request()
  local parts = {}
  for k = 1, size do
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
    parts[k] = '{"agentId":"' .. prefix .. n .. '","timestamp":"' .. ts .. '","state":"' .. state .. '","details":{}}'
  end
  return wrk.format("POST", "/v1/opscore/state-reports", headers, '{"reports":[' .. table.concat(parts, ",") .. ']}')
end

function response(status, hdrs, body)
  if status ~= 200 then
    bad = bad + size
    return
  end
  local _, good = string.gsub(body, '"status":200', "")
  ok = ok + good
  bad = bad + (size - good)
end

function done(summary, latency, requests)
  local b, g = 0, 0
  for _, t in ipairs(threads) do
    b = b + (tonumber(t:get("bad")) or 0)
    g = g + (tonumber(t:get("ok")) or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"ok_reports":%d,"bad_reports":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, g, b, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
