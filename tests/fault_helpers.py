"""Real faults for the fault-matrix tests: small filesystems that fill up, read-only mounts,
a SIGKILL, another signal or a freeze landed inside one chosen syscall (strace), and the
one-line-error assertion."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import start_module, wait_until


def _mount(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return subprocess.CompletedProcess(["mount"], 1, "", "no mount command")


@contextlib.contextmanager
def small_disk(path: Path, size: int, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``path``: a disk that really fills up (or is read-only).
    Skips where mounting is forbidden (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = _mount("-t", "tmpfs", "-o", options, "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip("needs a small tmpfs and this machine forbids mounting "
                    f"({done.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def small_dev_shm_prefix(size: int) -> list[str]:
    """A command prefix that runs the command in a mount namespace of its own whose /dev/shm
    is a tmpfs of ``size`` bytes (a container's small shared memory), leaving this machine's
    /dev/shm alone. Skips where that is forbidden."""
    mount = f"mount -t tmpfs -o size={size} tmpfs /dev/shm"
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True,
                               text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("needs unshare (util-linux) for a small /dev/shm")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small /dev/shm here ({probe.stderr.strip()})")
    return ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh"]


def resize_disk(path: Path, size: int) -> None:
    """Grow a :func:`small_disk`: the user freed space."""
    done = _mount("-o", f"remount,size={size}", str(path))
    assert done.returncode == 0, done.stderr


def fill_disk(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``path`` until at most ``leave`` bytes are free."""
    filler = path / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):
        while True:
            free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
            if free <= leave:
                break
            handle.write(b"\0" * min(1 << 16, max(free - leave, 1)))
            handle.flush()
    return filler


def last_error_line(result: subprocess.CompletedProcess, prog: str, code: int = 2) -> str:
    """The CLI convention for an environment fault: exit ``code``, no traceback, and one
    error line (log lines above it are INFO/WARNING lines with a timestamp)."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def strace_prefix(path: Path, call: str, log: Path, action: str = "signal=SIGKILL",
                  when: str = "1+") -> list[str]:
    """A command prefix under which the ``when``-th ``call`` (write, fsync) on ``path``
    (counted per thread, from the first on that path) does ``action`` at that syscall:
    SIGKILL (a kill -9 inside one chosen write, every time), another signal, or FREEZE."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: it lands faults inside a chosen syscall")
    probe = subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace forbidden?): {probe.stderr.strip()}")
    return ["strace", "-f", "-q", "-o", str(log), "-P", str(path), "-e", f"trace={call}",
            "-e", f"inject={call}:{action}:when={when}"]


# Holds the calling thread at the chosen syscall for longer than any test waits.
FREEZE = "delay_enter=600s"


def killed_by_strace(log: Path) -> Callable[[], bool]:
    """True once strace has logged the SIGKILL it injected."""
    return lambda: log.is_file() and "killed by SIGKILL" in log.read_text()


def run_then_kill(prefix: list[str], module: str, *args: object, until: Callable[[], bool],
                  timeout: float = 240) -> None:
    """Run ``python -m module`` under ``prefix`` until ``until()`` holds, then kill -9 what
    is left of the job, all its processes (the OOM killer or a power cut takes the whole
    job). Fails if the job ends first."""
    process = start_module(module, *args, prefix=prefix, stdout=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_until(until, process, timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
