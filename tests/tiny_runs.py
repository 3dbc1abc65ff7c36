"""A tiny run for the tests that run one (runtime, reward service): its config (the tiny random SD3, a weight-free
reward, few steps), serialised rollout caches, and the events the run logged."""

from __future__ import annotations

import copy
import json

from flowbp_core.config import RunConfig, config_from_dict

PROMPTS = ["a red cube", "a blue ball on grass", "two green cats", "a yellow sign"]


def tiny_cfg(tmp_dir, run_id: str, **sections) -> RunConfig:
    base = {
        "run_id": run_id,
        "backbone": {"name": "sd3", "tiny": True, "device": "cpu", "finetune": "lora", "lora": {"rank": 4}},
        "method": {"name": "flowbp_sparse", "k": 2},
        "reward": {"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "served",
                   "served": {"replicas": 1, "num_cpus": 0.25, "decode_on_reward_side": True}},
        "sampling": {"n_steps": 4},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "prompts": {"prompts": PROMPTS}},
        "runtime": {"rollout_workers": 2, "learners": 1, "rollout_num_cpus": 0.25, "learner_num_cpus": 0.5},
        "checkpoint": {"dir": str(tmp_dir), "every": 1, "keep": 10},
        "eval": {"every": 0, "limit": 2, "prompts": {"prompts": PROMPTS[:2]}},
    }
    data = copy.deepcopy(base)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    return config_from_dict(data)


def write_caches(comp, steps: int, directory) -> list[str]:
    """Serialised rollout caches of steps 0..steps-1 (offset 0) from `comp`'s current weights, one file each."""
    from flowbp_core.run import rollout_for

    files = []
    for s in range(steps):
        f = directory / f"cache_{s}.safetensors"
        f.write_bytes(rollout_for(comp, s, 0).to_bytes())
        files.append(str(f))
    return files


def run_events(run_dir) -> list[dict]:
    """The events a run logged in `run_dir/events.jsonl`, in order (none before it starts)."""
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
