"""One training step (forward, backward, optimizer, momentum update) with no host syncs.

Everything that would need the CPU to wait for the GPU (reading the loss, checking it is
finite, counting skipped steps) stays on the device here; the loop reads it back only at
log steps, so the GPU never idles while Python waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common.device import apply_tf32_policy
from model.backbones import normalize_images
from train.embedding_spread import embedding_spread
from train.image_stats import ImageStats

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def make_optimizer(params: list[nn.Parameter], *, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.SGD:
    """Fused SGD with zeroed momentum buffers.

    Fused SGD takes a device-side ``found_inf`` flag and skips the update on the device,
    which is how a non-finite loss is skipped without a sync. Zeroed buffers make the
    first step the same as torch's (``buf = grad``) and keep a skipped first step harmless.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                fused=True)
    for param in params:
        optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


class BufferRollback:
    """Puts a module's buffers (BatchNorm running statistics) back as they were before a
    step whose loss turned out non-finite, on the device (no host sync).

    Per dtype the buffers have two flat twins: :meth:`save` is one fused copy into the
    first; :meth:`restore_unless` a fused copy of the step's values into the second, one
    ``where`` between the two, and one fused copy back.
    """

    def __init__(self, module: nn.Module) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in module.buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        self.groups = [(buffers, _flat_twin(buffers), _flat_twin(buffers))
                       for buffers in by_dtype.values()]

    def save(self) -> None:
        for buffers, (_, saved), _ in self.groups:
            torch._foreach_copy_(saved, buffers)

    def restore(self) -> None:
        """Put back what :meth:`save` took, whatever happened since."""
        for buffers, (_, saved), _ in self.groups:
            torch._foreach_copy_(buffers, saved)

    def restore_unless(self, finite: torch.Tensor) -> None:
        """Keep the step's buffers where ``finite`` (a device bool), else the saved ones."""
        for buffers, (saved_flat, _), (now_flat, now) in self.groups:
            torch._foreach_copy_(now, buffers)
            torch.where(finite, now_flat, saved_flat, out=now_flat)
            torch._foreach_copy_(buffers, now)


def _flat_twin(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One flat tensor of the tensors' total size, and its views shaped like each of them."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype,
                       device=tensors[0].device)
    return flat, [view.view(t.shape) for view, t in
                  zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


class TrainStep:
    """Owns the precision policy and the skip/count logic for non-finite losses."""

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer: torch.optim.SGD, *,
                 device: str, precision: str, channels_last: bool,
                 compile_backbone: bool = False, clip_grad_norm: float = 0.0,
                 image_stats: ImageStats | None = None, forward_module: nn.Module | None = None,
                 sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 world_size: int = 1, sharded: tuple[nn.Parameter, ...] = (),
                 accumulate: int = 1) -> None:
        """``forward_module``: what runs the backbone (its DistributedDataParallel wrapper
        under torchrun); ``sum_over_ranks`` (several ranks): all-reduce, so that a non-finite
        loss on any rank skips the step on all; ``sharded``: parameters split over the ranks
        (a model-parallel head), whose share of the gradient norm is summed over them;
        ``accumulate``: micro-batches per step (gradient accumulation), which must divide
        the batch."""
        self.backbone = backbone
        self.sum_over_ranks = sum_over_ranks
        self.world_size = world_size
        self.sharded = sharded
        self.clip_grad_norm = clip_grad_norm
        self.image_stats = image_stats
        self.head = head
        self.optimizer = optimizer
        self.device_type = torch.device(device).type
        self.dtype = AUTOCAST_DTYPES[precision]
        self.channels_last = channels_last
        forward_module = backbone if forward_module is None else forward_module
        self.forward_module = forward_module
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.accumulate = accumulate
        self.forward_backbone = (torch.compile(forward_module) if compile_backbone
                                 else forward_module)
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        apply_tf32_policy()
        self.buffers = BufferRollback(backbone)
        self.nonfinite_in_row = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.finite_steps = torch.zeros((), dtype=torch.int64, device=device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def _inputs(self, batch: Any, poison: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's identity and class images, normalised into the compute dtype."""
        dtype = self.dtype or torch.float32  # the compute dtype: autocast has nothing to cast
        images = normalize_images(batch.identity, dtype)
        if poison:  # the --inject-nan-at-step test hook: a forward gone non-finite
            images.fill_(float("nan"))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        class_images = (normalize_images(batch.classes, dtype) if self.head.needs_class_images
                        else None)
        return images, class_images

    def __call__(self, batch: Any, lr: float, poison: bool = False) -> dict[str, torch.Tensor]:
        """Train on one batch; returns the head's stats (device tensors, not read back)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.buffers.save()
        if self.accumulate > 1:
            return self._accumulated(batch, poison)
        images, class_images = self._inputs(batch, poison)
        with self._autocast():
            features = self.forward_backbone(images)
            out = self.head(features, batch.labels, class_images)
        out.stats.update(embedding_spread(features, batch.labels))
        loss = out.loss.float()
        reported = loss.detach()
        if self.sum_over_ranks is not None:  # the global batch's mean loss, NaN if any is
            reported = self.sum_over_ranks(reported) / self.world_size
        finite = torch.isfinite(reported)

        if out.class_scores is not None and self.image_stats is not None:
            self.image_stats.add(batch.class_image_ids, *out.class_scores, counted=finite)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._update(finite, reported)
        return out.stats

    def _update(self, finite: torch.Tensor, reported: torch.Tensor) -> None:
        """The optimizer step from the summed gradients (skipped when not ``finite``), the
        head's momentum update and the loss counters."""
        if self.clip_grad_norm:
            self._clip()
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on inf/nan grads, on the device
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            del self.optimizer.found_inf
        self.buffers.restore_unless(finite)  # before attfc copies them into its class encoder
        self.head.after_optimizer_step(self.backbone)

        self.nonfinite_in_row = torch.where(finite, 0, self.nonfinite_in_row + 1)
        self.nonfinite_total += (~finite).long()
        self.loss_sum += torch.where(finite, reported, 0).double()
        self.finite_steps += finite.long()

    def _accumulated(self, batch: Any, poison: bool) -> dict[str, torch.Tensor]:
        """One optimizer step over the batch taken as ``accumulate`` equal micro-batches.

        Each micro-batch's mean loss counts 1/N, so the gradients add up to those of the
        whole batch's mean loss; the head sees the whole batch's labels first (Partial FC's
        one sample, attfc's one push) and, when it stages features, every micro-batch's
        features before any loss. Under DDP the gradients are all-reduced once, with the
        last micro-batch's backward.
        """
        parts = micro_batches(batch, self.accumulate)
        self.head.begin_step(batch.labels)
        if self.head.stages_features:
            self._stage(parts, poison)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=batch.labels.device)
        stats: list[dict[str, torch.Tensor]] = []
        batch_features = []
        scores = []  # each micro-batch's class-image scores, added once the step is known good
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            images, class_images = self._inputs(part, poison)
            with self._no_sync() if not last else contextlib.nullcontext():
                with self._autocast():
                    features = self.forward_backbone(images)
                    out = self.head(features, part.labels, class_images)
                loss = (out.loss / self.accumulate).float()
                self.scaler.scale(loss).backward()
            total += loss.detach()
            stats.append(out.stats)
            batch_features.append(features.detach())
            if out.class_scores is not None and self.image_stats is not None:
                scores.append((part.class_image_ids, out.class_scores))
        self.head.end_step()
        reported = total
        if self.sum_over_ranks is not None:  # the global batch's mean loss, NaN if any is
            reported = self.sum_over_ranks(reported) / self.world_size
        finite = torch.isfinite(reported)
        for ids, (alpha, cos) in scores:
            self.image_stats.add(ids, alpha, cos, counted=finite)
        self._update(finite, reported)
        return {**combine_stats(stats, self.head.summed_stats),
                **embedding_spread(torch.cat(batch_features), batch.labels)}

    @torch.no_grad()
    def _stage(self, parts: list[Any], poison: bool) -> None:
        """The features of every micro-batch for the head, without gradient, before any
        loss; BatchNorm uses each micro-batch's statistics as the training forward will,
        and its running statistics are put back as the step's start saved them (the
        training forwards update them)."""
        for part in parts:
            images, class_images = self._inputs(part, poison)
            with self._autocast():
                self.head.stage(self.backbone(images), part.labels, class_images)
        self.buffers.restore()

    def _no_sync(self) -> contextlib.AbstractContextManager:
        """DDP: keep this backward's gradients local (the last micro-batch's all-reduces)."""
        no_sync = getattr(self.forward_module, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def _clip(self) -> None:
        """Scale all gradients so their global L2 norm is at most ``clip_grad_norm``.

        Norm of the true gradients (unscaled first under fp16); no host sync: a non-finite
        norm makes the gradients non-finite, and that step is skipped anyway.
        """
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if not self.sharded or self.sum_over_ranks is None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
            return
        # Each rank holds other rows of a split head: their squared norms add up over ranks.
        split = {id(p) for p in self.sharded}
        whole = [p.grad for p in params if id(p) not in split]
        parts = [p.grad for p in params if id(p) in split]
        norm = torch.nn.utils.get_total_norm
        squared = norm(whole, foreach=True) ** 2 + self.sum_over_ranks(
            norm(parts, foreach=True) ** 2)
        torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_norm, squared.sqrt(),
                                             foreach=True)

    def read_loss(self) -> float:
        """Mean finite loss since the last call (syncs: call at log steps only)."""
        steps = int(self.finite_steps)
        mean = float(self.loss_sum) / steps if steps else float("nan")
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        return mean


def micro_batches(batch: Any, count: int) -> list[Any]:
    """``batch`` (an object whose attributes are all per-sample tensors, such as a
    :class:`~data_engine.loading.batch.Batch`) as ``count`` equal consecutive parts."""
    size = batch.labels.shape[0]
    if size % count:
        raise ValueError(f"a batch of {size} does not split into {count} equal micro-batches")
    step = size // count
    return [type(batch)(**{name: value[i:i + step] for name, value in vars(batch).items()})
            for i in range(0, size, step)]


def combine_stats(stats: list[dict[str, torch.Tensor]], summed: tuple[str, ...]
                  ) -> dict[str, torch.Tensor]:
    """The micro-batches' stats as the whole batch's: counts named in ``summed`` added, the
    rest (means over equal micro-batches) averaged."""
    return {name: sum(s[name] for s in stats) / (1 if name in summed else len(stats))
            for name in stats[0]}
