"""What the three diffusers families share: the prompt cache, the guided velocity, trainable weights, export,
loading checks. A family subclass only says how its transformer is called (`_forward`), how latents decode,
what its schedule is, and how it loads from a pipeline.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from flowbp_core.backbones import lora as lora_mod
from flowbp_core.backbones.base import BackbonePreset, LoRAConfig, TextEncoder
from flowbp_core.errors import ConfigError
from flowbp_core.guidance import GuidanceConfig, guided_velocity
from flowbp_core.schedules import Schedule

def match_batch(t: torch.Tensor | None, batch: int, what: str) -> torch.Tensor | None:
    """Conditioning of batch Bc for states of batch B: equal, broadcast from 1, or tiled when B = k * Bc
    (sample b uses the prompt b % Bc: the layout of methods that repeat the batch, e.g. DRaFT-LV)."""
    if t is None or t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    if batch % t.shape[0] == 0:
        return t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1)))
    raise ValueError(f"cond[{what!r}] has batch {t.shape[0]} but the state has batch {batch}: expected equal "
                     "batches, a batch-1 (shared) condition, or a state batch that is a multiple of it")


SETTINGS_FILE = "flowbp_backbone.json"


def saved_settings(path: str | os.PathLike) -> dict[str, Any]:
    """Constructor keywords stored by `save_pretrained` (image size, preset, negative prompt), so a saved
    backbone loads back as it was; {} for hub ids and folders written by other tools."""
    f = Path(str(path)).expanduser() / SETTINGS_FILE
    if not f.is_file():
        return {}
    s = json.loads(f.read_text())
    preset = BackbonePreset(s["method_preset"], int(s["n_steps"]), GuidanceConfig(**s["guidance"]),
                            int(s["resolution"]))
    return {"preset": preset, "height": int(s["height"]), "width": int(s["width"]),
            "negative_prompt": s["negative_prompt"]}


def check_pipeline_source(path: str | os.PathLike, expected: tuple[str, ...], family: str,
                          local_files_only: bool) -> dict:
    """Fail early, saying what was expected, when `path` is missing or holds another kind of model.

    Returns the pipeline's model_index config (which names its class and components).
    """
    from diffusers import DiffusionPipeline

    p = str(path)
    looks_local = os.path.isabs(p) or p.startswith((".", "~")) or os.path.exists(p) or p.count("/") != 1
    if looks_local:
        folder = Path(p).expanduser()
        if not folder.exists():
            raise FileNotFoundError(
                f"{family} checkpoint {p!r} does not exist: expected a local diffusers pipeline folder "
                f"(holding model_index.json of a {' or '.join(expected)}) or a hub id such as "
                f"'org/model' available in the local Hugging Face cache")
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{family} checkpoint folder {p!r} has no model_index.json: expected a diffusers pipeline folder "
                f"of a {' or '.join(expected)} (as written by save_pretrained)")
        cfg = json.loads((folder / "model_index.json").read_text())
    else:
        try:
            cfg = DiffusionPipeline.load_config(p, local_files_only=local_files_only)
        except Exception as e:  # noqa: BLE001 - the hub client raises several types; the message is what matters
            raise FileNotFoundError(
                f"{family} checkpoint {p!r} could not be read ({type(e).__name__}: {e}). Expected a hub id of a "
                f"{' or '.join(expected)} in the local cache (local_files_only={local_files_only}) or a folder"
            ) from e
    found = cfg.get("_class_name")
    if found not in expected:
        raise ConfigError("backbone.path", p, f"a {' or '.join(expected)} checkpoint for backbone {family!r}",
                          hint=f"model_index.json says {found!r}")
    return cfg


class NoTextEncoder:
    """Stands in for the text encoders of a role whose conditioning comes in the caches (a learner)."""

    def __init__(self, owner: str):
        self.owner = owner

    def encode(self, prompts: list[str]):
        raise RuntimeError(f"{self.owner} holds no text encoder in this role (its prompt embeddings come in the "
                           f"rollout's cache); asked to encode {len(prompts)} prompt(s)")


def text_encoder_for(owner: str, load: bool, build: Callable[[], TextEncoder],
                     seed: int | None = None) -> TextEncoder:
    """`build()` (the family's text encoders), or a `NoTextEncoder` when `load` is false: a learner's
    conditioning comes in the caches, so T5-XXL and the CLIPs are never built there. `build` runs on a forked
    random stream (seeded with `seed` when given), so the weights drawn after it (a tiny transformer, the LoRA
    init) are the same whether or not the encoders were built."""
    if not load:
        return NoTextEncoder(owner)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build()


def text_components(names: tuple[str, ...], load: bool) -> dict[str, None]:
    """`from_pretrained` keywords that skip the pipeline's text encoders and tokenizers when `load` is false."""
    return {} if load else {n: None for n in names}


class DiffusersBackbone:
    """Base of the diffusers adapters (see module docstring). Not registered itself."""

    name = "base"
    pipeline_class_name = ""
    default_lora_targets: tuple[str, ...] = ()
    supports_distilled_guidance = False

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module | None, text_encoder: TextEncoder,
                 *, preset: BackbonePreset, negative_prompt: str = "", prompt_cache_size: int = 1024,
                 height: int | None = None, width: int | None = None):
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"text_encoder must have encode(prompts) -> (states, pooled); got {type(text_encoder)}")
        self.transformer = transformer.eval()
        self.vae = None if vae is None else vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.preset = preset
        self.height = self.width = preset.resolution
        if height is not None or width is not None:
            self.set_image_size(height or width, width or height)
        self.negative_prompt = negative_prompt
        self.prompt_cache_size = int(prompt_cache_size)
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._lora_cfg: LoRAConfig | None = None
        # no-grad true CFG runs both branches as one doubled batch (as the diffusers pipelines do)
        self.batch_cfg = True
        self.transformer.requires_grad_(True)  # full fine-tuning unless apply_lora / freeze says otherwise

    # ------------------------------------------------------------------------------------------ family hooks
    def _forward(self, x: torch.Tensor, sigma: float, states: torch.Tensor, pooled: torch.Tensor | None,
                 distilled_scale: float | None) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def schedule(self, n_steps: int | None = None) -> Schedule:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pipeline(self, scheduler=None):
        """The equivalent diffusers pipeline sharing this backbone's modules (for saving and for checks)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------------- sizes
    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE downsampling x the transformer's 2x2 patches."""
        raise NotImplementedError

    def set_image_size(self, height: int, width: int | None = None) -> None:
        """Generate `height` x `width` images (each a multiple of `size_multiple`)."""
        width = height if width is None else width
        for field, v in (("backbone.height", height), ("backbone.width", width)):
            if not isinstance(v, int) or v < self.size_multiple or v % self.size_multiple:
                raise ConfigError(field, v, f"a positive multiple of {self.size_multiple} for backbone {self.name!r}")
        self.height, self.width = height, width

    @property
    def resolution(self) -> int:
        return self.height

    def _latent_hw(self, factor: int) -> tuple[int, int]:
        return self.height // factor, self.width // factor

    # ------------------------------------------------------------------------------------------------ devices
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for n, p in self.transformer.named_parameters() if "lora_" not in n).dtype

    def to(self, device: torch.device | str) -> "DiffusersBackbone":
        self.transformer.to(device)
        if self.vae is not None:
            self.vae.to(device)
        for m in getattr(self.text_encoder, "components", lambda: {})().values():
            if isinstance(m, torch.nn.Module):
                m.to(device)
        self._prompt_cache.clear()
        return self

    def cast(self, dtype: torch.dtype) -> "DiffusersBackbone":
        """Cast every module to `dtype` (LoRA weights stay float32)."""
        mods = [self.transformer, self.vae, *getattr(self.text_encoder, "components", lambda: {})().values()]
        for m in mods:
            # diffusers warns on every dtype cast; skip the ones that change nothing
            if isinstance(m, torch.nn.Module) and any(p.dtype != dtype for p in m.parameters()):
                m.to(dtype)
        for n, p in self.transformer.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        self._prompt_cache.clear()
        return self

    # ------------------------------------------------------------------------------------------------ prompts
    def _encode_cached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if todo:
            states, pooled = self.text_encoder.encode(todo)
            for i, p in enumerate(todo):
                self._prompt_cache[p] = (states[i:i + 1].detach(), None if pooled is None else pooled[i:i + 1].detach())
        for p in prompts:
            self._prompt_cache.move_to_end(p)
        rows = [self._prompt_cache[p] for p in prompts]
        while len(self._prompt_cache) > max(self.prompt_cache_size, len(set(prompts))):
            self._prompt_cache.popitem(last=False)
        states = torch.cat([r[0] for r in rows]).to(self.device, self.dtype)
        pooled = None if rows[0][1] is None else torch.cat([r[1] for r in rows]).to(self.device, self.dtype)
        return states, pooled

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning for `prompts` (cached per prompt string). The negative prompt's embedding is included,
        shared with batch 1, when the default guidance is true CFG."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode_prompts takes a non-empty list of prompt strings")
        states, pooled = self._encode_cached(list(prompts))
        cond = {"prompt_embeds": states}
        if pooled is not None:
            cond["pooled"] = pooled
        if self.preset.guidance.mode == "true":
            cond.update(self._negative_cond())
        return cond

    def _negative_cond(self) -> dict[str, torch.Tensor]:
        states, pooled = self._encode_cached([self.negative_prompt])
        out = {"neg_prompt_embeds": states}
        if pooled is not None:
            out["neg_pooled"] = pooled
        return out

    # ----------------------------------------------------------------------------------------------- velocity
    def velocity(self, x: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor],
                 guidance: GuidanceConfig | None = None) -> torch.Tensor:
        g = guidance or self.preset.guidance
        if g.mode == "distilled" and not self.supports_distilled_guidance:
            raise ConfigError("guidance.mode", g.mode, f"'true' or 'none' for backbone {self.name!r}",
                              hint="this model has no guidance embedding")

        def branch_cond(branch: str, b: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
            if branch == "cond":
                states, pooled = cond["prompt_embeds"], cond.get("pooled")
            else:
                neg = cond if "neg_prompt_embeds" in cond else self._negative_cond()
                states, pooled = neg["neg_prompt_embeds"], neg.get("neg_pooled")
            states = match_batch(states, b, "prompt_embeds").to(device, self.dtype)
            pooled = None if pooled is None else match_batch(pooled, b, "pooled").to(device, self.dtype)
            return states, pooled

        def forward(xx: torch.Tensor, branch: str, distilled_scale: float | None) -> torch.Tensor:
            states, pooled = branch_cond(branch, xx.shape[0], xx.device)
            return self._forward(xx, float(sigma), states, pooled, distilled_scale)

        def forward_pair(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            b = xx.shape[0]
            (sc, pc), (sn, pn) = branch_cond("cond", b, xx.device), branch_cond("neg", b, xx.device)
            if sc.shape[1:] != sn.shape[1:]:  # different token counts: cannot share a batch
                return forward(xx, "cond", None), forward(xx, "neg", None)
            pooled = None if pc is None else torch.cat([pc, pn])
            v = self._forward(torch.cat([xx, xx]), float(sigma), torch.cat([sc, sn]), pooled, None)
            return v[:b], v[b:]

        return guided_velocity(forward, x, g, forward_pair if self.batch_cfg else None)

    def bind(self, cond: dict[str, torch.Tensor],
             guidance: GuidanceConfig | None = None) -> Callable[[torch.Tensor, float], torch.Tensor]:
        g = guidance or self.preset.guidance

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return self.velocity(x, sigma, cond, g)

        return velocity

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    # ------------------------------------------------------------------------------------- trainable weights
    @property
    def finetune_mode(self) -> str:
        if self._lora_cfg is not None:
            return "lora"
        return "full" if any(p.requires_grad for p in self.transformer.parameters()) else "frozen"

    def apply_lora(self, cfg: LoRAConfig | None = None) -> list[str]:
        cfg = cfg or LoRAConfig()
        names = lora_mod.apply_lora(self.transformer, cfg, self.default_lora_targets)
        self._lora_cfg = cfg
        return names

    def merged_lora(self, cfg: LoRAConfig) -> lora_mod.MergedLoRA:
        """Freeze this adapter-free backbone and return what folds a synced adapter state of `cfg` into its
        weights (`MergedLoRA.load`): a rollout worker samples on merged weights, never through adapters."""
        if self._lora_cfg is not None:
            raise ValueError("merged_lora needs a backbone without a LoRA adapter (build it with trainable=False)")
        self.freeze()
        return lora_mod.MergedLoRA(self.transformer, cfg, self.default_lora_targets)

    def enable_full_finetune(self) -> None:
        if self._lora_cfg is not None:
            raise ValueError("this backbone carries a LoRA adapter; build a fresh one for full fine-tuning")
        self.transformer.requires_grad_(True)

    def freeze(self) -> None:
        self.transformer.requires_grad_(False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(lora_mod.trainable_named(self.transformer).values())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return lora_mod.trainable_state(self.transformer)

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        lora_mod.load_trainable(self.transformer, sd)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.transformer.disable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------ persistence
    def export(self, path: str | os.PathLike) -> Any:
        """LoRA -> diffusers `load_lora_weights` file; full -> transformer `save_pretrained` (see export.py)."""
        from flowbp_core.export import export_backbone

        return export_backbone(self, path)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the whole model as a diffusers pipeline folder (loadable by `from_pretrained` offline)."""
        if self._lora_cfg is not None:
            raise ValueError("save_pretrained writes the base model; use export(path) for the LoRA adapter")
        pipe = self.pipeline()
        pipe.save_pretrained(str(path))
        g = self.preset.guidance
        settings = {"backbone": self.name, "height": self.height, "width": self.width,
                    "negative_prompt": self.negative_prompt, "method_preset": self.preset.method_preset,
                    "n_steps": self.preset.n_steps, "resolution": self.preset.resolution,
                    "guidance": {"mode": g.mode, "scale": g.scale, "detach_negative": g.detach_negative}}
        (Path(path) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        return Path(path)

    def _pipeline_components(self) -> dict:
        comps = getattr(self.text_encoder, "components", None)
        if comps is None or self.vae is None:
            raise ValueError(f"{type(self).__name__} was built with a custom text encoder or without a VAE, so it "
                             "is not a diffusers pipeline; export(path) saves its transformer")
        return comps()
