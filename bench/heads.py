"""Head step time and peak memory for fc, partialfc and attfc at face-dataset scale.

What one step includes ("head alone"): random features [B, D] in (a leaf that requires grad,
standing in for the backbone output), the head's forward + loss, backward down to the
features, the SGD step on the head's own parameters (momentum 0.9, wd 5e-4; fc and partialfc
only: attfc has none) and ``after_optimizer_step``. For attfc the class encoder is replaced by
``nn.Flatten`` fed class *features* [B, k, D, 1, 1], so the backbone cost is excluded but the
attention loader (Eq. 8-9), DCC push, masked chunked loss (Eq. 10-11) are all in.

"official" is the official AttFC code's formulation of the same head (bench/official_attfc.py:
materialised B×(1+S) logits, mask by arithmetic, standard cross-entropy, attention weights on
the host), so ``attfc_vs_official`` is ours against the paper's own implementation.

Each (head, N) runs in its own subprocess so peak memory is not polluted by the others:
- CUDA: ``torch.cuda.max_memory_allocated()`` minus what was allocated before the head was
  built (features, labels), i.e. head parameters + optimizer state + activations + grads.
- CPU: the worker's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS just
  before the head was built; large tensors are mmap'd by malloc and returned on free, so RSS
  tracks live tensor memory.

Usage: .venv/bin/python -m bench.heads [--n 93431 1000000 2000000] [--batch-size 384]
The last line printed is one JSON object {"results": [{head, n, step_s, peak_mem_bytes}, ...],
"ratios": [...vs fc], "attfc_vs_official": [...]}.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

from bench.machine import cpu_model
from common.cli import ArgumentParser, positive_int, run_cli
from common.device import apply_tf32_policy, resolve_device

HEADS = ("fc", "partialfc", "attfc", "official")
DTYPES = ("float32", "float16", "bfloat16")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _make_head(name: str, num_classes: int, args, **attfc_options):
    """One of HEADS with the class encoder replaced by ``nn.Flatten`` (fed class features)."""
    from torch import nn

    from model.heads import build_head
    from model.margins import build_margin

    margin = build_margin("arcface")
    if name == "official":
        from bench.official_attfc import OfficialAttFCHead

        return OfficialAttFCHead(nn.Flatten(), num_classes, args.dim, args.batch_size, margin,
                                 sample_rate=args.sample_rate, k=args.k)
    return build_head(name, num_classes=num_classes, embedding_size=args.dim,
                      batch_size=args.batch_size, margin=margin, feature_encoder=nn.Flatten(),
                      sample_rate=args.sample_rate, k=args.k, **attfc_options)


def _touch_kernels(args, device) -> None:
    """Run every head once at toy size so lazily loaded kernels and thread pools are resident
    before the memory baseline is taken (otherwise they count as "head memory")."""
    import torch

    for name in HEADS:
        head = _make_head(name, 4 * args.batch_size, args).to(device)
        features = torch.randn(args.batch_size, args.dim, device=device, requires_grad=True)
        labels = torch.randint(0, 4 * args.batch_size, (args.batch_size,), device=device)
        class_features = torch.randn(args.batch_size, args.k, args.dim, 1, 1, device=device)
        head(features, labels, class_features).loss.backward()
        params = [p for p in head.parameters() if p.requires_grad]
        if params:
            torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4).step()


def _worker(args) -> dict:
    """Build one head at one N, time ``--steps`` steps after ``--warmup``, measure peak memory."""
    import torch
    from torch import nn

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    apply_tf32_policy()
    _touch_kernels(args, device)
    torch.manual_seed(0)
    batch, dim, n = args.batch_size, args.dim, args.n[0]
    features = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(0, n, (batch,), device=device)
    class_features = torch.randn(batch, args.k, dim, 1, 1, device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    options = ({"dcc_dtype": getattr(torch, args.dcc_dtype), "chunk_size": args.chunk_size}
               if args.head == "attfc" else {})
    head = _make_head(args.head, n, args, **options).to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4) if params else None
    inputs = class_features if head.needs_class_images else None

    def step() -> None:
        out = head(features, labels, inputs)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        head.after_optimizer_step(nn.Flatten())
        features.grad = None

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"head": args.head, "n": n, "step_s": step_s, "peak_mem_bytes": int(peak),
            "tf32": torch.backends.cuda.matmul.allow_tf32}


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def _run_one(args, head: str, n: int) -> dict:
    cmd = [sys.executable, "-m", "bench.heads", "--worker", "--head", head, "--n", str(n),
           "--batch-size", str(args.batch_size), "--dim", str(args.dim), "--k", str(args.k),
           "--sample-rate", str(args.sample_rate), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device,
           "--dcc-dtype", args.dcc_dtype, "--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        print(f"{head} n={n}: failed: {reason}", file=sys.stderr)
        return {"head": head, "n": n, "step_s": None, "peak_mem_bytes": None, "error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.heads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=positive_int, nargs="+", default=[93431, 1_000_000, 2_000_000],
                        help="numbers of identities (MS1MV3, WebFace21M, WebFace42M sizes)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--batch-size", type=positive_int, default=384)
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--k", type=positive_int, default=2, help="class images per sample")
    parser.add_argument("--sample-rate", type=float, default=0.3)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda")
    parser.add_argument("--dcc-dtype", choices=DTYPES, default="float32")
    parser.add_argument("--chunk-size", type=positive_int, default=65536,
                        help="attfc: DCC entries per logit chunk")
    parser.add_argument("--head", choices=HEADS, help="(internal) run one head in this process")
    parser.add_argument("--worker", action="store_true", help="(internal)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.sample_rate <= 1:
        parser.error(f"--sample-rate {args.sample_rate}: must be in (0, 1]")
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    args.device = resolve_device(args.device)
    results = []
    for n in args.n:
        for head in args.heads:
            result = _run_one(args, head, n)
            results.append(result)
            if result["step_s"] is not None:
                print(f"{head:>9} n={n:>8}: {result['step_s']:8.3f} s/step  "
                      f"peak {result['peak_mem_bytes'] / 2**30:7.3f} GiB", flush=True)
    by_key = {(r["head"], r["n"]): r for r in results}
    ratios = []
    for r in results:
        fc = by_key.get(("fc", r["n"]))
        if r["head"] != "fc" and fc and fc["step_s"] and r["step_s"]:
            ratio = {"head": r["head"], "n": r["n"], "time_vs_fc": r["step_s"] / fc["step_s"],
                     "mem_vs_fc": r["peak_mem_bytes"] / fc["peak_mem_bytes"]}
            ratios.append(ratio)
            print(f"{r['head']:>9} n={r['n']:>8}: {ratio['time_vs_fc']:.3f}x fc time, "
                  f"{ratio['mem_vs_fc']:.3f}x fc memory")
    versus_official = []
    for n in args.n:
        ours, official = by_key.get(("attfc", n)), by_key.get(("official", n))
        if ours and official and ours["step_s"] and official["step_s"]:
            ratio = {"n": n, "time": ours["step_s"] / official["step_s"],
                     "mem": ours["peak_mem_bytes"] / official["peak_mem_bytes"]}
            versus_official.append(ratio)
            print(f"    attfc n={n:>8}: {ratio['time']:.3f}x official attfc time, "
                  f"{ratio['mem']:.3f}x its memory")
    print(json.dumps({"results": results, "ratios": ratios,
                      "attfc_vs_official": versus_official, "machine": _machine(args.device),
                      "device": args.device, "batch_size": args.batch_size, "dim": args.dim,
                      "sample_rate": args.sample_rate, "dcc_dtype": args.dcc_dtype,
                      "steps": args.steps}))
    return 0


if __name__ == "__main__":
    run_cli("bench.heads", main)
