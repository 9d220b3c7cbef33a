"""Batched tensor operations on a meta-batch of episodes, shared by the metric- and model-based
learners: one backbone call for every image of every task, the number of ways, one-hot labels,
and per-class sums and means of support features.

Tasks are a tensor dimension throughout (no Python loop over tasks). Labels are shuffled within
each task, so class statistics are one-hot matrix products rather than slices; a matmul is also
deterministic on GPU, where ``scatter_add`` is not.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def embed_episodes(backbone: nn.Module, support_x: Tensor, query_x: Tensor) -> Tuple[Tensor, Tensor]:
    """Embed ``support_x`` ``[B, S, *x]`` and ``query_x`` ``[B, Q, *x]`` in one backbone call.

    The backbone sees a plain batch ``[B * (S + Q), *x]`` (so an ``nn.Flatten`` + ``nn.Linear``
    works as well as :class:`~fewshot_lightning.models.Conv4`); its output ``[B * (S + Q), *e]``
    is split back into ``[B, S, *e]`` and ``[B, Q, *e]``. With a batch-norm backbone that keeps no
    running statistics, support and query share one set of batch statistics, as in the usual
    episodic training of metric-based methods.
    """
    tasks, shots = support_x.shape[:2]
    images = torch.cat([support_x, query_x], dim=1)
    features = backbone(images.flatten(0, 1))
    features = features.reshape(tasks, images.shape[1], *features.shape[1:])
    return features[:, :shots], features[:, shots:]


def num_ways(support_y: Tensor) -> int:
    """N, the number of classes of the tasks in a batch: ``1 + max(support_y)``.

    Every task of a batch has the same N (they are stacked into one tensor) and, by the episode
    contract, each of its labels ``0..N-1`` appears in the support set, so the largest label
    fixes N. It cannot come from the shapes alone (``N * K`` does not split into N and K), and
    reading it from the labels lets training and evaluation use different N with one model.
    On a GPU this costs one device-to-host sync per step.
    """
    return int(support_y.max()) + 1


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
