"""`python -m services.entrypoints.train --config deploy/configs/<name>.yaml [--a.b=value ...]`

Runs one FlowBP job on Ray: the driver loop with rollout workers, a Ray Train learner group and (when
configured) Ray Serve reward deployments. Works as-is under `ray job submit -- python -m ...` (it connects to
the job's cluster through RAY_ADDRESS) and stand-alone (it starts a local Ray on loopback, or joins the one named
by `--address`). It resumes from the newest complete checkpoint of `run_id` by default
(`--checkpoint.resume=false` starts over). SIGTERM / SIGINT (what `ray job stop` sends) cancel cleanly: no new
rollouts, the learner stops at its next step boundary, no half-written checkpoint.

Exit status: 0 finished, 1 failed (the reason is printed and in runs/<run_id>/summary.json), 2 bad config,
3 cancelled. The last stdout line is the run summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict

from services.localproc import RAY_LOCAL_ENV


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m services.entrypoints.train", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML run file, e.g. deploy/configs/embedded.yaml")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray on 127.0.0.1)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray (ignored when joining)")
    p.add_argument("--object-store-mb", type=int, default=512, help="object store of a new local Ray")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            p.error(f"unrecognised argument {item!r}: overrides look like --section.field=value")
        overrides.append(item[2:])
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    for k, v in RAY_LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args, overrides = parse_args(argv)
    from flowbp_core.config import load_config
    from flowbp_core.errors import ConfigError

    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    import ray

    from services.runtime.driver import Driver, RunFailed

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        from services.localproc import init_local_ray

        init_local_ray(num_cpus=args.num_cpus, object_store_mb=args.object_store_mb)
    cancel = threading.Event()

    def on_signal(signum, _frame):
        logging.getLogger("flowbp.runtime").warning("signal %d: cancelling at the next step boundary", signum)
        cancel.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    driver = Driver(cfg, cancel_event=cancel)
    code = 0
    try:
        summary = driver.run()
        code = 3 if summary.status == "cancelled" else 0
    except RunFailed as e:
        print(f"run {driver.run_id} failed: {e}", file=sys.stderr)
        code = 1
    driver.telemetry.flush()  # this process exits next: the final step's and eval's values must be exported first
    print(json.dumps(asdict(driver.summary), default=str))
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
