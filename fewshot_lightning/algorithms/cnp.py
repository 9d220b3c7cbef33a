"""Conditional Neural Processes: regression by encoding the context set into one vector."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.task import TaskBatch
from ..models.mlp import MLP
from .base import MetaLearner, TaskShapeError
from .episode_ops import check_batch_norm_stats, output_shape, per_task

#: The floor and range of the predicted standard deviation, ``0.1 + 0.9 * softplus``: the floor
#: keeps the likelihood from collapsing onto single context points early in training.
MIN_SIGMA = 0.1
SIGMA_RANGE = 0.9
#: How CNP picks a training task's context (its docstring).
TRAINING_CONTEXTS = ("random", "support")


class CNP(MetaLearner):
    """Conditional Neural Process (Garnelo, Rosenbaum, Maddison, Ramalho, Saxton, Shanahan, Teh,
    Rezende & Eslami, "Conditional Neural Processes", ICML 2018), for regression tasks.

    The encoder (``backbone``) maps every context pair ``[x_i; y_i]`` (the support set) to a
    vector; their mean is the task representation ``r``, so the prediction does not depend on
    the order of the context set. The decoder, an MLP on ``[r; x]``, predicts for every
    target (query) ``x`` a Gaussian with mean ``mu`` and standard deviation
    ``sigma = 0.1 + 0.9 * softplus(raw)``. Training minimises the Gaussian negative
    log-likelihood (averaged over points and output dimensions, with its ``log(2 pi) / 2``
    constant, so it is a true NLL per value) as the paper does (section 2.4,
    ``training_context="random"``): each task's support and query points together are its ``n``
    observations, a random subset of ``N`` of them (``N`` uniform in ``1..n-1``, drawn per task
    and step) is the context, and all ``n`` are the targets, the context included.
    ``training_context="support"`` conditions on the support set and scores the queries, as
    evaluation does. Evaluation conditions on the support set; its MSE is that of ``mu`` on the
    queries.

    :meth:`forward` returns ``[B, Q, *y, 2]``: ``mu`` and ``sigma`` stacked in the last dimension.

    Constructor: like the other learners, the network passed first is ``backbone``, here the
    encoder (e.g. ``MLP(in_features=x_dim + y_dim, hidden=[128, 128], out_features=128)``); the
    decoder is built from ``decoder_hidden`` since its input and output sizes follow from the
    encoder's ``output_shape`` (the representation), ``x_dim`` and ``y_dim``.

    Every task's context set is encoded on its own (:func:`~.episode_ops.per_task`), so an
    encoder with batch norm normalises each task with its own context points; the paper's
    encoder has none. ``batch_norm_stats="task"`` (default) keeps that in evaluation too, so
    ``r`` stays a function of the context set alone.

    Args:
        backbone: encoder from ``[*, x_dim + y_dim]`` to ``[*, R]``, with ``output_shape``
            ``(R,)`` (as :class:`~fewshot_lightning.models.MLP` has).
        x_dim: size of a (flattened) input ``x``.
        y_dim: size of a (flattened) target ``y``.
        decoder_hidden: hidden widths of the decoder MLP.
        batch_norm_stats: ``"task"`` or ``"running"`` (see
            :data:`~.episode_ops.BATCH_NORM_STATS`).
        training_context: ``"random"`` (the paper's training, above) or ``"support"``. With
            ``"random"`` the encoder must not have batch norm (it would normalise the context
            with the statistics of the targets it is not given).
        optimizer, lr_scheduler: see :class:`~.base.MetaLearner`.

    Example::

        import lightning as L
        from fewshot_lightning.algorithms import CNP
        from fewshot_lightning.data import SinusoidDataModule
        from fewshot_lightning.models import MLP

        model = CNP(MLP(in_features=2, hidden=[128, 128], out_features=128))
        L.Trainer(max_steps=200, logger=False).fit(model, SinusoidDataModule(shots=10, meta_batch_size=16))
    """

    task_kinds = ("regression",)
    backbone_reads_samples = False  # it encodes [x, y] pairs

    def __init__(
        self,
        backbone: nn.Module,
        x_dim: int = 1,
        y_dim: int = 1,
        decoder_hidden: Sequence[int] = (128, 128),
        batch_norm_stats: str = "task",
        training_context: str = "random",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        for name, value in (("x_dim", x_dim), ("y_dim", y_dim)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if any(width < 1 for width in decoder_hidden):
            raise ValueError(f"decoder_hidden widths must be at least 1, got {list(decoder_hidden)}.")
        self.batch_norm_stats = check_batch_norm_stats("CNP", batch_norm_stats, backbone)
        if training_context not in TRAINING_CONTEXTS:
            raise ValueError(f"training_context must be one of {list(TRAINING_CONTEXTS)}, got {training_context!r}.")
        if training_context == "random" and any(isinstance(m, _BatchNorm) for m in backbone.modules()):
            raise ValueError(
                f"CNP's training_context='random' encodes every observation of a task, context or not, in one "
                f"call, so the batch norm in {type(backbone).__name__} would normalise the context with the "
                "statistics of targets it is not given: use an encoder without batch norm (the paper's), or "
                "training_context='support'.")
        self.training_context = training_context
        inputs = getattr(backbone, "input_shape", None)
        if inputs is not None and len(inputs) == 1 and inputs[0] is not None and tuple(inputs) != (x_dim + y_dim,):
            raise ValueError(
                f"CNP's encoder reads one (x, y) context pair, x_dim + y_dim = {x_dim + y_dim} values, but "
                f"{type(backbone).__name__} takes input_shape {tuple(inputs)}: build it with in_features="
                f"{x_dim + y_dim} (e.g. MLP({x_dim + y_dim}, ...)), or set x_dim and y_dim to the task's sizes.")
        shape = output_shape(backbone, "CNP")
        if len(shape) != 1:
            raise ValueError(f"CNP needs an encoder that outputs vectors, but its output_shape is {list(shape)}.")
        representation_dim = shape[0]
        self.x_dim, self.y_dim, self.representation_dim = x_dim, y_dim, representation_dim
        self.decoder = MLP(representation_dim + x_dim, decoder_hidden, 2 * y_dim)

    def forward(self, batch: TaskBatch) -> Tensor:
        context_x, context_y, target_x = self._flat(batch)
        return self._predict(context_x, context_y, target_x, batch.support_y.shape[2:])

    def _flat(self, batch: TaskBatch) -> Tuple[Tensor, Tensor, Tensor]:
        """The support inputs and targets and the query inputs, ``[B, M, size]``, checked."""
        for name in ("support_x", "support_y", "query_x", "query_y"):
            if getattr(batch, name).dim() < 3:
                raise TaskShapeError(
                    f"CNP reads every task's points as [tasks, points, size]; its {name} is "
                    f"{list(getattr(batch, name).shape)}. Give 1-D values a last dimension of size 1 "
                    "(e.g. y.unsqueeze(-1)).")
        context_x, context_y = batch.support_x.flatten(2), batch.support_y.flatten(2)
        target_x = batch.query_x.flatten(2)
        if context_x.shape[-1] != self.x_dim or context_y.shape[-1] != self.y_dim:
            raise ValueError(
                f"CNP was built with x_dim={self.x_dim}, y_dim={self.y_dim} but the task has x of size "
                f"{context_x.shape[-1]} and y of size {context_y.shape[-1]}."
            )
        return context_x, context_y, target_x

    def _predict(self, context_x: Tensor, context_y: Tensor, target_x: Tensor, y_shape: Tuple[int, ...],
                 context: Optional[Tensor] = None) -> Tensor:
        """``[B, T, *y, 2]`` for flattened ``[B, C, x_dim]``, ``[B, C, y_dim]`` and ``[B, T, x_dim]``;
        ``context`` ``[B, C]`` (bool) keeps only some of the ``C`` points in the representation."""
        tasks = context_x.shape[0]
        encoded = per_task(self.backbone, torch.cat([context_x, context_y], dim=-1), self.batch_norm_stats)
        if encoded.shape[2:] != (self.representation_dim,):
            raise ValueError(
                f"The encoder's output_shape says ({self.representation_dim},) but it returned "
                f"{list(encoded.shape[2:])} per context point."
            )
        if context is None:
            representation = encoded.mean(1)
        else:
            weights = context.to(encoded.dtype).unsqueeze(-1)
            representation = (encoded * weights).sum(1) / weights.sum(1)
        queries = target_x.shape[1]
        decoded = self.decoder(torch.cat([representation.unsqueeze(1).expand(-1, queries, -1), target_x], dim=-1))
        mean, raw_sigma = decoded.chunk(2, dim=-1)
        sigma = MIN_SIGMA + SIGMA_RANGE * F.softplus(raw_sigma)
        target_shape = (tasks, queries, *y_shape)
        return torch.stack([mean.reshape(target_shape), sigma.reshape(target_shape)], dim=-1)

    def training_losses(self, batch: TaskBatch) -> Tuple[Tensor, Optional[Tensor]]:
        if self.training_context == "support":
            return super().training_losses(batch)
        context_x, _, target_x = self._flat(batch)
        x = torch.cat([context_x, target_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        tasks, points = x.shape[:2]
        # Garnelo et al., section 2.4: N ~ U{1..n-1} of the task's n observations, a random subset,
        # condition the prediction of all n (with none, the mean representation has no value).
        sizes = torch.randint(1, points, (tasks, 1), device=x.device)
        ranks = torch.rand(tasks, points, device=x.device).argsort(1).argsort(1)
        outputs = self._predict(x, y.flatten(2), x, y.shape[2:], context=ranks < sizes)
        return gaussian_nll(outputs[..., 0], outputs[..., 1], y).flatten(1).mean(1), None

    def query_losses(self, outputs: Tensor, batch: TaskBatch) -> Tensor:
        return gaussian_nll(outputs[..., 0], outputs[..., 1], batch.query_y).flatten(1).mean(1)

    def point_predictions(self, outputs: Tensor) -> Tensor:
        return outputs[..., 0]


def gaussian_nll(mean: Tensor, sigma: Tensor, targets: Tensor) -> Tensor:
    """Elementwise ``-log N(targets; mean, sigma^2)``."""
    return 0.5 * ((targets - mean) / sigma).square() + sigma.log() + 0.5 * math.log(2 * math.pi)
