"""Procedural identities rendered on the fly in the workers (synthetic.faces)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from data_engine.writing.sources.base import Identity, Imap, Scan, Source, SourceFile
from synthetic.casting import Casting
from synthetic.faces import encode_jpeg, identity_name, render_face

# Planning needs a size before anything is rendered; a 112x112 q90 face JPEG is ~3-5 kB.
_ESTIMATED_JPEG_BYTES = 4500


class SyntheticSource(Source):
    """`identities` people with `images_per_identity` photos each, a pure function of `seed`.

    ``casting`` plants label noise, duplicate identities and benchmark people
    (:mod:`synthetic.casting`); then each image's json records who it shows, whether it is
    mislabeled and its defect. Without planting the dataset (and its shards, byte for byte)
    is the plain one.
    """

    kind = "synthetic"

    def __init__(self, identities: int, images_per_identity: int, seed: int,
                 mislabeled_share: float = 0.0, duplicate_share: float = 0.0,
                 benchmark_people: int = 0, benchmark_first: int | None = None) -> None:
        self.identities = identities
        self.images_per_identity = images_per_identity
        self.seed = seed
        extra = {} if benchmark_first is None else {"benchmark_first": benchmark_first}
        self.casting = Casting(identities, seed, mislabeled_share, duplicate_share,
                               benchmark_people, **extra)

    def describe(self) -> dict[str, Any]:
        # Planting keys only when set: the plain dataset's manifest is unchanged.
        return {"kind": self.kind, "identities": self.identities,
                "images_per_identity": self.images_per_identity, "seed": self.seed,
                **self.casting.describe()}

    def scan(self, imap: Imap) -> Scan:
        del imap
        count = self.images_per_identity
        return Scan(identities=[
            Identity(identity_name(i), count, count * _ESTIMATED_JPEG_BYTES, digest="", ref=i)
            for i in range(self.casting.names)])

    def read_identity(self, identity: Identity) -> Iterator[SourceFile]:
        truth = self.casting.plants_truth
        for index in range(self.images_per_identity):
            name = f"{index:04d}.jpg"
            path = f"synthetic:{identity.name}/{name}"
            person, photo, mislabeled = self.casting.photo(identity.ref, index)
            face = render_face(person, photo, seed=self.seed)
            info = None
            if truth:
                info = {"path": path, "shows": identity_name(person), "mislabeled": mislabeled,
                        "quality": face.quality}
            yield SourceFile(name, path, encode_jpeg(face.image), info=info)
