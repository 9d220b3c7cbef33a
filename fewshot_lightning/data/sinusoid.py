"""Sinusoid regression (Finn et al., 2017): each task is y = A sin(x - phase)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

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
        """A whole meta-batch at once (the DataLoader calls this hook), vectorised: task ``i`` of
        epoch ``e`` still depends only on ``(seed, e, i)``, through a counter-based generator."""
        epoch, task = np.divmod(np.asarray(indices, dtype=np.uint64), np.uint64(self.num_tasks))
        points = self.shots + self.queries
        uniform = counter_uniform(self.seed, epoch, task, 2 + points)
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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mixer.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniform(seed: int, epoch: np.ndarray, task: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniform floats in [0, 1) per task, a pure function of (seed, epoch, task, position):
    the same on every machine, for any batch the task lands in."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * _GOLDEN + np.uint64(1))
        key = _splitmix64(key ^ (epoch * _GOLDEN))
        key = _splitmix64(key ^ (task * _GOLDEN + np.uint64(7)))
        counters = key[:, None] + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _splitmix64(counters)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class SinusoidDataModule(TaskDataModule):
    """The sinusoid regression benchmark of MAML: amplitude U[0.1, 5.0], phase U[0, pi],
    x U[-5, 5], ``shots`` support and ``queries`` query points per task (MAML: K and K).

    Tasks are cheap to make, so ``num_workers`` defaults to 0 (worker processes would cost
    more than they save).
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        meta_batch_size: int = 25,
        train_tasks: int = 25_000,
        val_tasks: int = 200,
        test_tasks: int = 600,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(meta_batch_size, train_tasks, val_tasks, test_tasks, num_workers, seed)
        self.shots, self.queries = shots, queries

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> SinusoidTasks:
        return SinusoidTasks(self.shots, self.queries, num_tasks, seed)
