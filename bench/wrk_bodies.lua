-- wrk script for bench/wrk.py: POST a fixed list of bodies in order, cycling, and print one JSON summary.
--
--   wrk -t1 -c16 -d4s -s bench/wrk_bodies.lua URL -- DATA LENGTHS PATH CONTENT_TYPE ["Name: value" ...]
--
-- DATA holds the bodies back to back, LENGTHS one byte count per line (bench/wrk.py writes both). Every request
-- is formatted once in init(), so the per-request work is a table lookup. The summary line printed by done()
-- is the only line of stdout that starts with '{'.

local requests = {}
local count = 0
local next_index = 0 -- the index of the last request returned

local function read_all(name)
  local f = assert(io.open(name, "rb"))
  local data = f:read("*all")
  f:close()
  return data
end

init = function(args)
  local data, lengths, path, content_type = args[1], args[2], args[3], args[4]
  local headers = {["Content-Type"] = content_type}
  for k = 5, #args do
    local name, value = string.match(args[k], "^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  local blob = read_all(data)
  local pos = 1
  for line in io.lines(lengths) do
    local n = tonumber(line)
    count = count + 1
    requests[count] = wrk.format("POST", path, headers, string.sub(blob, pos, pos + n - 1))
    pos = pos + n
  end
  assert(count > 0, "no bodies in " .. lengths)
  assert(pos == #blob + 1, "the lengths do not add up to the size of " .. data)
  -- Before the run, wrk calls request() once on thread 0 to see whether it returns pipelined requests
  -- (wrk.c: script_verify_request); that call gets the last body, so the run starts with the first.
  -- bench/wrk.py runs one thread (-t1).
  next_index = count - 1
end

request = function()
  next_index = next_index % count + 1
  return requests[next_index]
end

done = function(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}, "latency_us": {"min": %d, "mean": %.1f, "p50": %d, "p90": %d, "p99": %d, ' ..
    '"max": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
