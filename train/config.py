"""Training configuration: paper defaults < TOML file (``--config``) < command-line flags.

One table (:data:`OPTIONS`) declares every setting once, so the flags, the TOML keys, the
defaults shown in ``--help`` and the saved ``RUN/config.toml`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.cli import ArgumentParser
from common.errors import UserError
from common.run_folder import CONFIG, read_config
from data_engine.loading.loader import BACKENDS, MAX_DEFAULT_WORKERS
from model.names import HEADS, MARGINS, NETWORKS, STRATEGIES, UPDATE_ORDERS


@dataclass(frozen=True)
class Option:
    """One setting: its TOML key (the flag is ``--key-with-dashes``), default and help."""

    key: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    group: str = "training"


# Defaults follow the paper's "Implementation details" (ResNet50, B=384, SGD 0.9 / 5e-4,
# lr 0.1 cosine, D=512, ArcFace s=64 m=0.5, r=0.3, k=2, gamma=0.999, 5 epochs).
OPTIONS: tuple[Option, ...] = (
    Option("shards", "", "identity-grouped shards directory (python -m data_engine.shard); "
           "required, except with --resume, which reads it from RUN/config.toml",
           group="data"),
    Option("output", "runs/latest", "run directory: checkpoints/, metrics.jsonl, model.pt",
           group="data"),
    Option("val", "auto", "directory of insightface .bin verification sets (lfw.bin, ...) "
           "to validate on; 'auto': for synthetic shards a held-out synthetic set written to "
           "RUN/val, else none; 'none': no validation", group="data"),
    Option("backend", "auto", "loader backend", BACKENDS, group="data"),
    Option("workers", 0, "loader decode workers, processes (torch) or threads (DALI); 0: "
           f"this process's share of the usable cores, at most {MAX_DEFAULT_WORKERS}",
           group="data"),
    Option("skip_bad", False, "replace an unreadable image by another of its identity and "
           "count it, instead of stopping with an error naming the shard and offset",
           group="data"),
    Option("verify_shards", False, "check every shard's sha256 against manifest.json before "
           "the first step (a progress bar; shard sizes are always checked)", group="data"),
    Option("network", "r50", "feature encoder", NETWORKS, group="model"),
    Option("network_args", "", "extra get_model keyword arguments as a JSON object, e.g. "
           "'{\"blocks\": [1, 1, 1, 1], \"scale\": 1}' for a tiny mbf (tests); saved in "
           "model.json", group="model"),
    Option("embedding_size", 512, "feature dimension D", group="model"),
    Option("init", "", "fine-tune: start the feature encoder (and attfc's class encoder, its "
           "copy) from these weights, a state_dict such as arcface_torch's backbone.pth or "
           "another run's RUN/model.pt, loaded strictly into --network; the head starts "
           "empty; on --resume the checkpoint's weights count instead", group="model"),
    Option("head", "attfc", "classification head", HEADS, group="model"),
    Option("sample_rate", 0.3, "attfc: DCC size ratio r (S = r*N); partialfc: sampling rate",
           group="model"),
    Option("k", 2, "attfc: class images per identity image", group="model"),
    Option("gamma", 0.999, "attfc: class-encoder momentum γ (Eq. 12; SGD's is --momentum)",
           group="model"),
    Option("strategy", "attention", "attfc: how class features make the class centre",
           STRATEGIES, group="model"),
    Option("update_order", "paper", "attfc: paper = the step's GCCs enter the container before "
           "the loss (the paper's text); official = after it, so the batch's other GCCs are "
           "not negatives (the authors' code, MoCo's order)", UPDATE_ORDERS, group="model"),
    Option("margin", "arcface", "margin loss (README: which to use)", MARGINS, group="model"),
    Option("margin_s", 64.0, "margin scale s", group="model"),
    Option("margin_m", 0.5, "arcface/cosface margin m (arcface: angular, 0.5; cosface: "
           "additive, usually 0.4)", group="model"),
    Option("margin_m1", 1.0, "combined: m1 of cos(m1*theta + m2) - m3", group="model"),
    Option("margin_m2", 0.3, "combined: m2 (additive angular)", group="model"),
    Option("margin_m3", 0.2, "combined: m3 (additive cosine)", group="model"),
    Option("margin_args", "", "adaface/magface settings as a JSON object, the papers' by "
           "default: adaface m 0.4, h 0.333, alpha 0.01 (the norm EMA); magface l_a 10, "
           "u_a 110, l_m 0.45, u_m 0.8, lambda_g 35", group="model"),
    Option("epochs", 5, "epochs; the cosine schedule spans all of them"),
    Option("max_steps", 0, "stop after this global step (0: no limit); the schedule still "
           "spans --epochs, so a stopped run resumes exactly"),
    Option("batch_size", 384, "identity images per step B"),
    Option("accumulate", 1, "take each step's B images as this many micro-batches of B / "
           "ACCUMULATE (gradient accumulation: less memory, the same step; B must be a "
           "multiple)"),
    Option("lr", 0.1, "peak learning rate"),
    Option("min_lr", 0.0, "learning rate at the end of the cosine decay"),
    Option("warmup_epochs", 0.0, "linear warmup length in epochs (may be fractional)"),
    Option("momentum", 0.9, "SGD momentum"),
    Option("weight_decay", 5e-4, "SGD weight decay"),
    Option("clip_grad_norm", 0.0, "clip the global gradient norm to this before each step "
           "(0: off; arcface_torch and the authors' AttFC script use 5)"),
    Option("seed", 0, "seed for weights, sample order and flips"),
    Option("device", "auto", "training device: auto, cpu, cuda or cuda:N", group="speed"),
    Option("precision", "auto", "autocast precision (auto: bf16 on CUDA, fp32 on CPU; fp16 "
           "adds a grad scaler)", ("auto", "bf16", "fp16", "fp32"), group="speed"),
    Option("compile", False, "torch.compile the feature encoder", group="speed"),
    Option("activation_checkpointing", False, "recompute each iresnet stage / MobileFaceNet "
           "block in backward instead of keeping its activations: less GPU memory, the same "
           "gradients, a slower step (not with --compile)", group="speed"),
    Option("deterministic", False, "deterministic kernels (no cuDNN autotuning): a run, "
           "interrupted and resumed or not, gives bit-identical weights on the same GPU; "
           "slower. attfc only: fc and partialfc stay non-deterministic on CUDA (torch has "
           "no deterministic CUDA kernel for their NLLLoss; it warns)", group="speed"),
    Option("prefetch", 2, "batches prepared ahead by a background thread (0: load in the "
           "training thread, for debugging)", group="speed"),
    Option("log_every", 50, "steps between log lines / metrics.jsonl records (the only "
           "host-device syncs)", group="bookkeeping"),
    Option("ckpt_every", 2000, "steps between checkpoints (also one at each epoch end)",
           group="bookkeeping"),
    Option("keep", 3, "how many recent checkpoints to keep", group="bookkeeping"),
    Option("val_every", 0, "steps between validations (0: at each epoch end only)",
           group="bookkeeping"),
    Option("max_nonfinite", 5, "stop with an error after this many non-finite losses in a "
           "row (checked at log steps; skipped steps leave the weights unchanged)",
           group="bookkeeping"),
    Option("tensorboard", True, "write TensorBoard scalars to RUN/tensorboard",
           group="bookkeeping"),
    Option("sync_bn", False, "under torchrun: batch-norm statistics over the global batch "
           "(every rank's samples), as one GPU with that batch computes them",
           group="distributed"),
    Option("dist_timeout", 1800, "under torchrun: seconds a collective waits for the other "
           "ranks before this one stops with an error (a rank died or hangs); rank 0 "
           "validates alone, so keep it above the validation time", group="distributed"),
    Option("check_replicas", False, "under torchrun, for debugging: after every step check "
           "that the weights and the attfc container and class encoder are bit-identical on "
           "every rank", group="distributed"),
)
DEFAULTS: dict[str, Any] = {o.key: o.default for o in OPTIONS}
_BY_KEY = {o.key: o for o in OPTIONS}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _parse_steps(text: str) -> tuple[int, int]:
    """``"7"`` or ``"7-9"`` -> inclusive step range, for the NaN-injection test hook."""
    try:
        first, _, last = text.partition("-")
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP or FIRST-LAST") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= FIRST <= LAST")
    return lo, hi


def add_options(parser: ArgumentParser) -> None:
    """Add one flag per option. Unset flags stay absent so a TOML value can win over the
    default but never over a flag the user typed."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        group = groups.get(option.group) or groups.setdefault(
            option.group, parser.add_argument_group(option.group))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": option.key}
        if isinstance(option.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(option.default)
            kwargs["choices"] = option.choices
            kwargs["metavar"] = option.key.upper() if option.choices is None else None
        group.add_argument(_flag(option.key), help=f"{option.help} (default: "
                           f"{_show(option.default)})", **kwargs)
    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="TOML file of settings (keys as the flags, '-' or '_'); flags "
                        "override it")
    parser.add_argument("--resume", action="store_true",
                        help="continue RUN (--output) from its latest valid checkpoint, with "
                        "RUN/config.toml as the base settings")
    plan = parser.add_argument_group("planning (nothing is trained, no GPU needed)")
    plan.add_argument("--plan", action="store_true",
                      help="print the step's predicted peak GPU memory by component")
    plan.add_argument("--json", action="store_true", help="with --plan: as one JSON object")
    plan.add_argument("--gpu-memory", type=float, metavar="GIB",
                      help="with --plan: say whether it fits in GIB GiB, and what would; "
                      "when training: turn on --activation-checkpointing, then --accumulate, "
                      "if the step needs them to fit, or stop with the batch size that would")
    plan.add_argument("--num-classes", type=int, metavar="N",
                      help="with --plan: N identities instead of reading --shards")
    parser.add_argument("--inject-nan-at-step", type=_parse_steps, action="append",
                        default=[], metavar="STEP[-LAST]",
                        help="testing only (repeatable): make the feature encoder's input "
                        "NaN at these global steps to exercise the skipping of non-finite "
                        "steps")


def _show(value: Any) -> str:
    return "none" if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a settings file; unknown keys and wrong types are errors naming the file."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--config {path}: not valid TOML: {error}") from None
    return _checked(raw, path)


def _checked(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Settings by key from a parsed TOML table; unknown keys and wrong types name ``path``."""
    values: dict[str, Any] = {}
    for raw_key, value in raw.items():
        key = raw_key.replace("-", "_")
        option = _BY_KEY.get(key)
        if option is None:
            raise UserError(f"{path}: unknown setting {raw_key!r}")
        values[key] = _coerce(option, value, f"{path}: {raw_key}")
    return values


def _coerce(option: Option, value: Any, where: str) -> Any:
    want = type(option.default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not want:
        raise UserError(f"{where} = {value!r}: expected {want.__name__}")
    if option.choices is not None and value not in option.choices:
        raise UserError(f"{where} = {value!r}: expected one of {', '.join(option.choices)}")
    return value


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Effective settings: defaults < RUN/config.toml (``--resume``) < ``--config`` < flags."""
    flags = {key: getattr(args, key) for key in DEFAULTS if hasattr(args, key)}
    config = dict(DEFAULTS)
    saved_values: dict[str, Any] = {}
    if args.resume:
        run_dir = Path(flags.get("output", DEFAULTS["output"]))
        saved = run_dir / CONFIG
        saved_values = _checked(read_config(run_dir, missing_ok=True), saved)
        config.update(saved_values)
    if args.config is not None:
        config.update(load_toml(args.config))
    config.update(flags)
    _check(config, need_shards=not (args.plan and args.num_classes))
    if saved_values:
        _check_resume(saved_values, config, saved)
    return config


# What makes a run the run it is (model shapes, the schedule, the sample order): a resumed
# run keeps them. Paths, devices, workers and bookkeeping may change between sessions.
# batch_size is per GPU: what must stay is the global batch (per GPU x ranks), which the
# checkpoint records and train/loop.py checks, so a run resumes on another number of GPUs.
FIXED_ON_RESUME = ("network", "network_args", "embedding_size", "head", "sample_rate", "k",
                   "gamma", "strategy", "update_order", "margin", "margin_s", "margin_m",
                   "margin_m1", "margin_m2", "margin_m3", "margin_args",
                   "epochs", "lr", "min_lr", "warmup_epochs", "momentum",
                   "weight_decay", "clip_grad_norm", "seed")


def _check_resume(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """``--resume`` with settings (flags or ``--config``) that make another run: one line
    naming the saved file and each changed setting."""
    changed = []
    for key in FIXED_ON_RESUME:
        if key not in saved or key not in config:
            continue
        old, new = saved[key], config[key]
        if key in _JSON_OPTIONS:
            old, new = json_object(key, old), json_object(key, new)
        if old != new:
            changed.append(f"{_flag(key)} {_show(saved[key])} -> {_show(config[key])}")
    if changed:
        raise UserError(f"--resume: {path} was trained with other settings ("
                        f"{'; '.join(changed)}); a resumed run keeps them: drop those flags, "
                        "or train into a new --output")


def _check(config: dict[str, Any], need_shards: bool = True) -> None:
    if need_shards and not config["shards"]:
        raise UserError("--shards is required (or 'shards' in --config, or --plan "
                        "--num-classes N)")
    if need_shards and not Path(config["shards"]).is_dir():
        raise UserError(f"--shards {config['shards']}: not a directory")
    if config["val"] not in ("auto", "none") and not Path(config["val"]).is_dir():
        raise UserError(f"--val {config['val']}: not a directory")
    for key in ("epochs", "batch_size", "accumulate", "k", "embedding_size", "log_every",
                "ckpt_every", "keep", "max_nonfinite", "dist_timeout"):
        if config[key] <= 0:
            raise UserError(f"{_flag(key)} {config[key]}: must be > 0")
    if config["batch_size"] % config["accumulate"]:
        raise UserError(f"--accumulate {config['accumulate']}: --batch-size "
                        f"{config['batch_size']} is not a multiple of it (each step takes "
                        "equal micro-batches)")
    if config["accumulate"] > 1 and config["margin"] == "adaface":
        raise UserError(f"--accumulate {config['accumulate']} with --margin adaface: its "
                        "norm statistics come from the whole batch before its loss, which "
                        "micro-batches do not have; use --accumulate 1")
    for key in ("max_steps", "workers", "val_every", "warmup_epochs", "min_lr", "prefetch",
                "clip_grad_norm"):
        if config[key] < 0:
            raise UserError(f"{_flag(key)} {config[key]}: must be >= 0")
    if not 0.0 < config["sample_rate"] <= 1.0:
        raise UserError(f"--sample-rate {config['sample_rate']}: must be in (0, 1]")
    if not 0.0 <= config["gamma"] < 1.0:
        raise UserError(f"--gamma {config['gamma']}: must be in [0, 1)")
    for key in _JSON_OPTIONS:
        json_object(key, config[key])
    if config["activation_checkpointing"] and config["compile"]:
        raise UserError("--activation-checkpointing with --compile: torch.compile cannot "
                        "keep BatchNorm's statistics out of the recomputation; drop one")
    if config["lr"] <= 0:
        raise UserError(f"--lr {config['lr']}: must be > 0")


_JSON_OPTIONS = ("network_args", "margin_args")  # keyword arguments as a JSON object


def json_object(key: str, text: str) -> dict[str, Any]:
    """A JSON-object option (``network_args``, ``margin_args``) parsed: keyword arguments."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise UserError(f"{_flag(key)} {text}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{_flag(key)} {text}: expected a JSON object")
    return value


def network_args(config: dict[str, Any]) -> dict[str, Any]:
    """``--network-args`` parsed: keyword arguments for ``get_model``."""
    return json_object("network_args", config["network_args"])


def margin_args(config: dict[str, Any]) -> dict[str, Any]:
    """``--margin-args`` parsed: adaface/magface keyword arguments for ``build_margin``."""
    return json_object("margin_args", config["margin_args"])


def to_toml(config: dict[str, Any]) -> str:
    """The effective settings as TOML that :func:`load_toml` reads back unchanged."""
    lines = []
    for key in DEFAULTS:
        value = config[key]
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a valid TOML basic string
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
