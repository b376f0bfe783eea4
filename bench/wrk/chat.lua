-- POST /v1/chat/completions (non-streaming), a fresh X-Session-Id per request.
-- wrk ... -s bench/wrk/chat.lua URL -- <run-prefix>; key from BENCH_CLIENT_KEY.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "common.lua")

local prefix, counter, key = "run", 0, os.getenv("BENCH_CLIENT_KEY") or "bench-client-key"

function init(args)
  prefix = args[1] or prefix
end

function request()
  counter = counter + 1
  local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":' ..
    '"Where is my order 123456? It was supposed to arrive yesterday."}],"max_tokens":128}'
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
    ["X-Session-Id"] = string.format("%s-%d-%d", prefix, tid or 0, counter),
  }, body)
end
