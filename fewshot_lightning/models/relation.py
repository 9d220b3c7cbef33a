"""The two networks of Relation Networks (Sung et al., CVPR 2018): an embedding that keeps a
spatial feature map, and the relation module that scores a pair of maps."""
from __future__ import annotations

from typing import Tuple

from torch import Tensor, nn

from .blocks import ConvBlock, check_widths, per_task_call


def check_padding(padding: int) -> None:
    if padding not in (0, 1):
        raise ValueError(f"padding must be 0 (Sung et al.'s code) or 1 (maps keep their side), got {padding}.")


class RelationEmbedding(nn.Module):
    """Four blocks of 3x3 conv (64 filters), batch norm and ReLU; only the first two 2x2 max-pool,
    so the output is a feature map, as the relation module needs.

    With ``padding=1`` (default) every convolution pads by one, so only the poolings shrink the
    map: ``[hidden, H/4, W/4]``, ``7x7`` for 28x28 images. ``padding=0`` is Sung et al.'s code
    (floodsung/LearningToCompare_FSL): the two pooling blocks' convolutions are unpadded, the
    last two pad by one, so 84x84 mini-ImageNet images give ``64x19x19`` maps
    (84 -> 82 -> 41 -> 39 -> 19) and 28x28 Omniglot ones ``64x5x5``.

    Input ``[*tasks, M, C, H, W]``, output ``[*tasks, M, *output_shape]``; batch norm's
    statistics are per task, with no running averages by default, as in
    :class:`~fewshot_lightning.models.Conv4`.

    Attributes:
        output_shape: ``(hidden, side, side)`` of one image's map.
        input_shape: ``(in_channels, image_size, image_size)``, the images it was built for
            (``input_arguments`` names the argument behind each entry).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        padding: int = 1,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        check_padding(padding)
        check_widths("RelationEmbedding", in_channels=in_channels, hidden=hidden)
        self.features = nn.Sequential(
            ConvBlock(in_channels, hidden, pool=True, padding=padding, track_running_stats=track_running_stats),
            ConvBlock(hidden, hidden, pool=True, padding=padding, track_running_stats=track_running_stats),
            ConvBlock(hidden, hidden, pool=False, track_running_stats=track_running_stats),
            ConvBlock(hidden, hidden, pool=False, track_running_stats=track_running_stats),
        )
        side = image_size
        for block in self.features:
            side = block.output_side(side)
        if side < 1:
            raise ValueError(
                f"image_size {image_size} is too small for two 2x2 poolings with padding {padding}; "
                f"use {4 if padding else 10} or more."
            )
        self.output_shape: Tuple[int, ...] = (hidden, side, side)
        self.input_shape: Tuple[int, ...] = (in_channels, image_size, image_size)
        self.input_arguments: Tuple[str, ...] = ("in_channels", "image_size", "image_size")

    def forward(self, x: Tensor) -> Tensor:
        return per_task_call(self.features, x, sample_dims=3)


class RelationModule(nn.Module):
    """Scores pairs of concatenated feature maps: two blocks of 3x3 conv, batch norm, ReLU and
    2x2 max-pool, then fully connected layers ``-> hidden -> 1``.

    Returns one relation *logit* per pair, ``[*tasks, P]`` for input
    ``[*tasks, P, in_channels, size, size]`` (batch norm's statistics per task); the sigmoid
    that makes it a score in ``[0, 1]`` is the caller's, so a loss that wants logits can have
    them.

    Args:
        in_channels: channels of a concatenated pair (twice the embedding's channels).
        channels: filters of each conv block (64 in the paper).
        hidden: width of the first fully connected layer (8 in the paper).
        feature_size: side of the input maps; sizes the first linear layer (7 for 28x28 images
            through :class:`RelationEmbedding`, giving the paper's 64 inputs for Omniglot).
        padding: of both convolutions: 1 keeps the side before each pooling; 0 is Sung et al.'s
            mini-ImageNet code (19 -> 17 -> 8 -> 6 -> 3, so ``64x3x3`` into the first linear layer).
        track_running_stats: batch norm keeps running averages.

    Attributes:
        map_shape: ``(channels, side, side)`` of the maps entering the fully connected layers.
    """

    def __init__(
        self,
        in_channels: int = 128,
        channels: int = 64,
        hidden: int = 8,
        feature_size: int = 7,
        padding: int = 1,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        check_padding(padding)
        check_widths("RelationModule", channels=channels, hidden=hidden)
        self.blocks = nn.Sequential(
            ConvBlock(in_channels, channels, pool=True, padding=padding, track_running_stats=track_running_stats),
            ConvBlock(channels, channels, pool=True, padding=padding, track_running_stats=track_running_stats),
        )
        side = feature_size
        for block in self.blocks:
            side = block.output_side(side)
        if side < 1:
            raise ValueError(
                f"feature_size {feature_size} is too small for two 2x2 poolings with padding {padding}; "
                f"use {4 if padding else 10} or more."
            )
        self.feature_size = feature_size
        self.map_shape = (channels, side, side)
        self.fc = nn.Sequential(nn.Linear(channels * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        return per_task_call(self._sample_major, pairs, sample_dims=3)

    def _sample_major(self, pairs: Tensor) -> Tensor:
        return self.fc(self.blocks(pairs).flatten(2)).squeeze(-1)
