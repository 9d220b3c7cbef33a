"""CAVIA and its context-conditioned networks against explicit per-task autograd."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import CAVIA
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import SinusoidTasks, TaskBatch
from fewshot_lightning.models import MLP, ContextMLP, FiLMConv4


def sinusoids(tasks=3, shots=5):
    return SinusoidTasks(shots=shots, queries=4).__getitems__(range(tasks))


def explicit_meta_gradient(backbone, batch, lr, steps, first_order=False):
    """Per task: a zero context, explicit autograd.grad steps on it, then the mean query loss."""
    total = 0
    for t in range(batch.num_tasks):
        context = torch.zeros(backbone.context_dim, requires_grad=True)
        for _ in range(steps):
            loss = F.mse_loss(backbone(batch.support_x[t], context), batch.support_y[t])
            (grad,) = torch.autograd.grad(loss, context, create_graph=not first_order)
            context = context - lr * grad
        total = total + F.mse_loss(backbone(batch.query_x[t], context), batch.query_y[t])
    meta_loss = total / batch.num_tasks
    return meta_loss, torch.autograd.grad(meta_loss, list(backbone.parameters()))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_explicit_autograd(batching, first_order):
    backbone = ContextMLP(1, (16, 16), 1, context_dim=4)
    model = CAVIA(backbone, inner_lr=0.5, inner_steps=2, first_order=first_order, batching=batching)
    batch = sinusoids()
    loss = per_task_loss(model(batch), batch.query_y).mean()
    grads = torch.autograd.grad(loss, list(backbone.parameters()))
    ref_loss, ref_grads = explicit_meta_gradient(backbone, batch, 0.5, 2, first_order)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def test_second_order_terms_matter_here():
    # Otherwise the test above could not tell first from second order.
    backbone = ContextMLP(1, (16, 16), 1, context_dim=4)
    batch = sinusoids()
    _, second = explicit_meta_gradient(backbone, batch, 0.5, 2)
    _, first = explicit_meta_gradient(backbone, batch, 0.5, 2, first_order=True)
    assert max((s - f).abs().max() for s, f in zip(second, first)) > 1e-3


def test_the_inner_loop_adapts_only_a_context_reset_for_every_task():
    backbone = ContextMLP(1, (16,), 1, context_dim=3)
    before = copy.deepcopy(backbone.state_dict())
    model = CAVIA(backbone, inner_lr=1.0, inner_steps=3, batching="vmap")
    batch = sinusoids(tasks=4)
    adapted = model.adapt(batch.support_x, batch.support_y)
    assert set(adapted) == {"context"} and adapted["context"].shape == (4, 3)
    assert adapted["context"].abs().sum() > 0  # the contexts moved
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, before[name])  # the shared weights did not
    assert torch.equal(model.initial_params(4)["context"], torch.zeros(4, 3))
    # Reset per task: a task's context depends on its own data only, not on the tasks adapted
    # before it or beside it.
    model.adapt(sinusoids(tasks=2, shots=7).support_x, sinusoids(tasks=2, shots=7).support_y)
    alone = model.adapt(batch.support_x[2:3], batch.support_y[2:3])
    assert torch.allclose(alone["context"][0], adapted["context"][2], atol=1e-6)


def test_evaluation_adapts_the_context_without_an_outer_graph():
    model = CAVIA(ContextMLP(1, (16,), 1, context_dim=3), inner_lr=1.0, test_inner_steps=4)
    batch = sinusoids(tasks=2, shots=10)
    with torch.inference_mode():
        result = model._evaluate(TaskBatch(*(t.clone() for t in batch)), "test")
    assert result["loss"].shape == (2,) and not result["loss"].requires_grad


def test_film_conv4_starts_as_the_plain_network_and_the_context_modulates_it():
    torch.manual_seed(0)
    network = FiLMConv4(in_channels=1, hidden=8, out_features=5, image_size=28, context_dim=6, film_blocks=(1, 2))
    images = torch.randn(2, 10, 1, 28, 28)
    plain = copy.deepcopy(network)
    for block in plain.blocks:
        block.film = None
    assert torch.allclose(network(images), plain(images), atol=1e-6)  # zero context: identity FiLM
    assert torch.allclose(network(images, torch.zeros(6)), plain(images), atol=1e-6)
    modulated = network(images, torch.randn(6))
    assert modulated.shape == (2, 10, 5)
    assert not torch.allclose(modulated, plain(images), atol=1e-3)


def test_film_modulates_the_pooled_maps_as_the_authors_network_does():
    # lmzintgraf/cavia's CondConvNet: conv, batch norm, 2x2 max-pool, FiLM, ReLU. FiLM before the
    # pooling is another function where a channel's multiplier is negative (here -2 on channel 0:
    # the pooling would pick the minimum of the unmodulated maps).
    import torch.nn.functional as F

    torch.manual_seed(0)
    network = FiLMConv4(in_channels=1, hidden=4, out_features=3, image_size=16, context_dim=2, film_blocks=(0,))
    block = network.blocks[0]
    with torch.no_grad():
        block.film.weight.zero_()
        block.film.weight[0, 0] = -3.0  # scale of channel 0 = -3 * context[0]: multiplier 1 - 3 = -2
        block.film.weight[4, 1] = 0.5   # shift of channel 0 = 0.5 * context[1]
    context = torch.tensor([1.0, 1.0])
    images = torch.randn(6, 1, 16, 16)
    scale, shift = block.film(context).chunk(2)
    maps = F.max_pool2d(F.batch_norm(block.conv(images), None, None, block.norm.weight, block.norm.bias, True), 2)
    out = F.relu(maps * (1 + scale).view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    for later in network.blocks[1:]:
        out = later(out, context)
    expected = network.head(out.flatten(1))
    assert (1 + scale[0]).item() == pytest.approx(-2.0)
    assert torch.allclose(network(images, context), expected, atol=1e-6)


def test_the_meta_gradient_reaches_the_film_layers_on_images():
    torch.manual_seed(0)
    backbone = FiLMConv4(in_channels=1, hidden=8, out_features=3, image_size=16, context_dim=5)
    model = CAVIA(backbone, inner_lr=1.0, inner_steps=1, batching="vmap")
    x = torch.randn(2, 6, 1, 16, 16)
    y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 2, 1, 0]])
    batch = TaskBatch(x, y, x.clone(), y.clone())
    loss = per_task_loss(model(batch), y).mean()
    loss.backward()
    assert all(p.grad is not None for p in backbone.parameters())
    film = backbone.blocks[2].film
    assert film.weight.grad.abs().sum() > 0  # the FiLM layer learns through the adapted context


def test_a_backbone_without_a_context_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="CAVIA needs a backbone .* context_dim; MLP has context_dim=None. Use models.ContextMLP"):
        CAVIA(MLP())
    with pytest.raises(ValueError, match=r"CAVIA takes no adapt=\['head.'\]: only the context adapts"):
        CAVIA(ContextMLP(), adapt=["head."])
    with pytest.raises(ValueError, match="context has 2 entries, the network expects context_dim=5"):
        ContextMLP(context_dim=5)(torch.zeros(3, 1), torch.zeros(2))
