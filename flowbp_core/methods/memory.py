"""Count the bytes autograd saves for backward (activations), the memory a learner step holds until backward.

Parameters (and views of them) are excluded: they exist anyway and would otherwise appear or not depending on
whether a layer's input requires grad. Each storage is counted once.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")


def saved_tensor_bytes(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, T]:
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
