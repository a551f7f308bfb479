"""``--merge FILE.tsv``: identity names that are one person, sharded under one label.

Each line's first two tab-separated columns name two identities (``python -m evaluate
duplicates`` writes them so; a header and # lines are skipped). Pairs chain into groups;
a group takes the label of its first name in sorted order, and the other names' photos join
it under ``<their name>/<image name>``. Nothing is dropped: the manifest lists every merged
name with the name it went into.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from common.errors import UserError
from data_engine.writing.sources import Identity, Scan
from data_engine.writing.sources.base import listing_digest

HEADER = "name_a"


def read_merge(path: Path) -> list[tuple[str, str, int]]:
    """(name a, name b, line number) of every pair in the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--merge {path}: cannot read ({error})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#") or line.startswith(HEADER + "\t"):
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise UserError(f"--merge {path}:{number}: expected two tab-separated identity "
                            f"names, got {line[:80]!r}")
        pairs.append((fields[0], fields[1], number))
    return pairs


def merge_sha256(pairs: list[tuple[str, str, int]]) -> str:
    """What the fingerprint records: the pairs, order and line numbers aside."""
    text = "\n".join(sorted(f"{min(a, b)}\t{max(a, b)}" for a, b, _ in pairs))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _groups(pairs: list[tuple[str, str, int]]) -> dict[str, str]:
    """name -> its group's first name (union-find, the smallest name as root)."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {name: root(name) for name in parent}


def apply_merges(scan: Scan, pairs: list[tuple[str, str, int]], path: Path) -> Scan:
    """The scan with every group as one identity of several members (``Scan.merged``)."""
    known = {identity.name for identity in scan.identities}
    for a, b, number in pairs:
        for name in (a, b):
            if name not in known:
                raise UserError(f"--merge {path}:{number}: no identity named {name!r} in the "
                                "source (or it has no files)")
    into = _groups(pairs)
    members: dict[str, list[Identity]] = {}
    for identity in scan.identities:
        members.setdefault(into.get(identity.name, identity.name), []).append(identity)
    merged_scan = []
    for identity in scan.identities:
        group = members.get(identity.name)
        if group is None:
            continue  # went into another identity
        if len(group) == 1:
            merged_scan.append(identity)
            continue
        merged_scan.append(replace(
            identity, num_files=sum(m.num_files for m in group),
            num_bytes=sum(m.num_bytes for m in group),
            digest=listing_digest(f"{m.name}\t{m.num_files}\t{m.digest}" for m in group),
            members=tuple(group)))
    merged = [(name, group) for name, group in sorted(into.items()) if name != group]
    return replace(scan, identities=merged_scan, merged=merged)
