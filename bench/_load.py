"""Load generators: wrk with Lua scripts (preferred), or bench/loadgen.py (aiohttp) when wrk is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bench._common import (
    BATCH_PATH,
    LOCATION_PATH,
    REPO,
    TOKEN,
    clean_env,
    location_template,
    pinned,
    python,
)


class LoadResult(msgspec.Struct, kw_only=True):
    """What one load run saw: 2xx answers that mean "stored", the events they carried, failures."""

    ok_requests: int = 0  # 202 (single) / 200 with accepted > 0 (batch)
    events: int = 0  # events acknowledged: 1 per 202, ``accepted`` per batch answer
    other: int = 0  # any other answer (or, in a batch, items not accepted)
    errors: int = 0  # socket errors and timeouts
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    gen_cpu_s: float = 0.0  # CPU time of the load generator process


_WRK_COMMON = r"""
local threads = {}
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local ok, events, other = 0, 0, 0
  for _, t in ipairs(threads) do
    ok = ok + t:get("ok")
    events = events + t:get("events")
    other = other + t:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"ok_requests":%d,"events":%d,"other":%d,"errors":%d,"seconds":%.6f,"p50_ms":%.3f,"p99_ms":%.3f}\n',
    ok, events, other, e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""

# PUT with a body whose id is the URL's last segment, different for every request.
_WRK_SINGLE = r"""
local head = [==[@HEAD@]==]
local tail = [==[@TAIL@]==]
local base = "@PATH@"

function init(args)
  prefix = (args[1] or "W") .. tid .. "-"
  n, ok, events, other = 0, 0, 0, 0
  hdrs = {["Authorization"] = "Bearer @TOKEN@", ["Content-Type"] = "application/json"}
end

function request()
  n = n + 1
  local id = prefix .. n
  return wrk.format("PUT", base .. id, hdrs, head .. id .. tail)
end

function response(status, headers, body)
  if status == 202 then
    ok = ok + 1
    events = events + 1
  else
    other = other + 1
  end
end
"""

# A batch of ``size`` Location PUTs with ids never sent before, built per request: a fixed body sent again and
# again would be "duplicates" (a PUT of the document the relay already holds is acknowledged and not stored),
# and the check column could not tell.
_WRK_BATCH = r"""
local head = [==[@HEAD@]==]
local tail = [==[@TAIL@]==]
local base = "@PATH@"
local size = @SIZE@
wrk.method = "POST"
wrk.path = "@BATCH_PATH@"

function init(args)
  prefix = (args[1] or "W") .. tid .. "-"
  n, ok, events, other = 0, 0, 0, 0
  hdrs = {["Authorization"] = "Bearer @TOKEN@", ["Content-Type"] = "application/json"}
end

function request()
  n = n + 1
  local ops = {}
  for i = 1, size do
    local id = prefix .. n .. "-" .. i
    ops[i] = '{"method":"PUT","path":"' .. base .. id .. '","body":' .. head .. id .. tail .. '}'
  end
  return wrk.format(nil, nil, hdrs, '{"operations":[' .. table.concat(ops, ",") .. ']}')
end

function response(status, headers, body)
  local k = 0
  if status == 200 then
    k = tonumber(string.match(body, '"accepted":(%d+)')) or 0
  end
  if k > 0 then
    ok = ok + 1
    events = events + k
  end
  other = other + (size - k)
end
"""


def _run_measured(argv: list[str], cpus: set[int] | None, env: dict[str, str] | None = None) -> tuple[str, int, float]:
    """Run a command to completion; (stdout + stderr, exit code, CPU seconds of the child)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pinned(cpus), env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return text, proc.returncode, usage.ru_utime + usage.ru_stime


def _parse(text: str, marker: str, argv: list[str], code: int) -> LoadResult:
    for line in text.splitlines():
        if line.startswith(marker):
            return msgspec.json.decode(line[len(marker) :].strip(), type=LoadResult)
    raise RuntimeError(f"load generator failed ({code}): {' '.join(argv)}\n{text[-2000:]}")


@dataclass
class Wrk:
    """wrk, one thread (it has one core), ``connections`` keep-alive connections, Lua-generated requests."""

    workdir: Path
    connections: int
    batch_size: int
    cpus: set[int] | None
    name: str = "wrk"

    def __post_init__(self) -> None:
        head, tail = location_template()
        single = (_WRK_SINGLE + _WRK_COMMON).replace("@HEAD@", head.decode()).replace("@TAIL@", tail.decode())
        single = single.replace("@PATH@", LOCATION_PATH).replace("@TOKEN@", TOKEN)
        batch = (_WRK_BATCH + _WRK_COMMON).replace("@HEAD@", head.decode()).replace("@TAIL@", tail.decode())
        batch = batch.replace("@PATH@", LOCATION_PATH).replace("@BATCH_PATH@", BATCH_PATH)
        batch = batch.replace("@TOKEN@", TOKEN).replace("@SIZE@", str(self.batch_size))
        (self.workdir / "single.lua").write_text(single)
        (self.workdir / "batch.lua").write_text(batch)

    @staticmethod
    def available() -> bool:
        return shutil.which("wrk") is not None

    @staticmethod
    def version() -> str:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        return (out.stdout + out.stderr).split("\n", 1)[0].split(" [")[0].strip() or "wrk"

    def run(self, url: str, kind: str, duration_s: int, tag: str) -> LoadResult:
        script = self.workdir / ("batch.lua" if kind == "batch" else "single.lua")
        argv = ["wrk", "-t1", f"-c{self.connections}", f"-d{duration_s}s", "--timeout", "30s", "-s", str(script), url]
        argv += ["--", tag]
        text, code, cpu = _run_measured(argv, self.cpus)
        result = _parse(text, "WRK_RESULT", argv, code)
        result.gen_cpu_s = cpu
        return result


@dataclass
class PythonLoad:
    """bench/loadgen.py: aiohttp client, saturates one core near 8 k req/s (a floor, not the servers' capacity)."""

    connections: int
    batch_size: int
    cpus: set[int] | None
    name: str = "python-aiohttp"

    def run(self, url: str, kind: str, duration_s: int, tag: str) -> LoadResult:
        argv = [python(), "-m", "bench.loadgen", "--url", url, "--kind", kind, "--duration", str(duration_s)]
        argv += ["--connections", str(self.connections), "--tag", tag, "--batch-size", str(self.batch_size)]
        text, code, cpu = _run_measured(argv, self.cpus, env=clean_env())
        result = _parse("RESULT " + text.strip().splitlines()[-1] if text.strip() else "", "RESULT", argv, code)
        result.gen_cpu_s = cpu
        return result
