"""Each registry is keyed by its list in model/names.py, and each name builds its own part."""

from __future__ import annotations

import pytest
from torch import nn

from model.backbones import BACKBONES
from model.backbones.mobilefacenet import MobileFaceNet
from model.heads import HEAD_CLASSES, build_head
from model.heads.attfc import WEIGHTINGS, AttFCHead
from model.heads.fc import FCHead
from model.heads.partialfc import PartialFCHead
from model.margins import (
    MARGIN_BUILDERS,
    AdaFaceMargin,
    CombinedMargin,
    MagFaceMargin,
    build_margin,
)
from model.names import HEADS, MARGINS, NETWORKS, STRATEGIES


@pytest.mark.parametrize(("registry", "names"), [(BACKBONES, NETWORKS), (HEAD_CLASSES, HEADS),
                                                 (MARGIN_BUILDERS, MARGINS),
                                                 (WEIGHTINGS, STRATEGIES)],
                         ids=["networks", "heads", "margins", "strategies"])
def test_registry_keys_are_the_names_list(registry: dict, names: tuple[str, ...]) -> None:
    assert tuple(registry) == names


def test_each_name_builds_its_own_part() -> None:
    # The keys alone would not catch two swapped values.
    assert BACKBONES["mbf"] is MobileFaceNet
    assert {name: BACKBONES[name].args for name in NETWORKS if name != "mbf"} == {
        "r18": (18,), "r34": (34,), "r50": (50,), "r100": (100,), "r200": (200,)}
    options = {"num_classes": 8, "embedding_size": 2, "batch_size": 2,
               "margin": build_margin("arcface"), "feature_encoder": nn.Flatten()}
    built = {name: type(build_head(name, **options)) for name in HEADS}
    assert built == {"attfc": AttFCHead, "fc": FCHead, "partialfc": PartialFCHead}
    margins = {name: build_margin(name, s=1.0, m=0.25, m1=1.5, m2=0.1, m3=0.05)
               for name in MARGINS}
    assert {name: type(margin) for name, margin in margins.items()} == {
        "arcface": CombinedMargin, "cosface": CombinedMargin, "adaface": AdaFaceMargin,
        "magface": MagFaceMargin, "combined": CombinedMargin}
    assert [(margins[name].m1, margins[name].m2, margins[name].m3)
            for name in ("arcface", "cosface", "combined")] == [
        (1.0, 0.25, 0.0), (1.0, 0.0, 0.25), (1.5, 0.1, 0.05)]
    assert WEIGHTINGS["single"].__name__ == "_single"


def test_head_options_are_checked_once() -> None:
    with pytest.raises(TypeError, match="momentum"):
        build_head("fc", num_classes=4, embedding_size=2, batch_size=2,
                   margin=build_margin("arcface"), momentum=0.9)
    head = build_head("attfc", num_classes=8, embedding_size=2, batch_size=2,
                      margin=build_margin("arcface"), feature_encoder=nn.Flatten(),
                      class_encoder_momentum=0.5)
    assert head.class_encoder_momentum == 0.5
