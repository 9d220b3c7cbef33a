"""The four-block convolutional backbone of Matching Networks, MAML and ProtoNets."""
from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvBlock, DetachableHead, TaskBatchNorm2d, _plain, check_widths, per_task_call


class Conv4(DetachableHead, nn.Module):
    """Four blocks of 3x3 conv, batch norm, ReLU and 2x2 max-pool, then an optional linear ``head``.

    Vinyals et al. (2016), Finn et al. (2017), Snell et al. (2017). ``hidden=64`` for Omniglot,
    32 for MAML on mini-ImageNet. ``out_features=None`` drops the head: the flattened
    features are the output (an embedding for metric-based methods).

    ``max_pool=False`` is the network of MAML's Omniglot experiments (Finn et al.'s code,
    cbfinn/maml): stride-2 convolutions instead of max-pooling, and the features are the
    mean over the last map (28 -> 14 -> 7 -> 4 -> 2, averaged to ``hidden`` features). The
    convolutions pad one pixel on every side (TensorFlow's "SAME" there pads the extra pixel
    on the bottom and right only; the map sizes are the same).

    Input ``[*tasks, M, C, H, W]`` (``[M, C, H, W]`` is one task), output
    ``[*tasks, M, *output_shape]``. Batch norm normalises each task with the statistics of its
    own ``M`` samples (:class:`~fewshot_lightning.models.blocks.TaskBatchNorm2d`), so a task's
    outputs never depend on the other tasks in its batch. It keeps no running averages by
    default (``track_running_stats=False``), as in MAML: every task is normalised with its own
    batch statistics in training and evaluation alike (transductively), and it works unchanged
    under ``torch.func.vmap``. ``track_running_stats=True`` keeps them for learners that
    evaluate with running statistics (Snell et al.'s ProtoNets).

    Attributes:
        feature_dim: size of the features before the head.
        output_shape: shape of one sample's output, ``(out_features,)`` or ``(feature_dim,)``.
        input_shape: shape of one sample's input it was built for, ``(in_channels, image_size,
            image_size)`` (``None`` for a size it does not depend on); ``input_arguments``
            names the argument behind each entry. Learners check batches against it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: Optional[int] = 5,
        image_size: int = 28,
        track_running_stats: bool = False,
        max_pool: bool = True,
    ) -> None:
        super().__init__()
        check_widths("Conv4", in_channels=in_channels, hidden=hidden)
        if out_features is not None:
            check_widths("Conv4", out_features=out_features)
        self.max_pool = max_pool
        stride = 1 if max_pool else 2
        self.features = nn.Sequential(
            *(
                ConvBlock(in_channels if i == 0 else hidden, hidden, pool=max_pool, stride=stride,
                          track_running_stats=track_running_stats)
                for i in range(4)
            )
        )
        side = image_size
        for block in self.features:
            side = block.output_side(side)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 poolings; use 16 or more.")
        self.feature_dim = hidden if not max_pool else hidden * side * side
        self.head = nn.Linear(self.feature_dim, out_features) if out_features is not None else None
        self.output_shape: Tuple[int, ...] = (self.feature_dim if out_features is None else out_features,)
        # Strided convolutions end in a spatial mean: any image size then gives these features.
        self.input_shape: Tuple[Optional[int], ...] = (
            (in_channels, image_size, image_size) if max_pool else (in_channels, None, None))
        self.input_arguments: Tuple[str, ...] = ("in_channels", "image_size", "image_size")

    def forward(self, x: Tensor) -> Tensor:
        return per_task_call(self._sample_major, x, sample_dims=3)

    def _sample_major(self, x: Tensor) -> Tensor:
        maps = self.features(x)
        out = maps.flatten(2) if self.max_pool else maps.mean((-2, -1))
        return out if self.head is None or self._headless else self.head(out)

    #: On the CPU, :meth:`forward_tasks` runs the tasks in groups whose first feature map
    #: (the largest activation) holds at most this many bytes (at least one task a group);
    #: ``None``: all tasks at once. Smaller groups hold less memory through a second-order
    #: backward and, on a 2-core CPU, also ran faster than all tasks at once
    #: (``benchmarks/conv4_task_chunks.py``, docs/benchmarks.md).
    cpu_chunk_bytes: Optional[int] = 8 * 2**20

    def forward_tasks_supported(self) -> bool:
        """Whether :meth:`forward_tasks`, which calls the operations of the blocks it was built
        with (convolution, :class:`TaskBatchNorm2d`, ReLU, 2x2 max-pool, a linear head), computes
        ``forward``: not once a layer has been swapped for another (a Tanh for the ReLU, a dropout
        added, a head of several layers)."""
        if not (self.head is None or type(self.head) is nn.Linear):
            return False
        for block in self.features:
            layers = [type(layer) for layer in block]
            expected = [nn.Conv2d, TaskBatchNorm2d, nn.ReLU] + ([nn.MaxPool2d] if block.pool else [])
            if type(block) is not ConvBlock or layers != expected or (block.pool and not _plain(block[3], 2)):
                return False
        return True

    def forward_tasks(self, params: Dict[str, Tensor], x: Tensor) -> Tensor:
        """The outputs of every task under its own parameters, ``x`` ``[T, M, C, H, W]`` to
        ``[T, M, *output_shape]``: the same function as ``forward`` under ``torch.func.vmap``
        (:func:`~fewshot_lightning.inner.functional` with ``batching="vmap"`` uses it).
        ``params`` holds every parameter, each either per task, with a leading task dimension
        ``[T, ...]``, or shared by all tasks, shaped as the module holds it (a layer not
        adapted, as in ANIL).

        Activations are kept sample-major, ``[M, T * C, H, W]``: a convolution is one grouped
        convolution (a group per task, its weights ``[T * O, C, 3, 3]``), or, with shared
        weights, one plain convolution over all ``M * T`` images (the same maps viewed
        ``[M * T, C, H, W]``); batch norm is one call over ``T * O`` channels with each task's own
        statistics and its scale and shift passed in (vmap's batching rule applies those apart,
        as a multiply and an add that keep the normalised maps for the backward: about a third
        more memory held through a second-order MAML step); pooling and ReLU run on the same
        4-D tensor, with no transposes between layers. Only batch statistics are supported (the
        module keeps no running averages, which is when ``functional`` calls this). On the CPU
        the tasks go through in groups (:attr:`cpu_chunk_bytes`); the numbers are the same.
        """
        if x.dim() != 5:
            raise ValueError(f"Conv4.forward_tasks expects x of shape [tasks, samples, C, H, W], got {list(x.shape)}.")
        if not (self.head is None or self._headless or type(self.head) is nn.Linear):
            raise ValueError(
                f"Conv4.forward_tasks runs a head that is one nn.Linear, but 'head' is a {type(self.head).__name__}: give "
                f"the learner batching='loop', or a backbone of your own without forward_tasks (torch.func.vmap then "
                f"batches its forward).")
        tasks, chunk = x.shape[0], self._tasks_per_chunk(x)
        # A parameter is per task where it has one dimension more than the module's own.
        per_task = {name for name, own in self.named_parameters() if name in params and params[name].dim() > own.dim()}
        if chunk >= tasks:
            return self._forward_tasks(params, per_task, x)
        # Each per-task parameter is split into the groups by one split, not sliced once a group: a
        # slice's backward makes a zero tensor of all tasks' size, and the groups' gradients are
        # then added up (a zero tensor and an addition per weight and group in every backward
        # pass, the inner one of second-order MAML included), where the split's backward
        # concatenates them once.
        groups = {name: value.split(chunk) for name, value in params.items() if name in per_task}
        return torch.cat([
            self._forward_tasks({name: groups[name][index] if name in per_task else value
                                 for name, value in params.items()}, per_task, part)
            for index, part in enumerate(x.split(chunk))
        ])

    def _tasks_per_chunk(self, x: Tensor) -> int:
        if x.device.type != "cpu" or self.cpu_chunk_bytes is None:
            return x.shape[0]
        if not self.cpu_chunk_bytes > 0:
            raise ValueError(f"Conv4.cpu_chunk_bytes must be a positive number of bytes, or None for all tasks at once; "
                             f"got {self.cpu_chunk_bytes!r}.")
        first = self.features[0]
        side = [(size + 2 * first.padding - 3) // first.stride + 1 for size in x.shape[-2:]]
        per_task = x.shape[1] * first[0].out_channels * side[0] * side[1] * x.element_size()
        return max(1, int(self.cpu_chunk_bytes // per_task))

    def _forward_tasks(self, params: Dict[str, Tensor], per_task_names: Set[str], x: Tensor) -> Tensor:
        tasks, samples = x.shape[:2]

        def per_task(name: str) -> Optional[Tensor]:
            # [T, ...] for a per-task parameter, a shared one expanded to it (a view), or None.
            value = params.get(name)
            if value is None or name in per_task_names:
                return value
            return value.expand(tasks, *value.shape)

        def is_shared(name: str) -> bool:
            return name not in per_task_names

        hidden = x.transpose(0, 1).reshape(samples, tasks * x.shape[2], *x.shape[3:])
        for index, block in enumerate(self.features):
            conv, norm = f"features.{index}.0", f"features.{index}.1"
            if is_shared(f"{conv}.weight") and is_shared(f"{conv}.bias"):
                images = F.conv2d(hidden.reshape(samples * tasks, -1, *hidden.shape[2:]), params[f"{conv}.weight"],
                                  params.get(f"{conv}.bias"), stride=block.stride, padding=block.padding)
                hidden = images.view(samples, -1, *images.shape[2:])
            else:
                bias = per_task(f"{conv}.bias")
                hidden = F.conv2d(hidden, per_task(f"{conv}.weight").flatten(0, 1), None if bias is None else bias.flatten(),
                                  stride=block.stride, padding=block.padding, groups=tasks)
            weight, bias = per_task(f"{norm}.weight"), per_task(f"{norm}.bias")
            pools_in_norm = block.pools_in_norm()
            hidden = block[1].normalize(hidden, None, None, None if weight is None else weight.flatten(),
                                        None if bias is None else bias.flatten(), True, 0.0, block[1].eps,
                                        2 if pools_in_norm else None)
            if block.pool and not pools_in_norm:
                hidden = block.max_pool(hidden)
            hidden = torch.relu(hidden)
        maps = hidden.view(samples, tasks, -1, *hidden.shape[2:])
        out = (maps.flatten(2) if self.max_pool else maps.mean((-2, -1))).transpose(0, 1)
        if self.head is None or self._headless:
            return out
        if is_shared("head.weight") and is_shared("head.bias"):
            return F.linear(out, params["head.weight"], params.get("head.bias"))
        bias = per_task("head.bias")  # None: a head without a bias (nn.Linear(..., bias=False))
        if bias is None:
            return torch.bmm(out, per_task("head.weight").transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), out, per_task("head.weight").transpose(1, 2))
