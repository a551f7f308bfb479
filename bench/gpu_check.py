"""Every GPU check of the project in one time-boxed command that prints one JSON summary.

On a GPU machine (from the repository root; DALI from the six carried parts, see
BENCHMARKS.md "GPU check"):

    bash .dali/p6/install && PYTHONPATH=$PWD/.dali/site python -m bench.gpu_check

In order of importance, each in its own time box (a sub-check that fails or runs out of time
is recorded with its exact error text, and the next one starts):
  shards         synthetic identities sharded on the machine (python -m data_engine.shard)
  train          python -m train, 3 epochs, bf16, backend auto, --deterministic: a straight
                 run, and a run stopped by SIGTERM in the middle of epoch 2 then --resume'd
                 to the end; samples/s, peak memory, resumed weights vs the straight run's
  pixels         DALI GPU ("mixed") decode vs the CPU decode of the same JPEGs
  loader_dali    bench/loader.py, DALI mixed backend: images/s, host CPU-seconds per image
  train_step_1m  bench/train_step.py R50, B=384, k=2, N=1M: fc, attfc, official attfc, and
                 where attfc's step time goes (--profile), host syncs per step
  heads_1m       bench/heads.py at N=1M: fc, partialfc, attfc, official attfc
  train_dali     as train, with --backend dali
  loader_torch   bench/loader.py, torch backend to CUDA
  train_step_1m_compiled, train_compile, heads_2m, train_step_93k: the same, compiled (both
                 encoders) / at N=2M / at N=93k
The whole command stops starting sub-checks when --budget seconds are used up (those left
are recorded as skipped). The summary is printed as the last line and written to --json,
or to $OUT/gpu_check.json when $OUT is set, after every sub-check (a killed run leaves
what it finished).

``--device cpu`` runs the same code at toy sizes (the test suite does, so it cannot rot);
sub-checks that need CUDA or DALI's GPU decode are recorded as skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cli import ArgumentParser, run_cli

REPO = Path(__file__).resolve().parents[1]

# Pixel agreement of two JPEG decoders on the same files, in levels of 0..255. nvJPEG and
# libjpeg-turbo round their IDCT and chroma upsampling differently: a few levels at edges.
PIXEL_MEAN_TOLERANCE = 1.0
PIXEL_P999_TOLERANCE = 8.0
# Resumed vs straight weights when they are not bit-identical: per tensor, relative to its
# largest entry (bf16 keeps 8 significant bits: 2^-8 ≈ 0.4 %).
WEIGHT_TOLERANCE = 1e-2
_TAIL_LINES = 25  # lines of a failed command's output kept in the JSON


class CheckError(Exception):
    """A sub-check failed; the message is the exact reason (command output included)."""


class Skip(Exception):  # noqa: N818 (a verdict, not an error)
    """A sub-check that does not apply here; the message says why."""


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU (test) run."""

    identities: int
    images_per_identity: int
    train_network: list[str]
    train_batch: int
    train_precision: str
    log_every: int  # metrics.jsonl records: how closely the SIGTERM follows the target step
    workers: int
    step_network: list[str]
    step_batch: int
    step_classes: tuple[int, int, int]  # 1M, 2M, 93k stand-ins
    step_steps: list[str]
    head_args: list[str]
    loader_batch: int
    loader_steps: int

    @staticmethod
    def for_device(device: str) -> Sizes:
        if device == "cuda":
            return Sizes(
                identities=1500, images_per_identity=8,
                train_network=["--network", "r18"], train_batch=128, train_precision="bf16",
                log_every=5, workers=os.cpu_count() or 1,
                step_network=["--network", "r50"], step_batch=384,
                step_classes=(1_000_000, 2_000_000, 93_000),
                step_steps=["--steps", "20", "--warmup", "5"],
                head_args=["--steps", "10", "--warmup", "3"],
                loader_batch=384, loader_steps=16)
        tiny = ["--network", "mbf", "--network-args", '{"blocks": [1, 1, 1, 1], "scale": 1}',
                "--embedding-size", "32"]
        return Sizes(
            identities=4, images_per_identity=2,
            train_network=tiny, train_batch=2, train_precision="fp32", log_every=1, workers=1,
            step_network=tiny, step_batch=2, step_classes=(1000, 2000, 500),
            step_steps=["--steps", "1", "--warmup", "1"],
            head_args=["--batch-size", "16", "--dim", "32", "--steps", "1", "--warmup", "0"],
            loader_batch=2, loader_steps=2)


@dataclass
class Context:
    device: str
    sizes: Sizes
    work: Path
    deadline: float
    dali: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def run(ctx: Context, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` (its own process group) within ``timeout``; failure -> CheckError."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=ctx.env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise CheckError(f"timed out after {timeout:.0f} s: {_shown(cmd)}\n"
                         f"{_tail(out, err)}") from None
    if proc.returncode != 0:
        raise CheckError(f"exit {proc.returncode} after {time.monotonic() - started:.1f} s: "
                         f"{_shown(cmd)}\n{_tail(out, err)}")
    return subprocess.CompletedProcess(cmd, 0, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _shown(cmd: list[str]) -> str:
    return " ".join(str(part) for part in cmd).replace(str(REPO) + "/", "")


def _tail(out: str, err: str) -> str:
    lines = [line for line in (out + "\n" + err).splitlines() if "progress:" not in line]
    return "\n".join(lines[-_TAIL_LINES:])


def last_json(text: str) -> dict[str, Any]:
    """The JSON object a bench script prints as its last line."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise CheckError(f"no JSON line in the output:\n{text[-2000:]}")


# --- sub-checks ---------------------------------------------------------------------------

def check_shards(ctx: Context, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    run(ctx, _shards_cmd(ctx), timeout)
    manifest = json.loads((ctx.shards / "manifest.json").read_text())
    return {"ok": True, "identities": manifest["num_identities"],
            "images": manifest["num_images"], "seconds": round(time.monotonic() - started, 1)}


def _shards_cmd(ctx: Context) -> list[str]:
    s = ctx.sizes
    return [sys.executable, "-m", "data_engine.shard", "--src", "synthetic", "--identities",
            str(s.identities), "--images-per-identity", str(s.images_per_identity), "--seed",
            "0", "--out", str(ctx.shards), "--workers", str(os.cpu_count() or 1)]


def _train_cmd(ctx: Context, run_dir: Path, extra: list[str]) -> list[str]:
    s = ctx.sizes
    return [sys.executable, "-m", "train", "--shards", str(ctx.shards), "--output",
            str(run_dir), *s.train_network, "--batch-size", str(s.train_batch), "--k", "2",
            "--epochs", "3", "--precision", s.train_precision, "--device", ctx.device,
            "--val", "none", "--log-every", str(s.log_every), "--ckpt-every", "1000000",
            "--no-tensorboard", "--deterministic", "--seed", "0",
            "--workers", str(s.workers), *extra]


def _resume_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "train", "--output", str(run_dir), "--resume"]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    records = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # being written
                continue
            if record.get("kind") != "val" and "samples_per_s" in record:
                records.append(record)
    return records


def _stop_mid_epoch_2(ctx: Context, cmd: list[str], run_dir: Path, at_step: int,
                      timeout: float) -> tuple[int, str]:
    """Start a run, SIGTERM it once metrics.jsonl shows ``at_step``; (stopped step, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=ctx.env, start_new_session=True)
    end = time.monotonic() + timeout
    sent = False
    try:
        while proc.poll() is None and time.monotonic() < end:
            records = _records(run_dir)
            if not sent and records and records[-1]["step"] >= at_step:
                proc.send_signal(signal.SIGTERM)
                sent = True
            time.sleep(0.02)
        if proc.poll() is None:
            _kill_group(proc)
            output = proc.communicate()[0]
            raise CheckError(f"timed out after {timeout:.0f} s: {_shown(cmd)}\n"
                             f"{_tail(output, '')}")
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    output = proc.communicate()[0]
    if proc.returncode != 0:
        raise CheckError(f"exit {proc.returncode}: {_shown(cmd)}\n{_tail(output, '')}")
    if not sent:
        raise CheckError(f"the run ended before step {at_step}: {_tail(output, '')}")
    marker = "stopped by SIGTERM at step "
    line = next((ln for ln in output.splitlines() if marker in ln), None)
    if line is None:
        raise CheckError(f"no '{marker}...' line after SIGTERM:\n{_tail(output, '')}")
    return int(line.split(marker)[1].split(";")[0]), output


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Bit-identical, or the largest per-tensor difference relative to the tensor's scale."""
    import torch

    left = torch.load(a, map_location="cpu", weights_only=True)
    right = torch.load(b, map_location="cpu", weights_only=True)
    if left.keys() != right.keys():
        raise CheckError(f"{a} and {b} hold different tensors")
    identical = all(torch.equal(left[k], right[k]) for k in left)
    worst, worst_key = 0.0, None
    for key in left:
        x, y = left[key].double(), right[key].double()
        if x.numel() == 0 or not x.is_floating_point():
            continue
        scale = max(x.abs().max().item(), 1e-12)
        diff = (x - y).abs().max().item() / scale
        if diff > worst:
            worst, worst_key = diff, key
    return {"weights_identical": identical, "max_rel_weight_diff": worst,
            "worst_tensor": worst_key, "weight_tolerance": WEIGHT_TOLERANCE,
            "weights_match": identical or worst <= WEIGHT_TOLERANCE}


def train_variant(ctx: Context, timeout: float, name: str, extra: list[str]) -> dict[str, Any]:
    """Straight run, then SIGTERM mid-epoch 2 + --resume to the end; compare the weights.

    A failure keeps what was measured before it (a straight run's samples/s, say)."""
    result: dict[str, Any] = {"flags": extra}
    try:
        _train_variant(ctx, timeout, name, extra, result)
    except CheckError as error:
        result.update(ok=False, error=f"CheckError: {error}")
    return result


def _train_variant(ctx: Context, timeout: float, name: str, extra: list[str],
                   result: dict[str, Any]) -> None:
    end = time.monotonic() + timeout
    num_images = json.loads((ctx.shards / "manifest.json").read_text())["num_images"]
    per_epoch = num_images // ctx.sizes.train_batch
    if per_epoch < 4:
        raise CheckError(f"{num_images} images make {per_epoch} steps per epoch; need 4")
    straight, stopped = ctx.work / f"{name}_straight", ctx.work / f"{name}_resumed"
    result.update(steps_per_epoch=per_epoch, total_steps=3 * per_epoch)
    started = time.monotonic()
    run(ctx, _train_cmd(ctx, straight, extra), end - time.monotonic())
    result["straight_seconds"] = round(time.monotonic() - started, 1)
    records = _records(straight)
    if not records:
        raise CheckError(f"{straight / 'metrics.jsonl'}: no training records")
    rates = [r["samples_per_s"] for r in records[2:]] or [r["samples_per_s"] for r in records]
    result["samples_per_s"] = round(statistics.median(rates), 1)
    result["images_per_s"] = round(statistics.median(
        [r["images_per_s"] for r in records[2:]] or [r["images_per_s"] for r in records]), 1)
    result["peak_mem_bytes"] = max(r.get("mem_bytes", 0) for r in records)

    target = per_epoch + per_epoch // 2
    started = time.monotonic()
    step, _ = _stop_mid_epoch_2(ctx, _train_cmd(ctx, stopped, extra), stopped, target,
                                end - time.monotonic())
    result.update(sigterm_after_step=target, stopped_at_step=step,
                  stopped_in_epoch=(step - 1) // per_epoch + 1,
                  stopped_mid_epoch=step % per_epoch != 0,
                  interrupted_seconds=round(time.monotonic() - started, 1))
    started = time.monotonic()
    run(ctx, _resume_cmd(stopped), end - time.monotonic())
    result["resumed_seconds"] = round(time.monotonic() - started, 1)
    final = _records(stopped)
    result["resumed_final_step"] = final[-1]["step"] if final else None
    result["resumed_completed"] = result["resumed_final_step"] == 3 * per_epoch
    result.update(compare_weights(straight / "model.pt", stopped / "model.pt"))
    result["ok"] = (result["stopped_in_epoch"] == 2 and result["stopped_mid_epoch"]
                    and result["resumed_completed"] and result["weights_match"])


# The flags of each train variant, and what each bench sub-check runs: (index into
# Sizes.step_classes, heads on CUDA, heads on the CPU or None: CUDA only, extra flags).
TRAIN_VARIANTS = {"train": ["--backend", "auto"], "train_dali": ["--backend", "dali"],
                  "train_compile": ["--backend", "auto", "--compile"]}
_ALL_HEADS = ["fc", "partialfc", "attfc", "official"]
STEP_RUNS = {
    "train_step_1m": (0, ["fc", "attfc", "official"], ["attfc", "official"], ["--profile"]),
    "train_step_1m_compiled": (0, ["fc", "attfc"], None,
                               ["--compile", "--compile-class-encoder", "default", "--profile"]),
    "train_step_93k": (2, ["fc", "attfc", "official"], None, []),
}
HEAD_RUNS = {"heads_1m": (0, _ALL_HEADS, ["attfc", "official"]), "heads_2m": (1, _ALL_HEADS, None)}


def planned_commands(ctx: Context) -> list[list[str]]:
    """Every command the sub-checks run on ``ctx.device`` (the test suite parses the CUDA
    ones with their own parsers, so a GPU session is not lost to a typo)."""
    cuda = ctx.device == "cuda"
    commands = [_shards_cmd(ctx)]
    for name, extra in TRAIN_VARIANTS.items():
        if cuda or name == "train":
            commands += [_train_cmd(ctx, ctx.work / name, extra), _resume_cmd(ctx.work / name)]
    for index, gpu_heads, cpu_heads, extra in STEP_RUNS.values():
        if cuda or cpu_heads:
            commands.append(_train_step_cmd(ctx, ctx.sizes.step_classes[index],
                                            gpu_heads if cuda else cpu_heads, extra))
    for index, gpu_heads, cpu_heads in HEAD_RUNS.values():
        if cuda or cpu_heads:
            commands.append(_heads_cmd(ctx, ctx.sizes.step_classes[index],
                                       gpu_heads if cuda else cpu_heads))
    commands += [_loader_cmd(ctx, "dali")] if cuda else []
    return [*commands, _loader_cmd(ctx, "torch")]


def check_train(ctx: Context, timeout: float) -> dict[str, Any]:
    result = train_variant(ctx, timeout, "auto", TRAIN_VARIANTS["train"])
    result["backend_used"] = _backend_used(ctx, "auto")
    return result


def check_train_dali(ctx: Context, timeout: float) -> dict[str, Any]:
    _need_cuda(ctx, "the dali backend exists for GPU decode (its CPU pipeline is tested in "
               "tests/test_loader.py); the train check covers this code path")
    _need_dali(ctx)
    return {**train_variant(ctx, timeout, "dali", TRAIN_VARIANTS["train_dali"]),
            "backend_used": "dali"}


def check_train_compile(ctx: Context, timeout: float) -> dict[str, Any]:
    _need_cuda(ctx, "torch.compile of R18 takes minutes on a small CPU")
    result = train_variant(ctx, timeout, "compile", TRAIN_VARIANTS["train_compile"])
    return {**result, "backend_used": _backend_used(ctx, "auto")}


def _backend_used(ctx: Context, name: str) -> str:
    from data_engine.loading.loader import resolve_backend

    return resolve_backend(name, ctx.device)


def _need_cuda(ctx: Context, why: str) -> None:
    if ctx.device != "cuda":
        raise Skip(f"--device cpu: {why}")


def _need_dali(ctx: Context) -> None:
    if not ctx.dali.get("importable"):
        raise Skip(f"nvidia.dali does not import: {ctx.dali.get('error')}")


def _train_step_cmd(ctx: Context, n: int, heads: list[str], extra: list[str]) -> list[str]:
    s = ctx.sizes
    return [sys.executable, "-m", "bench.train_step", *s.step_network,
            "--batch-size", str(s.step_batch), "--k", "2", "--num-classes", str(n),
            "--heads", *heads, *s.step_steps, "--device", ctx.device, *extra]


def _train_step(ctx: Context, timeout: float, name: str) -> dict[str, Any]:
    index, gpu_heads, cpu_heads, extra = STEP_RUNS[name]
    heads = gpu_heads if ctx.device == "cuda" else cpu_heads
    out = run(ctx, _train_step_cmd(ctx, ctx.sizes.step_classes[index], heads, extra), timeout)
    report = last_json(out.stdout)
    errors = [r for r in report["results"] if "error" in r]
    return {"ok": not errors, **report}


def check_train_step_1m(ctx: Context, timeout: float) -> dict[str, Any]:
    return _train_step(ctx, timeout, "train_step_1m")


def check_train_step_1m_compiled(ctx: Context, timeout: float) -> dict[str, Any]:
    _need_cuda(ctx, "torch.compile of the encoders takes minutes on a small CPU")
    return _train_step(ctx, timeout, "train_step_1m_compiled")


def check_train_step_93k(ctx: Context, timeout: float) -> dict[str, Any]:
    _need_cuda(ctx, "N=93k is the GPU table's second row; the CPU run covers the code once")
    return _train_step(ctx, timeout, "train_step_93k")


def _heads_cmd(ctx: Context, n: int, heads: list[str]) -> list[str]:
    return [sys.executable, "-m", "bench.heads", "--device", ctx.device,
            "--n", str(n), "--heads", *heads, *ctx.sizes.head_args]


def _heads(ctx: Context, timeout: float, name: str) -> dict[str, Any]:
    index, gpu_heads, cpu_heads = HEAD_RUNS[name]
    heads = gpu_heads if ctx.device == "cuda" else cpu_heads
    out = run(ctx, _heads_cmd(ctx, ctx.sizes.step_classes[index], heads), timeout)
    report = last_json(out.stdout)
    return {"ok": all(r["step_s"] is not None for r in report["results"]), **report}


def check_heads_1m(ctx: Context, timeout: float) -> dict[str, Any]:
    return _heads(ctx, timeout, "heads_1m")


def check_heads_2m(ctx: Context, timeout: float) -> dict[str, Any]:
    _need_cuda(ctx, "N=2M is the GPU table's third row; the CPU run covers the code once")
    return _heads(ctx, timeout, "heads_2m")


def _loader_cmd(ctx: Context, backend: str) -> list[str]:
    s = ctx.sizes
    return [sys.executable, "-m", "bench.loader", "--shards", str(ctx.shards),
            "--backend", backend, "--device", ctx.device, "--k", "2", "--batch-size",
            str(s.loader_batch), "--steps", str(s.loader_steps), "--repeats", "1",
            "--workers", str(max(2, s.workers))]


def _loader(ctx: Context, timeout: float, backend: str) -> dict[str, Any]:
    out = run(ctx, _loader_cmd(ctx, backend), timeout)
    report = last_json(out.stdout)
    report["ours_host_cpu_s_per_image"] = report["ours_cpu_us_per_image"] / 1e6
    return {"ok": report["backend"] == backend, **report}


def check_loader_dali(ctx: Context, timeout: float) -> dict[str, Any]:
    _need_cuda(ctx, "DALI's mixed decode needs a GPU")
    _need_dali(ctx)
    return _loader(ctx, timeout, "dali")


def check_loader_torch(ctx: Context, timeout: float) -> dict[str, Any]:
    return _loader(ctx, timeout, "torch")


def check_pixels(ctx: Context, timeout: float) -> dict[str, Any]:
    _need_dali(ctx)
    out = run(ctx, [sys.executable, "-m", "bench.gpu_check", "--compare-pixels", str(ctx.shards),
                    "--device", ctx.device, "--batch-size", str(ctx.sizes.loader_batch)],
              timeout)
    return last_json(out.stdout)


def compare_pixels(shards: Path, device: str, batch_size: int, steps: int = 2) -> dict:
    """DALI's decode on ``device`` ("mixed" on CUDA) vs the torch backend's CPU decode
    (simplejpeg, libjpeg-turbo) of the same steps: the same JPEGs, flips and order."""
    import torch

    from data_engine.loading.loader import build_loader

    def first_steps(backend: str, on: str) -> torch.Tensor:
        loader = build_loader(shards, batch_size, 2, seed=0, backend=backend, device=on,
                              workers=2)
        with loader:
            parts = []
            for step, batch in enumerate(loader):
                images = torch.cat([batch.identity, batch.classes.flatten(0, 1)])
                parts.append(images.cpu().contiguous())
                if step + 1 == steps:
                    break
        return torch.cat(parts)

    dali = first_steps("dali", device)
    cpu = first_steps("torch", "cpu")
    diff = (dali.int() - cpu.int()).abs().float()
    mean, p999 = diff.mean().item(), torch.quantile(diff.flatten()[::7], 0.999).item()
    return {"ok": mean <= PIXEL_MEAN_TOLERANCE and p999 <= PIXEL_P999_TOLERANCE,
            "images": dali.shape[0], "dali_device": "mixed" if device == "cuda" else "cpu",
            "mean_abs_diff": mean, "p999_abs_diff": p999, "max_abs_diff": diff.max().item(),
            "share_pixels_over_2": (diff > 2).float().mean().item(),
            "tolerance": {"mean_abs_diff": PIXEL_MEAN_TOLERANCE,
                          "p999_abs_diff": PIXEL_P999_TOLERANCE}}


# name, function, time box on the GPU (s), on the CPU (s); in order of importance.
CHECKS: tuple[tuple[str, Callable[[Context, float], dict], float, float], ...] = (
    ("shards", check_shards, 40, 60),
    ("train", check_train, 100, 300),
    ("pixels", check_pixels, 40, 60),
    ("loader_dali", check_loader_dali, 45, 60),
    ("train_step_1m", check_train_step_1m, 80, 120),
    ("heads_1m", check_heads_1m, 50, 120),
    ("train_dali", check_train_dali, 100, 300),
    ("loader_torch", check_loader_torch, 45, 120),
    ("train_step_1m_compiled", check_train_step_1m_compiled, 150, 60),
    ("train_compile", check_train_compile, 150, 60),
    ("heads_2m", check_heads_2m, 50, 60),
    ("train_step_93k", check_train_step_93k, 60, 60),
)
NAMES = tuple(name for name, *_ in CHECKS)
_MIN_START_S = 15  # do not start a sub-check with less than this left of the budget


def dali_status(env: dict[str, str]) -> dict[str, Any]:
    """Whether nvidia.dali imports in a fresh interpreter with this environment."""
    proc = subprocess.run([sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"],
                          capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode == 0:
        return {"importable": True, "version": proc.stdout.strip()}
    lines = proc.stderr.strip().splitlines()
    return {"importable": False, "error": lines[-1] if lines else f"exit {proc.returncode}"}


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_cores": os.cpu_count(), "device": device}
    if device == "cuda":  # in a child: this process keeps CUDA uninitialised
        proc = subprocess.run([sys.executable, "-c", "import torch; p = torch.cuda."
                               "get_device_properties(0); print(p.name, '|', p.total_memory)"],
                              capture_output=True, text=True, timeout=120)
        info["gpu"] = proc.stdout.strip() or proc.stderr.strip()[-500:]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO)
    info["commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    return info


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto|cuda|cpu (cpu: toy sizes)")
    parser.add_argument("--checks", default=",".join(NAMES),
                        help=f"comma-separated sub-checks to run, of: {', '.join(NAMES)}")
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole command (default: 360 on CUDA, 600 CPU)")
    parser.add_argument("--box", action="append", default=[], metavar="NAME=SECONDS",
                        help="override one sub-check's time box (repeatable)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the summary here "
                        "(default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--compare-pixels", type=Path, metavar="SHARDS", help="(internal)")
    parser.add_argument("--batch-size", type=int, default=384, help="(internal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: expected auto, cuda or cpu")
    if args.compare_pixels:
        print(json.dumps(compare_pixels(args.compare_pixels, args.device, args.batch_size)))
        return 0
    chosen = [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        parser.error(f"--checks: unknown {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    boxes = {}
    for item in args.box:
        name, _, seconds = item.partition("=")
        if name not in NAMES or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--box {item}: expected NAME=SECONDS with NAME one of the checks")
        boxes[name] = float(seconds)
    json_path = args.json or (Path(os.environ["OUT"]) / "gpu_check.json"
                              if os.environ.get("OUT") else None)
    budget = args.budget or (360.0 if args.device == "cuda" else 600.0)
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args.device, Sizes.for_device(args.device), work,
                      started + budget, dali_status(env), env)
        summary: dict[str, Any] = {"environment": environment(args.device), "dali": ctx.dali,
                                   "budget_s": budget, "checks": {}}
        for name, function, gpu_box, cpu_box in CHECKS:
            if name not in chosen:
                continue
            box = boxes.get(name, gpu_box if args.device == "cuda" else cpu_box)
            summary["checks"][name] = _run_check(ctx, name, function, box)
            summary["elapsed_s"] = round(time.monotonic() - started, 1)
            _write(summary, json_path)
    summary["ok"] = all(c.get("ok") or "skipped" in c for c in summary["checks"].values())
    _write(summary, json_path)
    print(json.dumps(summary))
    return 0


def _run_check(ctx: Context, name: str, function: Callable, box: float) -> dict[str, Any]:
    left = ctx.remaining()
    if left < _MIN_START_S:
        return {"skipped": f"out of the time budget ({left:.0f} s left)"}
    timeout = min(box, left)
    started = time.monotonic()
    print(f"gpu_check: {name} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
    try:
        result = function(ctx, timeout)
    except Skip as why:
        result = {"skipped": str(why)}
    except Exception as error:  # recorded, and the next sub-check runs
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    result["seconds"] = round(time.monotonic() - started, 1)
    print(f"gpu_check: {name}: " + ("skipped" if "skipped" in result else
                                    "ok" if result.get("ok") else "FAILED")
          + f" in {result['seconds']} s", file=sys.stderr, flush=True)
    return result


def _write(summary: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    run_cli("bench.gpu_check", main)
