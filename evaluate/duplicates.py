"""``python -m evaluate duplicates RUN``: one person under two identity names, and training
people who are also in the test sets.

Each identity's centre (:mod:`evaluate.centres`) is searched against all others with faiss
(:mod:`evaluate.knn`). The threshold is relative to the run's own geometry, not a fixed
cosine: how close unrelated people sit depends on the head and the training (an AttFC run
at a high learning rate packs all embeddings into a narrow cone where different people are
at cosine 0.9 and more, an FC run spreads them near 0.3). Among the nearest-neighbour
cosines of all identities (almost all of them between different people) a duplicate is an
outlier: a pair is listed when the robust z-score of its closeness -log(1 - cos),
(x - median) / (1.4826·MAD), reaches ``z`` (3.5 by default, the usual outlier cut-off for
this score). ``--threshold``
sets a cosine instead; the histogram shows where the cut falls.

``--against`` matches the centres with evaluation-set images or templates the same way:
for each identity its best match, and the outliers of that distribution are the overlap.

Writes RUN/duplicates/: duplicates.tsv (name a, name b, cosine, z, photo counts, labels;
its first two columns are what ``python -m data_engine.shard --merge`` reads), overlap.tsv
(first column the identity name, what ``--exclude`` reads to leave the identity out),
duplicates.md with thumbnails and the histogram, duplicates.json, and centres.npz (the
cache). On synthetic shards with planted truth, precision and recall are measured.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import write_atomic
from common.run_folder import DUPLICATES_DIR, MODEL
from data_engine.loading.reader import ShardReader
from evaluate import knn
from evaluate.eval_sets import EvalSet, find_eval_sets
from evaluate.noise import read_image_table, run_config
from synthetic.casting import TRUTH_KEYS
from synthetic.faces import identity_name

log = logging.getLogger("evaluate.duplicates")

DEFAULT_Z = 3.5
MAD_TO_SIGMA = 1.4826  # MAD x this = standard deviation for a normal distribution


@dataclass(frozen=True)
class Cut:
    """A cosine threshold and the robust statistics of closeness it was derived from.

    Closeness is -log(1 - cos): a model that packs every embedding into a narrower cone
    shrinks all distances 1 - cos by about one factor, which this turns into a shift that
    the median absorbs, so the same z cuts alike in a wide and in a narrow geometry (and
    the cut never passes cosine 1).
    """

    threshold: float
    median: float  # of closeness
    scale: float  # 1.4826 MAD of closeness (std as fallback when MAD is 0)
    z: float | None  # None when the threshold was given as a cosine

    def zscore(self, cosine: np.ndarray | float) -> np.ndarray | float:
        return (closeness(cosine) - self.median) / self.scale


def closeness(cosine: np.ndarray | float) -> np.ndarray:
    return -np.log(np.maximum(1.0 - np.asarray(cosine, np.float64), 1e-7))


def robust_cut(cosines: np.ndarray, z: float = DEFAULT_Z, threshold: float | None = None
               ) -> Cut:
    """The cosine at robust z-score ``z`` of ``cosines``' closeness (or ``threshold``)."""
    values = np.asarray(cosines, np.float64)
    values = closeness(values[np.isfinite(values)])
    if len(values) == 0:
        raise UserError("no scores to place a threshold in (fewer than 2 identities?)")
    median = float(np.median(values))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    if scale <= 0:
        scale = float(values.std()) or 1e-12
    if threshold is not None:
        return Cut(float(threshold), median, scale, None)
    return Cut(float(1.0 - np.exp(-(median + z * scale))), median, scale, z)


def neighbours(unit: np.ndarray, k: int, gpu: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(cosines [N,k], labels [N,k], index kind) of each centre's k nearest other centres."""
    scores, ids, kind = knn.search(unit, unit, k + 1, gpu=gpu)
    rows = np.arange(len(unit))[:, None]
    keep = ids != rows  # drop the centre itself wherever it landed (ties)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1), kind)


def duplicate_pairs(scores: np.ndarray, ids: np.ndarray, cut: Cut) -> list[tuple[int, int, float]]:
    """(a, b, cosine) with a < b for every neighbour pair at or above the cut, best first."""
    found: dict[tuple[int, int], float] = {}
    for a, b in zip(*np.nonzero(scores >= cut.threshold)):
        other = int(ids[a, b])
        if other >= 0:
            pair = (min(int(a), other), max(int(a), other))
            found[pair] = max(found.get(pair, -np.inf), float(scores[a, b]))
    return sorted(((a, b, c) for (a, b), c in found.items()), key=lambda row: (-row[2], row))


def identity_people(reader: ShardReader) -> list[str] | None:
    """Per label, the person most of its photos show (planted synthetic truth), else None
    (without reading the shards unless their manifest says they hold the truth)."""
    if not any(key in reader.manifest.get("source_info", {}) for key in TRUTH_KEYS):
        return None
    table = read_image_table(reader)
    if table.shows is None:
        return None
    people = []
    for label in range(reader.num_identities):
        ids = reader.identity_images(label)
        people.append(Counter(table.shows[i] for i in ids).most_common(1)[0][0])
    return people


def pair_truth(pairs: list[tuple[int, int, float]], people: list[str]) -> dict[str, float]:
    """Precision and recall of the listed pairs against the planted same-person pairs."""
    groups = Counter(people)
    true_pairs = sum(n * (n - 1) // 2 for n in groups.values())
    hits = sum(people[a] == people[b] for a, b, _ in pairs)
    total = len(people) * (len(people) - 1) // 2
    return {"listed": len(pairs), "planted": true_pairs, "found": hits,
            "precision": hits / len(pairs) if pairs else float("nan"),
            "recall": hits / true_pairs if true_pairs else float("nan"),
            "chance": true_pairs / total if total else float("nan")}


def overlap(unit: np.ndarray, sets: list[EvalSet], z: float, threshold: float | None,
            gpu: int | None) -> tuple[list[dict[str, Any]], Cut, np.ndarray]:
    """Training labels whose best match in any evaluation set passes the cut, best first."""
    best = np.full(len(unit), -np.inf)
    where: list[tuple[int, int]] = [(-1, -1)] * len(unit)
    for s, test in enumerate(sets):
        scores, ids, _ = knn.search(test.features, unit, 1, gpu=gpu)
        better = scores[:, 0] > best
        best[better] = scores[better, 0]
        for label in np.flatnonzero(better):
            where[label] = (s, int(ids[label, 0]))
    cut = robust_cut(best, z, threshold)
    rows = [{"label": int(label), "cosine": float(best[label]), "set": where[label][0],
             "item": where[label][1]} for label in np.flatnonzero(best >= cut.threshold)]
    return sorted(rows, key=lambda row: (-row["cosine"], row["label"])), cut, best


def overlap_truth(rows: list[dict[str, Any]], people: list[str], sets: list[EvalSet]
                  ) -> dict[str, float] | None:
    """Against synthetic IJB subjects (person names): which training identities are in them."""
    subjects = {identity_name(int(s)) for test in sets if test.subjects is not None
                for s in test.subjects if s >= 0}
    if not subjects:
        return None
    truth = np.array([person in subjects for person in people])
    hits = sum(bool(truth[row["label"]]) for row in rows)
    return {"listed": len(rows), "planted": int(truth.sum()), "found": hits,
            "precision": hits / len(rows) if rows else float("nan"),
            "recall": hits / int(truth.sum()) if truth.any() else float("nan"),
            "chance": float(truth.mean())}


def write_duplicates(run_dir: Path, *, shards_dir: Path | None = None,
                     out_dir: Path | None = None, model: Path | None = None,
                     device: str = "auto", batch_size: int = 256, workers: int | None = None,
                     neighbours_k: int = 10, z: float = DEFAULT_Z,
                     threshold: float | None = None, against: list[Path] | None = None,
                     thumbnails: int = 16, flip: bool = True) -> Path:
    """RUN/duplicates/ (see the module docstring); returns duplicates.md."""
    from common.device import resolve_device
    from evaluate.centres import identity_centres
    from evaluate.features import load_embedder

    run_dir = Path(run_dir)
    if shards_dir is None:
        shards_dir = Path(run_config(run_dir).get("shards", ""))
    model = Path(model) if model else run_dir / MODEL
    if not model.is_file():
        raise UserError(f"{model}: no model (train writes RUN/model.pt at the end; or pass "
                        "--model)")
    if against:
        find_eval_sets(against)  # a wrong path fails before the long pass over the photos
    reader = ShardReader(shards_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / DUPLICATES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if reader.num_identities < 2:
        raise UserError(f"{shards_dir}: {reader.num_identities} identity; duplicates need 2")
    device = resolve_device(device)
    gpu = knn.search_gpu(device)
    embed = load_embedder(model, device=device)
    centres = identity_centres(embed, model, shards_dir, out_dir / "centres.npz",
                               batch_size=batch_size, workers=workers, flip=flip)
    unit = centres.unit()
    scores, ids, kind = neighbours(unit, min(neighbours_k, reader.num_identities - 1), gpu)
    cut = robust_cut(scores[:, 0], z, threshold)
    pairs = duplicate_pairs(scores, ids, cut)
    names = [reader.identity_name(label) for label in range(reader.num_identities)]
    counts = centres.counts
    _write_tsv(out_dir / "duplicates.tsv",
               ["name_a", "name_b", "cosine", "z", "images_a", "images_b", "label_a", "label_b"],
               [[names[a], names[b], f"{c:.5f}", f"{cut.zscore(c):.2f}", str(counts[a]),
                 str(counts[b]), str(a), str(b)] for a, b, c in pairs])
    people = identity_people(reader)
    summary: dict[str, Any] = {
        "run": str(run_dir), "model": str(model), "identities": reader.num_identities,
        "index": kind, "neighbours": int(scores.shape[1]), "cut": cut.__dict__,
        "pairs": len(pairs), "truth": pair_truth(pairs, people) if people else None}
    _histogram(scores[:, 0], cut, "nearest other identity's cosine",
               out_dir / "duplicates_hist.png")
    _grid([[*_photos(reader, a), *_photos(reader, b)] for a, b, _ in pairs[:thumbnails]],
          [f"{names[a]} | {names[b]}  cos {c:.3f}" for a, b, c in pairs[:thumbnails]],
          out_dir / "duplicates.png")
    if against:
        summary["against"] = _write_overlap(out_dir, against, embed, batch_size,
                                            max(1, workers or 1), flip, unit, z, threshold, gpu,
                                            reader, names, counts, people, thumbnails)
    write_atomic(out_dir / "duplicates.json", (json.dumps(summary, indent=1) + "\n").encode())
    page = out_dir / "duplicates.md"
    write_atomic(page, _page(summary).encode())
    return page


def _write_overlap(out_dir: Path, against: list[Path], embed, batch_size: int, workers: int,
                   flip: bool, unit: np.ndarray, z: float,
                   threshold: float | None, gpu: int | None, reader: ShardReader,
                   names: list[str], counts: np.ndarray, people: list[str] | None,
                   thumbnails: int) -> dict[str, Any]:
    from evaluate.eval_sets import load_eval_sets

    sets = load_eval_sets(against, embed, batch_size=batch_size, flip=flip, workers=workers)
    rows, cut, best = overlap(unit, sets, z, threshold, gpu)
    _write_tsv(out_dir / "overlap.tsv",
               ["identity", "cosine", "z", "images", "label", "eval_set", "item"],
               [[names[r["label"]], f"{r['cosine']:.5f}", f"{cut.zscore(r['cosine']):.2f}",
                 str(counts[r["label"]]), str(r["label"]), sets[r["set"]].name,
                 sets[r["set"]].items[r["item"]]] for r in rows])
    _histogram(best, cut, "best cosine to an evaluation item", out_dir / "overlap_hist.png")
    shown = rows[:thumbnails]
    _grid([[*_photos(reader, r["label"]), sets[r["set"]].picture(r["item"])] for r in shown],
          [f"{names[r['label']]} | {sets[r['set']].name} {sets[r['set']].items[r['item']]}"
           for r in shown], out_dir / "overlap.png")
    return {"sets": [{"name": s.name, "path": str(s.path), "items": len(s.items)}
                     for s in sets],
            "cut": cut.__dict__, "identities": len(rows),
            "truth": overlap_truth(rows, people, sets) if people else None}


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join(header), *("\t".join(f.replace("\t", " ") for f in row) for row in rows)]
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))


def _photos(reader: ShardReader, label: int, count: int = 2) -> list[np.ndarray]:
    import simplejpeg

    ids = list(reader.identity_images(label))[:count]
    return [simplejpeg.decode_jpeg(reader.read_image(i), colorspace="RGB") for i in ids]


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def _histogram(values: np.ndarray, cut: Cut, what: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values[np.isfinite(values)], bins=50, color="#4477aa")
    ax.axvline(cut.threshold, color="#cc3311", label=f"cut {cut.threshold:.3f}")
    ax.axvline(cut.median, color="#999999", linestyle="--", label=f"median {cut.median:.3f}")
    ax.set_xlabel(what)
    ax.set_ylabel("identities")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, _figure_png(fig))


def _grid(rows: list[list[np.ndarray]], captions: list[str], path: Path) -> None:
    """One row of pictures per listed match, captioned; an empty note when nothing is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max((len(row) for row in rows), default=1)
    fig, axes = plt.subplots(max(1, len(rows)), columns, squeeze=False,
                             figsize=(columns * 1.3, max(1, len(rows)) * 1.5))
    for ax in axes.flat:
        ax.axis("off")
    if not rows:
        axes[0, 0].text(0, 0.5, "nothing listed", fontsize=8)
    for r, (row, caption) in enumerate(zip(rows, captions)):
        for c, picture in enumerate(row):
            axes[r, c].imshow(picture)
        axes[r, 0].set_title(caption, fontsize=6, loc="left")
    fig.tight_layout()
    write_atomic(path, _figure_png(fig))


def _truth_lines(truth: dict[str, float] | None, what: str) -> list[str]:
    if not truth:
        return []
    return ["", f"Against the planted truth ({what}): {truth['found']} of {truth['listed']} "
            f"listed are planted (precision {100 * truth['precision']:.1f} %), "
            f"{truth['found']} of {truth['planted']} planted found (recall "
            f"{100 * truth['recall']:.1f} %); chance precision {100 * truth['chance']:.2f} %."]


def _cut_text(cut: dict[str, Any]) -> str:
    how = (f"robust z ≥ {cut['z']}" if cut["z"] is not None else "given as --threshold")
    return (f"cosine ≥ {cut['threshold']:.4f} ({how}; closeness -log(1 - cos) median "
            f"{cut['median']:.3f}, 1.4826·MAD {cut['scale']:.3f})")


def _page(summary: dict[str, Any]) -> str:
    lines = [f"# Duplicate identities: {summary['run']}", "",
             f"{summary['identities']} identity centres (mean unit embedding of each "
             f"identity's photos by {summary['model']}), {summary['neighbours']} nearest "
             f"neighbours each ({summary['index']} faiss index). Listed: "
             f"{summary['pairs']} pairs at {_cut_text(summary['cut'])}, all in "
             "`duplicates.tsv`, closest first.",
             *_truth_lines(summary["truth"], "pairs of names showing one person"), "",
             "The cut is relative to this run's geometry; the histogram shows every "
             "identity's nearest other identity. To choose another, pass `--z` or "
             "`--threshold`. To merge the listed pairs, keep the rows to merge and reshard "
             "with the original command plus `--merge duplicates.tsv`.", "",
             "![nearest-neighbour cosines](duplicates_hist.png)", "",
             "## Closest pairs (two photos of each name)", "", "![pairs](duplicates.png)", ""]
    against = summary.get("against")
    if against:
        sets = ", ".join(f"{s['name']} ({s['items']} items)" for s in against["sets"])
        lines += ["## Overlap with evaluation sets", "",
                  f"Matched against {sets}: {against['identities']} training identities at "
                  f"{_cut_text(against['cut'])}, in `overlap.tsv`.",
                  *_truth_lines(against["truth"], "training names showing a test subject"),
                  "", "To leave them out, reshard with the original command plus "
                  "`--exclude overlap.tsv` (its first column names whole identities).", "",
                  "![best match cosines](overlap_hist.png)", "",
                  "## Training identity (two photos) beside its evaluation match", "",
                  "![overlap](overlap.png)", ""]
    return "\n".join(lines)
