"""Matching Networks: a query's class distribution is an attention-weighted vote of the support labels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..data.task import TaskBatch
from .base import MetaLearner
from .episode_ops import (
    check_batch_norm_stats, check_embedding_width, embed_episodes, embedding_size, num_ways, one_hot, warn_if_narrow,
)
from .protonet import register_log_scale


class MatchingNet(MetaLearner):
    """Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, "Matching
    Networks for One Shot Learning", NeurIPS 2016).

    ``P(y = c | x, S) = sum_i a(x, x_i) [y_i = c]`` with ``a`` a softmax over the support set of
    the cosine similarities between the query embedding ``f(x, S)`` and the support embeddings
    ``g(x_i, S)``. :meth:`forward` returns the *logarithm* of that mixture, ``[B, N*Q, N]``,
    computed as a masked log-sum-exp of the log-attention (exact, with no ``log(0)`` when an
    attention weight underflows), so the base class's cross-entropy is the paper's loss and
    ``argmax`` gives its prediction. N comes from the labels (:func:`~.episode_ops.num_ways`).

    Full context embeddings (``fce=True``, the paper's appendix): ``g(x_i, S)`` adds the states
    of a bidirectional LSTM run over the support embeddings to ``g'(x_i)``; ``f(x, S)`` is an
    LSTM unrolled ``fce_steps`` times that reads the query embedding ``f'(x)`` and, at each
    step, a dot-product attention read-out ``r`` of the ``g(x_i, S)``, with a residual
    connection to ``f'(x)``. ``f'`` and ``g'`` are the one backbone. The paper's LSTM takes the
    concatenation ``[h, r]`` as its hidden state; an ``LSTMCell`` fed ``[f'(x), r]`` as input
    with hidden state ``h`` computes exactly the same gates, which is how it is built here. The
    unrolling starts from ``h_0 = f'(x)``, ``c_0 = 0``. Each query attends only to the support
    set, never to other queries.

    Order: without FCE the predictions do not depend on the order of the support set; with FCE
    they do (the bidirectional LSTM reads it as a sequence; the episodes shuffle it).

    Batch norm: every task is normalised on its own (:func:`~.episode_ops.per_task`). The
    paper does not say how it evaluates; its model is ``P(y | x, S)``, a function of the query
    and the support set alone, which running statistics in evaluation keep
    (``batch_norm_stats="running"``, the default); ``"task"`` normalises evaluation tasks with
    their own batch statistics (transductive).

    Args:
        backbone: the embedding network (``f'`` and ``g'``), e.g.
            ``Conv4(out_features=None, track_running_stats=True)``; feature maps are flattened
            to vectors. With ``fce=True`` its ``output_shape`` sizes the LSTMs.
        fce: use full context embeddings.
        fce_steps: unrolling steps ``K`` of the query's attention LSTM (``fce=True`` only).
        scale: positive multiplier of the cosine similarities before the softmax. 1 is the
            paper; larger values sharpen the attention. With 1 the logits stay within [-1, 1]
            and training is slow: on Kanji 5-way 1-shot, 2 CPU minutes gave 81.2% at 1 and
            98.2% with ``scale=10, learn_scale=True`` (docs/benchmarks.md).
        learn_scale: train ``scale`` (kept positive through its logarithm).
        batch_norm_stats: ``"running"`` or ``"task"`` (see
            :data:`~.episode_ops.BATCH_NORM_STATS`).
        optimizer, lr_scheduler: see :class:`~.base.MetaLearner`.

    Example::

        import lightning as L
        import torch
        from fewshot_lightning.algorithms import MatchingNet
        from fewshot_lightning.data import EpisodicDataModule
        from fewshot_lightning.models import Conv4

        images, labels = torch.rand(50 * 20, 1, 28, 28), torch.arange(50).repeat_interleave(20)
        data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=5,
                                  meta_batch_size=4, train_tasks=40, num_workers=0)
        model = MatchingNet(Conv4(out_features=None, track_running_stats=True), fce=True)
        L.Trainer(max_steps=10, logger=False).fit(model, data)
    """

    task_kinds = ("classification",)

    def __init__(
        self,
        backbone: nn.Module,
        fce: bool = False,
        fce_steps: int = 5,
        scale: float = 1.0,
        learn_scale: bool = False,
        batch_norm_stats: str = "running",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        register_log_scale(self, scale, learn_scale)
        self.batch_norm_stats = check_batch_norm_stats("MatchingNet", batch_norm_stats, backbone)
        warn_if_narrow(backbone, "MatchingNet")
        self.fce = fce
        if fce:
            if fce_steps < 1:
                raise ValueError(f"fce_steps must be at least 1, got {fce_steps}.")
            embedding_dim = embedding_size(backbone, "MatchingNet(fce=True)")
            self.embedding_dim = embedding_dim
            self.fce_steps = fce_steps
            self.support_lstm = nn.LSTM(embedding_dim, embedding_dim, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * embedding_dim, embedding_dim)

    def forward(self, batch: TaskBatch) -> Tensor:
        return mixture_log_probs(self.log_attention(batch), batch.support_y, num_ways(batch.support_y))

    def attention(self, batch: TaskBatch) -> Tensor:
        """Attention of each query over the support set, ``[B, N*Q, N*K]``; rows sum to one."""
        return self.log_attention(batch).exp()

    def log_attention(self, batch: TaskBatch) -> Tensor:
        support, query = embed_episodes(self.backbone, batch.support_x, batch.query_x, self.batch_norm_stats)
        support, query = support.flatten(2), query.flatten(2)
        if self.fce:
            check_embedding_width(support, self.embedding_dim, "MatchingNet(fce=True)")
            support = self.contextual_support(support)
            query = self.contextual_query(query, support)
        cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
        return F.log_softmax(self.log_scale.exp() * cosine, dim=-1)

    def contextual_support(self, support: Tensor) -> Tensor:
        """``g(x_i, S) = g'(x_i) + forward state + backward state`` of a BiLSTM over ``[B, S, D]``."""
        states, _ = self.support_lstm(support)
        forward_states, backward_states = states.chunk(2, dim=-1)
        return support + forward_states + backward_states

    def contextual_query(self, query: Tensor, support: Tensor) -> Tensor:
        """``f(x, S)``: the attention LSTM, ``[B, Q, D]`` queries against ``[B, S, D]`` support."""
        tasks, queries, dim = query.shape
        embedded = query.reshape(tasks * queries, dim)
        hidden, cell = embedded, torch.zeros_like(embedded)
        for _ in range(self.fce_steps):
            # Softmax over the support set only: queries of a task never see one another.
            weights = torch.softmax(hidden.view(tasks, queries, dim) @ support.transpose(1, 2), dim=-1)
            readout = (weights @ support).reshape(tasks * queries, dim)
            hidden, cell = self.query_lstm(torch.cat([embedded, readout], dim=-1), (hidden, cell))
            hidden = hidden + embedded
        return hidden.view(tasks, queries, dim)


def mixture_log_probs(log_attention: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """``log sum_{i: y_i = c} a_i`` for ``[B, Q, S]`` log-attention: ``[B, Q, ways]``."""
    member = one_hot(support_y, ways, torch.bool).transpose(1, 2).unsqueeze(1)
    masked = log_attention.unsqueeze(2).masked_fill(~member, float("-inf"))
    return masked.logsumexp(-1)
