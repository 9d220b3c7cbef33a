"""Batched tensor operations on a meta-batch of episodes, shared by the metric- and model-based
learners: running a network on every task of a batch so that tasks stay independent, the
backbone's output shape, the number of ways, one-hot labels, and per-class sums and means of
support features.

Tasks are a tensor dimension throughout (no Python loop over tasks). Labels are shuffled within
each task, so class statistics are one-hot matrix products rather than slices; a matmul is also
deterministic on GPU, where ``scatter_add`` is not.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ..inner import call_with, tied_names
from ..models.blocks import TaskBatchNorm2d
from .base import TaskShapeError

#: How batch norm normalises a task (the learners' ``batch_norm_stats`` argument):
#: ``"task"``: with the statistics of the task's own images, in training and evaluation alike
#: (transductive: a query's output depends on the other images of its task, never on other
#: tasks); ``"running"``: with the task's own statistics in training, and with running
#: averages in evaluation (``model.eval()``, each image normalised on its own).
BATCH_NORM_STATS = ("task", "running")
_RUNNING_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

#: A head this narrow is a classifier's (``Conv4``'s default has 5 units), not an embedding: the
#: papers' narrowest embedding is 64 (Conv4 on 28x28 images).
NARROW_EMBEDDING = 16


def check_batch_norm_stats(learner: str, batch_norm_stats: str, network: nn.Module) -> str:
    """Validate a learner's ``batch_norm_stats`` against ``network``'s batch-norm layers."""
    if batch_norm_stats not in BATCH_NORM_STATS:
        raise ValueError(f"batch_norm_stats must be one of {BATCH_NORM_STATS}, got {batch_norm_stats!r}.")
    if batch_norm_stats == "running":
        untracked = [name for name, m in network.named_modules() if isinstance(m, _BatchNorm) and not m.track_running_stats]
        if untracked:
            raise ValueError(
                f"{learner} evaluates with running batch-norm statistics (batch_norm_stats='running'), but the "
                f"backbone's batch norm {untracked[0]!r} keeps none: build the backbone with "
                f"track_running_stats=True, or pass batch_norm_stats='task' to normalise every task with its own "
                f"statistics in evaluation too."
            )
    return batch_norm_stats


def per_task(network: nn.Module, inputs: Tensor, batch_norm_stats: str) -> Tensor:
    """``network`` on every task of ``inputs`` ``[B, M, *x]`` on its own: ``[B, M, *y]``.

    A task's outputs never depend on the other tasks of the batch. Networks without batch norm
    see one plain batch ``[B * M, *x]``. The backbones of :mod:`fewshot_lightning.models` take
    the tasks as a dimension and normalise each with its own statistics in one call
    (:class:`~fewshot_lightning.models.blocks.TaskBatchNorm2d`). Any other network with batch
    norm runs once per task under ``torch.func.vmap`` (one batched computation, about 1.5x
    slower); in training with running averages, each task updates its own copy of them and
    the network's averages become the mean of the copies, the rule of ``TaskBatchNorm2d``.

    ``batch_norm_stats="task"`` (see :data:`BATCH_NORM_STATS`) hides the running averages, so
    batch norm uses the task's own statistics even in evaluation and updates nothing.
    """
    norms = [m for m in network.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return one_tensor(network(inputs.flatten(0, 1)), network).unflatten(0, inputs.shape[:2])
    return one_tensor(_per_task_with_norms(network, inputs, batch_norm_stats, norms), network)


def one_tensor(outputs: Any, network: nn.Module) -> Tensor:
    """``outputs`` if it is a tensor; otherwise a :class:`TaskShapeError` naming what
    ``network`` returned and the fix (a backbone that returns ``(logits, features)``)."""
    if isinstance(outputs, Tensor):
        return outputs
    raise TaskShapeError(not_one_tensor(outputs, network))


def not_one_tensor(outputs: Any, network: nn.Module) -> str:
    kind = type(outputs).__name__ + (f" of {len(outputs)}" if isinstance(outputs, (tuple, list, dict)) else "")
    return (f"The backbone {type(network).__name__} returned a {kind}, where the learners read one tensor per "
            "batch of samples (its outputs: class scores, features or predictions). Return one tensor from its "
            "forward, or wrap it in a module whose forward returns the part to use (e.g. backbone(x)[0]).")


def _per_task_with_norms(network: nn.Module, inputs: Tensor, batch_norm_stats: str, norms: List[nn.Module]) -> Any:
    hidden = running_buffers(network) if batch_norm_stats == "task" else {}
    state: Dict[str, Optional[Tensor]] = dict.fromkeys(hidden)
    if all(isinstance(m, TaskBatchNorm2d) for m in norms):
        return call_with(network, state, (inputs,), tied=tied_names(network)) if state else network(inputs)
    copies = {}
    if network.training and not state:
        tasks = inputs.shape[0]
        copies = {name: b.expand(tasks, *b.shape).clone() for name, b in running_buffers(network).items()}

    tied = tied_names(network)

    def one_task(task_copies: Dict[str, Tensor], x: Tensor) -> Tensor:
        return call_with(network, {**state, **task_copies}, (x,), tied=tied)

    outputs = vmap(one_task, randomness="different")(copies, inputs)
    with torch.no_grad():
        for name, copy in copies.items():
            buffer = network.get_buffer(name)
            buffer.copy_(copy.mean(0) if buffer.is_floating_point() else copy[0])
    return outputs


def running_buffers(network: nn.Module) -> Dict[str, Tensor]:
    """The running averages (and their counters) of every batch-norm layer, by buffer name."""
    buffers = {}
    for module_name, module in network.named_modules():
        if isinstance(module, _BatchNorm):
            for buffer in _RUNNING_BUFFERS:
                if getattr(module, buffer, None) is not None:
                    buffers[f"{module_name}.{buffer}" if module_name else buffer] = getattr(module, buffer)
    return buffers


def embed_episodes(
    backbone: nn.Module, support_x: Tensor, query_x: Tensor, batch_norm_stats: str, together: bool = True
) -> Tuple[Tensor, Tensor]:
    """Embed ``support_x`` ``[B, S, *x]`` and ``query_x`` ``[B, Q, *x]``, every task on its own
    (:func:`per_task`): ``[B, S, *e]`` and ``[B, Q, *e]``.

    ``together``: support and query images of a task go through the backbone in one call, so
    with batch statistics they share one set, the task's, as in the usual episodic training of
    metric-based methods (ProtoNets' code concatenates them). ``False``: in two calls, the
    support set and the query set each normalised with its own statistics, as Relation
    Networks' code (floodsung/LearningToCompare_FSL) embeds them.
    """
    if not together:
        return per_task(backbone, support_x, batch_norm_stats), per_task(backbone, query_x, batch_norm_stats)
    shots = support_x.shape[1]
    features = per_task(backbone, torch.cat([support_x, query_x], dim=1), batch_norm_stats)
    return features[:, :shots], features[:, shots:]


def output_shape(backbone: nn.Module, learner: str) -> Tuple[int, ...]:
    """The shape of one sample's output, from the backbone's ``output_shape`` attribute."""
    shape = getattr(backbone, "output_shape", None)
    if shape is None:
        raise ValueError(
            f"{learner} sizes its layers from the backbone's output, but {type(backbone).__name__} does not "
            f"say its output shape: give it an `output_shape` attribute, the shape of one sample's output "
            f"(e.g. (64,) for 64-d embeddings), as the backbones in fewshot_lightning.models have."
        )
    return tuple(int(size) for size in shape)


def embedding_size(backbone: nn.Module, learner: str) -> int:
    """Size of the backbone's flattened output (the learners flatten feature maps)."""
    return math.prod(output_shape(backbone, learner))


def check_embedding_width(features: Tensor, expected: int, learner: str) -> None:
    """Refuse flattened embeddings ``[B, M, D]`` whose ``D`` is not the ``expected`` width the
    learner sized its layers by (the backbone's ``output_shape``): the layers' own error ("mat1
    and mat2 shapes cannot be multiplied", an LSTM's "input.size(-1) must be equal to
    input_size") named neither the backbone nor the fix."""
    if features.shape[-1] != expected:
        raise TaskShapeError(
            f"{learner} sized its layers for embeddings of {expected} values (the backbone's output_shape), but "
            f"the backbone returned {features.shape[-1]} per sample for these inputs: make its output_shape "
            "say what it returns (for a built-in backbone, build it for this input size).")


def warn_if_narrow(backbone: nn.Module, learner: str) -> None:
    """Warn when the backbone's head narrows its features (``feature_dim``) to a classifier's
    width (issue 10: ProtoNet on Conv4's default 5-unit head scored 96.3% on Kanji, 98.3%
    without it). A headless default would move the silent failure to MAML, which would then
    read 64 ReLU features as the logits of a 5-way task."""
    shape, features = getattr(backbone, "output_shape", None), getattr(backbone, "feature_dim", None)
    if shape is None or features is None:
        return
    width = math.prod(shape)
    if width < NARROW_EMBEDDING and width < features:
        warnings.warn(
            f"{learner} embeds images with the backbone's output, which has only {width} dimensions: its head "
            f"narrows {features} features to a classifier's width. Build the backbone with out_features=None to "
            f"embed into its {features} features.",
            stacklevel=3,
        )


def num_ways(support_y: Tensor) -> int:
    """N, the number of classes of the tasks in a batch: ``1 + max(support_y)``.

    Every task of a batch has the same N (they are stacked into one tensor) and, by the episode
    contract, each of its labels ``0..N-1`` appears in the support set, so the largest label
    fixes N. It cannot come from the shapes alone (``N * K`` does not split into N and K), and
    reading it from the labels lets training and evaluation use different N with one model.
    On a GPU this costs one device-to-host sync per step, which also reads whether the contract
    holds: every task's support labels are ``0..N-1`` with none missing (a hand-built batch
    labelled ``1..N`` had a phantom class 0, whose all-zero prototype still competed for the
    queries, and no error).
    """
    ordered = support_y.sort(dim=-1).values
    largest = ordered[:, -1]
    proper = (ordered[:, 0] == 0) & (ordered.diff(dim=-1) <= 1).all(dim=-1) & (largest == largest.max())
    ways, holds = torch.stack([largest.max(), proper.all()]).tolist()
    if not holds:
        task = int((~proper).nonzero()[0])
        labels = sorted(set(support_y[task].tolist()))
        raise TaskShapeError(
            f"The support labels of task {task} are {labels}: every task's classes must be labelled 0..N-1, each "
            f"present in its support set, with the same N in every task of a batch (here N would be {ways + 1}), "
            "or a class gets no support example. Relabel each task, e.g. "
            "`support_y, query_y = torch.unique(support_y, return_inverse=True)[1], ...` mapping the query labels "
            "alike; the episode DataModules do this.")
    return ways + 1


def one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """``[B, M]`` integer labels to ``[B, M, ways]`` one-hot rows of ``dtype``."""
    return F.one_hot(labels, ways).to(dtype)


def class_sums(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Sum of the ``[B, M, *f]`` features of each class: ``[B, ways, *f]``."""
    targets = one_hot(labels, ways, features.dtype)
    sums = targets.transpose(1, 2) @ features.flatten(2)
    return sums.reshape(*sums.shape[:2], *features.shape[2:])


def class_means(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean of the ``[B, M, *f]`` features of each class: ``[B, ways, *f]``.

    A class absent from a task's labels would divide by zero; the count is clamped to one so it
    gets a zero mean rather than NaNs that would poison the whole batch's gradient.
    """
    counts = one_hot(labels, ways, features.dtype).sum(1).clamp_min(1.0)
    sums = class_sums(features, labels, ways)
    return sums / counts.reshape(*counts.shape, *([1] * (features.dim() - 2)))
