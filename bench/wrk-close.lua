-- cluster-rs bench: connection-per-request load.
-- Every request carries "Connection: close", so the server closes the socket
-- after each response and wrk has to open a new TCP connection per request.
-- (Set here rather than via -H in a shell variable, which word-splitting can
-- silently break.)
wrk.headers["Connection"] = "close"

-- Machine-readable summary for bench/run.js (exact counts, microseconds).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
