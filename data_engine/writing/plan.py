"""Split the sorted identity list into shards before anything is written.

The split depends only on the identity list, the file sizes and --shard-size (never on the
worker count), so every shard can be written independently, in parallel, and a rerun can
tell which shards are already done by comparing their plan hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from data_engine.layout import shard_name
from data_engine.writing.sources import Identity
from data_engine.writing.tarwriter import BLOCK

# Per sample: a tar header per image plus average block padding, and the cls/json members.
_PER_IMAGE_OVERHEAD = BLOCK + BLOCK // 2
_PER_SAMPLE_OVERHEAD = 4 * BLOCK


@dataclass(frozen=True)
class ShardPlan:
    """Identities [first, stop) of the sorted list go to shard `index`."""

    index: int
    first: int
    stop: int
    label_base: int  # label of identity `first` if no earlier identity ends up empty
    num_files: int
    estimated_bytes: int
    plan_hash: str

    @property
    def name(self) -> str:
        return shard_name(self.index)


def estimated_bytes(identity: Identity) -> int:
    return (identity.num_bytes + identity.num_files * _PER_IMAGE_OVERHEAD
            + _PER_SAMPLE_OVERHEAD)


def plan_shards(identities: list[Identity], shard_size: int, fingerprint: str) -> list[ShardPlan]:
    """Greedy fill in identity order: start a new shard when the next identity won't fit."""
    plans: list[ShardPlan] = []
    first, size, files = 0, 0, 0
    for i, identity in enumerate(identities):
        cost = estimated_bytes(identity)
        if i > first and size + cost > shard_size:
            plans.append(_plan(len(plans), first, i, files, size, identities, fingerprint))
            first, size, files = i, 0, 0
        size += cost
        files += identity.num_files
    if identities:
        plans.append(_plan(len(plans), first, len(identities), files, size, identities,
                           fingerprint))
    return plans


def _plan(index: int, first: int, stop: int, files: int, size: int,
          identities: list[Identity], fingerprint: str) -> ShardPlan:
    digest = hashlib.sha256(f"{fingerprint}\n{index}\n{first}\n".encode())
    for identity in identities[first:stop]:
        digest.update(f"{identity.name}\t{identity.num_files}\t{identity.digest}\n".encode(
            "utf-8", "surrogateescape"))
    return ShardPlan(index, first, stop, first, files, size, digest.hexdigest())
