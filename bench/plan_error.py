"""The memory planner (``python -m train --plan``) against the H200 peaks in BENCHMARKS.md.

R50, B=384, k=2, bf16, fused SGD, CUDA ``max_memory_allocated`` (bench/train_step.py,
2026-11-27). The planner's two fitted constants come from the 93k rows only; this script fits
them again from the raw (unfitted) predictions, so a drift between the fit and the constants
in train/plan.py shows, and reports the two 1M rows as held out.

    python -m bench.plan_error

Needs no GPU (fake tensors). The last line printed is JSON: {"fit": {...}, "rows": [...]}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from common.cli import ArgumentParser, run_cli

# (head, N, measured peak GiB, used for the fit)
MEASURED = (("fc", 93_000, 14.58, True), ("attfc", 93_000, 19.34, True),
            ("fc", 1_000_000, 26.67, False), ("attfc", 1_000_000, 19.86, False))


def _config(head: str) -> dict:
    from train.config import DEFAULTS

    return {**DEFAULTS, "network": "r50", "head": head, "batch_size": 384, "k": 2,
            "precision": "bf16"}


def main(argv: Sequence[str] | None = None) -> int:
    ArgumentParser(prog="python -m bench.plan_error",
                   description=__doc__.split("\n\n")[0]).parse_args(argv)
    from train.plan import GIB, predict

    rows = []
    for head, n, measured, fitted in MEASURED:
        plan = predict(_config(head), n)
        overhead = plan.components["cudnn_and_allocator"]
        rows.append({"head": head, "n": n, "measured_gib": measured, "fit_on": fitted,
                     "raw_gib": (plan.peak - overhead) / GIB,
                     "class_encoder_working_set_gib":
                         plan.components["class_encoder_working_set"] / GIB,
                     "predicted_gib": plan.peak / GIB})
    fc, attfc = (r for r in rows if r["fit_on"])
    constant = fc["measured_gib"] - fc["raw_gib"]
    share = ((attfc["measured_gib"] - attfc["raw_gib"] - constant)
             / attfc["class_encoder_working_set_gib"])
    print(f"fit on the 93k rows: constant {constant:.4f} GiB, class-encoder share "
          f"{share:.4f}")
    print(f"{'head':<6} {'N':>9} {'measured':>9} {'predicted':>9} {'error':>7}")
    for row in rows:
        row["error"] = row["predicted_gib"] / row["measured_gib"] - 1
        print(f"{row['head']:<6} {row['n']:>9,} {row['measured_gib']:>9.2f} "
              f"{row['predicted_gib']:>9.2f} {row['error']:>+7.1%}"
              + ("" if row["fit_on"] else "  (held out)"))
    print(json.dumps({"fit": {"constant_gib": constant, "class_encoder_share": share},
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    run_cli("bench.plan_error", main)
