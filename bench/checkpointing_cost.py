"""Step-time cost of ``--activation-checkpointing``: the same training step timed with and
without it, interleaved in one process, as wall-clock and CPU-time ratios.

One model, one optimizer, one batch: the flag is an attribute of the feature encoder read at
each forward, so the two modes alternate round by round and share whatever load the machine
is under; the ratio of their sums is the cost (the issue's goal: at most 1.35x). CPU time
(``time.process_time``, all threads of the process) counts the work done whatever else runs.

    python -m bench.checkpointing_cost --network r18 --batch-size 16 --rounds 6 --device cpu

The last line printed is JSON: {"wall_ratio", "cpu_ratio", per-round ratios, the settings,
"load_average"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import torch

from bench.machine import cpu_model
from common.cli import ArgumentParser, positive_int, run_cli, setup_logging
from common.device import resolve_device


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def build_step(args: SimpleNamespace) -> tuple:
    """The real training step (train.step.TrainStep) of a ``--head`` model and one batch."""
    from model.backbones import get_model
    from model.heads import build_head
    from model.margins import build_margin
    from train.loop import resolve_precision
    from train.step import TrainStep, make_optimizer

    torch.manual_seed(0)
    device = args.device
    backbone = get_model(args.network, embedding_size=args.embedding_size,
                         **json.loads(args.network_args or "{}")).to(device)
    head = build_head(args.head, num_classes=args.num_classes,
                      embedding_size=args.embedding_size, batch_size=args.batch_size,
                      margin=build_margin("arcface"),
                      feature_encoder=backbone if args.head == "attfc" else None,
                      k=args.k).to(device)
    params = [p for m in (backbone, head) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(backbone, head, optimizer, device=device,
                     precision=resolve_precision("auto", device),
                     channels_last=device.startswith("cuda"))
    B, k = args.batch_size, args.k if head.needs_class_images else 0
    batch = SimpleNamespace(
        identity=torch.randint(0, 256, (B, 3, 112, 112), dtype=torch.uint8, device=device),
        classes=torch.randint(0, 256, (B, k, 3, 112, 112), dtype=torch.uint8, device=device),
        labels=torch.randint(0, args.num_classes, (B,), device=device))
    return backbone, step, batch


def measure(args: SimpleNamespace) -> dict:
    """Rounds of ``--steps`` steps without, then with, checkpointing (after a warm-up step
    of each); the ratios of the summed times."""
    backbone, step, batch = build_step(args)
    spent = {False: [0.0, 0.0], True: [0.0, 0.0]}  # checkpointing -> [wall, cpu]
    rounds = []
    for checkpointing in (False, True):
        backbone.activation_checkpointing = checkpointing
        step(batch, lr=0.1)
    for _ in range(args.rounds):
        this_round = {}
        for checkpointing in (False, True):
            backbone.activation_checkpointing = checkpointing
            _sync(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(batch, lr=0.1)
            step.read_loss()
            _sync(args.device)
            this_round[checkpointing] = (time.perf_counter() - wall, time.process_time() - cpu)
            spent[checkpointing][0] += this_round[checkpointing][0]
            spent[checkpointing][1] += this_round[checkpointing][1]
        rounds.append(round(this_round[True][0] / this_round[False][0], 3))
    return {"wall_ratio": round(spent[True][0] / spent[False][0], 3),
            "cpu_ratio": round(spent[True][1] / spent[False][1], 3),
            "wall_ratio_per_round": rounds,
            "step_s_plain": round(spent[False][0] / (args.rounds * args.steps), 3),
            "step_s_checkpointing": round(spent[True][0] / (args.rounds * args.steps), 3)}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.checkpointing_cost", description=__doc__)
    parser.add_argument("--network", default="r18", help="feature encoder")
    parser.add_argument("--network-args", default="",
                        help="extra get_model keyword arguments as JSON (as python -m train)")
    parser.add_argument("--head", default="fc", choices=["fc", "partialfc", "attfc"])
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--k", type=positive_int, default=2, help="attfc class images")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--rounds", type=positive_int, default=6,
                        help="alternations of the two modes")
    parser.add_argument("--steps", type=positive_int, default=2, help="steps per mode a round")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda[:N]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    args.device = resolve_device(args.device)
    result = measure(args)
    result.update(network=args.network, head=args.head, batch_size=args.batch_size,
                  rounds=args.rounds, steps=args.steps, threads=torch.get_num_threads(),
                  device=(torch.cuda.get_device_name(args.device)
                          if args.device.startswith("cuda") else cpu_model()),
                  load_average=[round(x, 2) for x in os.getloadavg()],
                  command=" ".join(["python -m bench.checkpointing_cost",
                                    *(argv if argv is not None else sys.argv[1:])]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_cli("bench.checkpointing_cost", main)
