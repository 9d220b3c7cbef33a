"""Map-style datasets of tasks, and the sampler that walks them.

Task ``i`` of epoch ``e`` is drawn from a generator seeded by ``(seed, e, i)``. The
:class:`EpisodeSampler` hands out the indices ``e * num_tasks + i``, split across DDP
ranks; DataLoader workers split those further. So a run is reproducible whatever the
number of workers, every epoch sees new tasks, and every rank sees different ones.
Validation and test use a fixed sampler: the same episodes at every evaluation.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from .task import TaskBatch

Transform = Callable[[Tensor], Tensor]


class LabelledData(NamedTuple):
    """Samples and their integer class labels. ``data`` is a tensor indexed along dim 0, or a
    ``Dataset`` whose items are ``(x, y)`` pairs."""

    data: Union[Tensor, Dataset]
    labels: Tensor


class TaskDataset(Dataset):
    """Base class: index -> one task, from a generator seeded by ``(seed, epoch, i)``.

    Any index is valid; ``epoch, i = divmod(index, num_tasks)``. ``__len__`` is the number
    of tasks in one epoch.
    """

    def __init__(self, num_tasks: int, seed: int = 0) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}.")
        self.num_tasks = num_tasks
        self.seed = seed

    def __len__(self) -> int:
        return self.num_tasks

    def generator(self, index: int) -> np.random.Generator:
        epoch, task = divmod(int(index), self.num_tasks)
        return np.random.default_rng([self.seed, epoch, task])

    def __getitem__(self, index: int) -> TaskBatch:
        return self.make_task(self.generator(index))

    def make_task(self, rng: np.random.Generator) -> TaskBatch:
        """One task as unbatched tensors ``(support_x, support_y, query_x, query_y)``."""
        raise NotImplementedError


def labels_of(data: Union[Tensor, Dataset]) -> Tensor:
    """The integer labels of a dataset, without loading samples where the dataset knows them."""
    for name in ("targets", "labels", "_labels"):
        labels = getattr(data, name, None)
        if labels is not None:
            return torch.as_tensor(np.asarray(labels), dtype=torch.long)
    warnings.warn(
        f"{type(data).__name__} has no `targets` or `labels` attribute: reading every sample once to "
        "learn its label. Pass `labels=` to skip this.",
        stacklevel=3,
    )
    return torch.tensor([int(data[i][1]) for i in range(len(data))], dtype=torch.long)


class EpisodeDataset(TaskDataset):
    """N-way K-shot Q-query classification episodes over any labelled data.

    Args:
        data: a tensor of samples (indexed along dim 0) or a ``Dataset`` of ``(x, y)`` pairs.
        labels: integer class of each sample; read from ``data.targets`` / ``data.labels`` if
            omitted. Class ids need not be contiguous.
        ways, shots, queries: N, K and Q. Support and query samples of a task never overlap.
        num_tasks: tasks per epoch.
        seed: base seed; task ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.
        transform: applied to each sample (e.g. augmentation). ``uint8`` tensors with no
            transform are scaled to ``float32`` in ``[0, 1]``.

    Each task's classes get the labels ``0..N-1`` in random order, and support and query
    are each shuffled, so no model can read the label off the position.
    """

    def __init__(
        self,
        data: Union[Tensor, Dataset],
        labels: Optional[Union[Tensor, Sequence[int]]] = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        num_tasks: int = 1000,
        seed: int = 0,
        transform: Optional[Transform] = None,
    ) -> None:
        super().__init__(num_tasks, seed)
        self.data = data
        labels = labels_of(data) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if len(labels) != len(data):
            raise ValueError(f"Got {len(labels)} labels for {len(data)} samples; they must match one to one.")
        check_episode_shape(ways, shots, queries)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.transform = transform

        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self.classes = classes
        if ways > len(classes):
            raise ValueError(
                f"Cannot sample {ways}-way tasks from {len(classes)} classes: lower `ways` to at most "
                f"{len(classes)} or use data with more classes."
            )
        needed = shots + queries
        too_small = (counts < needed).nonzero().flatten()
        if len(too_small):
            smallest = int(counts.min())
            raise ValueError(
                f"{shots}-shot {queries}-query tasks need {needed} samples per class, but {len(too_small)} of "
                f"{len(classes)} classes have fewer (the smallest has {smallest}, class "
                f"{int(classes[counts.argmin()])}): lower `shots`/`queries` to sum to at most {smallest}, "
                "or drop the small classes."
            )
        order = torch.argsort(inverse, stable=True)
        # members[c] = indices of the samples of class c; a list of arrays for cheap numpy choice.
        self.members = [m.numpy() for m in torch.split(order, counts.tolist())]
        self._tensor_data = isinstance(data, Tensor)

    def make_task(self, rng: np.random.Generator) -> TaskBatch:
        ways, shots, queries = self.ways, self.shots, self.queries
        chosen = rng.choice(len(self.members), size=ways, replace=False)
        # Position in `chosen` is the task label: random per task since `chosen` is in random order.
        picks = np.stack([rng.choice(self.members[c], size=shots + queries, replace=False) for c in chosen])
        task_labels = np.broadcast_to(np.arange(ways)[:, None], picks.shape)
        support_order = rng.permutation(ways * shots)
        query_order = rng.permutation(ways * queries)
        support_idx = picks[:, :shots].reshape(-1)[support_order]
        query_idx = picks[:, shots:].reshape(-1)[query_order]
        support_y = torch.from_numpy(task_labels[:, :shots].reshape(-1)[support_order].copy())
        query_y = torch.from_numpy(task_labels[:, shots:].reshape(-1)[query_order].copy())
        return TaskBatch(self._samples(support_idx), support_y, self._samples(query_idx), query_y)

    def _samples(self, indices: np.ndarray) -> Tensor:
        if self._tensor_data:
            samples = self.data[torch.from_numpy(indices)]
            if self.transform is not None:
                return torch.stack([self.transform(s) for s in samples])
            if samples.dtype == torch.uint8:
                return samples.float().div_(255)
            return samples
        items = [self.data[int(i)][0] for i in indices]
        if self.transform is not None:
            items = [self.transform(x) for x in items]
        return torch.stack([torch.as_tensor(x) for x in items])


def check_episode_shape(ways: int, shots: int, queries: int) -> None:
    """Raise a ``ValueError`` naming the bad number if an N-way K-shot Q-query request is impossible."""
    if ways < 2:
        raise ValueError(f"ways must be at least 2 for a classification task, got {ways}.")
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}.")
    if queries < 1:
        raise ValueError(f"queries must be at least 1, got {queries}.")


class EpisodeSampler(DistributedSampler):
    """Walks a :class:`TaskDataset`: indices ``epoch * num_tasks + i``, split across DDP ranks.

    A ``DistributedSampler`` subclass, so Lightning keeps it under DDP (instead of wrapping it)
    and calls :meth:`set_epoch` on it each epoch. ``fixed=True`` (validation, test) ignores the
    epoch: every evaluation sees the same tasks. Training gives every rank the same number of
    tasks (dropping at most ``world_size - 1``) so ranks step in lockstep; evaluation gives
    every task to exactly one rank.
    """

    def __init__(
        self,
        dataset: TaskDataset,
        fixed: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside 0..{self.num_replicas - 1}.")
        self.dataset = dataset
        self.num_tasks = len(dataset)
        self.fixed = fixed
        self.epoch = 0
        self.shuffle = False
        self.drop_last = not fixed
        self.seed = 0

    def _indices(self) -> range:
        offset = 0 if self.fixed else self.epoch * self.num_tasks
        stop = self.num_tasks
        if not self.fixed:
            stop -= self.num_tasks % self.num_replicas
        return range(offset + self.rank, offset + stop, self.num_replicas)

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
