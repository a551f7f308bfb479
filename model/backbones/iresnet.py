"""iResNet (ArcFace's improved ResNet) for 112x112 faces.

Parameter and buffer names follow insightface's ``arcface_torch/backbones/iresnet.py`` exactly,
so ``load_state_dict(strict=True)`` accepts their model-zoo weights and our ``model.pt`` runs in
their tooling. The code is our own; only the layout (names, shapes, order of ops) is shared.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbones.checkpointing import run_segment

#: blocks per stage for each depth (insightface's published configurations)
LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
_WIDTHS = (64, 128, 256, 512)
_BN_EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation style block BN-conv-BN-PReLU-conv-BN; the stride sits on conv2."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """112x112 RGB in [-1, 1] -> embedding; every stage halves the resolution (112 -> 7).

    ``activation_checkpointing``: recompute each stage in backward instead of keeping its
    activations (:mod:`model.backbones.checkpointing`).
    """

    activation_checkpointing = False

    def __init__(self, layers: tuple[int, int, int, int], embedding_size: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip(_WIDTHS, layers), start=1):
            stage = [IBasicBlock(inplanes, planes, 2)]
            stage += [IBasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # insightface freezes the embedding BN's scale (weight stays 1).
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = run_segment(stage, x, self.activation_checkpointing)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(depth: int, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """Build iresnet{18,34,50,100,200}."""
    if depth not in LAYERS:
        raise ValueError(f"iresnet depth {depth}: expected one of {sorted(LAYERS)}")
    return IResNet(LAYERS[depth], embedding_size=embedding_size, dropout=dropout)
