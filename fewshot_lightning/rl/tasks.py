"""Goals as tasks: a :class:`TaskDataset` of navigation goals and its DataModule.

A batch holds tasks, not data: the goals, and one seed per task for the exploration noise of
its rollouts, which the algorithm collects in its ``training_step``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..data.datamodule import TaskDataModule
from ..data.episodes import EpisodeSampler, TaskDataset, mix64


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
    """Goals uniform in ``[low, high]^2``; task ``i`` of epoch ``e`` comes from a torch generator
    seeded by a mix of ``(seed, e, i)``, the contract of every :class:`TaskDataset` (so DDP
    ranks and resumed runs see the right tasks). That mix is also the task's noise seed."""

    def __init__(self, num_tasks: int = 1000, seed: int = 0, low: float = -0.5, high: float = 0.5) -> None:
        super().__init__(num_tasks, seed)
        if not low < high:
            raise ValueError(f"goal range needs low < high, got low={low}, high={high}.")
        self.low, self.high = low, high

    def __getitem__(self, index: int) -> GoalBatch:
        epoch, task = divmod(int(index), self.num_tasks)
        seed = mix64(self.seed, epoch, task)
        uniform = torch.rand(2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        goal = (self.low + (self.high - self.low) * uniform).float()
        return GoalBatch(goal, torch.tensor(seed, dtype=torch.int64))


class NavigationDataModule(TaskDataModule):
    """Goals of the 2D navigation benchmark (Finn et al., ICML 2017, section 5.3): uniform in
    ``[goal_low, goal_high]^2``, ``[-0.5, 0.5]^2`` in the paper.

    Batches are :class:`GoalBatch`\\ es of ``meta_batch_size`` goals; validation and test use
    fixed goals (and fixed noise seeds), the same at every evaluation and never trained on.
    Goals cost nothing to make, so ``num_workers`` defaults to 0.
    Other arguments as :class:`~fewshot_lightning.data.TaskDataModule`.
    """

    def __init__(
        self,
        goal_low: float = -0.5,
        goal_high: float = 0.5,
        meta_batch_size: int = 20,
        train_tasks: int = 1000,
        val_tasks: int = 100,
        test_tasks: int = 400,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            meta_batch_size=meta_batch_size, train_tasks=train_tasks, val_tasks=val_tasks, test_tasks=test_tasks,
            num_workers=num_workers, seed=seed,
        )
        if not goal_low < goal_high:
            raise ValueError(f"goal_low must be below goal_high, got {goal_low} and {goal_high}.")
        self.goal_low, self.goal_high = goal_low, goal_high

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> GoalTasks:
        return GoalTasks(num_tasks, seed, self.goal_low, self.goal_high)

    def _goal_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        dataset = self.datasets[split]
        training = split == "train"
        return DataLoader(
            dataset,
            batch_size=self.meta_batch_size,
            sampler=EpisodeSampler(dataset, fixed=not training),
            drop_last=training,
            collate_fn=collate_goals,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and training,
        )

    def train_dataloader(self) -> DataLoader:
        return self._goal_loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._goal_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._goal_loader("test")
