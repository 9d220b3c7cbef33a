"""Networks conditioned on a task context vector, for CAVIA (Zintgraf, Shiarlis, Kurin, Hofmann &
Whiteson, "Fast Context Adaptation via Meta-Learning", ICML 2019).

Both take the context as a keyword argument, ``forward(x, context=None)``: a vector of
``context_dim`` numbers for the whole batch ``x`` (one task), zeros when omitted, which is
where CAVIA starts every task. CAVIA adapts only the context; the weights are shared.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .max_pool import max_pool2d


def _context(context: Optional[Tensor], context_dim: int, like: Tensor) -> Tensor:
    if context is None:
        return like.new_zeros(context_dim)
    if context.shape[-1] != context_dim:
        raise ValueError(f"context has {context.shape[-1]} entries, the network expects context_dim={context_dim}.")
    return context


class ContextMLP(nn.Module):
    """``[x, context] -> hidden... -> out_features`` with ReLU: CAVIA's regression network.

    The context is concatenated to every input. Defaults give the paper's sinusoid network:
    two hidden layers of 40 units and 5 context parameters. The last layer is ``head``.
    """

    def __init__(
        self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1, context_dim: int = 5
    ) -> None:
        super().__init__()
        if context_dim < 1:
            raise ValueError(f"context_dim must be at least 1, got {context_dim}.")
        self.context_dim = context_dim
        layers = []
        width = in_features + context_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        self.input_shape = (in_features,)  # of x; the context is added inside
        self.input_arguments = ("in_features",)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        context = _context(context, self.context_dim, x)
        inputs = torch.cat([x, context.expand(*x.shape[:-1], self.context_dim)], dim=-1)
        return self.head(self.features(inputs))


class FiLMBlock(nn.Module):
    """3x3 conv, batch norm, 2x2 max-pool, optional FiLM by the context, ReLU: the order of the
    authors' network (lmzintgraf/cavia, ``classification/models.py``), which modulates the pooled
    maps. (FiLM before the pooling is another function wherever a channel's scale ``1 + scale`` is
    negative: the pooling then picks the minimum of the unmodulated maps.)"""

    def __init__(self, in_channels: int, out_channels: int, context_dim: Optional[int], track_running_stats: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)
        self.film = None
        if context_dim is not None:
            self.film = nn.Linear(context_dim, 2 * out_channels)
            # A zero context must leave the features unchanged: the modulation starts at identity.
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # max_pool2d keeps only the indices of the maxima for the backward, not batch norm's output.
        out = max_pool2d(self.norm(self.conv(x)), 2)
        if self.film is not None:
            scale, shift = self.film(context).chunk(2, dim=-1)
            out = out * (1 + scale).view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return nn.functional.relu(out)


class FiLMConv4(nn.Module):
    """The four-block Conv4 backbone (as :class:`~fewshot_lightning.models.Conv4`) whose blocks
    in ``film_blocks`` are modulated by the context: CAVIA's classification network.

    FiLM (Perez et al., AAAI 2018) scales and shifts each channel after batch norm,
    ``h * (1 + scale) + shift``, with ``(scale, shift)`` a linear function of the context whose
    bias starts at zero, so a zero context starts as the plain network. The paper modulates the
    third block (``film_blocks=(2,)``, counted from 0) with 100 context parameters on
    mini-ImageNet. The last layer is ``head``. Batch norm keeps no running statistics by
    default, as in Conv4. Inputs may carry extra leading dimensions (``[S, C, H, W]`` per task).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: int = 5,
        image_size: int = 28,
        context_dim: int = 100,
        film_blocks: Sequence[int] = (2,),
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        if context_dim < 1:
            raise ValueError(f"context_dim must be at least 1, got {context_dim}.")
        if not film_blocks or any(block not in range(4) for block in film_blocks):
            raise ValueError(f"film_blocks must name some of the blocks 0, 1, 2, 3, got {list(film_blocks)}.")
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 poolings; use 16 or more.")
        self.context_dim = context_dim
        self.blocks = nn.ModuleList(
            FiLMBlock(in_channels if i == 0 else hidden, hidden, context_dim if i in film_blocks else None,
                      track_running_stats)
            for i in range(4)
        )
        self.head = nn.Linear(hidden * side * side, out_features)
        self.input_shape = (in_channels, image_size, image_size)
        self.input_arguments = ("in_channels", "image_size", "image_size")

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        context = _context(context, self.context_dim, x)
        leading = x.shape[:-3]
        out = x.reshape(-1, *x.shape[-3:])
        for block in self.blocks:
            out = block(out, context)
        out = self.head(out.flatten(1))
        return out.reshape(*leading, out.shape[-1])
