"""Goals as tasks: a :class:`TaskDataset` of navigation goals and its DataModule.

A batch holds tasks, not data: the goals, and one seed per task for the exploration noise of
its rollouts, which the algorithm collects in its ``training_step``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from ..data.datamodule import TaskDataModule
from ..data.episodes import TaskDataset


class GoalBatch(NamedTuple):
    """``goals`` ``[B, 2]`` and ``seeds`` ``[B]`` (int64): task ``b``'s rollouts draw their noise
    from ``seeds[b]`` alone (:func:`~fewshot_lightning.rl.rollouts.task_noise`)."""

    goals: Tensor
    seeds: Tensor

    @property
    def num_tasks(self) -> int:
        return self.goals.shape[0]


def collate_goals(tasks: Sequence[GoalBatch]) -> GoalBatch:
    """Stack single tasks into a :class:`GoalBatch`."""
    return GoalBatch(torch.stack([t.goals for t in tasks]), torch.stack([t.seeds for t in tasks]))


class GoalTasks(TaskDataset):
    """Goals uniform in ``[low, high]^2``; task ``i`` of epoch ``e`` is drawn from the uniforms of
    ``(seed, e, i)`` (:meth:`~fewshot_lightning.data.TaskDataset.uniforms`), the contract of
    every :class:`TaskDataset` (so DDP ranks and resumed runs see the right tasks), and so is
    the task's noise seed."""

    def __init__(self, num_tasks: int = 1000, seed: int = 0, low: float = -0.5, high: float = 0.5) -> None:
        super().__init__(num_tasks, seed)
        if not low < high:
            raise ValueError(f"goal range needs low < high, got low={low}, high={high}.")
        self.low, self.high = low, high

    def __getitem__(self, index: int) -> GoalBatch:
        uniform = torch.from_numpy(self.uniforms(index, 3))
        goal = (self.low + (self.high - self.low) * uniform[:2]).float()
        # The task's noise seed: 53 random bits of its own (a float64 uniform is k / 2**53).
        return GoalBatch(goal, torch.tensor(int(uniform[2] * 2**53), dtype=torch.int64))


class NavigationDataModule(TaskDataModule):
    """Goals of the 2D navigation benchmark (Finn et al., ICML 2017, section 5.3): uniform in
    ``[goal_low, goal_high]^2``, ``[-0.5, 0.5]^2`` in the paper.

    Batches are :class:`GoalBatch`\\ es of ``meta_batch_size`` goals; validation and test use
    fixed goals (and fixed noise seeds), the same at every evaluation and never trained on.
    Goals cost nothing to make, so ``num_workers`` defaults to 0.
    Other arguments as :class:`~fewshot_lightning.data.TaskDataModule`.
    """

    #: Batches are goals, not episodes.
    collate = staticmethod(collate_goals)
    #: Tasks of reinforcement learning: only a learner whose ``task_kinds`` holds it takes them.
    task_kind = "reinforcement"
    #: Neither classification nor regression (no labels, no score of that kind).
    regression = None

    def __init__(
        self,
        goal_low: float = -0.5,
        goal_high: float = 0.5,
        meta_batch_size: int = 20,
        train_tasks: int = 1000,
        val_tasks: int = 100,
        test_tasks: int = 400,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            meta_batch_size=meta_batch_size, train_tasks=train_tasks, val_tasks=val_tasks, test_tasks=test_tasks,
            num_workers=num_workers, **kwargs,
        )
        if not goal_low < goal_high:
            raise ValueError(f"goal_low must be below goal_high, got {goal_low} and {goal_high}.")
        self.goal_low, self.goal_high = goal_low, goal_high

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> GoalTasks:
        return GoalTasks(num_tasks, seed, self.goal_low, self.goal_high)
