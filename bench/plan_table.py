"""README's "Which GPU do I need" table: the planner's predicted peak for attfc at the paper's
settings (B=384, k=2, r=0.3, bf16) per network and N, and what fits each card.

    python -m bench.plan_table

A card's budget is its memory less 0.5 GiB for the CUDA context, which
``max_memory_allocated`` (what the planner predicts) does not count. Per card: ``B=384`` when
the plain step fits, ``ckpt`` when it fits with --activation-checkpointing, ``ckpt B=n`` the
largest B (a multiple of 8) that fits with it (the peak is affine in B: read off B=384 and
192), ``-`` when nothing does. Predictions, not measurements; bench/plan_error.py gives the
planner's error. Needs no GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import ArgumentParser, run_cli

CARDS_GIB = (8, 12, 16, 24, 80)
CONTEXT_GIB = 0.5
NETWORKS = ("mbf", "r50", "r100")
CLASSES = (93_000, 1_000_000, 2_000_000)


def _cell(plain: float, checkpointed: float, per_sample: float, budget: float) -> str:
    if plain <= budget:
        return "B=384"
    if checkpointed <= budget:
        return "ckpt"
    batch = int((budget - (checkpointed - per_sample * 384)) / per_sample) // 8 * 8
    return f"ckpt B={batch}" if batch >= 8 else "-"


def main(argv: Sequence[str] | None = None) -> int:
    ArgumentParser(prog="python -m bench.plan_table",
                   description=__doc__.split("\n\n")[0]).parse_args(argv)
    from train.config import DEFAULTS
    from train.plan import GIB, predict

    print("| network | N | peak (GiB) | with ckpt | "
          + " | ".join(f"{card} GB" for card in CARDS_GIB) + " |")
    print("|---|---|---|---|" + "---|" * len(CARDS_GIB))
    for network in NETWORKS:
        for n in CLASSES:
            config = {**DEFAULTS, "network": network, "head": "attfc", "batch_size": 384,
                      "k": 2, "sample_rate": 0.3, "precision": "bf16"}
            plain = predict(config, n).peak / GIB
            config["activation_checkpointing"] = True
            checkpointed = predict(config, n).peak / GIB
            half = predict(config, n, 192).peak / GIB
            per_sample = (checkpointed - half) / 192
            cells = [_cell(plain, checkpointed, per_sample, card - CONTEXT_GIB)
                     for card in CARDS_GIB]
            print(f"| {network} | {n:,} | {plain:.1f} | {checkpointed:.1f} | "
                  + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    run_cli("bench.plan_table", main)
