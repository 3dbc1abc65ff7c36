"""`make serve`: Redis, a local Ray head and the controller, all on 127.0.0.1; prints the URL and a token.

For one person on one machine. Redis keeps its append-only file in runs/.redis (so jobs survive a restart of
`make serve`), checkpoints go to runs/, and Ray jobs run with this interpreter (the project's venv). Ctrl-C
stops the controller, then Ray and Redis (each by the pid we started, never `ray stop`).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import signal
import sys
from pathlib import Path

from services.localproc import RayHead, RedisServer, apply_ray_env, free_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=int(os.environ.get("FLOWBP_PORT", "8000")))
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--ray-cpus", type=int, default=2)
    a = p.parse_args(argv)

    import uvicorn

    from .app import create_app
    from .settings import ControllerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_ray_env()
    runs = a.runs_dir.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    token = os.environ.get("FLOWBP_TOKENS", "").split(",")[0].strip() or secrets.token_urlsafe(24)
    os.environ["FLOWBP_TOKENS"] = token

    redis = RedisServer(data_dir=runs / ".redis").start()
    ray = None
    try:
        print("starting a local Ray head (about 10 s)...", flush=True)
        ray = RayHead(num_cpus=a.ray_cpus, object_store_mb=512).start()
        settings = ControllerSettings.from_env(
            redis_url=redis.url, ray_address=ray.dashboard_url, runs_dir=runs, spec_dir=runs / "_jobs",
            entrypoint=f"{shlex.quote(sys.executable)} -m services.entrypoints.train", port=a.port or free_port())
        url = f"http://{settings.host}:{settings.port}"
        print("\nFlowBP controller (loopback only)\n"
              f"  URL:    {url}\n  token:  {token}\n  Redis:  {redis.url}\n  Ray:    {ray.dashboard_url}\n\n"
              f"  export FLOWBP_URL={url} FLOWBP_TOKEN={token}\n"
              "  flowbp submit deploy/configs/<name>.yaml && flowbp jobs\n", flush=True)
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False,
                    log_level="warning")
    finally:
        # A second Ctrl-C while Ray shuts down would leave its processes behind: finish the cleanup first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping Ray and Redis...", flush=True)
        if ray is not None:
            ray.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
