"""fewshot_lightning.models.batch_norm: the same values and derivatives as PyTorch's batch norm,
with its own double backward (second-order MAML differentiates every batch-norm layer twice)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import Conv4
from fewshot_lightning.models.batch_norm import _BatchNormBackward, batch_norm
from fewshot_lightning.models.blocks import ConvBlock, TaskBatchNorm2d


def derivatives(norm, x, weight, bias, probe, order=2):
    """First and second (and with ``order=3`` third) derivatives of a scalar built from
    ``norm(x, weight, bias)``, with respect to every input that is not None. Each level's scalar
    mixes all the previous level's gradients nonlinearly, so no term of the derivative is left
    out by a zero coefficient."""
    inputs = [t for t in (x, weight, bias) if t is not None]
    out = norm(x, weight, bias)
    grads = torch.autograd.grad(((out * probe).pow(2) + out.tanh()).sum(), inputs, create_graph=True)
    levels = [grads]
    for level in range(1, order):
        scalar = sum((g * torch.cos(g)).sum() for g in grads) + (grads[0] * probe).sum()
        grads = torch.autograd.grad(scalar, inputs, create_graph=level + 1 < order)
        levels.append(grads)
    return levels


def inputs(shape, affine, bias, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.randn(shape[1], generator=g, dtype=torch.float64) + 1).requires_grad_() if affine else None
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_() if bias else None
    return x, weight, b, torch.randn(*shape, generator=g, dtype=torch.float64)


def ours(x, weight, bias):
    return batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)


def pytorchs(x, weight, bias):
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)


CASES = [(shape, affine, bias, channels_last)
         for shape, (affine, bias), channels_last in itertools.product(
             [(6, 3, 5, 4), (7, 4), (5, 2, 3, 3, 2)], [(True, True), (True, False), (False, False)], [False, True])
         if not channels_last or len(shape) == 4]


@pytest.mark.parametrize("shape,affine,bias,channels_last", CASES)
def test_first_and_second_derivatives_are_pytorchs(shape, affine, bias, channels_last):
    # PyTorch's batchnorm_double_backward is the independent reference: the same function,
    # differentiated by PyTorch's own formula. Double precision, so agreement to ~1e-12 of the
    # largest entry means the formulas are the same, not merely close.
    x, weight, b, probe = inputs(shape, affine, bias, channels_last)
    assert torch.equal(ours(x, weight, b), pytorchs(x, weight, b))
    for mine, reference in zip(derivatives(ours, x, weight, b, probe), derivatives(pytorchs, x, weight, b, probe)):
        for a, r in zip(mine, reference):
            assert r.abs().max() > 1e-3  # a derivative that is there to compare
            assert (a - r).abs().max() <= 1e-12 * r.abs().max()


def test_a_gradient_in_the_other_memory_layout_gives_the_same_derivatives():
    # An NCHW gradient reaching a channels-last batch norm (max-pooling's backward hands one on
    # in the channels-last loop): PyTorch's kernel is ten times slower on mixed layouts, so ours
    # converts it; the numbers must not move. .contiguous() of the channels-last output makes
    # the gradient arriving at batch norm NCHW.
    x, weight, b, probe = inputs((4, 3, 6, 6), True, True, channels_last=True)
    assert ours(x, weight, b).is_contiguous(memory_format=torch.channels_last)
    mine = derivatives(lambda *a: ours(*a).contiguous(), x, weight, b, probe)
    reference = derivatives(lambda *a: pytorchs(*a).contiguous(), x, weight, b, probe)
    for level, level_reference in zip(mine, reference):
        for a, r in zip(level, level_reference):
            assert (a - r).abs().max() <= 1e-12 * r.abs().max()


def written_out(x, weight, bias):
    # Batch norm in differentiable elementwise operations: any order of derivative is autograd's.
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) * torch.rsqrt(var + 1e-5) * weight.view(shape) + bias.view(shape)


def test_third_derivatives_are_those_of_batch_norm_written_out():
    # PyTorch's own batch norm refuses a third derivative; ours recomputes the statistics in the
    # double backward when it is differentiated, so it gives the written-out function's.
    x, weight, b, probe = inputs((5, 3, 4, 4), True, True)
    probe = probe / 10  # smaller gradients: cos of the large ones loses digits three orders deep
    with pytest.raises(RuntimeError, match="3rd"):
        derivatives(pytorchs, x, weight, b, probe, order=3)
    mine = derivatives(ours, x, weight, b, probe, order=3)[2]
    reference = derivatives(written_out, x, weight, b, probe, order=3)[2]
    for a, r in zip(mine, reference):
        assert r.abs().max() > 1e-3
        assert (a - r).abs().max() <= 1e-10 * r.abs().max()


def test_running_statistics_move_as_pytorchs_and_evaluation_is_pytorchs():
    x, weight, b, _ = inputs((6, 3, 5, 5), True, True)
    mine = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    theirs = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    out = batch_norm(x, *mine, weight, b, True, 0.3, 1e-5)
    assert torch.equal(out, F.batch_norm(x, *theirs, weight, b, True, 0.3, 1e-5))
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    assert not torch.equal(mine[0], torch.zeros(3, dtype=torch.float64))  # they did move
    evaluated = batch_norm(x, *mine, weight, b, False)
    assert torch.equal(evaluated, F.batch_norm(x, *theirs, weight, b, False))
    assert "_BatchNorm" not in type(evaluated.grad_fn).__name__  # running statistics: PyTorch's own


def test_where_it_is_not_used_it_is_pytorchs():
    x, weight, b, _ = inputs((6, 3, 5, 5), True, True)
    assert type(ours(x, weight, b).grad_fn).__name__ == "_BatchNormBackward"
    with torch.no_grad():
        assert torch.equal(ours(x, weight, b), pytorchs(x, weight, b))
    # Under torch.func's transforms (vmap of a generic backbone): PyTorch's, which they support.
    from torch.func import grad, vmap

    stacked = torch.randn(2, 6, 3, 5, 5, dtype=torch.float64)

    def loss(norm):
        return lambda x: norm(x, weight.detach(), b.detach()).pow(3).sum()

    assert torch.allclose(vmap(grad(loss(ours)))(stacked), vmap(grad(loss(pytorchs)))(stacked), rtol=1e-12)
    half = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    assert "_BatchNorm" not in type(batch_norm(half, None, None, None, None, True).grad_fn).__name__


def test_one_value_per_channel_is_refused_with_pytorchs_message():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.randn(1, 3, requires_grad=True), None, None, None, None, True)


def test_task_batch_norm_layer_uses_it_and_can_be_told_not_to(monkeypatch):
    layer = TaskBatchNorm2d(3).double()
    x = torch.randn(4, 2, 3, 5, 5, dtype=torch.float64, requires_grad=True)  # [M, T, C, H, W]
    assert type(layer(x).grad_fn).__name__ != "_BatchNormBackward"  # a view of its output
    assert "_BatchNormBackward" in str(layer(x).grad_fn.next_functions)
    assert "_BatchNormBackward" in str(layer(x[:, 0]).grad_fn)  # one task, [N, C, H, W]
    monkeypatch.setattr(TaskBatchNorm2d, "fused_double_backward", False)
    assert "_BatchNormBackward" not in str(layer(x).grad_fn.next_functions)
    assert "_BatchNormBackward" not in str(layer(x[:, 0]).grad_fn)


def conv_episodes(tasks=3, ways=3, shots=2, queries=2, side=16):
    g = torch.Generator().manual_seed(3)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, side, side, generator=g, dtype=torch.float64), support_y,
                     torch.rand(tasks, ways * queries, 1, side, side, generator=g, dtype=torch.float64), query_y)


@pytest.mark.parametrize("batching,memory_format", [("vmap", "contiguous"), ("vmap", "channels_last"),
                                                    ("loop", "contiguous"), ("loop", "channels_last")])
@pytest.mark.parametrize("tasks", [3, 1])
def test_maml_meta_gradient_through_conv4_is_the_same_with_pytorchs_batch_norm(monkeypatch, batching, memory_format, tasks):
    # Two second-order inner steps through Conv4's four batch-norm layers, on every path (each
    # runs batch norm its own way: per-task statistics over tasks side by side, one task at a
    # time channels-last, ...), against the same model on F.batch_norm.
    # Batch norm on its own node: the blocks' max-pooling apart (in one node with batch norm
    # by default, tests/test_max_pool.py).
    monkeypatch.setattr(ConvBlock, "lean_max_pool", False)
    meta_gradient = conv4_meta_gradient(batching, memory_format, tasks)
    calls = count_calls(monkeypatch, _BatchNormBackward)
    loss, grads = meta_gradient()
    # Every batch-norm layer of every inner step's forward, differentiated twice by ours: four
    # layers, two steps (the loop: per task).
    assert len(calls) == 4 * 2 * (tasks if batching == "loop" else 1)
    monkeypatch.setattr(TaskBatchNorm2d, "fused_double_backward", False)
    reference_loss, reference_grads = meta_gradient()
    assert len(calls) == 4 * 2 * (tasks if batching == "loop" else 1)  # none more: PyTorch's
    assert_same_meta_gradient(loss, grads, reference_loss, reference_grads)


def conv4_meta_gradient(batching, memory_format, tasks):
    """A function computing the query loss and meta-gradient of MAML (two second-order inner
    steps) through a small float64 Conv4, on the path given, for fixed episodes; each call runs
    the layers as they are switched at the time."""
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=6, out_features=3, image_size=16), inner_lr=0.3, inner_steps=2, batching=batching,
                 memory_format=memory_format, tasks_per_backward=None).double()
    batch = conv_episodes(tasks=tasks)

    def meta_gradient():
        loss = per_task_loss(model(batch), batch.query_y).mean()
        return loss, torch.autograd.grad(loss, list(model.backbone.parameters()))

    return meta_gradient


def count_calls(monkeypatch, function_class):
    """A list that grows by one at every call of ``function_class.backward`` (an autograd
    Function's), so a test can tell that our node ran."""
    calls = []
    backward = function_class.backward

    def counted(ctx, *grads):
        calls.append(1)
        return backward(ctx, *grads)

    monkeypatch.setattr(function_class, "backward", staticmethod(counted))
    return calls


def assert_same_meta_gradient(loss, grads, reference_loss, reference_grads):
    assert torch.allclose(loss, reference_loss, rtol=1e-12)
    scale = torch.cat([g.flatten() for g in reference_grads]).norm()
    assert scale > 1e-2
    for a, r in zip(grads, reference_grads):
        assert (a - r).norm() <= 1e-10 * scale
