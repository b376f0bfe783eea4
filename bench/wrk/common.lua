-- Shared by the bench scripts: a per-thread id (setup), and done() printing one JSON line
-- (latency percentiles in microseconds) that bench/run.py parses.
local threads_made = 0

function setup(thread)
  thread:set("tid", threads_made)
  threads_made = threads_made + 1
end

function done(summary, latency, requests)
  local parts = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9}) do
    parts[#parts + 1] = string.format('"p%s":%.1f', tostring(q), latency:percentile(q))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{%s,"mean":%.1f,"stdev":%.1f,"max":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ","), latency.mean, latency.stdev, latency.max))
end
