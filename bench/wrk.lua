-- cluster-rs bench: the wrk script for every scenario.
-- WRK_CONNECTION_CLOSE=1 (set by bench/run.js for the "close" scenario) makes
-- every request carry "Connection: close", so the server closes the socket
-- after each response and wrk opens a new TCP connection per request. It is
-- set here rather than with -H through a shell variable, which word-splitting
-- can silently break. Otherwise wrk keeps its HTTP/1.1 connections alive.
-- wrk's own resolve() opens a test connection to the server, with no
-- request on it, which the server would count as one of the load's: a
-- keep-alive split of 25/25 read 26/25. Resolve without it.
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(host, service)
end

if os.getenv("WRK_CONNECTION_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

-- wrk's own CPU time so far, all its threads, in clock ticks (user +
-- system, fields 14 and 15 of /proc/self/stat; the name in field 2 may hold
-- spaces, so fields are counted after its closing parenthesis), or -1 where
-- there is no /proc. The harness uses it to tell when the load generator,
-- not the server, limits a run.
local function cpu_ticks()
  local f = io.open("/proc/self/stat", "r")
  if not f then return -1 end
  local stat = f:read("*a")
  f:close()
  local after_name = stat:match(".*%)%s+(.*)")
  if not after_name then return -1 end
  local fields = {}
  for v in after_name:gmatch("%S+") do fields[#fields + 1] = v end
  local utime, stime = tonumber(fields[12]), tonumber(fields[13])
  if not utime or not stime then return -1 end
  return utime + stime
end

-- Machine-readable summary for bench/run.js (exact counts, microseconds).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"cpu_ticks":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max, cpu_ticks()))
end
