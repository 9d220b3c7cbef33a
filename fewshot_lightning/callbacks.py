"""Lightning callbacks for meta-learning runs."""
from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
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
