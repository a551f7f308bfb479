"""What a run reports: RUN/metrics.jsonl, TensorBoard scalars and the progress postfix.

metrics.jsonl is the record tools read (one JSON object per logged step); TensorBoard is
for looking at curves; the progress line is for the person watching the terminal.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes(device: str) -> int:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        # On resume, records after the checkpoint belong to steps that are about to be redone.
        self._drop_after(resume_step)
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"),
                                         purge_step=resume_step or None)

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """One JSON line (flushed, so ``tail -f`` and crashes see it) and TB scalars."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "kind") and isinstance(value, int | float):
                    self._writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a crash: drop it


def postfix(record: dict[str, Any], epochs: int) -> str:
    """The fields a person watching wants, in one short line."""
    loss = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
    return (f"epoch {record['epoch'] + 1}/{epochs} loss {loss} "
            f"lr {record['lr']:.4g} {record['samples_per_s']:.0f} samples/s "
            f"{record['images_per_s']:.0f} img/s mem {record['mem_bytes'] / 2**30:.2f}G")
