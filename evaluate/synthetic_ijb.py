"""Synthetic benchmarks in the real file formats, from held-out synthetic people.

``write_synthetic_ijb`` writes a directory in insightface's IJB layout (see ijb_meta) so the
whole evaluation path -- meta parsing, loose-crop alignment, pooling, 1:1, 1:N -- runs in tests
and demos without the licensed data. Each subject has one gallery template (alternating G1
and G2, so every mixed probe has exactly one mate in G1 ∪ G2) and ``probes`` probe templates;
a template holds 1-3 media of 1-2 images each (a two-image media stands for video frames).
1:1 pairs: every gallery template against every probe template (genuine when the subject
matches), as IJB-C pairs enrolment templates with probe templates.

``write_synthetic_bin`` writes an insightface ``.bin`` of aligned faces, genuine and impostor
pairs alternating so that each of the 10 consecutive folds is balanced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.progress import Progress
from evaluate.ijb_meta import GALLERIES, meta_path
from evaluate.verification import write_bin
from synthetic.faces import encode_jpeg, render_face

QUALITY_SCORE = {"good": (0.95, 1.0)}  # detector confidence range per rendered quality
DEGRADED_SCORE = (0.5, 0.9)


@dataclass
class _Layout:
    tid_mid: list[str] = field(default_factory=list)
    five_points: list[str] = field(default_factory=list)
    csv_rows: dict[str, list[str]] = field(default_factory=dict)


def _plan(identities: int, probes: int, rng: np.random.Generator
          ) -> list[tuple[int, str, list[int]]]:
    """(subject, role, images per media) for every template; role = gallery set or probe."""
    plan = []
    for subject in range(identities):
        roles = ["gallery_first" if subject % 2 == 0 else "gallery_second"]
        roles += ["probe"] * probes
        for role in roles:
            plan.append((subject, role, list(rng.integers(1, 3, size=rng.integers(1, 4)))))
    return plan


def write_synthetic_ijb(out: Path, *, identities: int, first_identity: int, seed: int,
                        prefix: str = "ijbc", probes: int = 2) -> dict:
    """Write ROOT/meta and ROOT/loose_crop for held-out people; returns counts."""
    if identities < 2:
        raise ValueError("need at least 2 identities for impostor pairs")
    out = Path(out)
    (out / "meta").mkdir(parents=True, exist_ok=True)
    (out / "loose_crop").mkdir(exist_ok=True)
    rng = np.random.default_rng([seed, identities, first_identity])
    plan = _plan(identities, probes, rng)
    first, second = GALLERIES[prefix]
    csv_name = {"gallery_first": f"gallery_{first}", "gallery_second": f"gallery_{second}",
                "probe": "probe_mixed"}
    layout = _Layout(csv_rows={name: [] for name in csv_name.values()})
    gallery, probe_templates = {}, []
    next_index = [0] * identities
    image_number, media_id = 0, 0
    with Progress(sum(sum(m) for _, _, m in plan), "synthetic IJB images", "img") as progress:
        for template_id, (subject, role, media_sizes) in enumerate(plan, 1):
            identity = first_identity + subject
            for size in media_sizes:
                media_id += 1
                for _ in range(size):
                    image_number += 1
                    name = f"{image_number}.jpg"
                    face = render_face(identity, next_index[subject], seed=seed, loose=True)
                    next_index[subject] += 1
                    (out / "loose_crop" / name).write_bytes(encode_jpeg(face.image, 92))
                    low, high = QUALITY_SCORE.get(face.quality, DEGRADED_SCORE)
                    score = rng.uniform(low, high)
                    points = " ".join(f"{v:.3f}" for v in face.landmarks.reshape(-1))
                    layout.tid_mid.append(f"{name} {template_id} {media_id}")
                    layout.five_points.append(f"{name} {points} {score:.6f}")
                    layout.csv_rows[csv_name[role]].append(
                        f"{template_id},{identity},loose_crop/{name}")
                    progress.update()
            if role == "probe":
                probe_templates.append((template_id, subject))
            else:
                gallery[subject] = template_id
    pairs = [f"{g} {p} {int(s == ps)}" for s, g in sorted(gallery.items())
             for p, ps in probe_templates]
    _write_lines(meta_path(out, prefix, "face_tid_mid.txt"), layout.tid_mid)
    _write_lines(meta_path(out, prefix, "name_5pts_score.txt"), layout.five_points)
    _write_lines(meta_path(out, prefix, "template_pair_label.txt"), pairs)
    for name, rows in layout.csv_rows.items():
        _write_lines(meta_path(out, prefix, f"1N_{name}.csv"),
                     ["TEMPLATE_ID,SUBJECT_ID,FILENAME", *rows])
    return {"images": image_number, "templates": len(plan), "pairs": len(pairs),
            "genuine_pairs": sum(p.endswith(" 1") for p in pairs)}


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def write_synthetic_bin(out: Path, *, identities: int, first_identity: int, pairs: int,
                        seed: int) -> dict:
    """An insightface .bin with ``pairs`` pairs (even index genuine, odd impostor)."""
    if identities < 2:
        raise ValueError("need at least 2 identities for impostor pairs")
    rng = np.random.default_rng([seed, identities, first_identity, pairs])
    next_index = [0] * identities
    jpegs, issame = [], []

    def photo(subject: int) -> bytes:
        face = render_face(first_identity + subject, next_index[subject], seed=seed)
        next_index[subject] += 1
        return encode_jpeg(face.image, 95)

    with Progress(pairs, "synthetic pairs", "pair") as progress:
        for i in range(pairs):
            a = int(rng.integers(identities))
            b = a if i % 2 == 0 else int((a + rng.integers(1, identities)) % identities)
            jpegs += [photo(a), photo(b)]
            issame.append(a == b)
            progress.update()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_bin(out, jpegs, issame)
    return {"pairs": pairs, "genuine_pairs": sum(issame)}
