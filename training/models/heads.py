"""Exit heads for backbones cut at named layers (training/models/torchvision_net.py).

A head maps the features of one stage (N x C x H x W) to logits (N x num_classes). The kind is a config
choice (`head:` in TrainConfig); every head's cost is measured by `MultiExitNetwork.cost_profile`
(FlopCounterMode), never typed in.
"""
from __future__ import annotations

from enum import Enum

from torch import nn

MAX_HEAD_CHANNELS = 128


class HeadKind(str, Enum):
    """CONV1X1 (default): 1x1 conv to min(C, 128) channels, BatchNorm, ReLU, global average pool, linear.
    CONV3X3: the same with a 3x3 conv (padding 1): more capacity, about 9x the conv's cost.
    LINEAR: global average pool and linear only (the cheapest; no capacity of its own)."""

    CONV1X1 = "conv1x1"
    CONV3X3 = "conv3x3"
    LINEAR = "linear"


def build_head(kind: HeadKind | str, channels: int, num_classes: int) -> nn.Sequential:
    """A head for features with `channels` channels (any H x W >= 1); output N x num_classes.

    Raises ValueError for an unknown kind (the message lists the valid ones).
    """
    try:
        kind = HeadKind(kind)
    except ValueError:
        raise ValueError(f"unknown head {kind!r}; valid: {', '.join(k.value for k in HeadKind)}") from None
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if kind is HeadKind.LINEAR:
        return nn.Sequential(*pool, nn.Linear(channels, num_classes))
    width = min(channels, MAX_HEAD_CHANNELS)
    size = 1 if kind is HeadKind.CONV1X1 else 3
    return nn.Sequential(
        nn.Conv2d(channels, width, size, 1, size // 2, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        *pool,
        nn.Linear(width, num_classes),
    )
