"""Meta-reinforcement learning: environments, policies, rollouts, advantages and surrogate losses."""
from .navigation import PointNavigation
from .policy import GaussianMLPPolicy, gaussian_log_prob
from .returns import advantages, linear_baseline, reward_to_go
from .rollouts import Rollouts, collect, task_noise
from .surrogate import clipped_loss, policy_gradient_loss
from .tasks import GoalBatch, GoalTasks, NavigationDataModule, collate_goals

__all__ = [
    "GaussianMLPPolicy",
    "GoalBatch",
    "GoalTasks",
    "NavigationDataModule",
    "PointNavigation",
    "Rollouts",
    "advantages",
    "clipped_loss",
    "collate_goals",
    "collect",
    "gaussian_log_prob",
    "linear_baseline",
    "policy_gradient_loss",
    "reward_to_go",
    "task_noise",
]
