"""Lightning callbacks for meta-learning runs."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any, Optional

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from .data import EpisodeDataset, TaskDataset


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
    SLURM, or with ``auto_requeue=False``, it does nothing.
    """

    def __init__(self) -> None:
        self._signal: Optional[signal.Signals] = None
        self._previous: Any = None
        self._requested = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning registers its signal handlers after `setup`, and only where none is set.
        environment = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        if environment.requeue_signal is None or threading.current_thread() is not threading.main_thread():
            return
        self._signal = environment.requeue_signal
        self._requested = False
        self._previous = signal.signal(self._signal, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self._requested = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._signal is None or not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = False
        rank_zero_info(f"{self._signal.name} received: saving an HPC checkpoint at step {trainer.global_step} and requeuing.")
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(_CheckpointConnector.hpc_save_path(trainer.default_root_dir))
        if trainer.is_global_zero:
            requeue_slurm_job()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
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
