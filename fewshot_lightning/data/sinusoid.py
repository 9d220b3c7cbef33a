"""Sinusoid regression (Finn et al., 2017): each task is y = A sin(x - phase)."""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import numpy as np
import torch

from .datamodule import TaskDataModule
from .episodes import TaskDataset
from .task import TaskBatch


class SinusoidTasks(TaskDataset):
    """Tasks ``y = A sin(x - phase)`` with ``A ~ U[amplitude]``, ``phase ~ U[phase]``,
    ``x ~ U[x_range]``; ``shots`` support and ``queries`` query points, each ``[n, 1]``."""

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        num_tasks: int = 1000,
        seed: int = 0,
        amplitude: Tuple[float, float] = (0.1, 5.0),
        phase: Tuple[float, float] = (0.0, math.pi),
        x_range: Tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        super().__init__(num_tasks, seed)
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be at least 1, got shots={shots}, queries={queries}.")
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def __getitem__(self, index: int) -> TaskBatch:
        return TaskBatch(*(t[0] for t in self.__getitems__([index])))

    def __getitems__(self, indices: Sequence[int]) -> TaskBatch:
        """A whole meta-batch at once (the DataLoader calls this hook): one uniform draw per task,
        then the sinusoids of all tasks in one vectorised pass."""
        uniform = self.uniforms_of(indices, 2 + self.shots + self.queries)
        amplitude = scale(uniform[:, :1], self.amplitude)
        phase = scale(uniform[:, 1:2], self.phase)
        x = scale(uniform[:, 2:], self.x_range)
        y = amplitude * np.sin(x - phase)
        x = torch.from_numpy(x.astype(np.float32)).unsqueeze(-1)
        y = torch.from_numpy(y.astype(np.float32)).unsqueeze(-1)
        return TaskBatch(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :])


def scale(uniform: np.ndarray, bounds: Tuple[float, float]) -> np.ndarray:
    low, high = bounds
    return low + (high - low) * uniform


class SinusoidDataModule(TaskDataModule):
    """The sinusoid regression benchmark of MAML: amplitude U[0.1, 5.0], phase U[0, pi],
    x U[-5, 5], ``shots`` support and ``queries`` query points per task (MAML: K and K).

    Tasks are cheap to make, so ``num_workers`` defaults to 0 (worker processes would cost
    more than they save).

    Args:
        shots, queries: support and query points per task.
        meta_batch_size, train_tasks, num_workers: as in :class:`TaskDataModule`, with MAML's
            25 tasks per step and 1,000 steps per epoch.
        **kwargs: the other arguments of :class:`TaskDataModule` (``val_tasks``, ``test_tasks``, ``seed``).
    """

    regression = True

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        meta_batch_size: int = 25,
        train_tasks: int = 25_000,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(meta_batch_size=meta_batch_size, train_tasks=train_tasks, num_workers=num_workers, **kwargs)
        self.shots, self.queries = shots, queries

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> SinusoidTasks:
        return SinusoidTasks(self.shots, self.queries, num_tasks, seed)
