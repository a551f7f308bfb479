"""``python -m train``: train a face recognition model on identity-grouped shards.

Defaults are the AttFC paper's (R50, B=384, SGD 0.9/5e-4, lr 0.1 cosine, 5 epochs, ArcFace
s=64 m=0.5, r=0.3, k=2, gamma=0.999). Settings come from the defaults, then --config FILE
(TOML), then flags. Outputs in --output RUN: config.toml, checkpoints/, metrics.jsonl,
tensorboard/, model.pt + model.json (feature encoder), best.pt (best validation).

examples:
  python -m train --shards shards/ --output runs/r50 --val val_bins/
  python -m train --output runs/r50 --resume
  torchrun --nproc_per_node 8 -m train --shards shards/ --output runs/r50 --batch-size 48
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from common.cli import ArgumentParser, run_cli, setup_logging
from common.errors import UserError
from common.files import WriteError, write_atomic
from common.run_folder import CHECKPOINTS_DIR, CONFIG
from train.config import add_options, resolve, to_toml

log = logging.getLogger("train")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    config = resolve(args)
    if args.plan:
        return print_plan(args, config)
    if args.gpu_memory is not None:
        config = fit_to_memory(args, config)
    text = to_toml(config)
    from train.distributed import launch_rank  # torch loads only after the flags are fine

    main_rank = launch_rank() == 0  # under torchrun rank 0 speaks and writes for the run
    if main_rank:
        print("effective config:\n" + text, end="", flush=True)

    from train.loop import Trainer

    run_dir = Path(config["output"])
    try:
        trainer = Trainer(config, resume=args.resume, inject_nan=args.inject_nan_at_step)
        if main_rank:
            write_atomic(run_dir / CONFIG, text.encode())
        return trainer.fit()
    except WriteError as error:
        raise WriteError(f"{error}; {resume_hint(run_dir)}", error.path) from None


def _num_classes(args: argparse.Namespace, config: dict) -> int:
    """--num-classes, else the shards' identity count."""
    from data_engine.layout import read_manifest

    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num-classes {args.num_classes}: must be >= 1")
    return args.num_classes or read_manifest(Path(config["shards"]))["num_identities"]


def print_plan(args: argparse.Namespace, config: dict) -> int:
    """``--plan``: the predicted peak GPU memory (train/plan.py), as a table or JSON."""
    import json

    from train.plan import format_report, plan_report

    report = plan_report(config, _num_classes(args, config), args.gpu_memory)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def fit_to_memory(args: argparse.Namespace, config: dict) -> dict:
    """Training with --gpu-memory: turn on activation checkpointing, then accumulation, when
    the planner says the step needs it to fit (saved in config.toml), or stop before anything
    starts."""
    from train import plan

    fitted = plan.fit_to_memory(config, _num_classes(args, config), args.gpu_memory)
    if fitted != config:
        log.info("--gpu-memory %g: %s, so the step fits", args.gpu_memory,
                 plan.changes(config, fitted))
    return fitted


def resume_hint(run_dir: Path) -> str:
    """What to do after a write failed mid-run: which checkpoint survives, how to go on."""
    from train.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir / CHECKPOINTS_DIR)
    if not found:
        return "no checkpoint written yet: free space, then start the run again"
    return (f"last good checkpoint {found[0]}; free space, then resume with: "
            f"python -m train --output {run_dir} --resume")


if __name__ == "__main__":
    run_cli("train", main)
