"""Lightning callbacks for meta-learning runs.

Trustworthy runs: a checkpoint to resume from that is never far behind (:class:`LastCheckpoint`),
a guard that stops (or skips) a step with a non-finite loss or gradient
(:class:`NonFiniteGuard`), and the writer of ``predict``'s query predictions
(:class:`PredictionWriter`). Clusters: the effective meta-batch printed at the start
(:class:`EffectiveMetaBatch`) and SLURM pre-emption that saves at the end of a step
(:class:`RequeueAtStepEnd`).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from ._text import listed
from .data import EpisodeDataset, TaskDataset


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight is NaN or infinite where a number was needed."""


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current for resuming: every ``every_n_train_steps`` training steps
    (at the first batch end at or past each multiple, for a learner that takes several
    optimizer steps a batch) and after the final one, whether ``fit`` ends at ``max_steps``, at the last batch of
    ``max_epochs`` or on a stop request (early stopping).

    The final save comes at the end of that training batch (and again after a validation that
    follows it), before Lightning marks the epoch done, so a run stopped at step 3 of an epoch
    and resumed goes on with the epoch's fourth batch, as an uninterrupted run would. It writes
    no other checkpoint: pair it with a ``ModelCheckpoint(monitor=...)`` for the best model.

    Args:
        every_n_train_steps: training steps between saves; choose it so that the steps lost
            to a kill take minutes, not hours.
        dirpath: where to write; default ``<log dir>/checkpoints`` as ``ModelCheckpoint``.
    """

    def __init__(self, every_n_train_steps: int = 1000, dirpath: Optional[str] = None) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1, got {every_n_train_steps}.")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # After every other checkpoint callback (Lightning keeps those last, in the order given):
        # its saves then hold what they recorded at the same hook, the best model's record of a
        # validation above all. A new list, not the list Lightning is iterating over now.
        others = [callback for callback in trainer.callbacks if callback is not self]
        if len(others) < len(trainer.callbacks) and trainer.callbacks[-1] is not self:
            trainer.callbacks = others + [self]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._counted_from = trainer.global_step  # a resumed run counts on from its step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        every = self._every_n_train_steps
        if self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif step // every > getattr(self, "_counted_from", 0) // every and not self._should_skip_saving_checkpoint(trainer):
            # Once a multiple of N steps has been passed, not only landed on: a learner that takes
            # several optimizer steps a batch (MAML-RL's outer_steps) skips most multiples, and
            # saved every lcm(N, outer_steps) steps (every 210 for N 30 and 7 outer steps).
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._counted_from = step
        if self._final_step(trainer, step) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # A validation after a step this callback saved comes after that save (the final step, or
        # a periodic save where a validation is due too): save again, so that last.ckpt has what it
        # added (its progress, the best model's record, a plateau scheduler's step), as an
        # uninterrupted run would. (Killed after the periodic save, a resumed run recorded a worse
        # later checkpoint as best, and its ReduceLROnPlateau went one step short.)
        saved_here = self._last_global_step_saved == trainer.global_step and trainer.global_step > 0
        if (saved_here or self._final_step(trainer)) and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _final_step(trainer: L.Trainer, step: Optional[int] = None) -> bool:
        step = trainer.global_step if step is None else step
        if trainer.should_stop or 0 <= trainer.max_steps <= step:
            return True
        last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
        return last_epoch and trainer.fit_loop.epoch_loop.batch_idx + 1 >= trainer.num_training_batches


#: Whether this torch has the AMP kernel :func:`_all_finite` uses (cleared at its first failure).
_AMP_CHECK = [hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_")]
_CHECK_FLAGS: dict = {}


def _batch_idx(trainer: L.Trainer) -> int:
    """The training batch being stepped on (the epoch loop's count of batches begun, less one):
    read where a message needs it, not stored by a hook at every batch."""
    return trainer.fit_loop.epoch_loop.batch_idx


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, in a few operations whatever their
    number: the kernel mixed precision's loss scaler checks gradients with
    (``torch._amp_foreach_non_finite_check_and_unscale_``), one pass over all of them, which
    raises a flag at a non-finite element and, with an unscale factor of 1, stores each value
    back as it was (a tensor that is part of an autograd graph is checked on a copy). It takes
    floating-point tensors of any size, layout of strides and mix of dtypes, and on a GPU routes
    a mix to a slower path itself; on a 2-core CPU 10 us for the sinusoid MLP's gradients where
    the largest absolute value of each (``torch._foreach_norm``, then their maximum) took 59.
    Where it refuses the tensors (sparse gradients, several devices, a device without the
    kernel), from then on in the process: the largest absolute value of each, which is finite
    exactly when all its elements are (NaN propagates through the maximum)."""
    if not tensors:
        return True
    if _AMP_CHECK[0]:
        first = tensors[0]
        flags = _CHECK_FLAGS.get(first.device)
        if flags is None:  # the kernel's flag (raised, never lowered, by it) and factor 1
            flags = _CHECK_FLAGS[first.device] = (torch.zeros(1, device=first.device), torch.ones(1, device=first.device))
        found, one = flags
        with torch.no_grad():
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(
                    [t.detach().clone() if t.requires_grad else t for t in tensors], found, one)
            except (RuntimeError, NotImplementedError):  # no kernel for these tensors or this device
                _AMP_CHECK[0] = False
                found.zero_()
            else:
                if found.item() == 0:
                    return True
                found.zero_()
                return False
    tensors = [t for t in tensors if t.numel()]
    return not tensors or _largest_magnitude_finite(tensors)


def _largest_magnitude_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """:func:`_all_finite` by the largest absolute value of each tensor (non-empty tensors)."""
    uniform = tensors[0].layout is torch.strided and len({(t.layout, t.device, t.dtype) for t in tensors}) == 1
    with torch.no_grad():
        if uniform:
            # what get_total_norm computes for one device and dtype, without its grouping; the
            # largest of the tensors' largest values is NaN if any is (max propagates NaN)
            return math.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf)).max().item())
        return bool(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf).isfinite())


class NonFiniteGuard(Callback):
    """Stops or skips a training step whose loss or gradients are not finite, so that no run
    ends with NaN weights and exit code 0.

    Checked after the backward pass (and, under DDP, after the gradients are averaged, with
    every process taking the same decision), before the optimizer step: the query losses of
    the batch's tasks (``MetaLearner.train_task_losses``) and every gradient the optimizer is
    about to apply. A non-finite inner-loop gradient shows up in both, as it makes the adapted
    parameters, and so the query loss, non-finite.

    ``policy="raise"`` stops the run with a :class:`NonFiniteError` naming the step, the batch,
    the tasks with a non-finite loss (and their dataset indices where the sampler knows them)
    or the parameters with a non-finite gradient. ``policy="skip"`` drops the step instead:
    the gradients are discarded, so the weights and the optimizer's state stay as they were
    (the step still counts towards ``max_steps`` and the scheduler), with a warning and the
    running count logged as ``train/skipped_steps``; after ``max_consecutive_skips`` skipped
    steps in a row the next one raises, as a run that never takes a step is broken.

    With 16-bit mixed precision's ``GradScaler``, a non-finite gradient from finite losses is
    the loss scale overflowing, which the scaler answers by skipping the step and lowering the
    scale: whatever the policy, such a step is skipped, warned about and counted (and counts
    towards ``max_consecutive_skips``), not raised. For learners that scale their inner loss
    too (``scales_inner_loss``: the MAML family), an overflow in the inner loop makes the query
    losses themselves non-finite, so there a non-finite loss is treated the same way.

    Args:
        policy: ``"raise"`` or ``"skip"``.
        max_consecutive_skips: with ``"skip"``, how many steps in a row may be skipped.
    """

    POLICIES = ("raise", "skip")

    def __init__(self, policy: str = "raise", max_consecutive_skips: int = 10) -> None:
        if policy not in self.POLICIES:
            raise ValueError(f"policy must be one of {self.POLICIES}, got {policy!r}.")
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be 0 or more, got {max_consecutive_skips}.")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self._steps_at_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_at_start = trainer.global_step
        self._buffers: Optional[Dict[str, torch.Tensor]] = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # With "skip", the buffers as the step starts (at a window's first batch under
        # gradient accumulation): the forward passes update batch norm's running statistics
        # before the gradients are checked, and a skipped step put NaN there, which every later
        # evaluation used (chance-level scores, exit 0).
        if self.policy == "skip" and getattr(self, "_buffers", None) is None:
            self._buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Under gradient accumulation the step sees the window's last batch only: a non-finite
        # loss in an earlier batch of the window is kept, to be named (it was blamed on gradients).
        if _inside_accumulation(trainer) and getattr(self, "_window_bad", None) is None:
            losses = getattr(pl_module, "train_task_losses", None)
            if losses is not None and not bool(losses.isfinite().all()):
                self._window_bad = (_batch_idx(trainer), losses)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        task_losses = getattr(pl_module, "train_task_losses", None)
        window_bad, self._window_bad = getattr(self, "_window_bad", None), None
        batch_idx = None
        if window_bad is not None and (task_losses is None or bool(task_losses.isfinite().all())):
            batch_idx, task_losses = window_bad  # the window's batch whose loss was not finite
        checked = [grad for group in optimizer.param_groups for p in group["params"] if (grad := p.grad) is not None]
        if task_losses is not None:
            checked.append(task_losses)
        # One decision for all processes: a process that stepped alone would leave the others' weights.
        kept, self._buffers = getattr(self, "_buffers", None), None
        if trainer.strategy.reduce_boolean_decision(_all_finite(checked), all=True):
            self.consecutive = 0
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.skipped += 1
        self.consecutive += 1
        message = self._describe(trainer, pl_module, params, task_losses, batch_idx)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        losses_finite = task_losses is None or bool(task_losses.isfinite().all())
        inner_scaled = getattr(pl_module, "scales_inner_loss", False)
        overflow = scaler is not None and (inner_scaled or trainer.strategy.reduce_boolean_decision(losses_finite, all=True))
        if overflow:
            where = " (in the inner loop or the outer backward pass)" if inner_scaled else ""
            message += f" The 16-bit loss scale ({scaler.get_scale():g}) overflowed{where}; the GradScaler lowers it."
        elif self.policy == "raise":
            hint = getattr(pl_module, "nonfinite_hint", lambda: "")()
            raise NonFiniteError(
                f"{message} Stopped the run. {hint + ' Otherwise, l' if hint else 'L'}ook for NaN or inf in the data, "
                "or lower the learning rates; to skip such steps instead, use NonFiniteGuard(policy='skip') "
                "(CLI: --nonfinite.policy skip)."
            )
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{message} That is {self.consecutive} non-finite steps in a row (max_consecutive_skips="
                f"{self.max_consecutive_skips}): stopped the run, which is not training."
            )
        for p in params:
            p.grad = None
        if kept:  # the step's updates of the running statistics go with its gradients
            with torch.no_grad():
                for name, value in kept.items():
                    pl_module.get_buffer(name).copy_(value)
        rank_zero_warn(f"{message} Skipped the step ({self.skipped} so far, logged as train/skipped_steps).")
        # On the step axis of the run's other training curves (Lightning's count of batches that
        # stepped): not global_step, which a learner of several optimizer steps a batch
        # (MAML-RL's outer_steps) advances several times a batch.
        step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics({"train/skipped_steps": self.skipped}, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped:
            steps = trainer.global_step - self._steps_at_start
            rank_zero_warn(
                f"{self.skipped} training steps in all were skipped for non-finite losses or gradients "
                f"({steps} steps in this run); see train/skipped_steps."
            )

    def _describe(self, trainer: L.Trainer, pl_module: L.LightningModule, params: List[torch.Tensor],
                  task_losses: Optional[torch.Tensor], batch_idx: Optional[int] = None) -> str:
        batch_idx = _batch_idx(trainer) if batch_idx is None else batch_idx
        where = f"global_step {trainer.global_step} (epoch {trainer.current_epoch}, batch_idx {batch_idx})"
        if trainer.world_size > 1:
            where += f" on process {trainer.global_rank} of {trainer.world_size}"
        if task_losses is not None and not bool(task_losses.isfinite().all()):
            bad = (~task_losses.isfinite()).nonzero().flatten().tolist()
            values = sorted({str(v) for v in task_losses[bad].tolist()})
            text = (
                f"Non-finite training loss at {where}: task{'s' if len(bad) > 1 else ''} "
                f"{listed(bad, 8)} of the {len(task_losses)} in the batch (counting from 0) had a loss of "
                f"{' / '.join(values)}."
            )
            indices = self._dataset_indices(trainer, len(task_losses), bad, batch_idx)
            if indices is not None:
                text += f" Their training-set indices: {listed(indices, 8)} (datamodule.datasets['train'][i] rebuilds task i)."
            return text
        names = {id(p): name for name, p in pl_module.named_parameters()}
        bad = [names.get(id(p), "?") for p in params if not _all_finite([p.grad])]
        if not bad:
            return f"Non-finite loss or gradient at {where} in another process; this one's are finite."
        losses = "" if task_losses is None else f", with finite losses on all {len(task_losses)} tasks of the batch"
        text = f"Non-finite gradient at {where}{losses}: in {listed(bad, 8)}."
        if trainer.world_size > 1:
            text += " Gradients are averaged over processes: another process's message may name the tasks."
        return text

    def _dataset_indices(self, trainer: L.Trainer, batch_size: int, positions: Sequence[int],
                         batch_idx: Optional[int] = None) -> Optional[List[int]]:
        loader = trainer.train_dataloader
        batch_indices = getattr(getattr(loader, "sampler", None), "batch_indices", None)
        if batch_indices is None:
            return None
        indices = batch_indices(_batch_idx(trainer) if batch_idx is None else batch_idx, batch_size)
        return [indices[i] for i in positions]

    def state_dict(self) -> Dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]


class PredictionWriter(BasePredictionWriter):
    """Saves what ``predict`` returns, one file for all processes: ``torch.save`` of a dict
    with ``task_index`` ``[T]`` (the episode's index in the predict split: the test episodes),
    ``query_predictions`` ``[T, N*Q]`` labels or ``[T, Q, *y]`` regression outputs, and
    ``query_y``, the targets, in task order.

    Args:
        path: the file; default ``predictions.pt`` in the run's log folder.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        # Lightning nests the indices by dataloader, and the predictions too unless there is one.
        (batch_indices,) = batch_indices
        part = {
            "task_index": torch.tensor([i for batch in batch_indices for i in batch], dtype=torch.long),
            "query_predictions": torch.cat([p["query_predictions"].cpu() for p in predictions]),
            "query_y": torch.cat([p["query_y"].cpu() for p in predictions]),
        }
        parts = [part]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, part)
        # log_dir is a collective call under DDP: every process asks.
        path = Path(self.path) if self.path is not None else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.pt"
        if not trainer.is_global_zero:
            return
        order = torch.cat([p["task_index"] for p in parts]).argsort()
        merged = {key: torch.cat([p[key] for p in parts])[order] for key in part}
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.path is None:
            # A folder shared by runs (no logger: the trainer's default_root_dir) may hold an
            # earlier prediction's file: it is kept, this one goes beside it.
            count = 0
            while path.exists():
                count += 1
                path = path.with_name(f"predictions{count}.pt")
        torch.save(merged, path)
        rank_zero_info(f"Wrote the query predictions of {len(order)} tasks to {path}.")
        planned = getattr(getattr(trainer, "datamodule", None), "num_tasks", {}).get("test")
        if isinstance(planned, int) and len(order) < planned:
            # As a partial test warns: a --trainer.limit_predict_batches left in.
            rank_zero_warn(f"These predictions cover {len(order)} of the {planned} test episodes "
                           "(--trainer.limit_predict_batches?): not the full protocol's set.")


class EffectiveMetaBatch(L.Callback):
    """Print, once per ``fit`` (on global rank 0), how many tasks one optimizer step averages.

    ``meta_batch_size`` is per device: under DDP every process draws its own batch of tasks
    and the gradients are averaged, so one step sees ``meta_batch_size x devices x num_nodes``
    tasks (times ``accumulate_grad_batches``). A paper's "meta-batch 32" on 8 GPUs is
    ``meta_batch_size: 4``. The message also names where the training tasks come from and how
    they are split across ranks, e.g.::

        Effective meta-batch: 25 tasks per device x 4 devices x 2 nodes = 200 tasks per
        optimizer step. Training tasks: SinusoidTasks, 25000 an epoch, task i of epoch e drawn
        from seed (0, e, i); rank r takes tasks r, r+8, r+16, ...: split across 8 ranks (3125
        each).

    It reads the training DataLoader Lightning actually built (at ``on_train_start``, the
    first hook where it exists), so the numbers are the ones in use, for any DataModule.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader):
            rank_zero_info(describe(loader, trainer.world_size, trainer.num_devices, trainer.num_nodes,
                                    trainer.accumulate_grad_batches))


def describe(loader: DataLoader, world_size: int, devices: int, nodes: int, accumulate: int = 1) -> str:
    """The effective meta-batch and the origin of the tasks of ``loader`` as one message."""
    per_device = batch_size(loader)
    if per_device is None:
        return f"Effective meta-batch: unknown (the training DataLoader has no batch size). {tasks_origin(loader)}"
    factors = [f"{plural(per_device, 'task')} per device"]
    if world_size > 1:
        factors.append(f"{plural(devices, 'device')} x {plural(nodes, 'node')}" if devices * nodes == world_size
                       else plural(world_size, "process"))
    if accumulate > 1:
        factors.append(f"{accumulate} accumulated batches")
    total = per_device * world_size * accumulate
    return f"Effective meta-batch: {' x '.join(factors)} = {plural(total, 'task')} per optimizer step. {tasks_origin(loader)}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def batch_size(loader: DataLoader) -> Optional[int]:
    if loader.batch_size is not None:
        return loader.batch_size
    return getattr(loader.batch_sampler, "batch_size", None)


def tasks_origin(loader: DataLoader) -> str:
    dataset = loader.dataset
    origin = f"Training tasks: {type(dataset).__name__}"
    if isinstance(dataset, EpisodeDataset):
        origin += (f" ({dataset.ways}-way {dataset.shots}-shot {dataset.queries}-query episodes from "
                   f"{len(dataset.classes)} classes)")
    if isinstance(dataset, TaskDataset):
        origin += f", {len(dataset)} an epoch, task i of epoch e drawn from seed ({dataset.seed}, e, i)"
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
        ranks = sampler.num_replicas
        split = "shuffled, then" if sampler.shuffle else f"rank r takes tasks r, r+{ranks}, r+{2 * ranks}, ...:"
        origin += f"; {split} split across {ranks} ranks ({len(sampler)} each)"
    return origin + "."


def _inside_accumulation(trainer: L.Trainer) -> bool:
    """Whether the training batch that just ended only accumulated its gradients (an optimizer
    step comes at a later batch of the window: ``accumulate_grad_batches`` > 1)."""
    if getattr(trainer, "accumulate_grad_batches", 1) <= 1:
        return False
    should_accumulate = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_should_accumulate", None)
    return bool(should_accumulate()) if callable(should_accumulate) else False


class RequeueAtStepEnd(L.Callback):
    """SLURM's save-and-requeue on the requeue signal, done at the end of a training step.

    Under SLURM (``SLURMEnvironment`` with ``auto_requeue``, Lightning's default there) the
    signal SLURM sends before the time limit (``#SBATCH --signal=SIGUSR1@90``; the
    environment's ``requeue_signal``) makes Lightning save ``hpc_ckpt_<n>.ckpt`` in
    ``default_root_dir`` and run ``scontrol requeue``, from inside the signal handler, at
    whatever line the process is executing. In the middle of MAML's inner loop the
    backbone's parameters are swapped for per-task tensors by ``torch.func.functional_call``:
    a checkpoint written there fails (``Cannot access storage of BatchedTensorImpl`` under
    vmap, which ends the run) or stores the wrong weights (one task's, with the loop).

    This callback takes the signal instead: its handler only sets a flag, and at the end of
    the next training step (the flag OR-ed over all ranks, so every rank saves at the same
    step) it saves the same ``hpc_ckpt_<n>.ckpt``, which a requeued ``fit`` without
    ``ckpt_path`` restores as before, and global rank 0 runs ``scontrol requeue``. Lightning
    registers its own handler only for a signal that has none, so it stands aside. Outside
    SLURM, or with ``auto_requeue=False``, there is no requeue signal to take.

    SIGTERM, which SLURM sends every task when it ends (or requeues) the job, and docker stop,
    Kubernetes, systemd or ``timeout`` send anywhere, is taken the same way, under SLURM or not:
    at the next step end, with the request OR-ed over all ranks, every rank stops together and
    ``fit`` ends (``LastCheckpoint`` saves that step), recorded in :attr:`stopped_by_sigterm_at`;
    the ``fewshot-lightning`` command then exits with 143 and says how to resume, unless the
    job was requeued (:attr:`stopped_unplanned`). Lightning 2.6's own SIGTERM
    handler broadcasts a tensor from inside the signal handler; under DDP the other ranks are
    then at some other collective call (or none), and the job hangs until the process group
    times out. So from ``on_train_start`` (Lightning installs its handlers just before) to the
    end of training this callback's flag-only handler replaces it.

    Ctrl-C (SIGINT) in a terminal is taken the same way during training: the first stops every
    rank at the end of the step, with ``last.ckpt`` saved there (:attr:`stopped_by_signal` says
    which signal; the command exits with 130 and says how to resume); a second one stops at
    once, as Lightning does (its "graceful shutdown" lost the steps since the last periodic save).

    A stop requested this way does not validate unless a validation was due at that step:
    Lightning validates whenever ``Trainer.should_stop`` is set (for early stopping), which put
    a full validation between the signal and the exit (minutes, out of SLURM's grace period) and
    logged metrics, and picked a "best" checkpoint, at a step an uninterrupted run never scores.
    """

    def __init__(self) -> None:
        self._signal: Optional[signal.Signals] = None
        self._previous: Any = None
        self._previous_sigterm: Any = None
        self._previous_sigint: Any = None
        #: The stop signal received (SIGTERM, or Ctrl-C's SIGINT) and not yet acted on, if any.
        self._terminate_signal: Optional[signal.Signals] = None
        #: Takes back the epoch loop's wrapped validation check (:meth:`_validate_as_scheduled`).
        self._unwrap: Optional[Callable[[], Any]] = None
        self._requested = False
        #: The signal behind :attr:`stopped_by_sigterm_at`: ``SIGTERM`` or ``SIGINT`` (Ctrl-C).
        self.stopped_by_signal: Optional[signal.Signals] = None
        self._watch_sigterm = False
        #: The step at whose end a SIGTERM, or Ctrl-C (:attr:`stopped_by_signal`), stopped this fit
        #: (``LastCheckpoint`` saved it there), ``None`` if none did.
        self.stopped_by_sigterm_at: Optional[int] = None
        #: Whether this fit saved an HPC checkpoint and requeued the job (SLURM's SIGTERM then
        #: ends a job that will run again: a planned stop).
        self.requeued = False

    @property
    def stopped_unplanned(self) -> bool:
        """A SIGTERM stopped the fit before its end, and no requeue will continue it: the
        ``fewshot-lightning`` command then exits with 143, not 0, saying how to resume."""
        return self.stopped_by_sigterm_at is not None and not self.requeued

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning registers its signal handlers after `setup`, and only where none is set.
        self.stopped_by_sigterm_at, self.stopped_by_signal, self.requeued = None, None, False
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        # Outside SLURM too: SIGTERM is what docker stop, Kubernetes, systemd and `timeout`
        # send. Lightning's own handling raised SystemExit with no code at the next batch: the
        # command exited 0, with last.ckpt at the previous periodic save.
        self._watch_sigterm = True
        self._requested, self._terminate_signal = False, None
        self._validate_as_scheduled(trainer)
        environment = trainer._accelerator_connector.cluster_environment
        if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        if environment.requeue_signal is None:
            return
        self._signal = environment.requeue_signal
        self._previous = signal.signal(self._signal, self._request)

    def _validate_as_scheduled(self, trainer: L.Trainer) -> None:
        """Wrap the epoch loop's validation check so that this callback's stop does not count as
        an early stop (which validates at once): it sees ``should_stop`` unset while deciding."""
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        decide = getattr(loop, "_should_check_val_fx", None)
        if decide is None or getattr(decide, "_requeue_wrapped", False):
            return

        def as_scheduled(*args: Any, **kwargs: Any) -> bool:
            if not (self.stopped_by_sigterm_at is not None and trainer.should_stop):
                return decide(*args, **kwargs)
            trainer.should_stop = False
            try:
                return decide(*args, **kwargs)
            finally:
                trainer.should_stop = True

        as_scheduled._requeue_wrapped = True  # type: ignore[attr-defined]
        loop._should_check_val_fx = as_scheduled
        self._unwrap = lambda: loop.__dict__.pop("_should_check_val_fx", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        connector = getattr(trainer, "_signal_connector", None)
        if self._watch_sigterm and getattr(connector, "received_sigterm", False):
            # A SIGTERM before training started (in the sanity check), which Lightning's handler
            # took: Lightning stopped after the first step with nothing saved. Taken over here: the
            # first step's end stops the run and saves it, as any other step's.
            connector.received_sigterm = False
            self._terminate_signal = signal.SIGTERM
        if self._watch_sigterm and self._signal != signal.SIGTERM:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._request_stop)
        if self._watch_sigterm and self._signal != signal.SIGINT:
            self._previous_sigint = signal.signal(signal.SIGINT, self._request_stop)

    def _request(self, signum: int, frame: Any) -> None:
        self._requested = True

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._terminate_signal is not None:  # a second Ctrl-C: stop now
                self._restore_sigint()
                raise KeyboardInterrupt
            sys.stderr.write("\nCtrl-C: stopping at the end of this training step and saving it (Ctrl-C again stops "
                             "at once, losing the steps since the last save).\n")
        self._terminate_signal = signal.Signals(signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._watch_sigterm or _inside_accumulation(trainer):
            # Inside a gradient-accumulation window no optimizer step was taken: a stop (or an HPC
            # save) here dropped the window's gradients, and the resumed run stepped on the rest
            # of the window alone. The request waits for the batch that steps (the same on every rank).
            return
        received = trainer.strategy.reduce_boolean_decision(self._terminate_signal is not None, all=False)
        if received and self.stopped_by_sigterm_at is None and LastCheckpoint._final_step(trainer) \
                and not trainer.should_stop:
            # The signal came during the run's final step: it ends here anyway, finished (it said
            # "stopped before the run finished" and exited 143 for a complete run).
            rank_zero_info(f"{(self._terminate_signal or signal.SIGTERM).name} received during the final step "
                           f"{trainer.global_step}: the run ends there, finished.")
            self._terminate_signal, received = None, False
        if received and self.stopped_by_sigterm_at is None:
            # Another rank's signal: the same stop (a terminal's Ctrl-C or SLURM's SIGTERM reaches them all).
            self.stopped_by_signal = self._terminate_signal or signal.SIGTERM
            rank_zero_info(f"{self.stopped_by_signal.name} received: stopping at the end of step {trainer.global_step} "
                           "on every rank.")
            trainer.should_stop = True
            self.stopped_by_sigterm_at = trainer.global_step
        if self._signal is None or not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = False
        rank_zero_info(f"{self._signal.name} received: saving an HPC checkpoint at step {trainer.global_step} and requeuing.")
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(_CheckpointConnector.hpc_save_path(trainer.default_root_dir))
        if trainer.is_global_zero:
            requeue_slurm_job()
        self.requeued = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before Lightning's teardown puts back the handlers it found at the start.
        self._restore_sigterm()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._previous_sigterm = None
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def _restore(self) -> None:
        self._restore_sigterm()
        self._watch_sigterm = False
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None
        if self._signal is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._signal, self._previous)
        self._signal = None


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (``<array job id>_<task id>`` in a job array)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"Could not requeue SLURM job {job}: no `scontrol` on PATH (inside a container?). "
                       "The HPC checkpoint is saved; resubmit the job to resume from it.")
        return
    if result.returncode == 0:
        rank_zero_info(f"Requeued SLURM job {job}.")
    else:
        rank_zero_warn(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()} "
                       "The HPC checkpoint is saved; resubmit the job to resume from it.")
