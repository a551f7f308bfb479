"""Epoch plan: which identity image, class images and flips each training step sees.

Pure numpy, so both loader backends (and tests) share one source of truth. The plan is a
function of (seed, epoch) alone: the identity-image order is one global permutation of all
image ids, and everything else about step ``s`` (class images, flip bits) comes from an RNG
keyed by (seed, epoch, s). A resumed run therefore computes step ``s`` directly, without
replaying steps ``0..s-1``, and gets exactly the batch an uninterrupted run would have seen.

Several ranks (``world_size`` > 1) share one plan of global batches of ``world_size ×
batch_size`` samples; rank r takes rows ``[r·B, (r+1)·B)`` of every global batch, so the
ranks together see exactly what one process with the global batch would, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_PERMUTATION_STREAM = 0  # keeps the permutation RNG apart from every per-step RNG
_STEP_STREAM = 1


@dataclass(frozen=True)
class StepPlan:
    """Everything a backend needs to build one batch; small, so it pickles cheaply."""

    step: int
    image_ids: np.ndarray        # int64 [B]   identity images
    class_image_ids: np.ndarray  # int64 [B,k] class images of the same identity
    labels: np.ndarray           # int64 [B]
    flips: np.ndarray            # bool  [B,k+1] column 0: identity image, 1..k: class images

    @property
    def all_image_ids(self) -> np.ndarray:
        """[(k+1)*B] decode order shared by the backends: identity images, then class rows."""
        return np.concatenate([self.image_ids, self.class_image_ids.reshape(-1)])

    @property
    def all_flips(self) -> np.ndarray:
        """Flip bits in the same order as :attr:`all_image_ids`."""
        return np.concatenate([self.flips[:, 0], self.flips[:, 1:].reshape(-1)])


def labels_from_starts(identity_start: np.ndarray) -> np.ndarray:
    """Label of every image id, from the index's ``identity_start`` [N+1].

    int32 while labels fit: on a 42M-image dataset that halves this array to 168 MB.
    """
    counts = np.diff(identity_start)
    dtype = np.int32 if len(counts) < 2**31 else np.int64
    return np.repeat(np.arange(len(counts), dtype=dtype), counts)


class EpochPlan:
    """The sampling plan of one epoch; ``plan.step(s)`` is O(B·k) for any ``s``."""

    def __init__(self, identity_start: np.ndarray, batch_size: int, k: int, *, seed: int,
                 epoch: int = 0, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size <= 0 or k < 0:  # k=0: identity images only (fc/partialfc heads)
            raise ValueError(f"need batch_size > 0 and k >= 0, got {batch_size} and {k}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank} and {world_size}")
        if world_size > 1 and not drop_last:  # a short last batch would split unevenly
            raise ValueError("several ranks need drop_last=True")
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = batch_size * world_size
        self.identity_start = np.asarray(identity_start, dtype=np.int64)
        self.labels = labels_from_starts(self.identity_start)
        self.num_images = int(self.identity_start[-1])
        self.batch_size = batch_size
        self.k = k
        self.seed = seed
        self.epoch = epoch
        full, rest = divmod(self.num_images, self.global_batch_size)
        self.num_steps = full if drop_last or rest == 0 else full + 1
        # int32 halves the plan's memory on 42M-image datasets; ids fit while < 2**31.
        dtype = np.int32 if self.num_images < 2**31 else np.int64
        rng = np.random.Generator(np.random.PCG64([seed, epoch, _PERMUTATION_STREAM]))
        self.order = rng.permutation(np.arange(self.num_images, dtype=dtype))

    def __len__(self) -> int:
        return self.num_steps

    def step(self, step: int) -> StepPlan:
        """This rank's part of the batch of ``step``, from (seed, epoch, step) alone."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside 0..{self.num_steps - 1}")
        whole = self._global_step(step)
        if self.world_size == 1:
            return whole
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return StepPlan(step, whole.image_ids[rows], whole.class_image_ids[rows],
                        whole.labels[rows], whole.flips[rows])

    def _global_step(self, step: int) -> StepPlan:
        """The whole global batch: every rank draws it alike, then keeps its rows."""
        size = self.global_batch_size
        ids = self.order[step * size:(step + 1) * size].astype(np.int64)
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, _STEP_STREAM, step]))
        labels = self.labels[ids].astype(np.int64)
        start = self.identity_start[labels]
        others = self.identity_start[labels + 1] - start - 1
        picks = _pick_others(rng, others, self.k)  # index among the identity's other images
        position = (ids - start)[:, None]
        class_ids = start[:, None] + picks + (picks >= position)  # skip the identity image
        class_ids[others == 0] = ids[others == 0, None]  # alone: the image is its own class
        flips = rng.integers(0, 2, size=(len(ids), self.k + 1), dtype=np.uint8).astype(bool)
        return StepPlan(step, ids, class_ids, labels, flips)

    def steps(self, start_step: int = 0) -> Iterator[StepPlan]:
        """Step plans from ``start_step`` to the end of the epoch."""
        for step in range(start_step, self.num_steps):
            yield self.step(step)


def _pick_others(rng: np.random.Generator, others: np.ndarray, k: int) -> np.ndarray:
    """k indices in ``[0, others)`` per row: distinct while the row has enough, then repeats.

    Rows with ``others >= k`` get k distinct picks (without replacement). Rows with fewer
    get all of them in random order first and the rest drawn with replacement, so no image
    repeats while another one of the identity is still unused.
    """
    rows = len(others)
    picks = np.zeros((rows, k), dtype=np.int64)
    pool = np.maximum(others, 1)  # rows with no others are overwritten by the caller
    for t in range(k):
        distinct = pool - t > 0
        pick = rng.integers(0, np.where(distinct, pool - t, pool))
        # Map "the pick-th unused index" to an index: step over the used ones in order.
        for used in np.sort(picks[:, :t], axis=1).T:
            pick += distinct & (pick >= used)
        picks[:, t] = pick
    return picks


def same_identity_pair_rate(labels: np.ndarray) -> float:
    """Fraction of unordered pairs inside one batch that share a label.

    The loader's shuffle is global, so this should match :func:`uniform_pair_rate`; a
    shard- or buffer-local shuffle would show up here as a much higher rate.
    """
    _, counts = np.unique(labels, return_counts=True)
    batch = len(labels)
    return float((counts * (counts - 1)).sum() / (batch * (batch - 1)))


def uniform_pair_rate(identity_start: np.ndarray) -> float:
    """Expected same-label pair rate for a uniform random permutation of all images."""
    counts = np.diff(np.asarray(identity_start, dtype=np.float64))
    total = counts.sum()
    return float((counts * (counts - 1)).sum() / (total * (total - 1)))
