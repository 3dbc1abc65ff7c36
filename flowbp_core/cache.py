"""TrajectoryCache: what a no-grad rollout hands to the learner (through the Ray object store or HTTP).

It holds the noise z_0, the kept intermediate states z_i (1 <= i <= N-1), the kept velocities v_i (0 <= i <= N-1),
the float64 sigmas, the float32 final latent z_N, prompt conditioning and provenance (seed, policy_version).
States and velocities stay in the model dtype (bf16 on GPUs: 2N latents per sample, negligible); `final` is
float32 because the straight-through pin must reproduce it bitwise. The cache carries the `Plan` it was compacted
for, so the learner runs the plan its issuer sampled.

The wire format is safetensors: tensors under flat names, scalars and prompts in the string metadata, with a
`format_version` so that a reader can refuse what it does not understand. No pickle crosses a process boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from flowbp_core.plan import CacheNeeds, Plan
from flowbp_core.schedules import validate_sigmas
from flowbp_core.wire import read_metadata, read_views

__all__ = ["CacheNeeds", "TrajectoryCache", "cond_rows"]

FORMAT_VERSION = "1"
_SUPPORTED_VERSIONS = frozenset({"1"})


def cond_rows(cond: dict[str, torch.Tensor], start: int, end: int, batch: int) -> dict[str, torch.Tensor]:
    """Rows [start, end) of a batch-`batch` conditioning: tensors whose first dim is the batch are cut, the others
    (shared, e.g. one negative-prompt embedding) are kept whole."""
    return {k: (t[start:end] if t.dim() > 0 and t.shape[0] == batch else t) for k, t in cond.items()}


@dataclass(frozen=True, kw_only=True)
class TrajectoryCache:
    """One no-grad rollout of a batch, kept for the learner's surrogate (built by `sampling.rollout`).

    Attributes:
        noise (Tensor): z_0 [B, ...] in the state dtype.
        states (dict[int, Tensor]): kept intermediate states z_i [B, ...], 1 <= i <= N-1, state dtype.
        velocities (dict[int, Tensor]): kept velocities v_i [B, ...], 0 <= i <= N-1, state dtype.
        sigmas (Tensor): the schedule [N + 1], float64, from 1 down to 0.
        final (Tensor): z_N [B, ...], float32 (the straight-through pin reproduces it bitwise).
        plan (Plan | None): the plan the rollout was compacted for; the learner's endpoint runs it.
        seed (int): the noise seed of the step (DRaFT-LV's re-noising draws derive from it).
        policy_version (int): the learner version of the weights that sampled it.
        cond (dict[str, Tensor]): prompt conditioning; per-sample tensors [B, ...] or shared ones (any shape).
        prompts (list[str]): the B prompts.
        meta (dict[str, str]): provenance (step, worker, offset, batch_offset of a split).
    """

    noise: torch.Tensor
    states: dict[int, torch.Tensor]
    velocities: dict[int, torch.Tensor]
    sigmas: torch.Tensor
    final: torch.Tensor
    plan: Plan | None = None
    seed: int = 0
    policy_version: int = 0
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # normalised once here; the cache is frozen after construction
        setattr_ = object.__setattr__
        setattr_(self, "sigmas", torch.as_tensor(self.sigmas).to(torch.float64))
        validate_sigmas(self.sigmas.cpu())
        n = self.n_steps
        shape = tuple(self.noise.shape)
        if tuple(self.final.shape) != shape:
            raise ValueError(f"final has shape {tuple(self.final.shape)}, noise has {shape}: they must match")
        if self.final.dtype != torch.float32:
            raise ValueError(f"final must be float32 (the pin reproduces it bitwise), got {self.final.dtype}")
        if self.plan is not None and self.plan.n_steps != n:
            raise ValueError(f"plan is for N={self.plan.n_steps} steps, the cache has N={n}")
        setattr_(self, "states", {int(i): t for i, t in self.states.items()})
        setattr_(self, "velocities", {int(i): t for i, t in self.velocities.items()})
        for i, t in self.states.items():
            if not 1 <= i <= n - 1:
                raise ValueError(f"states key {i} out of range: cached states are z_1..z_{n - 1} (N={n})")
            if tuple(t.shape) != shape:
                raise ValueError(f"states[{i}] has shape {tuple(t.shape)}, expected {shape}")
        for i, t in self.velocities.items():
            if not 0 <= i <= n - 1:
                raise ValueError(f"velocities key {i} out of range: cached velocities are v_0..v_{n - 1} (N={n})")
            if tuple(t.shape) != shape:
                raise ValueError(f"velocities[{i}] has shape {tuple(t.shape)}, expected {shape}")
        if not self.prompts:
            setattr_(self, "prompts", [""] * self.batch_size)
        if len(self.prompts) != self.batch_size:
            raise ValueError(f"prompts has {len(self.prompts)} entries, batch size is {self.batch_size}")
        setattr_(self, "meta", {str(k): str(v) for k, v in self.meta.items()})

    # ---- shape -----------------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def batch_size(self) -> int:
        return int(self.noise.shape[0])

    @property
    def h(self) -> torch.Tensor:
        return self.sigmas[1:] - self.sigmas[:-1]

    # ---- access ----------------------------------------------------------------------------------------
    def state(self, i: int) -> torch.Tensor:
        """z_i: 0 -> noise, N -> final (float32), else the kept intermediate state (model dtype)."""
        n = self.n_steps
        if i == 0:
            return self.noise
        if i == n:
            return self.final
        if not 0 < i < n:
            raise IndexError(f"state index {i} out of range 0..{n}")
        try:
            return self.states[i]
        except KeyError:
            raise KeyError(
                f"state z_{i} was not kept in this cache (kept: {sorted(self.states)}); "
                "the rollout was compacted for a different plan"
            ) from None

    def velocity(self, i: int) -> torch.Tensor:
        n = self.n_steps
        if not 0 <= i < n:
            raise IndexError(f"velocity index {i} out of range 0..{n - 1}")
        try:
            return self.velocities[i]
        except KeyError:
            raise KeyError(
                f"velocity v_{i} was not kept in this cache (kept: {sorted(self.velocities)}); "
                "the rollout was compacted for a different plan"
            ) from None

    # ---- size, device, compaction ------------------------------------------------------------------------
    def _tensors(self) -> Iterable[torch.Tensor]:
        yield self.noise
        yield self.sigmas
        yield self.final
        yield from self.states.values()
        yield from self.velocities.values()
        yield from self.cond.values()

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self._tensors()))

    def _replace(self, **kw) -> "TrajectoryCache":
        d = dict(
            noise=self.noise,
            states=dict(self.states),
            velocities=dict(self.velocities),
            sigmas=self.sigmas,
            final=self.final,
            plan=self.plan,
            seed=self.seed,
            policy_version=self.policy_version,
            cond=dict(self.cond),
            prompts=list(self.prompts),
            meta=dict(self.meta),
        )
        d.update(kw)
        return TrajectoryCache(**d)

    def with_plan(self, plan: Plan) -> "TrajectoryCache":
        """This cache carrying `plan` (a full cache serves any plan; a compacted one only its own)."""
        return self._replace(plan=plan)

    def to(self, device: torch.device | str) -> "TrajectoryCache":
        """A copy on `device`; dtypes are kept (sigmas stay float64, final float32)."""
        return self._replace(
            noise=self.noise.to(device),
            states={i: t.to(device) for i, t in self.states.items()},
            velocities={i: t.to(device) for i, t in self.velocities.items()},
            sigmas=self.sigmas.to(device),
            final=self.final.to(device),
            cond={k: t.to(device) for k, t in self.cond.items()},
        )

    def compact(self, needs: CacheNeeds) -> "TrajectoryCache":
        """Keep only the states / velocities in `needs` (None = all). Asking for one this cache lacks is an error,
        because the method that reads it later would fail far from the cause."""
        states = self._select(self.states, needs.states, "states", lambda i: i == 0 or i == self.n_steps)
        vels = self._select(self.velocities, needs.velocities, "velocities", lambda i: False)
        return self._replace(states=states, velocities=vels)

    def _select(self, have: dict[int, torch.Tensor], want, name: str, implicit) -> dict[int, torch.Tensor]:
        if want is None:
            return dict(have)
        wanted = {i for i in want if not implicit(i)}
        missing = sorted(wanted - set(have))
        if missing:
            raise KeyError(f"compact: {name} {missing} are needed but not in this cache (kept: {sorted(have)})")
        return {i: have[i] for i in sorted(wanted)}

    def split(self, n: int) -> list["TrajectoryCache"]:
        """Split along the batch into chunks of at most `n` samples (torch.split semantics); see `rows`."""
        if n < 1:
            raise ValueError(f"split size n={n} must be >= 1")
        b = self.batch_size
        return [self.rows(start, min(start + n, b)) for start in range(0, b, n)]

    def rows(self, start: int, end: int) -> "TrajectoryCache":
        """Samples [start, end) of the batch (views). Cond tensors whose first dim equals the batch size are cut
        with it; others (shared, e.g. one negative-prompt embedding) are kept whole. meta["batch_offset"] records
        the rows' start."""
        b = self.batch_size
        if not 0 <= start < end <= b:
            raise ValueError(f"rows [{start}, {end}) of a batch of {b}: need 0 <= start < end <= {b}")
        sl = slice(start, end)
        meta = dict(self.meta)
        meta["batch_offset"] = str(int(self.meta.get("batch_offset", "0")) + start)
        return self._replace(
            noise=self.noise[sl],
            states={i: t[sl] for i, t in self.states.items()},
            velocities={i: t[sl] for i, t in self.velocities.items()},
            final=self.final[sl],
            cond=cond_rows(self.cond, start, end, b),
            prompts=self.prompts[sl],
            meta=meta,
        )

    # ---- wire format ---------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {
            "noise": self.noise,
            "sigmas": self.sigmas,
            "final": self.final,
        }
        for i, t in self.states.items():
            tensors[f"states.{i}"] = t
        for i, t in self.velocities.items():
            tensors[f"velocities.{i}"] = t
        for k, t in self.cond.items():
            tensors[f"cond.{k}"] = t
        # safetensors refuses shared or strided storage (split() views); one contiguous copy each.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        metadata = {
            "format_version": FORMAT_VERSION,
            "seed": str(int(self.seed)),
            "policy_version": str(int(self.policy_version)),
            "prompts": json.dumps(list(self.prompts)),
            "meta": json.dumps(dict(self.meta)),
        }
        if self.plan is not None:
            metadata["plan"] = self.plan.to_json()
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> "TrajectoryCache":
        """A cache with its own copies of the tensors in `data` (what `to_bytes` wrote)."""
        return cls._assemble(st_load(data), read_metadata(data))

    @classmethod
    def from_buffer(cls, buffer) -> "TrajectoryCache":
        """A cache whose tensors are read-only views into `buffer` (any buffer holding what `to_bytes` wrote, e.g.
        the numpy array `ray.get` maps from the object store; `flowbp_core.wire`): nothing is copied, and the
        tensors keep `buffer` alive. Never write into them."""
        return cls._assemble(*read_views(buffer))

    @classmethod
    def _assemble(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "TrajectoryCache":
        version = metadata.get("format_version")
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(
                f"TrajectoryCache format_version={version!r} is not supported "
                f"(supported: {sorted(_SUPPORTED_VERSIONS)})"
            )
        states, vels, cond = {}, {}, {}
        for k, t in tensors.items():
            if k.startswith("states."):
                states[int(k[len("states."):])] = t
            elif k.startswith("velocities."):
                vels[int(k[len("velocities."):])] = t
            elif k.startswith("cond."):
                cond[k[len("cond."):]] = t
        return cls(
            noise=tensors["noise"],
            states=states,
            velocities=vels,
            sigmas=tensors["sigmas"],
            final=tensors["final"],
            plan=Plan.from_json(metadata["plan"]) if "plan" in metadata else None,
            seed=int(metadata["seed"]),
            policy_version=int(metadata["policy_version"]),
            cond=cond,
            prompts=json.loads(metadata["prompts"]),
            meta=json.loads(metadata["meta"]),
        )

