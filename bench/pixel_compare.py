"""Pixels of the same steps from three loaders, against the torch backend's CPU decode
(simplejpeg, libjpeg-turbo) of the same JPEGs, flips and order:

- DALI on ``--device`` ("mixed", nvJPEG, on CUDA);
- the torch backend on ``--device`` read through the training loop's prefetch thread
  (``train.prefetch.Prefetcher``, depth 2): pinned slots, the copy to the GPU and its
  "copy finished" event, as ``python -m train --backend torch`` runs them. A slot handed
  back before its copy ends shows here as another step's pixels.

    python -m bench.pixel_compare --shards SHARDS --device cuda

The last line printed is one JSON object; exit 0 whatever the verdict ("ok" in the JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import ArgumentParser, positive_int, run_cli

if TYPE_CHECKING:
    import argparse

    import torch

# Agreement of two JPEG decoders on the same files, in levels of 0..255. nvJPEG and
# libjpeg-turbo round their IDCT and chroma upsampling differently: a few levels at edges.
MEAN_TOLERANCE = 1.0
P999_TOLERANCE = 8.0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.pixel_compare", description=__doc__)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu or cuda")
    parser.add_argument("--batch-size", type=positive_int, default=384)
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--workers", type=positive_int, default=2)
    return parser


def first_steps(batches: Iterable, steps: int) -> torch.Tensor:
    """identity and class images of the first ``steps`` batches, on the host, concatenated."""
    import torch

    parts = []
    for step, batch in enumerate(batches):
        parts.append(torch.cat([batch.identity, batch.classes.flatten(0, 1)]).cpu().contiguous())
        if step + 1 == steps:
            break
    return torch.cat(parts)


def agreement(images: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    import torch

    diff = (images.int() - reference.int()).abs().float()
    mean, p999 = diff.mean().item(), torch.quantile(diff.flatten()[::7], 0.999).item()
    return {"ok": mean <= MEAN_TOLERANCE and p999 <= P999_TOLERANCE,
            "mean_abs_diff": mean, "p999_abs_diff": p999, "max_abs_diff": diff.max().item(),
            "share_pixels_over_2": (diff > 2).float().mean().item()}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from data_engine.loading.loader import build_loader
    from train.prefetch import Prefetcher

    def loader(backend: str, device: str):
        return build_loader(args.shards, args.batch_size, 2, seed=0, backend=backend,
                            device=device, workers=args.workers)

    with loader("torch", "cpu") as cpu:
        reference = first_steps(cpu, args.steps)
    with loader("torch", args.device) as torch_loader:
        torch_loader.start()  # workers forked before CUDA is touched, as training does
        with Prefetcher(torch_loader, 2) as batches:
            torch_result = agreement(first_steps(batches, args.steps), reference)
    with loader("dali", args.device) as dali:
        dali_result = agreement(first_steps(dali, args.steps), reference)
    return {"ok": dali_result["ok"] and torch_result["ok"], "images": reference.shape[0],
            "dali_device": "mixed" if args.device.startswith("cuda") else "cpu",
            "dali_vs_cpu_decode": dali_result, "torch_prefetched_vs_cpu_decode": torch_result,
            "tolerance": {"mean_abs_diff": MEAN_TOLERANCE, "p999_abs_diff": P999_TOLERANCE}}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(compare(args)))
    return 0


if __name__ == "__main__":
    run_cli("bench.pixel_compare", main)
