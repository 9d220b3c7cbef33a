"""Optimization-based meta-learning: MAML, first-order MAML, ANIL and Meta-SGD."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..inner import FunctionalLearner, InnerLearningRate
from .base import MetaLearner, per_task_loss


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    Each training step adapts ``backbone`` to every task of the batch with ``inner_steps``
    gradient steps on its support set, then returns the mean query loss of the adapted
    networks; its backward pass is the meta-gradient, through the inner steps (second
    order) or not (``first_order=True``: FOMAML). Tasks run batched under ``torch.func.vmap``.

    Args:
        backbone: any ``nn.Module`` mapping inputs to logits (classification) or predictions.
        inner_lr: inner-loop step size (initial value if learned).
        inner_steps: inner steps while meta-training.
        test_inner_steps: inner steps at validation/test (default: ``inner_steps``).
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: train the inner learning rates with the outer loop.
        per_step_lr: a separate rate per inner step.
        per_parameter_lr: a rate per parameter element (Meta-SGD).
        adapt: names of parameters to adapt, or prefixes ending in ``.`` (``["head."]``);
            default all.
        batching: ``"auto"``, ``"vmap"`` or ``"loop"`` over the tasks of a batch.

    Example::

        from fewshot_lightning.algorithms import MAML
        from fewshot_lightning.data import SinusoidDataModule
        from fewshot_lightning.models import MLP
        import lightning as L

        model = MAML(MLP(), inner_lr=0.01, inner_steps=1, test_inner_steps=10)
        L.Trainer(max_steps=2000).fit(model, SinusoidDataModule(shots=10, meta_batch_size=25))
    """

    needs_grad_at_eval = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_steps: Optional[int] = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        per_step_lr: bool = False,
        per_parameter_lr: bool = False,
        adapt: Optional[Sequence[str]] = None,
        batching: str = "auto",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be at least 1, got {inner_steps}.")
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if test_inner_steps < 1:
            raise ValueError(f"test_inner_steps must be at least 1, got {test_inner_steps}.")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr}.")
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps
        self.first_order = first_order
        self.learner = FunctionalLearner(backbone, resolve_names(backbone, adapt), batching)
        shapes = {name: p.shape for name, p in backbone.named_parameters() if name in self.learner.adapt_names}
        self.inner_lr = InnerLearningRate(
            shapes, inner_lr, inner_steps, per_step=per_step_lr, per_parameter=per_parameter_lr,
            learnable=learn_inner_lr,
        )

    def forward(self, batch: TaskBatch) -> Tensor:
        return self.learner.run(
            batch.support_x, batch.support_y, batch.query_x, per_task_loss,
            self.inner_steps, self.inner_lr, first_order=self.first_order,
        )

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        curve = self.adaptation_curve(batch)
        self._record_curve(curve, batch)
        return curve[-1]

    def adaptation_curve(self, batch: TaskBatch, steps: Optional[int] = None) -> Tensor:
        """Query outputs after 0, 1, ..., ``steps`` inner steps: ``[steps + 1, B, M, ...]``."""
        steps = self.test_inner_steps if steps is None else steps
        return self.learner.run(
            batch.support_x, batch.support_y, batch.query_x, per_task_loss, steps, self.inner_lr,
            first_order=True, curve=True,
        )

    # The adaptation curve (query score against inner step) goes to TensorBoard at test time.
    def on_test_epoch_start(self) -> None:
        self._curve_sum: Optional[Tensor] = None
        self._curve_count = 0

    def _record_curve(self, curve: Tensor, batch: TaskBatch) -> None:
        if self._trainer is None or not self.trainer.testing:
            return
        per_step = torch.stack([self.scores(outputs, batch).sum() for outputs in curve])
        self._curve_sum = per_step if self._curve_sum is None else self._curve_sum + per_step
        self._curve_count += batch.num_tasks

    def on_test_epoch_end(self) -> None:
        name = self._score_name
        super().on_test_epoch_end()
        if self._curve_sum is None:
            return
        totals = torch.cat([self._curve_sum, torch.tensor([float(self._curve_count)], device=self._curve_sum.device)])
        totals = self.all_gather(totals)
        if totals.dim() > 1:
            totals = totals.sum(0)
        curve = (totals[:-1] / totals[-1]).tolist()
        for step, value in enumerate(curve):
            self.log(f"test/{name}_after_{step}_steps", value)
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if self.trainer.is_global_zero and hasattr(experiment, "add_scalar"):
            for step, value in enumerate(curve):
                experiment.add_scalar(f"test/adaptation_curve_{name}", value, global_step=step)


def resolve_names(module: nn.Module, selection: Optional[Sequence[str]]) -> Optional[list]:
    """Expand parameter names and ``"prefix."`` entries into parameter names."""
    if selection is None:
        return None
    names = [name for name, _ in module.named_parameters()]
    chosen = []
    for entry in selection:
        matches = [n for n in names if n == entry or (entry.endswith(".") and n.startswith(entry))]
        if not matches:
            raise ValueError(
                f"adapt entry {entry!r} matches no parameter of {type(module).__name__}; "
                f"its parameters are {names}."
            )
        chosen += [m for m in matches if m not in chosen]
    return chosen


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al., ICLR 2020): MAML that adapts only the head.

    Same arguments as :class:`MAML`; ``adapt`` defaults to ``["head."]`` (our backbones name
    their last layer ``head``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_steps: Optional[int] = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        per_step_lr: bool = False,
        per_parameter_lr: bool = False,
        adapt: Optional[Sequence[str]] = ("head.",),
        batching: str = "auto",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(
            backbone, inner_lr, inner_steps, test_inner_steps, first_order, learn_inner_lr, per_step_lr,
            per_parameter_lr, adapt, batching, optimizer, lr_scheduler,
        )


class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML whose inner learning rate is a learned
    tensor with one entry per parameter element (direction and size of the step).

    Same arguments as :class:`MAML`; ``inner_lr`` initialises every rate.
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_steps: Optional[int] = None,
        first_order: bool = False,
        per_step_lr: bool = False,
        adapt: Optional[Sequence[str]] = None,
        batching: str = "auto",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(
            backbone, inner_lr, inner_steps, test_inner_steps, first_order, True, per_step_lr, True,
            adapt, batching, optimizer, lr_scheduler,
        )
