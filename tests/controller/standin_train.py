"""A small real training-shaped job for the controller's end-to-end tests (run by Ray as the job entrypoint).

It honours the contract of `services.entrypoints.train` that the controller relies on, without a model:
reads `--config <spec file>` (the RunConfig the controller wrote), resumes from the newest complete
checkpoint under <checkpoint.dir>/<run_id>/, and per step appends a row to metrics.jsonl and writes
step_<n>/ through a temporary folder, renamed into place, with COMPLETE last (and a LoRA-named safetensors
file, so the download route has something to serve). `train.steps` steps, FLOWBP_STANDIN_STEP_S seconds each.

Fault injection for the resubmission test: if <run dir>/DIE_ONCE exists when step 2 is done, the file is
removed and the process exits with status 3, as a job whose node died would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def latest_complete(run_dir: Path) -> int:
    steps = [int(d.name[5:]) for d in run_dir.glob("step_*") if d.name[5:].isdigit() and (d / "COMPLETE").exists()]
    return max(steps, default=0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    a = p.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    run_dir = Path(cfg["checkpoint"]["dir"]) / cfg["run_id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = int(cfg["train"]["steps"])
    pause = float(os.environ.get("FLOWBP_STANDIN_STEP_S", "0.3"))
    start = latest_complete(run_dir)
    print(f"standin: run {cfg['run_id']} attempt {os.environ.get('FLOWBP_ATTEMPT')} "
          f"{'resumed from step_%d' % start if start else 'from scratch'}", flush=True)
    for step in range(start + 1, steps + 1):
        time.sleep(pause)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "reward_mean": 0.1 * step}) + "\n")
        tmp = run_dir / f"step_{step}.tmp-{os.getpid()}"
        tmp.mkdir()
        (tmp / "pytorch_lora_weights.safetensors").write_bytes(_tiny_safetensors(step))
        tmp.rename(run_dir / f"step_{step}")
        (run_dir / f"step_{step}" / "COMPLETE").write_text(str(time.time()))
        print(f"standin: step {step}/{steps} done", flush=True)
        if step == 2 and (run_dir / "DIE_ONCE").exists():
            (run_dir / "DIE_ONCE").unlink()
            print("standin: dying on purpose after step 2", flush=True)
            return 3
    print("standin: finished", flush=True)
    return 0


def _tiny_safetensors(step: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "__metadata__": {"step": str(step)}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + b"\x00\x00\x80\x3f"


if __name__ == "__main__":
    sys.exit(main())
