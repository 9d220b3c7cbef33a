"""The base ``LightningModule`` every meta-learning algorithm shares."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..metrics import MeanConfidenceInterval


def is_regression(targets: Tensor) -> bool:
    """Float targets mean regression; integer targets are class labels."""
    return targets.is_floating_point()


def per_task_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean loss of each task, ``[B]``: cross-entropy for labels, MSE for float targets.

    ``outputs`` is ``[B, M, C]`` logits or ``[B, M, *y]`` predictions; ``targets`` ``[B, M]`` or
    ``[B, M, *y]``.
    """
    if is_regression(targets):
        return (outputs - targets).square().flatten(1).mean(1)
    return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(1)


class MetaLearner(L.LightningModule):
    """Shared base: one training step is one batch of tasks.

    A subclass implements :meth:`forward`, mapping a :class:`TaskBatch` to predictions on its
    query set (``[B, N*Q, N]`` logits, or ``[B, Q, *y]`` regression outputs), and may
    override :meth:`query_losses` (default: cross-entropy or MSE, following the targets'
    dtype). This class owns the rest: the outer loss (mean over tasks), episodic evaluation
    (accuracy or MSE, mean ± 95% CI over all validation/test episodes, synced across
    processes), logging and the optimizer.

    Args:
        backbone: the network (any ``nn.Module``).
        optimizer: the outer-loop optimizer, e.g. ``torch.optim.Adam`` (``lr=1e-3``) or, in
            YAML, ``{class_path: torch.optim.SGD, init_args: {lr: 0.1}}``.
        lr_scheduler: optional outer learning-rate scheduler, stepped every training step.
    """

    #: Whether evaluation needs autograd (gradient-based adaptation) even under ``inference_mode``.
    needs_grad_at_eval: bool = False

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.eval_metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict({"loss": MeanConfidenceInterval(), "score": MeanConfidenceInterval()})
                for stage in ("val", "test")
            }
        )
        #: Whether the tasks are regression (score: MSE) or classification (score: accuracy).
        #: Read from the DataModule at setup; without one, from the first evaluated batch.
        self.regression: Optional[bool] = None

    # -- what subclasses implement ------------------------------------------------------------
    def forward(self, batch: TaskBatch) -> Tensor:
        """Query predictions of every task in the batch."""
        raise NotImplementedError

    def query_losses(self, outputs: Tensor, batch: TaskBatch) -> Tensor:
        """Loss of each task, ``[B]``."""
        return per_task_loss(outputs, batch.query_y)

    def point_predictions(self, outputs: Tensor) -> Tensor:
        """Regression predictions from :meth:`forward`'s output (an identity unless it predicts
        a distribution)."""
        return outputs

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        outputs = self(batch)
        loss = self.query_losses(outputs, batch).mean()
        if self._logging_step():
            size = batch.num_tasks
            self.log("train/loss", loss, prog_bar=True, batch_size=size)
            if not is_regression(batch.query_y):
                accuracy = (outputs.argmax(-1) == batch.query_y).float().mean()
                self.log("train/acc", accuracy, prog_bar=True, batch_size=size)
        return loss

    def _logging_step(self) -> bool:
        """Whether this training step's metrics reach the logger. ``self.log`` costs about as
        much as a whole sinusoid MAML step, and Lightning only writes every
        ``log_every_n_steps`` anyway, so other steps skip it."""
        if self._trainer is None:
            return True
        return (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    # -- evaluation ---------------------------------------------------------------------------
    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _eval_context(self):
        """Gradient-based adaptation needs autograd even under the Trainer's ``inference_mode``;
        ``no_grad`` outside still keeps the outer graph from being built."""
        if not self.needs_grad_at_eval:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        return stack

    def evaluation_outputs(self, batch: TaskBatch, stage: str) -> Tensor:
        """Query predictions at evaluation (``stage`` is ``"val"`` or ``"test"``); subclasses
        may adapt differently here than in training."""
        return self(batch)

    def _evaluate(self, batch: TaskBatch, stage: str) -> Dict[str, Tensor]:
        self._check_task_kind(batch)
        with self._eval_context():
            if self.needs_grad_at_eval and batch.support_x.is_inference():
                # Tensors made under inference_mode cannot enter autograd; a clone can.
                batch = TaskBatch(*(t.clone() for t in batch))
            outputs = self.evaluation_outputs(batch, stage)
            losses = self.query_losses(outputs, batch)
            scores = self.scores(outputs, batch)
        metrics = self.eval_metrics[stage]
        metrics["loss"].update(losses)
        metrics["score"].update(scores)
        return {"loss": losses, "score": scores}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        kind = getattr(datamodule, "regression", None)
        if kind is not None:
            self.regression = bool(kind)

    def _check_task_kind(self, batch: TaskBatch) -> None:
        """Fix the score's name once, and refuse batches of the other kind of task."""
        regression = is_regression(batch.query_y)
        if self.regression is None:
            self.regression = regression
        elif self.regression != regression:
            expected = "regression (float targets)" if self.regression else "classification (integer labels)"
            raise ValueError(
                f"{type(self).__name__} is evaluating {expected} tasks, but got a batch with "
                f"{batch.query_y.dtype} query targets: the DataModule's `regression` attribute and its batches disagree."
            )

    @property
    def score_name(self) -> str:
        """``"mse"`` for regression tasks, ``"acc"`` for classification."""
        return "mse" if self.regression else "acc"

    def scores(self, outputs: Tensor, batch: TaskBatch) -> Tensor:
        """Per-task accuracy (classification) or MSE (regression), ``[B]``."""
        if is_regression(batch.query_y):
            return (self.point_predictions(outputs) - batch.query_y).square().flatten(1).mean(1)
        return (outputs.argmax(-1) == batch.query_y).float().mean(1)

    def _log_eval(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        if not metrics["loss"].update_called:
            return
        for key, name in (("loss", "loss"), ("score", self.score_name)):
            mean, ci95 = metrics[key].compute()
            # compute() already reduced over processes: the value is the same on every rank.
            self.log(f"{stage}/{name}", mean, prog_bar=key == "score")
            self.log(f"{stage}/{name}_ci95", ci95)
            metrics[key].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
