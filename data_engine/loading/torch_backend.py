"""Torch backend: worker processes decode whole steps with simplejpeg into shared slots.

Why this shape: on a CPU loader the per-image overhead decides the rate, so
- a worker gets a whole step (all (k+1)·B ids) and decodes every JPEG straight into one
  batch buffer: no per-image tensors, no pickled pixels;
- the buffers are a fixed ring of shared-memory "slots" created once, so their pages stay
  mapped (fresh shared memory per batch costs ~40 µs of page faults per image here);
- a batch handed to the caller is a zero-copy view of its slot; the slot is reused only once
  the caller has dropped every view (reference count), and when the caller hoards batches
  the batch is copied out instead, so holding batches never stalls or corrupts the epoch.
  On CUDA the slots are pinned and copied to the GPU asynchronously;
- flips happen while decoding: a flipped image is decoded as BGR and each row's bytes are
  reversed, which mirrors the pixels and turns BGR back into RGB in one pass.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import traceback
from collections.abc import Iterator

import numpy as np
import torch
import torch.multiprocessing as mp

from data_engine.loading.batch import Batch, batch_from_pixels
from data_engine.loading.cpu_decode import decode_step
from data_engine.loading.epoch_plan import EpochPlan, StepPlan
from data_engine.loading.image_source import DataError, ImageSource

_POLL_S = 1.0  # how often the parent checks that workers are alive while it waits


def _worker(source: ImageSource, slots: list[torch.Tensor], tasks: mp.Queue,
            results: mp.Queue) -> None:
    """Decode (step, slot) tasks until a None arrives; report crashes instead of dying mute.

    Ctrl-C and SIGTERM are the parent's to handle (it stops the workers), so a training
    run that checkpoints on a signal is not hit by dying workers; a worker whose parent
    died (SIGKILL) notices and exits instead of waiting forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    arrays = [slot.numpy() for slot in slots]
    while True:
        try:
            task = tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        step, slot = task
        crashed = False
        try:
            replaced, error = decode_step(source, step, arrays[slot][:len(step.all_image_ids)])
        except Exception:  # anything but bad data is a bug: show the parent the traceback
            replaced, error, crashed = 0, traceback.format_exc(), True
        results.put((step.step, slot, replaced, error, crashed))


class _Slot:
    """One shared batch buffer and who is using it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.tensor = _shared_uint8(shape)
        self.array = self.tensor.numpy()
        self.idle_refs = sys.getrefcount(self.array)
        self.ready_event: torch.cuda.Event | None = None  # set while a GPU copy reads it
        self.pinned = False

    def pin(self) -> None:
        """Page-lock for async host-to-GPU copies (after forking: CUDA marks pinned pages
        do-not-fork, and the workers must see them)."""
        torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.tensor.numel(), 0)
        self.pinned = True

    def unpin(self) -> None:
        if self.pinned:
            if self.ready_event is not None:
                self.ready_event.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False

    def free(self) -> bool:
        """True once no caller view and no pending GPU copy uses the buffer."""
        if self.ready_event is not None:
            if not self.ready_event.query():
                return False
            self.ready_event = None
        return sys.getrefcount(self.array) <= self.idle_refs


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor in shared memory, visible to workers forked or spawned after it."""
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    # Touch every page now, once: first writes to shared memory fault page by page (~40 µs
    # per image), which would otherwise land on the workers during the first ring turn.
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape).zero_()


class TorchBatches:
    """Runs the worker pool for one pass over the epoch and yields :class:`Batch` objects."""

    def __init__(self, plan: EpochPlan, source: ImageSource, *, device: str,
                 workers: int) -> None:
        self.plan = plan
        self.source = source
        self.device = torch.device(device)
        self.workers = workers

    def run(self, start_step: int) -> Iterator[tuple[Batch, int]]:
        """(batch, images replaced in it) for each step from ``start_step``."""
        if self.workers == 0:
            yield from self._run_inline(start_step)
            return
        size = self.source.image_size
        shape = ((self.plan.k + 1) * self.plan.batch_size, size, size, 3)
        depth = self.workers + 2  # steps in flight: every worker busy, the next ones queued
        slots = [_Slot(shape) for _ in range(depth + 2)]
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        tasks, results = ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(self.source, [s.tensor for s in slots], tasks, results))
                 for _ in range(self.workers)]
        for proc in procs:
            proc.start()
        if self.device.type == "cuda":
            for slot in slots:
                slot.pin()
        steps = self.plan.steps(start_step)
        busy: set[int] = set()  # slots of steps dispatched and not yet handed out
        done: dict[int, tuple] = {}  # step -> (slot, replaced, error, crashed)
        try:
            for step in self.plan.steps(start_step):
                while len(busy) < depth and self._dispatch(steps, slots, busy, tasks):
                    pass
                while step.step not in done:
                    got = self._receive(results, procs)
                    done[got[0]] = got[1:]
                slot_index, replaced, error, crashed = done.pop(step.step)
                if crashed:
                    raise RuntimeError(f"decode worker crashed:\n{error}")
                if error is not None:
                    raise DataError(error)
                busy.discard(slot_index)
                yield self._hand_out(step, slots, slot_index, busy), replaced
        finally:
            for _ in procs:
                tasks.put(None)
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
            for slot in slots:
                slot.unpin()

    @staticmethod
    def _dispatch(steps: Iterator[StepPlan], slots: list[_Slot], busy: set[int],
                  tasks: mp.Queue) -> bool:
        """Send the next step to the workers if a slot is free; False when none is."""
        for index, slot in enumerate(slots):
            if index not in busy and slot.free():
                step = next(steps, None)
                if step is None:
                    return False
                busy.add(index)
                tasks.put((step, index))
                return True
        return False

    @staticmethod
    def _receive(results: mp.Queue, procs: list) -> tuple[int, int, int, str | None, bool]:
        """Next finished task; a dead worker is an error, not a hang."""
        while True:
            try:
                return results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p.exitcode for p in procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a decode worker exited (code {dead[0]})") from None

    def _hand_out(self, step: StepPlan, slots: list[_Slot], index: int,
                  busy: set[int]) -> Batch:
        """The step's batch: a view of its slot, a GPU copy, or a CPU copy when slots run low."""
        slot = slots[index]
        pixels = torch.from_numpy(slot.array[:len(step.all_image_ids)])
        if self.device.type == "cuda":
            batch = batch_from_pixels(step, pixels, self.device)
            slot.ready_event = torch.cuda.Event()
            slot.ready_event.record()
            return batch
        held = sum(1 for i, s in enumerate(slots)
                   if i != index and i not in busy and not s.free())
        if held >= 2:  # more than a loop's previous batch is kept: copy, the ring keeps turning
            pixels = pixels.clone()
        return batch_from_pixels(step, pixels, self.device)

    def _run_inline(self, start_step: int) -> Iterator[tuple[Batch, int]]:
        """No worker processes (workers=0): decode in this process, for debugging."""
        size = self.source.image_size
        for step in self.plan.steps(start_step):
            pixels = torch.empty((len(step.all_image_ids), size, size, 3), dtype=torch.uint8)
            replaced, error = decode_step(self.source, step, pixels.numpy())
            if error is not None:
                raise DataError(error)
            yield batch_from_pixels(step, pixels, self.device), replaced
