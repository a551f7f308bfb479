"""Who each synthetic identity name shows: planted duplicate identities and benchmark people.

Real crawled datasets publish one person under several names and hold people who are also
in the test sets. A :class:`Casting` plants both in the synthetic source, as a pure function
of its fields, so the reports that look for them can be scored against the truth:

- ``duplicate_share``: that share of the ``identities`` names shows another name's person
  (with photos of its own), so the two names are one person;
- ``benchmark_people``: that many extra names, after the ordinary ones, show the people
  ``benchmark_first``.. that ``python -m evaluate synth-ijb`` / ``synth-bin`` render as
  held-out test people (same seed), in photos the benchmark does not use.

With both at 0 every name shows its own person in its own photos: the plain dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthetic.faces import photo_subject

BENCHMARK_FIRST = 100_000  # the synthetic benchmarks' default first held-out person
# The manifest's source_info keys (Casting.describe) that mean the shards record the truth.
TRUTH_KEYS = ("mislabeled_share", "duplicate_share", "benchmark_people")
_DUPLICATE_STREAM = 0xD0B1
# Photo indices of a duplicate name's and of a planted benchmark person's photos start here:
# never one of the person's own photos (0, 1, ...) nor a stray (faces._STRAY_PHOTO_BASE).
_DUPLICATE_PHOTO_BASE = 1 << 41
_BENCHMARK_PHOTO_BASE = 1 << 42


@dataclass(frozen=True)
class Casting:
    """The people behind ``identities + benchmark_people`` synthetic identity names."""

    identities: int
    seed: int
    mislabeled_share: float = 0.0
    duplicate_share: float = 0.0
    benchmark_people: int = 0
    benchmark_first: int = BENCHMARK_FIRST

    def __post_init__(self) -> None:
        for name in ("mislabeled_share", "duplicate_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.benchmark_people < 0:
            raise ValueError(f"benchmark_people must be >= 0, got {self.benchmark_people}")
        if self.benchmark_people and self.benchmark_first < self.identities:
            raise ValueError(f"benchmark_first {self.benchmark_first} must be >= identities "
                             f"{self.identities} (benchmark people are held out)")

    @property
    def names(self) -> int:
        """Identity names in the dataset: the ordinary ones, then the planted benchmark ones."""
        return self.identities + self.benchmark_people

    @property
    def plants_truth(self) -> bool:
        return bool(self.mislabeled_share or self.duplicate_share or self.benchmark_people)

    def person(self, identity: int) -> int:
        """The person identity name ``identity`` shows."""
        if identity >= self.identities:
            return self.benchmark_first + identity - self.identities
        return self._copied(identity) if self.duplicate_share else identity

    def _copied(self, identity: int) -> int:
        """Whose person a duplicate name shows; itself when it is no duplicate. A name that
        drew a duplicate as its original stays itself, so duplicates come in groups around
        one original, never in chains."""
        target = self._draw(identity)
        return identity if target is None or self._draw(target) is not None else target

    def _draw(self, identity: int) -> int | None:
        if self.identities < 2:
            return None
        rng = np.random.default_rng([self.seed, identity, _DUPLICATE_STREAM])
        if rng.random() >= self.duplicate_share:
            return None
        other = int(rng.integers(self.identities - 1))
        return other + (other >= identity)

    def photo(self, identity: int, index: int) -> tuple[int, int, bool]:
        """(person, their photo index, mislabeled) for photo ``index`` filed under
        ``identity``; mislabeled means it shows someone other than the name's person."""
        shows, photo = photo_subject(identity, index, seed=self.seed,
                                     mislabeled_share=self.mislabeled_share,
                                     identities=self.names)
        own = self.person(identity)
        if shows != identity:
            person = self.person(shows)
            return person, photo, person != own
        if identity >= self.identities:
            return own, _BENCHMARK_PHOTO_BASE + index, False
        if own != identity:
            return own, _DUPLICATE_PHOTO_BASE + identity * (1 << 16) + index, False
        return own, photo, False

    def describe(self) -> dict[str, object]:
        """The planting parameters that are set (none for the plain dataset)."""
        described: dict[str, object] = {}
        if self.mislabeled_share:
            described["mislabeled_share"] = self.mislabeled_share
        if self.duplicate_share:
            described["duplicate_share"] = self.duplicate_share
        if self.benchmark_people:
            described["benchmark_people"] = self.benchmark_people
            described["benchmark_first"] = self.benchmark_first
        return described
