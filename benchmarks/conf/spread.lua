-- Rotates the Host header over N services (s0 .. s<N-1>), one request at a
-- time per connection. Usage: wrk ... -s spread.lua <url> -- <N>
local requests = {}
local count = 0
local index = 0

function init(args)
  count = tonumber(args[1] or "1")
  for i = 0, count - 1 do
    requests[i] = wrk.format("GET", "/", { Host = "s" .. i })
  end
  index = math.random(0, count - 1)
end

function request()
  local r = requests[index]
  index = (index + 1) % count
  return r
end
