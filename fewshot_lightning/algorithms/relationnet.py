"""Relation Networks: a learned module scores how well a query's feature map matches each class's."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..models.relation import RelationModule
from .base import MetaLearner
from .episode_ops import class_sums, embed_episodes, num_ways, one_hot

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

    Args:
        backbone: a network returning feature maps, e.g.
            :class:`~fewshot_lightning.models.RelationEmbedding` (``[64, 7, 7]`` for 28x28).
        feature_channels: ``C`` of the backbone's maps.
        feature_size: ``H = W`` of the backbone's maps.
        relation_channels: filters of the relation module's conv blocks (64 in the paper).
        relation_hidden: width of its first fully connected layer (8 in the paper).
        loss: ``"mse"`` or ``"bce"``.
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
        model = RelationNet(RelationEmbedding(hidden=64), feature_channels=64, feature_size=7)
        L.Trainer(max_steps=10, logger=False).fit(model, data)
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int = 64,
        feature_size: int = 7,
        relation_channels: int = 64,
        relation_hidden: int = 8,
        loss: str = "mse",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        self.loss = loss
        self.feature_shape = (feature_channels, feature_size, feature_size)
        self.relation = RelationModule(2 * feature_channels, relation_channels, relation_hidden, feature_size)

    def forward(self, batch: TaskBatch) -> Tensor:
        support, query = embed_episodes(self.backbone, batch.support_x, batch.query_x)
        if tuple(support.shape[2:]) != self.feature_shape:
            raise ValueError(
                f"RelationNet expects backbone feature maps of shape {list(self.feature_shape)} "
                f"(feature_channels, feature_size, feature_size), but the backbone returned "
                f"{list(support.shape[2:])}: set feature_channels and feature_size to match."
            )
        classes = class_sums(support, batch.support_y, num_ways(batch.support_y))
        tasks, queries, ways = query.shape[0], query.shape[1], classes.shape[1]
        pair_shape = (tasks, queries, ways, *self.feature_shape)
        pairs = torch.cat([query.unsqueeze(2).expand(pair_shape), classes.unsqueeze(1).expand(pair_shape)], dim=3)
        return torch.sigmoid(self.relation(pairs.flatten(0, 2))).view(tasks, queries, ways)

    def query_losses(self, outputs: Tensor, batch: TaskBatch) -> Tensor:
        targets = one_hot(batch.query_y, outputs.shape[-1], outputs.dtype)
        if self.loss == "mse":
            return (outputs - targets).square().mean((1, 2))
        # binary_cross_entropy refuses autocast (it is unstable in half precision): run it in float32.
        with torch.autocast(outputs.device.type, enabled=False):
            losses = F.binary_cross_entropy(outputs.float(), targets.float(), reduction="none")
        return losses.mean((1, 2))
