-- wrk script of the test kit (tests/common/wrk.rs parses what done() prints).
-- Tallies response bodies and status codes in every thread, then prints the totals with
-- wrk's exact counters and latency percentiles, one "cutover-wrk ..." line each.
-- Bodies are hex-encoded (the demo server's end in a newline) and cut at 64 bytes.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bodies = {}
  statuses = {}
end

local function hex(s)
  return (string.gsub(s, ".", function(c) return string.format("%02x", string.byte(c)) end))
end

function response(status, headers, body)
  local key = "x" .. hex(string.sub(body or "", 1, 64))
  bodies[key] = (bodies[key] or 0) + 1
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local b, s = {}, {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("bodies") or {}) do b[k] = (b[k] or 0) + v end
    for k, v in pairs(t:get("statuses") or {}) do s[k] = (s[k] or 0) + v end
  end
  for k, v in pairs(b) do
    io.write(string.format("cutover-wrk body %d %s\n", v, k))
  end
  for k, v in pairs(s) do
    io.write(string.format("cutover-wrk status %d %d\n", v, k))
  end
  local e = summary.errors
  io.write(string.format(
    "cutover-wrk summary requests=%d connect=%d read=%d write=%d status=%d timeout=%d duration_us=%d\n",
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout, summary.duration))
  io.write(string.format("cutover-wrk latency_us p50=%d p99=%d max=%d\n",
    latency:percentile(50), latency:percentile(99), latency.max))
end
