"""Trajectories of many policies in many tasks at once, with per-task seeded exploration noise."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Tuple

import torch
from torch import Tensor

from ..data.seeding import task_seed
from ..inner import Params
from .navigation import PointNavigation

#: ``forward(params, observations)``: per-task parameters and observations ``[B, N, obs]`` to the
#: Gaussian's ``(mean, log_std)``, each ``[B, N, act]`` (:func:`fewshot_lightning.inner.functional`
#: of a :class:`~fewshot_lightning.rl.GaussianMLPPolicy`).
PolicyForward = Callable[[Params, Tensor], Tuple[Tensor, Tensor]]


class Rollouts(NamedTuple):
    """``N`` trajectories of ``H`` steps in each of ``B`` tasks.

    ``observations`` ``[B, N, H, obs]`` (before each action), ``actions`` ``[B, N, H, act]``
    (as sampled, before the environment clips them), ``log_probs`` ``[B, N, H]`` (under the
    policy that acted), ``rewards`` ``[B, N, H]`` (zero once the episode has ended) and
    ``mask`` ``[B, N, H]`` (1 for every step taken, the one reaching the goal included).
    """

    observations: Tensor
    actions: Tensor
    log_probs: Tensor
    rewards: Tensor
    mask: Tensor

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of every trajectory, ``[B, N]``: the sum of its rewards, the
        figure the MAML paper (rllab's ``AverageReturn``) reports, averaged."""
        return self.rewards.sum(-1)


def task_noise(seeds: Tensor, phase: int, shape: Tuple[int, ...], like: Tensor) -> Tensor:
    """Standard normal noise ``[B, *shape]``, task ``b``'s from a generator seeded by
    ``(seeds[b], phase)`` alone: a task's trajectories do not depend on which batch, process
    or device it runs in, so one process and several DDP ranks roll out the same paths."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(task_seed(seed, phase, 0))) for seed in seeds.tolist()]
    return torch.stack(noise).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def collect(
    forward: PolicyForward, params: Params, environment: PointNavigation, goals: Tensor, noise: Tensor
) -> Rollouts:
    """Roll out every task's policy ``N`` times for ``environment.horizon`` steps.

    ``noise`` ``[B, N, H, act]`` is the standard normal draw behind each action
    (``action = mean + std * noise``), from :func:`task_noise`. All ``B * N`` points move as one
    batch; steps after an episode reached its goal are masked out.
    """
    tasks, trajectories, horizon, action_size = noise.shape
    if horizon != environment.horizon:
        raise ValueError(f"noise has {horizon} steps but the environment's horizon is {environment.horizon}.")
    positions = environment.reset(goals, trajectories)
    alive = torch.ones(tasks, trajectories, dtype=goals.dtype, device=goals.device)
    steps = []
    for t in range(horizon):
        mean, log_std = forward(params, positions)
        actions = mean + log_std.exp() * noise[:, :, t]
        # (action - mean) / std is the noise itself: its log-density needs no division.
        log_probs = (-0.5 * noise[:, :, t].square() - log_std).sum(-1) - 0.5 * action_size * math.log(2 * math.pi)
        next_positions, rewards, reached = environment.step(positions, actions, goals)
        steps.append((positions, actions, log_probs, rewards * alive, alive))
        alive = alive * (~reached).to(alive.dtype)
        positions = next_positions
    return Rollouts(*(torch.stack(parts, dim=2) for parts in zip(*steps)))
