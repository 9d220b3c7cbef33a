"""Convolutional building blocks whose batch norm computes its statistics per task.

A backbone in this package takes a batch of tasks, ``[*tasks, M, *sample]`` (``M`` samples of
each task; ``[M, *sample]`` is one task), and batch norm normalises every task with the
statistics of its own samples, so a task's outputs never depend on the other tasks it is
batched with. Inside, activations are kept *sample-major*, ``[M, T, C, H, W]``: then the ``T``
tasks' channels of one sample lie side by side, ``[M, T * C, H, W]`` is a free view, and one
ordinary batch-norm call over ``T * C`` channels gives every (task, channel) its own statistics.
That is as fast as normalising the pooled batch, where running the backbone per task under
``torch.func.vmap`` costs an extra multiply and add per batch-norm layer (its batching rule
applies the affine part separately), about 1.5x the backbone's time on a CPU.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch_norm import batch_norm, batch_norm_max_pool
from .max_pool import max_pool2d


class TaskBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-task batch statistics.

    Input ``[M, T, C, H, W]``: ``M`` samples of each of ``T`` tasks, sample-major (see the
    module docstring); or ``[M, C, H, W]``, one task, exactly as ``nn.BatchNorm2d``.

    With batch statistics (training, or no running statistics), each task is normalised with
    the mean and variance of its own samples. Running averages (``track_running_stats=True``)
    move towards the mean over tasks of the per-task statistics,
    ``running <- (1 - momentum) running + momentum mean_t(stat_t)``: one update per call,
    whatever the number of tasks, and the same as ``nn.BatchNorm2d`` for one task. In
    evaluation with running statistics every sample is normalised on its own.

    Same arguments, parameters and buffers as ``nn.BatchNorm2d``, so checkpoints of either load
    into the other.
    """

    #: Normalise with :func:`~fewshot_lightning.models.batch_norm.batch_norm`, whose double
    #: backward (second-order MAML) is a few passes over the maps instead of PyTorch's forty;
    #: same values and derivatives. ``False`` (on a layer or the class) uses ``F.batch_norm``.
    fused_double_backward: bool = True

    def forward(self, x: Tensor, max_pool: Optional[int] = None) -> Tensor:
        """Normalise ``x``; with ``max_pool``, max-pool the result too (kernel and stride
        ``max_pool``), in one node where :meth:`normalize` can (``ConvBlock`` asks for it)."""
        if x.dim() == 4:
            return self._one_batch(x, max_pool)
        if x.dim() != 5:
            raise ValueError(f"TaskBatchNorm2d expects [samples, tasks, C, H, W] or [N, C, H, W], got {list(x.shape)}.")
        samples, tasks, channels = x.shape[:3]
        if tasks == 1 or not (self.training or self.running_mean is None):
            # One task, or running statistics (per sample): nothing to keep apart.
            out = self._one_batch(x.flatten(0, 1), max_pool)
            return out.view(samples, tasks, *out.shape[1:])
        update = self.training and self.track_running_stats and self.running_mean is not None
        factor = self._average_factor(update)
        # Per-task copies of the running averages, moved by F.batch_norm in place, then averaged.
        running_mean = self.running_mean.repeat(tasks) if update else None
        running_var = self.running_var.repeat(tasks) if update else None
        weight = self.weight.repeat(tasks) if self.affine else None
        bias = self.bias.repeat(tasks) if self.affine else None
        folded = x.reshape(samples, tasks * channels, *x.shape[3:])
        out = self.normalize(folded, running_mean, running_var, weight, bias, True, factor, self.eps, max_pool)
        if update:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(tasks, channels).mean(0))
                self.running_var.copy_(running_var.view(tasks, channels).mean(0))
        return out.view(samples, tasks, channels, *out.shape[2:])

    @property
    def batch_norm_fn(self) -> Callable[..., Tensor]:
        return batch_norm if self.fused_double_backward else F.batch_norm

    def normalize(self, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                  max_pool: Optional[int] = None) -> Tensor:
        """``F.batch_norm``'s arguments and result, computed by :attr:`batch_norm_fn`; with
        ``max_pool``, max-pooled too: with :attr:`fused_double_backward`, by
        :func:`~fewshot_lightning.models.batch_norm.batch_norm_max_pool`, one node whose backward
        keeps the pooled gradient instead of the full-size one (second-order MAML holds one map
        less for each block, inner step and task)."""
        if max_pool is not None and self.fused_double_backward:
            return batch_norm_max_pool(x, running_mean, running_var, weight, bias, training, momentum, eps, max_pool)
        out = self.batch_norm_fn(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return out if max_pool is None else max_pool2d(out, max_pool)

    def _average_factor(self, update: bool) -> float:
        """The running averages' factor for this call; with ``update``, counts the batch first (as
        ``nn.BatchNorm2d``: ``momentum=None`` is a cumulative average over the batches counted)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if update:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def _one_batch(self, x: Tensor, max_pool: Optional[int] = None) -> Tensor:
        # nn.BatchNorm2d.forward, with self.normalize for F.batch_norm.
        self._check_input_dim(x)
        factor = self._average_factor(self.training and self.track_running_stats and self.num_batches_tracked is not None)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return self.normalize(x, self.running_mean if tracked else None, self.running_var if tracked else None,
                              self.weight, self.bias, batch_stats, factor, self.eps, max_pool)


class ConvBlock(nn.Sequential):
    """3x3 convolution, :class:`TaskBatchNorm2d`, ReLU and an optional 2x2 max-pool, on
    sample-major activations ``[M, T, C, H, W]``.

    Args:
        in_channels, out_channels: channels in and out.
        pool: end with a 2x2 max-pool.
        stride: of the convolution.
        padding: of the convolution (1 keeps the side at stride 1).
        track_running_stats: batch norm keeps running averages.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pool: bool = True,
        stride: int = 1,
        padding: int = 1,
        track_running_stats: bool = False,
    ) -> None:
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding),
            TaskBatchNorm2d(out_channels, track_running_stats=track_running_stats),
            nn.ReLU(),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)
        self.pool = pool
        self.stride = stride
        self.padding = padding

    #: Run a single task's maps channels-last on the CPU (see ``forward``; on other devices,
    #: where it was not measured, a block keeps the layout given). Faster on a CPU for a forward
    #: and a first-order backward, and, with our batch norm's double backward
    #: (:attr:`TaskBatchNorm2d.fused_double_backward`), for a second-order one on 84x84 colour
    #: images; on PyTorch's it made that MAML step over twice as slow (docs/benchmarks.md,
    #: "Batch norm's double backward"): set ``False`` on a block, or on the class, to
    #: keep the layout the maps come in. Off inside :func:`keep_layout`, which the
    #: task-by-task loop of :func:`~fewshot_lightning.inner.functional` enters unless told to
    #: run channels-last, so that MAML's choice of layout (``memory_format``) is the one run.
    one_task_channels_last: bool = True

    #: Max-pool with :func:`~fewshot_lightning.models.max_pool.max_pool2d`, whose backward keeps
    #: the indices of the maxima instead of the map pooled (batch norm's output, kept by nothing
    #: else): one full-size map less held for every block, inner step and task through a MAML
    #: step; same values and derivatives. ``False`` (on a block, or on the class) runs the
    #: block's ``nn.MaxPool2d``.
    lean_max_pool: bool = True

    def forward(self, x: Tensor) -> Tensor:
        samples, tasks = x.shape[:2]
        conv, norm, relu = self[0], self[1], self[2]
        images = x.flatten(0, 1)
        if tasks == 1 and self.one_task_channels_last and images.device.type == "cpu" \
                and not _keeping_layout.get() and not is_batched(images):
            # One task (a learner fed one task at a time, e.g. a meta-batch of 1): channels-last,
            # where a CPU's batch norm and max-pool run several times faster (vmap cannot take
            # this layout; several tasks need channels next to each other for their per-task
            # statistics). MAML's loops choose their layout themselves (see keep_layout). Only
            # on the CPU, where it was measured; other devices keep the layout given.
            images = images.contiguous(memory_format=torch.channels_last)
        out = conv(images).unflatten(0, (samples, tasks))
        if self.pools_in_norm():
            # Batch norm and the 2x2 max-pool in one node (TaskBatchNorm2d.normalize).
            return relu(norm(out, max_pool=2))
        out = norm(out)
        if self.pool:
            # Pooling before the ReLU gives the same values (max commutes with the monotone
            # ReLU) on a quarter of the elements.
            out = self.max_pool(out.flatten(0, 1)).unflatten(0, (samples, tasks))
        return relu(out)

    def pools_in_norm(self) -> bool:
        """Whether the block's batch norm also does its max-pooling (:meth:`TaskBatchNorm2d.normalize`):
        within :func:`differentiated_twice`, with :attr:`lean_max_pool`, while the layers are the
        block's own (a :class:`TaskBatchNorm2d` without hooks, which would otherwise see the
        pooled output, and the 2x2 ``nn.MaxPool2d``)."""
        norm = self[1]
        return (_differentiated_twice.get() and self._pools_lean() and isinstance(norm, TaskBatchNorm2d)
                and not (norm._forward_hooks or norm._forward_pre_hooks))

    def max_pool(self, x: Tensor) -> Tensor:
        """The block's 2x2 max-pool of ``x`` ``[N, C, H, W]``: with :attr:`lean_max_pool`,
        :func:`~fewshot_lightning.models.max_pool.max_pool2d` (while the layer is the 2x2 one the
        block was built with), else the block's ``nn.MaxPool2d`` layer."""
        return max_pool2d(x, 2) if self._pools_lean() else self[3](x)

    def _pools_lean(self) -> bool:
        # lean_max_pool, on a block that pools with the plain 2x2 nn.MaxPool2d it was built with.
        return self.pool and self.lean_max_pool and type(self[3]) is nn.MaxPool2d and _plain(self[3], 2)

    def output_side(self, side: int) -> int:
        """Side of the output map for an input map of side ``side``."""
        side = (side + 2 * self.padding - 3) // self.stride + 1
        return side // 2 if self.pool else side


def check_widths(owner: str, **widths: object) -> None:
    """Raise a ``ValueError`` naming each of ``widths`` (argument name -> value) that is not a
    whole number of at least 1: a layer of width 0 builds (torch allows it) and then fails in
    the first convolution, or, for a fully connected layer, trains a model that outputs a
    constant; a negative one failed inside torch's tensor constructor."""
    for name, value in widths.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{owner}: {name} must be a whole number, at least 1, got {value!r}.")


def _plain(layer: nn.MaxPool2d, size: int) -> bool:
    # Kernel and stride ``size``, no padding, dilation or ceil mode, no indices returned.
    def pair(value) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    return (pair(layer.kernel_size) == pair(layer.stride) == (size, size) and pair(layer.padding) == (0, 0)
            and pair(layer.dilation) == (1, 1) and not layer.ceil_mode and not layer.return_indices)


_keeping_layout: ContextVar[bool] = ContextVar("keeping_layout", default=False)


@contextmanager
def keep_layout() -> Iterator[None]:
    """Within this context a :class:`ConvBlock` runs a lone task in the layout its maps and
    weights come in, as with ``one_task_channels_last=False`` (channels-first for NCHW
    weights and images; channels-last where the weights are so strided, since a convolution
    answers in its weight's layout)."""
    token = _keeping_layout.set(True)
    try:
        yield
    finally:
        _keeping_layout.reset(token)


_differentiated_twice: ContextVar[bool] = ContextVar("differentiated_twice", default=False)


@contextmanager
def differentiated_twice() -> Iterator[None]:
    """Declares that the forward passes run within will be differentiated twice (an inner step
    of second-order MAML: its gradient is taken with ``create_graph=True`` and differentiated
    again by the outer backward). A :class:`ConvBlock` then runs its batch norm and max-pool as
    one node (:meth:`ConvBlock.pools_in_norm`), whose backward keeps the pooled gradient instead
    of the full-size one: a map less held for every block, inner step and task. Elsewhere two
    nodes hold less at the peak (the indices are freed before batch norm's backward).
    :func:`~fewshot_lightning.inner.trajectory` enters it for second-order steps."""
    token = _differentiated_twice.set(True)
    try:
        yield
    finally:
        _differentiated_twice.reset(token)


class DetachableHead:
    """Mixin for a backbone whose last layer is ``head``: within :meth:`without_head` its
    forwards return the head's input (the features), as if it had no head. The backbone's
    forwards check ``self._headless``; one that calls its ``head`` module there anyway (a user
    backbone that inherits the mixin and forgets the check) is stopped with an error naming it,
    not left to hand the head's output on as the features (shapes alone catch that only where
    the head changes the width)."""

    #: True inside :meth:`without_head`.
    _headless: bool = False

    @contextmanager
    def without_head(self) -> Iterator[None]:
        """Within it, ``forward`` and ``forward_tasks`` return the head's input (the features,
        ``[..., features]``), as if the module had no head. Learners that adapt the head alone
        (ANIL) compute a task's support features once through it instead of at every inner step
        (:attr:`~fewshot_lightning.algorithms.MAML.head_features_once`)."""
        head = getattr(self, "head", None)
        guard = head.register_forward_pre_hook(self._head_called_headless) if isinstance(head, nn.Module) else None
        before, self._headless = self._headless, True
        try:
            yield
        finally:
            self._headless = before
            if guard is not None:
                guard.remove()

    def _head_called_headless(self, module: nn.Module, args: tuple) -> None:
        raise RuntimeError(
            f"{type(self).__name__} called its head inside without_head(), whose forwards must return the head's "
            "input (the features): return them when self._headless is set, as models.MLP and models.Conv4 do; "
            "or set head_features_once = False on the learner to run the whole backbone at every inner step.")


def is_batched(x: Tensor) -> bool:
    """Whether ``x`` is being batched by ``torch.func.vmap`` (which has no public test for it)."""
    return bool(torch._C._functorch.is_batchedtensor(x))


def per_task_call(forward: Callable[[Tensor], Tensor], x: Tensor, sample_dims: int) -> Tensor:
    """Run ``forward``, a function of sample-major ``[M, T, *sample]`` activations, on task-major
    ``x`` of shape ``[*tasks, M, *sample]`` (``sample_dims`` trailing dimensions per sample;
    ``[M, *sample]`` is one task, ``[*sample]`` one sample) and return ``[*tasks, M, *out]``.

    Only the input and the output are transposed; those are the smallest tensors of a
    convolutional backbone.
    """
    leading = x.shape[: x.dim() - sample_dims]
    samples = leading[-1] if leading else 1
    sample_major = x.reshape(-1, samples, *x.shape[x.dim() - sample_dims :]).transpose(0, 1)
    out = forward(sample_major)
    return out.transpose(0, 1).reshape(*leading, *out.shape[2:])
