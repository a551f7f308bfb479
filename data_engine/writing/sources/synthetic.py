"""Procedural identities rendered on the fly in the workers (synthetic.faces)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from data_engine.writing.sources.base import Identity, Imap, Scan, Source, SourceFile
from synthetic.faces import encode_jpeg, identity_name, photo_subject, render_face

# Planning needs a size before anything is rendered; a 112x112 q90 face JPEG is ~3-5 kB.
_ESTIMATED_JPEG_BYTES = 4500


class SyntheticSource(Source):
    """`identities` people with `images_per_identity` photos each, a pure function of `seed`.

    ``mislabeled_share`` > 0 files that share of the photos under the wrong person and
    records per image, in the shard's json, who it shows, whether it is mislabeled and its
    defect; at 0 the dataset (and its shards, byte for byte) is the plain one.
    """

    kind = "synthetic"

    def __init__(self, identities: int, images_per_identity: int, seed: int,
                 mislabeled_share: float = 0.0) -> None:
        if not 0.0 <= mislabeled_share < 1.0:
            raise ValueError(f"mislabeled_share must be in [0, 1), got {mislabeled_share}")
        self.identities = identities
        self.images_per_identity = images_per_identity
        self.seed = seed
        self.mislabeled_share = mislabeled_share

    def describe(self) -> dict[str, Any]:
        described = {"kind": self.kind, "identities": self.identities,
                     "images_per_identity": self.images_per_identity, "seed": self.seed}
        if self.mislabeled_share:  # absent at 0: the plain dataset's manifest is unchanged
            described["mislabeled_share"] = self.mislabeled_share
        return described

    def scan(self, imap: Imap) -> Scan:
        del imap
        count = self.images_per_identity
        return Scan(identities=[
            Identity(identity_name(i), count, count * _ESTIMATED_JPEG_BYTES, digest="", ref=i)
            for i in range(self.identities)])

    def read_identity(self, identity: Identity) -> Iterator[SourceFile]:
        for index in range(self.images_per_identity):
            name = f"{index:04d}.jpg"
            path = f"synthetic:{identity.name}/{name}"
            shows, photo = photo_subject(identity.ref, index, seed=self.seed,
                                         mislabeled_share=self.mislabeled_share,
                                         identities=self.identities)
            face = render_face(shows, photo, seed=self.seed)
            info = None
            if self.mislabeled_share:
                info = {"path": path, "shows": identity_name(shows),
                        "mislabeled": shows != identity.ref, "quality": face.quality}
            yield SourceFile(name, path, encode_jpeg(face.image), info=info)
