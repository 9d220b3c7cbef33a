"""The one contract between data and algorithms: a batch of tasks."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    """A batch of ``B`` few-shot tasks (episodes).

    Shapes, for N-way K-shot Q-query classification::

        support_x  [B, N*K, *x]     support_y  [B, N*K]   int64 labels in 0..N-1
        query_x    [B, N*Q, *x]     query_y    [B, N*Q]   int64 labels in 0..N-1

    For regression the targets are float tensors ``[B, K, *y]`` / ``[B, Q, *y]``.
    Labels are re-assigned at random for every task, so label ``0`` means nothing
    across tasks. Being a ``NamedTuple`` it moves to a device, and through DDP,
    with no custom code.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


def collate_tasks(tasks: Sequence[Sequence[Tensor]]) -> TaskBatch:
    """Stack single tasks ``(support_x, support_y, query_x, query_y)`` into a :class:`TaskBatch`."""
    if isinstance(tasks, TaskBatch):  # a dataset that already builds whole batches
        return tasks
    return TaskBatch(*(torch.stack(parts) for parts in zip(*tasks)))


def to_unit_float(images: Tensor) -> Tensor:
    """``uint8`` images as ``float32`` in ``[0, 1]`` (``/ 255`` converts and scales in one
    pass); any other tensor unchanged."""
    return images / 255 if images.dtype == torch.uint8 else images


def scale_images(batch: TaskBatch) -> TaskBatch:
    """The batch with ``uint8`` support and query images scaled to ``float32`` in ``[0, 1]``.

    The DataModules keep images ``uint8`` from the dataset to the device (4x less to copy
    from workers and to a GPU) and call this after the transfer, so a model always sees float
    images; call it yourself on batches taken from their dataloaders outside a Trainer.
    """
    return batch._replace(support_x=to_unit_float(batch.support_x), query_x=to_unit_float(batch.query_x))
