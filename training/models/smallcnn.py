"""SmallCNN with 3 exits, as in the RDI-Nets / NEO-KD MNIST experiments (see docs/method.md)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from training.models.base import MultiExitNetwork, Normalize
from training.models.registry import register_model


def _mlp_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 200),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(200, 200),
        nn.ReLU(inplace=True),
        nn.Linear(200, num_classes),
    )


class SmallCNN(MultiExitNetwork):
    """conv 1->32 | exit 1 | conv 32->32, pool, conv 32->64 | exit 2 | conv 64->64, pool | main exit."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        dropout: float = 0.5,
    ) -> None:
        stages = [
            nn.Sequential(Normalize(mean, std), nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True)),  # 26x26
            nn.Sequential(
                nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 24 -> 12
                nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),  # 10x10
            ),
            nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)),  # 8 -> 4
        ]
        heads = [
            nn.Sequential(nn.Conv2d(32, 16, 3, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 12 -> 6
                          _mlp_head(16 * 6 * 6, num_classes, dropout)),
            nn.Sequential(nn.MaxPool2d(2), _mlp_head(64 * 5 * 5, num_classes, dropout)),
            _mlp_head(64 * 4 * 4, num_classes, dropout),
        ]
        super().__init__(stages, heads, input_shape=(in_channels, 28, 28))


@register_model
def smallcnn(num_classes: int = 10, **kwargs) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, **kwargs)
