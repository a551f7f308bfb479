"""``python -m evaluate noise RUN``: the photos AttFC's attention found least like their label.

An AttFC run keeps, per image, how it scored each time it served as a class image: its
attention weight α (Eq. 8) and the cosine between its class feature and the identity
image's feature (RUN/image_stats.npz, written by ``train``). A photo of someone else, or a
photo too damaged to show anyone, stays far from the other photos of its label. The score
is 1 − k·mean(α): how far below an equal share the attention put the photo. α compares
the photo with the other class images drawn beside it for the same identity image, so a
hard identity, or an identity image that is itself a stray, lowers all of them alike and
does not flood the list (BENCHMARKS.md compares it with the cosine on the benchmark's
run). Runs without varying α (``--strategy constant|single``) fall back to the
identity's median mean-cosine minus the photo's own.

Writes RUN/noise/noise.tsv (every scored image, most suspicious first: source path as the
shard's json records it, identity, image, shard, score, ...; its first column is what
``python -m data_engine.shard --exclude`` reads), RUN/noise/noise.md with a page of
thumbnails (each suspect beside its identity's most typical photo) and RUN/noise/noise.json.
On synthetic shards with planted truth (``--mislabeled-share``) it also measures precision
and recall at K against the mislabeled and the degraded photos.

A run trained with a norm-aware margin (MagFace, AdaFace) gets a second score column: each
photo's feature norm by RUN/model.pt (no flip, before normalisation), which those losses tie
to image quality (low norm: a hard or unusable photo), ranked lowest first.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import write_atomic
from common.progress import Progress
from common.run_folder import IMAGE_STATS, MODEL, NOISE_DIR, read_config
from data_engine.loading.reader import ShardReader

log = logging.getLogger("evaluate.noise")


@dataclass
class ImageTable:
    """Per global image id: where it came from and, on synthetic data, the planted truth."""

    labels: np.ndarray
    identities: list[str]
    names: list[str]
    paths: list[str]
    shards: list[str]
    mislabeled: np.ndarray | None  # bool per image, None without planted truth
    degraded: np.ndarray | None
    shows: list[str] | None  # the person each image shows (planted truth), else None


def read_image_table(reader: ShardReader) -> ImageTable:
    """Image names, source paths and truth from the shards' per-identity json members."""
    n = reader.num_images
    names, paths, shard_of = [""] * n, [""] * n, [""] * n
    mislabeled, degraded = np.zeros(n, bool), np.zeros(n, bool)
    shows = [""] * n
    truth = False
    for shard_path in reader.shard_paths:
        try:
            with tarfile.open(shard_path) as tar:
                for member in tar:
                    if not member.name.endswith(".json"):
                        continue
                    info = json.loads(tar.extractfile(member).read())
                    ids = reader.identity_images(int(info["label"]))
                    extra = info.get("image_info")
                    for j, image_id in enumerate(ids):
                        name = info["images"][j]
                        names[image_id] = name
                        shard_of[image_id] = shard_path.name
                        paths[image_id] = f"{info['identity']}/{name}"
                        if extra:
                            truth = True
                            paths[image_id] = extra[j].get("path", paths[image_id])
                            mislabeled[image_id] = bool(extra[j].get("mislabeled"))
                            degraded[image_id] = extra[j].get("quality", "good") != "good"
                            shows[image_id] = extra[j].get("shows", "")
        except (OSError, tarfile.TarError, ValueError, KeyError, IndexError) as error:
            raise UserError(f"{shard_path}: cannot read its json members ({error})") from None
    identities = [reader.identity_name(int(label)) for label in reader.image_labels]
    return ImageTable(reader.image_labels, identities, names, paths, shard_of,
                      mislabeled if truth else None, degraded if truth else None,
                      shows if truth else None)


def load_stats(run_dir: Path, num_images: int) -> dict[str, np.ndarray]:
    path = Path(run_dir) / IMAGE_STATS
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {key: data[key] for key in ("count", "alpha_sum", "cos_sum", "k")}
    except FileNotFoundError:
        raise UserError(f"{path}: no per-image statistics (only attfc runs write them, at "
                        "each checkpoint)") from None
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path}: unreadable ({error})") from None
    if len(stats["count"]) != num_images:
        raise UserError(f"{path}: {len(stats['count'])} images but the run's shards hold "
                        f"{num_images}")
    return stats


def suspicion(labels: np.ndarray, stats: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """Per image: (score, what it is); NaN for images that never served as class images.

    1 − k·mean α when α varies; else the identity median of the mean cosine minus the
    image's own.
    """
    count = stats["count"]
    seen = count > 0
    mean_alpha = np.full(len(count), np.nan)
    mean_alpha[seen] = stats["alpha_sum"][seen] / count[seen]
    if seen.any() and np.ptp(mean_alpha[seen]) > 1e-6:
        return 1.0 - int(stats["k"]) * mean_alpha, "1 - k * mean attention weight"
    return _relative_cosine(labels, count, stats["cos_sum"]), \
        "identity median of mean cosine - own mean cosine"


def _relative_cosine(labels: np.ndarray, count: np.ndarray, cos_sum: np.ndarray
                     ) -> np.ndarray:
    seen = count > 0
    mean_cos = np.full(len(count), np.nan)
    mean_cos[seen] = cos_sum[seen] / count[seen]
    score = np.full(len(count), np.nan)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for group in np.split(order, bounds):
        values = mean_cos[group]
        if np.isfinite(values).any():
            score[group] = np.nanmedian(values) - values
    return score


def precision_recall_at_k(flagged: np.ndarray, ks: list[int]) -> list[dict[str, float]]:
    """``flagged`` in ranked order (most suspicious first): among the first K, the share
    flagged (precision) and the share of all flagged found (recall); chance = flagged share."""
    total = int(flagged.sum())
    hits = np.cumsum(flagged)
    rows = []
    for k in ks:
        k = min(k, len(flagged))
        if k <= 0:
            continue
        found = int(hits[k - 1])
        rows.append({"k": k, "precision": found / k,
                     "recall": found / total if total else float("nan"),
                     "chance": total / len(flagged)})
    return rows


def feature_norms(model_path: Path, reader: ShardReader, batch_size: int = 256) -> np.ndarray:
    """‖F(x)‖ of every photo of the shards by the feature encoder at ``model_path``."""
    import simplejpeg

    from evaluate.features import load_embedder

    embed = load_embedder(model_path)
    norms = np.empty(reader.num_images, np.float32)
    with Progress(reader.num_images, "feature norms", "img") as progress:
        for start in range(0, reader.num_images, batch_size):
            ids = range(start, min(start + batch_size, reader.num_images))
            batch = np.stack([simplejpeg.decode_jpeg(reader.read_image(i), colorspace="RGB")
                              for i in ids]).transpose(0, 3, 1, 2)
            norms[start:start + len(ids)] = np.linalg.norm(embed(batch, flip=False), axis=1)
            progress.update(len(ids))
    return norms


def _norm_margin(run_dir: Path) -> str | None:
    """The run's margin when it ties the feature norm to quality (MagFace, AdaFace)."""
    from model.margins import build_margin

    margin = read_config(run_dir, missing_ok=True).get("margin", "arcface")
    return margin if build_margin(margin).uses_norms else None


def analyse(run_dir: Path, shards_dir: Path | None = None) -> dict[str, Any]:
    """Scores, the ranking and (with planted truth) precision/recall at K, in memory."""
    run_dir = Path(run_dir)
    if shards_dir is None:
        shards_dir = Path(run_config(run_dir).get("shards", ""))
    reader = ShardReader(shards_dir)
    stats = load_stats(run_dir, reader.num_images)
    table = read_image_table(reader)
    score, meaning = suspicion(table.labels, stats)
    scored = np.flatnonzero(np.isfinite(score))
    order = scored[np.argsort(-score[scored], kind="stable")]
    result: dict[str, Any] = {"reader": reader, "table": table, "stats": stats,
                              "score": score, "score_is": meaning, "order": order,
                              "norm": None, "norm_is": None}
    margin, model_path = _norm_margin(run_dir), run_dir / MODEL
    if margin is not None and not model_path.is_file():
        log.warning("%s: not found, so no feature-norm column for this %s run", model_path,
                    margin)
    elif margin is not None:
        result["norm"] = feature_norms(model_path, reader)
        result["norm_is"] = (f"feature norm by {model_path} (the run trained with the {margin} "
                             "margin, which ties it to quality: lowest first)")
    if table.mislabeled is not None:
        truth = {"mislabeled": table.mislabeled, "degraded": table.degraded,
                 "either": table.mislabeled | table.degraded}
        sizes = sorted({int(truth["mislabeled"][order].sum()),
                        int(truth["either"][order].sum()),
                        max(1, len(order) // 20), max(1, len(order) // 10)})
        result["at_k"] = {name: precision_recall_at_k(flags[order], sizes)
                          for name, flags in truth.items()}
        result["planted"] = {name: int(flags[order].sum()) for name, flags in truth.items()}
        if result["norm"] is not None:  # the same photos, ranked by norm instead
            by_norm = order[np.argsort(result["norm"][order], kind="stable")]
            result["at_k_by_norm"] = {name: precision_recall_at_k(flags[by_norm], sizes)
                                      for name, flags in truth.items()}
    return result


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's settings, for the shards it trained on (or a hint to name them)."""
    try:
        return read_config(run_dir)
    except UserError as error:
        raise UserError(f"{error}; pass --shards") from None


def write_noise(run_dir: Path, shards_dir: Path | None = None, thumbnails: int = 24,
                out_dir: Path | None = None) -> Path:
    """RUN/noise/{noise.tsv, noise.md, suspects.png, noise.json}; returns noise.md."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / NOISE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    found = analyse(run_dir, shards_dir)
    table, stats, score, order = found["table"], found["stats"], found["score"], found["order"]
    count = stats["count"]
    k = int(stats["k"])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_cos = stats["cos_sum"] / count
        mean_alpha = stats["alpha_sum"] / count * k
    identity_rank = _identity_ranks(table.labels, score, order)
    header = ["path", "identity", "image", "shard", "label", "score", "mean_cos",
              "mean_alpha_x_k", "times_class_image", "rank", "rank_in_identity"]
    norm = found["norm"]
    if norm is not None:
        header += ["feature_norm", "norm_rank"]
        norm_rank = np.empty(len(norm), np.int64)
        norm_rank[np.argsort(norm, kind="stable")] = np.arange(1, len(norm) + 1)
    truth = table.mislabeled is not None
    if truth:
        header += ["planted_mislabeled", "planted_degraded"]
    lines = ["\t".join(header)]
    for rank, i in enumerate(order, 1):
        row = [table.paths[i], table.identities[i], table.names[i], table.shards[i],
               str(int(table.labels[i])), f"{score[i]:.5f}", f"{mean_cos[i]:.5f}",
               f"{mean_alpha[i]:.4f}", str(int(count[i])), str(rank), str(identity_rank[i])]
        if norm is not None:
            row += [f"{norm[i]:.4f}", str(int(norm_rank[i]))]
        if truth:
            row += [str(int(table.mislabeled[i])), str(int(table.degraded[i]))]
        lines.append("\t".join(field.replace("\t", " ") for field in row))
    write_atomic(out_dir / "noise.tsv", ("\n".join(lines) + "\n").encode())
    shown = [int(i) for i in order[:thumbnails]]
    _thumbnails(found["reader"], table, shown, mean_cos, score, out_dir / "suspects.png")
    summary = {"run": str(run_dir), "images": len(count), "scored": len(order),
               "k": k, "score_is": found["score_is"], "planted": found.get("planted"),
               "at_k": found.get("at_k"), "second_score_is": found["norm_is"],
               "at_k_by_norm": found.get("at_k_by_norm"),
               "top": [{"path": table.paths[i], "identity": table.identities[i],
                        "score": float(score[i])} for i in shown]}
    write_atomic(out_dir / "noise.json", (json.dumps(summary, indent=1) + "\n").encode())
    page = out_dir / "noise.md"
    write_atomic(page, _page(summary, len(table.labels)).encode())
    return page


def _identity_ranks(labels: np.ndarray, score: np.ndarray, order: np.ndarray) -> np.ndarray:
    """1 = the most suspicious photo of its identity (0: never scored)."""
    ranks = np.zeros(len(labels), dtype=np.int64)
    seen: dict[int, int] = {}
    for i in order:
        label = int(labels[i])
        seen[label] = seen.get(label, 0) + 1
        ranks[i] = seen[label]
    return ranks


def _thumbnails(reader: ShardReader, table: ImageTable, shown: list[int], mean_cos: np.ndarray,
                score: np.ndarray, path: Path) -> None:
    """Each suspect beside its identity's most typical photo (highest mean cosine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import simplejpeg

    columns = 4
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.3, rows * 1.55),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, i in enumerate(shown):
        ids = np.array(reader.identity_images(int(table.labels[i])))
        others = ids[(ids != i) & np.isfinite(mean_cos[ids])]
        typical = int(others[np.argmax(mean_cos[others])]) if len(others) else None
        row, col = divmod(n, columns)
        for ax, image_id, caption in (
                (axes[row, 2 * col], i, f"#{n + 1} {score[i]:.2f}" + _truth_tag(table, i)),
                (axes[row, 2 * col + 1], typical, "typical")):
            if image_id is None:
                continue
            pixels = simplejpeg.decode_jpeg(reader.read_image(image_id), colorspace="RGB")
            ax.imshow(pixels)
            ax.set_title(caption, fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def _truth_tag(table: ImageTable, i: int) -> str:
    if table.mislabeled is None:
        return ""
    return " M" if table.mislabeled[i] else " D" if table.degraded[i] else " ok"


def _at_k_table(at_k: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = ["| photos | K | precision@K | recall@K | chance |", "|---|---|---|---|---|"]
    for name, rows in at_k.items():
        lines += [f"| {name} | {r['k']} | {100 * r['precision']:.1f} % | "
                  f"{100 * r['recall']:.1f} % | {100 * r['chance']:.1f} % |" for r in rows]
    return lines


def _page(summary: dict[str, Any], images: int) -> str:
    lines = [f"# Suspect photos: {summary['run']}", "",
             f"{summary['scored']} of {images} images scored (each time a photo serves as a "
             f"class image, k = {summary['k']}, its attention weight and its cosine to the "
             f"identity image's feature are summed). Score = {summary['score_is']}; every "
             "scored photo is in `noise.tsv`, most suspicious first.", "",
             "To drop the flagged photos and reshard, keep the rows to remove (the header "
             "may stay) and pass the file to the sharder with the original command plus "
             "`--exclude`:", "",
             "```", "head -n 101 noise.tsv > exclude.tsv   # the 100 most suspicious",
             "python -m data_engine.shard ... --out NEW_DIR --exclude exclude.tsv", "```", ""]
    if summary["second_score_is"]:
        lines += [f"Second score (columns `feature_norm`, `norm_rank`): "
                  f"{summary['second_score_is']}.", ""]
    if summary["at_k"]:
        lines += ["## Against the planted truth", "", *_at_k_table(summary["at_k"]), ""]
        if summary["at_k_by_norm"]:
            lines += ["Ranked by feature norm instead (lowest first):", "",
                      *_at_k_table(summary["at_k_by_norm"]), ""]
        lines.append("Thumbnail tags: M planted mislabeled, D degraded (blur, occlusion, low "
                     "resolution, noise), ok neither.")
        lines.append("")
    lines += ["## Most suspicious (left) beside the identity's most typical photo (right)", "",
              "![suspects](suspects.png)", ""]
    return "\n".join(lines)
