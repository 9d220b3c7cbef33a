"""Optimization-based meta-learning: MAML, first-order MAML, ANIL and Meta-SGD."""
from __future__ import annotations

import time
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..inner import BATCHING, Forward, InnerLearningRate, Params, functional, select_parameters, task_params, trajectory
from ..metrics import MeanConfidenceInterval
from .base import MetaLearner, per_task_loss


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    Each training step adapts ``backbone`` to every task of the batch with ``inner_steps``
    gradient steps on its support set, then returns the mean query loss of the adapted
    networks; its backward pass is the meta-gradient, through the inner steps (second
    order) or not (``first_order=True``: FOMAML). Tasks run batched under ``torch.func.vmap``.

    The pieces are public, for algorithms built on MAML and for your own code:
    :meth:`initial_params`, :meth:`trajectory` / :meth:`adapt` (per-task adapted parameters)
    and :meth:`predict` (outputs under given per-task parameters); see
    :mod:`fewshot_lightning.inner` for the pure functions underneath.

    Evaluation adapts with ``test_inner_steps`` steps and keeps no outer graph; at test time
    it also records the query score after every step (the adaptation curve), logged as
    ``test/<score>_after_<k>_steps`` and as a series ``test/adaptation_curve_<score>``
    against the step, for any logger.

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
        batching: ``"vmap"`` or ``"loop"`` over the tasks of a batch (same numbers, different
            speed), or ``"auto"``: on the first batch, try vmap (falling back to the loop with a
            warning if the model cannot run under it, e.g. batch norm updating running
            statistics), time one training step of each, keep the faster for the whole run and
            log both timings.
        optimizer, lr_scheduler: see :class:`~.base.MetaLearner`.

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
        if batching not in ("auto",) + BATCHING:
            raise ValueError(f"batching must be 'auto', 'vmap' or 'loop', got {batching!r}.")
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps
        self.first_order = first_order
        self.adapt_names = select_parameters(backbone, adapt)
        #: The batching in use: fixed by the constructor, or by the first batch under "auto".
        self.batching = None if batching == "auto" else batching
        shapes = {name: p.shape for name, p in backbone.named_parameters() if name in self.adapt_names}
        self.inner_lr = InnerLearningRate(
            shapes, inner_lr, inner_steps, per_step=per_step_lr, per_parameter=per_parameter_lr,
            learnable=learn_inner_lr,
        )
        self.test_curve = MeanConfidenceInterval(size=test_inner_steps + 1)

    # -- the building blocks ------------------------------------------------------------------
    def initial_params(self, tasks: int, detach: bool = False) -> Params:
        """The adapted parameters' starting point for ``tasks`` tasks, ``[tasks, ...]`` each."""
        adapted = set(self.adapt_names)
        return task_params({n: p for n, p in self.backbone.named_parameters() if n in adapted}, tasks, detach)

    def functional(self, batching: Optional[str] = None) -> Forward:
        """The backbone as ``forward(params, x)`` over tasks; parameters not adapted are shared."""
        adapted = set(self.adapt_names)
        fixed = {n: p for n, p in self.backbone.named_parameters() if n not in adapted}
        return functional(self.backbone, fixed, batching=batching or self.batching or "vmap")

    def trajectory(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: Optional[bool] = None,
        differentiable: bool = True,
        batching: Optional[str] = None,
    ) -> Iterator[Params]:
        """Per-task parameters after 0, 1, ..., ``steps`` inner steps on the support set.

        ``differentiable=False`` (evaluation) detaches every step: no outer graph is built.
        """
        first_order = self.first_order if first_order is None else first_order
        return trajectory(
            self.functional(batching), self.initial_params(support_x.shape[0], detach=not differentiable),
            support_x, support_y, per_task_loss, steps, self.inner_lr,
            second_order=not first_order, differentiable=differentiable,
        )

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None, **options) -> Params:
        """Per-task parameters after ``steps`` (default ``inner_steps``) inner steps; keyword
        options as :meth:`trajectory`."""
        for params in self.trajectory(support_x, support_y, self.inner_steps if steps is None else steps, **options):
            pass
        return params

    def predict(self, params: Params, x: Tensor, batching: Optional[str] = None) -> Tensor:
        """Backbone outputs on ``x`` ``[B, M, ...]`` under per-task ``params``."""
        return self.functional(batching)(params, x)

    # -- training and evaluation --------------------------------------------------------------
    def forward(self, batch: TaskBatch) -> Tensor:
        """Query outputs after the training-time adaptation, differentiable for the meta-gradient."""
        self.choose_batching(batch)
        return self.predict(self.adapt(batch.support_x, batch.support_y), batch.query_x)

    def evaluation_outputs(self, batch: TaskBatch, stage: str) -> Tensor:
        self.choose_batching(batch)
        if stage != "test":
            params = self.adapt(batch.support_x, batch.support_y, self.test_inner_steps, differentiable=False)
            return self.predict(params, batch.query_x)
        scores = []
        for params in self.trajectory(batch.support_x, batch.support_y, self.test_inner_steps, differentiable=False):
            outputs = self.predict(params, batch.query_x)
            scores.append(self.scores(outputs, batch))
        self.test_curve.update(torch.stack(scores, dim=1))
        return outputs

    def adaptation_curve(self, batch: TaskBatch, steps: Optional[int] = None) -> Tensor:
        """Query outputs after 0, 1, ..., ``steps`` inner steps, ``[steps + 1, B, M, ...]``, no graph."""
        self.choose_batching(batch)
        steps = self.test_inner_steps if steps is None else steps
        trajectory = self.trajectory(batch.support_x, batch.support_y, steps, differentiable=False)
        return torch.stack([self.predict(params, batch.query_x) for params in trajectory])

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self.test_curve.update_called:
            return
        curve, _ = self.test_curve.compute()
        self.test_curve.reset()
        name = self.score_name
        for step, value in enumerate(curve.tolist()):
            # Already reduced over processes (see MetaLearner._log_eval for sync_dist).
            self.log(f"test/{name}_after_{step}_steps", value, sync_dist=True)
        # The same points as one series against the inner step, so a logger can draw the curve.
        for logger in self.loggers:
            for step, value in enumerate(curve.tolist()):
                logger.log_metrics({f"test/adaptation_curve_{name}": value}, step=step)

    # -- batching -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["batching"] = self.batching

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # A resumed run keeps the path the interrupted one timed and chose: vmap and the loop
        # agree only to rounding, and a fresh timing could pick the other.
        if self.batching is None and self._trainer is not None and self.trainer.state.fn == "fit":
            self.batching = checkpoint.get("batching")

    def choose_batching(self, batch: TaskBatch) -> str:
        """With ``batching="auto"``, decide once, on this batch, between vmap and the loop.

        vmap must first run the model at all; then one full training step (adaptation, query
        loss, meta-gradient) is timed each way, twice, and the faster path (by its better time)
        is kept for the rest of the run. Both paths give the same numbers, so the choice only
        changes speed. The decision and both timings are logged.
        """
        if self.batching is not None:
            return self.batching
        with torch.inference_mode(False), torch.enable_grad():
            if batch.support_x.is_inference():
                batch = TaskBatch(*(t.clone() for t in batch))
            try:
                self._timed_step(batch, "vmap")
            except (RuntimeError, ValueError) as error:
                warnings.warn(
                    f"{type(self.backbone).__name__} cannot run under torch.func.vmap ({error}); adapting tasks "
                    "one by one instead. Pass batching='loop' to skip this attempt.",
                    stacklevel=2,
                )
                self.batching = "loop"
                return self.batching
            timings = {"vmap": [], "loop": []}
            for _ in range(2):
                for mode in ("vmap", "loop"):
                    timings[mode].append(self._timed_step(batch, mode))
        best = {mode: min(times) for mode, times in timings.items()}
        self.batching = "vmap" if best["vmap"] <= best["loop"] else "loop"
        rank_zero_info(
            f"{type(self).__name__}: batching='auto' chose {self.batching!r} (one training step of "
            f"{batch.num_tasks} tasks: vmap {1000 * best['vmap']:.1f} ms, loop {1000 * best['loop']:.1f} ms)."
        )
        for logger in self.loggers:
            logger.log_metrics(
                {"batching/vmap_ms": 1000 * best["vmap"], "batching/loop_ms": 1000 * best["loop"]},
                step=self.global_step if self._trainer is not None else 0,
            )
        return self.batching

    def _timed_step(self, batch: TaskBatch, batching: str) -> float:
        start = time.perf_counter()
        params = self.adapt(batch.support_x, batch.support_y, batching=batching)
        loss = self.query_losses(self.predict(params, batch.query_x, batching=batching), batch).mean()
        trainable = [p for p in self.parameters() if p.requires_grad]
        torch.autograd.grad(loss, trainable, allow_unused=True)
        return time.perf_counter() - start


class ANIL(MAML):
    """Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020): MAML that adapts only
    the head.

    Arguments as :class:`MAML`; ``adapt`` defaults to ``["head."]`` (our backbones name their
    last layer ``head``).
    """

    def __init__(self, backbone: nn.Module, adapt: Optional[Sequence[str]] = ("head.",), **kwargs) -> None:
        super().__init__(backbone, adapt=adapt, **kwargs)


class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML whose inner learning rate is a learned
    tensor with one entry per parameter element (direction and size of the step).

    Arguments as :class:`MAML`, less ``learn_inner_lr`` and ``per_parameter_lr`` (both always
    on); ``inner_lr`` initialises every rate.
    """

    def __init__(self, backbone: nn.Module, **kwargs) -> None:
        for fixed in ("learn_inner_lr", "per_parameter_lr"):
            if fixed in kwargs:
                raise ValueError(f"MetaSGD always learns per-parameter rates; remove {fixed!r} (or use MAML).")
        super().__init__(backbone, learn_inner_lr=True, per_parameter_lr=True, **kwargs)
