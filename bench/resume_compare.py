"""Whether two training runs that should agree do: weights (a run stopped and resumed against
the straight one, torchrun against one process, a CPU checkpoint resumed on CUDA) and losses
step by step (two loader backends on the same sample order and initial weights)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.check_harness import CheckError, training_records
from common.run_folder import METRICS, MODEL

# Weights of two runs that are not bit-identical: per tensor, relative to its largest entry
# (bf16 keeps 8 significant bits: 2^-8 ~ 0.4 %).
WEIGHT_TOLERANCE = 1e-2
# Losses of the first logged steps of two runs whose batches differ only in JPEG decoder
# rounding (a few levels of 255 at edges), relative to max(|loss|, 1); a batch of other
# images moves it more.
LOSS_TOLERANCE = 1e-2
COMPARED_LOSSES = 4
STOP_MARKER = "stopped by SIGTERM at step "


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
        diff = (x - y).abs().max().item() / max(x.abs().max().item(), 1e-12)
        if diff > worst:
            worst, worst_key = diff, key
    return {"weights_identical": identical, "max_rel_weight_diff": worst,
            "worst_tensor": worst_key, "weight_tolerance": WEIGHT_TOLERANCE,
            "weights_match": identical or worst <= WEIGHT_TOLERANCE}


def compare_losses(a: Path, b: Path) -> dict[str, Any]:
    """The first logged losses of two runs, step by step (same steps logged in both)."""
    left, right = training_records(a)[:COMPARED_LOSSES], training_records(b)[:COMPARED_LOSSES]
    if not left or [r["step"] for r in left] != [r["step"] for r in right]:
        raise CheckError(f"{a} and {b} logged different steps: "
                         f"{[r['step'] for r in left]} vs {[r['step'] for r in right]}")
    diffs = [abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1.0)  # attfc's first: ~0
             for x, y in zip(left, right)]
    return {"steps": [r["step"] for r in left], "losses": [r["loss"] for r in left],
            "other_losses": [r["loss"] for r in right], "max_rel_loss_diff": max(diffs),
            "loss_tolerance": LOSS_TOLERANCE, "losses_match": max(diffs) <= LOSS_TOLERANCE}


def throughput(run_dir: Path) -> dict[str, Any]:
    """Median samples/s and images/s after the first two records, and peak memory."""
    records = training_records(run_dir)
    if not records:
        raise CheckError(f"{run_dir / METRICS}: no training records")
    steady = records[2:] or records
    return {"samples_per_s": round(statistics.median(r["samples_per_s"] for r in steady), 1),
            "images_per_s": round(statistics.median(r["images_per_s"] for r in steady), 1),
            "peak_mem_bytes": max(r.get("mem_bytes", 0) for r in records)}


def steps_per_epoch(shards: Path, batch: int) -> int:
    return json.loads((shards / "manifest.json").read_text())["num_images"] // batch


def resume_verdict(straight: Path, resumed: Path, stopped_output: str,
                   per_epoch: int) -> dict[str, Any]:
    """A run SIGTERMed in the middle of epoch 2 and resumed: it stopped there, finished all
    three epochs, and ends with the straight run's weights."""
    line = next((ln for ln in stopped_output.splitlines() if STOP_MARKER in ln), None)
    if line is None:
        raise CheckError(f"no '{STOP_MARKER}...' line after SIGTERM:\n{stopped_output[-2000:]}")
    step = int(line.split(STOP_MARKER)[1].split(";")[0])
    final = training_records(resumed)
    result = {"steps_per_epoch": per_epoch, "total_steps": 3 * per_epoch,
              "stopped_at_step": step, "stopped_in_epoch": (step - 1) // per_epoch + 1,
              "stopped_mid_epoch": step % per_epoch != 0,
              "resumed_final_step": final[-1]["step"] if final else None,
              **compare_weights(straight / MODEL, resumed / MODEL)}
    result["resumed_completed"] = result["resumed_final_step"] == 3 * per_epoch
    result["ok"] = (result["stopped_in_epoch"] == 2 and result["stopped_mid_epoch"]
                    and result["resumed_completed"] and result["weights_match"])
    return result
