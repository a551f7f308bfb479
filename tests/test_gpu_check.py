"""bench/gpu_check.py in its CPU mode: the prepared GPU command runs end to end at toy sizes,
so it cannot rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check, heads, loader, train_step
from tests.conftest import REPO

pytestmark = pytest.mark.slow
GPU_ONLY = ("loader_dali", "train_dali", "train_step_1m_compiled", "train_compile",
            "heads_2m", "train_step_93k")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_cpu_mode_runs_every_check_and_writes_the_summary(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OUT": str(out)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((out / "gpu_check.json").read_text()) == summary
    checks = summary["checks"]
    assert list(checks) == ["shards", "train", "pixels", "loader_dali", "train_step_1m",
                            "heads_1m", "train_dali", "loader_torch", "train_step_1m_compiled",
                            "train_compile", "heads_2m", "train_step_93k"]
    assert summary["ok"], json.dumps(checks, indent=1)[-3000:]

    train = checks["train"]  # SIGTERM in the middle of epoch 2, --resume, completion
    assert train["stopped_in_epoch"] == 2 and train["stopped_mid_epoch"]
    assert train["resumed_final_step"] == train["total_steps"] == 3 * train["steps_per_epoch"]
    assert train["weights_identical"]  # --deterministic on the CPU: bit for bit
    assert train["samples_per_s"] > 0 and train["peak_mem_bytes"] > 0
    if summary["dali"]["importable"]:
        pixels = checks["pixels"]
        assert pixels["max_abs_diff"] <= 2 and pixels["images"] > 0  # both libjpeg-turbo here
    else:
        assert checks["pixels"]["skipped"].startswith("nvidia.dali does not import")
    step = checks["train_step_1m"]
    assert [r["head"] for r in step["results"]] == ["attfc", "official"]
    assert step["attfc_vs_official"]["1000"]["samples_per_s"] > 0
    assert set(step["results"][0]["profile"]["percent"]) == {
        "feature_encoder_fwd_bwd", "class_encoder_fwd", "optimizer_step", "momentum_update",
        "head_and_glue"}
    assert [r["n"] for r in checks["heads_1m"]["attfc_vs_official"]] == [1000]
    assert checks["loader_torch"]["ours_images_per_s"] > 0
    for name in GPU_ONLY:
        assert checks[name]["skipped"].startswith("--device cpu"), checks[name]


def test_failures_are_recorded_and_the_rest_still_runs(tmp_path) -> None:
    proc = _run("--checks", "shards,train,train_compile", "--box", "train=2", "--json",
                str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    train = summary["checks"]["train"]
    assert train["ok"] is False and train["error"].startswith("CheckError: timed out after 2 s")
    assert "python -m train" in train["error"] or "-m train" in train["error"]
    assert summary["checks"]["shards"]["ok"] and "skipped" in summary["checks"]["train_compile"]
    assert summary["ok"] is False


def test_unknown_check_is_a_one_line_error() -> None:
    proc = _run("--checks", "shards,nope", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr, proc.stderr


def test_every_planned_gpu_command_parses(tmp_path) -> None:
    """The commands the CUDA run would start, parsed by their own parsers here: a flag typo
    in a path the CPU mode skips would otherwise cost a GPU session."""
    from data_engine.shard import build_parser as shard_parser
    from train.__main__ import build_parser as train_parser
    from train.config import resolve

    ctx = gpu_check.Context("cuda", gpu_check.Sizes.for_device("cuda"), tmp_path, 0.0, {})
    ctx.shards.mkdir()
    parsers = {"bench.train_step": train_step.build_parser, "bench.heads": heads.build_parser,
               "bench.loader": loader.build_parser}
    seen = set()
    for cmd in gpu_check.planned_commands(ctx):
        if cmd[1] == "-m" and cmd[2] == "train":
            args = train_parser().parse_args(cmd[3:])
            if not args.resume:
                config = resolve(args)
                assert config["device"] == "cuda" and config["precision"] == "bf16"
                assert config["deterministic"] and config["epochs"] == 3
            seen.add("train")
        elif cmd[2] == "data_engine.shard":
            shard_parser().parse_args(cmd[3:])
            seen.add("shard")
        else:
            args = parsers[cmd[2]]().parse_args(cmd[3:])
            assert args.device == "cuda"
            seen.add(cmd[2])
    assert seen == {"train", "shard", "bench.train_step", "bench.heads", "bench.loader"}
