"""Map-style datasets of tasks, and the sampler that walks them.

Task ``i`` of epoch ``e`` is drawn from uniforms that depend only on ``(seed, e, i)``
(:mod:`.seeding`). The :class:`EpisodeSampler` hands out the indices ``e * num_tasks + i``,
split across DDP ranks; DataLoader workers split those further. So a run is reproducible
whatever the number of workers, every epoch sees new tasks, and every rank sees different
ones. Validation and test use a fixed sampler: the same episodes at every evaluation.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Subset

from .._text import listed
from .seeding import sampling_seed, seeded_globals, task_uniforms, tasks_uniforms
from .task import TaskBatch, collate_tasks, to_unit_float

Transform = Callable[[Tensor], Tensor]
#: Values per block of :func:`check_finite`: its temporary boolean mask stays at 16 MiB.
_FINITE_BLOCK = 16 * 1024 * 1024


class LabelledData(NamedTuple):
    """Samples and their integer class labels. ``data`` is a tensor indexed along dim 0, or a
    ``Dataset`` whose items are ``(x, y)`` pairs."""

    data: Union[Tensor, Dataset]
    labels: Tensor


class TaskDataset(Dataset):
    """Base class: index -> one task, whose randomness is :meth:`uniforms` of that index.

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

    def uniforms(self, index: int, count: int) -> np.ndarray:
        """All the randomness of task ``index``: ``count`` uniforms in ``[0, 1)`` that depend only
        on ``(seed, epoch, task)`` (see :func:`~fewshot_lightning.data.seeding.task_uniforms`)."""
        epoch, task = divmod(int(index), self.num_tasks)
        return task_uniforms(self.seed, epoch, task, count)

    def sampling_seed(self, index: int) -> int:
        """The seed that the global generators are seeded with while task ``index``'s samples
        are made (:func:`~fewshot_lightning.data.seeding.seeded_globals`): a transform's random
        draws depend only on ``(seed, epoch, task)`` too."""
        epoch, task = divmod(int(index), self.num_tasks)
        return sampling_seed(self.seed, epoch, task)

    def uniforms_of(self, indices: Sequence[int], count: int) -> np.ndarray:
        """:meth:`uniforms` of several tasks at once, ``[len(indices), count]`` (the same numbers,
        row by row; :func:`~fewshot_lightning.data.seeding.tasks_uniforms`)."""
        return tasks_uniforms(self.seed, (divmod(int(index), self.num_tasks) for index in indices), count)

    def __getitem__(self, index: int) -> TaskBatch:
        """Task ``index`` as unbatched tensors ``(support_x, support_y, query_x, query_y)``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement __getitem__(index): task index as a TaskBatch of unbatched "
            "tensors (support_x, support_y, query_x, query_y), its randomness drawn from self.uniforms(index, count).")


def labels_of(data: Union[Tensor, Dataset]) -> Tensor:
    """The integer labels of a dataset, without loading samples where the dataset knows them."""
    for name in ("targets", "labels", "_labels"):
        labels = getattr(data, name, None)
        if labels is not None:
            return class_ids(labels, f"{type(data).__name__}.{name}")
    warnings.warn(
        f"{type(data).__name__} has no `targets` or `labels` attribute: reading every sample once to "
        "learn its label. Pass `labels=` to skip this.",
        stacklevel=3,
    )
    return class_ids([data[i][1] for i in range(len(data))], f"the labels of {type(data).__name__}'s samples")


def class_ids(labels, what: str = "labels") -> Tensor:
    """``labels`` as a 1-D ``int64`` CPU tensor of class ids, or a ``ValueError`` naming what is
    wrong with them and the fix: names instead of ids, one-hot or other 2-D labels, and float
    labels that are not whole numbers (truncated, 0.5 and 0 would be one class)."""
    if isinstance(labels, Tensor):
        values = labels.detach().cpu()
    else:
        if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], Tensor):
            labels = [int(v) if v.numel() == 1 else v.tolist() for v in labels]
        array = np.asarray(labels)
        if array.dtype.kind == "O":
            try:
                array = array.astype(np.int64)
            except (TypeError, ValueError):
                array = array.astype(str)
        if array.dtype.kind in "US":
            raise ValueError(
                f"{what} are names ({', '.join(map(repr, array.reshape(-1)[:3].tolist()))}, ...), not integer class "
                "ids. Map them to ids first, e.g. `names, ids = numpy.unique(labels, return_inverse=True)`, and pass "
                "`ids`.")
        values = torch.as_tensor(array)
    if values.dim() != 1:
        hint = (" For one-hot labels pass `labels.argmax(1)`." if values.dim() == 2 else "")
        raise ValueError(f"{what} must be one integer class id per sample (1-D), got shape {list(values.shape)}.{hint}")
    if values.is_complex():
        raise ValueError(f"{what} must be integer class ids, got {values.dtype}.")
    if values.is_floating_point():
        whole = torch.isfinite(values) & (values == values.round())
        if not bool(whole.all()):
            index = int((~whole).nonzero()[0])
            raise ValueError(
                f"{what} must be integer class ids, but sample {index}'s is {values[index].item()}: casting would "
                "truncate it and merge classes. Pass integer ids (e.g. from `numpy.unique(labels, "
                "return_inverse=True)`); episodes of float targets are regression, which these classification "
                "episodes are not (see SinusoidDataModule, or a DataLoader of your own TaskBatch).")
    return values.to(torch.long)


def labelled_input(data, labels, what: str) -> Tuple[Union[Tensor, Dataset], Tensor]:
    """``(data, labels)`` as the episode samplers read them: a numpy array of samples becomes a
    tensor (as a ``Dataset`` each sample would be read as an ``(x, y)`` pair, its first row taken
    for ``x``); samples on an accelerator, or a list of tensors, are refused with the fix; the
    labels are :func:`class_ids`, one per sample."""
    if isinstance(data, np.ndarray):
        if data.dtype.kind not in "biuf":
            raise ValueError(f"{what}: a numpy array of samples must be numeric, got dtype {data.dtype}.")
        data = torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, Tensor) and data.device.type != "cpu":
        raise ValueError(
            f"{what}: the samples are on {data.device}; pass them on the CPU (`data.cpu()`): episodes are drawn "
            "on the CPU, and the Trainer moves each batch to its device.")
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (Tensor, np.ndarray)):
        raise ValueError(
            f"{what}: the samples are a {type(data).__name__} of arrays, which would be read as (x, y) pairs; pass "
            "one tensor, `torch.stack(samples)`, with `labels=`.")
    labels = labels_of(data) if labels is None else class_ids(labels)
    if len(labels) != len(data):
        raise ValueError(f"{what}: got {len(labels)} labels for {len(data)} samples; they must match one to one.")
    return data, labels


class EpisodeDataset(TaskDataset):
    """N-way K-shot Q-query classification episodes over any labelled data.

    Args:
        data: a tensor of samples (indexed along dim 0) or a ``Dataset`` of ``(x, y)`` pairs.
        labels: integer class of each sample; read from ``data.targets`` / ``data.labels`` if
            omitted. Class ids need not be contiguous.
        ways, shots, queries: N, K and Q. Support and query samples of a task never overlap.
        num_tasks: tasks per epoch.
        seed: base seed; task ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.
        transform: applied to each sample (e.g. augmentation), with the global generators of
            torch, numpy and Python seeded for each task from ``(seed, e, i)``, so that random
            augmentation keeps the contract above. ``uint8`` tensors with no transform are
            scaled to ``float32`` in ``[0, 1]``...
        scale: ... unless ``scale=False``: then ``uint8`` samples stay ``uint8`` (a quarter of
            the bytes to copy between processes and to the device), and whoever receives the
            batch scales them (:func:`~fewshot_lightning.data.task.scale_images`); the
            DataModules do this after moving each batch to the device.

    The values of ``data`` are not checked here: the DataModules check float data once when
    they load it (:func:`check_finite`), which is what to call on data used directly.

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
        scale: bool = True,
    ) -> None:
        super().__init__(num_tasks, seed)
        data, labels = labelled_input(data, labels, type(self).__name__)
        self.data = data
        self.scale = scale
        check_episode_shape(ways, shots, queries)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.transform = transform

        problems = episode_shape_problems({"the data": labels}, ways, shots, queries)
        if problems:
            raise ValueError(" ".join(problems))
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self.classes = classes
        needed = shots + queries
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
        if not self._tensor_data and len(data):
            self._sample(0)  # a Dataset's items are checked on one of them now, not in a worker's first batch

    def __getitem__(self, index: int) -> TaskBatch:
        drawn = self._draw(self.uniforms(index, self.draws))
        if self._tensor_data and self.transform is None:
            return self._task(*drawn)
        # A transform (or a Dataset's own) may draw from the global generators: seeded per task.
        with seeded_globals(self.sampling_seed(index)):
            return self._task(*drawn)

    def __getitems__(self, indices: Sequence[int]) -> TaskBatch:
        # The DataLoader asks for a whole meta-batch here: one gather (and one uint8 -> float
        # conversion) for all its tasks instead of one per task plus a stack.
        if not self._tensor_data or self.transform is not None:
            return collate_tasks([self[i] for i in indices])
        drawn = [self._draw(uniforms) for uniforms in self.uniforms_of(indices, self.draws)]
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
        # times slower for a few dozen rows.
        samples = self.data.index_select(0, torch.from_numpy(indices))
        return to_unit_float(samples) if self.scale else samples

    def _samples(self, indices: np.ndarray) -> Tensor:
        """Samples one by one: through ``transform``, or from a ``Dataset`` of pairs."""
        if self._tensor_data:
            samples = self.data.index_select(0, torch.from_numpy(indices))
            return torch.stack([self.transform(s) for s in samples])
        return torch.stack([self._sample(int(i)) for i in indices])

    def _sample(self, index: int) -> Tensor:
        """Sample ``index`` of a ``Dataset`` of ``(x, y)`` pairs, through ``transform``, as a
        tensor; an item of another form is named with the fix."""
        item = self.data[index]
        data, position = self.data, index
        while isinstance(data, Subset):  # name the user's dataset, not the split's view of it
            data, position = data.dataset, int(data.indices[position])
        where = f"{type(data).__name__}[{position}]"
        if isinstance(item, dict):
            raise TypeError(
                f"{where} is a dict (keys {sorted(map(str, item))[:5]}); episodes read a Dataset of (x, y) pairs, "
                "x first. Wrap it: a Dataset whose __getitem__ returns (item['image'], item['label']), say.")
        if not isinstance(item, (tuple, list)) or not item:
            raise TypeError(
                f"{where} is a {type(item).__name__}; episodes read a Dataset of (x, y) pairs, x first (the labels "
                "come from its `targets`, or `labels=`). Return (x, y) from __getitem__, or pass the samples as one tensor.")
        x = item[0] if self.transform is None else self.transform(item[0])
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{where} holds a {type(x).__module__}.{type(x).__name__}, not a tensor: give the dataset a transform "
                "that makes one (torchvision: transform=transforms.ToTensor(), or transforms.PILToTensor() to keep "
                "uint8), or pass transform= here.")
        return x


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


def check_episode_shape(ways: int, shots: int, queries: int,
                        names: Sequence[str] = ("ways", "shots", "queries")) -> None:
    """Raise a ``ValueError`` naming the bad number if an N-way K-shot Q-query request is
    impossible; ``names``: the arguments that gave the three (``test_ways``, ... for a test shape)."""
    for name, kind, value in zip(names, ("ways", "shots", "queries"), (ways, shots, queries)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be a whole number of {'classes' if kind == 'ways' else 'samples per class'}, "
                            f"got {value!r} ({type(value).__name__}).")
    if ways < 2:
        raise ValueError(f"{names[0]} must be at least 2 for a classification task, got {ways}.")
    if shots < 1:
        raise ValueError(f"{names[1]} must be at least 1, got {shots}.")
    if queries < 1:
        raise ValueError(f"{names[2]} must be at least 1, got {queries}.")


def episode_shape_problems(
    parts: Mapping[str, Tensor],
    ways: int,
    shots: int,
    queries: int,
    names: Sequence[str] = ("ways", "shots", "queries"),
    described: Optional[Sequence[str]] = None,
    class_name: Callable[[int], str] = "class {}".format,
    more_classes: Callable[[List[str]], str] = lambda wheres: "use data with more classes",
    more_samples: Optional[Callable[[int], str]] = None,
) -> List[str]:
    """Why ``ways``-way ``shots``-shot ``queries``-query episodes cannot be drawn from every one
    of ``parts`` (``{"the val split": labels, ...}``, the parts these arguments shape), one
    sentence per problem; an empty list if they can.

    Each sentence names the argument at fault (``names``, shown as ``described``, e.g.
    ``"test_ways (not set, so ways = 60)"``) and advice that can be followed: the largest
    value that fits every part, or ``more_classes(parts at fault)`` when not even the smallest
    episode, 2-way 1-shot 1-query, fits; ``more_samples(n)``, if given, says how to give every
    class ``n`` samples (else: drop the classes with fewer).
    """
    ways_name, shots_name, queries_name = names
    values = (ways, shots, queries)
    ways_shown, shots_shown, queries_shown = described or [f"{name} = {value}" for name, value in zip(names, values)]
    counted = {where: torch.unique(labels, return_counts=True) for where, labels in parts.items()}
    problems = []

    one_class = [where for where, (classes, _) in counted.items() if len(classes) < 2]
    for where in one_class:
        found = len(counted[where][0])
        problems.append(
            f"{where} has {found} class{'' if found == 1 else 'es'}, and an episode needs at least 2: "
            f"{more_classes([where])}."
        )
    sizes = {where: len(classes) for where, (classes, _) in counted.items() if where not in one_class}
    too_few = [where for where, size in sizes.items() if size < ways]
    if too_few:
        found = " and ".join(f"{where} has only {sizes[where]} classes" for where in too_few)
        problems.append(
            f"{ways_shown}, but {found}: set {ways_name} to at most {min(sizes.values())}, or {more_classes(too_few)}."
        )

    # Classes of one sample fit no episode at all; the others fit when shots + queries <= count.
    needed = shots + queries
    lonely, short, smallest = [], [], None
    for where, (classes, counts) in counted.items():
        alone = classes[counts < 2]
        if len(alone):
            shown = ", ".join(class_name(int(c)) for c in alone[:5]) + (", ..." if len(alone) > 5 else "")
            lonely.append((len(alone), f"{len(alone)} of the {len(classes)} classes of {where} ({shown})"))
        elif (counts < needed).any():
            fewer = int((counts < needed).sum())
            short.append((fewer, f"{fewer} of the {len(classes)} classes of {where}"))
            if smallest is None or int(counts.min()) < smallest[0]:
                named = class_name(int(classes[counts.argmin()])) + (f" of {where}" if len(parts) > 1 else "")
                smallest = (int(counts.min()), named)
    if lonely:
        which = " and ".join(text for _, text in lonely)
        problems.append(
            f"{which} {'has' if sum(n for n, _ in lonely) == 1 else 'have'} a single sample, and every class needs at "
            "least 2 (a support and a query sample): "
            + ((more_samples and more_samples(2)) or "drop those classes or add samples to them") + "."
        )
    elif short:
        which = " and ".join(text for _, text in short)
        fewest, fewest_class = smallest
        problems.append(
            f"{shots_shown} and {queries_shown} need {needed} samples per class, but {which} "
            f"{'has' if sum(n for n, _ in short) == 1 else 'have'} fewer (the smallest, {fewest_class}, has {fewest}): "
            f"lower {shots_name} and {queries_name} to sum to at most {fewest}, or "
            + ((more_samples and more_samples(needed)) or f"drop the classes with fewer than {needed} samples") + "."
        )
    return problems


def warn_raw_pixels(data: Union[Tensor, Dataset], what: str = "The data") -> bool:
    """Warn if float ``data`` looks like raw 0-255 pixel values (whole numbers, none negative,
    some above 1, in its first million values): the models expect images in ``[0, 1]``, which
    ``uint8`` images are scaled to, and float data is used as given (a training loss in the
    thousands, and no error). Standardised data (negative values) and ``[0, 1]`` data pass.
    Returns whether it warned."""
    if not isinstance(data, Tensor) or not data.is_floating_point() or len(data) == 0:
        return False
    rows = max(1, _FINITE_BLOCK // 16 // max(1, data[0].numel()))
    sample = data[:rows]
    if float(sample.amin()) >= 0 and float(sample.amax()) > 1.5 and bool((sample == sample.round()).all()):
        warnings.warn(
            f"{what} is float with whole values from {float(sample.amin()):g} to {float(sample.amax()):g}: raw 0-255 "
            "pixels? Floats are used as given, and the models expect images in [0, 1] (uint8 images are scaled to "
            "it): divide by 255, or pass the images as uint8.", stacklevel=3)
        return True
    return False


def check_finite(data: Union[Tensor, Dataset], labels: Tensor, what: str = "The data") -> None:
    """Raise a ``ValueError`` if float ``data`` holds NaN or infinite values, naming how many,
    in which samples (the first five, with their classes) and what to do.

    One such value in one sample turns every weight into NaN at the first step that draws
    it (a NaN input gives a NaN loss, and its gradient reaches every parameter). Integer data
    (decoded images) cannot hold one, and a ``Dataset`` of pairs is not read here; a float
    tensor costs one ``isfinite`` pass, in blocks of 16M values to bound the memory.
    """
    if not isinstance(data, Tensor) or not (data.is_floating_point() or data.is_complex()) or len(data) == 0:
        return
    rows = max(1, _FINITE_BLOCK // max(1, data[0].numel()))
    blocks = (data[start : start + rows] for start in range(0, len(data), rows))
    bad_values = torch.cat([(~torch.isfinite(block)).reshape(len(block), -1).sum(1) for block in blocks])
    samples = bad_values.nonzero().flatten()
    if not len(samples):
        return
    total = int(bad_values.sum())
    shown = listed([f"sample {i} (class {int(labels[i])})" for i in samples.tolist()], 5)
    raise ValueError(
        f"{what} holds {total:,} non-finite value{'' if total == 1 else 's'} (NaN or infinity) in {len(samples):,} "
        f"of its {len(data):,} samples: {shown}. One is enough to make every weight NaN at the first training "
        "step that draws it. Repair or drop those samples before training, e.g. "
        "`keep = torch.isfinite(data).reshape(len(data), -1).all(1)`, then use `data[keep]` and `labels[keep]`."
    )


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
