"""Time per step of ``torchrun --nproc_per_node G -m train`` against one process, same global
batch, on the same shards in the same run.

Both are the real CLI end to end (loader, step, collectives, bookkeeping): one process with
``--batch-size B`` and G ranks with ``--batch-size B/G`` each. The time per step is the
median of ``global_batch / samples_per_s`` over the logged steps after ``--warmup`` (samples/s
in metrics.jsonl excludes checkpoints and validation). The machine's threads are split
evenly: the single process gets all of ``--threads``, each rank ``threads / G``, so the ratio
is the cost of running distributed on the same hardware. On the CPU (gloo) that cost is the
collectives (the all-reduced gradients, all-gathered features or GCCs, --sync-bn's sums) and
G interpreters sharing the cores.

    python -m bench.distributed --head attfc --batch-size 32 --steps 12
    python -m bench.distributed --device cuda --ranks 1 --network r50 --batch-size 128

``--ranks 1 --device cuda``: torchrun with one process (NCCL, world size 1, DDP wrapper)
against the plain non-distributed run. The last line printed is JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import describe
from common.cli import ArgumentParser, positive_int, run_cli
from common.run_folder import TRAIN_KIND, read_metrics

REPO = Path(__file__).resolve().parents[1]


def _step_seconds(run: Path, warmup: int) -> float:
    train = [r for r in read_metrics(run, TRAIN_KIND) if r["step"] > warmup]
    if not train:
        raise SystemExit(f"{run}: no logged step after --warmup {warmup}")
    return statistics.median(r["global_batch"] / r["samples_per_s"] for r in train)


def _train(command: list[str], threads: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ...: exit {done.returncode}\n"
                         f"{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.distributed", description=__doc__)
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--head", default="attfc", choices=("attfc", "fc", "partialfc"))
    parser.add_argument("--network", default="mbf")
    parser.add_argument("--network-args", default='{"blocks": [1, 1, 1, 1], "scale": 1}')
    parser.add_argument("--embedding-size", type=positive_int, default=64)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="global batch")
    parser.add_argument("--steps", type=positive_int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="logged steps left out")
    parser.add_argument("--identities", type=positive_int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--sync-bn", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size % args.ranks:
        parser.error(f"--batch-size {args.batch_size} does not split over {args.ranks} ranks")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = max(8, -(-args.batch_size * (args.steps + 1) // args.identities))
        _train([sys.executable, "-m", "data_engine.shard", "--src", "synthetic",
                "--identities", str(args.identities), "--images-per-identity", str(images),
                "--out", str(root / "shards")], args.threads)
        common = ["--shards", str(root / "shards"), "--network", args.network,
                  "--network-args", args.network_args, "--embedding-size",
                  str(args.embedding_size), "--head", args.head, "--device", args.device,
                  "--max-steps", str(args.steps), "--log-every", "1", "--val", "none",
                  "--no-tensorboard", "--epochs", "1", "--ckpt-every", "100000"]
        _train([sys.executable, "-m", "train", "--output", str(root / "one"), *common,
                "--batch-size", str(args.batch_size)], args.threads)
        torchrun = str(Path(sys.executable).parent / "torchrun")
        _train([torchrun, "--standalone", "--nproc_per_node", str(args.ranks), "-m", "train",
                "--output", str(root / "ranks"), *common,
                "--batch-size", str(args.batch_size // args.ranks),
                *(["--sync-bn"] if args.sync_bn else [])],
               max(1, args.threads // args.ranks))
        one = _step_seconds(root / "one", args.warmup)
        ranks = _step_seconds(root / "ranks", args.warmup)
    print(f"one process, --batch-size {args.batch_size}: {one * 1e3:.1f} ms/step")
    print(f"{args.ranks} ranks x --batch-size {args.batch_size // args.ranks}: "
          f"{ranks * 1e3:.1f} ms/step ({ranks / one:.2f}x)")
    print(json.dumps({"head": args.head, "network": args.network, "device": args.device,
                      "global_batch": args.batch_size, "ranks": args.ranks,
                      "sync_bn": args.sync_bn, "threads": args.threads,
                      "one_process_step_s": one, "ranks_step_s": ranks,
                      "ranks_vs_one": ranks / one, "machine": describe()}))
    return 0


if __name__ == "__main__":
    run_cli("bench.distributed", main)
