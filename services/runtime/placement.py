"""Where each role's actors run: the custom resource of its worker group, and the driver's own node.

The Helm chart starts each worker group with one unit of `flowbp_<role>` a pod (`rayStartParams.resources`).
With `runtime.role_resources` on, every rollout worker, learner rank and reward replica asks for a small share of
its role's unit, so it can only land on its role's pods while GPUs and CPUs, not the share, bound how many fit on
one pod. The autoscaler reads the same request to pick the group a pending actor scales up.
"""

from __future__ import annotations

from flowbp_core.config import RunConfig

ROLES = ("rollout", "learner", "reward")
# At most 1 / ROLE_SHARE actors of a role on one pod; a pod's GPUs and CPUs bind long before that.
ROLE_SHARE = 0.001


def role_resource(role: str) -> str:
    """The custom resource the chart gives the pods of `role`'s worker group."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    return f"flowbp_{role}"


def role_resources(cfg: RunConfig, role: str) -> dict[str, float]:
    """The custom resources one actor of `role` requests: its group's share when `runtime.role_resources`, else none."""
    return {role_resource(role): ROLE_SHARE} if cfg.runtime.role_resources else {}


def role_gpus(cfg: RunConfig, role: str) -> float:
    """The GPUs one actor of `role` requests (the one place each role's GPU count is read): a rollout worker
    `runtime.rollout_gpus` and a learner rank `runtime.learner_gpus` on a `use_gpu` run (none otherwise), a
    reward replica `reward.served.num_gpus`. Fractions let several roles share one card."""
    rt = cfg.runtime
    amounts = {"rollout": rt.rollout_gpus if rt.use_gpu else 0.0, "learner": rt.learner_gpus if rt.use_gpu else 0.0,
               "reward": cfg.reward.served.num_gpus}
    if role not in amounts:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    return float(amounts[role])


def on_this_node():
    """A scheduling strategy that keeps an actor on the caller's node (and fails rather than move it elsewhere)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
