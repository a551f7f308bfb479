"""``python -m evaluate report RUN``: one page a person reads after a run.

Reads what train and evaluate already wrote (``metrics.jsonl``, ``config.toml``,
``RUN/eval/*.json``) and writes ``RUN/report.md`` with PNG plots beside it, so a run can be
judged without opening TensorBoard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: the report must render on machines without a screen
import matplotlib.pyplot as plt

from common.errors import UserError
from common.files import write_atomic
from common.run_folder import (
    EVAL_DIR,
    RECORD_KEYS,
    REPORT,
    REPORT_DIR,
    VAL_KIND,
    read_config,
    read_metrics,
    record_kind,
)
from data_engine.layout import read_manifest
from evaluate.ijb_meta import IJB_SETS, ijb_title
from evaluate.roc import plot_roc as plot_roc_curves
from evaluate.verification import VERIFICATION_SETS
from model.heads.attfc import dcc_capacity

FAR_COLUMN = "0.0001"


@dataclass
class RunRecord:
    """Everything the report needs, read once from the run directory."""

    run_dir: Path
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    config: dict[str, Any]
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_run(run_dir: Path) -> RunRecord:
    """Parse the run's files; a missing metrics file is the one thing we cannot do without."""
    train_rows, val_rows = [], []
    for row in read_metrics(run_dir):
        (val_rows if record_kind(row) == VAL_KIND else train_rows).append(row)
    config = read_config(run_dir, missing_ok=True)
    evaluations = {}
    for path in sorted((run_dir / EVAL_DIR).glob("*.json")):
        evaluations[path.stem] = json.loads(path.read_text())
    return RunRecord(run_dir, train_rows, val_rows, config, evaluations)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[key]) for row in rows
              if isinstance(row.get(key), int | float) and math.isfinite(row[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    write_atomic(path, lambda file: fig.savefig(file, format=path.suffix[1:], dpi=110))
    plt.close(fig)
    return path


def plot_training(record: RunRecord, out_dir: Path) -> list[Path]:
    """Loss and lr, throughput and (for AttFC) the attention-weight spread over steps."""
    plots = []
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(*_series(record.train_rows, "loss"), color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(*_series(record.train_rows, "lr"), color="tab:orange", label="lr")
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    loss_axis.set_title("Training loss and learning rate")
    plots.append(_save(fig, out_dir / "loss_lr.png"))

    fig, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*_series(record.train_rows, "samples_per_s"), label="samples/s (identity images)")
    axis.plot(*_series(record.train_rows, "images_per_s"), label="images/s (identity + class)")
    axis.set_xlabel("step")
    axis.set_ylabel("throughput per second")
    axis.set_title("Training throughput")
    axis.legend()
    plots.append(_save(fig, out_dir / "throughput.png"))

    steps, spread = _series(record.train_rows, "attention_spread")
    if steps:
        fig, axis = plt.subplots(figsize=(7, 4))
        axis.plot(steps, spread, color="tab:green")
        axis.set_xlabel("step")
        axis.set_ylabel("mean (max α − min α) over the k class images")
        axis.set_title("AttFC attention-weight spread")
        plots.append(_save(fig, out_dir / "attention_spread.png"))

    steps, mean = _series(record.train_rows, "spread_cos_mean")
    if steps:
        fig, axis = plt.subplots(figsize=(7, 4))
        axis.plot(steps, mean, color="tab:purple", label="mean")
        axis.plot(*_series(record.train_rows, "spread_cos_median"), color="tab:red",
                  label="median")
        axis.set_xlabel("step")
        axis.set_ylabel("cosine between different identities")
        axis.set_title("Embedding spread in the batch (near 1: a narrow cone)")
        axis.legend()
        plots.append(_save(fig, out_dir / "embedding_spread.png"))
    return plots


def plot_validation(record: RunRecord, out_dir: Path) -> Path | None:
    """Verification accuracy of each validation set over training steps."""
    names = sorted({key for row in record.val_rows for key in row
                    if key not in RECORD_KEYS and key != "mean"})
    if not names:
        return None
    fig, axis = plt.subplots(figsize=(7, 4))
    for name in names:
        steps, values = _series(record.val_rows, name)
        axis.plot(steps, [100 * v for v in values], marker="o", label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("10-fold verification accuracy (%)")
    axis.set_title("Validation accuracy during training")
    axis.legend()
    return _save(fig, out_dir / "validation.png")


def plot_roc(record: RunRecord, out_dir: Path) -> Path | None:
    """TAR against FAR (log axis) for every evaluated IJB-style set that stored its curve."""
    curves = {name: (np.asarray(result["roc"]["fpr"]), np.asarray(result["roc"]["tpr"]))
              for name, result in record.evaluations.items() if isinstance(result.get("roc"), dict)}
    if not curves:
        return None
    path = out_dir / "roc.png"
    plot_roc_curves(curves, str(path), "1:1 verification ROC (IJB-style sets)")
    return path


def w_size(record: RunRecord) -> int | None:
    """Class centres the head holds: N for fc and Partial FC, the DCC capacity S for AttFC.

    S is a multiple of the global batch (every rank's w⁺ enter the one container), which the
    training records carry; ``batch_size`` in config.toml is per GPU.
    """
    config = record.config
    try:
        num_classes = read_manifest(config.get("shards", ""))["num_identities"]
    except UserError:  # shards moved or deleted since training: the size is unknown
        return None
    if config.get("head") == "attfc":
        batches = [row["global_batch"] for row in record.train_rows if "global_batch" in row]
        batch = batches[-1] if batches else config["batch_size"]
        return dcc_capacity(num_classes, config["sample_rate"], batch)
    return num_classes


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "–"


def _last_val(record: RunRecord, name: str) -> float | None:
    rows = [row for row in record.val_rows if name in row]
    return rows[-1][name] if rows else None


def results_table(record: RunRecord) -> str:
    """The paper's table: verification sets, IJB-B/C TAR@FAR=1e-4, W-size, memory, speed."""
    config = record.config
    head = config.get("head", "?")
    size = w_size(record)
    cells = [f"{head} ({config.get('network', '?')})", f"{size:,}" if size else "–"]
    for name in VERIFICATION_SETS:
        evaluated = record.evaluations.get(name, {}).get("accuracy_mean")
        cells.append(_percent(evaluated if evaluated is not None else _last_val(record, name)))
    for name in IJB_SETS:
        cells.append(_percent(record.evaluations.get(name, {}).get("tar_at_far", {})
                              .get(FAR_COLUMN)))
    speeds = [row["samples_per_s"] for row in record.train_rows if "samples_per_s" in row]
    memory = [row["mem_bytes"] for row in record.train_rows if "mem_bytes" in row]
    cells.append(f"{max(memory) / 2**30:.2f} GiB" if memory else "–")
    cells.append(f"{sorted(speeds)[len(speeds) // 2]:.0f}" if speeds else "–")
    header = ["method", "W-size", *VERIFICATION_SETS.values(), *map(ijb_title, IJB_SETS),
              "memory", "samples/s"]
    return "\n".join(["| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header),
                      "| " + " | ".join(cells) + " |"])


def _other_sets_table(record: RunRecord) -> str:
    """Every evaluated set beyond the paper's columns (e.g. the synthetic ones)."""
    lines = []
    for name, result in sorted(record.evaluations.items()):
        if "tar_at_far" in result:
            fars = ", ".join(f"{far}: {_percent(tar)}" for far, tar in result["tar_at_far"].items())
            ranks = ", ".join(f"{key} {_percent(result[key])}" for key in ("top1", "top5", "top10")
                              if key in result)
            identification = f"; 1:N {ranks}" if ranks else ""
            lines.append(f"- **{name}** TAR (%) at FAR {fars}{identification}")
        elif "accuracy_mean" in result:
            std = result.get("accuracy_std", 0.0)
            lines.append(f"- **{name}** accuracy {_percent(result['accuracy_mean'])} ± "
                         f"{_percent(std)} %")
    last_val = record.val_rows[-1] if record.val_rows else {}
    for name, value in sorted(last_val.items()):
        if name not in (*RECORD_KEYS, "mean") and isinstance(value, int | float):
            lines.append(f"- **{name}** (validation .bin at step {last_val['step']}) accuracy "
                         f"{_percent(value)} %")
    return "\n".join(lines) or "- no evaluation results in eval/ and no validation rows"


def write_report(run_dir: Path) -> Path:
    """Write RUN/report.md and its plots under RUN/report/; returns the report path."""
    record = load_run(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    plots = plot_training(record, out_dir)
    plots += [p for p in (plot_validation(record, out_dir), plot_roc(record, out_dir)) if p]
    last = record.train_rows[-1] if record.train_rows else {}
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"Head `{record.config.get('head', '?')}`, network `{record.config.get('network', '?')}`,"
        f" {last.get('step', 0)} steps, final loss {last.get('loss', float('nan')):.4f}.",
        "",
        "## Results (paper format; accuracies in %, IJB at TAR@FAR=1e-4)",
        "",
        results_table(record),
        "",
        "## All evaluations",
        "",
        _other_sets_table(record),
        "",
        "## Plots",
        "",
        *[f"![{path.stem}]({REPORT_DIR}/{path.name})" for path in plots],
        "",
    ]
    report = run_dir / REPORT
    write_atomic(report, "\n".join(lines).encode())
    return report
