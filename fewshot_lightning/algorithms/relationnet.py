"""Relation Networks: a learned module scores how well a query's feature map matches each class's."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..models.blocks import check_widths
from ..models.relation import RelationModule
from .base import MetaLearner
from .episode_ops import check_batch_norm_stats, class_sums, embed_episodes, num_ways, one_hot, output_shape, per_task

LOSSES = ("mse", "bce")


class RelationNet(MetaLearner):
    """Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, "Learning to Compare:
    Relation Network for Few-Shot Learning", CVPR 2018).

    The backbone maps images to feature maps ``[C, H, W]``; a class's map is the *sum* of its
    support maps (the paper's K-shot rule); a :class:`~fewshot_lightning.models.RelationModule`
    scores the channel-wise concatenation ``[query map, class map]`` of every (query, class)
    pair. :meth:`forward` returns the relation scores ``[B, N*Q, N]`` in ``[0, 1]``; the
    prediction is their ``argmax``. N comes from the labels (:func:`~.episode_ops.num_ways`).

    Losses (``loss``): ``"mse"``, the paper's regression of every score onto the one-hot target;
    ``"bce"``, binary cross-entropy of every score against the same target (the classification
    counterpart, with stronger gradients for confidently wrong scores). Both are averaged over
    the ``N*Q x N`` scores of a task.

    Batch norm, in the embedding and the relation module: every task is normalised on its own
    (:func:`~.episode_ops.per_task`). By default (``batch_norm_stats="task"``) with its own
    batch statistics in evaluation too, as the paper's code (floodsung/LearningToCompare_FSL)
    does: it never switches to evaluation mode. As there, the embedding takes a task's support
    set and its query set in two calls, each normalised with its own statistics. ``"running"`` evaluates with running
    statistics (the relation module then keeps them; the backbone must too).

    Args:
        backbone: a network returning feature maps ``[C, H, W]`` and saying their shape in
            ``output_shape``, e.g. :class:`~fewshot_lightning.models.RelationEmbedding`
            (``(64, 7, 7)`` for 28x28 images).
        relation_channels: filters of the relation module's conv blocks (64 in the paper).
        relation_hidden: width of its first fully connected layer (8 in the paper).
        relation_padding: padding of the relation module's convolutions: 1 keeps the map
            side before each pooling; 0 is the paper's code on mini-ImageNet (with
            ``RelationEmbedding(padding=0)``: 19x19 maps -> 3x3).
        loss: ``"mse"`` or ``"bce"``.
        batch_norm_stats: ``"task"`` or ``"running"`` (see
            :data:`~.episode_ops.BATCH_NORM_STATS`).
        optimizer, lr_scheduler: see :class:`~.base.MetaLearner`.

    Example::

        import lightning as L
        import torch
        from fewshot_lightning.algorithms import RelationNet
        from fewshot_lightning.data import EpisodicDataModule
        from fewshot_lightning.models import RelationEmbedding

        images, labels = torch.rand(50 * 20, 1, 28, 28), torch.arange(50).repeat_interleave(20)
        data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=5,
                                  meta_batch_size=4, train_tasks=40, num_workers=0)
        model = RelationNet(RelationEmbedding(hidden=64))
        L.Trainer(max_steps=10, logger=False).fit(model, data)
    """

    task_kinds = ("classification",)

    def __init__(
        self,
        backbone: nn.Module,
        relation_channels: int = 64,
        relation_hidden: int = 8,
        relation_padding: int = 1,
        loss: str = "mse",
        batch_norm_stats: str = "task",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        check_widths("RelationNet", relation_channels=relation_channels, relation_hidden=relation_hidden)
        self.loss = loss
        self.batch_norm_stats = check_batch_norm_stats("RelationNet", batch_norm_stats, backbone)
        self.feature_shape = output_shape(backbone, "RelationNet")
        if len(self.feature_shape) != 3 or self.feature_shape[1] != self.feature_shape[2]:
            raise ValueError(
                f"RelationNet needs square feature maps [C, H, W] from the backbone, but its output_shape is "
                f"{list(self.feature_shape)}: use a backbone that keeps a spatial map, such as RelationEmbedding."
            )
        channels, side = self.feature_shape[0], self.feature_shape[1]
        self.relation = RelationModule(
            2 * channels, relation_channels, relation_hidden, side, relation_padding,
            track_running_stats=batch_norm_stats == "running",
        )

    def forward(self, batch: TaskBatch) -> Tensor:
        # Two calls, as the paper's code embeds them: with batch statistics the support set and the
        # query set are each normalised with their own.
        support, query = embed_episodes(self.backbone, batch.support_x, batch.query_x, self.batch_norm_stats,
                                        together=False)
        if tuple(support.shape[2:]) != self.feature_shape:
            raise ValueError(
                f"The backbone's output_shape says {list(self.feature_shape)} but it returned maps of shape "
                f"{list(support.shape[2:])} for these images: build it for this image size."
            )
        classes = class_sums(support, batch.support_y, num_ways(batch.support_y))
        tasks, queries, ways = query.shape[0], query.shape[1], classes.shape[1]
        pair_shape = (tasks, queries, ways, *self.feature_shape)
        pairs = torch.cat([query.unsqueeze(2).expand(pair_shape), classes.unsqueeze(1).expand(pair_shape)], dim=3)
        relations = per_task(self.relation, pairs.flatten(1, 2), self.batch_norm_stats)
        return torch.sigmoid(relations).view(tasks, queries, ways)

    def query_losses(self, outputs: Tensor, batch: TaskBatch) -> Tensor:
        targets = one_hot(batch.query_y, outputs.shape[-1], outputs.dtype)
        if self.loss == "mse":
            return (outputs - targets).square().mean((1, 2))
        # binary_cross_entropy refuses autocast (it is unstable in half precision): run it in float32
        # (float64 stays float64).
        dtype = torch.promote_types(outputs.dtype, torch.float32)
        with torch.autocast(outputs.device.type, enabled=False):
            losses = F.binary_cross_entropy(outputs.to(dtype), targets.to(dtype), reduction="none")
        return losses.mean((1, 2))
