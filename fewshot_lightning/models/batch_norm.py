"""Batch norm with batch statistics whose second derivative costs a few passes over the maps.

Second-order MAML differentiates the inner gradient, so every batch-norm layer of the inner
forward is differentiated twice. PyTorch's double backward of batch norm
(``batchnorm_double_backward``) is written as some forty elementwise operations over the full
activation maps, each its own pass through memory; at mini-ImageNet size (84x84 maps) they took
over a third of a second-order MAML step on a CPU (docs/benchmarks.md, "Batch norm's double
backward"). Every term of that derivative is a
per-channel combination of four maps (the input normalised, the output gradient, the gradient
flowing back into the input gradient, and a constant), so :func:`batch_norm` computes it as
five per-channel reductions and five fused multiply-adds, from the same saved tensors.

The forward and the first backward are PyTorch's own kernels (``native_batch_norm`` and
``native_batch_norm_backward``); only the double backward is ours, and it is exact (the tests
compare the second derivatives with PyTorch's in double precision). A third derivative, which
PyTorch's batch norm refuses, is taken through the same formula with the statistics recomputed
(the tests compare it with batch norm written out in elementwise operations). A gradient that
reaches a channels-last input in NCHW (max-pooling's backward hands one on) is converted first:
PyTorch's CPU kernel for the first backward is about ten times slower on mixed layouts.

:func:`batch_norm_max_pool` is batch norm then max-pooling as one node, for passes that are
differentiated twice: batch norm's first backward keeps the gradient it receives for the double
backward, and after max-pooling that gradient is a full-size map built from the pooled one; this
node keeps the pooled gradient and the indices instead and rebuilds the map when the double
backward runs (a third of a mini-ImageNet-size second-order step's tensor peak with the pooling's
own saving, docs/benchmarks.md).

Under ``torch.compile`` both are PyTorch's operators (``F.batch_norm``, then ``F.max_pool2d``):
the compiler traces those, where these autograd Functions broke the graph and, with torch 2.14's
inductor, failed to compile (``tests/test_compile.py``); a compiled graph is not differentiated
twice anyway.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .max_pool import DEVICES as POOL_DEVICES, function_may_run, max_pool2d, unpool_allowed

#: Device types on which :func:`batch_norm` takes its own double backward; elsewhere it is
#: ``F.batch_norm``. Only the CPU, where it was measured; on CUDA ``F.batch_norm`` calls cuDNN,
#: whose forward and first backward this would replace with PyTorch's native kernels, and no GPU
#: was available to measure the trade.
DEVICES: Tuple[str, ...] = ("cpu",)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm``, same arguments and result, whose double backward
    costs a few passes over the maps (module docstring) when it normalises with batch
    statistics on a device of :data:`DEVICES`, in float32 or float64, outside autocast,
    ``torch.func`` transforms, ``torch.compile`` and forward-mode AD; otherwise it is
    ``F.batch_norm`` itself."""
    if not _fused(input, weight, bias, training):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_training(input, eps)
    return _BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)


def _check_training(input: Tensor, eps: float) -> None:
    # F.batch_norm's own checks and messages, for the nodes that call its kernels directly.
    if input.numel() == input.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")


def _fused(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], training: bool) -> bool:
    if not training or input.dim() < 2 or not torch.is_grad_enabled():
        return False
    if input.device.type not in DEVICES or input.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled(input.device.type):
        return False
    tensors = [t for t in (input, weight, bias) if t is not None]
    if not any(t.requires_grad for t in tensors):
        return False  # nothing to differentiate: PyTorch's kernel, without a Python node
    # Not under torch.compile (module docstring), forward-mode AD or torch.func's transforms.
    return function_may_run(*tensors)


def _like(x: Tensor, reference: Tensor) -> Tensor:
    """``x`` in ``reference``'s memory layout (channels-last or contiguous), copied if it is not."""
    if reference.dim() in (4, 5) and not reference.is_contiguous():
        layout = torch.channels_last if reference.dim() == 4 else torch.channels_last_3d
        if reference.is_contiguous(memory_format=layout):
            return x.contiguous(memory_format=layout)
    return x.contiguous() if reference.is_contiguous() else x


def _channel_shape(x: Tensor) -> List[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _sample_dims(x: Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


class _BatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics: PyTorch's forward; its backward is
    :class:`_BatchNormBackward`, so that differentiating the backward runs ours."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        # native_batch_norm moves the running averages in place, as F.batch_norm does.
        out, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, invstd = ctx.saved_tensors
        # PyTorch's CPU kernel runs about ten times slower when the gradient's layout differs
        # from the input's (a channels-last input, an NCHW gradient from max-pooling's backward).
        grad_out = _like(grad_out, input)
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        grad_input, grad_weight, grad_bias = _BatchNormBackward.apply(grad_out, input, weight, mean, invstd, ctx.eps, mask)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class _BatchNormBackward(torch.autograd.Function):
    """The first backward (PyTorch's kernel), whose own backward is the double backward written
    as per-channel combinations (module docstring)."""

    @staticmethod
    def forward(ctx, grad_out, input, weight, mean, invstd, eps, mask):
        ctx.set_materialize_grads(False)  # an unused gradient stays None, not a map of zeros
        grads = torch.ops.aten.native_batch_norm_backward(grad_out, input, weight, None, None, mean, invstd, True,
                                                          eps, list(mask))
        ctx.save_for_backward(grad_out, input, weight, mean, invstd)
        ctx.eps = eps
        return grads

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        grad_out, input, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_grad_out, grad_input, grad_weight = _double_backward(
            grad_out, input, weight, mean, invstd, ctx.eps, gg_input, gg_weight, gg_bias, needs[0], needs[1], needs[2])
        return grad_grad_out, grad_input, grad_weight, None, None, None, None


def _double_backward(grad_out, input, weight, mean, invstd, eps, gg_input, gg_weight, gg_bias,
                     need_g: bool, need_x: bool, need_w: bool):
    """The derivatives of batch norm's first backward (``grad_out`` in; the input's, weight's and
    bias's gradients out) contracted with ``gg_input``, ``gg_weight`` and ``gg_bias`` (any may be
    None), with respect to ``grad_out``, the input and the weight, each only where needed."""
    # Notation, per channel over its n values: s = invstd, xhat = (x - mean) s, g = grad_out,
    # h = gg_input; E[.] a mean over the channel's values. The first backward was
    #   grad_input = gamma s (g - E[g] - xhat E[g xhat]),  grad_weight = n E[g xhat],
    #   grad_bias = n E[g];
    # differentiating <h, grad_input> + gg_weight grad_weight + gg_bias grad_bias gives, with
    # A = E[g], B = E[g xhat], Eh = E[h], Ph = E[h xhat], K = E[h g] - A Eh - B Ph:
    #   d/dg     = gamma s (h - Eh - xhat Ph) + gg_weight xhat + gg_bias
    #   d/dgamma = n s K
    #   d/dx     = (gg_weight s - gamma s^2 Ph) g - gamma s^2 B h
    #              - (gamma s^2 (K - 2 B Ph) + gg_weight s B) xhat
    #              + gamma s^2 (Ph A + B Eh) - gg_weight s A
    # (x enters through xhat and s: d xhat_i/d x_j = s (delta_ij - 1/n) - s xhat_i xhat_j / n,
    # d s/d x_j = -s^2 xhat_j / n).
    shape, dims = _channel_shape(input), _sample_dims(input)
    n = input.numel() // input.shape[1]
    if torch.is_grad_enabled():
        # This backward is itself being differentiated (a third derivative): the statistics
        # are recomputed from the input, so that the graph sees how they depend on it.
        var, mean = torch.var_mean(input, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    s = invstd.view(shape)
    gamma = weight.view(shape) if weight is not None else torch.ones_like(s)
    xhat = torch.addcmul(-mean.view(shape) * s, input, s)
    # A user's loss may not depend on grad_weight or grad_bias; then they are None.
    gg_w = gg_weight.view(shape) if gg_weight is not None else torch.zeros_like(s)
    gg_b = gg_bias.view(shape) if gg_bias is not None else torch.zeros_like(s)
    # x enters the first backward also through the statistics of g, which are needed only
    # for d/dx and d/dgamma.
    if gg_input is not None:
        h = _like(gg_input, input)
        e_h = h.sum(dims, keepdim=True) / n
        p_h = (h * xhat).sum(dims, keepdim=True) / n
    else:
        h, e_h, p_h = None, torch.zeros_like(s), torch.zeros_like(s)
    gs = gamma * s
    grad_grad_out = grad_input = grad_weight = None
    if need_g:
        grad_grad_out = torch.addcmul(gg_b - gs * e_h, xhat, gg_w - gs * p_h)
        if h is not None:
            grad_grad_out.addcmul_(h, gs)
    if need_x or (need_w and h is not None):
        a = grad_out.sum(dims, keepdim=True) / n
        b = (grad_out * xhat).sum(dims, keepdim=True) / n
        k = ((h * grad_out).sum(dims, keepdim=True) / n - a * e_h - b * p_h) if h is not None else torch.zeros_like(s)
        if need_x:
            s2g = gs * s
            grad_input = torch.addcmul(s2g * (p_h * a + b * e_h) - gg_w * s * a, xhat,
                                       -(s2g * (k - 2 * b * p_h) + gg_w * s * b))
            grad_input.addcmul_(grad_out, gg_w * s - s2g * p_h)
            if h is not None:
                grad_input.addcmul_(h, -s2g * b)
        if need_w and weight is not None and h is not None:
            grad_weight = (n * s * k).view(weight.shape)
    return grad_grad_out, grad_input, grad_weight


def batch_norm_max_pool(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    kernel_size: int,
) -> Tensor:
    """``F.max_pool2d(batch_norm(input, ...), kernel_size)``, same values and derivatives, as one
    node whose backward keeps the pooled gradient, not the full-size one.

    Differentiated twice (second-order MAML), batch norm's backward keeps the gradient that
    reaches it, and after max-pooling that gradient is the pooled one put back at the maxima:
    a map of the block's full size, for every block, inner step and task, rebuilt here from the
    pooled gradient and the indices when the double backward needs it (one scatter, as the
    pooling's own backward does). Where :func:`batch_norm` would not take its own double backward
    (module docstring), or the pooling is not :func:`~fewshot_lightning.models.max_pool.max_pool2d`'s
    (a 4-D input; not under deterministic algorithms, which refuse its scatter), the two are
    called one after the other.
    """
    if input.dim() != 4 or input.device.type not in POOL_DEVICES or not unpool_allowed() \
            or not _fused(input, weight, bias, training):
        return max_pool2d(batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
                          kernel_size)
    _check_training(input, eps)
    return _BatchNormMaxPool.apply(input, weight, bias, running_mean, running_var, momentum, eps, kernel_size)


class _BatchNormMaxPool(torch.autograd.Function):
    """Batch norm with batch statistics, then max-pooling: PyTorch's kernels forward; the
    backward is :class:`_BatchNormPoolBackward`, which keeps the pooled gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, kernel_size):
        out, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
        pooled, indices = F.max_pool2d_with_indices(out, kernel_size)
        ctx.save_for_backward(input, weight, mean, invstd, indices)
        ctx.eps, ctx.kernel_size = eps, kernel_size
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):
        input, weight, mean, invstd, indices = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        grad_input, grad_weight, grad_bias = _BatchNormPoolBackward.apply(
            grad_pooled, input, weight, mean, invstd, indices, ctx.eps, ctx.kernel_size, mask)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class _BatchNormPoolBackward(torch.autograd.Function):
    """The first backward of batch norm then max-pooling, from the pooled gradient: the
    gradient put back at the maxima (``F.max_unpool2d``), then PyTorch's batch-norm backward
    kernel. Keeps the pooled gradient and the indices; its own backward rebuilds the full-size
    gradient and runs :func:`_double_backward` on it, then takes the pooled gradient's part back
    out at the indices."""

    @staticmethod
    def forward(ctx, grad_pooled, input, weight, mean, invstd, indices, eps, kernel_size, mask):
        ctx.set_materialize_grads(False)  # an unused gradient stays None, not a map of zeros
        grad_out = _unpool(grad_pooled, indices, kernel_size, input)
        grads = torch.ops.aten.native_batch_norm_backward(grad_out, input, weight, None, None, mean, invstd, True,
                                                          eps, list(mask))
        ctx.save_for_backward(grad_pooled, input, weight, mean, invstd, indices)
        ctx.eps, ctx.kernel_size = eps, kernel_size
        return grads

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        grad_pooled, input, weight, mean, invstd, indices = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # Differentiable in grad_pooled (a third derivative goes through it).
        grad_out = _unpool(grad_pooled, indices, ctx.kernel_size, input)
        grad_grad_out, grad_input, grad_weight = _double_backward(
            grad_out, input, weight, mean, invstd, ctx.eps, gg_input, gg_weight, gg_bias, needs[0], needs[1], needs[2])
        grad_grad_pooled = None
        if grad_grad_out is not None:
            # The adjoint of putting back at the indices: taking out at them.
            grad_grad_pooled = grad_grad_out.flatten(2).gather(2, indices.flatten(2)).view_as(grad_pooled)
        return grad_grad_pooled, grad_input, grad_weight, None, None, None, None, None, None


def _unpool(grad_pooled: Tensor, indices: Tensor, kernel_size: int, input: Tensor) -> Tensor:
    # In the input's layout: PyTorch's CPU batch-norm backward is several times slower on mixed
    # layouts (module docstring).
    return _like(F.max_unpool2d(grad_pooled, indices, kernel_size, output_size=input.shape[-2:]), input)
