"""Lightning DataModules whose batches are :class:`TaskBatch`es."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .episodes import (
    EpisodeDataset, EpisodeSampler, LabelledData, TaskDataset, Transform, check_episode_shape, labels_of,
)
from .task import collate_tasks

SPLITS = ("train", "val", "test")
#: The splits Lightning's stages use; ``setup(None)`` builds all three.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class TaskDataModule(L.LightningDataModule):
    """Base DataModule: builds one :class:`TaskDataset` per split and batches its tasks.

    Subclasses implement :meth:`make_dataset`. Every batch is a :class:`TaskBatch` of
    ``meta_batch_size`` tasks (the last evaluation batch may hold fewer). The datasets are
    built by :meth:`setup`, which Lightning's Trainer calls before asking for a dataloader.

    Args:
        meta_batch_size: tasks per training step (and per evaluation step).
        train_tasks: tasks in one training epoch.
        val_tasks: the fixed validation episodes.
        test_tasks: the fixed test episodes (600, as in the literature).
        num_workers: DataLoader worker processes.
        seed: base seed of every task; with ``seed_everything`` a run is repeatable.
    """

    #: What kind of tasks this DataModule makes: ``False`` for classification (integer labels
    #: ``0..N-1``, scored by accuracy), ``True`` for regression (float targets, scored by mean
    #: squared error). A class attribute, known before any data is loaded, so that a learner
    #: can read it at setup (``trainer.datamodule.regression``) to name its score ``acc`` or ``mse``.
    regression: bool = False
    #: Stacks the tasks a sampler hands out into one batch.
    collate = staticmethod(collate_tasks)

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
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split not in self.datasets:
                # Distinct seeds per split: validation never replays test episodes.
                seed = self.seed * len(SPLITS) + SPLITS.index(split)
                self.datasets[split] = self.make_dataset(split, self.num_tasks[split], seed)

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            # Not built here: building data is setup's job, and Lightning calls it (per stage,
            # on every process) before it asks for a dataloader; a second path would hide when.
            stage = next(stage for stage, splits in STAGE_SPLITS.items() if split in splits)
            raise RuntimeError(
                f"{type(self).__name__} has no {split} tasks yet: call `setup({stage!r})` before "
                f"`{split}_dataloader()` (Lightning's Trainer does this for you)."
            )
        dataset = self.datasets[split]
        training = split == "train"
        return DataLoader(
            dataset,
            batch_size=self.meta_batch_size,
            sampler=EpisodeSampler(dataset, fixed=not training),
            drop_last=training,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and training,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class ClassificationDataModule(TaskDataModule):
    """N-way K-shot Q-query classification episodes: the episode arguments every
    classification DataModule shares. Subclasses implement :meth:`make_dataset`.

    Args:
        ways: N, classes per training episode.
        shots: K, support samples per class.
        queries: Q, query samples per class.
        test_ways: N of validation and test episodes (default: ``ways``).
        test_shots: K of validation and test episodes (default: ``shots``).
        test_queries: Q of validation and test episodes (default: ``queries``).
        **kwargs: ``meta_batch_size``, ``train_tasks``, ``val_tasks``, ``test_tasks``,
            ``num_workers``, ``seed``, as in :class:`TaskDataModule`.
    """

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        test_ways: Optional[int] = None,
        test_shots: Optional[int] = None,
        test_queries: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        train_shape = (ways, shots, queries)
        test_shape = tuple(
            train if test is None else test for train, test in zip(train_shape, (test_ways, test_shots, test_queries))
        )
        for shape in (train_shape, test_shape):
            check_episode_shape(*shape)
        self.episode_shape = {"train": train_shape, "val": test_shape, "test": test_shape}


class LabelledDataModule(ClassificationDataModule):
    """Episodes over labelled data that is split by class: the base of every dataset's
    DataModule. A subclass loads the data in :meth:`load_splits` (usually one call of the
    dataset's ``load_<name>`` function); see ``docs/adding-a-dataset.md``.

    Args:
        train_transform: per-sample augmentation for training episodes only.
        **kwargs: the episode arguments of :class:`ClassificationDataModule` (``ways``,
            ``shots``, ``queries``, ``test_ways``, ...) and of :class:`TaskDataModule`
            (``meta_batch_size``, ``num_workers``, ``seed``, ...).
    """

    def __init__(self, train_transform: Optional[Transform] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_transform = train_transform
        self._splits: Optional[Dict[str, LabelledData]] = None

    def load_splits(self) -> Dict[str, LabelledData]:
        """The labelled data of the splits ``"train"``, ``"val"`` and ``"test"``, classes disjoint."""
        raise NotImplementedError

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


class EpisodicDataModule(LabelledDataModule):
    """N-way K-shot Q-query episodes on labelled data you pass in: ``data`` is split by class
    with a seeded shuffle into class-disjoint train/val/test parts.

    Args:
        data: a tensor of samples or a ``Dataset`` of ``(x, y)`` pairs.
        labels: per-sample classes of ``data`` (read from ``data.targets`` if omitted).
        split_fractions: fractions of classes for train/val/test.
        **kwargs: the arguments of :class:`LabelledDataModule` (``ways``, ``shots``,
            ``queries``, ``test_ways``, ..., ``train_transform``, ``meta_batch_size``, ...).

    Example::

        data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=15, meta_batch_size=32)
    """

    def __init__(
        self,
        data: Optional[Union[Tensor, Dataset]] = None,
        labels: Optional[Union[Tensor, Sequence[int]]] = None,
        split_fractions: Sequence[float] = (0.64, 0.16, 0.20),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data = data
        self.labels = labels
        self.split_fractions = check_split_fractions(split_fractions)

    def load_splits(self) -> Dict[str, LabelledData]:
        if self.data is None:
            raise ValueError(
                f"{type(self).__name__} got no data: pass `data=` (and `labels=`), or use a benchmark "
                "DataModule such as KanjiDataModule."
            )
        labels = labels_of(self.data) if self.labels is None else torch.as_tensor(self.labels, dtype=torch.long)
        return split_by_class(self.data, labels, self.split_fractions, self.seed)


def check_split_fractions(fractions: Sequence[float]) -> Tuple[float, float, float]:
    """``fractions`` as a tuple, or a ``ValueError`` saying what three numbers are expected."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers (train, val, test), got {fractions}.")
    return tuple(fractions)


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
