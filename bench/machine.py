"""What machine a benchmark ran on, in the words BENCHMARKS.md records."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess where that is missing)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe() -> str:
    """CPU model and core count, e.g. "Intel(R) Xeon(R) Processor, 2 cores"."""
    return f"{cpu_model()}, {os.cpu_count()} cores"
