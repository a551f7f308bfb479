"""Full training-step throughput and peak memory: fc vs attfc heads at N identities.

Times the real step from ``train.step`` (feature encoder forward/backward, class encoder
forward for attfc, head, fused SGD, momentum update) on decoded uint8 batches already on the
device, so the loader is out of the picture. Each (head, N) runs in its own process so peak
memory is clean: CUDA ``max_memory_allocated`` on a GPU; peak RSS of the process (the Python
and torch baseline included) on the CPU.

GPU (the project target, >= 4000 samples/s for attfc at N = 1M on an H100):
    python -m bench.train_step --network r50 --batch-size 384 --num-classes 93000 1000000
CPU smoke version:
    python -m bench.train_step --network mbf --batch-size 32 --steps 5 --device cpu
The paper order's pre-pass under accumulation, against the official order's step:
    python -m bench.train_step --network r18 --batch-size 32 --num-classes 1000 \
        --heads attfc --accumulate 2 --update-order paper|official --device cpu

"official" is the official AttFC code's formulation of the head (bench/official_attfc.py), so
``attfc_vs_official`` compares ours with the paper's own implementation in the same run.

The last line printed is JSON: {"results": [{head, n, network, batch_size, samples_per_s,
peak_mem_bytes, device, ...}], "attfc_vs_fc": ..., "attfc_vs_official": ...}.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from types import SimpleNamespace

import torch

from bench.machine import cpu_model
from common.cli import ArgumentParser, positive_int, run_cli, setup_logging
from common.device import resolve_device
from model.names import UPDATE_ORDERS


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(args: SimpleNamespace, head_name: str, num_classes: int) -> dict:
    """One configuration, in the calling process: warm up, then time ``args.steps`` steps."""
    from model.backbones import get_model
    from model.heads import build_head
    from model.margins import build_margin
    from train.loop import resolve_precision
    from train.metrics import peak_memory_bytes
    from train.step import TrainStep, make_optimizer

    device, cuda = args.device, args.device.startswith("cuda")
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    backbone = get_model(args.network, embedding_size=args.embedding_size,
                         **json.loads(args.network_args or "{}")).to(device)
    if cuda:
        backbone = backbone.to(memory_format=torch.channels_last)
    if head_name == "official":
        from bench.official_attfc import OfficialAttFCHead

        head = OfficialAttFCHead(backbone, num_classes, args.embedding_size, args.batch_size,
                                 build_margin("arcface"), k=args.k).to(device)
    else:
        head = build_head(head_name, num_classes=num_classes,
                          embedding_size=args.embedding_size, batch_size=args.batch_size,
                          margin=build_margin("arcface"),
                          feature_encoder=backbone if head_name == "attfc" else None,
                          k=args.k, update_order=args.update_order).to(device)
    params = [p for m in (backbone, head) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(backbone, head, optimizer, device=device, precision=precision,
                     channels_last=cuda, compile_backbone=args.compile,
                     accumulate=args.accumulate)
    if args.compile_class_encoder != "none" and hasattr(head, "class_encoder"):
        # In place (nn.Module.compile): the state dict keys stay; forward-only with static
        # shapes, so "reduce-overhead" can replay it as a CUDA graph.
        head.class_encoder.compile(mode=args.compile_class_encoder)

    B, k = args.batch_size, args.k
    batches = [SimpleNamespace(
        identity=torch.randint(0, 256, (B, 3, 112, 112), dtype=torch.uint8, device=device),
        classes=torch.randint(0, 256, (B, k, 3, 112, 112), dtype=torch.uint8, device=device),
        labels=torch.randint(0, num_classes, (B,), device=device)) for _ in range(2)]
    for i in range(args.warmup):
        step(batches[i % 2], lr=0.1)
    _sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % 2], lr=0.1)
    loss = step.read_loss()  # also syncs, so the timing covers the queued work
    _sync(device)
    elapsed = time.perf_counter() - start
    syncs = _host_syncs_per_step(step, batches, device) if cuda else None
    parts = (_profile(step, batches[0], args.steps, device, elapsed / args.steps)
             if args.profile and head_name == "attfc" else None)
    return {"head": head_name, "n": num_classes, "network": args.network, "batch_size": B,
            "k": k, "accumulate": args.accumulate, "update_order": args.update_order,
            "precision": precision, "compile": args.compile,
            "compile_class_encoder": args.compile_class_encoder,
            "host_syncs_per_step": syncs, "profile": parts,
            "samples_per_s": B * args.steps / elapsed, "step_s": elapsed / args.steps,
            "peak_mem_bytes": peak_memory_bytes(device), "loss": loss,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "device": torch.cuda.get_device_name(device) if cuda else cpu_model()}


def _host_syncs_per_step(step, batches: list, device: str, steps: int = 2) -> float:
    """Operations that make the host wait for the GPU, per step (CUDA's sync debug mode)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(steps):
                step(batches[i % 2], lr=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def _timed(work, steps: int, device: str) -> float:
    """Seconds per call of ``work`` (after one untimed call), synchronised around."""
    work()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        work()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _profile(step, batch, steps: int, device: str, step_s: float) -> dict:
    """Where an attfc step's time goes: each part timed alone on the same model and batch,
    as shares of the full step; "head and glue" is what the parts leave (the attention
    loader, DCC push, chunked loss forward and backward, the uint8 conversions)."""
    from model.backbones import normalize_images

    backbone, head, optimizer = step.backbone, step.head, step.optimizer
    images = normalize_images(batch.identity).contiguous(memory_format=torch.channels_last)
    class_images = normalize_images(batch.classes)

    def feature_encoder() -> None:
        with step._autocast():
            features = step.forward_backbone(images)
        features.float().square().mean().backward()

    def class_encoder() -> None:
        with step._autocast():
            head.encode_classes(class_images)

    seconds = {"feature_encoder_fwd_bwd": _timed(feature_encoder, steps, device),
               "class_encoder_fwd": _timed(class_encoder, steps, device),
               "optimizer_step": _timed(optimizer.step, steps, device),
               "momentum_update": _timed(lambda: head.after_optimizer_step(backbone), steps,
                                         device)}
    optimizer.zero_grad(set_to_none=True)
    seconds["head_and_glue"] = step_s - sum(seconds.values())  # < 0: noise, retime
    return {"step_ms": round(1e3 * step_s, 2),
            "ms": {name: round(1e3 * value, 2) for name, value in seconds.items()},
            "percent": {name: round(100 * value / step_s, 1) for name, value in seconds.items()}}


def _child(args: SimpleNamespace, head: str, n: int, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(measure(args, head, n))
    except BaseException as error:  # reported by the parent
        queue.put({"head": head, "n": n, "error": f"{type(error).__name__}: {error}"})


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.train_step", description=__doc__)
    parser.add_argument("--network", default="r50", help="feature encoder")
    parser.add_argument("--network-args", default="",
                        help="extra get_model keyword arguments as JSON (as python -m train)")
    parser.add_argument("--batch-size", type=positive_int, default=384)
    parser.add_argument("--k", type=positive_int, default=2, help="attfc class images")
    parser.add_argument("--accumulate", type=positive_int, default=1,
                        help="micro-batches per step (as python -m train)")
    parser.add_argument("--update-order", default="paper", choices=UPDATE_ORDERS,
                        help="attfc: container update order (as python -m train)")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    parser.add_argument("--heads", nargs="+", default=["fc", "attfc", "official"],
                        choices=["fc", "partialfc", "attfc", "official"],
                        help="official: the official AttFC code's formulation of the head "
                             "(bench/official_attfc.py)")
    parser.add_argument("--num-classes", type=positive_int, nargs="+", default=[93_000, 1_000_000],
                        help="identity counts N")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--profile", action="store_true",
                        help="attfc: also time each part of the step alone (percent of it)")
    parser.add_argument("--compile-class-encoder", default="none",
                        choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="attfc/official: torch.compile the class encoder in this mode "
                             "(reduce-overhead: CUDA graphs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.accumulate > 1 and "official" in args.heads:
        parser.error("--accumulate: the official head has no micro-batch hooks; leave it out "
                     "of --heads")
    if args.batch_size % args.accumulate:
        parser.error(f"--accumulate {args.accumulate}: --batch-size {args.batch_size} is not "
                     "a multiple of it")
    setup_logging(args.verbose)
    args.device = resolve_device(args.device)
    config = SimpleNamespace(**vars(args))
    context = multiprocessing.get_context("spawn")
    results = []
    for n in args.num_classes:
        for head in args.heads:
            queue = context.Queue()
            process = context.Process(target=_child, args=(config, head, n, queue))
            process.start()
            result = queue.get()
            process.join()
            results.append(result)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in result.items()), flush=True)
    summary: dict = {"results": results, "threads": torch.get_num_threads(),
                     "command": " ".join(["python -m bench.train_step", *(argv or sys.argv[1:])])}
    by_key = {(r["head"], r["n"]): r for r in results if "error" not in r}
    for baseline in ("fc", "official"):
        summary[f"attfc_vs_{baseline}"] = {
            str(n): {key: by_key[("attfc", n)][key] / by_key[(baseline, n)][key]
                     for key in ("samples_per_s", "peak_mem_bytes")}
            for n in args.num_classes if ("attfc", n) in by_key and (baseline, n) in by_key}
    print(json.dumps(summary))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    run_cli("bench.train_step", main)
