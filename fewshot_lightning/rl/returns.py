"""Returns, the linear feature baseline and advantages, per task and vectorised over tasks."""
from __future__ import annotations

import torch
from torch import Tensor

from .rollouts import Rollouts


def reward_to_go(rewards: Tensor, discount: float) -> Tensor:
    """``G_t = sum_{t' >= t} discount^(t' - t) r_t'`` over the last dimension (one matrix product
    instead of a loop over the horizon)."""
    horizon = rewards.shape[-1]
    steps = torch.arange(horizon, device=rewards.device)
    lag = steps[None, :] - steps[:, None]  # [t, t'] = t' - t
    weights = torch.where(lag >= 0, discount ** lag.clamp(min=0).to(rewards.dtype), torch.zeros((), dtype=rewards.dtype))
    return rewards @ weights.T


def baseline_features(observations: Tensor) -> Tensor:
    """The linear feature baseline's features (Duan et al., ICML 2016, used by MAML): the
    observation clipped to [-10, 10], its square, time t / 100 and its square and cube, and 1.
    ``observations`` ``[..., H, obs]`` gives ``[..., H, 2 * obs + 4]``."""
    clipped = observations.clamp(-10.0, 10.0)
    horizon = observations.shape[-2]
    time = (torch.arange(horizon, dtype=observations.dtype, device=observations.device) / 100.0)
    time = time.view(horizon, 1).expand(*observations.shape[:-1], 1)
    ones = torch.ones_like(time)
    return torch.cat([clipped, clipped.square(), time, time.square(), time.pow(3), ones], dim=-1)


def linear_baseline(observations: Tensor, returns: Tensor, mask: Tensor, ridge: float = 1e-5) -> Tensor:
    """Value estimates ``[B, N, H]`` from a ridge regression of ``returns`` on
    :func:`baseline_features`, fitted for every task ``b`` on its own steps (``mask``) only.

    Solved in float64: the features' Gram matrix is badly conditioned (t, t^2, t^3).
    """
    features = baseline_features(observations).flatten(1, 2).double()  # [B, N*H, F]
    weights = mask.flatten(1).double().unsqueeze(-1)
    targets = returns.flatten(1).double().unsqueeze(-1)
    gram = features.transpose(1, 2) @ (weights * features)
    gram = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coefficients = torch.linalg.solve(gram, features.transpose(1, 2) @ (weights * targets))
    return (features @ coefficients).view(returns.shape).to(returns.dtype)


def advantages(rollouts: Rollouts, discount: float, normalize: bool = True) -> Tensor:
    """REINFORCE advantages ``[B, N, H]``: discounted reward-to-go minus the linear baseline
    fitted to this task's trajectories, then (``normalize``) standardised over the task's
    steps, as rllab's ``center_adv`` does in MAML's code. Zero on masked steps. Every task
    is processed alone: its advantages do not depend on the other tasks of the batch."""
    returns = reward_to_go(rollouts.rewards, discount)
    mask = rollouts.mask
    values = (returns - linear_baseline(rollouts.observations, returns, mask)) * mask
    if not normalize:
        return values
    count = mask.sum(dim=(1, 2), keepdim=True)
    mean = values.sum(dim=(1, 2), keepdim=True) / count
    variance = ((values - mean).square() * mask).sum(dim=(1, 2), keepdim=True) / count
    return (values - mean) / (variance.sqrt() + 1e-8) * mask
