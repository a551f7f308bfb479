"""Activation checkpointing of a feature encoder's segments (iresnet stages, MobileFaceNet
blocks): only each segment's input is kept for backward, its inside is recomputed there.

Non-reentrant ``torch.utils.checkpoint``: gradients are those of the plain forward. The
recomputation runs BatchNorm in training mode a second time, which would move the running
statistics twice per step; they are put back after it, so a checkpointed step leaves the
same buffers as a plain one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_segment(segment: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``segment(x)``, checkpointed when asked and autograd records (not in the no-grad
    class encoder, which saves nothing anyway)."""
    if not (checkpointed and torch.is_grad_enabled()):
        return segment(x)
    return checkpoint(segment, x, use_reentrant=False,
                      context_fn=partial(_contexts, segment))


def _contexts(segment: nn.Module) -> tuple[contextlib.AbstractContextManager,
                                           contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _batch_norm_buffers_kept(segment)


@contextlib.contextmanager
def _batch_norm_buffers_kept(segment: nn.Module) -> Iterator[None]:
    """Running mean/var and batch counts of ``segment``'s BatchNorms as they were on entry."""
    buffers = [buffer for module in segment.modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm)
               for buffer in module.buffers()]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:  # the recomputation stops by raising once it has what backward needs
        if buffers:
            torch._foreach_copy_(buffers, saved)
