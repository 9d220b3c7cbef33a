"""Lightning DataModules whose batches are :class:`TaskBatch`es."""
from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .episodes import (
    EpisodeDataset, EpisodeSampler, LabelledData, TaskDataset, Transform, check_episode_shape, check_finite,
    episode_shape_problems, labelled_input, warn_raw_pixels,
)
from .seeding import seeded_globals
from .task import TaskBatch, collate_tasks, scale_images

SPLITS = ("train", "val", "test")
#: The splits Lightning's stages use; ``setup(None)`` builds all three.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
#: The splits whose episodes ``setup`` checks can be drawn: at ``fit`` the test split too, so a
#: test-only mistake (``test_ways`` above the test classes) stops the run before it trains.
CHECKED_SPLITS = {"fit": SPLITS, "validate": ("val",), "test": ("test",), "predict": ("test",)}
#: The file, in the run's log folder, where the class split is written.
CLASS_SPLIT_FILE = "class_split.json"
#: Class names shown per split when the split is printed; the file has all of them.
_SHOWN_CLASSES = 20


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
        for name, value, least in (("meta_batch_size", meta_batch_size, 1), ("num_workers", num_workers, 0),
                                   ("seed", seed, None)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                # None from a config ("null") failed later in a comparison: "'<' not supported between
                # instances of 'NoneType' and 'int'".
                raise TypeError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
            if least is not None and value < least:
                raise ValueError(f"{name} must be {'at least 1' if least else '0 or more'}, got {value}.")
        for split, tasks in (("train", train_tasks), ("val", val_tasks), ("test", test_tasks)):
            if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
                raise ValueError(f"{split}_tasks must be a whole number of tasks, at least 1, got {tasks!r}.")
        meta_batch_size, num_workers, seed = int(meta_batch_size), int(num_workers), int(seed)  # numpy's too
        self.meta_batch_size = meta_batch_size
        self.num_tasks = {"train": train_tasks, "val": val_tasks, "test": test_tasks}
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: Dict[str, TaskDataset] = {}

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> TaskDataset:
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_dataset(split, num_tasks, seed), returning the TaskDataset "
            "of that split's tasks (see docs/adding-a-dataset.md); or derive from LabelledDataModule, which makes "
            "episodes from the labelled data its load_splits returns.")

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
        sampler = EpisodeSampler(dataset, fixed=not training)
        if not training and len(dataset) < sampler.num_replicas:
            # Every process needs a batch (Lightning stops a process whose loader is empty, and the
            # others then lose their peer): the same check on every process, so all stop here.
            raise ValueError(
                f"{split}_tasks={len(dataset)} is fewer than the {sampler.num_replicas} processes: each evaluates its "
                f"share of the {split} episodes and one would have none. Raise {split}_tasks to at least "
                f"{sampler.num_replicas} (the literature's test: 600), or run fewer processes.")
        if training and len(sampler) < self.meta_batch_size:
            # Training batches are whole (drop_last): not one would be drawn, and fit ended at step 0
            # with exit 0. Each process draws its share of an epoch's tasks: under DDP, train_tasks / processes.
            share = (f"train_tasks={len(dataset)} is fewer than meta_batch_size={self.meta_batch_size}"
                     if sampler.num_replicas == 1 else
                     f"each of the {sampler.num_replicas} processes draws {len(sampler)} of an epoch's train_tasks="
                     f"{len(dataset)}, fewer than meta_batch_size={self.meta_batch_size}")
            raise ValueError(
                f"{type(self).__name__}: {share}, so a training epoch holds no whole batch and nothing would train. "
                f"Raise train_tasks to at least {self.meta_batch_size * sampler.num_replicas}, or lower meta_batch_size."
            )
        return (ResumableLoader if training else DataLoader)(
            dataset,
            batch_size=self.meta_batch_size,
            sampler=sampler,
            drop_last=training,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and training,
            pin_memory=torch.cuda.is_available(),
            # Worker seeds drawn from a generator of its own: drawn from the global one, at each
            # epoch, they would shift the random stream that a resumed run restores.
            generator=torch.Generator().manual_seed(self.seed) if training else None,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Scale ``uint8`` images to float on the device they were moved to (see
        :func:`~fewshot_lightning.data.task.scale_images`), in the floating type the trainer's
        precision asks for: Lightning converts a batch's floating tensors (``64-true``,
        ``bf16-true``, ``16-true``) before the transfer, when the images are still ``uint8``, so
        scaled ``float32`` images met ``float64`` or ``bfloat16`` weights ("Input type (float) and
        bias type (double) should be the same"). And float data of another type than the model's
        weights (``float64`` samples, as numpy makes them, under ``32-true`` or a mixed precision)
        in the weights' type, which stopped the first step with the same error."""
        if not isinstance(batch, TaskBatch):
            return batch
        scaled = scale_images(batch)
        trainer = self.trainer
        if trainer is None:
            return scaled
        converted = trainer.precision_plugin.convert_input(scaled)
        module = trainer.lightning_module
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None) if module else None
        if dtype is None or all(t.dtype == dtype or not t.is_floating_point() for t in converted):
            return converted
        return TaskBatch(*(t.to(dtype) if t.is_floating_point() else t for t in converted))

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

    def _resumable(self) -> bool:
        # Lightning may rebuild the loader with a sampler of its own (``overfit_batches``: a
        # SequentialSampler over the first tasks), which has no position to resume.
        return isinstance(self.sampler, EpisodeSampler)

    def __iter__(self):
        self._batches = self.sampler.start // self.batch_size if self._resumable() else 0
        return self._counted(super().__iter__())

    def _counted(self, batches):
        for batch in batches:
            self._batches += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        if not self._resumable():
            return {}
        tasks = self._batches * self.batch_size * self.sampler.num_replicas
        return {"epoch": self.sampler.epoch, "tasks": tasks}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state and self._resumable():
            self.sampler.resume(state["epoch"], state["tasks"])


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
        check_episode_shape(*train_shape)
        check_episode_shape(*test_shape, names=("test_ways", "test_shots", "test_queries"))
        self.episode_shape = {"train": train_shape, "val": test_shape, "test": test_shape}
        self._test_arguments_given = tuple(test is not None for test in (test_ways, test_shots, test_queries))

    def episode_arguments(self, split: str) -> Tuple[Tuple[str, str, str], Tuple[str, str, str]]:
        """The names of the arguments that set ``split``'s episode shape, and how to show them with
        their values in a message (a test argument left unset says it took the training value)."""
        values = self.episode_shape[split]
        if split == "train":
            names = ("ways", "shots", "queries")
            return names, tuple(f"{name} = {value}" for name, value in zip(names, values))
        names = ("test_ways", "test_shots", "test_queries")
        described = tuple(
            f"{name} = {value}" if given else f"{name} (not set, so {name[5:]} = {value})"
            for name, value, given in zip(names, values, self._test_arguments_given)
        )
        return names, described

    def episode_labels(self, split: str) -> Optional[Tensor]:
        """The class of every sample ``split``'s episodes are drawn from, for
        :meth:`check_episodes`; ``None`` where the DataModule cannot say (then not checked)."""
        return None

    def split_place(self, split: str) -> str:
        """How messages name where ``split``'s episodes come from."""
        return f"the {split} split"

    def class_name(self, label: int) -> str:
        """The name of class ``label`` in messages and :attr:`class_split`: the label itself,
        unless a subclass knows better (a folder name)."""
        return str(label)

    def more_samples_advice(self, needed: int) -> Optional[str]:
        """How to give every class ``needed`` samples, for the error that finds some have fewer;
        ``None``: drop the classes with fewer (the default advice)."""
        return None

    def more_classes_advice(self, splits: List[str]) -> str:
        """How to give ``splits`` more classes, for the error that finds they have too few."""
        return f"use a dataset whose {' and '.join(splits)} split{'s have' if len(splits) > 1 else ' has'} more classes"

    def check_episodes(self, splits: Iterable[str]) -> None:
        """Raise a ``ValueError`` naming every argument that asks ``splits`` for episodes they
        cannot hold (read from :meth:`episode_labels`); validation and test, shaped by the same
        ``test_*`` arguments, are checked together, so the advice fits both."""
        problems = []
        for group in (("train",), ("val", "test")):
            labels = {split: self.episode_labels(split) for split in group if split in splits}
            labels = {split: known for split, known in labels.items() if known is not None}
            if not labels:
                continue
            first = next(iter(labels))
            names, described = self.episode_arguments(first)
            split_of = {self.split_place(split): split for split in labels}
            problems += episode_shape_problems(
                {where: labels[split] for where, split in split_of.items()},
                *self.episode_shape[first], names=names, described=described,
                class_name=lambda label: f"class {self.class_name(label)}",
                more_classes=lambda wheres: self.more_classes_advice([split_of[where] for where in wheres]),
                more_samples=self.more_samples_advice,
            )
        if problems:
            raise ValueError(f"{type(self).__name__} cannot draw the requested episodes: "
                             + (self.too_few_classes() or " ".join(problems)))

    def too_few_classes(self) -> Optional[str]:
        """Where the requested episodes do not fit, what says why for the whole dataset at once
        (too few classes for the three splits together, whatever the split), in place of one
        piece of advice per split; ``None``: the per-split problems are the message."""
        return None


class LabelledDataModule(ClassificationDataModule):
    """Episodes over labelled data that is split by class: the base of every dataset's
    DataModule. A subclass loads the data in :meth:`load_splits` (usually one call of the
    dataset's ``load_<name>`` function); see ``docs/adding-a-dataset.md``.

    The first :meth:`setup` loads the splits and checks them before anything trains:

    * float data must be finite (:func:`~.episodes.check_finite`): one NaN pixel would turn
      the weights into NaN;
    * every split the stage uses (at ``fit``, the test split too) must hold the requested
      episodes; the error names the argument at fault (``test_ways``, not ``ways``) and the
      largest value that fits;
    * the class split is printed, kept in :attr:`class_split` and, when the Trainer has a
      logger, written to ``class_split.json`` in the run's log folder, beside ``config.yaml``.

    Args:
        train_transform: per-sample augmentation for training episodes only. It receives each
            sample as the data holds it (``uint8`` images: 0-255) and returns one of the same
            scale: ``uint8`` (scaled to ``[0, 1]`` on the device, as every batch), or a float in
            ``[0, 1]`` (``v2.ToDtype(torch.float32, scale=True)``); validation and test samples go
            through no transform, so a transform that rescales or normalises is refused at
            ``setup`` (:func:`check_train_transform`). Its random draws are seeded per task.
        **kwargs: the episode arguments of :class:`ClassificationDataModule` (``ways``,
            ``shots``, ``queries``, ``test_ways``, ...) and of :class:`TaskDataModule`
            (``meta_batch_size``, ``num_workers``, ``seed``, ...).
    """

    def __init__(self, train_transform: Optional[Transform] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_transform = train_transform
        self._splits: Optional[Dict[str, LabelledData]] = None
        #: After ``setup``: the names of each split's classes (see :meth:`class_name`), sorted by label.
        self.class_split: Optional[Dict[str, List[str]]] = None
        #: A checkpoint's saved state (its class split), once restored: see :meth:`load_state_dict`.
        self._checkpoint_state: Dict[str, Any] = {}

    def load_splits(self) -> Dict[str, LabelledData]:
        """The labelled data of the splits ``"train"``, ``"val"`` and ``"test"``, classes disjoint."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement load_splits(), returning {{'train': LabelledData(data, labels), "
            "'val': ..., 'test': ...}} with disjoint classes (see docs/adding-a-dataset.md).")

    def episode_labels(self, split: str) -> Optional[Tensor]:
        assert self._splits is not None, "setup loads the splits first"
        return self._splits[split].labels

    def data_source(self) -> str:
        """What identifies the data this DataModule reads, beyond its class (whose name keys its
        state in a checkpoint): a checkpoint's class split is compared with this run's only for
        the same source. Subclasses reading a folder or the user's tensors say which."""
        return type(self).__name__

    def class_identities(self) -> Optional[Dict[str, str]]:
        """Per class name, what identifies that class's data wherever it lies (a digest of its
        files), for data that may be copied or moved (:meth:`data_source` names a place): a
        checkpoint's classes whose identity matches a class of this run are the same classes
        in another place, and compared as such (:meth:`check_split_against`). ``None``: only
        the data source decides."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        """Saved in checkpoints: the class split the run trained on, and its data source."""
        if self.class_split is None:
            return {}
        state = {"class_split": self.class_split, "data_source": self.data_source()}
        identities = self.class_identities()
        if identities is not None:
            state["class_identities"] = identities
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """A checkpoint's class split, restored by ``Trainer.fit/validate/test(ckpt_path=...)``
        after ``setup``: checked against this run's (:meth:`check_split_against`)."""
        self._checkpoint_state = dict(state)
        if self.class_split is not None:
            self.check_split_against(self._checkpoint_state)
        self.write_pending_split_file()  # the split passed the check: the run folder records it

    def check_split_against(self, state: Dict[str, Any]) -> None:
        """Stop if this run's class split mixes the checkpoint's training classes with its own
        validation or test classes, either way: a test then scores classes the model trained on
        (a changed split_seed, a class folder added or removed since), and a resumed fit trains
        on classes the checkpoint's run held out. Only for the same data source."""
        saved = state.get("class_split")
        if not saved or self.class_split is None:
            return
        if state.get("data_source") != self.data_source():
            # Another place: the same data only for the classes whose files are the same (a copy
            # of the folder on a scratch disk); other data (a cross-domain test) is not compared.
            theirs, ours = state.get("class_identities"), self.class_identities()
            if not isinstance(theirs, dict) or ours is None:
                return
            same = {name for name, identity in theirs.items() if ours.get(name) == identity}
            if not same:
                return
            saved = {split: [name for name in names if name in same] for split, names in saved.items()}
        trained, held_out = set(saved.get("train", ())), set(saved.get("val", ())) | set(saved.get("test", ()))
        mixed = [(split, sorted(set(self.class_split.get(split, ())) & trained), "the checkpoint trained on")
                 for split in ("val", "test")]
        mixed.append(("train", sorted(set(self.class_split.get("train", ())) & held_out),
                      "the checkpoint's run held out for validation or test"))
        problems = [f"its {split} split holds {len(names)} class{'es' if len(names) > 1 else ''} {whose} "
                    f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" for split, names, whose in mixed if names]
        if problems:
            raise ValueError(
                f"{type(self).__name__}'s class split differs from the one the checkpoint was trained with: "
                + "; ".join(problems) + ". Its scores would not be few-shot scores on unseen classes. Use the data "
                "and split of the run that saved it (its config.yaml and class_split.json, in the run's folder: the "
                "same split_seed and split_fractions, the same class folders), or train a new run.")

    def setup(self, stage: Optional[str] = None) -> None:
        if self._splits is None:
            splits = self.load_splits()
            check_loaded_splits(type(self).__name__, splits)
            for split, (data, labels) in splits.items():
                check_finite(data, labels, f"The {split} split of {type(self).__name__}")
            # Once, on the first split that looks so (the others are the same data, as a rule).
            any(warn_raw_pixels(data, f"The {split} split of {type(self).__name__}") for split, (data, _) in splits.items())
            check_class_disjoint(type(self).__name__, splits)
            if self.train_transform is not None and "train" in splits:
                check_train_transform(splits["train"].data, self.train_transform, type(self).__name__)
            self._splits = splits
            self.class_split = {
                split: [self.class_name(label) for label in torch.unique(part.labels).tolist()]
                for split, part in splits.items()
            }
            rank_zero_info(describe_class_split(type(self).__name__, self.class_split))
            if self._checkpoint_state:
                self.check_split_against(self._checkpoint_state)
        self.check_episodes(CHECKED_SPLITS.get(stage, SPLITS))
        self.save_class_split()
        super().setup(stage)

    def save_class_split(self) -> None:
        """Write :attr:`class_split` to ``class_split.json`` in the Trainer's log folder, if it has one."""
        trainer = self.trainer
        if trainer is None or not trainer.loggers:
            return
        # On every rank: `log_dir` is a collective call under DDP (rank 0 broadcasts it).
        log_dir = trainer.log_dir
        if not log_dir or not trainer.is_global_zero:
            return
        path = Path(log_dir) / CLASS_SPLIT_FILE
        text = json.dumps({"datamodule": type(self).__name__, **self.class_split}, indent=1) + "\n"
        if path.is_file() and path.read_text() != text:
            # The run folder's record of another split (a resumed run's folder): written once a
            # checkpoint being restored has had its split checked (load_state_dict), or when the fit
            # starts (write_pending_split_file). A refused resume rewrote the only readable record
            # of the classes the run trained on.
            self._pending_split_file = (path, text)
            return
        self._write_split_file(path, text)

    def write_pending_split_file(self) -> None:
        """Write the class split :meth:`save_class_split` held back, if any (the learner calls
        this as the fit starts, after Lightning restored and checked the checkpoint)."""
        pending = getattr(self, "_pending_split_file", None)
        if pending is not None:
            self._write_split_file(*pending)

    def _write_split_file(self, path: Path, text: str) -> None:
        self._pending_split_file = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        rank_zero_info(f"Class split written to {path}.")

    def make_dataset(self, split: str, num_tasks: int, seed: int) -> EpisodeDataset:
        assert self._splits is not None, "setup loads the splits first"
        data, labels = self._splits[split]
        ways, shots, queries = self.episode_shape[split]
        return EpisodeDataset(
            data, labels, ways, shots, queries, num_tasks, seed,
            transform=self.train_transform if split == "train" else None, scale=False,
        )


def check_loaded_splits(owner: str, splits: Any) -> None:
    """Stop where ``owner.load_splits()`` did not return the three splits as :class:`LabelledData`
    (a dataset with train and test only failed at fit with a bare ``KeyError: 'val'``; plain
    ``(data, labels)`` tuples with "'tuple' object has no attribute 'labels'")."""
    if not isinstance(splits, dict):
        raise TypeError(f"{owner}.load_splits() must return a dict of the splits {', '.join(SPLITS)}, got a "
                        f"{type(splits).__name__}.")
    missing = [split for split in SPLITS if split not in splits]
    if missing:
        raise ValueError(
            f"{owner}.load_splits() returned the splits {', '.join(map(repr, splits)) or 'none'}, without "
            f"{', '.join(map(repr, missing))}: return all of {', '.join(SPLITS)}, each of its own classes (a dataset "
            "that comes with train and test only: hold out some of its training classes for validation, e.g. with "
            "split_by_class).")
    wrong = [split for split in SPLITS if not isinstance(splits[split], LabelledData)]
    if wrong:
        raise TypeError(
            f"{owner}.load_splits() returned {', '.join(f'{s!r} as a {type(splits[s]).__name__}' for s in wrong)}: give "
            "each split as LabelledData(data, labels) (from fewshot_lightning.data).")


def check_train_transform(data: Union[Tensor, Dataset], transform: Any, owner: str, samples: int = 8) -> None:
    """Stop if ``transform`` (training episodes only) puts samples on another scale than the
    one validation and test see, which go through no transform: ``uint8`` images turned into
    unscaled floats (``ToDtype(torch.float32)`` without ``scale=True``: 0-255 in training, [0, 1]
    in evaluation), or values far outside the data's own range (a normalisation, applied in
    training only). Read from the first ``samples`` samples (tensors, or a ``Dataset``'s
    tensors), with the global generators seeded and restored; the model would otherwise be
    scored on inputs of another kind than it trained on, with no error."""
    if isinstance(data, Tensor):
        raw = list(data[:samples])
    else:
        try:
            raw = [data[i][0] for i in range(min(samples, len(data)))]
        except Exception:  # the episodes name a Dataset of another form themselves
            return
    raw = [x for x in raw if isinstance(x, Tensor)]
    if not raw:
        return
    with seeded_globals(0):
        out = [transform(x) for x in raw]
    out = [y for y in out if isinstance(y, Tensor)]
    if not out:
        return

    def unit(x: Tensor) -> Tensor:  # what the model sees: uint8 scaled to [0, 1], floats as they are
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    seen = torch.cat([unit(x).flatten() for x in raw])
    made = torch.cat([unit(y).flatten() for y in out])
    low, high = float(seen.min()), float(seen.max())
    made_low, made_high = float(made.min()), float(made.max())
    where = f"{owner}'s train_transform"
    if raw[0].dtype == torch.uint8 and out[0].is_floating_point() and made_low > -0.5 and made_high > 1.5:
        raise ValueError(
            f"{where} turns uint8 images into floats from {made_low:g} to {made_high:g}, unscaled, while validation "
            "and test images (no transform) are scaled to [0, 1]: the model would train on 0-255 and be scored on "
            "0-1. Scale in the transform (torchvision: v2.ToDtype(torch.float32, scale=True)), or return uint8 "
            "(scaled to [0, 1] on the device, like every other batch).")
    if raw[0].dtype == torch.uint8 and all(y.dtype == torch.uint8 for y in out):
        return  # uint8 in, uint8 out: the same scale by construction (contrast stretching spans 0-255)
    margin = 0.5 * max(high - low, 1e-6) + 0.05
    if made_low < low - margin or made_high > high + margin:
        raise ValueError(
            f"{where} gives values from {made_low:.3g} to {made_high:.3g}, far outside the {low:.3g} to {high:.3g} "
            "that validation and test samples hold (they go through no transform): a normalisation applied in "
            "training only? The model would be scored on inputs of another scale than it trained on. Normalise "
            "inside the backbone (a first layer that subtracts the mean and divides by the deviation, run on every "
            "split), or normalise the data itself before passing it, and keep the transform to augmentation.")


def check_class_disjoint(owner: str, splits: Dict[str, LabelledData]) -> None:
    """Stop if two splits of ``owner.load_splits()`` share a class id: the splits of a few-shot
    benchmark hold different classes (a test of classes trained on is no few-shot test), and a
    class's id is its own across the splits (what the checkpoint's class split is compared by)."""
    ids = {split: set(torch.unique(part.labels).tolist()) for split, part in splits.items()}
    names = list(ids)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = sorted(ids[first] & ids[second])
            if shared:
                shown = ", ".join(map(str, shared[:5])) + (", ..." if len(shared) > 5 else "")
                raise ValueError(
                    f"{owner}.load_splits() gave {first} and {second} splits sharing {len(shared)} class id"
                    f"{'s' if len(shared) > 1 else ''} ({shown}): every class must be in one split only, with an id "
                    "of its own across the splits. If they are the same classes, take them out of one split; if "
                    "each split numbers its own classes from 0, renumber them apart (fewshot_lightning.data.datasets."
                    "_storage.relabel_splits, or an offset per split).")


def describe_class_split(owner: str, class_split: Dict[str, List[str]]) -> str:
    """``"<owner> class split (train/val/test: 6/2/2 classes):"`` and a line of names per split
    (the first 20 of a long split)."""
    counts = "/".join(str(len(names)) for names in class_split.values())
    lines = [f"{owner} class split ({'/'.join(class_split)}: {counts} classes):"]
    for split, names in class_split.items():
        more = f", ... ({len(names) - _SHOWN_CLASSES:,} more)" if len(names) > _SHOWN_CLASSES else ""
        lines.append(f"  {split}: {', '.join(names[:_SHOWN_CLASSES])}{more}")
    return "\n".join(lines)


class EpisodicDataModule(LabelledDataModule):
    """N-way K-shot Q-query episodes on labelled data you pass in: ``data`` is split by class
    with a seeded shuffle into class-disjoint train/val/test parts.

    Args:
        data: a tensor of samples or a ``Dataset`` of ``(x, y)`` pairs.
        labels: per-sample classes of ``data`` (read from ``data.targets`` if omitted).
        split_fractions: fractions of classes for train/val/test.
        split_seed: seed of the class shuffle, kept apart from ``seed`` (the episodes'), so that
            runs with other episode seeds train and test on the same classes.
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
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data = data
        self.labels = labels
        self.split_fractions = check_split_fractions(split_fractions)
        self.split_seed = split_seed

    def load_splits(self) -> Dict[str, LabelledData]:
        if self.data is None:
            raise ValueError(
                f"{type(self).__name__} got no data: pass `data=` (and `labels=`), or use a benchmark "
                "DataModule such as KanjiDataModule."
            )
        data, labels = labelled_input(self.data, self.labels, f"The data passed to {type(self).__name__}")
        # Before the split, so that the samples it names are indices into `data` as passed in.
        check_finite(data, labels, f"The data passed to {type(self).__name__}")
        return split_by_class(data, labels, self.split_fractions, self.split_seed)

    def more_classes_advice(self, splits: List[str]) -> str:
        return (
            f"give the {' and '.join(splits)} split{'s' if len(splits) > 1 else ''} a larger share of the classes "
            f"through split_fractions (now {list(self.split_fractions)}), or use data with more classes"
        )

    def data_source(self) -> str:
        """The user's data, by its sample count and a digest of its labels and (for a tensor or
        array of samples) of its shape and first and last samples: another dataset (a
        cross-domain test) is not compared with the checkpoint's split; the same one is."""
        if self._splits is None:
            return type(self).__name__
        labels = torch.cat([part.labels for part in self._splits.values()]).sort().values
        digest = hashlib.sha1(labels.numpy().tobytes())
        samples = torch.from_numpy(np.asarray(self.data)) if isinstance(self.data, np.ndarray) else self.data
        if isinstance(samples, Tensor) and len(samples):
            digest.update(str(tuple(samples.shape)).encode())
            for sample in (samples[0], samples[-1]):
                digest.update(sample.detach().cpu().contiguous().numpy().tobytes())
        return f"{type(self).__name__}: {len(labels)} samples, digest {digest.hexdigest()[:16]}"


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
