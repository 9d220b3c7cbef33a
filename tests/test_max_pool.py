"""fewshot_lightning.models.max_pool: PyTorch's max-pooling, values and derivatives bit for bit,
whose backward keeps the indices of the maxima instead of the map pooled (a convolutional
block's largest saved tensor but one, held through a second-order MAML step)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.models import Conv4
from fewshot_lightning.models.blocks import ConvBlock
from fewshot_lightning.models.max_pool import _MaxPool2d, max_pool2d

from test_batch_norm import conv_episodes


def three_derivatives(pool, x, kernel_size):
    """The pooled values, then first, second and third derivatives with respect to ``x`` of
    scalars that mix each level's gradient nonlinearly (so none is a zero by construction)."""
    out = pool(torch.tanh(x) * x, kernel_size)
    first, = torch.autograd.grad((out ** 3).sum(), x, create_graph=True)
    second, = torch.autograd.grad((first * first.cos()).sum(), x, create_graph=True)
    third, = torch.autograd.grad(second.sin().sum(), x)
    return out, first, second, third


@pytest.mark.parametrize("shape,kernel_size,channels_last", [
    (shape, kernel_size, channels_last) for (shape, kernel_size), channels_last in itertools.product(
        [((3, 4, 8, 8), 2), ((2, 3, 21, 21), 2), ((2, 3, 7, 10), 2), ((2, 2, 9, 7), 3)], [False, True])])
def test_values_and_three_derivatives_are_pytorchs_bit_for_bit(shape, kernel_size, channels_last):
    # Odd and uneven sides included: rounding down leaves the last row or column out of every
    # window, and its gradient must stay zero.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ours = three_derivatives(max_pool2d, x, kernel_size)
    pytorchs = three_derivatives(F.max_pool2d, x, kernel_size)
    assert "_MaxPool2d" in str(max_pool2d(x, kernel_size).grad_fn)  # ours ran, not a fallback
    for a, b in zip(ours, pytorchs):
        assert a.shape == b.shape and torch.equal(a, b)
    assert ours[1].abs().sum() > 0 and ours[3].abs().sum() > 0
    # The gradient comes back in the input's layout, as PyTorch's does.
    assert ours[1].is_contiguous(memory_format=torch.channels_last) == channels_last


def saved_by(function, *args):
    """(dtype, shape) of every tensor autograd saves for the backward while ``function`` runs."""
    return [(dtype, shape) for dtype, shape, _ in saved_with_storage(function, *args)]


def saved_with_storage(function, *args):
    """(dtype, shape, address of the storage) of every tensor autograd saves while ``function``
    runs: two layers saving the same tensor (a ReLU its output, the pooling after it its input)
    hold one map, not two."""
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape), tensor.untyped_storage().data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*args)
    return saved


def test_the_backward_keeps_the_indices_not_the_input():
    x = torch.randn(4, 3, 10, 10, requires_grad=True)
    y = x * 2  # an intermediate map, as batch norm's output is in a block
    assert saved_by(max_pool2d, y, 2) == [(torch.int64, (4, 3, 5, 5))]
    # PyTorch's keeps the input as well as the indices.
    assert sorted(saved_by(F.max_pool2d, y, 2), key=str) == sorted(
        [(torch.float32, (4, 3, 10, 10)), (torch.int64, (4, 3, 5, 5))], key=str)


@pytest.mark.parametrize("tasks", [1, 3])
def test_a_block_keeps_one_full_size_map_fewer(tasks, monkeypatch):
    # ConvBlock: convolution, batch norm, max-pool, ReLU. The full-size maps saved for the
    # backward: batch norm's input, and with PyTorch's pooling its input (batch norm's output)
    # too. Same values and gradients either way.
    torch.manual_seed(0)
    block = ConvBlock(2, 5)
    x = torch.randn(6, tasks, 2, 12, 12, requires_grad=True)  # [M, T, C, H, W]
    full = (6 * tasks, 5, 12, 12)

    def run():
        out = block(x)
        return out, torch.autograd.grad((out ** 2).sum(), [x] + list(block.parameters()))

    def full_size_maps():  # distinct maps held
        return {address for dtype, shape, address in saved_with_storage(block, x)
                if dtype == torch.float32 and shape in (full, (6, tasks * 5, 12, 12))}

    lean_saved, (lean_out, lean_grads) = full_size_maps(), run()
    monkeypatch.setattr(ConvBlock, "lean_max_pool", False)
    pytorch_saved, (out, grads) = full_size_maps(), run()
    assert len(lean_saved) == 1 and len(pytorch_saved) == 2
    assert torch.equal(lean_out, out)
    for a, b in zip(lean_grads, grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_where_it_is_not_used_it_is_pytorchs():
    x = torch.randn(2, 3, 8, 8)
    # Nothing to differentiate: PyTorch's kernel, no Python node.
    assert torch.equal(max_pool2d(x, 2), F.max_pool2d(x, 2))
    x.requires_grad_()
    with torch.no_grad():
        assert max_pool2d(x, 2).grad_fn is None
    # Under torch.func's transforms (vmap of a generic backbone): F.max_pool2d, same numbers.
    batched = torch.randn(4, 2, 3, 8, 8)
    assert torch.equal(torch.func.vmap(lambda t: max_pool2d(t, 2))(batched),
                       torch.func.vmap(lambda t: F.max_pool2d(t, 2))(batched))
    grad = torch.func.grad(lambda t: max_pool2d(t.exp(), 2).sum())(x.detach())
    assert torch.equal(grad, torch.func.grad(lambda t: F.max_pool2d(t.exp(), 2).sum())(x.detach()))
    # Not 4-D: PyTorch's.
    assert max_pool2d(torch.randn(3, 8, 8, requires_grad=True), 2).shape == (3, 4, 4)


@pytest.mark.parametrize("batching,memory_format", [("vmap", "contiguous"), ("vmap", "channels_last"),
                                                    ("loop", "contiguous"), ("loop", "channels_last")])
def test_maml_meta_gradient_through_conv4_is_the_same_with_pytorchs_max_pool(monkeypatch, batching, memory_format):
    # Two second-order inner steps through Conv4's four pooled blocks on every path, against
    # the same model on nn.MaxPool2d; the number of our pooling nodes differentiated is counted,
    # so the comparison cannot pass with ours not running.
    torch.manual_seed(0)
    tasks = 3
    model = MAML(Conv4(hidden=6, out_features=3, image_size=16), inner_lr=0.3, inner_steps=2, batching=batching,
                 memory_format=memory_format, tasks_per_backward=None).double()
    batch = conv_episodes(tasks=tasks)

    def meta_gradient():
        loss = per_task_loss(model(batch), batch.query_y).mean()
        return loss, torch.autograd.grad(loss, list(model.backbone.parameters()))

    calls = []
    backward = _MaxPool2d.backward

    def counted(ctx, *grads):
        calls.append(1)
        return backward(ctx, *grads)

    monkeypatch.setattr(_MaxPool2d, "backward", staticmethod(counted))
    loss, grads = meta_gradient()
    # Four blocks. A support pass's pooling node is differentiated twice (for its inner gradient,
    # then in the outer backward, since the inner gradient depends on its activations), the
    # query pass's once; per task where a pass runs task by task (the loop; "vmap
    # channels_last" runs its query passes in the channels-last loop).
    support_nodes = 2 * (tasks if batching == "loop" else 1)
    query_nodes = tasks if batching == "loop" or memory_format == "channels_last" else 1
    expected = 4 * (2 * support_nodes + query_nodes)
    assert len(calls) == expected
    monkeypatch.setattr(ConvBlock, "lean_max_pool", False)
    reference_loss, reference_grads = meta_gradient()
    assert len(calls) == expected  # none more: PyTorch's
    assert torch.equal(loss, reference_loss)
    scale = torch.cat([g.flatten() for g in reference_grads]).norm()
    assert scale > 1e-2
    for a, r in zip(grads, reference_grads):
        assert (a - r).norm() <= 1e-12 * scale


@pytest.mark.parametrize("film", [False, True])
def test_film_block_pools_before_the_relu_same_function_one_map_fewer(film):
    # CAVIA's FiLMBlock: conv, batch norm, (FiLM), then ReLU and 2x2 max-pool, now run as the
    # pool first (max commutes with the ReLU): the same values and gradients as the order its
    # docstring states, written out here with PyTorch's layers, and one full-size map fewer
    # saved (the ReLU's output, which the pooling kept too).
    from fewshot_lightning.models.context import FiLMBlock

    torch.manual_seed(0)
    block = FiLMBlock(2, 4, context_dim=3 if film else None, track_running_stats=False).double()
    x = torch.randn(6, 2, 10, 10, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def written_out():
        out = block.norm(block.conv(x))
        if block.film is not None:
            scale, shift = block.film(context).chunk(2, dim=-1)
            out = out * (1 + scale).view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return F.max_pool2d(F.relu(out), 2)

    inputs = [x, context] + list(block.parameters()) if film else [x] + list(block.parameters())
    ours, reference = block(x, context), written_out()
    assert torch.equal(ours, reference)
    probe = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * probe).sum(), inputs, allow_unused=True),
                    torch.autograd.grad((reference * probe).sum(), inputs, allow_unused=True)):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-12, atol=1e-12)

    def full_size_maps(function):  # distinct maps held
        return {address for dtype, shape, address in saved_with_storage(function)
                if dtype == torch.float64 and shape == (6, 4, 10, 10)}

    assert len(full_size_maps(lambda: block(x, context))) == len(full_size_maps(written_out)) - 1
