"""The base ``LightningModule`` every meta-learning algorithm shares."""
from __future__ import annotations

import contextlib
import inspect
import os
import random
import re
import warnings
from contextvars import ContextVar
from typing import Any, Callable, Dict, Optional, Tuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._text import listed
from ..callbacks import NonFiniteError
from ..data.task import TaskBatch, scale_images
from ..hooks import cache_step_signatures, hide_idle_hooks, quiet_profiler, restore_hooks, restore_profiler
from ..metrics import MeanConfidenceInterval
from ..lean_loop import restore_loop, use_lean_loop

#: Lightning's warning at every fit with a DataModule that MetaLearner.transfer_batch_to_device
#: (a batch already on the device is not walked) is used: meant, as the DataModules leave that
#: hook alone. Filtered at each setup (a filter set at import is undone by test runners).
_TRANSFER_HOOK_WARNING = re.escape(
    "You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`")


def is_regression(targets: Tensor) -> bool:
    """Float targets mean regression; integer targets are class labels."""
    return targets.is_floating_point()


class TaskShapeError(ValueError):
    """A batch of tasks that does not fit the learner or its backbone (shapes, labels): the
    user's data or model to fix, never a reason to fall back to another execution path."""


def per_task_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean loss of each task, ``[B]``: cross-entropy for labels, MSE for float targets.

    ``outputs`` is ``[B, M, C]`` logits or ``[B, M, *y]`` predictions; ``targets`` ``[B, M]`` or
    ``[B, M, *y]``.
    """
    if not isinstance(outputs, Tensor):
        kind = type(outputs).__name__ + (f" of {len(outputs)}" if isinstance(outputs, (tuple, list, dict)) else "")
        raise TaskShapeError(
            f"The backbone returned a {kind}, where the learners read one tensor per batch of samples (class scores "
            "or predictions). Return one tensor from its forward, or wrap it in a module whose forward returns the "
            "part to use (e.g. backbone(x)[0]).")
    if is_regression(targets):
        if outputs.shape != targets.shape:
            # Broadcasting would pair every prediction with other samples' targets ([B, M, 1]
            # against [B, M] is [B, M, M]) and train and score without an error.
            raise TaskShapeError(
                f"Regression predictions of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} "
                "differ ([tasks, samples, *y] each): the squared error would pair predictions with other samples' "
                "targets. Give the targets the predictions' shape (e.g. y.unsqueeze(-1) for one output per sample) "
                "or a backbone with one output per target value (e.g. MLP(out_features=...))."
                + (" If the targets are class labels, make them integers (y.long()): float targets are regression."
                   if outputs.dim() == targets.dim() + 1 else ""))
        return (outputs - targets).square().flatten(1).mean(1)
    if targets.dim() != 2:
        raise TaskShapeError(
            f"Class labels must be [tasks, samples], one integer per sample, but have shape {tuple(targets.shape)}"
            + (": drop the last dimension (y.squeeze(-1))." if targets.dim() == 3 and targets.shape[-1] == 1 else "."))
    if outputs.dim() != 3:
        raise TaskShapeError(
            f"Class scores must be [tasks, samples, classes] for labels of shape {tuple(targets.shape)}, but have shape "
            f"{tuple(outputs.shape)}: the backbone must give one vector of class scores per sample"
            + (" (drop the extra dimensions, e.g. end it with nn.Flatten())." if outputs.dim() > 3 else "."))
    if outputs.shape[:-1] != targets.shape:
        # cross-entropy's "Expected input batch_size (12) to match target batch_size (18)".
        raise TaskShapeError(
            f"Class scores of shape {tuple(outputs.shape)} and labels of shape {tuple(targets.shape)} differ in their "
            "tasks or samples ([tasks, samples, classes] against [tasks, samples]): score the samples the labels are "
            "of (the query set's outputs for query_y, the support set's for support_y).")
    if targets.dtype != torch.long:
        targets = targets.long()  # int32, uint8 class ids: cross-entropy takes int64
    try:
        losses = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none")
    except (IndexError, RuntimeError) as error:
        if targets.numel() and (
                int(targets.min()) < 0 or int(targets.max()) >= outputs.shape[-1]):
            raise TaskShapeError(
                f"Class labels run from {int(targets.min())} to {int(targets.max())}, but the predictions give "
                f"{outputs.shape[-1]} class scores (labels 0..{outputs.shape[-1] - 1}): label each task's classes "
                "0..N-1 with every class in its support set (the episode DataModules do), and give a backbone that "
                "classifies (MAML's) N outputs.") from error
        raise
    return losses.view(targets.shape).mean(1)


def skip_failing_nvml_probe() -> bool:
    """Stop every optimizer step from probing for a GPU driver that is not there.

    ``import lightning`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so checking for CUDA does not
    initialise it before processes fork). With it, PyTorch's CUDA build answers
    ``torch.cuda.is_available()`` by loading the NVIDIA management library afresh on every call,
    and ``torch.optim`` optimizers ask on every ``step`` (their graph-capture check): on a machine
    without an NVIDIA driver, a failed ``dlopen`` of about 80 us a step (2-3% of a sinusoid MAML
    step). Where that library cannot be loaded there is no driver, hence no CUDA device and
    nothing to keep fork-safe, so the check is switched back to the runtime's own answer
    (about 2 us, also "no GPU"). Returns whether it switched; anywhere else it changes nothing.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or not torch.backends.cuda.is_built():
        return False
    probe = getattr(torch.cuda, "_device_count_nvml", None)
    try:
        if probe is None or probe() >= 0:  # the library answers: a driver is here, keep the check
            return False
    except Exception:
        return False
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    return True


#: Optimizers whose ``fused`` implementation runs on the CPU and CUDA (torch 2.4 and later).
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def fused_if_unset(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` rebuilt with ``fused=True`` where that is its implementation choice left
    open: one of :data:`FUSED_OPTIMIZERS` (the class itself), given neither ``fused`` nor
    ``foreach`` in any group, nor ``differentiable``, with no state yet. The same update, one
    kernel per parameter tensor instead of a dozen operations: ``torch.optim`` picks it by
    itself on no device (``foreach`` on CUDA, a Python loop over each tensor on the CPU).
    torch checks the parameters' devices and dtypes only at the first step, so one step of the
    fused optimizer on a one-element tensor of each (device, dtype) the parameters have is tried
    first: where this torch has no such kernel, ``optimizer`` is returned as built."""
    if type(optimizer) not in FUSED_OPTIMIZERS or optimizer.state:
        return optimizer
    groups = optimizer.param_groups
    if any(group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable")
           for group in groups):
        return optimizer
    # the defaults the constructor takes (AdamW's ``decoupled_weight_decay`` it sets itself)
    accepted = inspect.signature(type(optimizer).__init__).parameters
    options = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    options["fused"] = True
    kinds = {(p.device, p.dtype) for group in groups for p in group["params"]}
    try:
        for device, dtype in kinds:
            trial = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
            trial.grad = torch.zeros_like(trial)
            type(optimizer)([trial], **options).step()
        return type(optimizer)([{**group, "fused": True} for group in groups], **options)
    except (RuntimeError, ValueError, TypeError):
        return optimizer


def rng_states(device: torch.device) -> Dict[str, Any]:
    """The global random number generators' states (torch, CUDA on ``device``, numpy, Python),
    as tensors and numbers, which a ``weights_only`` checkpoint load accepts."""
    numpy_state = np.random.get_state(legacy=False)
    version, python_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: Dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": int(numpy_state["pos"])},
        "has_gauss": int(numpy_state["has_gauss"]),
        "gauss": float(numpy_state["gauss"]),
    })
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


#: Value types ``MetaLearner.__setattr__`` stores without ``nn.Module``'s checks.
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None), tuple})

#: Where a trainer keeps, for a run, who reads the training metrics (``training_metrics_read``).
_READERS = "_fewshot_lightning_metrics_readers"


class WeightsMismatchError(ValueError, RuntimeError):
    """Weights (a checkpoint's) that do not fit the model as configured. A ``RuntimeError`` as
    ``nn.Module.load_state_dict``'s own error is, and a ``ValueError``: bad input."""


class _AccumulatedGradient(torch.autograd.Function):
    """A loss whose gradient is known already: the forward pass returns ``value``, the backward
    pass hands each of ``params`` its gradient in ``grads`` times the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: list, *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("The grouped training step's loss was differentiated twice: its gradient is handed "
                               "over once, in its one backward pass.")
        return (None, None, *(grad * grad_output for grad in grads))


#: The hyper-parameters a checkpoint was saved with, while ``load_from_checkpoint`` loads it.
_loading_over: ContextVar[Optional[Dict[str, Any]]] = ContextVar("loading_over", default=None)


def _saved_record(path: Any) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The ``hyper_parameters`` saved in the checkpoint file ``path`` and the learner that saved
    it, read without its tensors (memory-mapped); ``None`` for what is not there, and for
    anything but a readable local checkpoint file."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None, None
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # not a zip checkpoint: load_from_checkpoint says what it is
        return None, None
    if not isinstance(saved, dict):
        return None, None
    hyper, learner = saved.get("hyper_parameters"), saved.get("learner")
    return (dict(hyper) if isinstance(hyper, dict) else None), (learner if isinstance(learner, str) else None)


def _other_learner(saved_by: Optional[str], cls: type) -> bool:
    """Whether a checkpoint saved by the learner class named ``saved_by`` is another learner's
    than ``cls``'s. This library's learners load only their own: MAML's weights fit every
    learner derived from it (ANIL, Reptile, iMAML, ...), which would score them as its own. A
    user's subclass (outside this package) also loads the checkpoints of the learner it extends
    (and of the user's classes between them), not of that learner's bases (a MyANIL, MAML's)."""
    if not isinstance(saved_by, str) or saved_by == _qualified_name(cls):
        return False
    package = __name__.split(".")[0]
    if cls.__module__.split(".")[0] == package:
        return True
    own = []  # the user's classes, down to the first of this library's learners it extends
    for base in cls.__mro__:
        own.append(_qualified_name(base))
        if base.__module__.split(".")[0] == package:
            break
    return saved_by not in own


def _other_learner_message(saved_by: str, cls: type) -> str:
    return (f"The checkpoint being loaded was saved by {saved_by}, but this learner is {_qualified_name(cls)}: "
            "load it into the learner that saved it, or train this one.")


def _count_the_finished_batch(trainer: Any, checkpoint: Dict[str, Any]) -> None:
    """A checkpoint saved by a validation that only a stop request brought on (``should_stop``
    set at a step end, by a callback such as Lightning's ``Timer``: Lightning then validates at
    once) comes after the training batch completed but before Lightning counts it in
    ``_batches_that_stepped`` (the step its loggers use), and a resume from it does not add it
    back (the validation is not due there, so the batch's end is not run again): the resumed run
    logged every point one step early (4998 for an uninterrupted run's 4999), and the next
    logging step went missing. Count the batch in the saved state. Not for a validation that was
    due at that step (after the final step, every ``val_check_interval`` steps): a resume runs
    that batch's end again, skipping the validation, and counts it there; counted twice, every
    later point was logged one step late."""
    if trainer is None or trainer.state.fn != "fit" or not trainer.validating or trainer.sanity_checking:
        return
    epoch_loop = trainer.fit_loop.epoch_loop
    progress = epoch_loop.batch_progress.total
    if progress.completed != progress.processed or progress.completed == 0 or epoch_loop._should_accumulate():
        return
    if not trainer.should_stop or epoch_loop._batches_that_stepped != progress.completed - 1:
        return  # a validation due at this step (no stop asked), or the batch counted already
    trainer.should_stop = False  # would the validation be due without the stop?
    try:
        due = epoch_loop._should_check_val_fx(getattr(trainer.fit_loop, "_data_fetcher", None))
    finally:
        trainer.should_stop = True
    if due:
        return
    state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict")
    if isinstance(state, dict) and state.get("_batches_that_stepped") == epoch_loop._batches_that_stepped:
        state["_batches_that_stepped"] = epoch_loop._batches_that_stepped + 1


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: Entries of a learning-rate scheduler's state that record its progress, not its settings.
_SCHEDULER_PROGRESS = frozenset({"last_epoch", "base_lrs", "best", "num_bad_epochs", "cooldown_counter", "mode_worse",
                                 "verbose"})


def _plain(value: Any) -> bool:
    """A number, string, bool or None, or a list or tuple of them: a setting one can compare."""
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def same_value(a: Any, b: Any) -> bool:
    """Equal values, a tuple and a list with equal items counting as the same (a checkpoint may
    hold either for a sequence argument)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # an == with no plain answer
        return a is b


class MetaLearner(L.LightningModule):
    """Shared base: one training step is one batch of tasks.

    A subclass implements :meth:`forward`, mapping a :class:`TaskBatch` to predictions on its
    query set (``[B, N*Q, N]`` logits, or ``[B, Q, *y]`` regression outputs), and may
    override :meth:`query_losses` (default: cross-entropy or MSE, following the targets'
    dtype). This class owns the rest: the outer loss (mean over tasks), episodic evaluation
    (accuracy or MSE, mean ± 95% CI over all validation/test episodes, synced across
    processes), logging and the optimizer. Its checkpoints carry the random number generators'
    states, restored when training resumes, and it refuses to finish training with, or to
    evaluate, non-finite weights (:class:`~fewshot_lightning.callbacks.NonFiniteGuard` stops
    or skips the step that would make them).

    The constructor records the arguments of the learner's ``__init__`` (a subclass's too) as
    hyper-parameters, so checkpoints carry them. A subclass that overrides a Lightning hook this
    class implements (``setup``, ``on_validation_epoch_end``, ``on_test_epoch_end``,
    ``on_*_batch_start``, ``on_train_start``, ``on_save_checkpoint``, ``on_load_checkpoint``,
    ...) calls ``super()`` in it: those hooks log the evaluation metrics and run the checks on
    data and checkpoints, and without them a test logs nothing, silently.

    Args:
        backbone: the network (any ``nn.Module``).
        optimizer: the outer-loop optimizer, e.g. ``torch.optim.Adam`` (``lr=1e-3``) or, in
            YAML, ``{class_path: torch.optim.SGD, init_args: {lr: 0.1}}``. Adam, AdamW and
            SGD run their fused implementation (one kernel per parameter tensor: on a 2-core
            CPU, Adam's step on Conv4's parameters in a quarter of the time, a sinusoid MAML
            meta-iteration 7% to 15% faster) unless the optimizer is given ``fused`` or
            ``foreach``, the parameters' device or torch version has no fused kernel
            (:func:`fused_if_unset`), 16-bit mixed precision's loss scaler is in use, or gradients
            are clipped under mixed precision (which Lightning does not do for a fused optimizer).
        lr_scheduler: optional outer learning-rate scheduler, stepped every training step;
            ``torch.optim.lr_scheduler.ReduceLROnPlateau`` is stepped after every validation
            instead, on :attr:`plateau_metric` (the validation loss; give it that metric's mode).
    """

    #: Whether evaluation needs autograd (gradient-based adaptation) even under ``inference_mode``.
    needs_grad_at_eval: bool = False
    #: The kinds of task the learner solves: ``"classification"`` (integer labels) and/or
    #: ``"regression"`` (float targets). A DataModule of another kind stops the run at setup.
    task_kinds: Tuple[str, ...] = ("classification", "regression")
    #: Whether the backbone takes the samples as they are (checked against its ``input_shape``).
    backbone_reads_samples: bool = True
    #: Whether ``fit`` runs each training batch and automatic optimization step without
    #: Lightning's layers around them where nothing needs them (:mod:`fewshot_lightning.lean_loop`:
    #: same hooks, same order, same result; Lightning's own wherever it cannot be the same).
    lean_loop: bool = True
    #: The backward pass in groups of this many tasks (see :meth:`grouped_loss`);
    #: ``None``: the whole batch at once. Learners that offer it take it as an argument.
    tasks_per_backward: Optional[int] = None

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module.__setattr__``, with a shortcut for plain values (``str``, numbers, ``None``)
        under a name that is no parameter, buffer or submodule: stored as on any object, which
        is all ``nn.Module`` does with them after its checks. Lightning sets
        ``_current_fx_name`` twice around every hook call, some forty times a training step, and
        the checks (``isinstance`` against ``Parameter``'s metaclass) make each of those several
        times slower than a plain attribute's: a measurable part of ``Trainer.fit``'s own cost
        on a step as short as sinusoid MAML's (docs/benchmarks.md)."""
        if type(value) in _PLAIN_TYPES:
            held = self.__dict__
            if name not in held.get("_parameters", ()) and name not in held.get("_buffers", ()) \
                    and name not in held.get("_modules", ()):
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        if isinstance(backbone, type) and issubclass(backbone, nn.Module):
            raise TypeError(f"{type(self).__name__} takes a backbone module, not its class: pass "
                            f"{backbone.__name__}(...), an instance, not {backbone.__name__}.")
        if not isinstance(backbone, nn.Module):
            # A dict or jsonargparse's NestedArg: the command line could not build the backbone,
            # because the learner's argument has no type to build it from.
            unbuilt = isinstance(backbone, (dict, str)) or type(backbone).__name__ == "NestedArg"
            raise TypeError(
                f"{type(self).__name__}'s backbone must be a torch.nn.Module (e.g. fewshot_lightning.models.Conv4(...)), "
                f"got {type(backbone).__name__}."
                + (f" From the command line or a config, annotate the argument, `backbone: torch.nn.Module`, in "
                   f"{type(self).__name__}.__init__: the CLI builds a class from its argument's type." if unbuilt else ""))
        super().__init__()
        # The constructor's arguments (a subclass's too: Lightning collects every __init__ of this
        # object up the stack), so a checkpoint records what it was trained with and a run that
        # evaluates it with other values says so; a subclass calling it again changes nothing.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
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
        #: The query loss of each task of the current training batch, ``[B]``, detached: what
        #: :class:`~fewshot_lightning.callbacks.NonFiniteGuard` reports a non-finite loss with.
        self.train_task_losses: Optional[Tensor] = None
        self._resumed_rng_states: Optional[Dict[str, Any]] = None
        #: The splits whose first batch of this run was checked (:meth:`_check_labels_once`).
        self._labels_checked: set = set()
        #: A ``ReduceLROnPlateau`` given as ``lr_scheduler``, stepped by :meth:`_step_plateau`, and
        #: the validations it stepped on.
        self._plateau: Optional[torch.optim.lr_scheduler.ReduceLROnPlateau] = None
        self._plateau_steps = 0
        #: The outer optimizer's and scheduler's saved states of the checkpoint ``fit`` resumes
        #: from, compared with the configured ones and restored (a plateau's, which Lightning does
        #: not hold) in :meth:`configure_optimizers`.
        self._resumed_outer: Optional[Dict[str, Any]] = None
        #: This training step's loss, outputs and batch when it logged nothing (see on_train_batch_end).
        self._unlogged_step: Optional[tuple] = None

    # -- what subclasses implement ------------------------------------------------------------
    def forward(self, batch: TaskBatch) -> Tensor:
        """Query predictions of every task in the batch."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward(batch): the query predictions of every task of the "
            "TaskBatch, [tasks, queries, ways] class scores or [tasks, queries, *y] values (see MetaLearner's "
            "docstring: a learner implements forward, and training_losses where its training differs).")

    def query_losses(self, outputs: Tensor, batch: TaskBatch) -> Tensor:
        """Loss of each task, ``[B]``."""
        return per_task_loss(outputs, batch.query_y)

    def point_predictions(self, outputs: Tensor) -> Tensor:
        """Regression predictions from :meth:`forward`'s output (an identity unless it predicts
        a distribution)."""
        return outputs

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        batch = self.float_images(batch)
        group = self.backward_group(batch)
        if group is not None and group < batch.num_tasks and torch.is_grad_enabled() \
                and any(p.requires_grad for p in self.parameters()):
            loss, losses, outputs = self.grouped_loss(batch, group)
        else:
            losses, outputs = self.training_losses(batch)
            loss = losses.mean()
        self.train_task_losses = losses.detach()
        if self.training_metrics_read(batch_idx):
            self.log_training(loss, outputs, batch)
            self._unlogged_step = None
        else:  # logged after all if the run stops at this step's end (on_train_batch_end)
            self._unlogged_step = (loss.detach(), None if outputs is None else outputs.detach(), batch)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        unlogged, self._unlogged_step = self._unlogged_step, None
        if unlogged is not None and self._trainer is not None and self.trainer.should_stop:
            # A stop asked at this step's end (SIGTERM, Ctrl-C, a Timer; on every rank at once) makes
            # Lightning write the training metrics now: without this step's, it wrote the last
            # logged step's values again at this step.
            self.log_training(*unlogged)

    def backward_group(self, batch: TaskBatch) -> Optional[int]:
        """The tasks per backward pass of this training step (``None``: the whole batch):
        :attr:`tasks_per_backward`; a learner that chooses it (MAML's ``"auto"``) decides here."""
        return self.tasks_per_backward

    def grouped_loss(self, batch: TaskBatch, group: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The training loss with the meta-gradient accumulated over groups of ``group`` tasks
        (``tasks_per_backward``): each group's losses are differentiated
        (``torch.autograd.grad``) as soon as they are computed, so that one group's graph (its
        activations and, for second-order MAML, its inner steps' graphs) is held at a time, not
        the whole batch's, as learn2learn's examples do with a ``backward()`` per task. The
        tasks are independent (each its own adaptation and, with batch norm, its own
        statistics), so the gradient is the whole batch's, up to the order of float additions.

        Returns ``(loss, losses, outputs)``: the batch's mean loss, as a tensor whose backward
        pass hands every trainable parameter the accumulated gradient times the incoming
        gradient, so that what Lightning does to a loss applies as to any (under DDP the
        gradients are averaged across processes in that backward pass; 16-bit mixed
        precision's loss scale and gradient accumulation multiply them); and, detached, each
        task's loss and the query outputs, as :meth:`training_losses` gives them. Under 16-bit
        mixed precision each group's loss is also scaled by the ``GradScaler``'s scale for its
        own backward pass (so that fp16 gradients do not flush to zero) and its gradient
        unscaled after (an overflow shows as a non-finite gradient, which the scaler skips, as
        it would the whole batch's)."""
        params = [p for p in self.parameters() if p.requires_grad]
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        # A parameter's gradient hooks (Tensor.register_hook: a mask, a scale, a logger's
        # histogram) run on the batch's gradient once, when the returned loss's backward hands it
        # over, as with the whole batch, not on every group's part as well. The table set aside
        # is the one Tensor.register_hook writes and autograd reads (`_backward_hooks`, private).
        hooked = [(p, dict(p._backward_hooks)) for p in params if p._backward_hooks]
        for p, _ in hooked:
            p._backward_hooks.clear()
        try:
            total, grads, task_losses, task_outputs = self._group_gradients(batch, group, params, scale)
        finally:
            for p, hooks in hooked:
                p._backward_hooks.update(hooks)
        outputs = None if any(out is None for out in task_outputs) else torch.cat(task_outputs)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        loss = _AccumulatedGradient.apply(total, [g for _, g in used], *(p for p, _ in used))
        return loss, torch.cat(task_losses), outputs

    def _group_gradients(self, batch: TaskBatch, group: int, params: list, scale: Optional[float],
                         losses_of: Optional[Callable[[TaskBatch], Tuple[Tensor, Optional[Tensor]]]] = None) -> tuple:
        """:meth:`grouped_loss`'s passes: (the batch's mean loss, detached; the summed
        gradients, ``None`` where unused; each group's losses and outputs, detached).
        ``losses_of`` computes a group's losses and outputs (default :meth:`training_losses`)."""
        losses_of = self.training_losses if losses_of is None else losses_of
        total: Optional[Tensor] = None
        grads: list = [None] * len(params)
        task_losses, task_outputs = [], []
        for start in range(0, batch.num_tasks, group):
            part = TaskBatch(*(t[start:start + group] for t in batch))
            losses, outputs = losses_of(part)
            part_loss = losses.sum() / batch.num_tasks
            part_grads = torch.autograd.grad(part_loss if scale is None else part_loss * scale, params,
                                             allow_unused=True)
            for index, grad in enumerate(part_grads):
                if grad is None:
                    continue
                if scale is not None:
                    grad = grad / scale
                grads[index] = grad if grads[index] is None else grads[index] + grad
            total = part_loss.detach() if total is None else total + part_loss.detach()
            task_losses.append(losses.detach())
            task_outputs.append(None if outputs is None else outputs.detach())
            del losses, outputs, part_loss, part_grads  # this group's graph goes before the next is built
        return total, grads, task_losses, task_outputs

    def training_metrics_read(self, batch_idx: int) -> bool:
        """Whether anything reads this step's training metrics: the loggers (Lightning writes
        ``on_step`` metrics every ``log_every_n_steps`` optimizer steps), the progress bar (every
        ``refresh_rate`` batches and at an epoch's last), or a callback or learning-rate scheduler
        that monitors a ``train/`` metric (then every step). On the other steps the ``self.log``
        calls are skipped: under ``Trainer.fit`` they cost about 0.6 ms a step, a sixth of a
        sinusoid MAML step (docs/benchmarks.md). Without a trainer: ``True``. Who reads is
        looked up once a run (its callbacks and schedulers at its first step), as every trainer
        attribute read inside a step costs some microseconds, not the fraction of one it takes
        in a loop of its own (the caches hold the step's kernels by then). A training step does
        not run in the sanity check, which is validation."""
        trainer = self._trainer
        if trainer is None:
            return True
        readers = trainer.__dict__.get(_READERS)  # kept on the trainer: a module copied or pickled
        if readers is None or readers[0] is not self:  # (SWA's deepcopy) must not carry the trainer
            readers = self._find_metrics_readers(trainer)
            trainer.__dict__[_READERS] = readers
        _, monitored, epoch_loop, every, bar, rate = readers
        if monitored or trainer.should_stop:
            return True
        if every and (epoch_loop.global_step + 1) % every == 0:
            return True
        # Under DDP Lightning disables the bar on every process but 0; the answer must be the
        # same on all (the training metrics are logged with sync_dist, a collective call).
        if bar is not None and (getattr(bar, "is_enabled", True) or trainer.world_size > 1):
            if not isinstance(rate, int) or rate <= 1 or (batch_idx + 1) % rate == 0:
                return True
            if batch_idx + 1 == trainer.num_training_batches:
                return True
        return False

    def _find_metrics_readers(self, trainer: Any) -> tuple:
        """``(self, monitored, the epoch loop, log_every_n_steps, the progress bar, its refresh
        rate)`` for :meth:`training_metrics_read`; ``monitored`` where a callback or scheduler
        monitors a ``train/`` metric, or under ``fast_dev_run``."""
        monitors = [getattr(callback, "monitor", None) for callback in trainer.callbacks]
        monitors += [config.monitor for config in trainer.lr_scheduler_configs]
        monitored = bool(trainer.fast_dev_run) or any(isinstance(name, str) and name.startswith("train/") for name in monitors)
        bar = trainer.progress_bar_callback
        return self, monitored, trainer.fit_loop.epoch_loop, trainer.log_every_n_steps, bar, getattr(bar, "refresh_rate", 1)

    def training_losses(self, batch: TaskBatch) -> Tuple[Tensor, Optional[Tensor]]:
        """The training loss of each task, ``[B]`` (the step minimises their mean), and the query
        outputs it came from (``None`` if it did not come from query outputs)."""
        outputs = self(batch)
        return self.query_losses(outputs, batch), outputs

    def log_training(self, loss: Tensor, outputs: Optional[Tensor], batch: TaskBatch) -> None:
        """Log ``train/loss`` and, for classification outputs, ``train/acc``: on the steps
        :meth:`training_metrics_read` says anything reads them."""
        size = batch.num_tasks
        # sync_dist: under DDP the step's loss is the mean over every process's tasks (each
        # process holds meta_batch_size of them); without it the log was process 0's share.
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        if outputs is not None and not is_regression(batch.query_y):
            accuracy = (outputs.argmax(-1) == batch.query_y).float().mean()
            self.log("train/acc", accuracy, prog_bar=True, batch_size=size, sync_dist=True)

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

    def float_images(self, batch: TaskBatch) -> TaskBatch:
        """``uint8`` images scaled to ``[0, 1]`` in the weights' floating type. The DataModules
        do this after moving a batch to the device; batches that come another way (a Trainer
        given their dataloaders, ``training_step`` called directly) met float weights with
        ``uint8`` images ("Input type (unsigned char) and bias type (float)")."""
        if not isinstance(batch, TaskBatch) or (batch.support_x.dtype != torch.uint8 and batch.query_x.dtype != torch.uint8):
            return batch
        scaled = scale_images(batch)
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        return scaled._replace(support_x=scaled.support_x.to(dtype), query_x=scaled.query_x.to(dtype))

    def _autograd_ready(self, batch: TaskBatch) -> TaskBatch:
        if self.needs_grad_at_eval and any(t.is_inference() for t in batch):
            # Tensors made under inference_mode cannot enter autograd; a clone can. (Every part:
            # uint8 images scaled below are new tensors, but the labels would still be the loader's.)
            batch = TaskBatch(*(t.clone() for t in batch))
        return self.float_images(batch)

    def _evaluate(self, batch: TaskBatch, stage: str) -> Dict[str, Tensor]:
        self._check_task_kind(batch)
        with self._eval_context():
            batch = self._autograd_ready(batch)
            outputs = self.evaluation_outputs(batch, stage)
            losses = self.query_losses(outputs, batch)
            scores = self.scores(outputs, batch)
        metrics = self.eval_metrics[stage]
        metrics["loss"].update(losses)
        metrics["score"].update(scores)
        return {"loss": losses, "score": scores}

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> Dict[str, Tensor]:
        """Query predictions of every task, adapted as at test time: class labels ``[B, N*Q]``
        (classification) or point predictions ``[B, Q, *y]`` (regression), with the query
        targets ``query_y`` to score them by."""
        with self._eval_context():
            batch = self._autograd_ready(batch)
            outputs = self.evaluation_outputs(batch, "predict")
        if is_regression(batch.query_y):
            predictions = self.point_predictions(outputs)
        else:
            predictions = outputs.argmax(-1)
        return {"query_predictions": predictions, "query_y": batch.query_y}

    def setup(self, stage: str) -> None:
        warnings.filterwarnings("ignore", message=_TRANSFER_HOOK_WARNING)
        self._labels_checked.clear()  # each split's first batch of this run (_check_labels_once)
        datamodule = getattr(self.trainer, "datamodule", None)
        data_kind = getattr(datamodule, "task_kind", None)  # tasks that are not labelled data (RL goals)
        if data_kind is not None or "reinforcement" in self.task_kinds:
            self._check_data_kind(datamodule, data_kind)
        kind = getattr(datamodule, "regression", None)
        if kind is not None and data_kind is None:
            self.regression = bool(kind)
            self._check_kind_solved(type(datamodule).__name__)
        if stage == "fit":
            self._check_not_compiled()
        if stage == "fit" and self.trainer.strategy.root_device.type == "cpu":
            skip_failing_nvml_probe()
        # Lightning calls every per-batch hook of every callback at every step, empty or not: the
        # empty ones are skipped for this run (``hooks``), until teardown (after an exception,
        # which calls no module hook, until the callbacks' next run with a learner).
        hide_idle_hooks(self.trainer.callbacks)
        # And the default profiler's context around every hook, which records nothing, and the
        # step's signature, which Lightning reads at every batch, cost next to nothing.
        quiet_profiler(self.trainer.profiler)
        cache_step_signatures(self)
        # And the training batch and optimization step, without Lightning's layers around them.
        if stage == "fit":
            use_lean_loop(self.trainer)

    def arguments_in_weights(self) -> Dict[str, str]:
        """The constructor arguments whose values live in saved tensors (argument name -> the
        tensors' name in the state dict): loading a checkpoint restores the tensors, so a value
        configured then is not used (the CLI refuses one that differs from the checkpoint's)."""
        # ProtoNet's and MatchingNet's scale (register_log_scale: a parameter or a buffer).
        return {"scale": "log_scale"} if isinstance(getattr(self, "log_scale", None), Tensor) else {}

    def compiled_by_lightning(self) -> bool:
        """Whether this module was passed to fit compiled, ``trainer.fit(torch.compile(module))``:
        Lightning then compiles its ``forward`` and step methods and marks it ``_compiler_ctx``."""
        return getattr(self, "_compiler_ctx", None) is not None

    def differentiates_inner_gradient(self) -> bool:
        """Whether some training step of this run differentiates an inner loop's gradient (second
        order): never for a learner without an inner loop; the gradient-based learners say."""
        return False

    def _check_not_compiled(self) -> None:
        """``trainer.fit(torch.compile(module))`` has Lightning compile the module's ``forward``
        and step methods (it marks the module ``_compiler_ctx``), whose AOTAutograd backward
        cannot be differentiated again: a second-order step stopped with PyTorch's "does not
        currently support double backward" (MAML) or "compiled with non-empty donated buffers"
        (MAML-RL), and under a MAML++ schedule only when the first-order steps ended, hours into a
        run. Said before anything runs, with the fix."""
        if not self.compiled_by_lightning() or not self.differentiates_inner_gradient():
            return
        first_order_steps = getattr(self, "first_order_steps", 0)
        when = (f"at step {first_order_steps}, when first_order_steps={first_order_steps} first-order "
                "steps end" if first_order_steps > 0 else "at its first training step")
        raise ValueError(
            f"{type(self).__name__} differentiates its inner loop's gradient (second order), and a module "
            f"compiled with torch.compile cannot be: its compiled backward cannot be differentiated again, so the "
            f"run would stop {when}. Pass the module itself to fit instead of torch.compile(module), or train "
            "first order (first_order=True, --model.init_args.first_order true).")

    def teardown(self, stage: str) -> None:
        self.trainer.__dict__.pop(_READERS, None)
        restore_hooks(self.trainer.callbacks)
        restore_profiler(self.trainer.profiler)
        restore_loop(self.trainer)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A :class:`TaskBatch` whose tensors are all on ``device`` already (training on the
        CPU) is returned as it is, which is what Lightning's transfer returns, less its walk of
        the batch at every step; anything else goes to Lightning's."""
        if type(batch) is TaskBatch and all(type(part) is Tensor and part.device == device for part in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _check_data_kind(self, datamodule: Any, data_kind: Optional[str]) -> None:
        """Refuse a DataModule of goals (reinforcement learning) given to a learner of labelled
        tasks, and labelled data given to a learner of goals: each stopped in a traceback ("'GoalBatch'
        object has no attribute 'query_y'", "GoalBatch.__new__() takes 3 positional arguments")."""
        if datamodule is None:
            return
        kind = data_kind or ("regression" if getattr(datamodule, "regression", False) else "classification")
        if kind in self.task_kinds:
            return
        described = {"reinforcement": "reinforcement-learning tasks (goals to reach, rollouts in training_step)",
                     "regression": "regression tasks (float targets)",
                     "classification": "classification tasks (integer labels)"}
        learners = {"reinforcement": "MAMLRL (configs/maml_rl_navigation.yaml, anil_rl_navigation.yaml)",
                    "regression": "the MAML family (MAML, ANIL, Meta-SGD, MAML++, Reptile, iMAML, CAVIA) or CNP",
                    "classification": "the MAML family, ProtoNet, MatchingNet, RelationNet or AttentionLearner"}
        solved = " or ".join(described[wanted] for wanted in self.task_kinds)
        data_for = ("fewshot_lightning.rl.NavigationDataModule" if self.task_kinds == ("reinforcement",)
                    else "a DataModule of labelled tasks (fewshot_lightning.data)")
        raise ValueError(
            f"{type(self).__name__} solves {solved}, but {type(datamodule).__name__} makes {described[kind]}. "
            f"Use {data_for}, or a learner for {kind} tasks: {learners[kind]}.")

    def _check_kind_solved(self, data: str, regression: Optional[bool] = None) -> None:
        """Refuse tasks of a kind the learner does not solve (a metric learner given regression
        tasks failed deep in its backbone, a CNP given images in an indexing error, or scored
        as a classifier when its batches came without a DataModule). ``regression``: the kind of
        the tasks (default: :attr:`regression`)."""
        kind = "regression" if (self.regression if regression is None else regression) else "classification"
        if kind in self.task_kinds:
            return
        described = {"regression": "regression tasks (float targets)",
                     "classification": "classification tasks (integer labels)"}
        others = {"regression": "the MAML family (MAML, ANIL, Meta-SGD, MAML++, Reptile, iMAML, CAVIA) or CNP",
                  "classification": "the MAML family, ProtoNet, MatchingNet, RelationNet or AttentionLearner"}
        raise ValueError(
            f"{type(self).__name__} solves {described[self.task_kinds[0]]}, but {data} makes {described[kind]}. "
            f"Use a DataModule of {described[self.task_kinds[0]].split(' (')[0]}, or a learner for {kind}: "
            f"{others[kind]}."
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._check_input_shape(batch)
        self._check_labels_once(batch, "train")

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_input_shape(batch)
        self._check_labels_once(batch, "val")

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_input_shape(batch)
        self._check_labels_once(batch, "test")

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_input_shape(batch)
        self._check_labels_once(batch, "predict")

    def _check_labels_once(self, batch: Any, split: str) -> None:
        """On a split's first classification batch of a run, the episode contract every learner
        relies on: each task's classes labelled ``0..N-1``, each in its support set, the query
        labels among them. A hand-built batch labelled ``1..N`` trained a MAML whose head had
        N + 1 outputs without a word (class 0 never a target, but scored at every argmax), and
        one whose query held a class its support lacked scored it unadaptable. The metric
        learners check every batch already (they read N from the labels); for the others a look
        at the first batch of each split costs nothing per step (no device sync after it)."""
        if split in self._labels_checked or not isinstance(batch, TaskBatch):
            return
        self._labels_checked.add(split)
        self._check_kind_solved(f"the data of its {split} batches", is_regression(batch.query_y))
        if is_regression(batch.query_y) or batch.support_y.dim() != 2 or batch.query_y.dim() != 2 \
                or not batch.support_y.numel():
            return
        from .episode_ops import num_ways

        ways = num_ways(batch.support_y)
        query = batch.query_y
        if query.numel() and (int(query.min()) < 0 or int(query.max()) >= ways):
            raise TaskShapeError(
                f"The query labels of a {split} batch run from {int(query.min())} to {int(query.max())}, but its tasks' "
                f"support sets hold classes 0..{ways - 1}: a query class with no support example cannot be learned "
                "from the task. Label the query with the support's labels of the same classes (the episode "
                "DataModules do).")

    def _check_input_shape(self, batch: Any) -> None:
        """Refuse samples of another shape than the backbone was built for (its ``input_shape``,
        if it has one): a Conv4 built for 84x84 colour images given 28x28 grey ones failed in
        its head with "mat1 and mat2 shapes cannot be multiplied", or in its first convolution.
        The error names the backbone's arguments to change and their values."""
        expected = getattr(self.backbone, "input_shape", None)
        if expected is None or not self.backbone_reads_samples or not isinstance(batch, TaskBatch):
            return
        backbone = type(self.backbone).__name__
        dtype = batch.support_x.dtype
        if not (dtype.is_floating_point or dtype.is_complex or dtype == torch.uint8):
            # A backbone that says its input shape computes in floating point: PyTorch's "Input
            # type (long int) and bias type (float) should be the same", at the first step.
            raise ValueError(
                f"{type(self).__name__}'s backbone {backbone} computes in floating point, but the samples are "
                f"{dtype}: give images as uint8 (0 to 255, scaled to [0, 1] for you) or as floats (`x.float() / 255` "
                "for 0-255 values), or other data as floats.")
        got = tuple(batch.support_x.shape[2:])
        if len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got)):
            return
        if len(got) == len(expected) == 3 and got[2] in (1, 3, 4) and min(got[:2]) > 4 and expected[0] != got[0] \
                and all(e is None or e == g for e, g in zip(expected[1:], got[:2])):
            # [H, W, C] images (PIL's and numpy's order) read as C = H channels of H x C maps.
            channels = "" if expected[0] in (None, got[2]) else \
                f"; and build the backbone for {got[2]} channel(s) (it takes {expected[0]})"
            raise ValueError(
                f"{type(self).__name__}'s backbone {backbone} takes images as [channels, height, width] "
                f"{[e if e is not None else 'any' for e in expected]}, but the batches hold them channels-last, "
                f"{list(got)} ([height, width, channels]): give them channels first, e.g. `images.permute(0, 3, 1, 2)` "
                f"on an [N, H, W, C] array of images{channels}.")
        names = getattr(self.backbone, "input_arguments", None)
        if names is not None and len(names) == len(expected) == len(got):
            wrong = dict.fromkeys(f"{name} {value}" for name, e, value in zip(names, expected, got)
                                  if e is not None and e != value)
            fix = "build it with " + " and ".join(f"--model.init_args.backbone.init_args.{arg}" for arg in wrong)
        else:
            fix = "build it for these samples"
        raise ValueError(
            f"{type(self).__name__}'s backbone {backbone} was built for samples of shape "
            f"{[e if e is not None else 'any' for e in expected]}, but the batches hold samples of shape "
            f"{list(got)}: {fix}, or have the DataModule make samples of the shape it expects."
        )

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
            # compute() already reduced over processes, so every rank holds the same value and
            # sync_dist's mean returns it unchanged; without it Lightning warns under DDP.
            self.log(f"{stage}/{name}", mean, prog_bar=key == "score", sync_dist=True)
            self._step_plateau(f"{stage}/{name}", mean)
            self.log(f"{stage}/{name}_ci95", ci95, sync_dist=True)
            metrics[key].reset()
            if key == "loss" and not torch.isfinite(mean) and torch.isfinite(metrics["score"].compute()[0]):
                # An accuracy stays finite (an argmax of NaN scores is class 0): said, not scored in silence.
                rank_zero_warn(
                    f"{stage}/loss is {float(mean)} while {stage}/{self.score_name} is finite: the predictions were "
                    f"not finite on at least one {stage} episode, and the score is that of an argmax over them; "
                    f"{self._nonfinite_prediction_cause()}.")
            if key == "score" and not torch.isfinite(mean):
                rank_zero_warn(
                    f"{stage}/{name} is {float(mean)}: on at least one {stage} episode the prediction was not "
                    f"finite (the weights themselves are finite); {self._nonfinite_prediction_cause()}."
                )

    def _nonfinite_prediction_cause(self) -> str:
        """The likely cause of a finite model's non-finite evaluation prediction, and the fix."""
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
        if precision.startswith("16"):
            # 16-true casts the whole model: a CNP's encoder overflowed after two steps.
            return (f"under {precision} precision the activations overflowed float16's range (at most 65504): "
                    "train and evaluate with 32-true or bf16-mixed")
        if self.needs_grad_at_eval:
            return "the test-time adaptation diverged there: lower inner_lr or test_inner_steps"
        return "the model's outputs overflowed on those inputs"

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    #: The validation metric a ``ReduceLROnPlateau`` outer scheduler steps on, and its mode.
    plateau_metric: Tuple[str, str] = ("val/loss", "min")

    def _step_plateau(self, name: str, value: Any) -> None:
        """Step a ``ReduceLROnPlateau`` outer scheduler on ``value`` if ``name`` is its
        :attr:`plateau_metric` (called as validation logs its metrics, reduced over processes):
        before the callbacks' ``on_validation_end``, so a checkpoint saved there holds the step."""
        trainer = self._trainer
        if self._plateau is None or name != self.plateau_metric[0] or trainer is None or trainer.sanity_checking \
                or trainer.state.fn != "fit":
            return
        self._plateau.step(float(value))
        self._plateau_steps += 1

    def on_test_epoch_end(self) -> None:
        self._warn_if_partial_test()
        self._log_eval("test")

    def _warn_if_partial_test(self, metrics: Optional[Any] = None, reported: Optional[str] = None) -> None:
        """Say so when a test scored fewer episodes than the DataModule's test set (a
        ``--trainer.limit_test_batches`` left in, say): its mean and interval are then not the
        protocol's (600 episodes in the papers), however the results table looks. ``metrics``
        (a :class:`MeanConfidenceInterval` counting the episodes; default the test score's) and
        ``reported`` (what the message names; default ``test/<score>``) for other learners."""
        metrics = self.eval_metrics["test"]["score"] if metrics is None else metrics
        planned = getattr(getattr(self._trainer, "datamodule", None), "num_tasks", {}).get("test")
        if not metrics.update_called or not isinstance(planned, int):
            return
        scored = int(self.all_gather(metrics.count).sum())
        if scored < planned:
            rank_zero_warn(
                f"This test scored {scored} of the {planned} test episodes (--trainer.limit_test_batches?): its "
                f"{reported or 'test/' + self.score_name} and interval are not the full protocol's, which the papers "
                "report."
            )

    # -- trustworthy runs ---------------------------------------------------------------------
    def on_train_end(self) -> None:
        self._check_finite_weights("Training ended with")
        if self._plateau is not None and not self._plateau_steps:
            rank_zero_warn(
                f"The ReduceLROnPlateau outer scheduler never stepped: no validation reported "
                f"{self.plateau_metric[0]} during this run, so the learning rate never changed. Validate during "
                "training (--trainer.val_check_interval N with validation episodes), or use another scheduler.")

    def on_validation_start(self) -> None:
        self._check_finite_weights("Validation would score")

    def on_test_start(self) -> None:
        self._check_finite_weights("Testing would score")

    def on_predict_start(self) -> None:
        self._check_finite_weights("Predicting would use")

    def _check_finite_weights(self, what: str) -> None:
        # Parameters, and batch norm's running statistics (a forward pass updates them before a
        # skipped step's gradients are dropped). Not other buffers: a causal mask holds -inf by design.
        tensors = list(self.named_parameters()) + [
            (f"{module_name}.{name}" if module_name else name, buffer)
            for module_name, module in self.named_modules() if isinstance(module, _BatchNorm)
            for name in ("running_mean", "running_var") for buffer in [getattr(module, name, None)]
            if buffer is not None]
        broken = [name for name, p in tensors if not bool(torch.isfinite(p).all())]
        if broken:
            shown = listed(broken, 3)
            raise NonFiniteError(
                f"{what} non-finite weights (NaN or inf in {shown}), which would give a meaningless score. "
                "Train with NonFiniteGuard (the CLI always does: --nonfinite.policy raise|skip) to stop at the "
                "step that makes them, or evaluate an earlier checkpoint."
            )

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states(self.device)
        if self._plateau is not None:
            # Stepped by the learner, not Lightning, so not among Lightning's saved schedulers.
            checkpoint["plateau_scheduler"] = self._plateau.state_dict()
        optimizers = getattr(self._trainer, "optimizers", None) if self._trainer is not None else None
        if optimizers:
            optimizer = getattr(optimizers[0], "optimizer", optimizers[0])  # under Lightning's wrapper, if any
            checkpoint["outer_optimizer"] = _qualified_name(type(optimizer))
        checkpoint["learner"] = _qualified_name(type(self))
        _count_the_finished_batch(self._trainer, checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """``LightningModule.load_from_checkpoint``, which writes the arguments given over the
        checkpoint's saved ones before the module sees them: the saved ones are read first (from a
        local file), so that :meth:`on_load_checkpoint` can refuse a given value that the
        checkpoint's weights would override (:meth:`_check_arguments_in_weights`). The backbone
        must be given (``backbone=Conv4(...)``): a checkpoint holds its weights, not how to build
        it (without it, an ``argparse`` error from Lightning's loader)."""
        if "backbone" not in kwargs and not args:
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint needs the backbone the checkpoint's weights go into: "
                f"{cls.__name__}.load_from_checkpoint(path, backbone=...), built as in the run's config.yaml (its "
                "model.init_args.backbone), e.g. backbone=Conv4(hidden=64, out_features=5). The checkpoint holds the "
                "weights, not how to build the network.")
        hyper_parameters, saved_by = _saved_record(checkpoint_path)
        if _other_learner(saved_by, cls):  # before the learner is built from its arguments (MetaSGD refuses MAML's)
            raise ValueError(_other_learner_message(saved_by, cls))
        token = _loading_over.set(hyper_parameters if kwargs else None)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _loading_over.reset(token)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        saved_by = checkpoint.get("learner")
        if _other_learner(saved_by, type(self)):
            # Another learner's weights can fit (a MatchingNet's into a ProtoNet of the same
            # backbone and scale, MAML's into ANIL or Reptile) and be scored as this one's, exit 0.
            raise ValueError(_other_learner_message(saved_by, type(self)))
        self._check_arguments_in_weights(checkpoint)
        self._resumed_rng_states = checkpoint.get("rng_states")
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            # Only a resumed fit restores the scheduler; a new run (load_from_checkpoint, or a
            # test of a checkpoint before a fit) keeps the one it was given.
            self._resumed_outer = {key: checkpoint.get(key)
                                   for key in ("optimizer_states", "lr_schedulers", "plateau_scheduler", "outer_optimizer")}

    def _check_arguments_in_weights(self, checkpoint: Dict[str, Any]) -> None:
        """A checkpoint restores the tensors behind :meth:`arguments_in_weights`, so a learner
        built with another value of one of those arguments than the checkpoint's
        (``MAML.load_from_checkpoint(path, inner_lr=0.1)`` under MAML++'s per-step rates,
        ``trainer.test(ProtoNet(..., scale=5.0), ckpt_path=...)``) would run with the
        checkpoint's value while its hyper-parameters say the other: refused, with the fix. (The
        ``fewshot-lightning`` command says the same earlier, in its own words.)"""
        saved = _loading_over.get()
        if saved is None:
            saved = checkpoint.get("hyper_parameters")
        if not isinstance(saved, dict):
            return
        configured = dict(getattr(self, "hparams", {}))
        held = self.arguments_in_weights()
        differ = [name for name in held
                  if name in saved and name in configured and not same_value(saved[name], configured[name])]
        if differ:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint being loaded was saved with "
                + ", ".join(f"{name}={saved[name]!r}" for name in differ)
                + " and this learner was built with " + ", ".join(f"{name}={configured[name]!r}" for name in differ)
                + f", but {type(self).__name__} keeps " + ", ".join(f"{name} in its weights ({held[name]})" for name in differ)
                + ", which the checkpoint restores: the value given would not be used. Build the learner with the "
                "checkpoint's value (load_from_checkpoint without that argument), or train a new model to use another.")

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        # Weights saved by another model or configuration (a checkpoint of another config, or a
        # changed backbone size) fail in nn.Module with a message that does not say why.
        try:
            return super().load_state_dict(state_dict, *args, **kwargs)
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            details = "; ".join(line.strip().rstrip(".") for line in str(error).splitlines()[1:3])[:600]
            message = (
                f"{type(self).__name__}: these weights do not fit the model as configured, they were saved by "
                "another model or configuration; load them with the config they were trained with (their run "
                f"folder's config.yaml). {details}."
            )
            raise WeightsMismatchError(message) from error

    def on_fit_start(self) -> None:
        # After Lightning restored (and the DataModule checked) a checkpoint: the run folder's
        # class split file, held back where it recorded another split.
        write = getattr(getattr(self._trainer, "datamodule", None), "write_pending_split_file", None)
        if callable(write):
            write()

    def on_train_start(self) -> None:
        # Restored here rather than at load: between the two, Lightning draws from the global
        # generator (a sanity check, a DataLoader's base seed) differently than the run that
        # saved the state did after saving it.
        if self._resumed_rng_states is not None:
            set_rng_states(self._resumed_rng_states, self.device)
            self._resumed_rng_states = None

    # -- optimisation -------------------------------------------------------------------------
    def _check_resumed_outer(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                             saved: Optional[Dict[str, Any]]) -> None:
        """Refuse to resume ``fit`` from ``saved`` (:attr:`_resumed_outer`) with an outer optimizer
        or scheduler set up otherwise than the checkpoint's: Lightning restores their saved state
        over the configured one (the learning rate, the scheduler's step size), so the run trained
        with the checkpoint's values while its config recorded the new ones; another optimizer
        class failed inside its ``step``."""
        if saved is None:
            return
        changes = []
        groups = [state.get("param_groups") for state in saved.get("optimizer_states") or [] if isinstance(state, dict)]
        if groups and groups[0]:
            old, new = groups[0][0], optimizer.param_groups[0]
            # How the step is computed (fused kernels, foreach), not what it computes: may change.
            # The rate: where a scheduler ran, the one it started from (initial_lr; it moved lr).
            skip = {"params", "lr", "initial_lr", "fused", "foreach", "capturable", "differentiable"}
            saved_class = saved.get("outer_optimizer")
            old_keys, new_keys = set(old) - skip, set(new) - skip
            if isinstance(saved_class, str):
                other_class = saved_class != _qualified_name(type(optimizer))
            else:  # an older checkpoint: by its settings (a torch release adds some, so one side may hold more)
                other_class = not (old_keys <= new_keys or new_keys <= old_keys)
            if other_class:
                was = saved_class.rpartition(".")[2] if isinstance(saved_class, str) else \
                    f"one with the settings {', '.join(sorted(old_keys))}"
                changes.append(f"the optimizer ({type(optimizer).__name__}) is not the checkpoint's ({was})")
            else:
                rate = "initial_lr" if "initial_lr" in old else "lr"
                old_lr, new_lr = old.get(rate), new.get("initial_lr", new.get("lr"))
                if _plain(old_lr) and not same_value(old_lr, new_lr):
                    changes.append(f"optimizer lr={new_lr!r} (the checkpoint's: {old_lr!r})")
                changes += [f"optimizer {key}={new[key]!r} (the checkpoint's: {old[key]!r})"
                            for key in sorted(new_keys & old_keys)
                            if _plain(old[key]) and not same_value(old[key], new[key])]
        states = [state for state in saved.get("lr_schedulers") or [] if isinstance(state, dict)]
        old_scheduler = states[0] if states else saved.get("plateau_scheduler")  # Lightning's, else ours
        if (scheduler is None) != (old_scheduler is None):
            changes.append("a learning-rate scheduler " + ("is added" if old_scheduler is None else "is dropped"))
        elif scheduler is not None:
            new_scheduler = scheduler.state_dict()
            settings = [key for key in new_scheduler if not key.startswith("_") and key not in _SCHEDULER_PROGRESS]
            if set(settings) != {key for key in old_scheduler if not key.startswith("_") and key not in _SCHEDULER_PROGRESS}:
                changes.append(f"the scheduler ({type(scheduler).__name__}) is not the checkpoint's")
            else:
                changes += [f"scheduler {key}={new_scheduler[key]!r} (the checkpoint's: {old_scheduler[key]!r})"
                            for key in sorted(settings) if _plain(old_scheduler[key])
                            and not same_value(old_scheduler[key], new_scheduler[key])]
        if changes:
            raise ValueError(
                "Resuming from the checkpoint restores its outer optimizer and learning-rate scheduler as they were "
                f"saved, but this run sets them up otherwise: {'; '.join(changes)}. It would train with the "
                "checkpoint's while its config records these. Resume with the settings it was trained with (its run's "
                "config.yaml), or start a new run to train with other ones.")

    def configure_optimizers(self) -> Any:
        if not any(parameter.requires_grad for parameter in self.parameters()):
            # The optimizer's own "optimizer got an empty parameter list", under Lightning's frames.
            raise ValueError(
                f"{type(self).__name__} has no trainable parameters: its backbone {type(self.backbone).__name__} "
                f"has {'none' if not any(True for _ in self.backbone.parameters()) else 'none that requires grad'}, "
                "so there is nothing to meta-learn. Give it a backbone with weights (e.g. models.MLP or models.Conv4).")
        optimizer = self.optimizer(self.parameters())
        precision = getattr(self._trainer, "precision_plugin", None)
        # Lightning's mixed precision refuses to clip gradients for a fused optimizer (it may
        # unscale them itself), with a scaler (16-mixed) or without one (bf16-mixed, 16-mixed on
        # the CPU): only the first step found out, with a traceback.
        clips_under_amp = isinstance(precision, MixedPrecision) and bool(getattr(self._trainer, "gradient_clip_val", 0))
        if clips_under_amp and any(group.get("fused") for group in optimizer.param_groups):
            raise ValueError(
                f"The optimizer {type(optimizer).__name__} is given fused=True, and the trainer clips gradients "
                f"(gradient_clip_val {self._trainer.gradient_clip_val}) under mixed precision "
                f"({precision.precision}), which Lightning cannot do for a fused optimizer: drop fused (the "
                "optimizer's init_args), or gradient_clip_val, or train in 32-bit.")
        # Not under a 16-bit GradScaler: a fused optimizer takes the scaler's inf checks itself,
        # which a step the non-finite guard skipped (gradients dropped) never records.
        if getattr(precision, "scaler", None) is None and not clips_under_amp:
            optimizer = fused_if_unset(optimizer)
        saved, self._resumed_outer = self._resumed_outer, None
        self._plateau = None
        if self.lr_scheduler is None:
            self._check_resumed_outer(optimizer, None, saved)
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau:
            for group in optimizer.param_groups:  # the rate it starts from, saved with the optimizer
                group.setdefault("initial_lr", group["lr"])
        self._check_resumed_outer(optimizer, scheduler, saved)
        if plateau:
            # Lightning would step it at every training step (our validations fall within epochs)
            # on the last validation's value: stepped after each validation instead.
            metric, mode = self.plateau_metric
            if scheduler.mode != mode:
                raise ValueError(
                    f"ReduceLROnPlateau steps on {metric} after every validation, which is better when it is "
                    f"{'lower' if mode == 'min' else 'higher'}, but was built with mode={scheduler.mode!r}: give it "
                    f"mode={mode!r} (--model.init_args.lr_scheduler.mode {mode}).")
            self._plateau, self._plateau_steps = scheduler, 0
            if saved is not None and saved.get("plateau_scheduler") is not None:
                scheduler.load_state_dict(saved["plateau_scheduler"])
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
