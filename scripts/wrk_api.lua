-- wrk script of scripts/bench-api.sh: GETs TALLY_BENCH_PATH with "{org}" replaced by a random
-- org of the fixture (org-0 … org-999), authorized by TALLY_BENCH_TOKEN; prints one JSON line.
local token = os.getenv("TALLY_BENCH_TOKEN")
local template = os.getenv("TALLY_BENCH_PATH")
local orgs = tonumber(os.getenv("TALLY_BENCH_ORGS") or "1000")

init = function(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end

request = function()
  local path = string.gsub(template, "{org}", "org-" .. math.random(0, orgs - 1))
  return wrk.format("GET", path, { ["authorization"] = "Bearer " .. token })
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests": %d, "duration_s": %.3f, "requests_per_s": %.1f, "socket_errors": %d, "non_2xx": %d, ' ..
    '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
