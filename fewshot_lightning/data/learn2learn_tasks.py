"""Use any learn2learn taskset as a source of :class:`TaskBatch`es.

learn2learn (Arnold et al., "learn2learn: A Library for Meta-Learning Research", 2020) is an
optional dependency: it is imported only when one of these classes is built.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .datamodule import CHECKED_SPLITS, SPLITS, ClassificationDataModule
from .episodes import TaskDataset, check_episode_shape
from .seeding import seeded_globals
from .task import TaskBatch

INSTALL = "pip install learn2learn==0.2.0  (or: pip install 'fewshot-lightning[learn2learn]')"


def import_learn2learn() -> Any:
    """The ``learn2learn`` module, or an ``ImportError`` with the install command."""
    try:
        import learn2learn
    except ImportError as error:
        raise ImportError(f"The learn2learn adapter needs learn2learn, which is not installed: {INSTALL}") from error
    return learn2learn


class Learn2LearnTasks(TaskDataset):
    """A learn2learn ``Taskset`` (formerly ``TaskDataset``) seen as one of ours: index ``i`` -> one task.

    Every task is drawn fresh, from ``taskset.get_task(taskset.sample_task_description())``,
    with Python's ``random`` module (which learn2learn's samplers use) seeded to
    :meth:`task_seed`; the global ``random`` state is restored afterwards. That seed and the
    relabelling and shuffling below come from the task's :meth:`uniforms`, so task ``i`` of
    epoch ``e`` depends only on ``(seed, e, i)``, in any worker process, as for
    :class:`EpisodeDataset`. The taskset's own ``num_tasks`` pool is bypassed: it caches
    descriptions in whichever process first draws them, so it could not be reproduced across
    workers; our fixed validation/test episodes play its role.

    The sampled ``N * (K + Q)`` samples are split as learn2learn's examples do: per class,
    the first ``shots`` samples (in the taskset's order) are support, the rest query. Classes
    then get the labels ``0..N-1`` in a random order, and support and query are each
    shuffled, so nothing can be read off a label or a position (the :class:`TaskBatch`
    contract). ``uint8`` samples are scaled to ``float32`` in ``[0, 1]``.

    Args:
        taskset: a ``learn2learn.data.Taskset`` (or ``TaskDataset``) whose tasks are
            ``(data, labels)`` with ``ways`` classes of ``shots + queries`` samples each (e.g.
            built with ``FusedNWaysKShots(n=ways, k=shots + queries)``).
        ways, shots, queries: N, K and Q.
        num_tasks: tasks per epoch.
        seed: base seed.
    """

    def __init__(
        self, taskset: Any, ways: int = 5, shots: int = 1, queries: int = 15, num_tasks: int = 1000, seed: int = 0,
        described: str = "The taskset",
    ) -> None:
        super().__init__(num_tasks, seed)
        #: How messages name this taskset (the DataModule says which split's, shaped by which arguments).
        self.described = described
        check_episode_shape(ways, shots, queries)
        if not (hasattr(taskset, "get_task") and hasattr(taskset, "sample_task_description")):
            raise TypeError(
                f"Expected a learn2learn Taskset (with get_task and sample_task_description), got "
                f"{type(taskset).__name__}. Build one with learn2learn.data.Taskset(dataset, task_transforms)."
            )
        self.taskset = taskset
        self.ways, self.shots, self.queries = ways, shots, queries
        #: Uniforms per task: the seed of Python's random, class labels, support and query order.
        self.draws = 1 + ways + ways * (shots + queries)

    def task_seed(self, index: int) -> int:
        """The seed of Python's ``random`` while task ``index`` is sampled."""
        return python_seed(self.uniforms(index, self.draws)[0])

    def _sample(self, seed: int) -> Tuple[Tensor, Tensor]:
        # learn2learn draws the task from Python's `random` and its augmentation (data_augmentation,
        # a dataset's transform) from torch's and numpy's generators: all three seeded per task.
        with seeded_globals(seed):
            task = self.taskset.get_task(self.taskset.sample_task_description())
        data, labels = task[0], task[1]
        return torch.as_tensor(data), torch.as_tensor(labels)

    def __getitem__(self, index: int) -> TaskBatch:
        uniforms = self.uniforms(index, self.draws)
        data, labels = self._sample(python_seed(uniforms[0]))
        return self.episode(data, labels, uniforms[1:])

    def episode(self, data: Tensor, labels: Tensor, uniforms: np.ndarray) -> TaskBatch:
        """Split one sampled task into support and query, relabel and shuffle; ``uniforms``
        (``ways * (1 + shots + queries)`` of them) give the new labels and the two orders."""
        ways, shots, queries = self.ways, self.shots, self.queries
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if len(classes) != ways or (counts != shots + queries).any():
            raise ValueError(
                f"{self.described} gave a task of {len(classes)} classes with {counts.tolist()} samples each, but "
                f"{ways}-way {shots}-shot {queries}-query episodes need {ways} classes of "
                f"{shots + queries}: build the taskset with FusedNWaysKShots(n={ways}, k={shots + queries}) "
                "(or NWays + KShots)."
            )
        # Row c: the positions of class c's samples, in the taskset's order (a stable sort).
        by_class = torch.argsort(inverse, stable=True).view(ways, shots + queries)
        # argsort of iid uniforms: uniformly random permutations.
        new_label = torch.from_numpy(np.argsort(uniforms[:ways]))[:, None]
        support_order = torch.from_numpy(np.argsort(uniforms[ways : ways + ways * shots]))
        query_order = torch.from_numpy(np.argsort(uniforms[ways + ways * shots :]))
        support_idx = by_class[:, :shots].reshape(-1)[support_order]
        query_idx = by_class[:, shots:].reshape(-1)[query_order]
        support_y = new_label.expand(ways, shots).reshape(-1)[support_order]
        query_y = new_label.expand(ways, queries).reshape(-1)[query_order]
        return TaskBatch(as_float(data[support_idx]), support_y, as_float(data[query_idx]), query_y)


def python_seed(uniform: float) -> int:
    # The uniforms are 53-bit doubles: this is every bit of one, exactly.
    return int(uniform * 2**53)


def as_float(samples: Tensor) -> Tensor:
    return samples.float().div_(255) if samples.dtype == torch.uint8 else samples


class Learn2LearnDataModule(ClassificationDataModule):
    """Episodes from learn2learn tasksets: a named learn2learn benchmark, or tasksets you built.

    With ``benchmark`` (``"omniglot"``, ``"mini-imagenet"``, ``"tiered-imagenet"``,
    ``"cifarfs"``, ``"fc100"``, ...), the tasksets come from
    ``learn2learn.vision.benchmarks.get_tasksets`` with ``train_samples = shots + queries``
    (and the test shape for validation and test); it downloads into ``root``. Python's
    ``random`` is seeded with ``seed`` while it runs, because some benchmarks (Omniglot) draw
    their class split from it. In code you may pass ``tasksets`` instead: learn2learn's
    ``BenchmarkTasksets`` (``.train``, ``.validation``, ``.test``) or a mapping with keys
    ``train``, ``val`` (or ``validation``) and ``test``.

    Args:
        benchmark: a learn2learn benchmark name.
        root: where learn2learn keeps its data.
        tasksets: prebuilt tasksets (instead of ``benchmark``).
        benchmark_kwargs: extra keyword arguments for ``get_tasksets`` (e.g. ``data_augmentation``).
        **kwargs: the episode arguments of
            :class:`~fewshot_lightning.data.ClassificationDataModule` (``ways``, ``shots``,
            ``queries``, ``test_ways``, ..., ``meta_batch_size``, ``num_workers``, ``seed``, ...).

    Example::

        datamodule = Learn2LearnDataModule("mini-imagenet", root="data", ways=5, shots=1, queries=15)
    """

    def __init__(
        self,
        benchmark: Optional[str] = None,
        root: Union[str, Path] = "data",
        tasksets: Optional[Any] = None,
        benchmark_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (benchmark is None) == (tasksets is None):
            raise ValueError("Pass exactly one of `benchmark` (a learn2learn benchmark name) and `tasksets`.")
        import_learn2learn()
        self.benchmark = benchmark
        self.root = Path(root).expanduser()
        self.benchmark_kwargs = dict(benchmark_kwargs or {})
        self._tasksets = None if tasksets is None else tasksets_by_split(tasksets)

    def prepare_data(self) -> None:
        # Builds (and so downloads) the benchmark once per node before `setup`.
        self.tasksets()

    def tasksets(self) -> Dict[str, Any]:
        if self._tasksets is None:
            l2l = import_learn2learn()
            (ways, shots, queries), (test_ways, test_shots, test_queries) = (
                self.episode_shape["train"], self.episode_shape["test"],
            )
            outer_state = random.getstate()
            random.seed(self.seed)
            try:
                built = l2l.vision.benchmarks.get_tasksets(
                    self.benchmark, train_ways=ways, train_samples=shots + queries, test_ways=test_ways,
                    test_samples=test_shots + test_queries, root=str(self.root), **self.benchmark_kwargs,
                )
            finally:
                random.setstate(outer_state)
            self._tasksets = tasksets_by_split(built)
        return self._tasksets

    def setup(self, stage: Optional[str] = None) -> None:
        self.check_tasksets(CHECKED_SPLITS.get(stage, SPLITS))
        super().setup(stage)

    def episode_labels(self, split: str) -> Optional[Tensor]:
        """Read from the taskset's ``MetaDataset`` (its ``labels_to_indices``); ``None`` for a
        taskset that has none (then not checked)."""
        counts = class_sizes(self.tasksets()[split])
        if counts is None:
            return None
        return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))

    def split_place(self, split: str) -> str:
        return f"the {split} taskset's dataset"

    def more_classes_advice(self, splits: List[str]) -> str:
        return f"build {' and '.join(self.split_place(split) for split in splits)} over more classes"

    def more_samples_advice(self, needed: int) -> str:
        return f"build the datasets with at least {needed} samples per class"

    def check_tasksets(self, splits) -> None:
        """Stop before any batch if a split's taskset cannot give the episodes asked of it (too
        few classes for its ways, classes with fewer samples than shots + queries), naming the
        argument and what fits, as the other DataModules do (:meth:`check_episodes`):
        learn2learn's samplers failed inside a worker with "Sample larger than population", at
        the first test only after the whole fit."""
        self.check_episodes(splits)
        for split in splits:
            # One task of each split, now: a taskset whose own transforms ask more of its dataset
            # than it holds (KShots(k=7) over classes of 6) failed in learn2learn's sampler at the
            # split's first batch, the test split's after the whole fit.
            tasks = self.make_dataset(split, num_tasks=1, seed=self.seed)
            try:
                tasks[0]
            except ValueError as error:
                if str(error).startswith(tasks.described):
                    raise  # our own: the task's shape, explained
                ways, shots, queries = self.episode_shape[split]
                raise ValueError(
                    f"{tasks.described} could not draw a task; learn2learn said: {error}. Its transforms ask its "
                    f"dataset for more classes or samples than it holds: build it with FusedNWaysKShots(n={ways}, "
                    f"k={shots + queries}) (or NWays + KShots) over classes of at least {shots + queries} samples."
                ) from error

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> Learn2LearnTasks:
        ways, shots, queries = self.episode_shape[split]
        names, described = self.episode_arguments(split)
        return Learn2LearnTasks(self.tasksets()[split], ways, shots, queries, num_tasks, seed,
                                described=f"The {split} taskset (episodes of {', '.join(described)})")


def class_sizes(taskset: Any) -> Optional[List[int]]:
    """How many samples each class of a learn2learn taskset's dataset holds, if it says
    (``MetaDataset.labels_to_indices``); ``None`` otherwise."""
    dataset = getattr(taskset, "dataset", None)
    by_label = getattr(dataset, "labels_to_indices", None)
    if not isinstance(by_label, Mapping) or not by_label:
        return None
    return [len(indices) for indices in by_label.values()]


def tasksets_by_split(tasksets: Any) -> Dict[str, Any]:
    """``{"train", "val", "test"}`` -> taskset, from learn2learn's ``BenchmarkTasksets`` or a mapping."""
    if isinstance(tasksets, Mapping):
        found = {
            "train": tasksets.get("train"),
            "val": tasksets.get("val", tasksets.get("validation")),
            "test": tasksets.get("test"),
        }
    else:
        names = {"train": "train", "val": "validation", "test": "test"}
        found = {split: getattr(tasksets, name, None) for split, name in names.items()}
    absent = [split for split, taskset in found.items() if taskset is None]
    if absent:
        raise ValueError(
            f"tasksets has no {', '.join(absent)} taskset: pass learn2learn's BenchmarkTasksets or a mapping with "
            "keys 'train', 'val' and 'test'."
        )
    return found
