"""Bytes autograd keeps for backward, counted as it saves them: what the activation part of a
step's GPU memory is, measured on the real modules (on real or fake tensors)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_tensor_bytes(run: Callable[[], Any], parameters: Iterable[torch.Tensor] = ()
                       ) -> tuple[int, Any]:
    """(bytes of the distinct storages autograd saves while ``run()`` executes, its result).

    Each storage counts once however many ops save it (or views of it); the ``parameters``'
    own storages are not activations and are left out (an autocast copy of a weight is not
    a parameter and counts). Works under FakeTensorMode, where nothing is allocated.
    """
    skip = {_storage_key(p) for p in parameters}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in skip:
            seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(seen.values()), result


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
