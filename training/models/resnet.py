"""A CIFAR-style ResNet with an exit after each of its stages (cost grows with depth)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from training.models.base import MultiExitNetwork, Normalize
from training.models.registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _exit_head(channels: int, num_classes: int) -> nn.Sequential:
    """A small conv + pool + linear head, so early exits have some capacity of their own."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


class MultiExitResNet(MultiExitNetwork):
    """ResNet-(6n+2) for 32x32 inputs with 3 exits (after the 16-, 32- and 64-channel stages)."""

    def __init__(
        self,
        num_classes: int = 10,
        blocks_per_stage: int = 3,
        width: int = 16,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        widths = [width, 2 * width, 4 * width]
        stages: list[nn.Module] = []
        in_ch = width
        for i, out_ch in enumerate(widths):
            layers: list[nn.Module] = []
            if i == 0:
                layers += [Normalize(mean, std), nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(in_ch, out_ch, stride=2 if (i > 0 and b == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        heads = [_exit_head(c, num_classes) for c in widths]
        super().__init__(stages, heads, input_shape=(in_channels, image_size, image_size))


@register_model
def resnet_me(num_classes: int = 10, **kwargs) -> MultiExitResNet:
    """Multi-exit ResNet-20 by default (blocks_per_stage=3); blocks_per_stage=6 gives ResNet-38."""
    return MultiExitResNet(num_classes=num_classes, **kwargs)
