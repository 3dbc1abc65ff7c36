"""The reward service's wire format: safetensors bytes with a version field, in both directions. Never pickle.

A request carries `input` [B, ...] (latents, or images in [0, 1]), the prompts, what the input is, and whether
the caller wants d reward / d input. A response carries `rewards` [B] (float32) and, when asked, `grad` shaped
like the input (float32). The same bytes go over HTTP (POST body / response body) and through a Serve handle.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

WIRE_VERSION = "1"
_SUPPORTED = frozenset({WIRE_VERSION})
INPUT_KINDS = ("latents", "images")
MEDIA_TYPE = "application/vnd.flowbp.safetensors"


class WireError(ValueError):
    """A payload that is not a reward request/response this version understands."""


def _metadata(data: bytes) -> dict[str, str]:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise WireError("payload is not a safetensors blob (shorter than its 8-byte header length)")
    (hlen,) = struct.unpack("<Q", bytes(data[:8]))
    if hlen > len(data) - 8:
        raise WireError("payload is not a safetensors blob (header length exceeds the data)")
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"payload header is not JSON: {e}") from None
    meta = dict(header.get("__metadata__", {}) or {})
    if meta.get("format_version") not in _SUPPORTED:
        raise WireError(
            f"format_version={meta.get('format_version')!r} is not supported (supported: {sorted(_SUPPORTED)})")
    return meta


def request_samples(data: bytes) -> int:
    """The samples a request carries (its `input`'s first dimension, read from the header alone); 1 for a payload
    that is not a request, which the batch then rejects with its reason."""
    try:
        (hlen,) = struct.unpack("<Q", bytes(data[:8]))
        shape = json.loads(bytes(data[8 : 8 + hlen]).decode("utf-8"))["input"]["shape"]
        return max(1, int(shape[0]))
    except (struct.error, TypeError, ValueError, KeyError, IndexError, UnicodeDecodeError):
        return 1


@dataclass(frozen=True, kw_only=True)
class RewardRequest:
    """One call to the reward service.

    Attributes:
        input (torch.Tensor): [B, ...] latents, or images [B, 3, H, W] in [0, 1] (`kind` says which).
        prompts (tuple[str, ...]): B prompts, one per input row.
        kind (str): "latents" (the service decodes them) or "images".
        want_grad (bool): whether the response carries d reward / d input.
    """

    input: torch.Tensor
    prompts: tuple[str, ...]
    kind: str = "latents"
    want_grad: bool = True

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise WireError(f"kind={self.kind!r} is not allowed: expected one of {list(INPUT_KINDS)}")
        if self.input.dim() < 2:
            raise WireError(f"input must be [B, ...], got shape {tuple(self.input.shape)}")
        if len(self.prompts) != self.input.shape[0]:
            raise WireError(f"{self.input.shape[0]} inputs but {len(self.prompts)} prompts")
        if self.kind == "images" and (self.input.dim() != 4 or self.input.shape[1] != 3):
            raise WireError(f"images must be [B, 3, H, W], got {tuple(self.input.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.input.shape[0])

    def to_bytes(self) -> bytes:
        meta = {"format_version": WIRE_VERSION, "type": "reward_request", "prompts": json.dumps(list(self.prompts)),
                "kind": self.kind, "want_grad": "1" if self.want_grad else "0"}
        return st_save({"input": self.input.detach().to("cpu", torch.float32).contiguous()}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RewardRequest":
        meta = _metadata(data)
        if meta.get("type") != "reward_request":
            raise WireError(f"expected a reward_request payload, got type={meta.get('type')!r}")
        tensors = st_load(bytes(data))
        if "input" not in tensors:
            raise WireError("reward_request has no 'input' tensor")
        return cls(input=tensors["input"], prompts=tuple(json.loads(meta["prompts"])),
                   kind=meta.get("kind", "latents"), want_grad=meta.get("want_grad", "1") == "1")


@dataclass(frozen=True, kw_only=True)
class RewardResponse:
    """The reward service's answer to one `RewardRequest`.

    Attributes:
        rewards (torch.Tensor): [B] float32, one reward per input row.
        grad (torch.Tensor | None): d reward / d input, shaped like the request's input (float32); None when the
            request did not want it.
        deployment (str): the name of the deployment that answered.
    """

    rewards: torch.Tensor
    grad: torch.Tensor | None
    deployment: str = ""

    def to_bytes(self) -> bytes:
        tensors = {"rewards": self.rewards.detach().to("cpu", torch.float32).contiguous()}
        if self.grad is not None:
            tensors["grad"] = self.grad.detach().to("cpu", torch.float32).contiguous()
        meta = {"format_version": WIRE_VERSION, "type": "reward_response", "deployment": self.deployment}
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RewardResponse":
        meta = _metadata(data)
        if meta.get("type") != "reward_response":
            raise WireError(f"expected a reward_response payload, got type={meta.get('type')!r}")
        tensors = st_load(bytes(data))
        return cls(rewards=tensors["rewards"], grad=tensors.get("grad"), deployment=meta.get("deployment", ""))
