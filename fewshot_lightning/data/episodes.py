"""Map-style datasets of tasks, and the sampler that walks them.

Task ``i`` of epoch ``e`` is drawn from a generator seeded by ``(seed, e, i)``. The
:class:`EpisodeSampler` hands out the indices ``e * num_tasks + i``, split across DDP
ranks; DataLoader workers split those further. So a run is reproducible whatever the
number of workers, every epoch sees new tasks, and every rank sees different ones.
Validation and test use a fixed sampler: the same episodes at every evaluation.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from .task import TaskBatch, collate_tasks

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
        """Task ``index`` as unbatched tensors ``(support_x, support_y, query_x, query_y)``."""
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
        # The same, padded into one [classes, largest] matrix, so a task's picks are one
        # vectorised draw rather than one numpy call per class.
        width = int(counts.max())
        self._padded = np.zeros((len(classes), width), dtype=np.int64)
        for c, members in enumerate(self.members):
            self._padded[c, : len(members)] = members
        self._counts = counts.numpy()
        self._ragged = bool((counts != counts[0]).any())
        self._rows = np.arange(ways)[:, None]
        #: Uniforms per task: class order, one key per padded member, support and query order.
        self.draws = ways + ways * width + ways * needed
        self._tensor_data = isinstance(data, Tensor)

    def uniforms(self, index: int) -> np.ndarray:
        """All the randomness of task ``index``: :attr:`draws` uniforms in ``[0, 1)`` from a
        torch generator seeded by a 64-bit mix of ``(seed, epoch, task)``.

        Setting up a torch generator costs a few microseconds; numpy's ``default_rng`` of a
        seed list costs tens (its ``SeedSequence`` hashing), more than the rest of the task.
        """
        epoch, task = divmod(int(index), self.num_tasks)
        generator = torch.Generator().manual_seed(mix64(self.seed, epoch, task))
        return torch.rand(self.draws, dtype=torch.float64, generator=generator).numpy()

    def __getitem__(self, index: int) -> TaskBatch:
        return self._task(*self._draw(self.uniforms(index)))

    def __getitems__(self, indices: Sequence[int]) -> TaskBatch:
        # The DataLoader asks for a whole meta-batch here: one gather and one uint8 -> float
        # conversion for all its tasks instead of one per task plus a stack.
        if not self._tensor_data or self.transform is not None:
            return collate_tasks([self[i] for i in indices])
        drawn = [self._draw(self.uniforms(i)) for i in indices]
        samples = self._gather(np.concatenate([indices for indices, _, _ in drawn]))
        samples = samples.view(len(drawn), -1, *samples.shape[1:])
        support = self.ways * self.shots
        support_y = torch.from_numpy(np.stack([support_y for _, support_y, _ in drawn]))
        query_y = torch.from_numpy(np.stack([query_y for _, _, query_y in drawn]))
        return TaskBatch(samples[:, :support], support_y, samples[:, support:], query_y)

    def _draw(self, uniforms: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(sample indices, support labels, query labels)`` of one task: support indices first."""
        ways, shots, queries = self.ways, self.shots, self.queries
        per_class, width = shots + queries, self._padded.shape[1]
        chosen = ordered_sample(len(self.members), ways, uniforms[:ways])
        # Position in `chosen` is the task label: random per task since `chosen` is in random order.
        keys = uniforms[ways : ways + ways * width].reshape(ways, width)
        if self._ragged:
            keys = np.where(np.arange(width) >= self._counts[chosen, None], np.inf, keys)
        # The per_class smallest of iid keys, in key order: a uniformly random ordered sample
        # without replacement from each class. Wide classes (mini-ImageNet's 600) partition
        # first and sort only the chosen few; for narrow ones one argsort is cheaper.
        if width > 4 * per_class:
            nearest = np.argpartition(keys, per_class - 1, axis=1)[:, :per_class]
            order = nearest[self._rows, np.argsort(keys[self._rows, nearest], axis=1)]
        else:
            order = np.argsort(keys, axis=1)[:, :per_class]
        picks = self._padded[chosen[:, None], order]
        orders = uniforms[ways + ways * width :]
        support_order = np.argsort(orders[: ways * shots])
        query_order = np.argsort(orders[ways * shots :])
        support_idx = picks[:, :shots].reshape(-1)[support_order]
        query_idx = picks[:, shots:].reshape(-1)[query_order]
        # Entry j of the row-major [ways, shots] block belongs to class j // shots.
        return np.concatenate([support_idx, query_idx]), support_order // shots, query_order // queries

    def _task(self, indices: np.ndarray, support_y: np.ndarray, query_y: np.ndarray) -> TaskBatch:
        samples = self._gather(indices) if self._tensor_data and self.transform is None else self._samples(indices)
        support = len(support_y)
        return TaskBatch(samples[:support], torch.from_numpy(support_y), samples[support:], torch.from_numpy(query_y))

    def _gather(self, indices: np.ndarray) -> Tensor:
        # index_select, not data[indices]: advanced indexing takes a general path about ten
        # times slower for a few dozen rows. `/ 255` converts and scales in one pass.
        samples = self.data.index_select(0, torch.from_numpy(indices))
        return samples / 255 if samples.dtype == torch.uint8 else samples

    def _samples(self, indices: np.ndarray) -> Tensor:
        """Samples one by one: through ``transform``, or from a ``Dataset`` of pairs."""
        if self._tensor_data:
            samples = self.data.index_select(0, torch.from_numpy(indices))
            return torch.stack([self.transform(s) for s in samples])
        items = [self.data[int(i)][0] for i in indices]
        if self.transform is not None:
            items = [self.transform(x) for x in items]
        return torch.stack([torch.as_tensor(x) for x in items])


_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 63-bit seed from integers: the SplitMix64 finaliser (Steele et al., 2014) folded over them."""
    state = 0
    for value in values:
        state = (state + 0x9E3779B97F4A7C15 + (value & _MASK64)) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1  # torch.Generator.manual_seed wants a value that fits a signed 64-bit int


def ordered_sample(n: int, k: int, uniforms: np.ndarray) -> np.ndarray:
    """``k`` distinct integers of ``range(n)`` in uniformly random order, from ``k`` uniforms:
    the first ``k`` swaps of a Fisher-Yates shuffle, the swapped entries kept in a dict, so the
    cost is O(k) rather than the O(n) of ``rng.choice(n, k, replace=False)``."""
    swapped: dict = {}
    chosen = np.empty(k, dtype=np.int64)
    for i in range(k):
        j = i + int(uniforms[i] * (n - i))
        chosen[i] = swapped.get(j, j)
        swapped[j] = swapped.get(i, i)
    return chosen


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

    A training sampler resumes mid-epoch: :meth:`resume` makes its next pass start where a
    checkpointed run stopped, so a resumed run sees the tasks an uninterrupted one would.
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
        #: Tasks of this rank's epoch that the next pass skips (set by :meth:`resume`).
        self.start = 0

    def _indices(self) -> range:
        offset = 0 if self.fixed else self.epoch * self.num_tasks
        stop = self.num_tasks
        if not self.fixed:
            stop -= self.num_tasks % self.num_replicas
        return range(offset + self.rank, offset + stop, self.num_replicas)

    def __iter__(self):
        indices = self._indices()[self.start :]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        # The whole epoch even when resuming: Lightning counts the batches it already trained
        # on against this length.
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, tasks: int) -> None:
        """Start the next pass after the first ``tasks`` tasks of ``epoch``, counted over all
        ranks (a finished epoch moves on to the next)."""
        start = tasks // self.num_replicas
        if start >= len(self._indices()):
            epoch, start = epoch + 1, 0
        self.epoch, self.start = epoch, start

    def batch_indices(self, batch_idx: int, batch_size: int) -> range:
        """Dataset indices of this rank's batch ``batch_idx`` (counted from the start of the
        current epoch) of ``batch_size`` tasks: ``dataset[i]`` rebuilds each task."""
        return self._indices()[batch_idx * batch_size : (batch_idx + 1) * batch_size]
