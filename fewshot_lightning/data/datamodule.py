"""Lightning DataModules whose batches are :class:`TaskBatch`es."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .episodes import EpisodeDataset, EpisodeSampler, LabelledData, TaskDataset, Transform, labels_of
from .task import collate_tasks

SPLITS = ("train", "val", "test")


class TaskDataModule(L.LightningDataModule):
    """Base DataModule: builds one :class:`TaskDataset` per split and batches its tasks.

    Subclasses implement :meth:`make_dataset`. Every batch is a :class:`TaskBatch` of
    ``meta_batch_size`` tasks (the last evaluation batch may hold fewer).

    Args:
        meta_batch_size: tasks per training step (and per evaluation step).
        train_tasks: tasks in one training epoch.
        val_tasks, test_tasks: the fixed evaluation episodes (600 for test, as in the literature).
        num_workers: DataLoader worker processes.
        seed: base seed of every task; with ``seed_everything`` a run is repeatable.
    """

    def __init__(
        self,
        meta_batch_size: int = 32,
        train_tasks: int = 32_000,
        val_tasks: int = 200,
        test_tasks: int = 600,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be at least 1, got {meta_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}.")
        self.meta_batch_size = meta_batch_size
        self.num_tasks = {"train": train_tasks, "val": val_tasks, "test": test_tasks}
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: Dict[str, TaskDataset] = {}

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> TaskDataset:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS):
            if split not in self.datasets:
                # Distinct seeds per split: validation never replays test episodes.
                seed = self.seed * len(SPLITS) + SPLITS.index(split)
                self.datasets[split] = self.make_dataset(split, self.num_tasks[split], seed)

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        dataset = self.datasets[split]
        training = split == "train"
        return (ResumableLoader if training else DataLoader)(
            dataset,
            batch_size=self.meta_batch_size,
            sampler=EpisodeSampler(dataset, fixed=not training),
            drop_last=training,
            collate_fn=collate_tasks,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and training,
            pin_memory=torch.cuda.is_available(),
            # Worker seeds drawn from a generator of its own: drawn from the global one, at each
            # epoch, they would shift the random stream that a resumed run restores.
            generator=torch.Generator().manual_seed(self.seed) if training else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test episodes: ``predict`` gives the query predictions on the tasks ``test`` scores."""
        return self._loader("test")


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch. Lightning stores :meth:`state_dict` in every
    checkpoint and hands it to :meth:`load_state_dict` before a resumed run's first batch. Its
    position counts the batches handed to the training loop (not those that workers prepared
    ahead), from the start of the epoch (the ones a resumed pass skipped included)."""

    _batches = 0

    def __iter__(self):
        self._batches = self.sampler.start // self.batch_size
        return self._counted(super().__iter__())

    def _counted(self, batches):
        for batch in batches:
            self._batches += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        tasks = self._batches * self.batch_size * self.sampler.num_replicas
        return {"epoch": self.sampler.epoch, "tasks": tasks}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["tasks"])


class EpisodicDataModule(TaskDataModule):
    """N-way K-shot Q-query episodes with class-disjoint train/val/test splits.

    Use it directly on any labelled data (``data`` is split by class with a seeded shuffle,
    or by ``class_split`` lists), or subclass it and override :meth:`load_splits` for a
    benchmark with a published split.

    Args:
        data: a tensor of samples or a ``Dataset`` of ``(x, y)`` pairs (for direct use).
        labels: per-sample classes of ``data`` (read from ``data.targets`` if omitted).
        split_fractions: fractions of classes for train/val/test when splitting ``data``.
        ways, shots, queries: the training episodes.
        test_ways, test_shots, test_queries: validation/test episodes (default: as training).
        train_transform: per-sample augmentation for training episodes only.
    """

    def __init__(
        self,
        data: Optional[Union[Tensor, Dataset]] = None,
        labels: Optional[Union[Tensor, Sequence[int]]] = None,
        split_fractions: Sequence[float] = (0.64, 0.16, 0.20),
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        test_ways: Optional[int] = None,
        test_shots: Optional[int] = None,
        test_queries: Optional[int] = None,
        train_transform: Optional[Transform] = None,
        meta_batch_size: int = 32,
        train_tasks: int = 32_000,
        val_tasks: int = 200,
        test_tasks: int = 600,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(meta_batch_size, train_tasks, val_tasks, test_tasks, num_workers, seed)
        self.data = data
        self.labels = labels
        if len(split_fractions) != 3 or any(f < 0 for f in split_fractions) or sum(split_fractions) <= 0:
            raise ValueError(f"split_fractions must be three non-negative numbers (train, val, test), got {split_fractions}.")
        self.split_fractions = tuple(split_fractions)
        train_shape = (ways, shots, queries)
        test_shape = (test_ways or ways, test_shots or shots, test_queries or queries)
        self.episode_shape = {"train": train_shape, "val": test_shape, "test": test_shape}
        self.train_transform = train_transform
        self._splits: Optional[Dict[str, LabelledData]] = None

    def load_splits(self) -> Dict[str, LabelledData]:
        """The labelled data of each split, classes disjoint. Override for published splits."""
        if self.data is None:
            raise ValueError(
                f"{type(self).__name__} got no data: pass `data=` (and `labels=`), or use a benchmark "
                "DataModule such as KanjiDataModule."
            )
        labels = labels_of(self.data) if self.labels is None else torch.as_tensor(self.labels, dtype=torch.long)
        return split_by_class(self.data, labels, self.split_fractions, self.seed)

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> EpisodeDataset:
        if self._splits is None:
            self._splits = self.load_splits()
        data, labels = self._splits[split]
        ways, shots, queries = self.episode_shape[split]
        try:
            return EpisodeDataset(
                data, labels, ways, shots, queries, num_tasks, seed,
                transform=self.train_transform if split == "train" else None,
            )
        except ValueError as error:
            raise ValueError(f"{split} split of {type(self).__name__}: {error}") from None


def split_by_class(
    data: Union[Tensor, Dataset], labels: Tensor, fractions: Sequence[float], seed: int
) -> Dict[str, LabelledData]:
    """Split labelled data into class-disjoint train/val/test parts by a seeded class shuffle."""
    classes = torch.unique(labels)
    order = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))]
    total = float(sum(fractions))
    n_train = int(round(len(classes) * fractions[0] / total))
    n_val = int(round(len(classes) * fractions[1] / total))
    parts = dict(zip(SPLITS, (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])))
    return {split: subset_by_classes(data, labels, members) for split, members in parts.items()}


def subset_by_classes(data: Union[Tensor, Dataset], labels: Tensor, classes: Tensor) -> LabelledData:
    """The samples of ``data`` whose label is in ``classes``."""
    index = torch.isin(labels, classes).nonzero().flatten()
    if isinstance(data, Tensor):
        return LabelledData(data[index], labels[index])
    return LabelledData(torch.utils.data.Subset(data, index.tolist()), labels[index])
