"""Every GPU check of the project in one time-boxed command that prints one JSON summary.

On a GPU machine, from the repository root (DALI from the six carried parts, see
BENCHMARKS.md "The exact device calls"):

    bash .dali/p6/install && PYTHONPATH=$PWD/.dali/site python -m bench.gpu_check

The checks run in the table's order: first what could corrupt or crash a user's run, then
speed. Each has its own time box; one that fails or runs out of time is recorded with its
exact error text and the next one starts; once --budget seconds are used up the rest are
recorded as skipped. The summary is printed as the last line and written to --json (or
$OUT/gpu_check.json when $OUT is set) after every check, so a killed run keeps what it
finished. ``--device cpu`` runs the same table at toy sizes (the test suite does, so it
cannot rot); checks that need CUDA or DALI are recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.check_harness import (
    REPO,
    TINY_NETWORK,
    Check,
    Command,
    Context,
    last_json,
    run_checks,
    training_records,
)
from bench.resume_compare import (
    compare_losses,
    compare_weights,
    resume_verdict,
    steps_per_epoch,
    throughput,
)
from common.cli import ArgumentParser, run_cli
from common.run_folder import MODEL, VAL_KIND, read_metrics

BUDGET_S = {"cuda": 540.0, "cpu": 1200.0}
ALL_HEADS = ("fc", "partialfc", "attfc", "official")
SHORT_TORCH = ("--backend", "torch", "--prefetch", 2)  # one run shared by three checks
Verdict = Callable[[Context, list[str]], dict[str, Any]]


# --- commands the checks share --------------------------------------------------------------

def shards(ctx: Context) -> Command:
    s = ctx.sizes
    return ctx.module("data_engine.shard", "--src", "synthetic", "--identities", s.identities,
                      "--images-per-identity", s.images_per_identity, "--seed", 0,
                      "--out", ctx.shards, "--workers", os.cpu_count() or 1)


def short(ctx: Context, run: str, *flags: Any, **options: Any) -> Command:
    """A training run of a few steps, every step logged (the comparisons' unit)."""
    return ctx.train(run, "--max-steps", ctx.sizes.short_steps, "--log-every", 1, *flags,
                     **options)


def torchrun(command: Command, ranks: int) -> Command:
    """The same ``python -m train`` under torchrun (``python -m torch.distributed.run``)."""
    python, _, _, *train = command.argv
    return Command((python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(ranks), "-m", "train", *train))


def train_step_bench(ctx: Context, n: tuple[int, int], heads: tuple[Sequence[str], ...],
                     *extra: Any) -> Command:
    """bench.train_step: R50 at B=384 on CUDA; ``n`` and ``heads`` as (on CUDA, on the CPU)."""
    return ctx.module("bench.train_step", *ctx.pick(("--network", "r50"), TINY_NETWORK),
                      "--batch-size", ctx.pick(384, 2), "--k", 2, "--num-classes",
                      ctx.pick(*n), "--heads", *ctx.pick(*heads), "--steps", ctx.pick(10, 1),
                      "--warmup", ctx.pick(3, 1), "--device", ctx.device, *extra)


def heads_bench(ctx: Context, n: int, heads: Sequence[str]) -> Command:
    return ctx.module("bench.heads", "--device", ctx.device, "--n", n, "--heads", *heads,
                      *ctx.pick(("--steps", 10, "--warmup", 3),
                                ("--batch-size", 16, "--dim", 32, "--steps", 1, "--warmup", 0)))


def loader_bench(ctx: Context, backend: str) -> Command:
    return ctx.module("bench.loader", "--shards", ctx.shards, "--backend", backend,
                      "--device", ctx.device, "--k", 2, "--batch-size", ctx.pick(384, 2),
                      "--steps", ctx.pick(8, 2), "--repeats", 1,
                      "--workers", max(2, ctx.sizes.workers))


# --- verdicts -------------------------------------------------------------------------------

def shards_verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    manifest = json.loads((ctx.shards / "manifest.json").read_text())
    return {"ok": True, "identities": manifest["num_identities"], "images": manifest["num_images"]}


def pytest_verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    """Every test ran and passed on CUDA; on the CPU the file skips itself."""
    counts = {word: int(number) for number, word in
              re.findall(r"(\d+) (passed|skipped|failed|errors?)", outputs[-1].splitlines()[-1])}
    ran_all = counts.get("passed", 0) > 0 and set(counts) == {"passed"}
    return {"ok": ran_all if ctx.cuda else set(counts) <= {"passed", "skipped"},
            **{f"tests_{word}": number for word, number in counts.items()}}


def resume_check_verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    result = resume_verdict(ctx.work / "straight", ctx.work / "stopped", outputs[2],
                            steps_per_epoch(ctx.shards, ctx.sizes.batch))
    return {**result, **throughput(ctx.work / "straight"), "backend_used": _backend(ctx)}


def _backend(ctx: Context) -> str:
    from data_engine.loading.loader import resolve_backend

    return resolve_backend("auto", ctx.device)


def weights_verdict(a: str, b: str) -> Verdict:
    def verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
        result = compare_weights(ctx.work / a / MODEL, ctx.work / b / MODEL)
        final = training_records(ctx.work / b)
        completed = bool(final) and final[-1]["step"] == ctx.sizes.short_steps
        return {"ok": result["weights_match"] and completed, "completed": completed, **result}
    return verdict


def losses_verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    result = compare_losses(ctx.work / "short_dali", ctx.work / "short_torch")
    return {"ok": result["losses_match"], **result}


def finished_verdict(run: str) -> Verdict:
    """The run reached its last step with every logged loss finite; validation rows too."""
    def verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
        train = training_records(ctx.work / run)
        val = read_metrics(ctx.work / run, VAL_KIND)
        finite = all(abs(r["loss"]) < float("inf") for r in train)
        final_step = train[-1]["step"] if train else None
        return {"ok": finite and final_step == ctx.sizes.short_steps, "final_step": final_step,
                "losses": [r["loss"] for r in train], "validations": val,
                **throughput(ctx.work / run)}
    return verdict


def validation_verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    result = finished_verdict("val")(ctx, outputs)
    scores = [r["mean"] for r in result["validations"]]
    result["ok"] = result["ok"] and bool(scores) and all(0.0 <= s <= 1.0 for s in scores)
    return result


def evaluate_verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    metrics = json.loads((ctx.work / "ijb.json").read_text())
    faiss_gpu = any("faiss search on" in line and "GPU" in line
                    for line in outputs[-1].splitlines())
    complete = "tar_at_far" in metrics and "top1" in metrics
    return {"ok": complete and (faiss_gpu or not ctx.cuda), "faiss_on_gpu": faiss_gpu,
            "tar_at_far": metrics.get("tar_at_far"), "top1": metrics.get("top1")}


def bench_verdict(ok: Callable[[dict[str, Any]], bool]) -> Verdict:
    """The bench's JSON line, judged by ``ok(report)``."""
    def verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
        report = last_json(outputs[-1])
        return {"ok": ok(report), **report}
    return verdict


def loader_verdict(backend: str) -> Verdict:
    def verdict(ctx: Context, outputs: list[str]) -> dict[str, Any]:
        report = last_json(outputs[-1])
        return {"ok": report["backend"] == backend,
                "ours_host_cpu_s_per_image": report["ours_cpu_us_per_image"] / 1e6, **report}
    return verdict


def no_errors(report: dict[str, Any]) -> bool:
    return not any("error" in r for r in report["results"])


def all_timed(report: dict[str, Any]) -> bool:
    return all(r["step_s"] is not None for r in report["results"])


def needs(*what: str, why: str = "") -> Callable[[Context], None]:
    def check(ctx: Context) -> None:
        if "cuda" in what:
            ctx.need_cuda(why)
        if "dali" in what:
            ctx.need_dali()
    return check


def cpu_run_flags(ctx: Context) -> tuple[Any, ...]:
    """The CPU half of resume_cpu_checkpoint: a tiny fp32 run, quick on the host's cores; the
    torch backend, which the resumed half keeps, so both halves decode with libjpeg-turbo."""
    return ("--batch-size", ctx.pick(16, ctx.sizes.batch), "--precision", "fp32",
            "--backend", "torch")


def _sigterm_step(ctx: Context) -> int:
    per_epoch = ctx.sizes.steps_per_epoch
    return per_epoch + per_epoch // 2


# --- the table: one row per check, in the order they run ------------------------------------

CHECKS: tuple[Check, ...] = (
    Check("shards", "synthetic identities sharded on the machine (python -m data_engine.shard)",
          (40, 60), lambda ctx: [shards(ctx)], shards_verdict),
    Check("model_cuda", "pytest tests/test_model_cuda.py: heads on CUDA vs CPU, a bf16 step",
          (60, 90), lambda ctx: [ctx.module("pytest", "-q", "-p", "no:cacheprovider",
                                            "tests/test_model_cuda.py")], pytest_verdict),
    Check("train", "python -m train, 3 epochs, backend auto, --deterministic: straight, and "
          "SIGTERM in epoch 2 then --resume; same weights; samples/s, peak memory",
          (90, 300), lambda ctx: [
              shards(ctx), ctx.train("straight", "--backend", "auto"),
              ctx.train("stopped", "--backend", "auto", sigterm_at_step=_sigterm_step(ctx)),
              ctx.resume("stopped")], resume_check_verdict),
    Check("pixels", "DALI (mixed on CUDA) and the torch backend to the device through the "
          "prefetch thread vs the CPU decode of the same steps",
          (45, 90), lambda ctx: [shards(ctx), ctx.module(
              "bench.pixel_compare", "--shards", ctx.shards, "--device", ctx.device,
              "--batch-size", ctx.pick(384, 2), "--workers", max(2, ctx.sizes.workers))],
          bench_verdict(lambda report: report["ok"]), needs("dali")),
    Check("resume_cpu_checkpoint", "a checkpoint written on the CPU resumed on the device "
          "(tiny mbf, fp32) vs the same run kept on the CPU",
          (60, 150), lambda ctx: [
              shards(ctx),
              short(ctx, "cpu_straight", *cpu_run_flags(ctx), network=TINY_NETWORK,
                    device="cpu"),
              short(ctx, "cpu_then_device", *cpu_run_flags(ctx), "--max-steps",
                    ctx.sizes.short_steps // 2, network=TINY_NETWORK, device="cpu"),
              ctx.resume("cpu_then_device", "--device", ctx.device, "--max-steps",
                         ctx.sizes.short_steps)],
          weights_verdict("cpu_straight", "cpu_then_device")),
    Check("torch_backend", "python -m train --backend torch --prefetch 2 vs --backend dali: "
          "the first logged losses",
          (60, 150), lambda ctx: [shards(ctx), short(ctx, "short_dali", "--backend", "dali"),
                                  short(ctx, "short_torch", *SHORT_TORCH)],
          losses_verdict, needs("dali")),
    Check("torchrun", "torchrun --nproc_per_node 1 (NCCL on CUDA, gloo on the CPU) vs one "
          "process: same weights",
          (60, 150), lambda ctx: [shards(ctx), short(ctx, "short_torch", *SHORT_TORCH),
                                  torchrun(short(ctx, "short_torchrun", *SHORT_TORCH), 1)],
          weights_verdict("short_torch", "short_torchrun")),
    Check("validation", "validation during training on a held-out synthetic .bin",
          (60, 150), lambda ctx: [
              shards(ctx),
              ctx.module("evaluate", "synth-bin", "--out", ctx.work / "val_bins" / "held_out.bin",
                         "--identities", ctx.pick(100, 6), "--pairs", ctx.pick(200, 40),
                         "--first-identity", 100_000),
              short(ctx, "val", "--val", ctx.work / "val_bins", "--val-every",
                    max(1, ctx.sizes.short_steps // 2))],
          validation_verdict),
    Check("evaluate", "python -m evaluate ijbc on the device (faiss GPU index on CUDA) on a "
          "synthetic IJB set",
          (60, 150), lambda ctx: [
              shards(ctx), short(ctx, "short_torch", *SHORT_TORCH),
              ctx.module("evaluate", "synth-ijb", "--out", ctx.work / "ijb",
                         "--identities", ctx.pick(40, 6)),
              ctx.module("evaluate", "ijbc", "--root", ctx.work / "ijb", "--model",
                         ctx.work / "short_torch" / MODEL, "--device", ctx.device,
                         "--out", ctx.work / "ijb.json", "-v")],
          evaluate_verdict),
    Check("fp16_clip", "--precision fp16 (fp32 on the CPU) --clip-grad-norm 5: finite losses",
          (45, 90), lambda ctx: [shards(ctx), short(
              ctx, "fp16_clip", "--precision", ctx.pick("fp16", "fp32"),
              "--clip-grad-norm", 5)], finished_verdict("fp16_clip")),
    Check("train_compile", "python -m train --compile (the feature encoder compiled)",
          (100, 60), lambda ctx: [shards(ctx), short(ctx, "compile", "--compile")],
          finished_verdict("compile"),
          needs("cuda", why="torch.compile of the encoder takes minutes on a small CPU")),
    Check("loader_dali", "bench.loader, DALI mixed: images/s, host CPU-seconds per image",
          (40, 60), lambda ctx: [shards(ctx), loader_bench(ctx, "dali")],
          loader_verdict("dali"), needs("cuda", "dali", why="DALI's mixed decode needs a GPU")),
    Check("train_step_1m", "bench.train_step R50, B=384, k=2, N=1M: fc, attfc, official; "
          "--profile (where attfc's step goes), host syncs per step",
          (80, 240), lambda ctx: [train_step_bench(
              ctx, (1_000_000, 1000), (("fc", "attfc", "official"), ("attfc", "official")),
              "--profile")], bench_verdict(no_errors)),
    Check("heads_1m", "bench.heads at N=1M: fc, partialfc, attfc, official",
          (50, 180), lambda ctx: [heads_bench(ctx, ctx.pick(1_000_000, 1000),
                                              ctx.pick(ALL_HEADS, ("attfc", "official")))],
          bench_verdict(all_timed)),
    Check("loader_torch", "bench.loader, torch backend to the device",
          (40, 120), lambda ctx: [shards(ctx), loader_bench(ctx, "torch")],
          loader_verdict("torch")),
    Check("train_step_1m_compiled", "as train_step_1m, fc and attfc, both encoders compiled",
          (150, 60), lambda ctx: [train_step_bench(
              ctx, (1_000_000, 1000), (("fc", "attfc"), ("attfc",)), "--compile",
              "--compile-class-encoder", "default", "--profile")], bench_verdict(no_errors),
          needs("cuda", why="torch.compile of the encoders takes minutes on a small CPU"),
          default=False),
    Check("heads_2m", "bench.heads at N=2M", (50, 60),
          lambda ctx: [heads_bench(ctx, 2_000_000, ALL_HEADS)], bench_verdict(all_timed),
          needs("cuda", why="N=2M is a GPU table's row"), default=False),
    Check("train_step_93k", "as train_step_1m at N=93k", (60, 60), lambda ctx: [
        train_step_bench(ctx, (93_000, 500), (("fc", "attfc", "official"),) * 2)],
          bench_verdict(no_errors), needs("cuda", why="N=93k is a GPU table's row"),
          default=False),
)
NAMES = tuple(check.name for check in CHECKS)


def planned_commands(ctx: Context) -> list[Command]:
    """Every command the table starts on ``ctx.device``, once each (the test suite parses
    the CUDA ones with their own parsers, so a GPU session is not lost to a typo)."""
    return list(dict.fromkeys(command for check in CHECKS for command in check.commands(ctx)))


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
    rows = "\n".join(f"  {c.name:24s}{c.what} ({c.box[0]:.0f} s on CUDA)"
                     + ("" if c.default else " [only with --checks]") for c in CHECKS)
    parser = ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                            epilog=f"checks, in order:\n{rows}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto|cuda|cpu (cpu: toy sizes)")
    parser.add_argument("--checks", help="comma-separated checks to run (default: every "
                        "check not marked 'only with --checks')")
    parser.add_argument("--budget", type=float, help="seconds for the whole command "
                        f"(default: {BUDGET_S['cuda']:.0f} on CUDA, {BUDGET_S['cpu']:.0f} CPU)")
    parser.add_argument("--box", action="append", default=[], metavar="NAME=SECONDS",
                        help="override one check's time box (repeatable)")
    parser.add_argument("--work", type=Path,
                        help="scratch folder, new or empty (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the summary here "
                        "(default: $OUT/gpu_check.json when $OUT is set)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: expected auto, cuda or cpu")
    chosen = ([name.strip() for name in args.checks.split(",") if name.strip()]
              if args.checks else [c.name for c in CHECKS if c.default])
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
    budget = args.budget or BUDGET_S[args.device]
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args.device, work, started + budget, dali_status(env), env)
        summary: dict[str, Any] = {"environment": environment(args.device), "dali": ctx.dali,
                                   "budget_s": budget, "checks": {}}

        def report(results: dict[str, Any]) -> None:
            summary.update(checks=results, elapsed_s=round(time.monotonic() - started, 1))
            _write(summary, json_path)

        run_checks(ctx, [c for c in CHECKS if c.name in chosen], boxes, report)
    summary["ok"] = all(c.get("ok") or "skipped" in c for c in summary["checks"].values())
    _write(summary, json_path)
    print(json.dumps(summary))
    return 0


def _write(summary: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    run_cli("bench.gpu_check", main)
