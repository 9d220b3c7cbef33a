"""Prototypical Networks: classify a query by its distance to each class's mean support embedding."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..data.task import TaskBatch
from .base import MetaLearner
from .episode_ops import check_batch_norm_stats, class_means, embed_episodes, num_ways, warn_if_narrow

DISTANCES = ("euclidean", "cosine")


class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot
    Learning", NeurIPS 2017).

    Each class's prototype is the mean embedding of its support samples; a query's logit for a
    class is ``-scale * ||f(x) - prototype||^2`` (``distance="euclidean"``, the paper's choice)
    or ``scale * cos(f(x), prototype)`` (``"cosine"``). Nothing fixes the number of ways N: it
    is read from each batch's labels (see :func:`~.episode_ops.num_ways`), so a model trained
    20-way evaluates 5-way, as in the paper's Omniglot experiments. Backbone outputs with more
    than one dimension (feature maps) are flattened to vectors.

    Batch norm: every task is normalised on its own, never with the other tasks of its batch
    (:func:`~.episode_ops.per_task`). By default (``batch_norm_stats="running"``) evaluation
    uses running statistics, as the paper's code does (``model.eval()``), so a query's
    prediction depends on the support set and itself only; ``"task"`` normalises evaluation
    tasks with their own batch statistics (transductive).

    Args:
        backbone: the embedding network, e.g.
            ``Conv4(out_features=None, track_running_stats=True)``.
        distance: ``"euclidean"`` (squared) or ``"cosine"``.
        scale: positive multiplier of the logits (an inverse softmax temperature). Default
            ``None``: 1 for ``"euclidean"`` (the paper), 10 for ``"cosine"``, whose values in
            ``[-1, 1]`` otherwise give a nearly uniform softmax.
        learn_scale: train ``scale`` with the backbone (kept positive through its logarithm).
        batch_norm_stats: ``"running"`` or ``"task"`` (see
            :data:`~.episode_ops.BATCH_NORM_STATS`).
        optimizer, lr_scheduler: see :class:`~.base.MetaLearner`.

    Example::

        import lightning as L
        import torch
        from fewshot_lightning.algorithms import ProtoNet
        from fewshot_lightning.data import EpisodicDataModule
        from fewshot_lightning.models import Conv4

        images, labels = torch.rand(100 * 20, 1, 28, 28), torch.arange(100).repeat_interleave(20)
        data = EpisodicDataModule(images, labels, ways=20, shots=1, queries=5, test_ways=5,
                                  meta_batch_size=4, train_tasks=40, num_workers=0)
        model = ProtoNet(Conv4(out_features=None, track_running_stats=True))
        L.Trainer(max_steps=10, logger=False).fit(model, data)
    """

    task_kinds = ("classification",)

    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "euclidean",
        scale: Optional[float] = None,
        learn_scale: bool = False,
        batch_norm_stats: str = "running",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
        self.distance = distance
        self.batch_norm_stats = check_batch_norm_stats("ProtoNet", batch_norm_stats, backbone)
        warn_if_narrow(backbone, "ProtoNet")
        register_log_scale(self, default_scale(distance) if scale is None else scale, learn_scale)

    def arguments_in_weights(self) -> Dict[str, str]:
        """``scale``, and ``distance`` too while ``scale`` is ``None``: the distance then sets the
        initial scale (1 or 10), which a checkpoint's ``log_scale`` replaces (a euclidean
        checkpoint tested with the cosine distance ran at scale 1, not 10)."""
        held = super().arguments_in_weights()
        if "scale" in held and self.hparams.get("scale") is None:
            held["distance"] = "log_scale, whose starting value the distance sets while scale is None"
        return held

    def forward(self, batch: TaskBatch) -> Tensor:
        support, query = embed_episodes(self.backbone, batch.support_x, batch.query_x, self.batch_norm_stats)
        prototypes = class_means(support.flatten(2), batch.support_y, num_ways(batch.support_y))
        return self.logits(query.flatten(2), prototypes)

    def logits(self, query: Tensor, prototypes: Tensor) -> Tensor:
        """``[B, Q, D]`` query embeddings and ``[B, N, D]`` prototypes to ``[B, Q, N]`` logits."""
        scale = self.log_scale.exp()
        if self.distance == "cosine":
            return scale * (F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2))
        return -scale * squared_distances(query, prototypes)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2`` for ``[B, M, D]`` and ``[B, N, D]``: ``[B, M, N]``.

    Expanded as ``|a|^2 - 2 a.b + |b|^2`` so the work is one batched matmul; the broadcast
    difference would hold ``B * M * N * D`` numbers (over a gigabyte for 20-way mini-ImageNet
    batches). Clamped at zero because the expansion can round slightly below it.
    """
    cross = a @ b.transpose(1, 2)
    return (a.square().sum(-1, keepdim=True) - 2 * cross + b.square().sum(-1).unsqueeze(1)).clamp_min(0.0)


def default_scale(distance: str) -> float:
    return 10.0 if distance == "cosine" else 1.0


def register_log_scale(module: nn.Module, scale: float, learnable: bool) -> None:
    """Give ``module`` a ``log_scale``: a parameter if learned, else a buffer (so it still moves
    with the module and is saved in checkpoints). The logarithm keeps the scale positive."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}.")
    value = torch.tensor(math.log(scale))
    if learnable:
        module.log_scale = nn.Parameter(value)
    else:
        module.register_buffer("log_scale", value)
