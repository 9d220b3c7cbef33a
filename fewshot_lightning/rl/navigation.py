"""The 2D point-robot navigation tasks of Finn, Abbeel & Levine (ICML 2017, section 5.3), in torch.

A point starts at the origin and must reach a goal drawn uniformly from ``[-0.5, 0.5]^2``
that it does not observe: the observation is its position, the action a velocity, the
reward the negative Euclidean distance to the goal after the move, and an episode ends
when the point is within ``goal_tolerance`` of the goal in both coordinates or after
``horizon`` steps. These details follow the authors' environment (cbfinn/maml_rl,
``point_env_randgoal.py``, wrapped in rllab's ``normalize``): the paper's text says
"negative squared distance", the code uses the distance, and the papers' returns are
sums of the code's rewards.

Actions are in policy units: a policy acts in ``[-1, 1]`` per coordinate and the velocity
is ``max_speed * clip(action, -1, 1)``, as rllab's ``normalize`` maps its ``[-1, 1]`` action
box onto the environment's ``[-0.1, 0.1]``. An unclipped Gaussian policy (initial standard
deviation 1) therefore explores the whole velocity box from the start.

Every method works on any number of leading dimensions (tasks, trajectories), so a whole
meta-batch of goals and all their trajectories step as one tensor operation.
"""
from __future__ import annotations

from typing import Tuple

from torch import Tensor


class PointNavigation:
    """Vectorised 2D point navigation; the task is the goal.

    Args:
        horizon: steps per episode (100 in the paper).
        max_speed: largest velocity per coordinate and step (0.1 in the paper).
        goal_tolerance: the episode ends once both coordinates are closer than this to the
            goal (0.01 in the authors' code).
    """

    observation_size = 2
    action_size = 2

    def __init__(self, horizon: int = 100, max_speed: float = 0.1, goal_tolerance: float = 0.01) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}.")
        if not max_speed > 0:
            raise ValueError(f"max_speed must be positive, got {max_speed}.")
        if goal_tolerance < 0:
            raise ValueError(f"goal_tolerance must be 0 or more, got {goal_tolerance}.")
        self.horizon = horizon
        self.max_speed = max_speed
        self.goal_tolerance = goal_tolerance

    def reset(self, goals: Tensor, trajectories: int) -> Tensor:
        """Start positions ``[B, trajectories, 2]`` (the origin) for goals ``[B, 2]``."""
        if goals.dim() != 2 or goals.shape[-1] != 2:
            raise ValueError(f"goals must have shape [tasks, 2], got {tuple(goals.shape)}.")
        return goals.new_zeros(goals.shape[0], trajectories, 2)

    def step(self, positions: Tensor, actions: Tensor, goals: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One move of every point: ``(next positions, rewards, reached)``.

        ``positions`` and ``actions`` are ``[B, N, 2]``, ``goals`` ``[B, 2]``; ``rewards`` and
        ``reached`` (the episode ends here) are ``[B, N]``.
        """
        positions = positions + self.max_speed * actions.clamp(-1.0, 1.0)
        offset = positions - goals.unsqueeze(-2)
        rewards = -offset.norm(dim=-1)
        reached = (offset.abs() < self.goal_tolerance).all(dim=-1)
        return positions, rewards, reached
