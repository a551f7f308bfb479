"""bench.gpu_check in its CPU mode: the prepared GPU command runs end to end at toy sizes,
so it cannot rot between the rare sessions that have a GPU; and its harness."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_check
from bench.check_harness import CheckError, Command, Context
from bench.resume_compare import compare_losses, compare_weights
from tests.helpers import REPO

GPU_ONLY = ("train_compile", "loader_dali")


def _run(*args: str, timeout: float = 1300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_cpu_mode_runs_every_check_and_writes_the_summary(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu"],
                          capture_output=True, text=True, timeout=1300, cwd=REPO,
                          env={**os.environ, "OUT": str(out)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((out / "gpu_check.json").read_text()) == summary
    checks = summary["checks"]
    assert list(checks) == [c.name for c in gpu_check.CHECKS if c.default]
    assert summary["ok"], json.dumps(checks, indent=1)[-3000:]

    assert checks["model_cuda"]["tests_skipped"] > 0  # the file skips itself without a GPU
    train = checks["train"]  # SIGTERM in the middle of epoch 2, --resume, completion
    assert train["stopped_in_epoch"] == 2 and train["stopped_mid_epoch"]
    assert train["resumed_final_step"] == train["total_steps"] == 3 * train["steps_per_epoch"]
    assert train["weights_identical"]  # --deterministic on the CPU: bit for bit
    assert train["samples_per_s"] > 0 and train["peak_mem_bytes"] > 0
    for name in ("resume_cpu_checkpoint", "torchrun"):  # the same device here: bit for bit
        assert checks[name]["weights_identical"] and checks[name]["completed"], name
    if summary["dali"]["importable"]:  # DALI's CPU decode is libjpeg-turbo too
        pixels = checks["pixels"]
        assert pixels["images"] > 0
        for pair in ("dali_vs_cpu_decode", "torch_prefetched_vs_cpu_decode"):
            assert pixels[pair]["max_abs_diff"] <= 2, pair
        assert checks["torch_backend"]["max_rel_loss_diff"] <= 1e-3
    else:
        assert checks["pixels"]["skipped"].startswith("nvidia.dali does not import")
    assert [v["kind"] for v in checks["validation"]["validations"]] == ["val", "val"]
    assert 0.0 <= checks["evaluate"]["tar_at_far"]["0.1"] <= 1.0
    assert checks["fp16_clip"]["final_step"] == 2
    step = checks["train_step_1m"]
    assert [r["head"] for r in step["results"]] == ["attfc", "official"]
    assert all(r["tf32"] for r in step["results"])  # the product's float32 policy
    assert step["attfc_vs_official"]["1000"]["samples_per_s"] > 0
    assert set(step["results"][0]["profile"]["percent"]) == {
        "feature_encoder_fwd_bwd", "class_encoder_fwd", "optimizer_step", "momentum_update",
        "head_and_glue"}
    assert [r["n"] for r in checks["heads_1m"]["attfc_vs_official"]] == [1000]
    assert checks["loader_torch"]["ours_images_per_s"] > 0
    for name in GPU_ONLY:
        assert checks[name]["skipped"].startswith("--device cpu"), checks[name]


@pytest.mark.slow
def test_failures_are_recorded_and_the_rest_still_runs(tmp_path) -> None:
    proc = _run("--checks", "shards,train,train_compile", "--box", "train=2", "--json",
                str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    train = summary["checks"]["train"]
    assert train["ok"] is False and train["error"].startswith("CheckError: timed out after")
    assert "-m train" in train["error"]
    assert summary["checks"]["shards"]["ok"] and "skipped" in summary["checks"]["train_compile"]
    assert summary["ok"] is False


def test_unknown_check_is_a_one_line_error() -> None:
    proc = _run("--checks", "shards,nope", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr, proc.stderr


def test_a_command_two_checks_build_runs_once(tmp_path) -> None:
    """Its output, or its failure, is what the second check reads."""
    ctx = Context("cpu", tmp_path, time.monotonic() + 60, {}, dict(os.environ))
    log = tmp_path / "runs.txt"
    append = Command((sys.executable, "-c", f"open({str(log)!r}, 'a').write('x'); print('hi')"))
    assert ctx.run(append, 30) == ctx.run(append, 30) == "hi\n"
    assert log.read_text() == "x"
    fail = Command((sys.executable, "-c", f"open({str(log)!r}, 'a').write('y'); exit(3)"))
    for _ in range(2):
        with pytest.raises(CheckError, match="exit 3"):
            ctx.run(fail, 30)
    assert log.read_text() == "xy"


def test_the_pytest_check_wants_every_test_run_on_cuda(tmp_path) -> None:
    cuda = Context("cuda", tmp_path, 0.0, {})
    cpu = Context("cpu", tmp_path, 0.0, {})
    verdict = gpu_check.pytest_verdict
    assert verdict(cuda, ["....\n4 passed in 3.20s"]) == {"ok": True, "tests_passed": 4}
    assert not verdict(cuda, ["3 passed, 1 skipped in 3.20s"])["ok"]
    assert not verdict(cuda, ["4 skipped in 0.20s"])["ok"]
    assert verdict(cpu, ["SKIPPED [4] needs a CUDA GPU\n4 skipped in 0.20s"])["ok"]
    assert not verdict(cpu, ["1 failed, 3 skipped in 0.20s"])["ok"]


def test_every_planned_gpu_command_parses(tmp_path) -> None:
    """The commands the CUDA run would start, parsed by their own parsers here: a flag typo
    in a path the CPU mode skips would otherwise cost a GPU session."""
    from torch.distributed.run import get_args_parser

    from train.__main__ import build_parser as train_parser
    from train.config import resolve

    ctx = Context("cuda", tmp_path, 0.0, {})
    ctx.shards.mkdir()
    for made_by_an_earlier_command in ("ijb", "val_bins", "short_torch"):
        (tmp_path / made_by_an_earlier_command).mkdir()
    (tmp_path / "short_torch" / "model.pt").touch()
    seen = set()
    for command in gpu_check.planned_commands(ctx):
        assert command.argv[:2] == (sys.executable, "-m"), command.shown()
        module, args = command.argv[2], list(command.argv[3:])
        if module == "torch.distributed.run":
            launch = get_args_parser().parse_args(args)
            assert launch.module and launch.training_script == "train"
            module, args = "train", launch.training_script_args
        if module == "train":
            parsed = train_parser().parse_args(args)
            if not parsed.resume:
                assert resolve(parsed)["deterministic"]
        elif module == "pytest":
            assert (REPO / args[-1]).is_file()
        else:
            parser = importlib.import_module(
                module if module.startswith("bench.") else f"{module}.__main__"
                if module == "evaluate" else module).build_parser()
            parsed = parser.parse_args(args)
            if hasattr(parsed, "device"):
                assert parsed.device == "cuda", command.shown()
        seen.add(command.argv[2])
    assert seen == {"data_engine.shard", "pytest", "train", "torch.distributed.run",
                    "bench.pixel_compare", "evaluate", "bench.loader", "bench.train_step",
                    "bench.heads"}


def test_weight_comparison_by_hand(tmp_path) -> None:
    import torch

    base = {"w": torch.tensor([2.0, -4.0]), "steps": torch.tensor(3)}
    torch.save(base, tmp_path / "a.pt")
    cases = {"same": [2.0, -4.0], "close": [2.0, -4.02], "far": [2.0, -4.08]}
    for name, values in cases.items():
        torch.save({**base, "w": torch.tensor(values)}, tmp_path / f"{name}.pt")
    same = compare_weights(tmp_path / "a.pt", tmp_path / "same.pt")
    assert same["weights_identical"] and same["weights_match"]
    close = compare_weights(tmp_path / "a.pt", tmp_path / "close.pt")
    assert not close["weights_identical"] and close["weights_match"]
    assert close["max_rel_weight_diff"] == pytest.approx(0.02 / 4) and close["worst_tensor"] == "w"
    far = compare_weights(tmp_path / "a.pt", tmp_path / "far.pt")  # 0.08 / 4 = 2 % > 1 %
    assert not far["weights_match"]


def _metrics(run, losses: list[float]) -> None:
    run.mkdir()
    rows = [{"step": i + 1, "loss": loss, "samples_per_s": 1.0, "images_per_s": 3.0}
            for i, loss in enumerate(losses)]
    rows.insert(1, {"step": 1, "kind": "val", "mean": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loss_comparison_by_hand(tmp_path) -> None:
    """Relative to max(|loss|, 1): attfc's first loss is ~0, a decoder's rounding moves it
    by far less than 1e-2 in absolute terms."""
    _metrics(tmp_path / "a", [0.0002, 36.0, 35.0, 34.0, 1.0])
    _metrics(tmp_path / "b", [0.0003, 36.1, 35.0, 34.0, 9.0])  # step 5 is not compared
    _metrics(tmp_path / "c", [0.0002, 36.0, 35.0, 33.0])
    close = compare_losses(tmp_path / "a", tmp_path / "b")
    assert close["steps"] == [1, 2, 3, 4] and close["losses_match"]
    assert close["max_rel_loss_diff"] == pytest.approx(0.1 / 36)
    assert not compare_losses(tmp_path / "a", tmp_path / "c")["losses_match"]  # 1/34 > 1e-2


def test_pixel_agreement_sees_another_steps_images() -> None:
    import torch

    from bench.pixel_compare import agreement

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=generator)
    rounded = (images.int() + torch.randint(-1, 2, images.shape, generator=generator)).clamp(
        0, 255).to(torch.uint8)  # a decoder rounding one level either way
    assert agreement(rounded, images)["ok"]
    swapped = images.clone()
    swapped[3] = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=generator)
    result = agreement(swapped, images)  # one image of eight from another step
    assert not result["ok"] and result["max_abs_diff"] > 100
