"""Procedural identities rendered on the fly in the workers (synthetic.faces)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from data_engine.writing.sources.base import Identity, Imap, Scan, Source, SourceFile
from synthetic.faces import encode_jpeg, identity_name, render_face

# Planning needs a size before anything is rendered; a 112x112 q90 face JPEG is ~3-5 kB.
_ESTIMATED_JPEG_BYTES = 4500


class SyntheticSource(Source):
    """`identities` people with `images_per_identity` photos each, a pure function of `seed`."""

    kind = "synthetic"

    def __init__(self, identities: int, images_per_identity: int, seed: int) -> None:
        self.identities = identities
        self.images_per_identity = images_per_identity
        self.seed = seed

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "identities": self.identities,
                "images_per_identity": self.images_per_identity, "seed": self.seed}

    def scan(self, imap: Imap) -> Scan:
        del imap
        count = self.images_per_identity
        return Scan(identities=[
            Identity(identity_name(i), count, count * _ESTIMATED_JPEG_BYTES, digest="", ref=i)
            for i in range(self.identities)])

    def read_identity(self, identity: Identity) -> Iterator[SourceFile]:
        for index in range(self.images_per_identity):
            name = f"{index:04d}.jpg"
            image = render_face(identity.ref, index, seed=self.seed).image
            yield SourceFile(name, f"synthetic:{identity.name}/{name}", encode_jpeg(image))
