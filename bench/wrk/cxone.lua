-- POST /webhook/cxone: a new digital contact per request (contactId from a counter), so every
-- turn reads its history from the fake CXone and asks the fake LLM (streamed).
-- wrk ... -s bench/wrk/cxone.lua URL -- <numeric-base>; header from BENCH_CXONE_AUTH.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "common.lua")

local base, counter = 0, 0
local auth = os.getenv("BENCH_CXONE_AUTH") or "Bearer bench-cxone-token"

function init(args)
  base = tonumber(args[1] or "0") or 0
end

function request()
  counter = counter + 1
  local contact = base + (tid or 0) * 10000000 + counter
  local body = string.format('{"userInput":"Hi, I was charged twice for my last order",' ..
    '"userInputType":"TEXT","executionInfo":{"contactId":%d},"mediaType":"chat"}', contact)
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = auth,
  }, body)
end
