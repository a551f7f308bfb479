"""k nearest neighbours by cosine over unit vectors with faiss: exact where it fits.

Exact search (IndexFlatIP) of all N centres against each other costs N²·D multiply-adds;
an HNSW graph (32 links, efSearch 128) costs about N log N to build and to search, at a
small loss of recall. Measured on the CPU (``python -m bench.knn_scale``, 2 cores, D = 512,
BENCHMARKS.md): at 100k centres exact search took 40 s against HNSW's 17 s build + 15 s
search, at 50k 10 s against 7 + 6 s, at 1M ~64 min against 7.4 + 7.3 min (recall@10 0.95).
They cross below 100k, where exact costs at most ~20 % more and misses nothing: exact up to
``FLAT_MAX``, HNSW past it. On a GPU, exact search is fast enough at any size this project
meets (2M centres), so it is always exact there.
"""

from __future__ import annotations

import logging

import numpy as np

from evaluate.search import GPU_MAX_K, faiss_gpu

log = logging.getLogger("evaluate.knn")

FLAT_MAX = 100_000
HNSW_LINKS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
QUERY_CHUNK = 65536


def index_kind(size: int, on_gpu: bool) -> str:
    """flat-gpu, flat or hnsw: the index :func:`search` builds for ``size`` vectors."""
    if on_gpu:
        return "flat-gpu"
    return "flat" if size <= FLAT_MAX else "hnsw"


def search_gpu(device: str) -> int | None:
    """The GPU faiss searches on for ``--device`` (None: the CPU)."""
    import faiss

    return faiss_gpu(device, faiss.get_num_gpus())


def search(vectors: np.ndarray, queries: np.ndarray, k: int, *, gpu: int | None = None
           ) -> tuple[np.ndarray, np.ndarray, str]:
    """(scores [Q,k], ids [Q,k], index kind): the k vectors with the largest inner product
    with each query; ids -1 (score -inf) where fewer than k exist."""
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    size, dim = vectors.shape
    kind = index_kind(size, gpu is not None and k <= GPU_MAX_K)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    if kind == "flat-gpu":
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, gpu, index)
    log.info("faiss %s index over %d vectors, %d queries, k = %d", kind, size, len(queries), k)
    k = min(k, size)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = np.ascontiguousarray(queries[start:start + QUERY_CHUNK], np.float32)
        scores[start:start + len(chunk)], ids[start:start + len(chunk)] = index.search(chunk, k)
    scores[ids < 0] = -np.inf
    return scores, ids, kind
