"""Gaussian MLP policy of MAML's reinforcement-learning experiments (Finn et al., ICML 2017)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn


class GaussianMLPPolicy(nn.Module):
    """A diagonal Gaussian over actions whose mean is an MLP of the observation.

    ``observation -> hidden... -> mean``, ReLU between layers, and a learned log standard
    deviation per action dimension that does not depend on the observation: the policy of
    Finn et al. (2017, section 5.3), two hidden layers of 100 ReLU units, initial standard
    deviation 1 (rllab's default). The last layer is ``head``, so ANIL (``adapt=["head."]``)
    adapts the mean's last layer alone.

    ``forward`` returns ``(mean, log_std)``, both shaped like the actions, so it runs under
    :func:`torch.func.functional_call` and ``vmap`` like any backbone.
    """

    def __init__(
        self,
        observation_size: int = 2,
        action_size: int = 2,
        hidden: Sequence[int] = (100, 100),
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if not init_std > 0:
            raise ValueError(f"init_std must be positive, got {init_std}.")
        self.observation_size = observation_size
        self.action_size = action_size
        layers = []
        width = observation_size
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, action_size)
        self.log_std = nn.Parameter(torch.full((action_size,), math.log(init_std)))

    def forward(self, observations: Tensor) -> Tuple[Tensor, Tensor]:
        mean = self.head(self.features(observations))
        return mean, self.log_std.expand_as(mean)


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Log-density of ``actions`` under the diagonal Gaussian, summed over the last dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std).sum(-1) - 0.5 * actions.shape[-1] * math.log(2 * math.pi)
