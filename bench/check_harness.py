"""The device check's harness: what a check is, the context every check reads, commands run
in their own process group inside a time box, and the loop that runs a table of checks.

A check is one row (``Check``): the commands it starts, built from the context alone (so the
test suite can parse every CUDA command on a CPU machine), and a verdict over their output.
Two checks that build the same command share one run of it: the first runs it, the second
reads its output (or its failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.run_folder import TRAIN_KIND, read_metrics

REPO = Path(__file__).resolve().parents[1]
TAIL_LINES = 25  # lines of a failed command's output kept in the summary
MIN_START_S = 15  # no check starts with less than this left of the budget


class CheckError(Exception):
    """A check failed; the message is the exact reason (command output included)."""


class Skip(Exception):  # noqa: N818 (a verdict, not an error)
    """A check that does not apply here; the message says why."""


@dataclass(frozen=True)
class Sizes:
    """What the checks' shared dataset and training runs look like on one kind of device."""

    identities: int
    images_per_identity: int
    network: tuple[str, ...]  # the train flags choosing the feature encoder
    batch: int
    precision: str
    log_every: int  # metrics.jsonl records: how closely a SIGTERM follows its target step
    short_steps: int  # --max-steps of the short comparison runs
    workers: int

    @property
    def steps_per_epoch(self) -> int:
        return self.identities * self.images_per_identity // self.batch


TINY_NETWORK = ("--network", "mbf", "--network-args", '{"blocks": [1, 1, 1, 1], "scale": 1}',
                "--embedding-size", "32")
SIZES = {
    "cuda": Sizes(identities=600, images_per_identity=8, network=("--network", "r18"),
                  batch=128, precision="bf16", log_every=2, short_steps=12,
                  workers=min(os.cpu_count() or 1, 12)),
    "cpu": Sizes(identities=4, images_per_identity=2, network=TINY_NETWORK, batch=2,
                 precision="fp32", log_every=1, short_steps=2, workers=1),
}


@dataclass(frozen=True)
class Command:
    """One process a check starts; with ``sigterm_at_step``, it is sent SIGTERM once its run
    folder's metrics.jsonl logs that step (and must then stop cleanly)."""

    argv: tuple[str, ...]
    sigterm_at_step: int | None = None
    run_dir: Path | None = None

    def shown(self) -> str:
        return " ".join(self.argv).replace(str(REPO) + "/", "")


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    work: Path
    deadline: float
    dali: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    finished: dict[Command, str | CheckError] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def sizes(self) -> Sizes:
        return SIZES[self.device]

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    def pick(self, on_cuda: Any, on_cpu: Any) -> Any:
        return on_cuda if self.cuda else on_cpu

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def module(self, name: str, *args: Any, **options: Any) -> Command:
        """``python -m name args`` (``sigterm_at_step``/``run_dir`` as ``Command``)."""
        return Command((sys.executable, "-m", name, *map(str, args)), **options)

    def train(self, run: str, *flags: Any, network: tuple[str, ...] | None = None,
              device: str | None = None, **options: Any) -> Command:
        """``python -m train`` on the check's shards into work/RUN, with the shared settings
        (deterministic, seed 0, no validation) before ``flags``, which may override them."""
        s = self.sizes
        return self.module(
            "train", "--shards", self.shards, "--output", self.work / run,
            *(network or s.network), "--batch-size", s.batch, "--k", 2, "--epochs", 3,
            "--precision", s.precision, "--device", device or self.device, "--val", "none",
            "--log-every", s.log_every, "--ckpt-every", 1_000_000, "--no-tensorboard",
            "--deterministic", "--seed", 0, "--workers", s.workers, *flags,
            run_dir=self.work / run, **options)

    def resume(self, run: str, *flags: Any) -> Command:
        return self.module("train", "--output", self.work / run, "--resume", *flags)

    def need_cuda(self, why: str) -> None:
        if not self.cuda:
            raise Skip(f"--device cpu: {why}")

    def need_dali(self) -> None:
        if not self.dali.get("importable"):
            raise Skip(f"nvidia.dali does not import: {self.dali.get('error')}")

    def run(self, command: Command, timeout: float) -> str:
        """The command's output (stdout and stderr); a failure, a timeout or a missed SIGTERM
        -> CheckError. Run once per context: a second call returns the first outcome."""
        if command not in self.finished:
            try:
                self.finished[command] = _run(command, self.env, timeout)
            except CheckError as error:
                self.finished[command] = error
        outcome = self.finished[command]
        if isinstance(outcome, CheckError):
            raise outcome
        return outcome


@dataclass(frozen=True)
class Check:
    """One row of the table: ``commands`` (every process it starts, in order) and ``verdict``
    (the outputs, in the same order -> ``{"ok": ..., figures}``, or CheckError). ``needs``
    runs first and raises Skip where the check does not apply."""

    name: str
    what: str
    box: tuple[float, float]  # seconds it may take: on CUDA, on the CPU
    commands: Callable[[Context], list[Command]]
    verdict: Callable[[Context, list[str]], dict[str, Any]]
    needs: Callable[[Context], None] = lambda ctx: None
    default: bool = True  # False: runs only when named in --checks

    def __call__(self, ctx: Context, timeout: float) -> dict[str, Any]:
        self.needs(ctx)
        end = time.monotonic() + timeout
        outputs = [ctx.run(command, end - time.monotonic()) for command in self.commands(ctx)]
        return self.verdict(ctx, outputs)


def _run(command: Command, env: dict[str, str], timeout: float) -> str:
    started = time.monotonic()
    proc = subprocess.Popen(command.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=env, start_new_session=True)
    with _killed_on_exit(proc):
        if command.sigterm_at_step is not None:
            _sigterm_when_logged(proc, command, started + timeout)
        try:
            output = proc.communicate(timeout=max(1.0, started + timeout - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise CheckError(f"timed out after {timeout:.0f} s: {command.shown()}\n"
                             f"{tail(proc.communicate()[0])}") from None
    if proc.returncode != 0:
        raise CheckError(f"exit {proc.returncode} after {time.monotonic() - started:.1f} s: "
                         f"{command.shown()}\n{tail(output)}")
    return output


def _sigterm_when_logged(proc: subprocess.Popen, command: Command, end: float) -> None:
    """SIGTERM once metrics.jsonl shows the target step; a run that ends first fails."""
    while proc.poll() is None and time.monotonic() < end:
        records = training_records(command.run_dir)
        if records and records[-1]["step"] >= command.sigterm_at_step:
            proc.send_signal(signal.SIGTERM)
            return
        time.sleep(0.02)
    if proc.poll() is not None:
        raise CheckError(f"ended before step {command.sigterm_at_step}: {command.shown()}\n"
                         f"{tail(proc.communicate()[0])}")


@contextlib.contextmanager
def _killed_on_exit(proc: subprocess.Popen) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.communicate()


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def training_records(run_dir: Path) -> list[dict[str, Any]]:
    """The training rows of RUN/metrics.jsonl so far (a line being written is left out)."""
    return read_metrics(run_dir, TRAIN_KIND, live=True)


def tail(output: str) -> str:
    lines = [line for line in output.splitlines() if "progress:" not in line]
    return "\n".join(lines[-TAIL_LINES:])


def last_json(output: str) -> dict[str, Any]:
    """The JSON object a bench prints as its last line."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise CheckError(f"no JSON line in the output:\n{tail(output)}")


def run_checks(ctx: Context, checks: list[Check], boxes: dict[str, float],
               report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Each check in order, each in its time box, until the budget is spent; ``report`` gets
    the results so far after every check (a killed run keeps what it finished)."""
    results: dict[str, Any] = {}
    for check in checks:
        box = boxes.get(check.name, check.box[0] if ctx.cuda else check.box[1])
        results[check.name] = _run_check(ctx, check, box)
        report(results)
    return results


def _run_check(ctx: Context, check: Check, box: float) -> dict[str, Any]:
    left = ctx.remaining()
    if left < MIN_START_S:
        return {"skipped": f"out of the time budget ({left:.0f} s left)"}
    timeout = min(box, left)
    started = time.monotonic()
    print(f"gpu_check: {check.name} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
    try:
        result = check(ctx, timeout)
    except Skip as why:
        result = {"skipped": str(why)}
    except Exception as error:  # recorded, and the next check runs
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    result["seconds"] = round(time.monotonic() - started, 1)
    verdict = "skipped" if "skipped" in result else "ok" if result.get("ok") else "FAILED"
    print(f"gpu_check: {check.name}: {verdict} in {result['seconds']} s", file=sys.stderr,
          flush=True)
    return result
