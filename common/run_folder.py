"""The run folder's contract: its file names and how to read what a training run wrote.

The twin of ``data_engine/layout.py`` for ``python -m train --output RUN``: the only module
that knows these names; train writes them, and evaluate, model (``model.json`` beside any
weights file) and the benches read them. It lives in ``common`` because all of those import
it and imports point downstream: neither evaluate nor model may import train.

    RUN/config.toml                        every setting of the run, written at its start
    RUN/checkpoints/step-NNNNNNNNN.pt      what a resume needs; the newest few kept
    RUN/metrics.jsonl                      one JSON object per logged step, whole lines only
    RUN/tensorboard/                       the same numbers as TensorBoard scalars
    RUN/model.pt, RUN/model.json           the feature encoder and its network
    RUN/best.pt                            the feature encoder at the best validation
    RUN/image_stats.npz                    attfc: per image id count, alpha_sum, cos_sum
    RUN/val/                               validation sets made for the run
    RUN/eval/NAME.json                     evaluate's results on benchmark NAME
    RUN/report.md, RUN/report/             the report page and its plots
    RUN/noise/                             the suspect-photo ranking
    RUN/duplicates/                        identities that look like one person
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from common.errors import UserError

CONFIG = "config.toml"
CHECKPOINTS_DIR = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
MODEL = "model.pt"
MODEL_INFO = "model.json"
BEST = "best.pt"
IMAGE_STATS = "image_stats.npz"
VAL_DIR = "val"
EVAL_DIR = "eval"
REPORT = "report.md"
REPORT_DIR = "report"
NOISE_DIR = "noise"
DUPLICATES_DIR = "duplicates"

# A metrics record's "kind": training records carry none, validation records "val".
TRAIN_KIND, VAL_KIND = "train", "val"
# Keys of a metrics record that say where it belongs rather than what was measured.
RECORD_KEYS = ("step", "epoch", "kind")

_CHECKPOINT = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def is_checkpoint_name(name: str) -> bool:
    """A finished checkpoint's name (a temp file being written never is one)."""
    return _CHECKPOINT.match(name) is not None


def read_config(run_dir: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """``config.toml`` as saved (unchecked: the options table checks it); ``{}`` when
    absent and ``missing_ok``, else a UserError saying what is wrong."""
    path = Path(run_dir) / CONFIG
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise UserError(f"{run_dir}: no {CONFIG} (not a training run folder)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"{path}: not valid TOML ({error})") from None


def record_kind(record: dict[str, Any]) -> str:
    return record.get("kind", TRAIN_KIND)


def read_metrics(run_dir: Path, kind: str | None = None, *,
                 live: bool = False) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in order (only those of ``kind`` when given).

    A finished run's file is whole lines of JSON objects, so a missing file or a bad line is
    a UserError naming it. ``live`` reads a run that is being written or was cut by a
    crash: no file is no records, and a line that is not a whole JSON object is skipped.
    """
    path = Path(run_dir) / METRICS
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        if live:
            return []
        raise UserError(f"{path}: not found (is {run_dir} a training run directory?)") \
            from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: unreadable ({error})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if live:
                continue
            raise UserError(f"{path}:{number}: not a JSON object")
        if kind is None or record_kind(record) == kind:
            records.append(record)
    return records


def read_model_info(weights: Path) -> dict[str, Any]:
    """The ``model.json`` beside a weights file (``model.pt``, ``best.pt`` or a copy):
    network, embedding_size, network_args, ...; ``{}`` beside weights from elsewhere."""
    path = Path(weights).parent / MODEL_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object")
    return info
