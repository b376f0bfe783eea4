-- POST /webhook/cognigy/fallback, HMAC-signed. LuaJIT has no HMAC, so bench/run.py writes
-- pre-signed bodies (distinct conversationIds), one "<hex signature>\t<body>" per line, to the
-- file named by BENCH_COGNIGY_FILE; thread i of n takes lines i, i+n, i+2n, ... (then cycles).
-- wrk ... -s bench/wrk/cognigy.lua URL -- <threads>
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "common.lua")

local sigs, bodies, index = {}, {}, 0

function init(args)
  local threads = tonumber(args[1] or "1") or 1
  local path = os.getenv("BENCH_COGNIGY_FILE") or "bench/results/cognigy_bodies.tsv"
  local n = 0
  for line in io.lines(path) do
    if n % threads == (tid or 0) then
      local sig, body = line:match("^([^\t]+)\t(.*)$")
      sigs[#sigs + 1], bodies[#bodies + 1] = sig, body
    end
    n = n + 1
  end
end

function request()
  index = index % #bodies + 1
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["X-Webhook-Signature"] = "sha256=" .. sigs[index],
  }, bodies[index])
end
