"""Bounded load on the controller over loopback: N concurrent clients submit jobs and read job status.

    python benchmarks/controller_load.py [--clients 50] [--seconds 30] [--submit-fraction 0.1]

Starts its own Redis (append-only, as in production) and the controller as a real uvicorn process on
127.0.0.1 with the reconciler on but dispatch paused (max_active_jobs=0), so the measurement is the API path
(validation, auth, Redis round trips) and no training job is started per submit. Then checks that every job
the API acknowledged (201) is in Redis and readable, prints p50/p90/p99 latency and errors per call kind, and
writes benchmarks/results/controller_load.json. The load generator runs on the same machine as the server and
competes with it for CPU: on a small machine the numbers are an upper bound on the server's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.localproc import RedisServer, free_port  # noqa: E402

TOKEN = "bench-token-" + os.urandom(8).hex()
SPEC = {"name": "load", "labels": {"bench": "controller_load"},
        "config": {"train": {"steps": 10, "prompts": {"prompts": ["a red circle on the left", "two blue squares"]}}}}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def client_loop(i: int, url: str, deadline: float, frac: float, think_s: float, known: list[str],
                      out: dict) -> None:
    """One client: submit (fraction `frac`) or read a random known job's status, then wait `think_s`."""
    rng = random.Random(i)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    # aiohttp rather than httpx: on a 2-core machine the load generator's own CPU per call competes with the
    # server, and aiohttp spends several times less of it.
    async with aiohttp.ClientSession(base_url=url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as c:
        if think_s:
            await asyncio.sleep(rng.random() * think_s)  # spread the clients' phases
        while time.perf_counter() < deadline:
            kind = "submit" if rng.random() < frac else "status"
            t0 = time.perf_counter()
            try:
                if kind == "submit":
                    async with c.post("/v1/jobs", json=SPEC) as r:
                        body = await r.json()
                        ok = r.status == 201
                        if ok:
                            out["acknowledged"].append(body["id"])
                            known.append(body["id"])
                else:
                    async with c.get(f"/v1/jobs/{rng.choice(known)}") as r:
                        await r.read()
                        ok = r.status == 200
                code = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                ok, code = False, type(e).__name__
            dt = time.perf_counter() - t0
            out[kind].append(dt)
            if not ok:
                out["errors"].append(f"{kind}: {code}")
            if think_s:
                await asyncio.sleep(think_s)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_controller(redis_url: str, port: int, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "FLOWBP_TOKENS": TOKEN, "FLOWBP_REDIS_URL": redis_url, "FLOWBP_PORT": str(port),
           "FLOWBP_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "FLOWBP_MAX_ACTIVE_JOBS": "0",
           "FLOWBP_CHECK_REGISTRIES": "false", "FLOWBP_RUNS_DIR": str(tmp / "runs"),
           "FLOWBP_SPEC_DIR": str(tmp / "runs" / "_jobs"), "FLOWBP_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "services.controller.app"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "controller.log", "wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"controller did not start: {(tmp / 'controller.log').read_text()}")


async def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="flowbp-load-"))
    redis = RedisServer(data_dir=tmp / "redis").start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_controller(redis.url, port, tmp)
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            seeded = [(await c.post("/v1/jobs", json=SPEC)).json()["id"] for _ in range(args.seed_jobs)]
            for _ in range(20):  # warm-up (imports, connection pools)
                await c.get(f"/v1/jobs/{seeded[0]}")
        out: dict = {"submit": [], "status": [], "errors": [], "acknowledged": []}
        known = list(seeded)
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        await asyncio.gather(*(client_loop(i, url, deadline, args.submit_fraction, args.think_ms / 1000, known, out)
                               for i in range(args.clients)))
        wall = time.perf_counter() - t0

        # No lost records: every acknowledged job is readable, and Redis holds exactly seeded + acknowledged.
        lost = []
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            for job_id in out["acknowledged"]:
                r = await c.get(f"/v1/jobs/{job_id}")
                if r.status_code != 200 or r.json()["id"] != job_id:
                    lost.append(job_id)
        import redis as redis_py

        stored = redis_py.Redis.from_url(redis.url).zcard("flowbp:jobs")
        server_cpu_s = _cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        redis.cleanup()
    expected = len(seeded) + len(out["acknowledged"])
    calls = len(out["submit"]) + len(out["status"])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load generator and server on the same host",
        "load_average_at_end": os.getloadavg()[0],
        "clients": args.clients, "seconds": round(wall, 1), "submit_fraction": args.submit_fraction,
        "think_ms": args.think_ms,
        "calls": calls, "throughput_rps": round(calls / wall, 1),
        # CPU the controller process itself spent per call (seeding and checks included): a number the other
        # tenants of a shared machine distort far less than latency.
        "server_cpu_ms_per_call": round(
            1000 * server_cpu_s / max(1, calls + len(seeded) + len(out["acknowledged"])), 2),
        "errors": len(out["errors"]),
        "error_samples": sorted(set(out["errors"]))[:10],
        "lost_records": len(lost), "records_expected": expected, "records_in_redis": stored,
    }
    for kind in ("status", "submit"):
        xs = out[kind]
        result[kind] = {"n": len(xs), "p50_ms": round(1000 * pct(xs, 50), 2), "p90_ms": round(1000 * pct(xs, 90), 2),
                        "p99_ms": round(1000 * pct(xs, 99), 2), "max_ms": round(1000 * max(xs), 2) if xs else None,
                        "mean_ms": round(1000 * statistics.fmean(xs), 2) if xs else None}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--submit-fraction", type=float, default=0.1)
    p.add_argument("--think-ms", type=float, default=0.0,
                   help="pause of each client between calls (0: closed loop, every client always waiting)")
    p.add_argument("--seed-jobs", type=int, default=100)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "controller_load.json")
    args = p.parse_args()
    res = asyncio.run(run(args))
    print(f"\ncontroller load: {res['clients']} clients (think {res['think_ms']:g} ms), {res['seconds']} s, "
          f"{res['calls']} calls "
          f"({res['throughput_rps']} req/s), {res['machine']}")
    print(f"{'call':<8}{'n':>8}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind in ("status", "submit"):
        k = res[kind]
        print(f"{kind:<8}{k['n']:>8}{k['p50_ms']:>10}{k['p90_ms']:>10}{k['p99_ms']:>10}{k['max_ms']:>10}")
    print(f"controller CPU per call: {res['server_cpu_ms_per_call']} ms; load average at end "
          f"{res['load_average_at_end']:.1f}")
    print(f"errors: {res['errors']}   lost records: {res['lost_records']} "
          f"(Redis holds {res['records_in_redis']} of {res['records_expected']} expected)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    ok = res["errors"] == 0 and res["lost_records"] == 0 and res["records_in_redis"] == res["records_expected"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
