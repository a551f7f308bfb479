"""MobileFaceNet ("mbf") for 112x112 faces, with insightface's arcface_torch module names.

Names follow insightface's ``backbones/mobilefacenet.py`` (``layers.*``, ``conv_sep``,
``features`` = GDC head) as documented there; blocks=(1, 4, 6, 2), scale=2 is their default.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbones.checkpointing import run_segment


class ConvBlock(nn.Module):
    """conv -> BN -> PReLU, stored as ``layers.{0,1,2}``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int,
                 groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv -> BN without activation (the linear bottleneck), ``layers.{0,1}``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int,
                 groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups`` channels, depthwise 3x3, 1x1 project."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int,
                 residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, groups, 1, 1, 0),
            ConvBlock(groups, groups, 3, stride, 1, groups=groups),
            LinearBlock(groups, cout, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` stride-1 residual DepthWise blocks."""

    def __init__(self, channels: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(channels, channels, groups, 1, residual=True) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv (7x7) head -> linear -> BN1d embedding."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, 7, 1, 0, groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """112x112 -> 7x7x512 feature map -> GDC embedding.

    ``activation_checkpointing``: recompute each block of ``layers`` in backward instead of
    keeping its activations (:mod:`model.backbones.checkpointing`).
    """

    activation_checkpointing = False

    def __init__(self, embedding_size: int = 512, blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
                 scale: int = 2) -> None:
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, 3, 2, 1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, 3, 1, 1, groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c1, c1, groups=128, stride=2),
            Residual(c1, blocks[1], groups=128),
            DepthWise(c1, c2, groups=256, stride=2),
            Residual(c2, blocks[2], groups=256),
            DepthWise(c2, c2, groups=512, stride=2),
            Residual(c2, blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(c2, 512, 1, 1, 0)
        self.features = GDC(embedding_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = run_segment(layer, x, self.activation_checkpointing)
        return self.features(self.conv_sep(x))
