"""The four-block convolutional backbone of Matching Networks, MAML and ProtoNets."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .blocks import ConvBlock, per_task_call


class Conv4(nn.Module):
    """Four blocks of 3x3 conv, batch norm, ReLU and 2x2 max-pool, then an optional linear ``head``.

    Vinyals et al. (2016), Finn et al. (2017), Snell et al. (2017). ``hidden=64`` for Omniglot,
    32 for MAML on mini-ImageNet. ``out_features=None`` drops the head: the flattened
    features are the output (an embedding for metric-based methods).

    ``max_pool=False`` is the network of MAML's Omniglot experiments (Finn et al.'s code,
    cbfinn/maml): stride-2 convolutions instead of max-pooling, and the features are the
    mean over the last map (28 -> 14 -> 7 -> 4 -> 2, averaged to ``hidden`` features). The
    convolutions pad one pixel on every side (TensorFlow's "SAME" there pads the extra pixel
    on the bottom and right only; the map sizes are the same).

    Input ``[*tasks, M, C, H, W]`` (``[M, C, H, W]`` is one task), output
    ``[*tasks, M, *output_shape]``. Batch norm normalises each task with the statistics of its
    own ``M`` samples (:class:`~fewshot_lightning.models.blocks.TaskBatchNorm2d`), so a task's
    outputs never depend on the other tasks in its batch. It keeps no running averages by
    default (``track_running_stats=False``), as in MAML: every task is normalised with its own
    batch statistics in training and evaluation alike (transductively), and it works unchanged
    under ``torch.func.vmap``. ``track_running_stats=True`` keeps them for learners that
    evaluate with running statistics (Snell et al.'s ProtoNets).

    Attributes:
        feature_dim: size of the features before the head.
        output_shape: shape of one sample's output, ``(out_features,)`` or ``(feature_dim,)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: Optional[int] = 5,
        image_size: int = 28,
        track_running_stats: bool = False,
        max_pool: bool = True,
    ) -> None:
        super().__init__()
        self.max_pool = max_pool
        stride = 1 if max_pool else 2
        self.features = nn.Sequential(
            *(
                ConvBlock(in_channels if i == 0 else hidden, hidden, pool=max_pool, stride=stride,
                          track_running_stats=track_running_stats)
                for i in range(4)
            )
        )
        side = image_size
        for block in self.features:
            side = block.output_side(side)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 poolings; use 16 or more.")
        self.feature_dim = hidden if not max_pool else hidden * side * side
        self.head = nn.Linear(self.feature_dim, out_features) if out_features is not None else None
        self.output_shape: Tuple[int, ...] = (self.feature_dim if out_features is None else out_features,)

    def forward(self, x: Tensor) -> Tensor:
        return per_task_call(self._sample_major, x, sample_dims=3)

    def _sample_major(self, x: Tensor) -> Tensor:
        maps = self.features(x)
        out = maps.flatten(2) if self.max_pool else maps.mean((-2, -1))
        return out if self.head is None else self.head(out)
