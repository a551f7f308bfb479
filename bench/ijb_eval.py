"""IJB-C scoring after features: our vectorised evaluate package vs the per-template loops.

Builds an IJB-C-sized protocol in memory (469,375 images, 23,124 templates, 15,658,489 pairs,
3,531 gallery and 19,593 probe templates at --scale 1; synthetic meta, random features with
a subject structure so the metrics are not trivial), then times, in the same run, from
per-image features to every metric (TAR@FAR, top-1/5/10, TPIR@FPIR):

- ours: evaluate.ijb.score (sort-based pooling, BLAS pair blocks, faiss 1:N);
- reference: bench/ijb_reference.py, the loops of insightface's eval_ijbc.py / ijb_1n.py.

Meta parsing is outside both timings. With ``--whole-process DIR`` it also writes that
protocol to DIR as IJB-C files (meta/ijbc_*.txt and .csv, features F.npy, faceness S.npy;
kept for the next run) and times both as a user meets them, each one whole process from
interpreter start to the JSON file: ``python -m evaluate ijbc --root DIR --features F.npy
--faceness S.npy --out ours.json`` against ``python -m bench.ijb_reference`` with the same
arguments (pandas / np.loadtxt reading as eval_ijbc.py and ijb_1n.py do, then the loops).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import ijb_reference
from bench.machine import describe
from evaluate import ijb
from evaluate.ijb_meta import ImageMeta, SearchSet

FULL = {"images": 469_375, "templates": 23_124, "pairs": 15_658_489, "gallery": 3_531}


def synthetic_protocol(scale: float, seed: int = 0, dim: int = 512, noise: float = 8.0):
    """(images, features float32, faceness, protocol) shaped like IJB-C at ``scale``."""
    rng = np.random.default_rng(seed)
    n_images = max(40, round(FULL["images"] * scale))
    n_templates = max(20, round(FULL["templates"] * scale))
    n_gallery = max(6, round(FULL["gallery"] * scale))
    n_pairs = max(100, round(FULL["pairs"] * scale))
    n_probe = n_templates - n_gallery
    template_ids = rng.permutation(n_templates).astype(np.int64) + 1
    subject_of = np.concatenate([np.arange(n_gallery), rng.integers(0, n_gallery, n_probe)])
    owner = np.concatenate([np.arange(n_templates),
                            rng.integers(0, n_templates, n_images - n_templates)])
    rng.shuffle(owner)
    templates = template_ids[owner]
    medias = owner * 4 + rng.integers(0, 4, n_images)  # up to 4 media (videos) per template
    centers = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    features = rng.standard_normal((n_images, dim), dtype=np.float32)
    for start in range(0, n_images, 65536):
        block = slice(start, start + 65536)
        features[block] *= noise
        features[block] += centers[subject_of[owner[block]]]
    faceness = rng.uniform(0.5, 1.0, n_images)

    probe_rows = np.arange(n_gallery, n_templates)
    genuine = np.stack([subject_of[probe_rows], probe_rows], axis=1)  # gallery row = subject
    impostor = np.stack([rng.integers(0, n_gallery, n_pairs - n_probe),
                         rng.integers(n_gallery, n_templates, n_pairs - n_probe)], axis=1)
    rows = np.concatenate([genuine, impostor])[rng.permutation(n_pairs)]
    labels = (subject_of[rows[:, 0]] == subject_of[rows[:, 1]]).astype(np.int8)
    pairs = template_ids[rows]

    def search_set(name: str, members: np.ndarray) -> SearchSet:
        rows_of = np.flatnonzero(np.isin(owner, members))
        return SearchSet(name, templates[rows_of], subject_of[owner[rows_of]] + 1000)

    half = n_gallery // 2
    sets = (search_set("gallery_G1", np.arange(half)),
            search_set("gallery_G2", np.arange(half, n_gallery)),
            search_set("probe_mixed", probe_rows))
    protocol = ijb.Protocol(pairs, labels, sets, "pairs", {s.name: s.name for s in sets})
    images = ImageMeta([f"{i}.jpg" for i in range(n_images)], templates, medias)
    return images, features, faceness, protocol


def run_reference(images, features, faceness, protocol) -> dict:
    g1, g2, probe = ((s.templates, s.subjects) for s in protocol.sets)
    return ijb_reference.evaluate(features, faceness, images.templates, images.medias,
                                  protocol.pairs, protocol.labels, g1, g2, probe)


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = float(value)
    return out


def _write_lines(path: Path, header: str | None, *columns) -> None:
    lines = map(" ".join if header is None else ",".join,
                zip(*(map(str, c.tolist() if isinstance(c, np.ndarray) else c)
                      for c in columns)))
    with path.open("w") as out:
        if header is not None:
            out.write(header + "\n")
        for line in lines:
            out.write(line + "\n")


def write_ijbc(root: Path, images, features, faceness, protocol) -> None:
    """The in-memory protocol as the IJB-C files ``python -m evaluate ijbc`` reads."""
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    _write_lines(meta / "ijbc_face_tid_mid.txt", None, images.names, images.templates,
                 images.medias)
    _write_lines(meta / "ijbc_template_pair_label.txt", None, protocol.pairs[:, 0],
                 protocol.pairs[:, 1], protocol.labels)
    for search_set in protocol.sets:
        _write_lines(meta / f"ijbc_1N_{search_set.name}.csv", "TEMPLATE_ID,SUBJECT_ID,FILENAME",
                     search_set.templates, search_set.subjects,
                     [f"img/{t}.jpg" for t in search_set.templates.tolist()])
    np.save(root / "F.npy", features)
    np.save(root / "S.npy", faceness)
    (root / "complete").write_text("")


def time_process(command: list[str]) -> tuple[float, float]:
    """Wall and CPU (children) seconds of one whole process."""
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return wall, (after.children_user - before.children_user
                  + after.children_system - before.children_system)


def whole_process(root: Path, images, features, faceness, protocol) -> dict:
    """Both scorers as whole processes on the files in ``root``; returns the figures."""
    if not (root / "complete").is_file():
        start = time.perf_counter()
        write_ijbc(root, images, features, faceness, protocol)
        print(f"wrote {root} in {time.perf_counter() - start:.1f} s", flush=True)
    repo = Path(__file__).resolve().parents[1]
    data = ["--root", str(root), "--features", str(root / "F.npy"),
            "--faceness", str(root / "S.npy")]
    ours_json, reference_json = root / "ours.json", root / "reference.json"
    env_python = [sys.executable]
    os.environ["PYTHONPATH"] = str(repo)  # the children import the checkout's evaluate
    ours_s, ours_cpu = time_process([*env_python, "-m", "evaluate", "ijbc", *data,
                                     "--out", str(ours_json)])
    print(f"ours (whole process):      {ours_s:8.2f} s (cpu {ours_cpu:.1f} s)", flush=True)
    reference_s, reference_cpu = time_process([*env_python, "-m", "bench.ijb_reference",
                                               *data, "--out", str(reference_json)])
    print(f"reference (whole process): {reference_s:8.2f} s (cpu {reference_cpu:.1f} s)",
          flush=True)
    ours = json.loads(ours_json.read_text())
    ours.pop("roc")
    mine, theirs = flatten(ours), flatten(json.loads(reference_json.read_text()))
    if mine.keys() != theirs.keys():
        raise SystemExit(f"metric keys differ: {sorted(mine)} vs {sorted(theirs)}")
    diff = max(abs(mine[k] - theirs[k]) for k in mine)
    print(f"whole-process ratio reference/ours: {reference_s / ours_s:.1f}x, "
          f"max |metric diff| = {diff:.3g}", flush=True)
    return {"whole_ours_s": round(ours_s, 3), "whole_reference_s": round(reference_s, 3),
            "whole_ratio": round(reference_s / ours_s, 2), "whole_max_abs_metric_diff": diff,
            "whole_ours_cpu_s": round(ours_cpu, 2),
            "whole_reference_cpu_s": round(reference_cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--whole-process", type=Path, metavar="DIR",
                        help="also time both as whole processes on IJB-C files written to DIR")
    parser.add_argument("--whole-only", action="store_true",
                        help="with --whole-process: skip the in-process timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    images, features, faceness, protocol = synthetic_protocol(args.scale, args.seed, args.dim)
    print(f"built protocol in {time.perf_counter() - start:.1f} s: {len(features)} images, "
          f"{len(np.unique(images.templates))} templates, {len(protocol.pairs)} pairs, "
          f"{len(np.unique(protocol.sets[2].templates))} probe templates", flush=True)

    figures = {"scale": args.scale, "images": len(features), "pairs": len(protocol.pairs)}
    if not args.whole_only:
        figures.update(in_process(images, features, faceness, protocol))
    if args.whole_process is not None:
        figures.update(whole_process(args.whole_process, images, features, faceness, protocol))
    print(json.dumps({**figures, "machine": describe(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))


def in_process(images, features, faceness, protocol) -> dict:
    """Both scorers called in this process, from per-image features to every metric."""
    # wall time is the measure; CPU time (all threads) is printed too, as context on a
    # machine shared with other jobs
    start, cpu = time.perf_counter(), time.process_time()
    ours = ijb.score(images, features, faceness, protocol).metrics
    ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"ours:      {ours_s:8.2f} s (cpu {ours_cpu:.1f} s)  {json.dumps(ours)}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    reference = run_reference(images, features, faceness, protocol)
    reference_s, reference_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"reference: {reference_s:8.2f} s (cpu {reference_cpu:.1f} s)  {json.dumps(reference)}",
          flush=True)

    mine, theirs = flatten(ours), flatten(reference)
    if mine.keys() != theirs.keys():
        raise SystemExit(f"metric keys differ: {sorted(mine)} vs {sorted(theirs)}")
    diff = max(abs(mine[k] - theirs[k]) for k in mine)
    print(f"ratio reference/ours: {reference_s / ours_s:.1f}x, max |metric diff| = {diff:.3g}")
    return {"ours_s": round(ours_s, 3), "reference_s": round(reference_s, 3),
            "ratio": round(reference_s / ours_s, 2), "max_abs_metric_diff": diff,
            "ours_cpu_s": round(ours_cpu, 2), "reference_cpu_s": round(reference_cpu, 2)}

if __name__ == "__main__":
    main()
