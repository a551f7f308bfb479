"""Real faults for the fault-matrix tests: small filesystems that fill up, read-only mounts,
a SIGKILL landed inside one chosen write (strace), and the one-line-error assertion."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO


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


def strace_kill_prefix(path: Path, call: str, log: Path) -> list[str]:
    """A command prefix that SIGKILLs whichever process first makes ``call`` (write, fsync)
    on ``path``, at that syscall: a kill -9 inside one chosen write, every time."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: it lands the SIGKILL inside a chosen write")
    probe = subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace forbidden?): {probe.stderr.strip()}")
    return ["strace", "-f", "-q", "-o", str(log), "-P", str(path),
            # strace counts a tracee's calls before -P filters them: "1+" is the first on path
            "-e", f"trace={call}", "-e", f"inject={call}:signal=SIGKILL:when=1+"]


def run_until_killed(prefix: list[str], module: str, *args: str | Path, log: Path,
                     timeout: float = 240, attach_when: Callable[[], bool] | None = None,
                     ) -> None:
    """Run ``python -m module`` under ``prefix`` until strace reports the SIGKILL, then
    kill what is left of the job (the OOM killer or a power cut takes the whole job).

    With ``attach_when``, the process starts untraced and strace attaches once that is
    true (after torch's imports, which are slow under ptrace)."""
    command = [sys.executable, "-m", module, *map(str, args)]
    process = subprocess.Popen(
        command if attach_when else [*prefix, *command], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    tracer = None
    try:
        if attach_when is not None:
            while not attach_when():
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "never ready to attach"
                time.sleep(0.05)
            tracer = subprocess.Popen([*prefix, "-p", str(process.pid)],
                                      stderr=subprocess.DEVNULL)
        while "killed by SIGKILL" not in (log.read_text() if log.exists() else ""):
            if process.poll() is not None:
                raise AssertionError(f"finished without being killed: {process.stderr.read()}")
            assert time.monotonic() < deadline, "the chosen write never happened"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
        if tracer is not None:
            tracer.wait(timeout=60)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): what "nothing lost" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}
