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
  reversed, which mirrors the pixels and turns BGR back into RGB in one pass;
- the workers and the pinned slots are kept for the whole run: the pool starts on the first
  pass and later epochs' passes reuse it (:meth:`TorchBatches.run` takes the epoch's plan).
  Forking and page-locking once per run, not once per epoch, means no fork of a process
  with live CUDA work and no register/unregister churn at each epoch boundary.

Every raw CUDA runtime call (cudaHostRegister/Unregister) goes through
:func:`checked_cuda_call`: an unchecked failure leaves CUDA's last-error flag set, and the
next kernel launch anywhere reports it as a misleading error ("invalid argument").
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from common.errors import UserError, first_line
from common.worker_tasks import start_workers, tasks_until_done
from data_engine.loading.batch import Batch, batch_from_pixels
from data_engine.loading.cpu_decode import decode_step
from data_engine.loading.epoch_plan import EpochPlan, StepPlan
from data_engine.loading.image_source import DataError, ImageSource

_POLL_S = 1.0  # how often the parent checks that workers are alive while it waits
_SHM = "/dev/shm"  # where torch's shared memory lives (shm_open)


class CudaCallError(RuntimeError):
    """A CUDA runtime call returned an error code; the message names the call."""


def checked_cuda_call(runtime: Any, name: str, *args: Any) -> None:
    """Call ``runtime.<name>(*args)`` and raise :class:`CudaCallError` at once if it fails.

    ``runtime`` is ``torch.cuda.cudart()`` or a ctypes handle on libcudart: both return a
    ``cudaError_t`` (0 = success) instead of raising, so a failure would otherwise surface
    later, at an unrelated kernel.
    """
    status = getattr(runtime, name)(*args)
    code = int(status)
    if code != 0:
        shown = ", ".join(hex(a) if isinstance(a, int) and a > 4096 else repr(a) for a in args)
        raise CudaCallError(f"{name}({shown}) failed: CUDA error {code} "
                            f"({_error_text(runtime, status)})")


def _error_text(runtime: Any, status: Any) -> str:
    """CUDA's own description of an error code (cudaGetErrorString)."""
    text = runtime.cudaGetErrorString(status)
    return text.decode() if isinstance(text, bytes) else str(text)


def _worker(source: ImageSource, slots: list[torch.Tensor], tasks: mp.Queue,
            results: mp.Queue) -> None:
    """Decode (step, slot) tasks until a None arrives; report crashes instead of dying mute.

    Ctrl-C and SIGTERM are the parent's to handle (it stops the workers), so a training
    run that checkpoints on a signal is not hit by dying workers; a worker whose parent
    died (SIGKILL) notices and exits instead of waiting forever. A worker never touches
    CUDA (a forked child cannot), only numpy views of the shared slots.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    arrays = [slot.numpy() for slot in slots]
    for step, slot in tasks_until_done(tasks, _POLL_S):
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
        checked_cuda_call(torch.cuda.cudart(), "cudaHostRegister", self.tensor.data_ptr(),
                          self.tensor.numel(), 0)
        self.pinned = True

    def unpin(self) -> None:
        if self.pinned:
            if self.ready_event is not None:
                self.ready_event.synchronize()
                self.ready_event = None
            self.pinned = False  # whatever the call says: never unregister twice
            checked_cuda_call(torch.cuda.cudart(), "cudaHostUnregister", self.tensor.data_ptr())

    def free(self) -> bool:
        """True once no caller view and no pending GPU copy uses the buffer."""
        if self.ready_event is not None:
            if not self.ready_event.query():
                return False
            self.ready_event = None
        return sys.getrefcount(self.array) <= self.idle_refs


def _no_shared_memory(error: RuntimeError, count: int, nbytes: int) -> UserError:
    """The one line for a /dev/shm too small for the slot ring (a container's default is
    64 MB): what it needs, what is free, and the two ways out."""
    try:
        stat = os.statvfs(_SHM)
        free = f"{stat.f_bavail * stat.f_frsize / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return UserError(f"{_SHM}: no room for the torch loader's {count} batch buffers "
                     f"({count * nbytes / 2**20:.1f} MiB, {free}; {first_line(error)}); "
                     f"pass fewer --workers (each adds a buffer of {nbytes / 2**20:.1f} MiB) "
                     "or give the container more shared memory (docker run --shm-size 2g)")


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor in shared memory, visible to workers forked or spawned after it."""
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    # Touch every page now, once: first writes to shared memory fault page by page (~40 µs
    # per image), which would otherwise land on the workers during the first ring turn.
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape).zero_()


class _Pool:
    """Worker processes, their task and result queues and the slot ring: one run's worth."""

    def __init__(self, source: ImageSource, shape: tuple[int, ...], workers: int, count: int,
                 gpu: torch.device | None) -> None:
        self.shape = shape
        self.depth = count - 2  # steps in flight; the other two slots are the caller's
        try:
            self.slots = [_Slot(shape) for _ in range(count)]
        except RuntimeError as error:  # torch's words for a full /dev/shm
            if "shared memory" not in str(error):
                raise
            raise _no_shared_memory(error, count, int(np.prod(shape))) from None
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(source, [s.tensor for s in self.slots], self.tasks,
                                        self.results))
                      for _ in range(workers)]
        self.outstanding = 0  # tasks sent whose result has not been received
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.tasks, self.slots,
                                           gpu)
        start_workers(self.procs)
        if gpu is not None:
            try:
                with torch.cuda.device(gpu):  # else CUDA opens a context on GPU 0 for this
                    for slot in self.slots:
                        slot.pin()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._finalizer()

    def send(self, step: StepPlan, slot: int) -> None:
        self.tasks.put((step, slot))
        self.outstanding += 1

    def receive(self) -> tuple[int, int, int, str | None, bool]:
        """Next finished task; a dead worker is an error, not a hang."""
        while True:
            try:
                got = self.results.get(timeout=_POLL_S)
                self.outstanding -= 1
                return got
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a decode worker exited (code {dead[0]})") from None

    def drain(self) -> None:
        """Wait for the tasks still in flight, so the next pass starts with idle slots."""
        while self.outstanding:
            self.receive()


def _shutdown(procs: list, tasks: mp.Queue, slots: list[_Slot],
              gpu: torch.device | None) -> None:
    """Stop the workers, then unpin the slots (also when the pool is garbage-collected)."""
    for proc in procs:
        if proc.is_alive():
            tasks.put(None)
    for proc in procs:
        if proc.pid is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if gpu is not None:
        with torch.cuda.device(gpu):
            for slot in slots:
                slot.unpin()


class TorchBatches:
    """Yields :class:`Batch` objects for one epoch per :meth:`run`, from a pool kept across
    runs (every epoch of a training run) until :meth:`close`."""

    def __init__(self, source: ImageSource, *, device: str, workers: int, slots: int) -> None:
        self.source = source
        self.device = torch.device(device)
        self.workers = workers
        self.slots = slots
        self._pool: _Pool | None = None
        self._passing = False  # a pass is under way: the pool serves one at a time

    def close(self) -> None:
        """Stop the workers and unpin the slots; a later :meth:`run` starts a new pool."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def start(self, plan: EpochPlan) -> None:
        """Fork the workers now (before the caller initialises CUDA, ideally) rather than on
        the first pass."""
        if self.workers:
            self._pool_for(plan)

    def worker_pids(self) -> list[int]:
        """PIDs of the live pool's workers ([] before the first pass or after close)."""
        return [p.pid for p in self._pool.procs] if self._pool is not None else []

    def _pool_for(self, plan: EpochPlan) -> _Pool:
        size = self.source.image_size
        shape = ((plan.k + 1) * plan.batch_size, size, size, 3)
        if self._pool is not None and self._pool.shape != shape:
            self.close()  # another batch shape: the slots do not fit
        if self._pool is None:
            gpu = self.device if self.device.type == "cuda" else None
            self._pool = _Pool(self.source, shape, self.workers, self.slots, gpu)
        return self._pool

    def run(self, plan: EpochPlan, start_step: int) -> Iterator[tuple[Batch, int]]:
        """(batch, images replaced in it) for each step of ``plan`` from ``start_step``.

        On CUDA the iterating thread (often a prefetch thread) is switched to our GPU first:
        the current device is per thread, and GPU 0 in a new one whatever the main thread set.
        """
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.workers == 0:
            yield from self._run_inline(plan, start_step)
            return
        if self._passing:
            raise RuntimeError("the torch backend's workers serve one pass at a time: close "
                               "or exhaust the previous epoch's iterator first")
        pool = self._pool_for(plan)
        slots = pool.slots
        self._passing = True
        steps = plan.steps(start_step)
        busy: set[int] = set()  # slots of steps dispatched and not yet handed out
        done: dict[int, tuple] = {}  # step -> (slot, replaced, error, crashed)
        try:
            for step in plan.steps(start_step):
                while len(busy) < pool.depth and self._dispatch(pool, steps, busy):
                    pass
                while step.step not in done:
                    got = pool.receive()
                    done[got[0]] = got[1:]
                slot_index, replaced, error, crashed = done.pop(step.step)
                if crashed:
                    raise RuntimeError(f"decode worker crashed:\n{error}")
                if error is not None:
                    raise DataError(error)
                busy.discard(slot_index)
                yield self._hand_out(step, slots, slot_index, busy), replaced
        except RuntimeError:  # a worker died or crashed: do not trust the pool again
            self.close()
            raise
        finally:
            # Stopped early (a signal, --max-steps, bad data): finish the tasks in flight
            # and keep the pool for the next pass.
            self._passing = False
            if self._pool is pool:
                try:
                    pool.drain()
                except RuntimeError:
                    self.close()
                    raise

    @staticmethod
    def _dispatch(pool: _Pool, steps: Iterator[StepPlan], busy: set[int]) -> bool:
        """Send the next step to the workers if a slot is free; False when none is."""
        for index, slot in enumerate(pool.slots):
            if index not in busy and slot.free():
                step = next(steps, None)
                if step is None:
                    return False
                busy.add(index)
                pool.send(step, index)
                return True
        return False

    def _hand_out(self, step: StepPlan, slots: list[_Slot], index: int,
                  busy: set[int]) -> Batch:
        """The step's batch: a view of its slot, a GPU copy, or a CPU copy when slots run low."""
        slot = slots[index]
        pixels = torch.from_numpy(slot.array[:len(step.all_image_ids)])
        if self.device.type == "cuda":
            batch = batch_from_pixels(step, pixels, self.device)
            slot.ready_event = torch.cuda.Event()
            # On the stream the copy was queued on: an event on another device's stream
            # completes at once, and the slot would be refilled under the copy in flight.
            slot.ready_event.record(torch.cuda.current_stream(self.device))
            return batch
        held = sum(1 for i, s in enumerate(slots)
                   if i != index and i not in busy and not s.free())
        if held >= 2:  # more than a loop's previous batch is kept: copy, the ring keeps turning
            pixels = pixels.clone()
        return batch_from_pixels(step, pixels, self.device)

    def _run_inline(self, plan: EpochPlan, start_step: int) -> Iterator[tuple[Batch, int]]:
        """No worker processes (workers=0): decode in this process, for debugging."""
        size = self.source.image_size
        for step in plan.steps(start_step):
            pixels = torch.empty((len(step.all_image_ids), size, size, 3), dtype=torch.uint8)
            replaced, error = decode_step(self.source, step, pixels.numpy())
            if error is not None:
                raise DataError(error)
            yield batch_from_pixels(step, pixels, self.device), replaced
