"""Nearest identity centres at scale: faiss exact search (IndexFlatIP) against the HNSW graph
``python -m evaluate duplicates`` switches to past ``evaluate.knn.FLAT_MAX``, on the CPU.

Centres are drawn clustered like real face embeddings: identities gather around a few
thousand group directions (look-alikes, shared age and ethnicity), each a unit vector
at a chosen angle from its group's, and 1 % of them are planted duplicates (another
centre plus small noise). For each size the bench builds both indexes and searches a
sample of queries (each centre's k = 10 nearest); exact search over all N centres is
N²·D multiply-adds, so its full time is the sample's time scaled by N / sample (labelled
"extrapolated"); HNSW's full query time is measured on the same sample and scaled alike.
Reported: build and query seconds, index memory, HNSW recall@10 against exact, and the
share of planted duplicates each finds as a nearest neighbour. The last size's numbers are
extrapolated to 2M centres (WebFace42M) as exact ~N², HNSW build ~N log N, labelled so.

    python -m bench.knn_scale --sizes 20000 100000 1000000 --out knn_scale.json
    python -m bench.knn_scale --sizes 2000 5000 --sample 500     # seconds (the test's)

The last line printed is one JSON object (the numbers and the machine).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import describe
from common.cli import ArgumentParser, positive_int, run_cli, setup_logging
from common.files import write_atomic
from evaluate import knn

K = 10
DUPLICATE_SHARE = 0.01
GROUP_SIZE = 300  # identities per group direction
GROUP_ANGLE = math.radians(60)  # an identity's angle from its group's direction
DUPLICATE_ANGLE = math.radians(15)  # a duplicate's angle from its original


def _rotate_towards(base: np.ndarray, rng: np.random.Generator, angle: float) -> np.ndarray:
    """Unit rows at ``angle`` from ``base``'s unit rows, in random directions."""
    noise = rng.standard_normal(base.shape, dtype=np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (math.cos(angle) * base + math.sin(angle) * noise).astype(np.float32)


def clustered_centres(size: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit centres [size, dim], row of each planted duplicate's original or -1)."""
    rng = np.random.default_rng(seed)
    groups = rng.standard_normal((max(1, size // GROUP_SIZE), dim), dtype=np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = np.empty((size, dim), np.float32)
    chunk = 100_000
    for start in range(0, size, chunk):
        rows = min(chunk, size - start)
        base = groups[rng.integers(len(groups), size=rows)]
        centres[start:start + rows] = _rotate_towards(base, rng, GROUP_ANGLE)
    original = np.full(size, -1, np.int64)
    copies = rng.choice(size, int(size * DUPLICATE_SHARE), replace=False)
    sources = rng.integers(size, size=len(copies))
    keep = copies != sources
    copies, sources = copies[keep], sources[keep]
    centres[copies] = _rotate_towards(centres[sources], rng, DUPLICATE_ANGLE)
    original[copies] = sources
    return centres, original


def _timed(function, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def measure(size: int, dim: int, sample: int, seed: int) -> dict[str, Any]:
    import faiss

    centres, original = clustered_centres(size, dim, seed)
    rng = np.random.default_rng(seed + 1)
    duplicates = np.flatnonzero(original >= 0)
    queries = np.unique(np.concatenate([
        rng.choice(size, min(sample, size), replace=False),
        duplicates[:max(1, sample // 10)]]))
    row: dict[str, Any] = {"centres": size, "dim": dim, "queries_sampled": len(queries)}
    flat = faiss.IndexFlatIP(dim)
    _, row["flat_build_s"] = _timed(flat.add, centres)
    (exact_scores, exact_ids), seconds = _timed(flat.search, centres[queries], K + 1)
    row["flat_query_sample_s"] = seconds
    row["flat_query_all_s_extrapolated"] = seconds * size / len(queries)
    row["flat_index_bytes"] = int(faiss.serialize_index(flat).nbytes)
    del flat
    hnsw = faiss.IndexHNSWFlat(dim, knn.HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = knn.HNSW_EF_CONSTRUCTION
    hnsw.hnsw.efSearch = knn.HNSW_EF_SEARCH
    _, row["hnsw_build_s"] = _timed(hnsw.add, centres)
    (_, hnsw_ids), seconds = _timed(hnsw.search, centres[queries], K + 1)
    row["hnsw_query_sample_s"] = seconds
    row["hnsw_query_all_s_extrapolated"] = seconds * size / len(queries)
    row["hnsw_index_bytes"] = int(faiss.serialize_index(hnsw).nbytes)
    row["hnsw_recall_at_10"] = float(np.mean([len(set(a) & set(e)) / len(e)
                                              for a, e in zip(hnsw_ids, exact_ids)]))
    planted = original[queries] >= 0
    for name, ids in (("flat", exact_ids), ("hnsw", hnsw_ids)):
        found = [original[q] in ids[i, :2] for i, q in enumerate(queries) if planted[i]]
        row[f"{name}_duplicates_found"] = float(np.mean(found)) if found else float("nan")
    row["median_nn_cosine"] = float(np.median(exact_scores[:, 1]))
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def extrapolate(row: dict[str, Any], size: int) -> dict[str, Any]:
    """The row's times and memory scaled to ``size`` centres (labelled extrapolated)."""
    ratio = size / row["centres"]
    log_ratio = ratio * math.log(size) / math.log(row["centres"])
    return {"centres": size, "extrapolated_from": row["centres"],
            "flat_query_all_s": row["flat_query_all_s_extrapolated"] * ratio ** 2,
            "hnsw_build_s": row["hnsw_build_s"] * log_ratio,
            "hnsw_query_all_s": row["hnsw_query_all_s_extrapolated"] * log_ratio,
            "flat_index_bytes": row["flat_index_bytes"] * ratio,
            "hnsw_index_bytes": row["hnsw_index_bytes"] * ratio}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.knn_scale", description=__doc__)
    parser.add_argument("--sizes", type=positive_int, nargs="+",
                        default=[20_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--sample", type=positive_int, default=10_000,
                        help="queries timed per size (the full time is scaled from them)")
    parser.add_argument("--extrapolate-to", type=positive_int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    import faiss

    rows = []
    for size in args.sizes:
        rows.append(measure(size, args.dim, args.sample, args.seed))
        r = rows[-1]
        print(f"{size:>9} centres: flat build {r['flat_build_s']:.2f}s, all-query "
              f"{r['flat_query_all_s_extrapolated']:.1f}s (extrapolated); HNSW build "
              f"{r['hnsw_build_s']:.1f}s, all-query {r['hnsw_query_all_s_extrapolated']:.1f}s "
              f"(extrapolated), recall@10 {r['hnsw_recall_at_10']:.3f}; duplicates found "
              f"flat {r['flat_duplicates_found']:.3f} hnsw {r['hnsw_duplicates_found']:.3f}; "
              f"index {r['flat_index_bytes'] / 2**30:.2f} / {r['hnsw_index_bytes'] / 2**30:.2f}"
              f" GiB", flush=True)
    result = {"rows": rows, "extrapolated": extrapolate(rows[-1], args.extrapolate_to),
              "flat_max": knn.FLAT_MAX, "threads": faiss.omp_get_max_threads(),
              "machine": describe()}
    text = json.dumps(result)
    if args.out:
        write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    run_cli("bench.knn_scale", main)
