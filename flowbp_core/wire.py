"""Safetensors blobs read in place: each tensor a view into the buffer that holds the blob, nothing copied.

A reader gets such a buffer from Ray's object store (`ray.get` of a numpy uint8 array maps the object read-only
from shared memory), so a cache or a weights bucket is read without the two copies `ray.get` of `bytes` plus
`safetensors.torch.load` make. Safetensors writes the header padded to 8 bytes and the tensors in decreasing
dtype size, so every view is aligned. The views keep the buffer alive and must never be written.
"""

from __future__ import annotations

import json
import math
import struct
import warnings

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(data) -> tuple[dict, int]:
    """A safetensors blob's JSON header and where its data starts: 8-byte little-endian header length, then the
    header."""
    if len(data) < 8:
        raise ValueError("not a safetensors blob: shorter than its 8-byte header length")
    (hlen,) = struct.unpack("<Q", bytes(data[:8]))
    if hlen > len(data) - 8:
        raise ValueError("not a safetensors blob: header length exceeds the data")
    return json.loads(bytes(data[8 : 8 + hlen]).decode("utf-8")), 8 + hlen


def read_metadata(data) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob."""
    return dict(read_header(data)[0].get("__metadata__", {}))


def read_views(buffer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors as read-only views into `buffer`, metadata) of the safetensors blob `buffer` holds."""
    mv = memoryview(buffer).cast("B")
    header, start = read_header(mv)
    tensors = {}
    with warnings.catch_warnings():  # torch warns that a read-only buffer gives a tensor it must not write
        warnings.simplefilter("ignore", UserWarning)
        for name, spec in header.items():
            if name != "__metadata__":
                tensors[name] = _view(mv, start, name, spec)
    return tensors, dict(header.get("__metadata__", {}))


def _view(mv: memoryview, start: int, name: str, spec: dict) -> torch.Tensor:
    """Tensor `name` as a view into `mv` (the blob's data starts at byte `start`)."""
    if spec.get("dtype") not in _DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {spec.get('dtype')!r}, readable: {sorted(_DTYPES)}")
    dtype, shape = _DTYPES[spec["dtype"]], tuple(spec["shape"])
    a, b = spec["data_offsets"]
    count = math.prod(shape)
    if not 0 <= a <= b <= len(mv) - start or b - a != count * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: data_offsets {[a, b]} do not hold {shape} {spec['dtype']} within "
                         f"the blob's {len(mv) - start} data bytes")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mv, dtype=dtype, count=count, offset=start + a).view(shape)
