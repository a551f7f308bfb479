"""What every source gives the sharder: a sorted identity list up front, then bytes on demand.

Scanning returns compact per-identity summaries (count, bytes, digest of the listing) instead
of per-file records, so planning 2M identities / 42M files fits in memory; a worker lists or
locates an identity's files again when it writes that identity's shard.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# imap(function, iterable) -> iterator of results in order (a process pool's imap, or map).
Imap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


@dataclass(frozen=True)
class Identity:
    """One person in the source. `digest` changes when their files change (plan hashes)."""

    name: str
    num_files: int
    num_bytes: int
    digest: str
    ref: int = 0  # source-private handle (record-range index, synthetic identity number)
    # Identities merged into this one (itself first), read in turn; empty: just itself.
    members: tuple[Identity, ...] = ()


class SourceFile(NamedTuple):  # a tuple: built once per image, so it must be cheap
    """One image of an identity as read: `data`, or `error` saying why it could not be read."""

    name: str  # image name inside the identity (goes into the sample's json)
    path: str  # where it came from (goes into rejected.tsv)
    data: bytes | None
    error: str | None = None
    info: dict[str, Any] | None = None  # per-image facts for the sample's json (ground truth)


@dataclass
class Scan:
    identities: list[Identity]  # sorted by name, each with at least one file
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    empty: list[str] = field(default_factory=list)  # identity names with no files at all
    merged: list[tuple[str, str]] = field(default_factory=list)  # (name, merged into) --merge


class Source(ABC):
    """A dataset layout. Instances are pickled to worker processes, so keep them small."""

    kind: str

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What identifies this dataset (kind, root, parameters) for the manifest."""

    @abstractmethod
    def scan(self, imap: Imap) -> Scan:
        """List identities (sorted by name); may use `imap` to spread the work."""

    @abstractmethod
    def read_identity(self, identity: Identity) -> Iterator[SourceFile]:
        """The identity's files in a fixed order (runs in a worker process)."""


def listing_digest(lines: Iterable[str]) -> str:
    """Short hash of an identity's file listing, so a changed source changes the plan."""
    text = "\n".join(lines).encode("utf-8", "surrogateescape")
    return hashlib.sha1(text, usedforsecurity=False).hexdigest()[:16]
