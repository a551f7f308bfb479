"""README's "Which GPU do I need" table: the planner's predicted peak for attfc at the paper's
settings (B=384, k=2, r=0.3, bf16) per network and N, and what fits each card.

    python -m bench.plan_table

A card's budget is its memory less 0.5 GiB for the CUDA context, which
``max_memory_allocated`` (what the planner predicts) does not count. Per card: ``B=384`` when
the plain step fits, ``ckpt`` when it fits with --activation-checkpointing, ``ckpt, acc N``
with that and --accumulate N (the batch stays 384, N micro-batches of 384/N), ``-`` when
nothing up to N=8 does. Predictions, not measurements; bench/plan_error.py gives the
planner's error. Needs no GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import ArgumentParser, run_cli

CARDS_GIB = (8, 12, 16, 24, 80)
CONTEXT_GIB = 0.5
NETWORKS = ("mbf", "r50", "r100")
CLASSES = (93_000, 1_000_000, 2_000_000)


def _cell(peaks: dict[str, float], budget: float) -> str:
    return next((label for label, peak in peaks.items() if peak <= budget), "-")


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
            peaks = {"B=384": predict(config, n).peak / GIB}
            config["activation_checkpointing"] = True
            peaks["ckpt"] = predict(config, n).peak / GIB
            for micro in (2, 4, 8):
                if min(peaks.values()) <= CARDS_GIB[0] - CONTEXT_GIB:
                    break
                peaks[f"ckpt, acc {micro}"] = predict({**config, "accumulate": micro},
                                                      n).peak / GIB
            cells = [_cell(peaks, card - CONTEXT_GIB) for card in CARDS_GIB]
            print(f"| {network} | {n:,} | {peaks['B=384']:.1f} | {peaks['ckpt']:.1f} | "
                  + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    run_cli("bench.plan_table", main)
