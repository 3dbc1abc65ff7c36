"""Where the reward runs: the learner's `score(latents, prompts)` for each placement.

Everything else a worker holds (backbone, method, guidance, prompts, loss) comes from
`flowbp_core.run.build_components`, shared with the single-process loop, so a config means the same thing in
both. This module only adds the served placement, which needs Ray Serve and so cannot live in flowbp_core.
"""

from __future__ import annotations



from flowbp_core.config import RunConfig
from flowbp_core.step import ScoreFn



def reward_panel(cfg: RunConfig) -> tuple[tuple[tuple[str, float], ...], dict[str, dict]]:
    """The configured reward terms as ((name, weight), ...) and their constructor kwargs (for the service)."""
    return (tuple((t.name, float(t.weight)) for t in cfg.reward.terms),
            {t.name: dict(t.kwargs) for t in cfg.reward.terms})


def build_score(cfg: RunConfig, comp, served_app: str | None = None) -> tuple[ScoreFn, object | None]:
    """(score, client). colocated: reward(decode(z)) in the learner's graph (`comp.score_fn()`); served: the
    service returns r and dr/dinput and `served_reward` seeds the backward with them. With
    `reward.served.decode_on_reward_side` the latents are sent, otherwise the learner decodes and sends images."""
    if cfg.reward.placement == "colocated":
        return comp.score_fn(), None
    if served_app is None:
        raise ValueError("reward.placement='served' needs the reward app's name (the driver deploys it)")
    from services.reward_serve.client import ServedRewardClient

    s = cfg.reward.served
    kind = "latents" if s.decode_on_reward_side else "images"
    client = ServedRewardClient(served_app, kind=kind, retries=s.max_retries, timeout_s=s.request_timeout_s,
                                max_samples=s.max_batch_size)
    bb = comp.backbone
    if kind == "latents":
        return (lambda z, p: client(z, list(p))), client
    return (lambda z, p: client(bb.decode(z), list(p))), client
