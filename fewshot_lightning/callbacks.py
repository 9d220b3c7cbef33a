"""Callbacks that keep a run trustworthy: a checkpoint to resume from that is never far behind,
a guard that stops (or skips) a step with a non-finite loss or gradient, and the writer of
``predict``'s query predictions."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight is NaN or infinite where a number was needed."""


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current for resuming: every ``every_n_train_steps`` training steps
    and after the final one, whether ``fit`` ends at ``max_steps``, at the last batch of
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._final_step(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # A validation after the final step comes after its save: save again, so that last.ckpt
        # has what it added (its progress, the best model's record), as an uninterrupted run would.
        if self._final_step(trainer) and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _final_step(trainer: L.Trainer) -> bool:
        if trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            return True
        last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
        return last_epoch and trainer.fit_loop.epoch_loop.batch_idx + 1 >= trainer.num_training_batches


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
    towards ``max_consecutive_skips``), not raised.

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
        self._batch_idx = 0
        self._steps_at_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_at_start = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        task_losses = getattr(pl_module, "train_task_losses", None)
        checks = [p.grad.isfinite().all() for p in params]
        if task_losses is not None:
            checks.append(task_losses.isfinite().all())
        finite = bool(torch.stack(checks).all()) if checks else True
        # One decision for all processes: a process that stepped alone would leave the others' weights.
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        message = self._describe(trainer, pl_module, params, task_losses)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        losses_finite = task_losses is None or bool(task_losses.isfinite().all())
        overflow = scaler is not None and trainer.strategy.reduce_boolean_decision(losses_finite, all=True)
        if overflow:
            message += f" The 16-bit loss scale ({scaler.get_scale():g}) overflowed; the GradScaler lowers it."
        elif self.policy == "raise":
            raise NonFiniteError(
                f"{message} Stopped the run. Look for NaN or inf in the data, or lower the learning rates; to "
                "skip such steps instead, use NonFiniteGuard(policy='skip') (CLI: --nonfinite.policy skip)."
            )
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{message} That is {self.consecutive} non-finite steps in a row (max_consecutive_skips="
                f"{self.max_consecutive_skips}): stopped the run, which is not training."
            )
        for p in params:
            p.grad = None
        rank_zero_warn(f"{message} Skipped the step ({self.skipped} so far, logged as train/skipped_steps).")
        for logger in trainer.loggers:
            logger.log_metrics({"train/skipped_steps": self.skipped}, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped:
            steps = trainer.global_step - self._steps_at_start
            rank_zero_warn(
                f"{self.skipped} training steps in all were skipped for non-finite losses or gradients "
                f"({steps} steps in this run); see train/skipped_steps."
            )

    def _describe(self, trainer: L.Trainer, pl_module: L.LightningModule, params: List[torch.Tensor], task_losses: Optional[torch.Tensor]) -> str:
        where = f"global_step {trainer.global_step} (epoch {trainer.current_epoch}, batch_idx {self._batch_idx})"
        if trainer.world_size > 1:
            where += f" on process {trainer.global_rank} of {trainer.world_size}"
        if task_losses is not None and not bool(task_losses.isfinite().all()):
            bad = (~task_losses.isfinite()).nonzero().flatten().tolist()
            values = sorted({str(v) for v in task_losses[bad].tolist()})
            text = (
                f"Non-finite training loss at {where}: task{'s' if len(bad) > 1 else ''} "
                f"{_listed(bad)} of the {len(task_losses)} in the batch (counting from 0) had a loss of "
                f"{' / '.join(values)}."
            )
            indices = self._dataset_indices(trainer, len(task_losses), bad)
            if indices is not None:
                text += f" Their training-set indices: {_listed(indices)} (datamodule.datasets['train'][i] rebuilds task i)."
            return text
        names = {id(p): name for name, p in pl_module.named_parameters()}
        bad = [names.get(id(p), "?") for p in params if not bool(p.grad.isfinite().all())]
        if not bad:
            return f"Non-finite loss or gradient at {where} in another process; this one's are finite."
        losses = "" if task_losses is None else f", with finite losses on all {len(task_losses)} tasks of the batch"
        text = f"Non-finite gradient at {where}{losses}: in {_listed(bad)}."
        if trainer.world_size > 1:
            text += " Gradients are averaged over processes: another process's message may name the tasks."
        return text

    def _dataset_indices(self, trainer: L.Trainer, batch_size: int, positions: Sequence[int]) -> Optional[List[int]]:
        loader = trainer.train_dataloader
        batch_indices = getattr(getattr(loader, "sampler", None), "batch_indices", None)
        if batch_indices is None:
            return None
        indices = batch_indices(self._batch_idx, batch_size)
        return [indices[i] for i in positions]

    def state_dict(self) -> Dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]


def _listed(items: Sequence[Any], limit: int = 8) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


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
        torch.save(merged, path)
        rank_zero_info(f"Wrote the query predictions of {len(order)} tasks to {path}.")
