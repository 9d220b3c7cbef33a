"""Max-pooling whose backward keeps only the indices of the maxima, not the input.

PyTorch's max-pooling keeps its whole input for the backward (``max_pool2d_with_indices``'
derivative takes ``self``), though the gradient is the output's gradient put back where the
maxima were, for which the indices are enough: the input is only read for its shape. In a
convolutional block (convolution, batch norm, 2x2 max-pool, ReLU) that input is batch norm's
output, which nothing else keeps, so letting it go frees one map of the block's full size for
every block, inner step and task until MAML's outer backward: of the two and a half such maps
a step held (batch norm's input, the pooling's input, the indices: int64 for a quarter of the
elements), one. 22% to 30% of a MAML step's tensor peak on the convolutional cases of
``benchmarks/speed.py --tensor-memory``; with batch norm and the pooling in one node where a pass
is differentiated twice (:func:`~fewshot_lightning.models.batch_norm.batch_norm_max_pool`), 26%
to 35% (docs/benchmarks.md, "Max-pooling that keeps the indices, not the map").

:func:`max_pool2d` computes ``F.max_pool2d(input, kernel_size)`` with PyTorch's kernel and
keeps the indices and the input's size; its backward is ``F.max_unpool2d`` (the same scatter
as PyTorch's pooling backward, the same result, bit for bit, and as fast on a CPU), which is
itself differentiable, so second and third derivatives are PyTorch's own (the gradient taken
back out at the indices).

Under ``torch.compile`` it is ``F.max_pool2d``: the compiler traces PyTorch's operator (and
decides what to keep itself), where this autograd Function broke the graph and, with torch
2.14's inductor, failed to compile (``tests/test_compile.py``). And with
``torch.use_deterministic_algorithms(True)`` (Lightning's ``Trainer(deterministic=True)``) it is
``F.max_pool2d`` too: PyTorch flags ``max_unpool2d`` as nondeterministic (it cannot know that
the indices are distinct, as a pooling's are) and refuses it there.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

#: Device types on which :func:`max_pool2d` keeps only the indices; elsewhere it is
#: ``F.max_pool2d``. Only the CPU, where it was measured.
DEVICES: Tuple[str, ...] = ("cpu",)


def max_pool2d(input: Tensor, kernel_size: int) -> Tensor:
    """``F.max_pool2d(input, kernel_size)`` (stride ``kernel_size``, no padding, rounding
    down), same values and derivatives, whose backward keeps the indices of the maxima instead
    of the input (module docstring), for a 4-D input on a device of :data:`DEVICES` that is to
    be differentiated, outside ``torch.func`` transforms, ``torch.compile``, deterministic
    algorithms and forward-mode AD; otherwise ``F.max_pool2d`` itself."""
    if not _lean(input):
        return F.max_pool2d(input, kernel_size)
    return _MaxPool2d.apply(input, kernel_size)


def _lean(input: Tensor) -> bool:
    if input.dim() != 4 or not input.is_floating_point() or input.device.type not in DEVICES:
        return False
    if not (torch.is_grad_enabled() and input.requires_grad):
        return False  # nothing to differentiate: PyTorch's kernel, without a Python node
    return unpool_allowed() and function_may_run(input)


def function_may_run(*tensors: Tensor) -> bool:
    """Whether a Python autograd Function of ours may stand in for PyTorch's operator on
    ``tensors`` (``None`` entries skipped): not while ``torch.compile`` traces (it traces
    PyTorch's operator: module docstring), not under forward-mode AD (``torch.autograd.forward_ad``
    carrying a tangent: ours define no forward-mode derivative, PyTorch's operators do), and not
    on tensors ``torch.func``'s transforms wrap (vmap of a generic backbone, for one), under which
    an autograd.Function written this way cannot run. Shared with
    :mod:`~fewshot_lightning.models.batch_norm`."""
    if torch.compiler.is_compiling():
        return False
    return not any(t is not None and (forward_ad.unpack_dual(t).tangent is not None
                                      or torch._C._functorch.is_functorch_wrapped_tensor(t)) for t in tensors)


def unpool_allowed() -> bool:
    """Whether ``F.max_unpool2d``, the backward here, may run: not under
    ``torch.use_deterministic_algorithms(True)``, which refuses it (module docstring)."""
    return not torch.are_deterministic_algorithms_enabled()


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, kernel_size):
        out, indices = F.max_pool2d_with_indices(input, kernel_size)
        ctx.save_for_backward(indices)
        ctx.kernel_size = kernel_size
        ctx.input_size = tuple(input.shape[-2:])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        # The scatter PyTorch's backward does; differentiable in grad_out (a gather), so a
        # second derivative through it is PyTorch's own.
        return F.max_unpool2d(grad_out, indices, ctx.kernel_size, output_size=ctx.input_size), None
