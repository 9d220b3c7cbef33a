"""Fully connected network; the 1-40-40-1 ReLU net of MAML's sinusoid experiments by default."""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor, nn


class MLP(nn.Module):
    """``in_features -> hidden... -> out_features`` with ReLU between layers.

    The last layer is ``head``. Defaults give the sinusoid regressor of Finn et al.,
    "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks" (ICML 2017).
    Inputs may carry any number of leading dimensions (it has no batch statistics, so tasks in
    a batch never affect one another).

    Attributes:
        output_shape: ``(out_features,)``, the shape of one sample's output.
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        layers = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        self.output_shape: Tuple[int, ...] = (out_features,)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
