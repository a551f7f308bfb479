"""``python -m model.export RUN/model.pt --onnx out.onnx``: the feature encoder as ONNX.

The ONNX model takes float [N,3,112,112] RGB scaled to [-1, 1] (as insightface's ONNX
models do) with a dynamic batch size, or a fixed one with ``--fixed-batch N`` (for runtimes
that want static shapes), and returns the [N,D] embedding. The export is checked against
PyTorch with onnxruntime on random batches before the command reports success.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import ArgumentParser, existing_file, positive_int, run_cli, setup_logging
from common.errors import UserError
from model.weights import load_backbone

log = logging.getLogger("model.export")

INPUT, OUTPUT = "input", "embedding"


def export_onnx(backbone: nn.Module, path: Path, *, opset: int = 17,
                fixed_batch: int | None = None) -> None:
    """Write ``backbone`` (put in eval mode) as ONNX, batch dimension dynamic or fixed."""
    backbone.eval()
    example = torch.zeros(fixed_batch or 2, 3, 112, 112)
    dynamic = None if fixed_batch else {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, which
        # needs onnxscript; for a plain CNN both give the same graph.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(backbone, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes=dynamic)


@torch.inference_mode()
def max_difference(backbone: nn.Module, path: Path, batch_sizes: Sequence[int] = (1, 5),
                   seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| between L2-normalised embeddings of random batches.

    Normalised, because that is what recognition compares, and because raw embeddings can
    be ~1e4 in size (the final BatchNorm early in training), where float32 itself rounds by
    more than 1e-3.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    backbone = backbone.eval().cpu()
    worst = 0.0
    for batch_size in batch_sizes:
        x = torch.rand(batch_size, 3, 112, 112, generator=generator) * 2 - 1
        expected = F.normalize(backbone(x), dim=1)
        (got,) = session.run([OUTPUT], {INPUT: x.numpy()})
        got = F.normalize(torch.from_numpy(got), dim=1)
        worst = max(worst, float((got - expected).abs().max()))
    return worst


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m model.export", description=__doc__)
    parser.add_argument("model", type=existing_file, help="RUN/model.pt (or RUN/best.pt)")
    parser.add_argument("--onnx", required=True, type=Path, help="ONNX file to write")
    parser.add_argument("--network", default=argparse.SUPPRESS,
                        help="backbone name (default: from model.json beside the model, else "
                        "r50)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument("--fixed-batch", type=positive_int, metavar="N",
                        help="fix the batch dimension at N (default: dynamic)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed |ONNX - PyTorch| between L2-normalised embeddings "
                        "of the check batches")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    backbone = load_backbone(args.model, getattr(args, "network", None))
    args.onnx.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(backbone, args.onnx, opset=args.opset, fixed_batch=args.fixed_batch)
    batch_sizes = (args.fixed_batch,) if args.fixed_batch else (1, 5)
    difference = max_difference(backbone, args.onnx, batch_sizes)
    if difference > args.atol:
        raise UserError(f"{args.onnx}: outputs differ from PyTorch by {difference:.2e} "
                        f"(> --atol {args.atol:g})")
    print(f"wrote {args.onnx}: matches PyTorch within {difference:.2e} (L2-normalised "
          f"embeddings, onnxruntime, batch sizes {' and '.join(map(str, batch_sizes))})")
    return 0


if __name__ == "__main__":
    run_cli("model.export", main)
