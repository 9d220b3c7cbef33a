"""The functional inner loop (fewshot_lightning/inner.py) against independent computations."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_lightning.algorithms.base import TaskShapeError, per_task_loss
from fewshot_lightning.inner import (
    Adam, adapt, channels_last, functional, predict, select_parameters, task_params, trajectory,
)
from fewshot_lightning.models import MLP, Conv4


def regression_tasks(tasks=3, shots=6, queries=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, shots + queries, 1, generator=g)
    y = torch.sin(x) * torch.rand(tasks, 1, 1, generator=g) * 3
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def plain_sgd(model, x, y, lr, steps):
    """One task, written with a module copy and torch.optim.SGD: nothing of inner.py."""
    import copy

    task_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(task_model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(task_model(x), y).backward()
        optimizer.step()
    return dict(task_model.named_parameters())


def test_adapt_equals_plain_sgd_per_task_and_leaves_the_module_untouched():
    model = MLP(1, (8, 8), 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sx, sy, _, _ = regression_tasks()
    params = adapt(functional(model), task_params(dict(model.named_parameters()), 3), sx, sy, per_task_loss, 3, 0.05,
                   differentiable=False)
    for t in range(3):
        reference = plain_sgd(model, sx[t], sy[t], 0.05, 3)
        for name, value in params.items():
            assert value.shape == (3, *before[name].shape)
            assert torch.allclose(value[t], reference[name], atol=1e-6), name
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])  # functional: the module's own weights never move


@pytest.mark.parametrize("second_order", [True, False])
def test_vmap_and_loop_give_the_same_parameters_and_meta_gradients(second_order):
    model = MLP(1, (8, 8), 1)
    sx, sy, qx, qy = regression_tasks(tasks=4)
    results = {}
    for batching in ("vmap", "loop"):
        forward = functional(model, batching=batching)
        params = adapt(forward, task_params(dict(model.named_parameters()), 4), sx, sy, per_task_loss, 2, 0.1,
                       second_order=second_order)
        loss = per_task_loss(forward(params, qx), qy).mean()
        results[batching] = (params, torch.autograd.grad(loss, list(model.parameters())))
    (params_v, grads_v), (params_l, grads_l) = results["vmap"], results["loop"]
    for name in params_v:
        assert torch.allclose(params_v[name], params_l[name], atol=1e-6)
    for v, l in zip(grads_v, grads_l):
        assert torch.allclose(v, l, atol=1e-6)


def test_evaluation_keeps_no_graph_even_with_learnable_rates_and_under_no_grad():
    model = MLP(1, (8,), 1)
    rate = torch.tensor(0.1, requires_grad=True)  # a learned rate, as Meta-SGD's
    sx, sy, qx, _ = regression_tasks()
    with torch.no_grad():  # inner gradients are still taken
        steps = list(trajectory(functional(model), task_params(dict(model.named_parameters()), 3, detach=True),
                                sx, sy, per_task_loss, 3, lambda step, name: rate, differentiable=False))
    assert len(steps) == 4  # before any step, then after each of 3
    for params in steps:
        assert all(p.grad_fn is None and not p.requires_grad for p in params.values())
    # Adaptation happened: the support loss fell at every step.
    losses = [per_task_loss(predict(model, params, sx), sy) for params in steps]
    assert all((later < earlier).all() for earlier, later in zip(losses, losses[1:]))
    assert predict(model, steps[-1], qx).grad_fn is None


def test_a_curve_looped_in_the_caller_equals_the_trajectory():
    model = MLP(1, (8,), 1)
    sx, sy, _, _ = regression_tasks()
    forward = functional(model)
    start = task_params(dict(model.named_parameters()), 3, detach=True)
    whole = list(trajectory(forward, start, sx, sy, per_task_loss, 3, 0.05, differentiable=False))
    params = start
    for k in range(1, 4):
        params = adapt(forward, params, sx, sy, per_task_loss, 1, 0.05, differentiable=False)
        for name in params:
            assert torch.allclose(params[name], whole[k][name], atol=1e-7)


def test_adam_equals_torch_adam_per_task():
    model = MLP(1, (8,), 1)
    sx, sy, _, _ = regression_tasks()
    betas = (0.0, 0.999)  # Reptile's inner Adam
    params = adapt(functional(model), task_params(dict(model.named_parameters()), 3), sx, sy, per_task_loss, 4, 0.01,
                   optimizer=Adam(betas=betas), differentiable=False)
    import copy

    for t in range(3):
        task_model = copy.deepcopy(model)
        optimizer = torch.optim.Adam(task_model.parameters(), lr=0.01, betas=betas, eps=1e-8)
        for _ in range(4):
            optimizer.zero_grad()
            F.mse_loss(task_model(sx[t]), sy[t]).backward()
            optimizer.step()
        for name, value in task_model.named_parameters():
            assert torch.allclose(params[name][t], value, atol=1e-6), name


def test_penalty_sees_the_parameters():
    # A proximal term lambda/2 ||phi - theta||^2 (iMAML): one gradient step on
    # L(phi) + lambda/2 ||phi - theta||^2 from phi0 = theta + d is
    # phi1 = phi0 - lr * (grad L(phi0) + lambda * d), checked on a linear model by hand.
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    offset = {n: torch.full_like(p, 0.3) for n, p in theta.items()}
    start = {n: (theta[n] + offset[n]).unsqueeze(0) for n in theta}
    x, y = torch.randn(1, 5, 2), torch.randn(1, 5, 1)
    lam, lr = 2.0, 0.1

    def penalty(params):
        return 0.5 * lam * sum((params[n] - theta[n]).square().flatten(1).sum(1) for n in params)

    params = adapt(functional(model), start, x, y, per_task_loss, 1, lr, penalty=penalty, differentiable=False)
    w0, b0 = start["weight"][0], start["bias"][0]
    residual = x[0] @ w0.T + b0 - y[0]  # [5, 1]
    grad_w = 2 * residual.T @ x[0] / 5
    grad_b = 2 * residual.sum(0) / 5
    assert torch.allclose(params["weight"][0], w0 - lr * (grad_w + lam * 0.3), atol=1e-6)
    assert torch.allclose(params["bias"][0], b0 - lr * (grad_b + lam * 0.3), atol=1e-6)


def test_minibatches_use_the_indices_of_each_step():
    model = MLP(1, (8,), 1)
    sx, sy, _, _ = regression_tasks(shots=6)
    picks = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    per_task = [torch.tensor([[0, 1, 2], [5, 4, 3], [1, 3, 5]]), torch.tensor([[3, 4, 5], [0, 1, 2], [0, 2, 4]])]
    start = task_params(dict(model.named_parameters()), 3)
    for indices in (picks, per_task):
        params = adapt(functional(model), start, sx, sy, per_task_loss, 2, 0.05,
                       minibatch=lambda step: indices[step], differentiable=False)
        for t in range(3):
            import copy

            task_model = copy.deepcopy(model)
            optimizer = torch.optim.SGD(task_model.parameters(), lr=0.05)
            for step in range(2):
                index = indices[step] if indices[step].dim() == 1 else indices[step][t]
                optimizer.zero_grad()
                F.mse_loss(task_model(sx[t, index]), sy[t, index]).backward()
                optimizer.step()
            for name, value in task_model.named_parameters():
                assert torch.allclose(params[name][t], value, atol=1e-6), name


class ContextMLP(nn.Module):
    """An MLP fed [x, context]: CAVIA's regression network."""

    def __init__(self, context_dim=3):
        super().__init__()
        self.context_dim = context_dim
        self.body = nn.Sequential(nn.Linear(1 + context_dim, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x, context):
        return self.body(torch.cat([x, context.expand(*x.shape[:-1], self.context_dim)], dim=-1))


def test_keyword_params_adapt_a_context_instead_of_the_weights():
    model = ContextMLP()
    sx, sy, qx, qy = regression_tasks()
    forward = functional(model, keyword_params=["context"])
    params = adapt(forward, {"context": torch.zeros(3, 3)}, sx, sy, per_task_loss, 1, 1.0)
    assert set(params) == {"context"} and params["context"].shape == (3, 3)
    for t in range(3):  # one step on the context alone, computed directly
        context = torch.zeros(3, requires_grad=True)
        loss = F.mse_loss(model(sx[t], context), sy[t])
        (grad,) = torch.autograd.grad(loss, context)
        assert torch.allclose(params["context"][t], -1.0 * grad, atol=1e-6)
    # Second order through the context: the shared weights get a meta-gradient.
    per_task_loss(forward(params, qx), qy).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_task_params_are_views_whose_gradient_sums_over_tasks():
    weight = torch.randn(2, 3, requires_grad=True)
    params = task_params({"w": weight}, 4)
    assert params["w"].shape == (4, 2, 3) and params["w"].stride()[0] == 0  # no copy
    (params["w"] * torch.arange(4.0).view(4, 1, 1)).sum().backward()
    assert torch.allclose(weight.grad, torch.full((2, 3), 0.0 + 1 + 2 + 3))


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="batching must be one of \\('vmap', 'loop'\\), got 'threads'"):
        functional(MLP(), batching="threads")
    with pytest.raises(ValueError, match="memory_format must be one of \\('contiguous', 'channels_last'\\), got 'nhwc'"):
        functional(MLP(), batching="loop", memory_format="nhwc")
    with pytest.raises(ValueError, match="channels_last' applies to batching='loop'.*pass batching='loop'"):
        functional(MLP(), batching="vmap", memory_format="channels_last")
    with pytest.raises(ValueError, match="adapt entry 'tail.' matches no parameter of MLP"):
        select_parameters(MLP(), ["tail."])
    with pytest.raises(ValueError, match="Adam betas must be two numbers in \\[0, 1\\)"):
        Adam(betas=(1.0, 0.9))


def test_parameter_selection_by_name_prefix_pattern_and_exclusion():
    from fewshot_lightning.models import Conv4

    net = Conv4(hidden=4, out_features=2, image_size=16)
    names = [n for n, _ in net.named_parameters()]
    assert select_parameters(net, None) == names
    assert select_parameters(net, ["head."]) == ["head.weight", "head.bias"]
    assert select_parameters(net, ["features.0.0.weight"]) == ["features.0.0.weight"]
    # Everything but batch norm: Conv4 blocks are (conv, batch norm, ReLU, pool), so index 1.
    no_norm = select_parameters(net, ["!features.*.1.*"])
    assert len(no_norm) == len(names) - 8  # 4 batch norms x (weight, bias)
    assert not any(n.startswith("features.") and n.split(".")[2] == "1" for n in no_norm)
    assert "head.weight" in no_norm and "features.1.0.weight" in no_norm
    assert select_parameters(net, ["features.*.weight", "!features.*.1.weight"]) == [
        f"features.{i}.0.weight" for i in range(4)
    ]
    with pytest.raises(ValueError, match="selects no parameter of Conv4"):
        select_parameters(net, ["head.", "!head."])


def test_a_modules_own_batched_forward_equals_vmap_of_its_forward_to_second_order():
    # MLP.forward_tasks (batched matrix products) against torch.func.vmap of MLP.forward: the
    # same outputs, inner steps and meta-gradients. ANIL-like: only the head per task, the
    # features shared, so the fixed parameters take the batched path too.
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1)
    sx, sy, qx, qy = regression_tasks(tasks=4)
    head = {n: p for n, p in model.named_parameters() if n.startswith("head.")}
    features = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}
    vmapped = torch.func.vmap(
        lambda params, x: torch.func.functional_call(model, {**features, **params}, (x,)), in_dims=(0, 0)
    )
    results = []
    for forward in (functional(model, fixed=features), vmapped):
        params = adapt(forward, task_params(head, 4), sx, sy, per_task_loss, 2, 0.1)
        loss = per_task_loss(forward(params, qx), qy).mean()
        results.append((forward(params, qx), torch.autograd.grad(loss, list(model.parameters()))))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def image_tasks(tasks=3, ways=3, shots=2, queries=2, channels=1, side=28, seed=2):
    g = torch.Generator().manual_seed(seed)
    labels = lambda per_class: torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)
    return (torch.rand(tasks, ways * shots, channels, side, side, generator=g), labels(shots),
            torch.rand(tasks, ways * queries, channels, side, side, generator=g), labels(queries))


@pytest.mark.parametrize("groups", ["all tasks", "2+1 tasks", "one task"])
@pytest.mark.parametrize("adapted", ["all", "head"])
@pytest.mark.parametrize("variant", [
    dict(hidden=6, out_features=3),
    dict(hidden=6, out_features=3, max_pool=False),  # cbfinn/maml's stride-2 Omniglot network
    dict(in_channels=3, hidden=4, out_features=3, image_size=32),
])
def test_conv4_batched_forward_equals_its_forward_task_by_task_to_second_order(variant, adapted, groups, monkeypatch):
    # Conv4.forward_tasks (grouped convolutions, batch norm over the tasks' channels side by
    # side) against the module's own forward run task by task (the loop): the same outputs,
    # two second-order inner steps and meta-gradients, with every parameter adapted (MAML) and
    # with only the head (ANIL: the features shared, passed without a task dimension), all
    # three tasks at once or in groups (the CPU's cpu_chunk_bytes: 2 + 1 leaves a short group).
    torch.manual_seed(0)
    model = Conv4(**variant)
    sx, sy, qx, qy = image_tasks(channels=variant.get("in_channels", 1), side=variant.get("image_size", 28))
    side = variant.get("image_size", 28) // (1 if variant.get("max_pool", True) else 2)
    per_task = 6 * variant["hidden"] * side * side * 4  # first map's bytes: 6 samples, float32
    model.cpu_chunk_bytes = {"all tasks": None, "2+1 tasks": 2 * per_task, "one task": 1}[groups]
    assert model._tasks_per_chunk(sx) == {"all tasks": 3, "2+1 tasks": 2, "one task": 1}[groups]
    theta = dict(model.named_parameters())
    start = {n: p for n, p in theta.items() if adapted == "all" or n.startswith("head.")}
    fixed = {n: p for n, p in theta.items() if n not in start}
    calls = []
    own = Conv4.forward_tasks
    monkeypatch.setattr(Conv4, "forward_tasks", lambda self, params, x: (calls.append(x.shape[0]), own(self, params, x))[1])
    results = []
    for batching in ("vmap", "loop"):
        forward = functional(model, fixed=fixed, batching=batching)
        params = adapt(forward, task_params(start, 3), sx, sy, per_task_loss, 2, 0.3)
        out = forward(params, qx)
        results.append((out, torch.autograd.grad(per_task_loss(out, qy).mean(), list(theta.values()))))
    assert calls == [3, 3, 3], "vmap batching should run Conv4.forward_tasks (two inner steps, then the query)"
    (out, grads), (ref_out, ref_grads) = results
    assert out.shape == (3, 6, 3)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    scale = torch.cat([g.flatten() for g in ref_grads]).norm()
    assert scale > 1e-3  # gradients that are not all zero, so the comparison can fail
    for mine, theirs in zip(grads, ref_grads):
        assert (mine - theirs).norm() <= 1e-4 * scale


def test_a_subclass_that_changes_forward_is_not_run_by_its_parents_batched_forward():
    # Conv4.forward_tasks computes Conv4's function; a subclass with a forward of its own (and
    # no forward_tasks) must run its own forward under vmap, as it does in the loop.
    class Doubled(Conv4):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = Doubled(hidden=4, out_features=3)
    sx = image_tasks()[0]
    params = task_params(dict(model.named_parameters()), 3)
    torch.testing.assert_close(functional(model, batching="vmap")(params, sx), functional(model, batching="loop")(params, sx),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(functional(model, batching="vmap")(params, sx)[0], model(sx[0]), rtol=1e-5, atol=1e-6)


def test_modules_without_their_own_batched_forward_run_under_vmap_and_as_a_loop_alike():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    sx, sy, qx, qy = regression_tasks(tasks=3)
    outs = []
    for batching in ("vmap", "loop"):
        forward = functional(model, batching=batching)
        params = adapt(forward, task_params(dict(model.named_parameters()), 3), sx, sy, per_task_loss, 2, 0.1)
        outs.append((forward(params, qx), torch.autograd.grad(per_task_loss(forward(params, qx), qy).mean(),
                                                               list(model.parameters()))))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for v, l in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(v, l, rtol=1e-5, atol=1e-6)


def saved_bytes(output):
    """Bytes the autograd graph behind ``output`` keeps for its backward, each storage once
    (``benchmarks/saved_tensors.py``'s walk of the graph)."""
    spec = importlib.util.spec_from_file_location(
        "saved_tensors", Path(__file__).resolve().parents[1] / "benchmarks" / "saved_tensors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.saved_tensors(output)[0]


def conv_sequential(hidden=16, ways=5):
    """A learn2learn-style Conv4 without batch norm, written as plain nested nn.Sequential."""
    blocks = [nn.Sequential(nn.Conv2d(1 if i == 0 else hidden, hidden, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
              for i in range(3)]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden * 9, ways))


def test_activations_before_max_pooling_are_the_ones_an_nn_sequential_pools_next():
    from fewshot_lightning.inner import activations_before_max_pooling

    model = nn.Sequential(
        conv_sequential(),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.LeakyReLU(), nn.AdaptiveMaxPool2d(1)),
        nn.Sequential(nn.ReLU(), nn.AvgPool2d(2)),  # average pooling keeps no copy of its input
    )
    found = activations_before_max_pooling(model)
    assert [type(m) for m in found] == [nn.ReLU] * 3 + [nn.LeakyReLU]
    assert found[3] is model[1][3]
    assert activations_before_max_pooling(MLP(1, (8,), 1)) == ()


@pytest.mark.parametrize("second_order", [True, False])
def test_vmap_of_a_pooled_sequential_keeps_what_the_loop_keeps_and_gives_its_numbers(second_order):
    # Under torch.func.vmap a convolution answers task dimension second in memory and max
    # pooling copies it to the front, keeping the copy while the ReLU before it keeps the
    # original: every pooled map twice until the outer backward. The ReLU now takes the copy
    # (tasks_first_into), so vmap keeps what the task-by-task loop keeps, plus the weights it
    # lays out per task, and gives the loop's numbers. Without it: 1.49x the loop's here.
    torch.manual_seed(0)
    model = conv_sequential()
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(4, 5, 1, 28, 28, generator=g), torch.rand(4, 15, 1, 28, 28, generator=g)
    sy, qy = torch.arange(5).repeat(4, 1), torch.arange(15).remainder(5).repeat(4, 1)
    theta = dict(model.named_parameters())
    weights_per_task = 4 * sum(p.numel() * p.element_size() for p in theta.values())
    kept, results = {}, {}
    for batching in ("vmap", "loop"):
        forward = functional(model, batching=batching)
        params = adapt(forward, task_params(theta, 4), sx, sy, per_task_loss, 1, 0.4, second_order=second_order)
        loss = per_task_loss(forward(params, qx), qy).mean()
        kept[batching] = saved_bytes(loss)
        results[batching] = (loss, torch.autograd.grad(loss, list(theta.values())))
        assert all(not m._forward_pre_hooks for m in model.modules())  # the module is left as it was
    assert kept["vmap"] <= kept["loop"] + 2 * weights_per_task, kept
    torch.testing.assert_close(results["vmap"][0], results["loop"][0], rtol=1e-5, atol=1e-6)
    for v, l in zip(results["vmap"][1], results["loop"][1]):
        torch.testing.assert_close(v, l, rtol=1e-4, atol=1e-6)


def test_channels_last_restrides_even_a_one_channel_weight_and_copies_only_when_needed():
    # A [64, 1, 3, 3] weight is "contiguous" in both layouts, yet a convolution reads its
    # strides to pick the output layout: it must come out with NHWC strides (9, 1, 3, 1).
    grey = torch.randn(64, 1, 3, 3, requires_grad=True)
    assert grey.is_contiguous(memory_format=torch.channels_last) and grey.stride() == (9, 9, 3, 1)
    restrided = channels_last(grey)
    assert restrided.stride() == (9, 1, 3, 1) and torch.equal(restrided, grey)
    assert channels_last(restrided) is restrided  # already so strided: no copy
    restrided.sum().backward()
    assert torch.equal(grey.grad, torch.ones_like(grey))  # a differentiable copy
    bias = torch.randn(64)
    assert channels_last(bias) is bias  # only 4-D tensors


@pytest.mark.parametrize("second_order", [True, False])
def test_channels_last_loop_gives_the_contiguous_numbers_and_really_runs_channels_last(second_order):
    # Conv4 with batch norm on one-channel images, two inner steps: adapted parameters, query
    # outputs and the meta-gradient agree with the contiguous loop to rounding (different
    # kernels, so not bit for bit), and the first convolution answers in the NHWC layout.
    torch.manual_seed(0)
    model = Conv4(in_channels=1, hidden=16, out_features=5, image_size=28)
    g = torch.Generator().manual_seed(3)
    sx, qx = torch.rand(3, 5, 1, 28, 28, generator=g), torch.rand(3, 10, 1, 28, 28, generator=g)
    sy, qy = torch.arange(5).repeat(3, 1), torch.arange(10).remainder(5).repeat(3, 1)
    layouts = []
    hooks = [block[0].register_forward_hook(
        lambda module, inputs, output: layouts.append(output.stride()[1] == 1)  # NHWC: channels vary fastest
    ) for block in model.features]
    results = {}
    try:
        for memory_format in ("contiguous", "channels_last"):
            layouts.clear()
            forward = functional(model, batching="loop", memory_format=memory_format)
            params = adapt(forward, task_params(dict(model.named_parameters()), 3), sx, sy, per_task_loss, 2, 0.1,
                           second_order=second_order)
            outputs = forward(params, qx)
            grads = torch.autograd.grad(per_task_loss(outputs, qy).mean(), list(model.parameters()))
            results[memory_format] = (params, outputs, grads, list(layouts))
    finally:
        for hook in hooks:
            hook.remove()
    (p_c, o_c, g_c, l_c), (p_l, o_l, g_l, l_l) = results["contiguous"], results["channels_last"]
    # Every convolution of every block: NCHW throughout in the contiguous loop (a ConvBlock
    # run on its own switches a lone task to channels-last from its second block on, where
    # the maps have more than one channel), NHWC throughout in the channels-last one.
    assert len(l_c) == len(l_l) == 4 * 3 * 3  # 4 blocks x 3 tasks x (2 support passes + 1 query)
    assert not any(l_c) and all(l_l)
    plain = []
    hooks = [block[0].register_forward_hook(lambda module, inputs, output: plain.append(output.stride()[1] == 1))
             for block in model.features]
    model(qx[0])  # the module on its own still runs a lone task channels-last after the first block
    for hook in hooks:
        hook.remove()
    assert plain == [False, True, True, True]
    assert o_c.shape == o_l.shape == (3, 10, 5)
    assert torch.allclose(o_c, o_l, atol=1e-4)
    for name in p_c:
        assert torch.allclose(p_c[name], p_l[name], atol=1e-5), name
    # Relative to the meta-gradient's size, which is far from zero (only the convolution
    # biases, which batch norm cancels, have none).
    scale = torch.cat([a.flatten() for a in g_c]).norm()
    assert scale > 1e-2
    for (name, _), a, b in zip(model.named_parameters(), g_c, g_l):
        assert (a - b).norm() <= 1e-4 * scale, name


def test_conv4_task_groups_take_any_positive_budget_and_refuse_others():
    model = Conv4(hidden=4, out_features=3)
    x = image_tasks(tasks=5)[0]  # 6 samples of 28x28: a task's first map is 6*4*28*28*4 bytes
    per_task = 6 * 4 * 28 * 28 * 4
    model.cpu_chunk_bytes = 2.5 * per_task  # a float budget (8e6 in a config) still gives whole tasks
    assert model._tasks_per_chunk(x) == 2
    params = task_params(dict(model.named_parameters()), 5)
    torch.testing.assert_close(functional(model)(params, x), functional(model, batching="loop")(params, x), rtol=1e-5, atol=1e-6)
    for bad in (0, -1):
        model.cpu_chunk_bytes = bad
        with pytest.raises(ValueError, match="cpu_chunk_bytes must be a positive number of bytes, or None"):
            model._tasks_per_chunk(x)


# -- networks that hold a layer twice, or one weight in two layers ----------------------------

class Reused(nn.Module):
    """One hidden layer applied twice, registered under two names (``again`` is ``hidden``)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(1, 8)
        self.hidden = nn.Linear(8, 8)
        self.again = self.hidden
        self.last = nn.Linear(8, 1)

    def forward(self, x):
        return self.last(torch.tanh(self.again(torch.tanh(self.hidden(torch.tanh(self.first(x)))))))

    @staticmethod
    def by_hand(weights, x):
        w1, b1, w2, b2, w3, b3 = weights
        h = torch.tanh(x @ w1.T + b1)
        h = torch.tanh(torch.tanh(h @ w2.T + b2) @ w2.T + b2)
        return h @ w3.T + b3


class Tied(nn.Module):
    """Two layers with their own biases and one weight (``second.weight = first.weight``)."""

    def __init__(self):
        super().__init__()
        self.inputs = nn.Linear(1, 8)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.second.weight = self.first.weight
        self.outputs = nn.Linear(8, 1)

    def forward(self, x):
        return self.outputs(torch.tanh(self.second(torch.tanh(self.first(torch.tanh(self.inputs(x)))))))

    @staticmethod
    def by_hand(weights, x):
        w0, b0, w, b1, b2, w3, b3 = weights  # named_parameters: second.weight is first.weight
        h = torch.tanh(x @ w0.T + b0)
        h = torch.tanh(torch.tanh(h @ w.T + b1) @ w.T + b2)
        return h @ w3.T + b3


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("network", [Reused, Tied])
@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("tasks_per_backward", [None, 2])
def test_a_layer_held_twice_adapts_as_one_and_stays_the_optimizers(network, batching, tasks_per_backward):
    # torch.func.functional_call's own weight tying puts one task's adapted tensor in place of a
    # layer registered under two names when it restores the module (pytorch#164759): the module
    # then holds a tensor the optimizer never updates and a checkpoint saves. Two steps: the
    # parameters are the optimizer's after each, and each meta-gradient is the hand-written one.
    from fewshot_lightning.algorithms import MAML
    from fewshot_lightning.data.task import TaskBatch
    from test_maml_gradients import explicit_meta_gradient

    torch.manual_seed(0)
    backbone = network()
    model = MAML(backbone, inner_lr=0.1, inner_steps=2, batching=batching, tasks_per_backward=tasks_per_backward)
    held = [p for _, p in backbone.named_parameters()]
    assert len(held) == (6 if network is Reused else 7)
    optimizer = torch.optim.SGD(held, lr=0.5)
    for step in range(2):
        batch = TaskBatch(*regression_tasks(tasks=3, seed=step))
        _, expected = explicit_meta_gradient(backbone, batch, 0.1, 2, forward=backbone.by_hand)
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        now = [p for _, p in backbone.named_parameters()]
        assert len(now) == len(held) and all(p is q for p, q in zip(now, held)), [type(p).__name__ for p in now]
        for p, g in zip(held, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
        optimizer.step()
    state = backbone.state_dict()
    assert all(torch.equal(state[name], p) for name, p in backbone.named_parameters())


@pytest.mark.parametrize("batch_norm_stats", ["task", "running"])
def test_a_batch_norm_held_twice_keeps_its_running_statistics(batch_norm_stats):
    # A metric learner runs a backbone with plain batch norm once per task under vmap, with
    # the running averages hidden ("task") or replaced by per-task copies ("running"): the
    # layer registered under two names must have its own buffers back after the step.
    from fewshot_lightning.algorithms import ProtoNet
    from learner_helpers import random_episodes

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4)
            self.norm_again = self.norm

        def forward(self, x):
            return self.norm_again(torch.relu(self.norm(self.conv(x)))).flatten(1)

    backbone = Twice()
    model = ProtoNet(backbone, batch_norm_stats=batch_norm_stats)
    buffers = dict(backbone.named_buffers())
    model.training_step(random_episodes(2, x_shape=(1, 5, 5)), 0).backward()
    assert {n: b for n, b in backbone.named_buffers()}.keys() == buffers.keys()
    assert all(backbone.get_buffer(n) is b for n, b in buffers.items())
    # "running": the layer saw the tasks twice a step, each pass moving the averages off zero.
    moved = not torch.equal(backbone.norm.running_mean, torch.zeros(4))
    assert moved == (batch_norm_stats == "running")


def _vmap_and_loop(module, x, tasks):
    params = task_params(dict(module.named_parameters()), tasks)
    return functional(module, batching="vmap")(params, x), functional(module, batching="loop")(params, x)


def test_vmap_uses_a_backbones_forward_tasks_only_where_it_computes_forward():
    # forward_tasks calls no layer's __call__ and ran MLP's parameter-free layers on [T, M, F]:
    # a forward hook was skipped (outputs 0.84 apart after a step), Softmax(dim=1) normalised
    # over the samples instead of the features, a hook zeroing Conv4's head was ignored, and
    # MLP's samples with leading dimensions of their own failed ("batch1 must be a 3D tensor").
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2)
    hooked = MLP(2, (4,), 1)
    hooked.register_forward_hook(lambda module, inputs, output: output * 2)
    vmapped, looped = _vmap_and_loop(hooked, x, 3)
    assert torch.allclose(vmapped, looped, atol=1e-6)
    plain = MLP(2, (4,), 1)
    plain.load_state_dict(hooked.state_dict())
    assert torch.allclose(vmapped, 2 * _vmap_and_loop(plain, x, 3)[1], atol=1e-6)
    softmax = MLP(2, (4,), 3)
    softmax.features.append(nn.Softmax(dim=1))
    assert not softmax.forward_tasks_supported() and MLP().forward_tasks_supported()
    vmapped, looped = _vmap_and_loop(softmax, x, 3)
    assert torch.allclose(vmapped, looped, atol=1e-6)
    images = torch.randn(2, 4, 1, 28, 28)
    conv = Conv4(hidden=8, out_features=5)
    assert conv.forward_tasks_supported()
    conv.head.register_forward_hook(lambda module, inputs, output: output * 0)
    vmapped, looped = _vmap_and_loop(conv, images, 2)
    assert vmapped.abs().max() == 0 and looped.abs().max() == 0
    conv = Conv4(hidden=8, out_features=5)
    conv.features[1][2] = nn.Tanh()
    assert not conv.forward_tasks_supported()
    vmapped, looped = _vmap_and_loop(conv, images, 2)
    assert torch.allclose(vmapped, looped, atol=1e-5)
    grid = torch.randn(3, 5, 4, 2)  # each sample a [4, 2] grid of points
    vmapped, looped = _vmap_and_loop(MLP(2, (4,), 3), grid, 3)
    assert vmapped.shape == (3, 5, 4, 3) and torch.allclose(vmapped, looped, atol=1e-6)


def test_forward_tasks_runs_layers_without_a_bias():
    # MLP.forward_tasks read every nn.Linear's bias (KeyError: 'head.bias') and Conv4's head
    # bias (AttributeError on None) on the vmap path, which batching="auto" may take; the loop ran.
    torch.manual_seed(0)
    x, images = torch.randn(3, 5, 2), torch.randn(2, 4, 1, 28, 28)
    mlp = MLP(2, (4,), 3)
    mlp.head = nn.Linear(4, 3, bias=False)
    mlp.features[0] = nn.Linear(2, 4, bias=False)
    conv = Conv4(hidden=8, out_features=5)
    conv.head = nn.Linear(conv.head.in_features, 5, bias=False)
    for module, inputs, tasks in ((mlp, x, 3), (conv, images, 2)):
        assert module.forward_tasks_supported()
        vmapped, looped = _vmap_and_loop(module, inputs, tasks)
        # The loop is each task's own forward under its own parameters.
        assert torch.allclose(vmapped, looped, atol=1e-5)
        head = {n: p for n, p in module.named_parameters() if n.startswith("head.")}  # ANIL's: the rest shared
        adapted_head = functional(module, batching="vmap")(task_params(head, tasks), inputs)
        assert torch.allclose(adapted_head, torch.stack([module(part) for part in inputs]), atol=1e-5)
        assert vmapped.shape[:2] == inputs.shape[:2]


def test_loop_stacks_tuple_outputs_as_vmap_does():
    class Gaussian(nn.Module):
        def __init__(self):
            super().__init__()
            self.mean, self.log_std = nn.Linear(2, 1), nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.mean(x), self.log_std.expand(x.shape[0], 1)

    torch.manual_seed(0)
    vmapped, looped = _vmap_and_loop(Gaussian(), torch.randn(3, 5, 2), 3)
    assert isinstance(looped, tuple) and all(torch.allclose(a, b) for a, b in zip(vmapped, looped))
    assert looped[0].shape == (3, 5, 1) and looped[1].shape == (3, 5, 1)


def test_inner_loop_arguments_that_would_train_wrongly_are_refused():
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    theta = dict(net.named_parameters())
    x, y = torch.randn(3, 5, 2), torch.randn(3, 5, 1)

    def mse(outputs, targets):
        return (outputs - targets).square().flatten(1).mean(1)

    def squared(params):
        return sum((params[n] - theta[n]).square().flatten(1).sum(1) for n in params)

    forward = functional(net)
    # A [B, 1] penalty broadcast the [B] losses to [B, B]: each task's loss counted B times.
    with pytest.raises(ValueError, match=r"penalty must return one value per task, shape \[3\], but returned \[3, 1\]"):
        adapt(forward, task_params(theta, 3), x, y, mse, 2, 0.1, penalty=lambda p: squared(p).unsqueeze(1))
    adapt(forward, task_params(theta, 3), x, y, mse, 2, 0.1, penalty=squared)
    for lr in (-0.1, float("nan"), 0.0):
        with pytest.raises(ValueError, match=r"lr must be a positive finite step size"):
            adapt(forward, task_params(theta, 3), x, y, mse, 1, lr)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"needs_grad_at_eval = True"):
        adapt(forward, task_params(theta, 3), x, y, mse, 1, 0.1)
    # Class scores of other samples than the labels': cross-entropy's batch-size mismatch, named.
    with pytest.raises(TaskShapeError, match=r"Class scores of shape \(3, 4, 5\) and labels of shape \(3, 6\)"):
        per_task_loss(torch.randn(3, 4, 5), torch.zeros(3, 6, dtype=torch.long))


def test_vmap_over_batch_norm_updating_running_statistics_names_the_fix():
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    params = task_params(dict(model.named_parameters()), 3)
    with pytest.raises(RuntimeError, match=r"Sequential has batch norm that updates running statistics in training "
                                           r"mode, which vmap cannot batch over tasks: pass batching='loop'"):
        functional(model, batching="vmap")(params, torch.randn(3, 5, 2))
    assert functional(model, batching="loop")(params, torch.randn(3, 5, 2)).shape == (3, 5, 1)


def test_an_adapted_parameter_the_forward_never_uses_gets_a_zero_inner_gradient_and_a_warning():
    # "Any nn.Module is a backbone": one with a layer its forward never calls stopped the first
    # step with autograd's "differentiated Tensor at index 2 appears to not have been used".
    from fewshot_lightning.algorithms import MAML
    from fewshot_lightning.data import TaskBatch

    class WithSpareLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = nn.Linear(4, 5), nn.Linear(4, 5)

        def forward(self, x):
            return self.body(x)

    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(2, 5, 4, generator=g), torch.arange(5).repeat(2, 1), torch.randn(2, 5, 4, generator=g),
                      torch.arange(5).repeat(2, 1))
    torch.manual_seed(0)
    backbone = WithSpareLayer()
    for batching in ("vmap", "loop"):
        with pytest.warns(UserWarning, match=r"does not depend on the adapted tensors spare.weight, spare.bias .*"
                                             r"adapt=\['!spare.weight', '!spare.bias'\]"):
            loss = MAML(backbone, inner_lr=0.1, inner_steps=2, batching=batching).training_losses(batch)[0].mean()
        # The same as adapting the used layer only (the spare one's zero steps change nothing).
        expected = MAML(backbone, inner_lr=0.1, inner_steps=2, batching=batching, adapt=["body."]).training_losses(batch)[0].mean()
        torch.testing.assert_close(loss, expected)
        assert torch.autograd.grad(loss, backbone.body.weight)[0].abs().sum() > 0

    # A forward that ignores every parameter it is given cannot adapt anything: an error, not silence.
    params = task_params(dict(backbone.named_parameters()), 2)
    with pytest.raises(ValueError, match="does not depend on any adapted tensor"):
        adapt(lambda p, x: backbone(x), params, batch.support_x, batch.support_y,
              lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(2, -1).mean(1), 1, 0.1)
