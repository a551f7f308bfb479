"""The paper's Tables 2, 3 and 4 in miniature: every head and ablation on one synthetic
dataset, with one seed, backbone, batch and budget, evaluated on people none of them saw.

One command shards one synthetic dataset (degraded photos and planted mislabeled ones),
writes a held-out synthetic IJB-C set and a held-out verification .bin, then trains and
evaluates each run of the sweep:

  Table 2   FC; Partial FC r=0.3; AttFC r = 0.1, 0.2, 0.3 (k=2, attention)
  Table 3   AttFC k = 1, 2, 3, 4 at r=0.3
  Table 4   GCC strategy attention / constant / single at r=0.3, k=2, over several seeds
  extra     the container update order (paper vs official), gradient-norm clipping at 5, and
            the AdaFace margin (m 0.4, h 0.333) instead of ArcFace

Each run is ``python -m train`` in its own process (so its peak memory is its own) and is
scored with ``python -m evaluate``'s code: 10-fold verification accuracy on the .bin, TAR at
FAR 1e-3 and 1e-4 on the synthetic IJB-C set. Results go to OUT/tables.md, OUT/tables.json
and OUT/replicate.png. Rerunning the same command skips finished runs, resumes an
interrupted one from its checkpoint and reuses the shards and benchmarks.

    python -m bench.replicate --out runs/replicate            # the full sweep (CPU)
    python -m bench.replicate --out /tmp/rep --size tiny      # seconds: the test suite's

Learning rate (``--lr-rule``): ``demo`` (the default, and every table in BENCHMARKS.md unless
it says otherwise) trains at lr 0.1 whatever the batch, as the CPU demo does: at B = 16 that
is 24x the paper's lr per sample (0.1 at B = 384). ``paper`` scales the paper's lr per sample
to the miniature's batch (0.1 * B / 384) and warms it up linearly over the first
``PAPER_WARMUP_EPOCHS`` of the budget; use another ``--out`` for it, since a run folder
remembers the flags it was trained with.

The last line printed is one JSON object (the tables' numbers and the machine).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median, pstdev
from typing import Any

from bench.machine import cpu_model
from common.cli import ArgumentParser, run_cli, setup_logging
from common.files import write_atomic
from common.run_folder import (
    CHECKPOINTS_DIR,
    EVAL_DIR,
    MODEL,
    TRAIN_KIND,
    read_config,
    read_metrics,
)
from train.checkpoint import list_checkpoints
from train.config import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
TINY_MBF = '{"blocks": [1, 1, 1, 1], "scale": 1}'
IJB_FIRST_IDENTITY = 200_000  # held-out people: far beyond any training identity
BIN_FIRST_IDENTITY = 300_000
FARS = ("0.001", "0.0001")
PAPER_LR, PAPER_BATCH = 0.1, 384  # the paper's setting: lr 0.1 at batch 384
PAPER_WARMUP_EPOCHS = 0.2


@dataclass(frozen=True)
class Size:
    """How big the miniature is: data, benchmarks, budget and which runs."""

    identities: int
    images_per_identity: int
    mislabeled_share: float
    batch_size: int
    epochs: int
    ijb_identities: int
    bin_identities: int
    bin_pairs: int
    seeds: tuple[int, ...]
    runs: tuple[str, ...] | None = None  # None: every run of the sweep


SIZES = {
    # ~37 min on an idle 2-core CPU: 19 runs of 187 steps (3000 samples) each.
    "full": Size(identities=500, images_per_identity=6, mislabeled_share=0.1, batch_size=16,
                 epochs=1, ijb_identities=150, bin_identities=150, bin_pairs=1000,
                 seeds=(0, 1, 2)),
    # The test suite's: seconds, two runs, every table still written.
    "tiny": Size(identities=16, images_per_identity=4, mislabeled_share=0.15, batch_size=8,
                 epochs=1, ijb_identities=4, bin_identities=6, bin_pairs=20, seeds=(0,),
                 runs=("fc", "attfc-r0.3")),
}


@dataclass(frozen=True)
class Run:
    """One training run: its name, the flags that set it apart, its seed."""

    name: str
    flags: tuple[str, ...]
    seed: int = 0
    facts: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def attfc(name: str, *, r: float = 0.3, k: int = 2, strategy: str = "attention",
          extra: tuple[str, ...] = (), seed: int = 0) -> Run:
    flags = ("--head", "attfc", "--sample-rate", str(r), "--k", str(k), "--strategy", strategy,
             *extra)
    return Run(name if not seed else f"{name}-s{seed}", flags, seed,
               {"head": "attfc", "r": r, "k": k, "strategy": strategy, "extra": list(extra)})


def sweep(seeds: tuple[int, ...]) -> list[Run]:
    """Every run, the shared AttFC default (r=0.3, k=2, attention, paper order) once, in an
    order that fills every table early, so a sweep cut short still says something."""
    runs = [Run("fc", ("--head", "fc"), 0, {"head": "fc"}), attfc("attfc-r0.3"),
            Run("partialfc-r0.3", ("--head", "partialfc", "--sample-rate", "0.3"), 0,
                {"head": "partialfc", "r": 0.3}),
            attfc("attfc-r0.1", r=0.1), attfc("attfc-r0.2", r=0.2),
            attfc("attfc-constant", strategy="constant"),
            attfc("attfc-single", strategy="single"),
            attfc("attfc-official", extra=("--update-order", "official")),
            attfc("attfc-clip5", extra=("--clip-grad-norm", "5")),
            attfc("attfc-adaface", extra=("--margin", "adaface")),
            attfc("attfc-k1", k=1), attfc("attfc-k3", k=3)]
    seeded = [[attfc("attfc-r0.3", seed=seed),
               attfc("attfc-constant", strategy="constant", seed=seed),
               attfc("attfc-single", strategy="single", seed=seed)] for seed in seeds[1:]]
    return [*runs, *(seeded[0] if seeded else []), attfc("attfc-k4", k=4),
            *(run for group in seeded[1:] for run in group)]


def _python(*args: str, log: Path | None = None) -> None:
    """Run ``python -m ...`` in the repository root; its output goes to ``log``."""
    command = [sys.executable, *args]
    with open(log, "ab") if log else open("/dev/null", "wb") as sink:
        done = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode != 0:
        where = f"; see {log}" if log else ""
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {done.returncode}){where}")


def prepare_data(out: Path, size: Size) -> dict[str, Path]:
    """Shards (resumable by the sharder itself) and the two held-out benchmarks, once."""
    paths = {"shards": out / "shards", "ijbc": out / "heldout" / "ijbc",
             "bin": out / "heldout" / "verification.bin"}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "data.log"
    if not (paths["shards"] / "manifest.json").is_file():
        print(f"replicate: sharding {size.identities} synthetic identities", flush=True)
        _python("-m", "data_engine.shard", "--src", "synthetic", "--identities",
                str(size.identities), "--images-per-identity", str(size.images_per_identity),
                "--seed", "0", "--mislabeled-share", str(size.mislabeled_share),
                "--out", str(paths["shards"]), log=log)
    if not (paths["ijbc"] / "meta" / "ijbc_template_pair_label.txt").is_file():
        print("replicate: writing the held-out synthetic IJB-C set", flush=True)
        shutil.rmtree(paths["ijbc"], ignore_errors=True)
        _python("-m", "evaluate", "synth-ijb", "--out", str(paths["ijbc"]), "--identities",
                str(size.ijb_identities), "--first-identity", str(IJB_FIRST_IDENTITY),
                "--seed", "0", log=log)
    if not paths["bin"].is_file():
        print("replicate: writing the held-out verification .bin", flush=True)
        partial = paths["bin"].with_suffix(".partial")
        _python("-m", "evaluate", "synth-bin", "--out", str(partial), "--identities",
                str(size.bin_identities), "--first-identity", str(BIN_FIRST_IDENTITY),
                "--pairs", str(size.bin_pairs), "--seed", "0", log=log)
        partial.replace(paths["bin"])
    return paths


def paper_lr(batch_size: int) -> float:
    """The paper's lr per sample (0.1 at B = 384) at ``batch_size``."""
    return PAPER_LR * batch_size / PAPER_BATCH


def lr_flags(size: Size, lr_rule: str) -> tuple[str, ...]:
    """``demo``: none (train's default lr at any batch); ``paper``: the paper's lr per
    sample at this batch, with a linear warm-up."""
    if lr_rule == "demo":
        return ()
    return ("--lr", f"{paper_lr(size.batch_size):.6g}", "--warmup-epochs",
            str(PAPER_WARMUP_EPOCHS))


def describe_lr(size: Size, lr_rule: str) -> str:
    """The lr a rule trains at, in words, for the tables' header."""
    if lr_rule == "demo":
        return f"lr {DEFAULTS['lr']}"
    return f"lr {paper_lr(size.batch_size):.6g}, {PAPER_WARMUP_EPOCHS} epochs warm-up"


def add_lr_rule_option(parser: ArgumentParser) -> None:
    """``--lr-rule``, shared by this sweep and ``bench.clean_retrain``."""
    parser.add_argument("--lr-rule", choices=("demo", "paper"), default="demo",
                        help=f"demo: lr {DEFAULTS['lr']} at any batch (the recorded tables); "
                             f"paper: the paper's lr per sample ({PAPER_LR} at B = "
                             f"{PAPER_BATCH}) scaled to this batch, with "
                             f"{PAPER_WARMUP_EPOCHS} epochs of linear warm-up")


def train_flags(size: Size, device: str, lr_rule: str = "demo") -> tuple[str, ...]:
    """The budget every run shares (a slim MobileFaceNet, as the CPU demo trains)."""
    return ("--network", "mbf", "--network-args", TINY_MBF, "--embedding-size", "128",
            "--batch-size", str(size.batch_size), "--epochs", str(size.epochs),
            "--gamma", "0.99", "--val", "none", "--log-every", "5", "--ckpt-every", "25",
            "--keep", "1", "--no-tensorboard", "--device", device, *lr_flags(size, lr_rule))


def run_one(run: Run, out: Path, data: dict[str, Path], size: Size, device: str,
            lr_rule: str = "demo") -> dict[str, Any]:
    """Train (or resume) and evaluate one run; RUN/result.json marks it finished."""
    run_dir = out / "runs" / run.name
    result_path = run_dir / "result.json"
    shared = train_flags(size, device, lr_rule)
    spec = {"flags": list(run.flags), "seed": run.seed, "shared": list(shared)}
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("spec") == spec:
            return result
        raise RuntimeError(f"{run_dir} was trained with other settings: remove it or use "
                           "another --out")
    log = run_dir / "train.log"
    started = time.perf_counter()
    if list_checkpoints(run_dir / CHECKPOINTS_DIR):
        print(f"replicate: {run.name}: resuming", flush=True)
        _python("-m", "train", "--output", str(run_dir), "--resume", log=log)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        print(f"replicate: {run.name}: training", flush=True)
        _python("-m", "train", "--shards", str(data["shards"]), "--output", str(run_dir),
                *shared, *run.flags, "--seed", str(run.seed), log=log)
    train_s = time.perf_counter() - started
    result = {"name": run.name, "spec": spec, **run.facts, "seed": run.seed,
              "train_wall_s": train_s, **_train_numbers(run_dir),
              **_evaluate(run_dir, data, device)}
    write_atomic(result_path, (json.dumps(result, indent=1) + "\n").encode())
    return result


def _train_numbers(run_dir: Path) -> dict[str, Any]:
    """samples/s (median over logged intervals, the first one, with start-up, left out),
    peak memory, and the head's class-centre count (W-size) and stored size."""
    import torch

    train = read_metrics(run_dir, TRAIN_KIND)
    speeds = [r["samples_per_s"] for r in train[1:]] or [r["samples_per_s"] for r in train]
    checkpoint = list_checkpoints(run_dir / CHECKPOINTS_DIR)[0]
    head = torch.load(checkpoint, map_location="cpu", weights_only=True)["head"]
    config = read_config(run_dir)
    centres = {name: value for name, value in head.items()
               if not name.startswith("class_encoder.") and value.dim() == 2}
    rows = sum(int(value.shape[0]) for value in centres.values())
    stored = sum(value.numel() for value in centres.values())
    w_size = rows
    if config["head"] == "partialfc":  # the sampled rows per step, as the paper counts it
        w_size = max(1, int(config["sample_rate"] * rows))
    return {"samples_per_s": median(speeds), "peak_mem_bytes": max(r["mem_bytes"] for r in train),
            "final_loss": train[-1]["loss"], "steps": train[-1]["step"], "w_size": w_size,
            "head_floats": stored}


def _evaluate(run_dir: Path, data: dict[str, Path], device: str) -> dict[str, Any]:
    """Held-out verification accuracy and IJB-C TAR@FAR with ``python -m evaluate``'s code."""
    from evaluate.__main__ import main as evaluate

    model = run_dir / MODEL
    verification, ijbc = run_dir / EVAL_DIR / "verification.json", run_dir / EVAL_DIR / "ijbc.json"
    common = ("--model", str(model), "--device", device, "--no-flip")
    evaluate(["lfw", "--bin", str(data["bin"]), *common, "--out", str(verification)])
    evaluate(["ijbc", "--root", str(data["ijbc"]), *common, "--no-cache", "--workers", "2",
              "--out", str(ijbc)])
    ver, ijb = json.loads(verification.read_text()), json.loads(ijbc.read_text())
    return {"accuracy": ver["accuracy_mean"], "accuracy_std": ver["accuracy_std"],
            **{f"tar@{far}": ijb["tar_at_far"][far] for far in FARS}}


# -- tables -------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * value:.2f}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{100 * mean(values):.2f} ± {100 * pstdev(values):.2f}"


def _row(r: dict[str, Any], label: str) -> list[str]:
    return [label, str(r["w_size"]), f"{r['head_floats']:,}", _pct(r["accuracy"]),
            _pct(r["tar@0.001"]), _pct(r["tar@0.0001"]),
            f"{r['peak_mem_bytes'] / 2**30:.2f}", f"{r['samples_per_s']:.1f}"]


_HEADER = ["model", "W-size", "head floats", "verif. acc %", "TAR@1e-3 %", "TAR@1e-4 %",
           "peak mem GiB", "samples/s"]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def build_tables(results: dict[str, dict[str, Any]], seeds: tuple[int, ...]
                 ) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON of Tables 2, 3, 4 and the update-order/clipping comparison, from
    whichever runs are finished."""
    def get(name: str) -> dict[str, Any] | None:
        return results.get(name)

    table2 = [(label, get(name)) for label, name in (
        ("FC", "fc"), ("Partial FC-0.3", "partialfc-r0.3"), ("AttFC-0.1", "attfc-r0.1"),
        ("AttFC-0.2", "attfc-r0.2"), ("AttFC-0.3", "attfc-r0.3"))]
    table3 = [(f"k={k}", get("attfc-r0.3" if k == 2 else f"attfc-k{k}")) for k in (1, 2, 3, 4)]
    extra = [(label, get(name)) for label, name in (
        ("AttFC-0.3, paper order (push, then loss)", "attfc-r0.3"),
        ("AttFC-0.3, official order (loss, then push)", "attfc-official"),
        ("AttFC-0.3, paper order, clip grad norm 5", "attfc-clip5"),
        ("AttFC-0.3, paper order, AdaFace margin", "attfc-adaface"))]
    table4, table4_json = [], {}
    for label, name in (("Single image", "attfc-single"), ("Constant weight", "attfc-constant"),
                        ("Attention weight", "attfc-r0.3")):
        runs = [results[n] for n in [name, *(f"{name}-s{s}" for s in seeds[1:])]
                if n in results]
        metrics = {key: [r[key] for r in runs] for key in ("accuracy", "tar@0.001",
                                                          "tar@0.0001")}
        table4_json[label] = {"seeds": [r["seed"] for r in runs], **metrics}
        table4.append([label, str(len(runs)), *(_mean_std(v) for v in metrics.values())])
    parts = [
        "Table 2 (miniature): heads and container size ratio r",
        _markdown(_HEADER, [_row(r, label) for label, r in table2 if r]),
        "Table 3 (miniature): class images k at r = 0.3",
        _markdown(["k", *_HEADER[1:]], [_row(r, label) for label, r in table3 if r]),
        f"Table 4 (miniature): GCC strategy at r = 0.3, k = 2, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}",
        _markdown(["strategy", "seeds", "verif. acc %", "TAR@1e-3 %", "TAR@1e-4 %"], table4),
        "Container update order, gradient clipping and the AdaFace margin (r = 0.3, k = 2, "
        "attention)",
        _markdown(_HEADER, [_row(r, label) for label, r in extra if r]),
    ]
    text = "\n\n".join(f"**{p}**" if i % 2 == 0 else p for i, p in enumerate(parts)) + "\n"
    as_json = {"table2": {label: r for label, r in table2 if r},
               "table3": {label: r for label, r in table3 if r},
               "table4": table4_json,
               "update_order_and_clipping": {label: r for label, r in extra if r}}
    return text, as_json


def plot(tables: dict[str, Any], path: Path) -> None:
    """Four panels: Table 2 by W-size, Table 3 by k, Table 4 with std bars, order/clipping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, key, title in ((axes[0], "table2", "Table 2: heads, r"),
                           (axes[1], "table3", "Table 3: k at r=0.3"),
                           (axes[3], "update_order_and_clipping", "order / clipping / margin")):
        rows = tables[key]
        labels = [label.replace("AttFC-0.3, ", "").replace(" (", "\n(") for label in rows]
        x = range(len(rows))
        for offset, metric, name in ((-0.2, "accuracy", "verif. acc"),
                                     (0.2, "tar@0.001", "TAR@1e-3")):
            ax.bar([i + offset for i in x], [100 * r[metric] for r in rows.values()], 0.4,
                   label=name)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("%")
    rows = tables["table4"]
    for offset, metric, name in ((-0.2, "accuracy", "verif. acc"),
                                 (0.2, "tar@0.001", "TAR@1e-3")):
        values = [r[metric] for r in rows.values()]
        axes[2].bar([i + offset for i in range(len(rows))],
                    [100 * mean(v) if v else 0 for v in values], 0.4,
                    yerr=[100 * pstdev(v) if v else 0 for v in values], capsize=3, label=name)
    axes[2].set_xticks(range(len(rows)), list(rows), fontsize=7)
    axes[2].set_title("Table 4: strategy (mean ± std)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _machine() -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit or None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.replicate", description=__doc__,
                            formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/replicate"),
                        help="sweep folder: shards, held-out sets, runs/, tables (resumed)")
    parser.add_argument("--size", choices=tuple(SIZES), default="full",
                        help="full: the sweep; tiny: two runs in seconds (tests)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    add_lr_rule_option(parser)
    parser.add_argument("--only", nargs="+", metavar="RUN",
                        help="train only these runs (names as in OUT/runs/); tables use "
                             "every finished run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    size = SIZES[args.size]
    out = args.out
    runs = [run for run in sweep(size.seeds)
            if (size.runs is None or run.name in size.runs)
            and (not args.only or run.name in args.only)]
    started = time.perf_counter()
    data = prepare_data(out, size)
    results: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(runs, 1):
        results[run.name] = run_one(run, out, data, size, args.device, args.lr_rule)
        r = results[run.name]
        print(f"replicate: [{i}/{len(runs)}] {run.name}: acc {_pct(r['accuracy'])} %, "
              f"TAR@1e-3 {_pct(r['tar@0.001'])} %, TAR@1e-4 {_pct(r['tar@0.0001'])} %, "
              f"{r['samples_per_s']:.1f} samples/s ({time.perf_counter() - started:.0f} s)",
              flush=True)
        text, tables = write_tables(out, results, size, args)  # after each: partial results
    print(text)
    print(json.dumps({"machine": tables["machine"], "size": args.size,
                      "wall_s": round(time.perf_counter() - started, 1),
                      "runs": {name: {key: r[key] for key in ("accuracy", "tar@0.001",
                                                              "tar@0.0001", "samples_per_s",
                                                              "peak_mem_bytes", "w_size")}
                               for name, r in sorted(results.items())}}))
    return 0


def write_tables(out: Path, results: dict[str, dict[str, Any]], size: Size,
                 args: Any) -> tuple[str, dict[str, Any]]:
    """OUT/tables.md, OUT/tables.json and OUT/replicate.png from every finished run."""
    for done in sorted((out / "runs").glob("*/result.json")):  # earlier --only runs too
        result = json.loads(done.read_text())
        results.setdefault(result["name"], result)
    text, tables = build_tables(results, size.seeds)
    machine = _machine()
    header = (f"python -m bench.replicate --out {out} --size {args.size} --device "
              f"{args.device} --lr-rule {args.lr_rule}\n\n"
              f"{machine['date']}, commit {machine['commit']}, "
              f"{machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}; "
              f"{size.identities} identities x {size.images_per_identity} photos "
              f"({100 * size.mislabeled_share:.0f} % mislabeled), batch {size.batch_size}, "
              f"{size.epochs} epoch(s), slim mbf D=128, "
              f"{describe_lr(size, args.lr_rule)}\n\n")
    write_atomic(out / "tables.md", (header + text).encode())
    tables = {"machine": machine, "size": args.size, **tables}
    write_atomic(out / "tables.json", (json.dumps(tables, indent=1) + "\n").encode())
    plot(tables, out / "replicate.png")
    return text, tables


if __name__ == "__main__":
    run_cli("bench.replicate", main)
