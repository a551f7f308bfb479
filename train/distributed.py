"""Several processes, one run: the world torchrun describes, and what the loop needs of it.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT) starts one process per GPU. Each takes ``cuda:LOCAL_RANK`` and joins an NCCL
group (gloo on the CPU); host-side agreements (stop requests, waiting for rank 0) go over a
gloo group, so they never queue behind GPU work. Without those variables the run is one
process and nothing here touches torch.distributed: a plain ``python -m train`` is the
one-GPU program, unchanged.

Every collective waits at most ``--dist-timeout`` seconds: a rank that died or hangs makes
the others stop with an error instead of waiting forever.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.device import resolve_device
from common.errors import UserError
from model.heads import Ranks

log = logging.getLogger("train")

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How gloo and NCCL word a peer that vanished or stalled, where they raise a RuntimeError.
_COLLECTIVE_WORDS = ("gloo", "Gloo", "NCCL", "Connection", "connection", "timed out",
                     "Timed out", "Timeout")


@dataclass
class World:
    """This process's place in the run; the defaults are the single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # under torchrun: a process group exists (also for world size 1)
    control: Any = None  # gloo group for host-side flags; None: the default group

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates and writes the run folder."""
        return self.rank == 0

    @property
    def ranks(self) -> Ranks | None:
        """What the heads get: None on one process, so they run their one-process code."""
        return Ranks(self.rank, self.world_size) if self.world_size > 1 else None

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (a stop request): they agree."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (on this rank's device) summed over the ranks, as a new tensor."""
        total = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(total)
        return total

    def wait_for_main(self) -> None:
        """Hold the other ranks while rank 0 works alone (validation, writing files)."""
        if self.world_size > 1:
            dist.barrier(group=self.control)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()


def launch_rank() -> int:
    """RANK from the launcher, 0 without one (read before torch.distributed is set up)."""
    return int(os.environ.get("RANK", "0"))


def init_world(device: str, timeout_s: float) -> tuple[World, str]:
    """Join the run torchrun started, if any -> (world, this process's device)."""
    if not all(name in os.environ for name in _LAUNCH_VARIABLES):
        resolved = resolve_device(device)
        if resolved.startswith("cuda:"):  # calls that name no device go to it, not to GPU 0
            torch.cuda.set_device(resolved)
        return World(), resolved
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        if resolved != "cuda":
            raise UserError(f"--device {device}: under torchrun each process takes "
                            "cuda:LOCAL_RANK; use --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: this machine has "
                            f"{torch.cuda.device_count()} GPUs; start at most that many "
                            "processes per node (--nproc_per_node)")
        resolved = f"cuda:{local_rank}"
        torch.cuda.set_device(resolved)
    timeout = timedelta(seconds=timeout_s)
    backend = "nccl" if resolved.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timeout,
                            device_id=torch.device(resolved) if backend == "nccl" else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    if rank != 0:  # one voice in the terminal: the other ranks report only warnings
        logging.getLogger().setLevel(logging.WARNING)
    return World(rank, world_size, local_rank, local_world, True, control), resolved


def collective_failure(error: BaseException, world: World, timeout_s: float) -> UserError | None:
    """The one-line error for a collective that failed because another rank died or hung."""
    if world.world_size == 1 or not isinstance(error, RuntimeError):
        return None
    if not isinstance(error, dist.DistError) and not any(
            word in str(error) for word in _COLLECTIVE_WORDS):
        return None  # another failure (a decode worker, a bug): reported as it is
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"rank {world.rank}: a collective with the other ranks failed ({first}); "
                     f"another rank died or was stuck for over --dist-timeout {timeout_s:g} s: "
                     "see its log, then continue with --resume")


# -- --sync-bn ----------------------------------------------------------------------------


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Batch norm over every rank's samples, forward and backward as nn.BatchNorm computes
    them on one batch, with the per-channel sums all-reduced."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 in: fp32 math
        mean = _all_sum(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _all_sum((centred * centred).sum(dims)) / count
        invstd = torch.rsqrt(var + eps)
        xhat = centred.mul_(invstd.view(shape))
        out = xhat if weight is None else torch.addcmul(bias.view(shape), xhat,
                                                        weight.view(shape))
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.meta = dims, shape, count
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _mean: torch.Tensor, _var: torch.Tensor):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, count = ctx.meta
        grad_out = grad_out.to(xhat.dtype)
        local = torch.stack([grad_out.sum(dims), (grad_out * xhat).sum(dims)])
        total = _all_sum(local) / count  # mean of dy and of dy·x̂ over the global batch
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad_out - total[0].view(shape)).sub_(xhat * total[1].view(shape))
        grad_x.mul_(scale.view(shape))
        # This rank's part of the affine gradients; DDP averages them like every other.
        has_affine = weight is not None
        return (grad_x, local[1] if has_affine else None, local[0] if has_affine else None,
                None)


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.contiguous().clone()
    dist.all_reduce(total)
    return total


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of every rank's samples (``--sync-bn``).

    torch's SyncBatchNorm runs on CUDA only; this one runs wherever the process group does
    (gloo on the CPU too), so the tests check the very code a GPU run uses. The forward
    all-reduces two per-channel sums (mean, then the variance of the centred values), the
    backward two more (the means of dy and dy·x̂), the quantities one batch norm over the
    whole global batch uses. Same parameters, buffers and state-dict keys as
    nn.BatchNorm1d/2d, and the plain one in eval mode and on a single process. Every rank
    must pass the same batch size.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        out, mean, var = _GlobalBatchNormFunction.apply(
            input, self.weight if self.affine else None, self.bias if self.affine else None,
            self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                count = input.numel() // input.shape[1] * dist.get_world_size()
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * (count / max(count - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(input.dtype)


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlobalBatchNorm` holding
    the same weights and statistics (call before building the head: attfc copies it)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, GlobalBatchNorm):
        like = next(t for t in (*module.parameters(), *module.buffers())
                    if t.is_floating_point())
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum,
                                    module.affine, module.track_running_stats,
                                    device=like.device, dtype=like.dtype)
        converted.load_state_dict(module.state_dict())
        if module.affine:
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child))
    return module


# -- checks -------------------------------------------------------------------------------


def digest(tensor: torch.Tensor) -> torch.Tensor:
    """An int64 fingerprint of ``tensor``'s exact bits and their order (any one change of
    one element changes it): compares replicas without moving them."""
    bits = tensor.detach().contiguous().reshape(-1)
    if bits.is_floating_point():
        bits = bits.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()])
    bits = bits.long()
    weights = torch.arange(bits.numel(), device=bits.device) % 1_000_003 + 1
    return (bits * weights).sum().reshape(1)


def check_replicas(tensors: dict[str, torch.Tensor], world: World, step: int) -> None:
    """Stop with an error naming the first of ``tensors`` that differs between ranks."""
    if world.world_size == 1:
        return
    mine = torch.cat([digest(t).cpu() for t in tensors.values()])
    everyone = [torch.empty_like(mine) for _ in range(world.world_size)]
    dist.all_gather(everyone, mine, group=world.control)
    for rank, theirs in enumerate(everyone):
        for name, a, b in zip(tensors, mine.tolist(), theirs.tolist(), strict=True):
            if a != b:
                raise UserError(f"--check-replicas: after step {step}, {name} on rank {rank} "
                                f"differs from rank {world.rank}'s")
