"""What a run checks and deploys before its loop starts, and takes down after it: the driver's setup.

- `check_learner_split`, `check_checkpoint_dir`: refuse a config the cluster cannot run, naming what fits.
- `deploy_reward_apps`: the run's own Ray Serve reward apps (value-and-grad for `reward.placement: served`,
  score-only for evaluation), placed on the reward role's resources; `shutdown_reward_apps` removes them.
"""

from __future__ import annotations

from pathlib import Path

import ray

from flowbp_core.backbones import build_kwargs
from flowbp_core.config import RunConfig
from flowbp_core.errors import ConfigError
from services.runtime import learner as learner_mod
from services.runtime.placement import role_resources


def check_learner_split(cfg: RunConfig) -> None:
    """Refuse a batch the learner ranks cannot share equally (a rank without samples, or an over-weighted one)."""
    rt, b = cfg.runtime, cfg.train.batch_size
    if rt.strategy == "fsdp" and rt.learners < 2:
        raise ConfigError("runtime.strategy", "fsdp", "'ddp' with runtime.learners=1 (FSDP shards the model "
                          "over the learner ranks: set runtime.learners >= 2 to use it)")
    if b % rt.learners:
        below, above = b // rt.learners * rt.learners, (b // rt.learners + 1) * rt.learners
        near = [n for n in (below, above) if n > 0]
        divisors = [n for n in range(1, b + 1) if b % n == 0]
        raise ConfigError("train.batch_size", b, f"a multiple of runtime.learners={rt.learners} (e.g. "
                          f"{' or '.join(map(str, near))}), or runtime.learners one of {divisors}",
                          hint="each learner rank trains an equal share of the batch")


def check_checkpoint_dir(cfg: RunConfig, nodes: int) -> None:
    """A multi-node run needs one checkpoint folder that every node sees at the same path."""
    d = cfg.checkpoint.dir
    if nodes > 1 and not Path(d).is_absolute():
        raise ConfigError("checkpoint.dir", d, f"an absolute path on a filesystem that all {nodes} nodes of the "
                          "cluster share", hint="every learner rank loads the checkpoint rank 0 resumes from")


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def deploy_reward_apps(cfg: RunConfig, run_id: str, deployed: list[str]) -> tuple[str | None, str | None]:
    """Deploy the run's reward apps and return (served app, score app), None for one the run does not use.
    Each app's name is appended to `deployed` as soon as it is up, so a failure later still takes it down."""
    from services.reward_serve import deployment
    from services.reward_serve.engine import DecoderSpec, RewardServiceSpec
    from services.runtime.components import reward_panel

    s = cfg.reward.served
    panel, kwargs = reward_panel(cfg)
    b = cfg.backbone
    device = "cuda" if s.num_gpus > 0 else "cpu"
    # Exactly the learner's VAE: build_components builds tiny models with their default seed, pretrained
    # ones from the same path and dtype.
    dec_kw = build_kwargs(tiny=b.tiny, path=b.pretrained, local_files_only=b.local_files_only, dtype=b.dtype,
                          device=device)
    dec = DecoderSpec(backbone=b.name, path=b.pretrained, tiny=b.tiny, kwargs=dec_kw)
    served_app = score_app = None
    if cfg.reward.placement == "served":
        decoder = dec if s.decode_on_reward_side else None
        served_app = f"reward-{run_id}"
        spec = RewardServiceSpec(panel=panel, reward_kwargs=kwargs, decoder=decoder, device=device, name=served_app,
                                 max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s)
        deployment.deploy(spec, app_name=served_app, route_prefix=f"/{served_app}", num_replicas=s.replicas,
                          num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=role_resources(cfg, "reward"))
        deployed.append(served_app)
    if learner_mod.eval_steps(cfg):
        score_app = f"score-{run_id}"
        spec = RewardServiceSpec(panel=panel, reward_kwargs=kwargs, decoder=None, device=device, name=score_app,
                                 max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s)
        deployment.deploy(spec, app_name=score_app, route_prefix=f"/{score_app}", num_replicas=1,
                          num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=role_resources(cfg, "reward"),
                          score_only=True)
        deployed.append(score_app)
    return served_app, score_app


def shutdown_reward_apps(names: list[str]) -> None:
    from services.reward_serve.deployment import shutdown_app

    for app in names:
        shutdown_app(app)
