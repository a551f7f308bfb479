"""The training loop: epochs of steps, with logging, validation, checkpoints and stopping.

Read top to bottom, :meth:`Trainer.fit` is the whole story; the helpers below it each do
one bookkeeping job. Progress is (epoch, step in epoch, global step); the loader restarts
from (epoch, step in epoch) and the learning rate is a function of the global step, so a
run resumed from a checkpoint takes exactly the steps the uninterrupted run would have.

Under torchrun every rank runs this same loop on its slice of each global batch, in
lockstep: the ranks agree on stopping after every step, rank 0 alone logs, validates (the
others wait) and writes the run folder, and a checkpoint holds the whole model whatever
the number of ranks, so a run resumes on another number of GPUs with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from common.errors import UserError
from common.files import write_atomic
from common.progress import Progress
from common.run_folder import BEST, CHECKPOINTS_DIR, MODEL, MODEL_INFO, VAL_KIND
from data_engine import build_loader
from data_engine.loading.integrity import check_shards
from data_engine.loading.loader import Loader
from model.backbones import get_model
from model.heads import build_head, head_class
from model.margins import build_margin
from model.weights import load_weights, read_state_dict
from train.checkpoint import (
    RunParts,
    atomic_save,
    check_resumable,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_state,
    save_state,
)
from train.config import margin_args, network_args
from train.distributed import (
    check_replicas,
    collective_failure,
    convert_sync_bn,
    init_world,
)
from train.image_stats import ImageStats
from train.metrics import MetricsLog, peak_memory_bytes, postfix
from train.prefetch import Prefetcher
from train.schedule import lr_at
from train.signals import StopRequest
from train.step import TrainStep, make_optimizer
from train.validate import Validator, synthetic_heldout

log = logging.getLogger("train")


@dataclass
class Position:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_total: int = 0
    best_val: float = -1.0


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU (CPU bf16 autocast is slower than fp32)."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    return precision


def _use_deterministic_kernels() -> None:
    """Same inputs, same bits on the same GPU: fixed cuDNN algorithms, cuBLAS with a fixed
    workspace, deterministic variants where torch has them (a warning names any op without
    one instead of stopping the run)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class Trainer:
    """Builds the model, head, optimizer and loader for one run directory and trains."""

    def __init__(self, config: dict[str, Any], *, resume: bool,
                 inject_nan: list[tuple[int, int]] | None = None) -> None:
        self.config = config
        self.inject_nan = inject_nan or []
        self.world, self.device = init_world(config["device"], config["dist_timeout"])
        self.global_batch = config["batch_size"] * self.world.world_size
        self.precision = resolve_precision(config["precision"], self.device)
        self.run_dir = Path(config["output"])
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        checkpoint = self._find_checkpoint(resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        seed = config["seed"]
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        if config["deterministic"]:
            _use_deterministic_kernels()
        elif self.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
        self.pos = Position()
        # Seconds now instead of a failed read hours in: sizes always, sha256s on request.
        self.dataset = check_shards(config["shards"], hashes=config["verify_shards"])
        # Each epoch's loader takes over its predecessor's decode workers.
        self.loader = self._make_loader(epoch=0, start_step=0, reuse=None)
        self.steps_per_epoch = len(self.loader)
        self.num_classes = self.loader.num_classes
        if self.steps_per_epoch == 0:
            ranks = f" x {self.world.world_size} ranks" if self.world.world_size > 1 else ""
            raise UserError(f"--shards {config['shards']}: {self.loader.num_images} images make "
                            f"no full batch of --batch-size {config['batch_size']}{ranks}")
        self.loader.start()
        self.total_steps = config["epochs"] * self.steps_per_epoch
        self.last_step = min(self.total_steps, config["max_steps"] or self.total_steps)

        self.backbone, self.head, self.optimizer = self._build_model(fresh=checkpoint is None)
        # Under torchrun the backbone's gradients are averaged over the ranks (also for one).
        self.ddp = DistributedDataParallel(
            self.backbone, device_ids=[self.world.local_rank] if self.device.startswith("cuda")
            else None) if self.world.launched else None
        self.image_stats = (ImageStats(self.loader.num_images, config["k"], self.device)
                            if self.head.needs_class_images else None)
        self.train_step = TrainStep(
            self.backbone, self.head, self.optimizer, device=self.device,
            precision=self.precision, channels_last=self.device.startswith("cuda"),
            compile_backbone=config["compile"], clip_grad_norm=config["clip_grad_norm"],
            image_stats=self.image_stats, forward_module=self.ddp,
            sum_over_ranks=self.world.sum if self.world.world_size > 1 else None,
            world_size=self.world.world_size,
            sharded=(self.head.weight,) if self.head.weight_rows is not None else (),
            accumulate=config["accumulate"])
        self.parts = RunParts(self.backbone, self.head, self.optimizer, self.train_step.scaler,
                              self.image_stats, self.world, self.device)
        if checkpoint is not None:
            self._restore(checkpoint)
        self.validator = self._validator() if self.world.is_main else None
        self.validates = self.world.broadcast(self.validator is not None)

        self.saved_at = self.pos.step  # the step of the newest checkpoint
        self.stopping = False  # a stop signal reached some rank: every rank stops
        self.tick, self.tick_step = time.perf_counter(), self.pos.step  # throughput since
        self.metrics = (MetricsLog(self.run_dir, tensorboard=config["tensorboard"],
                                   resume_step=self.pos.step) if self.world.is_main else None)
        self.progress = Progress(self.last_step - self.pos.step, "train", "step",
                                 tty=None if self.world.is_main else False)

    def _validator(self) -> Validator | None:
        val = self.config["val"]
        if val == "none":
            return None
        val_dir = (synthetic_heldout(Path(self.config["shards"]), self.run_dir) if val == "auto"
                   else Path(val))
        return Validator(val_dir, device=self.device) if val_dir is not None else None

    def _find_checkpoint(self, resume: bool) -> dict[str, Any] | None:
        if not resume:
            if list_checkpoints(self.ckpt_dir):
                raise UserError(f"--output {self.run_dir} already holds checkpoints: add "
                                "--resume to continue that run, or choose another --output")
            return None
        found = latest_checkpoint(self.ckpt_dir) if self.world.is_main else None
        path = self.world.broadcast(None if found is None else found[0])  # one file for all
        if path is None:
            raise UserError(f"--resume: no readable checkpoint in {self.ckpt_dir}")
        log.info("resuming from %s", path)
        return found[1] if found is not None else load_checkpoint(path)

    def _make_loader(self, *, epoch: int, start_step: int, reuse: Loader | None) -> Loader:
        """The epoch's loader, taking over ``reuse``'s pool of decode workers (the run has one,
        forked before the model touches CUDA, closed when fit ends)."""
        c = self.config
        k = c["k"] if head_class(c["head"]).needs_class_images else 0
        return build_loader(c["shards"], c["batch_size"], k, seed=c["seed"], epoch=epoch,
                            start_step=start_step, backend=c["backend"], device=self.device,
                            workers=c["workers"] or None,
                            local_ranks=self.world.local_world_size, skip_bad=c["skip_bad"],
                            reuse=reuse, rank=self.world.rank,
                            world_size=self.world.world_size)

    def _build_model(self, *, fresh: bool
                     ) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.SGD]:
        c = self.config
        try:
            backbone = get_model(c["network"], embedding_size=c["embedding_size"],
                                 **network_args(c))
        except TypeError as error:
            raise UserError(f"--network-args {c['network_args']}: {error}") from None
        backbone.activation_checkpointing = c["activation_checkpointing"]
        if c["init"] and fresh:  # before build_head: attfc's class encoder starts as a copy
            load_weights(backbone, read_state_dict(c["init"]), c["init"], c["network"])
            log.info("feature encoder initialised from %s", c["init"])
        if c["sync_bn"] and self.world.world_size > 1:
            backbone = convert_sync_bn(backbone)  # before build_head: attfc copies it
        backbone = backbone.to(self.device)
        if self.device.startswith("cuda"):
            # Before build_head: the attfc class encoder is a copy and inherits the layout.
            backbone = backbone.to(memory_format=torch.channels_last)
        try:
            margin = build_margin(c["margin"], s=c["margin_s"], m=c["margin_m"],
                                  m1=c["margin_m1"], m2=c["margin_m2"], m3=c["margin_m3"],
                                  **margin_args(c))
        except ValueError as error:
            raise UserError(f"--margin {c['margin']}: {error}") from None
        head = build_head(c["head"], num_classes=self.num_classes,
                          embedding_size=c["embedding_size"], batch_size=self.global_batch,
                          margin=margin,
                          feature_encoder=backbone,
                          sample_rate=c["sample_rate"], k=c["k"],
                          class_encoder_momentum=c["gamma"],
                          strategy=c["strategy"],
                          update_order=c["update_order"],
                          ranks=self.world.ranks).to(self.device)
        params = [p for module in (backbone, head) for p in module.parameters()
                  if p.requires_grad]
        optimizer = make_optimizer(params, lr=c["lr"], momentum=c["momentum"],
                                   weight_decay=c["weight_decay"])
        return backbone, head, optimizer

    def _restore(self, state: dict[str, Any]) -> None:
        c = self.config
        check_resumable(state, dataset=self.dataset, global_batch=self.global_batch,
                        world_size=self.world.world_size, batch_size=c["batch_size"],
                        shards=c["shards"], ckpt_dir=self.ckpt_dir)
        self.pos = Position(**state["position"])
        restore_state(self.parts, state)
        self.train_step.nonfinite_total.fill_(self.pos.nonfinite_total)

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> int:
        """Train until the last epoch, --max-steps or a stop signal; 0 on a clean finish.

        Under torchrun, a collective that fails because another rank died or hung ends this
        rank with one line saying so, instead of a traceback.
        """
        try:
            code = self._fit()
        except Exception as error:
            failure = collective_failure(error, self.world, self.config["dist_timeout"])
            if failure is None:
                raise
            raise failure from error
        self.world.close()
        return code

    def _fit(self) -> int:
        c = self.config
        log.info("%s %s on %s (%s): %d classes, %d steps/epoch, steps %d..%d of %d",
                 c["network"], c["head"], self.device, self.precision, self.num_classes,
                 self.steps_per_epoch, self.pos.step, self.last_step, self.total_steps)
        if c["accumulate"] > 1:
            log.info("each step: %d micro-batches of %d", c["accumulate"],
                     c["batch_size"] // c["accumulate"])
        if self.world.launched:
            log.info("%d ranks x --batch-size %d = global batch %d%s", self.world.world_size,
                     c["batch_size"], self.global_batch,
                     ", --sync-bn" if c["sync_bn"] and self.world.world_size > 1 else "")
        with StopRequest() as stop, self.metrics or contextlib.nullcontext(), self.loader, \
                self.progress:
            self.tick, self.tick_step = time.perf_counter(), self.pos.step
            while self.pos.step < self.last_step and not self._agree_to_stop(stop):
                if self._train_epoch(stop):
                    self.pos.epoch += 1
                    self.pos.step_in_epoch = 0
                    self._validate()
                    self._save()
                    self._export_model()
            if self.saved_at != self.pos.step:
                self._save()
            self._export_model()
        if not self.world.is_main:
            return 0
        if self.stopping:
            print(f"stopped by {stop.signal_name or 'a signal to another rank'} at step "
                  f"{self.pos.step}; resume with: python -m train --output {self.run_dir} "
                  "--resume", flush=True)
        else:
            log.info("finished at step %d; model: %s", self.pos.step,
                     self.run_dir / MODEL)
        return 0

    def _train_epoch(self, stop: StopRequest) -> bool:
        """Steps from the current position: True at the epoch's end, False when stopped
        early (--max-steps, a signal)."""
        c = self.config
        self.loader = loader = self._make_loader(epoch=self.pos.epoch,
                                                 start_step=self.pos.step_in_epoch,
                                                 reuse=self.loader)
        try:
            with (Prefetcher(loader, c["prefetch"]) if c["prefetch"]
                  else contextlib.nullcontext(loader)) as batches:
                for batch in batches:
                    self._run_step(batch)
                    self._agree_to_stop(stop)
                    if self.pos.step_in_epoch == self.steps_per_epoch:
                        return True  # the caller validates and checkpoints at the epoch end
                    if c["val_every"] and self.pos.step % c["val_every"] == 0:
                        self._validate()
                    if self.pos.step % c["ckpt_every"] == 0:
                        self._save()
                    if self.stopping or self.pos.step >= self.last_step:
                        return False
        finally:
            if loader.skipped:
                log.warning("--skip-bad: %d unreadable images replaced by others of their "
                            "identity in epoch %d", loader.skipped, self.pos.epoch + 1)
        return True  # a loader shorter than len() still ends the epoch

    def _run_step(self, batch: Any) -> None:
        c = self.config
        lr = lr_at(self.pos.step, total_steps=self.total_steps, base_lr=c["lr"],
                   warmup_steps=round(c["warmup_epochs"] * self.steps_per_epoch),
                   min_lr=c["min_lr"])
        stats = self.train_step(batch, lr, poison=self._poisoned(self.pos.step + 1))
        self.pos.step += 1
        self.pos.step_in_epoch += 1
        self.progress.update()
        if c["check_replicas"]:
            check_replicas(self._replicated(), self.world, self.pos.step)
        if self.pos.step % c["log_every"] == 0 or self.pos.step == self.last_step:
            self._log(lr, stats)

    def _agree_to_stop(self, stop: StopRequest) -> bool:
        """Whether a stop signal reached any rank: every rank stops after the same step."""
        self.stopping = self.world.any(stop.requested)
        return self.stopping

    def _poisoned(self, step: int) -> bool:
        return any(first <= step <= last for first, last in self.inject_nan)

    def _replicated(self) -> dict[str, torch.Tensor]:
        """What every rank must hold bit for bit after a step (--check-replicas): the
        weights, and attfc's container and class encoder. Without --sync-bn each rank's BN
        running statistics are its own, so buffers count only with it (or the container's)."""
        tensors = {f"backbone {name}": p for name, p in self.backbone.named_parameters()}
        for name, value in self.head.named_parameters():
            if not (name == "weight" and self.head.weight_rows is not None):
                tensors[f"head {name}"] = value
        for name, value in self.head.named_buffers():
            if self.config["sync_bn"] or not name.startswith("class_encoder."):
                tensors[f"head {name}"] = value
        if self.config["sync_bn"]:
            tensors.update({f"backbone {n}": b for n, b in self.backbone.named_buffers()})
        return tensors

    # -- bookkeeping (each of these syncs with the device, so they run only now and then) --

    def _check_finite(self) -> None:
        """Stop with the last good checkpoint once too many losses in a row were non-finite."""
        in_row = int(self.train_step.nonfinite_in_row)
        if in_row >= self.config["max_nonfinite"]:
            latest = list_checkpoints(self.ckpt_dir)
            kept = f"last good checkpoint: {latest[0]}" if latest else "no checkpoint yet"
            raise UserError(f"{in_row} non-finite losses in a row up to step {self.pos.step} "
                            f"(--max-nonfinite {self.config['max_nonfinite']}); {kept}; try a "
                            "lower --lr or --warmup-epochs, or check the data")

    def _log(self, lr: float, stats: dict[str, torch.Tensor]) -> None:
        """One metrics record and the progress postfix; throughput is since the last log."""
        self._check_finite()
        loss = self.train_step.read_loss()
        stats = self._stats_over_ranks(stats)
        if not self.world.is_main:
            return
        now = time.perf_counter()
        samples_per_s = (self.pos.step - self.tick_step) * self.global_batch / (now - self.tick)
        images_per_sample = 1 + self.config["k"] if self.head.needs_class_images else 1
        record = {
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "loss": loss if math.isfinite(loss) else None,  # None: every step was skipped
            "lr": lr,
            "samples_per_s": samples_per_s,
            "images_per_s": samples_per_s * images_per_sample,
            **{name: float(value) for name, value in stats.items()},
            "nonfinite_total": int(self.train_step.nonfinite_total),
            "mem_bytes": peak_memory_bytes(self.device),
            "global_batch": self.global_batch,
            # What --gpu-memory (or the flags) chose, beside the figures it shapes.
            "micro_batches": self.config["accumulate"],
            "activation_checkpointing": self.config["activation_checkpointing"],
        }
        self.metrics.write(record)
        self.progress.set_postfix(postfix(record, self.config["epochs"]))
        self.tick, self.tick_step = time.perf_counter(), self.pos.step

    def _stats_over_ranks(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The head's stats of the global batch: counts added over the ranks, the rest
        averaged (each rank's are of its equal share of samples)."""
        if self.world.world_size == 1:
            return stats
        summed = self.head.summed_stats
        return {name: self.world.sum(value.float()) / (
                1 if name in summed else self.world.world_size) for name, value in stats.items()}

    def _exclude_from_throughput(self, started: float) -> None:
        """Validation and checkpoints are not training: keep their time out of samples/s."""
        self.tick += time.perf_counter() - started

    def _validate(self) -> None:
        """Rank 0 validates; the other ranks wait for it."""
        if not self.validates:
            return
        started = time.perf_counter()
        if self.validator is not None:
            self._validate_here()
        self.world.wait_for_main()
        self._exclude_from_throughput(started)

    def _validate_here(self) -> None:
        results = self.validator(self.backbone)
        self.metrics.write({"step": self.pos.step, "epoch": self.pos.epoch, "kind": VAL_KIND,
                            **results}, prefix="val")
        if results["mean"] > self.pos.best_val:
            self.pos.best_val = results["mean"]
            atomic_save(self._backbone_weights(), self.run_dir / BEST)
            log.info("new best mean validation accuracy %.4f: %s", results["mean"],
                     self.run_dir / BEST)

    def _save(self) -> None:
        """A checkpoint of this step (all ranks take part; rank 0 writes)."""
        started = time.perf_counter()
        self._check_finite()
        self.pos.nonfinite_total = int(self.train_step.nonfinite_total)
        record = {"position": asdict(self.pos), "network": self.config["network"],
                  "dataset": self.dataset, "global_batch": self.global_batch}
        path = save_state(self.parts, record, ckpt_dir=self.ckpt_dir, run_dir=self.run_dir,
                          keep=self.config["keep"])
        self.saved_at = self.pos.step
        if path is None:
            return
        log.info("checkpoint %s", path)
        self._exclude_from_throughput(started)

    def _backbone_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies, so the file loads on machines without a GPU."""
        return {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}

    def _export_model(self) -> None:
        """RUN/model.pt (feature encoder, insightface key names) and RUN/model.json."""
        if not self.world.is_main:
            return
        atomic_save(self._backbone_weights(), self.run_dir / MODEL)
        info = {"network": self.config["network"],
                "embedding_size": self.config["embedding_size"],
                "network_args": network_args(self.config),
                "head": self.config["head"], "step": self.pos.step, "epoch": self.pos.epoch}
        write_atomic(self.run_dir / MODEL_INFO, (json.dumps(info, indent=1) + "\n").encode())
