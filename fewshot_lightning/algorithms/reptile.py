"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018)."""
from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..inner import Adam, GradientDescent, Params
from .maml import MAML, THROUGH_INNER_LOOP, refuse

INNER_OPTIMIZERS = ("adam", "sgd")


class Reptile(MAML):
    """Reptile: fine-tune on every task, then move the initialisation toward the fine-tuned weights.

    Each training step runs ``inner_steps`` steps of Adam (the paper's choice, with
    ``betas=(0, 0.999)``) or SGD on mini-batches of every task's support set, all tasks at
    once and without any graph (memory does not grow with ``inner_steps``). The outer update
    is handed to the outer optimizer as the gradient ``theta - mean_i(phi_i)``, the gradient of
    the loss ``mean_i ||theta - phi_i||^2 / 2`` that the training step returns; so gradient
    clipping, gradient accumulation, loss scaling under mixed precision and DDP (whose average
    over ranks of equal-sized meta-batches is the mean over all tasks) apply unchanged. The
    paper's outer update ``theta += epsilon * (mean(phi) - theta)`` is plain SGD with learning
    rate ``epsilon`` (annealed linearly to 0 in the paper: ``LinearLR`` with ``end_factor=0``);
    any other optimizer works too.

    Training fine-tunes on the support set only (the paper's "train shots"; use the
    DataModule's ``shots`` for them and ``test_shots`` for evaluation). Evaluation fine-tunes
    on the support set with ``test_inner_steps`` steps of ``test_inner_batch_size`` samples,
    then predicts the queries. The logged ``train/loss`` and ``train/acc`` are the query scores
    after fine-tuning; ``train/distance`` is the loss the outer optimizer minimises.

    Batch norm: with our backbones (no running statistics) the queries of a task are
    normalised with the statistics of all of them together, which is the paper's
    *transductive* setting (default). Its non-transductive setting, each query classified in
    a batch with the support set alone, is ``transductive=False`` (see :class:`MAML`).

    Differences from the reference implementation: every task starts a fresh inner Adam
    (the reference carries Adam's moments from task to task within training), so a task's
    adaptation never depends on the tasks before it.

    Args:
        backbone: any ``nn.Module``; all its parameters are fine-tuned.
        inner_lr: inner step size (the paper's Adam: 0.001).
        inner_steps: inner steps per task while meta-training (the paper's ``k``).
        test_inner_steps: fine-tuning steps at evaluation (the paper: 50).
        inner_optimizer: ``"adam"`` or ``"sgd"``.
        inner_betas: Adam's ``(beta1, beta2)``; the paper sets ``beta1 = 0``.
        inner_batch_size: support samples per inner step in training, drawn without
            replacement, reshuffled after every pass over the support set; ``None`` uses all.
        test_inner_batch_size: the same at evaluation.
        **kwargs: :class:`MAML`'s other arguments (``batching``, ``per_step_lr``,
            ``per_parameter_lr``, ``optimizer``, ``lr_scheduler``). Those about differentiating
            through the inner loop (``first_order``, ``first_order_steps``, ``learn_inner_lr``,
            ``multi_step_loss_steps``) and ``adapt`` are refused.

    Example::

        import lightning as L
        import torch
        from fewshot_lightning.algorithms import Reptile
        from fewshot_lightning.data import SinusoidDataModule
        from fewshot_lightning.models import MLP

        model = Reptile(MLP(), inner_lr=0.02, inner_steps=5, inner_optimizer="sgd", test_inner_steps=10,
                        optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
        L.Trainer(max_steps=2000).fit(model, SinusoidDataModule(shots=10, meta_batch_size=10))
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        test_inner_steps: Optional[int] = 50,
        inner_optimizer: str = "adam",
        inner_betas: Tuple[float, float] = (0.0, 0.999),
        inner_batch_size: Optional[int] = None,
        test_inner_batch_size: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        refuse(name, kwargs, THROUGH_INNER_LOOP, "its outer update is theta - mean(phi), not a gradient through the inner loop")
        refuse(name, kwargs, {"adapt": None}, "it fine-tunes every parameter of the backbone")
        refuse(name, kwargs, {"tasks_per_backward": ("auto", None)},
               "its update differentiates no graph through the tasks' adaptation, so there is none to split")
        kwargs["tasks_per_backward"] = None
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}.")
        if inner_optimizer == "sgd" and tuple(inner_betas) != (0.0, 0.999):  # set, and unused: Adam's option
            raise ValueError(
                f"inner_betas={list(inner_betas)} are Adam's (inner_optimizer='adam'), but inner_optimizer is 'sgd', "
                "which has none: pass inner_optimizer='adam', or drop inner_betas.")
        for name, size in (("inner_batch_size", inner_batch_size), ("test_inner_batch_size", test_inner_batch_size)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
                raise ValueError(f"{name} must be a whole number, at least 1 (or None for the whole support set), "
                                 f"got {size!r}.")
        super().__init__(backbone, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         **kwargs)
        try:
            self.inner_optimizer = Adam(betas=inner_betas) if inner_optimizer == "adam" else GradientDescent()
        except ValueError as error:  # the option the user set, not the class it reached
            raise ValueError(f"inner_betas: {error}") from None
        self.inner_batch_size = inner_batch_size
        self.test_inner_batch_size = test_inner_batch_size

    def inner_options(self, support_x: Tensor, steps: int) -> Dict[str, Any]:
        """The inner optimizer, and mini-batches of ``inner_batch_size`` support samples
        (``test_inner_batch_size`` in eval mode, i.e. at validation and test)."""
        options: Dict[str, Any] = {"optimizer": self.inner_optimizer}
        batch_size = self.inner_batch_size if self.training else self.test_inner_batch_size
        tasks, size = support_x.shape[:2]
        if batch_size is not None and batch_size < size:
            # Evaluation walks every task's support set in one fixed order: a task's score then
            # depends neither on the other tasks of its batch, nor on what drew from PyTorch's
            # generator before (a validation, another process's draws), as with the global one.
            fixed = None if self.training else torch.Generator().manual_seed(EVALUATION_ORDER_SEED)
            schedule = minibatch_schedule(tasks, size, batch_size, steps, fixed).to(support_x.device)
            options["minibatch"] = schedule.__getitem__
        return options

    def reptile_losses(self, adapted: Params) -> Tensor:
        """Per task, ``||theta - phi||^2 / 2`` over all parameters, ``[B]``: its gradient with
        respect to the initialisation ``theta`` is ``theta - phi``."""
        theta = dict(self.backbone.named_parameters())
        return sum(0.5 * (theta[name] - phi).square().flatten(1).sum(1) for name, phi in adapted.items())

    def training_losses(self, batch: TaskBatch, batching: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`reptile_losses` after fine-tuning on the support sets (no query outputs:
        Reptile's update does not look at the queries)."""
        if batching is None:
            self.choose_batching(batch)
        adapted = self.adapt(batch.support_x, batch.support_y, differentiable=False, batching=batching)
        return self.reptile_losses(adapted), None

    def differentiates_inner_gradient(self) -> bool:
        """Never: its meta-update is the adapted weights' distance, no gradient through the inner loop."""
        return False

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        batch = self.float_images(batch)
        self.choose_batching(batch)
        adapted = self.adapt(batch.support_x, batch.support_y, differentiable=False)
        losses = self.reptile_losses(adapted)
        self.train_task_losses = losses.detach()
        loss = losses.mean()
        if self.training_metrics_read(batch_idx):
            # The queries cost a forward pass that the update does not need (for Conv4 about a
            # tenth of a 5-step update): only on the steps whose metrics something reads.
            with torch.no_grad():
                outputs = self.predict(adapted, batch.query_x)
            self.log_training(self.query_losses(outputs, batch).mean(), outputs, batch)
            self.log("train/distance", loss, batch_size=batch.num_tasks, sync_dist=True)
        return loss


#: Seed of the one order in which evaluation walks every task's support set (``minibatch_schedule``).
EVALUATION_ORDER_SEED = 0


def minibatch_schedule(tasks: int, size: int, batch_size: int, steps: int,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Support indices of every inner step, ``[steps, tasks, batch_size]``.

    Each task walks through its ``size`` samples in a random order, drawing ``batch_size`` at a
    time, and reshuffles after each full pass (a batch may straddle two passes): every sample is
    used equally often, as in Reptile's reference sampler without replacement. The orders are
    drawn from PyTorch's global generator, each task its own; with a ``generator``, one order is
    drawn from it and every task walks that one (so none depends on its place in the batch).
    """
    passes = -(-steps * batch_size // size)
    if generator is None:
        order = torch.rand(tasks, passes, size).argsort(-1).flatten(1)
    else:
        order = torch.rand(1, passes, size, generator=generator).argsort(-1).flatten(1).expand(tasks, -1)
    return order[:, : steps * batch_size].reshape(tasks, steps, batch_size).transpose(0, 1)

