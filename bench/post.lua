-- wrk script: POST a fixed OTLP body; rotate bearer tokens when there are several.
-- BENCH_BODY: body file; BENCH_TOKENS: file of tokens, one per line (may be empty);
-- BENCH_ENCODING: Content-Encoding or empty. Prints one JSON line of results at the end.
local body = io.open(os.getenv("BENCH_BODY"), "rb"):read("*a")
local tokens = {}
local tokens_file = os.getenv("BENCH_TOKENS")
if tokens_file and tokens_file ~= "" then
  for line in io.lines(tokens_file) do tokens[#tokens + 1] = line end
end
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/x-protobuf"
local encoding = os.getenv("BENCH_ENCODING")
if encoding and encoding ~= "" then wrk.headers["Content-Encoding"] = encoding end

local fixed = nil
local i = 0
if #tokens == 1 then wrk.headers["Authorization"] = "Bearer " .. tokens[1] end

function setup(thread)
  thread:set("offset", math.random(1, 1000000))
end

local prefix, suffix = nil, nil

function init(args)
  -- wrk has set the Host header by now; a request built at load time would lack it.
  i = (offset or 0)
  if #tokens <= 1 then
    fixed = wrk.format()
  else
    -- Build the request once around a marker and splice each token in: formatting a
    -- 20 KB request per call would make the load generator, not the server, the cost.
    wrk.headers["Authorization"] = "Bearer @@TOKEN@@"
    local template = wrk.format()
    local at = string.find(template, "@@TOKEN@@", 1, true)
    prefix, suffix = string.sub(template, 1, at - 1), string.sub(template, at + 9)
  end
end

function request()
  if fixed then return fixed end
  i = i + 1
  return prefix .. tokens[(i % #tokens) + 1] .. suffix
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
