"""The four-block convolutional backbone of Matching Networks, MAML and ProtoNets."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int, track_running_stats: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Four blocks of 3x3 conv, batch norm, ReLU and 2x2 max-pool, then an optional linear ``head``.

    Vinyals et al. (2016), Finn et al. (2017), Snell et al. (2017). ``hidden=64`` for Omniglot,
    32 for MAML on mini-ImageNet. ``out_features=None`` drops the head: the flattened
    features are the output (an embedding for metric-based methods).

    Batch norm uses the statistics of the batch it sees and keeps no running averages by
    default (``track_running_stats=False``), as in MAML: per-task adaptation then never
    leaks statistics between tasks, it works unchanged under ``torch.func.vmap``, and train
    and eval behave alike. Inputs may carry extra leading dimensions (``[B, S, C, H, W]``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: Optional[int] = 5,
        image_size: int = 28,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_block(in_channels, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
            nn.Flatten(),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 poolings; use 16 or more.")
        self.feature_dim = hidden * side * side
        self.head = nn.Linear(self.feature_dim, out_features) if out_features is not None else None

    def forward(self, x: Tensor) -> Tensor:
        leading = x.shape[:-3]
        out = self.features(x.reshape(-1, *x.shape[-3:]))
        if self.head is not None:
            out = self.head(out)
        return out.reshape(*leading, out.shape[-1])
