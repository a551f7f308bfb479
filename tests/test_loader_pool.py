"""The torch backend's worker pool lives for a whole run, and its CUDA calls are checked."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from data_engine.loading.loader import build_loader, slot_count
from data_engine.loading.torch_backend import CudaCallError, checked_cuda_call
from tests.test_loader import K, _collect


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    """True once none of ``pids`` is a live process (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_workers_are_forked_once_per_run(face_shards: Path) -> None:
    """Epoch 2 reuses epoch 1's worker processes and shard index, after epoch 1 was cut short
    mid-way, and still yields exactly the batches of a fresh loader; close() leaves no process
    behind."""
    kwargs = dict(seed=5, backend="torch", device="cpu", workers=2)
    before = {child.pid for child in psutil.Process().children()}
    first = build_loader(face_shards, 4, K, epoch=0, **kwargs)
    first.start()
    pids = first._impl.worker_pids()
    assert len(pids) == 2 and set(pids) == {c.pid for c in psutil.Process().children()} - before
    for step, _ in enumerate(first):  # stop early: tasks still in flight must be drained
        if step == 3:
            break
    second = build_loader(face_shards, 4, K, epoch=1, reuse=first, **kwargs)
    # one shard index in memory for the run, the pool's and the epoch's alike
    assert second.source.reader is first.source.reader is second._impl.source.reader
    got = _collect(second)
    assert second._impl.worker_pids() == pids
    assert {c.pid for c in psutil.Process().children()} - before == set(pids)
    expected = _collect(build_loader(face_shards, 4, K, epoch=1, **{**kwargs, "workers": 0}))
    for name, values in expected.items():
        assert torch.equal(got[name], values), name
    third = build_loader(face_shards, 4, K, epoch=2, reuse=second, **kwargs)
    next(iter(third))
    assert third._impl.worker_pids() == pids
    third.close()
    assert _gone(pids)
    assert third._impl.worker_pids() == []


def test_other_settings_close_the_old_pool(face_shards: Path) -> None:
    old = build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu", workers=1)
    old.start()
    pids = old._impl.worker_pids()
    new = build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu", workers=2,
                       reuse=old)
    assert _gone(pids) and new._impl is not old._impl


def test_dropped_loader_stops_its_workers(face_shards: Path) -> None:
    loader = build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu", workers=2)
    next(iter(loader))
    pids = loader._impl.worker_pids()
    assert len(pids) == 2
    del loader
    gc.collect()
    assert _gone(pids)


def _libcudart() -> ctypes.CDLL:
    """The CUDA runtime shipped by the nvidia-cuda-runtime wheel (a DALI dependency)."""
    runtime = pytest.importorskip("nvidia.cuda_runtime")
    found = sorted(p for folder in runtime.__path__
                   for p in (Path(folder) / "lib").glob("libcudart.so.*"))
    if not found:
        pytest.skip("no libcudart.so in the nvidia-cuda-runtime package")
    lib = ctypes.CDLL(str(found[-1]))
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    return lib


def test_checked_cuda_call_raises_at_the_failing_call() -> None:
    """A real CUDA runtime call that fails (here: no driver, or, on a GPU machine, memory
    that was never registered) raises at once, naming the call and CUDA's reason."""
    lib = _libcudart()
    version = ctypes.c_int(0)
    checked_cuda_call(lib, "cudaRuntimeGetVersion", ctypes.byref(version))  # works driverless
    assert version.value >= 11000
    buffer = np.zeros(4096 * 4, np.uint8)
    code = lib.cudaHostUnregister(ctypes.c_void_p(buffer.ctypes.data))
    assert code != 0
    reason = lib.cudaGetErrorString(code).decode()
    with pytest.raises(CudaCallError) as raised:
        checked_cuda_call(lib, "cudaHostUnregister", ctypes.c_void_p(buffer.ctypes.data))
    message = str(raised.value)
    assert message.startswith("cudaHostUnregister(") and f"CUDA error {code} ({reason})" \
        in message, message


def test_one_pass_at_a_time(face_shards: Path) -> None:
    """Two live iterators over one pool would take each other's batches: the second is refused
    until the first is closed."""
    with build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu",
                      workers=1) as loader:
        first = iter(loader)
        next(first)
        with pytest.raises(RuntimeError, match="one pass at a time"):
            next(iter(loader))
        first.close()
        assert next(iter(loader)).identity.shape == (4, 3, 112, 112)


class _StandInCuda:
    """Stands in for the parts of ``torch.cuda`` the torch backend calls, on a machine with
    no GPU: a per-thread current device (GPU 0 in every new thread, as in CUDA), streams
    named by device, events that note the stream they were recorded on (an event's default
    is the current device's stream, as in torch), and cudaHostRegister/Unregister that note
    the current device. Only what the backend asks of CUDA is faked; workers, slots and
    face_shards are real."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.calls: list[tuple[str, int]] = []  # (what, current device at the time)

    def current(self) -> int:
        return getattr(self.local, "device", 0)

    def set_device(self, device: torch.device | str) -> None:
        self.local.device = torch.device(device).index

    @contextlib.contextmanager
    def device(self, device: torch.device | str):
        before = self.current()
        self.set_device(device)
        try:
            yield
        finally:
            self.local.device = before

    def current_stream(self, device: torch.device | None = None) -> tuple[str, int]:
        return ("stream", self.current() if device is None else torch.device(device).index)

    def event(self):
        stand_in = self

        class Event:
            def record(self, stream: tuple[str, int] | None = None) -> None:
                stand_in.calls.append(("event on", (stream or stand_in.current_stream())[1]))

            def query(self) -> bool:
                return True

            def synchronize(self) -> None:
                pass

        return Event

    def cudart(self):
        stand_in = self

        class Runtime:
            def cudaHostRegister(self, *args: object) -> int:  # noqa: N802 (CUDA's name)
                stand_in.calls.append(("register", stand_in.current()))
                return 0

            def cudaHostUnregister(self, *args: object) -> int:  # noqa: N802
                stand_in.calls.append(("unregister", stand_in.current()))
                return 0

        return Runtime()


def test_cuda_n_copies_are_tracked_on_that_gpu(face_shards: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With device cuda:1 and the loader iterated in a thread of its own (train's prefetch
    thread), slots are pinned, copied, fenced by an event on cuda:1's stream and unpinned
    with cuda:1 current. Recorded on the thread's default GPU 0 instead, the event completes
    at once and the slot is refilled while its copy is still queued. No GPU here: torch.cuda
    is a stand-in (:class:`_StandInCuda`); bench/gpu_check.py runs this path on a GPU."""
    from data_engine.loading import torch_backend
    from data_engine.loading.epoch_plan import EpochPlan
    from data_engine.loading.image_source import ImageSource
    from data_engine.loading.reader import ShardReader

    cuda = _StandInCuda()
    for name in ("set_device", "device", "current_stream", "cudart"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    monkeypatch.setattr(torch.cuda, "Event", cuda.event())
    real_batch = torch_backend.batch_from_pixels

    def copy(step, pixels, device):
        cuda.calls.append(("copy", cuda.current()))
        return real_batch(step, pixels, torch.device("cpu"))

    monkeypatch.setattr(torch_backend, "batch_from_pixels", copy)
    reader = ShardReader(face_shards)
    plan = EpochPlan(reader.identity_start, 4, K, seed=0)
    batches = torch_backend.TorchBatches(ImageSource(face_shards, 112, False, reader),
                                         device="cuda:1", workers=1, slots=slot_count(1))
    batches.start(plan)  # pinned from the main thread, as train does
    seen = []
    prefetch = threading.Thread(target=lambda: seen.extend(
        batch.labels for batch, _ in batches.run(plan, 0)))
    prefetch.start()
    prefetch.join(timeout=120)
    batches.close()
    assert len(seen) == len(plan)
    kinds = [what for what, _ in cuda.calls]
    assert kinds.count("event on") == kinds.count("copy") == len(plan)
    assert kinds.count("register") == kinds.count("unregister") > 0
    assert {device for _, device in cuda.calls} == {1}, cuda.calls
