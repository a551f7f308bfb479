"""``python -m train --plan``: a training step's peak GPU memory, predicted before launch.

The prediction runs the real step (the feature encoder, head, fused SGD and
:class:`train.step.TrainStep` that training builds) twice on fake tensors: FakeTensorMode
gives every op its output shape and dtype and allocates nothing, so no GPU is needed and a
million-class head costs no memory. A dispatch mode adds up the bytes of every tensor alive
after each op; the second (steady-state) step's peak, plus the state that lives across steps,
is what CUDA's ``max_memory_allocated`` measures, except for what a CPU run cannot show:
cuDNN workspaces and blocks the caching allocator keeps split. That remainder is one line,
fitted on two H200 measurements only (R50, B=384, k=2, bf16, N=93k: fc 14.58 GiB, attfc
19.34 GiB): a constant, plus a share of the class encoder's no-grad working set, whose
convolutions at B·k images are where cuDNN asks for the most workspace. The two 1M-class
measurements are held out; ``python -m bench.plan_error`` prints the error on all four.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from common.errors import UserError
from data_engine.loading.batch import Batch
from model.backbones import get_model
from model.heads import build_head, head_class
from model.margins import build_margin
from model.memory import saved_tensor_bytes
from train.config import margin_args, network_args
from train.host_memory import IMAGE_BYTES, host_memory
from train.step import TrainStep, make_optimizer

GIB = 2**30
# Fitted on the two 93k rows of BENCHMARKS.md's "Full training step" table (see the module
# docstring): fc gives the constant, attfc the class encoder's share.
OVERHEAD_BYTES = 0.2268 * GIB
CLASS_ENCODER_OVERHEAD = 0.6026


@dataclass(frozen=True)
class Plan:
    """Predicted peak and its parts, in bytes."""

    peak: int
    components: dict[str, int]


class _LiveBytes(TorchDispatchMode):
    """Bytes of the distinct storages alive after each op, and their peak."""

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = start

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, storage.nbytes()
            self.live += self.sizes[key]
        self.refs[key] += 1
        weakref.finalize(tensor, self._drop, key)

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        self.peak = max(self.peak, self.live)
        return out


def _fake_parameters(module: torch.nn.Module) -> None:
    """Replace meta parameters and buffers by fake CPU ones of the same shapes (inside a
    FakeTensorMode); ``to_empty`` cannot move meta storages to a fake device."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype),
                    requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def predict(config: dict[str, Any], num_classes: int, batch_size: int | None = None) -> Plan:
    """Peak GPU memory of one steady-state step of ``config`` (``precision`` auto: bf16)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c = config
    batch = batch_size or c["batch_size"]
    precision = "bf16" if c["precision"] == "auto" else c["precision"]
    with torch.device("meta"):
        backbone = get_model(c["network"], embedding_size=c["embedding_size"],
                             **network_args(c))
        margin = build_margin(c["margin"], s=c["margin_s"], m=c["margin_m"],
                              m1=c["margin_m1"], m2=c["margin_m2"], m3=c["margin_m3"],
                              **margin_args(c))
        head = build_head(c["head"], num_classes=num_classes,
                          embedding_size=c["embedding_size"], batch_size=batch, margin=margin,
                          feature_encoder=backbone, sample_rate=c["sample_rate"], k=c["k"],
                          class_encoder_momentum=c["gamma"], strategy=c["strategy"],
                          update_order=c["update_order"])
    backbone.activation_checkpointing = c["activation_checkpointing"]
    with FakeTensorMode():
        _fake_parameters(backbone)
        _fake_parameters(head)
        trained = [p for m in (backbone, head) for p in m.parameters() if p.requires_grad]
        optimizer = make_optimizer(trained, lr=c["lr"], momentum=c["momentum"],
                                   weight_decay=c["weight_decay"])
        step = TrainStep(backbone, head, optimizer, device="cpu", precision=precision,
                         channels_last=False, clip_grad_norm=c["clip_grad_norm"],
                         accumulate=c["accumulate"])
        classes = head.k if head.needs_class_images else 0
        fake_batch = Batch(
            identity=torch.empty(batch, 3, 112, 112, dtype=torch.uint8),
            classes=torch.empty(batch, classes, 3, 112, 112, dtype=torch.uint8),
            labels=torch.zeros(batch, dtype=torch.long),
            image_ids=torch.zeros(batch, dtype=torch.long),
            class_image_ids=torch.zeros(batch, classes, dtype=torch.long))
        images = IMAGE_BYTES * batch * (1 + classes)
        class_encoder = getattr(head, "class_encoder", torch.nn.Module())
        head_trained = [p for p in head.parameters() if p.requires_grad]
        head_own = [*(p for p in head.parameters() if p.requires_grad),
                    *(b for name, b in head.named_buffers() if not name.startswith("class_"))]
        state = {"feature_encoder_weights": _nbytes([*backbone.parameters(),
                                                     *backbone.buffers()]),
                 "feature_encoder_grads": _nbytes(p for p in backbone.parameters()
                                                  if p.requires_grad),
                 "optimizer_state": _nbytes(trained),
                 "class_encoder": _nbytes([*class_encoder.parameters(),
                                           *class_encoder.buffers()]),
                 "head_and_its_grad": _nbytes(head_own) + _nbytes(head_trained)}
        # Alive before the first step: everything but the gradients, plus the batch.
        resident = (sum(state.values()) - state["feature_encoder_grads"]
                    - _nbytes(head_trained) + images)
        class_live = _class_encoder_working_set(head)
        live = _LiveBytes(resident)
        with live:
            step(fake_batch, lr=0.1)  # the first step makes the gradients that stay
            live.peak = live.live
            step(fake_batch, lr=0.1)
        with step._autocast():
            saved, _ = saved_tensor_bytes(  # one micro-batch's
                lambda: backbone(torch.empty(batch // c["accumulate"], 3, 112, 112)),
                backbone.parameters())
    parts = dict(state)
    parts["activations"] = saved
    parts["class_encoder_working_set"] = class_live.peak_above_start
    parts["images"] = images
    parts["logits_and_other_transients"] = max(0, live.peak - sum(parts.values()))
    parts["cudnn_and_allocator"] = int(OVERHEAD_BYTES + CLASS_ENCODER_OVERHEAD
                                       * class_live.peak_above_start)
    return Plan(live.peak + parts["cudnn_and_allocator"], parts)


class _WorkingSet:
    peak_above_start = 0


def _class_encoder_working_set(head: torch.nn.Module) -> _WorkingSet:
    """Hooks that measure the class encoder's no-grad forward: peak bytes above its start."""
    result = _WorkingSet()
    encoder = getattr(head, "class_encoder", None)
    if encoder is None:
        return result
    inner = _LiveBytes()

    def begin(*_: Any) -> None:
        inner.__enter__()

    def end(*_: Any) -> None:
        inner.__exit__(None, None, None)
        result.peak_above_start = inner.peak

    encoder.register_forward_pre_hook(begin)
    encoder.register_forward_hook(end)
    return result


def largest_batch(config: dict[str, Any], num_classes: int, budget: int) -> int:
    """Largest B (a multiple of 8) whose predicted peak fits ``budget`` bytes: the peak is
    affine in B, read off two predictions, then checked once."""
    batch = config["batch_size"]
    high, low = predict(config, num_classes, batch).peak, predict(config, num_classes,
                                                                    batch // 2).peak
    per_sample = (high - low) / (batch - batch // 2)
    fixed = high - per_sample * batch
    guess = int((budget - fixed) / per_sample) // 8 * 8 if per_sample > 0 else batch
    while guess >= 8 and predict(config, num_classes, guess).peak > budget:
        guess -= 8
    return max(guess, 0)


def settings_that_fit(config: dict[str, Any], num_classes: int, budget: int
                      ) -> tuple[dict[str, Any], int] | None:
    """The first of: ``config`` as is, with activation checkpointing, then with it and
    ``--accumulate`` 2, 4, 8, ... (the batch stays B) whose predicted peak fits ``budget``
    bytes, with that peak; None when none does."""
    candidates = [config, {**config, "activation_checkpointing": True}]
    batch, micro = config["batch_size"], 2 * config["accumulate"]
    # adaface cannot accumulate; BatchNorm needs two samples per micro-batch
    while config["margin"] != "adaface" and micro <= batch // 2:
        if batch % micro == 0:
            candidates.append({**candidates[1], "accumulate": micro})
        micro *= 2
    for candidate in candidates:
        peak = predict(candidate, num_classes).peak
        if peak <= budget:
            return candidate, peak
    return None


def changes(config: dict[str, Any], fitted: dict[str, Any]) -> str:
    """The flags that turn ``config`` into ``fitted``."""
    flags = []
    if fitted["activation_checkpointing"] and not config["activation_checkpointing"]:
        flags.append("--activation-checkpointing")
    if fitted["accumulate"] != config["accumulate"]:
        flags.append(f"--accumulate {fitted['accumulate']}")
    return " ".join(flags)


def plan_report(config: dict[str, Any], num_classes: int, gpu_memory_gib: float | None
                ) -> dict[str, Any]:
    """The ``--plan --json`` object: peak and components in GiB, fits, a suggestion, and the
    data path's host memory."""
    plan = predict(config, num_classes)
    report: dict[str, Any] = {
        "network": config["network"], "head": config["head"], "num_classes": num_classes,
        "batch_size": config["batch_size"], "k": config["k"],
        "activation_checkpointing": config["activation_checkpointing"],
        "accumulate": config["accumulate"],
        "peak_gib": round(plan.peak / GIB, 2),
        "components": {name: round(value / GIB, 3) for name, value in plan.components.items()},
        "fits": None, "suggestion": None}
    classes = config["k"] if head_class(config["head"]).needs_class_images else 0
    host = host_memory(config, num_classes, config["batch_size"] * (1 + classes))
    report["host"] = {"components": {name: round(value / GIB, 3)
                                     for name, value in host["components"].items()},
                      "total_gib": round(sum(host["components"].values()) / GIB, 2),
                      "notes": host["notes"]}
    if gpu_memory_gib is None:
        return report
    budget = int(gpu_memory_gib * GIB)
    report["gpu_memory_gib"] = gpu_memory_gib
    report["fits"] = plan.peak <= budget
    if report["fits"]:
        return report
    found = settings_that_fit(config, num_classes, budget)
    if found is not None:
        report["suggestion"] = (f"{changes(config, found[0])} (predicted peak "
                                f"{found[1] / GIB:.2f} GiB)")
        return report
    checkpointed = {**config, "activation_checkpointing": True, "accumulate": 1}
    batch = largest_batch(checkpointed, num_classes, budget)
    report["suggestion"] = (f"--activation-checkpointing --batch-size {batch}" if batch else
                            "nothing fits: even B=8 exceeds --gpu-memory")
    return report


def fit_to_memory(config: dict[str, Any], num_classes: int, gpu_memory_gib: float
                  ) -> dict[str, Any]:
    """Training with ``--gpu-memory``: ``config`` as is when its predicted peak fits, else
    with activation checkpointing, then accumulation, as :func:`settings_that_fit` picks;
    otherwise a one-line error with the largest batch that would fit."""
    budget = int(gpu_memory_gib * GIB)
    found = settings_that_fit(config, num_classes, budget)
    if found is not None:
        return found[0]
    checkpointed = {**config, "activation_checkpointing": True, "accumulate": 1}
    batch = largest_batch(checkpointed, num_classes, budget)
    advice = (f"--batch-size {batch} fits with --activation-checkpointing" if batch
              else "even --batch-size 8 does not fit")
    raise UserError(f"--gpu-memory {gpu_memory_gib:g}: no checkpointing or accumulation "
                    f"makes the step fit; {advice} (python -m train --plan)")


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table ``--plan`` prints."""
    lines = [f"predicted peak GPU memory: {report['network']} + {report['head']}, "
             f"N={report['num_classes']:,}, B={report['batch_size']}, k={report['k']}"
             + (", activation checkpointing" if report["activation_checkpointing"] else "")]
    width = max(map(len, report["components"]))
    for name, gib in report["components"].items():
        lines.append(f"  {name:<{width}}  {gib:8.3f} GiB")
    lines.append(f"  {'peak':<{width}}  {report['peak_gib']:8.2f} GiB")
    host = report["host"]
    lines.append("predicted host memory of the data path (per training process):")
    width = max(map(len, host["components"]))
    for name, gib in host["components"].items():
        lines.append(f"  {name:<{width}}  {gib:8.3f} GiB")
    lines.append(f"  {'total':<{width}}  {host['total_gib']:8.2f} GiB")
    lines.extend(f"  ({note})" for note in host["notes"])
    if report["fits"] is not None:
        verdict = "fits" if report["fits"] else "does not fit"
        lines.append(f"{verdict} in {report['gpu_memory_gib']:g} GiB"
                     + (f"; suggestion: {report['suggestion']}" if report["suggestion"]
                        else ""))
    return "\n".join(lines)

