"""The two networks of Relation Networks (Sung et al., CVPR 2018): an embedding that keeps a
spatial feature map, and the relation module that scores a pair of maps."""
from __future__ import annotations

from torch import Tensor, nn


def relation_block(in_channels: int, out_channels: int, pool: bool, track_running_stats: bool) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class RelationEmbedding(nn.Module):
    """Four blocks of 3x3 conv (64 filters), batch norm and ReLU; only the first two 2x2 max-pool,
    so the output is a feature map, ``[*, hidden, H/4, W/4]`` (``7x7`` for 28x28 Omniglot-size
    images), as the relation module needs.

    Convolutions pad by one, so only the poolings shrink the map. Batch norm keeps no running
    statistics by default, as in :class:`~fewshot_lightning.models.Conv4`. Inputs may carry
    extra leading dimensions (``[B, S, C, H, W]``).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, track_running_stats: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            relation_block(in_channels, hidden, True, track_running_stats),
            relation_block(hidden, hidden, True, track_running_stats),
            relation_block(hidden, hidden, False, track_running_stats),
            relation_block(hidden, hidden, False, track_running_stats),
        )

    def forward(self, x: Tensor) -> Tensor:
        leading = x.shape[:-3]
        out = self.features(x.reshape(-1, *x.shape[-3:]))
        return out.reshape(*leading, *out.shape[1:])


class RelationModule(nn.Module):
    """Scores pairs of concatenated feature maps: two blocks of 3x3 conv, batch norm, ReLU and
    2x2 max-pool, then fully connected layers ``-> hidden -> 1``.

    Returns one relation *logit* per pair, ``[P]`` for input ``[P, in_channels, size, size]``;
    the sigmoid that makes it a score in ``[0, 1]`` is the caller's, so a loss that wants logits
    can have them.

    Args:
        in_channels: channels of a concatenated pair (twice the embedding's channels).
        channels: filters of each conv block (64 in the paper).
        hidden: width of the first fully connected layer (8 in the paper).
        feature_size: side of the input maps; sizes the first linear layer (7 for 28x28 images
            through :class:`RelationEmbedding`, giving the paper's 64 inputs for Omniglot).
    """

    def __init__(
        self,
        in_channels: int = 128,
        channels: int = 64,
        hidden: int = 8,
        feature_size: int = 7,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        side = feature_size // 2 // 2
        if side < 1:
            raise ValueError(f"feature_size {feature_size} is too small for two 2x2 poolings; use 4 or more.")
        self.feature_size = feature_size
        self.blocks = nn.Sequential(
            relation_block(in_channels, channels, True, track_running_stats),
            relation_block(channels, channels, True, track_running_stats),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(channels * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        return self.fc(self.blocks(pairs)).squeeze(-1)
