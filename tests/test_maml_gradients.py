"""The meta-gradient of MAML against independent computations."""
import logging

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_lightning.algorithms import ANIL, MAML, MetaSGD
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import MLP, Conv4


def regression_batch(tasks=3, shots=5, queries=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, shots + queries, 1, generator=g, dtype=dtype)
    y = torch.sin(x) * torch.rand(tasks, 1, 1, generator=g, dtype=dtype) * 3
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def mlp_forward(weights, x):
    """The MLP written out by hand: no functional_call, no vmap."""
    w1, b1, w2, b2, w3, b3 = weights
    h = torch.relu(x @ w1.T + b1)
    h = torch.relu(h @ w2.T + b2)
    return h @ w3.T + b3


def explicit_meta_gradient(model, batch, lr, steps, first_order=False, forward=None):
    """Per task: explicit torch.autograd.grad(create_graph=True) inner steps, then the mean query
    loss; ``forward(weights, x)`` is the model written out by hand (default: the MLP's)."""
    forward = forward or mlp_forward
    weights = [p for _, p in model.named_parameters()]
    total = 0
    for t in range(batch.num_tasks):
        fast = weights
        for _ in range(steps):
            loss = F.mse_loss(forward(fast, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads)]
        total = total + F.mse_loss(forward(fast, batch.query_x[t]), batch.query_y[t])
    meta_loss = total / batch.num_tasks
    return meta_loss, torch.autograd.grad(meta_loss, weights)


def our_meta_gradient(model, batch):
    loss = per_task_loss(model(batch), batch.query_y).mean()
    return loss, torch.autograd.grad(loss, list(model.backbone.parameters()))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_explicit_autograd_loop(batching, first_order):
    # Two inner steps so second-order terms of both steps are exercised.
    backbone = MLP(1, (8, 8), 1)
    model = MAML(backbone, inner_lr=0.05, inner_steps=2, first_order=first_order, batching=batching)
    batch = regression_batch()
    loss, grads = our_meta_gradient(model, batch)
    ref_loss, ref_grads = explicit_meta_gradient(backbone, batch, 0.05, 2, first_order)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def test_meta_gradient_matches_finite_differences():
    # Central differences in float64 on every parameter of a tiny 1-3-3-1 MLP.
    torch.set_default_dtype(torch.float64)
    try:
        backbone = MLP(1, (3, 3), 1)
        model = MAML(backbone, inner_lr=0.1, inner_steps=1)
        batch = regression_batch(tasks=2, dtype=torch.float64)
        _, grads = our_meta_gradient(model, batch)
        eps = 1e-6
        for param, grad in zip(backbone.parameters(), grads):
            numeric = torch.zeros_like(param)
            for i in range(param.numel()):
                with torch.no_grad():
                    param.view(-1)[i] += eps
                    up = per_task_loss(model(batch), batch.query_y).mean()
                    param.view(-1)[i] -= 2 * eps
                    down = per_task_loss(model(batch), batch.query_y).mean()
                    param.view(-1)[i] += eps
                numeric.view(-1)[i] = (up - down) / (2 * eps)
            assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_first_order_drops_exactly_the_hessian_term():
    # One inner step: MAML's gradient is (I - lr * H_support) g_query(theta'), FOMAML's is
    # g_query(theta'), so they differ by exactly -lr * H_support g_query(theta').
    torch.set_default_dtype(torch.float64)
    try:
        backbone = nn.Linear(2, 1)  # theta = (w1, w2, b)
        lr = 0.1
        batch = TaskBatch(torch.randn(1, 6, 2), torch.randn(1, 6, 1), torch.randn(1, 4, 2), torch.randn(1, 4, 1))
        _, second = our_meta_gradient(MAML(backbone, inner_lr=lr), batch)
        _, first = our_meta_gradient(MAML(backbone, inner_lr=lr, first_order=True), batch)
        theta = torch.cat([backbone.weight.detach().flatten(), backbone.bias.detach()])

        def support_loss(t):
            return F.mse_loss(batch.support_x[0] @ t[:2, None] + t[2], batch.support_y[0])

        def query_loss(t):
            return F.mse_loss(batch.query_x[0] @ t[:2, None] + t[2], batch.query_y[0])

        adapted = theta - lr * torch.func.grad(support_loss)(theta)
        g_query = torch.func.grad(query_loss)(adapted)
        hessian = torch.autograd.functional.hessian(support_loss, theta)
        dropped = -lr * hessian @ g_query
        difference = torch.cat([(s - f).flatten() for s, f in zip(second, first)])
        assert torch.allclose(torch.cat([f.flatten() for f in first]), g_query, atol=1e-10)
        assert torch.allclose(difference, dropped, atol=1e-10)
        assert dropped.abs().max() > 1e-3  # the term is not negligible here, so the test can fail
    finally:
        torch.set_default_dtype(torch.float32)


def test_vmap_and_loop_agree_on_outputs_curves_and_gradients():
    batch = regression_batch(tasks=4)
    results = {}
    for batching in ("vmap", "loop"):
        torch.manual_seed(3)
        model = MAML(MLP(1, (16, 16), 1), inner_lr=0.02, inner_steps=3, test_inner_steps=5, batching=batching)
        loss, grads = our_meta_gradient(model, batch)
        with torch.no_grad():
            curve = model.adaptation_curve(batch)
        results[batching] = (loss, grads, curve)
    (loss_v, grads_v, curve_v), (loss_l, grads_l, curve_l) = results["vmap"], results["loop"]
    assert curve_v.shape == (6, 4, 4, 1)  # steps + 1, tasks, queries, output
    assert torch.allclose(loss_v, loss_l, rtol=1e-6)
    assert torch.allclose(curve_v, curve_l, rtol=1e-5, atol=1e-6)
    for v, l in zip(grads_v, grads_l):
        assert torch.allclose(v, l, rtol=1e-5, atol=1e-7)


def test_evaluation_adapts_without_an_outer_graph_under_inference_mode():
    # The Trainer evaluates under inference_mode; adaptation must still take inner gradients.
    model = MAML(MLP(1, (16, 16), 1), inner_lr=0.02, inner_steps=1, test_inner_steps=5)
    batch = regression_batch(tasks=2)
    with torch.inference_mode():
        batch = TaskBatch(*(t.clone() for t in batch))
        result = model._evaluate(batch, "test")
    mse_before = per_task_loss(model.backbone(batch.query_x.clone()), batch.query_y.clone())
    assert result["loss"].shape == (2,)
    assert not result["loss"].requires_grad
    # Five steps on 5 support points of a smooth function lower the query error.
    assert (result["loss"] < mse_before).all()


def test_anil_adapts_only_the_head():
    torch.manual_seed(0)
    backbone = MLP(1, (8, 8), 1)
    model = ANIL(backbone, inner_lr=0.1, inner_steps=1, batching="loop")
    assert model.adapt_names == ["head.weight", "head.bias"]
    batch = regression_batch(tasks=2)
    outputs = model(batch)
    for t in range(2):  # independent: head-only gradient step on fixed features
        feats_s = backbone.features(batch.support_x[t])
        w, b = backbone.head.weight, backbone.head.bias
        loss = F.mse_loss(feats_s @ w.T + b, batch.support_y[t])
        gw, gb = torch.autograd.grad(loss, (w, b))
        expected = backbone.features(batch.query_x[t]) @ (w - 0.1 * gw).T + (b - 0.1 * gb)
        assert torch.allclose(outputs[t], expected, atol=1e-6)


def test_meta_sgd_learns_per_element_rates():
    backbone = MLP(1, (8,), 1)
    model = MetaSGD(backbone, inner_lr=0.05)
    rates = dict(model.inner_lr.rates.named_parameters())
    assert rates["head__weight"].shape == (1, 1, 8)  # one step, then the parameter's shape
    batch = regression_batch()
    per_task_loss(model(batch), batch.query_y).mean().backward()
    # Every rate receives a gradient: the outer loop trains them.
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in rates.values())


def test_per_step_rates_use_each_step_then_the_last():
    model = MAML(MLP(1, (4,), 1), inner_lr=0.1, inner_steps=2, per_step_lr=True, learn_inner_lr=True)
    with torch.no_grad():
        model.inner_lr.rates["head__bias"].copy_(torch.tensor([0.1, 0.3]))
    assert float(model.inner_lr(0, "head.bias").detach()) == pytest.approx(0.1)
    assert float(model.inner_lr(1, "head.bias").detach()) == pytest.approx(0.3)
    assert float(model.inner_lr(7, "head.bias").detach()) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inner_lr": 0.0}, "inner_lr must be a positive finite number, got 0.0"),
        ({"inner_lr": -0.5}, "inner_lr must be a positive finite number, got -0.5"),
        ({"inner_steps": 0}, "inner_steps must be at least 1, got 0"),
        ({"test_inner_steps": -2}, "test_inner_steps must be at least 1, got -2"),
        ({"adapt": ["nope."]}, "adapt entry 'nope.' matches no parameter"),
        ({"batching": "threads"}, "batching must be 'auto', 'vmap' or 'loop', got 'threads'"),
        ({"memory_format": "nhwc"}, "memory_format must be 'auto', 'contiguous' or 'channels_last', got 'nhwc'"),
        ({"memory_format": "channels_last"},
         "memory_format='channels_last' lays out 4-D (convolution) weights, and MLP has none: it would change "
         "nothing. Use memory_format='auto' or 'contiguous'"),
    ],
)
def test_bad_hyperparameters_raise_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MAML(MLP(), **kwargs)


def test_classification_inner_loop_uses_cross_entropy():
    # Labels are integers: the inner loss is cross-entropy, and one step of it must lower it.
    torch.manual_seed(0)
    backbone = nn.Linear(4, 3)
    model = MAML(backbone, inner_lr=0.5, test_inner_steps=1)
    sx = torch.randn(2, 6, 4)
    sy = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 2, 1, 0]])
    batch = TaskBatch(sx, sy, sx.clone(), sy.clone())  # query = support: adaptation must help
    with torch.no_grad():
        curve = model.adaptation_curve(batch)
    before = per_task_loss(curve[0], sy)
    after = per_task_loss(curve[1], sy)
    assert (after < before).all()


def test_auto_batching_decides_once_on_the_first_batch_and_logs_both_timings(caplog):
    model = MAML(MLP(1, (8,), 1), inner_lr=0.01)  # batching="auto"
    assert model.batching is None  # undecided until a batch shows the model and the task size
    batch = regression_batch()
    # Lightning's logger does not propagate to the root logger (where caplog listens) by default.
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO"):
            first = model(batch)
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert model.batching in ("vmap", "loop")
    message = " ".join(record.getMessage() for record in caplog.records)
    assert f"chose {model.batching!r}" in message and "vmap" in message and "loop" in message and " ms" in message
    decided = model.batching
    second = model(batch)
    assert model.batching == decided  # made once, kept for the run
    # Either path gives the same numbers, so the decision changes speed only.
    for batching in ("vmap", "loop"):
        forced = MAML(MLP(1, (8,), 1), inner_lr=0.01, batching=batching)
        forced.load_state_dict(model.state_dict())
        assert torch.allclose(forced(batch), first, atol=1e-6)
    assert torch.equal(first, second)


def test_meta_sgd_refuses_the_arguments_it_fixes():
    with pytest.raises(ValueError, match="MetaSGD always learns per-parameter rates; remove 'learn_inner_lr'"):
        MetaSGD(MLP(), learn_inner_lr=False)


def test_test_inner_steps_changed_after_construction_sizes_the_curve(tmp_path):
    import lightning as L

    from fewshot_lightning.data import SinusoidDataModule

    model = MAML(MLP(1, (8,), 1), inner_lr=0.01, test_inner_steps=10)
    model.test_inner_steps = 2  # e.g. a script evaluating with fewer steps than configured
    data = SinusoidDataModule(test_tasks=20, meta_batch_size=10)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    result = trainer.test(model, data, verbose=False)[0]
    assert {"test/mse_after_0_steps", "test/mse_after_2_steps"} <= set(result)
    assert "test/mse_after_3_steps" not in result
    assert result["test/mse_after_2_steps"] == pytest.approx(result["test/mse"], rel=1e-6)


def test_a_diverging_test_time_adaptation_is_reported_not_hidden(tmp_path):
    import lightning as L

    from fewshot_lightning.data import SinusoidDataModule

    # An inner rate far too large for ten steps: the adaptation overflows on the test tasks.
    model = MAML(MLP(1, (8,), 1), inner_lr=50.0, test_inner_steps=10, batching="vmap")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"test/mse is (nan|inf).*adaptation diverged.*lower inner_lr"):
        trainer.test(model, SinusoidDataModule(test_tasks=20, meta_batch_size=10), verbose=False)


def image_batch(tasks=2, ways=5, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.rand(tasks, ways, 1, 28, 28, generator=g), torch.arange(ways).repeat(tasks, 1),
                     torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
                     torch.arange(ways * queries).remainder(ways).repeat(tasks, 1))


def test_auto_times_the_channels_last_paths_for_a_convolutional_model_and_keeps_its_numbers(caplog):
    # A model with 4-D weights has four candidate paths; the choice is made once, logged with
    # the four timings, and whichever wins gives the numbers of the contiguous loop.
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4)
    assert model.batching is None and model.memory_format is None  # undecided until a batch comes
    batch = image_batch()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO"):
            chosen = model.choose_batching(batch)
    finally:
        lightning_logger.removeHandler(caplog.handler)
    message = " ".join(record.getMessage() for record in caplog.records)
    assert chosen == model.batching and (model.batching, model.memory_format) in (
        ("vmap", "contiguous"), ("vmap", "channels_last"), ("loop", "contiguous"), ("loop", "channels_last"))
    assert list(model.batching_timings) == ["vmap", "vmap channels_last", "loop", "loop channels_last"]
    for path in model.batching_timings:
        assert f"{path} " in message and " ms" in message
    reference = MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, batching="loop", memory_format="contiguous")
    reference.load_state_dict(model.state_dict())
    loss, grads = our_meta_gradient(model, batch)
    reference_loss, reference_grads = our_meta_gradient(reference, batch)
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    scale = torch.cat([g.flatten() for g in reference_grads]).norm()
    assert scale > 1e-3
    assert all((a - b).norm() <= 1e-4 * scale for a, b in zip(grads, reference_grads))


def test_memory_format_needs_no_choice_where_it_cannot_matter():
    assert MAML(MLP()).memory_format == "contiguous"  # no 4-D weight: nothing to lay out
    # vmap fixed, layout left to "auto": channels-first, as vmap's own batched forward is.
    assert MAML(Conv4(hidden=8), batching="vmap").memory_format == "contiguous"
    both = MAML(Conv4(hidden=8), batching="vmap", memory_format="channels_last")
    assert both.choose_batching(image_batch()) == "vmap" and both.batching_timings == {}  # nothing left to time
    fixed = MAML(Conv4(hidden=8), memory_format="channels_last")  # batching="auto" left to its default
    assert (fixed.batching, fixed.memory_format) == (None, "channels_last")
    assert fixed.choose_batching(image_batch()) in ("vmap", "loop")
    assert list(fixed.batching_timings) == ["vmap channels_last", "loop channels_last"]  # only those agreeing with it
    assert fixed.memory_format == "channels_last"


def test_a_resumed_run_keeps_the_chosen_memory_format():
    from types import SimpleNamespace

    model = MAML(Conv4(hidden=8), inner_lr=0.4, batching="loop", memory_format="channels_last")
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert (checkpoint["batching"], checkpoint["memory_format"]) == ("loop", "channels_last")
    resumed = MAML(Conv4(hidden=8), inner_lr=0.4)  # "auto" both: would time the paths afresh
    resumed._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.batching, resumed.memory_format) == ("loop", "channels_last")
    older = {key: value for key, value in checkpoint.items() if key != "memory_format"}  # saved before the option
    resumed = MAML(Conv4(hidden=8), inner_lr=0.4)
    resumed._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    resumed.on_load_checkpoint(older)
    assert (resumed.batching, resumed.memory_format) == ("loop", "contiguous")


@pytest.mark.parametrize("channels_last_ms, vmap_channels_last_ms, chosen", [
    (97.0, 200.0, ("loop", "contiguous")), (90.0, 200.0, ("loop", "channels_last")),
    (60.0, 200.0, ("loop", "channels_last")), (60.0, 50.0, ("vmap", "channels_last")),
    (200.0, 97.0, ("loop", "contiguous"))])
def test_auto_takes_channels_last_only_when_it_is_clearly_faster(monkeypatch, channels_last_ms, vmap_channels_last_ms,
                                                                 chosen):
    # Timings fixed by hand (vmap 150 ms, NCHW loop 100 ms): 3% faster is a near tie that timing
    # noise decides, so the module's own layout stays; 10% and 40% faster switch; the fastest
    # channels-last path wins, whichever batching it has.
    from fewshot_lightning.algorithms import maml

    assert maml.CHANNELS_LAST_MARGIN == 0.05
    times = {("vmap", "contiguous"): 0.150, ("loop", "contiguous"): 0.100,
             ("loop", "channels_last"): channels_last_ms / 1000, ("vmap", "channels_last"): vmap_channels_last_ms / 1000}

    def timed_step(self, batch, batching, memory_format="contiguous", evaluation=False):
        return times[(batching, memory_format)]

    monkeypatch.setattr(MAML, "_timed_step", timed_step)
    model = MAML(Conv4(hidden=8), inner_lr=0.4)
    model.choose_batching(image_batch())
    assert (model.batching, model.memory_format) == chosen
    assert model.batching_timings == {"vmap": 150.0, "vmap channels_last": vmap_channels_last_ms, "loop": 100.0,
                                      "loop channels_last": channels_last_ms}


def test_under_several_processes_every_process_takes_the_path_process_0_chose(monkeypatch):
    # This process times vmap fastest, process 0 chose the channels-last loop: the broadcast
    # answer wins, and this process's own timings are still what it logs.
    from types import SimpleNamespace

    times = {("vmap", "contiguous"): 0.05, ("vmap", "channels_last"): 0.09, ("loop", "contiguous"): 0.10,
             ("loop", "channels_last"): 0.08}

    def timed_step(self, batch, batching, memory_format="contiguous", evaluation=False):
        return times[(batching, memory_format)]

    monkeypatch.setattr(MAML, "_timed_step", timed_step)
    broadcasts = []

    def broadcast(obj, src=0):
        broadcasts.append((obj, src))
        return ("loop", "channels_last")  # process 0's choice

    model = MAML(Conv4(hidden=8), inner_lr=0.4)
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(broadcast=broadcast), loggers=[],
                                     global_step=0)
    model.choose_batching(image_batch())
    assert broadcasts == [(("vmap", "contiguous"), 0)]  # its own choice, sent to process 0's decision
    assert (model.batching, model.memory_format) == ("loop", "channels_last")
    assert model.batching_timings["vmap"] == 50.0


@pytest.mark.parametrize("learner", [MAML, ANIL, MetaSGD])
def test_vmap_channels_last_adapts_under_vmap_and_runs_the_queries_channels_last_with_the_loops_numbers(learner, monkeypatch):
    # batching="vmap" with memory_format="channels_last": the support passes go through Conv4's
    # batched forward (which calls no block module), the query passes task by task through the
    # blocks, channels-last; loss and meta-gradient are the NCHW loop's to rounding, for MAML,
    # ANIL (shared features) and Meta-SGD (learned rates), two inner steps, second order.
    torch.manual_seed(0)
    batch = image_batch()
    models = {memory_format: learner(Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=2,
                                     batching="vmap" if memory_format == "channels_last" else "loop",
                                     memory_format=memory_format)
              for memory_format in ("contiguous", "channels_last")}
    models["channels_last"].load_state_dict(models["contiguous"].state_dict())
    hybrid = models["channels_last"]
    layouts = []
    # Recorded by the convolution modules' forward, not by hooks: a hook is a change to the
    # function, under which vmap runs the backbone's forward rather than its forward_tasks.
    convolve = nn.Conv2d.forward

    def recording(module, x):
        output = convolve(module, x)
        layouts.append(output.stride()[1] == 1)
        return output

    monkeypatch.setattr(nn.Conv2d, "forward", recording)
    loss, grads = our_meta_gradient(hybrid, batch)
    monkeypatch.setattr(nn.Conv2d, "forward", convolve)
    assert (hybrid.batching, hybrid.memory_format) == ("vmap", "channels_last")
    assert len(layouts) == 4 * batch.num_tasks and all(layouts)  # the query passes only: one a task, NHWC
    reference_loss, reference_grads = our_meta_gradient(models["contiguous"], batch)
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    scale = torch.cat([g.flatten() for g in reference_grads]).norm()
    assert scale > 1e-3
    for a, b in zip(grads, reference_grads):
        assert (a - b).norm() <= 1e-4 * scale


def _recording_paths(monkeypatch):
    """The (batching, memory format) of every forward built from now on, in a list."""
    ran_on = []
    functional = MAML.functional
    monkeypatch.setattr(MAML, "functional", lambda self, *args: ran_on.append(self.execution(*args))
                        or functional(self, *args))
    return ran_on


def test_the_sanity_check_times_nothing_and_each_workload_decides_on_its_own_first_batch(monkeypatch):
    # fit's sanity check evaluates before any training batch, on validation episodes (here 4
    # queries a class, where training has 1). Timing every path there cost as much again as the
    # real choice; it runs the loop channels-first untimed and stores nothing. The first training
    # batch then times training steps and decides training's path; the first validation after
    # it times evaluation steps and decides evaluation's, which here is another path.
    from types import SimpleNamespace

    timed_on = []
    train_times = {("vmap", "contiguous"): 0.05, ("vmap", "channels_last"): 0.09, ("loop", "contiguous"): 0.10,
                   ("loop", "channels_last"): 0.01}
    eval_times = {("vmap", "contiguous"): 0.02, ("vmap", "channels_last"): 0.09, ("loop", "contiguous"): 0.10,
                  ("loop", "channels_last"): 0.08}

    def timed_step(self, batch, batching, memory_format="contiguous", evaluation=False):
        timed_on.append((batch.query_x.shape[1], evaluation))
        return (eval_times if evaluation else train_times)[(batching, memory_format)]

    monkeypatch.setattr(MAML, "_timed_step", timed_step)
    ran_on = _recording_paths(monkeypatch)
    model = MAML(Conv4(hidden=8), inner_lr=0.4)
    model._trainer = SimpleNamespace(sanity_checking=True, world_size=1, loggers=[], global_step=0,
                                     precision_plugin=None)
    batch = image_batch(queries=4)
    with torch.no_grad():  # the sanity check's evaluation
        outputs = model.evaluation_outputs(batch, "val")
    assert outputs.shape == (2, 20, 5) and timed_on == []
    assert set(ran_on) == {("loop", "contiguous")}
    assert (model.batching, model.memory_format, model.evaluation_path) == (None, None, None)  # nothing chosen
    model._trainer.sanity_checking = False
    assert model.choose_batching(image_batch(queries=1)) == "loop" and model.memory_format == "channels_last"
    assert timed_on == [(5, False)] * (2 * 4 + 1)  # four paths twice, after one untimed vmap try
    assert model.evaluation_path is None and model.evaluation_timings == {}
    ran_on.clear()
    with torch.no_grad():  # the first validation: evaluation's own choice, on evaluation steps
        model.evaluation_outputs(batch, "val")
    # Three paths twice (not the channels-last loop, _exact_for_evaluation); vmap ran in training:
    # no untimed try this time.
    assert timed_on[9:] == [(20, True)] * 6
    assert model.evaluation_path == ("vmap", "contiguous") and set(ran_on) == {("vmap", "contiguous")}
    assert model.evaluation_timings["vmap"] == 20.0 and model.batching_timings["loop channels_last"] == 10.0
    assert (model.batching, model.memory_format) == ("loop", "channels_last")  # training's stays
    with torch.no_grad():
        model.evaluation_outputs(batch, "val")
        model.adaptation_curve(batch)
    assert len(timed_on) == 15  # decided once each


def test_evaluation_before_training_times_evaluation_steps_and_training_decides_its_own(monkeypatch):
    # validate/test/an adaptation curve with nothing chosen yet time the workload that runs
    # there (adaptation without the outer graph), not a second-order training step, and keep it
    # for evaluation; training's first batch decides training's path; a resumed fit keeps both
    # of the interrupted run's choices.
    from types import SimpleNamespace

    timed = []
    eval_times = {("vmap", "contiguous"): 0.05, ("vmap", "channels_last"): 0.09, ("loop", "contiguous"): 0.02,
                  ("loop", "channels_last"): 0.08}
    train_times = {("vmap", "contiguous"): 0.05, ("vmap", "channels_last"): 0.01, ("loop", "contiguous"): 0.10,
                   ("loop", "channels_last"): 0.08}

    def timed_step(self, batch, batching, memory_format="contiguous", evaluation=False):
        timed.append(evaluation)
        return (eval_times if evaluation else train_times)[(batching, memory_format)]

    monkeypatch.setattr(MAML, "_timed_step", timed_step)
    model = MAML(Conv4(hidden=8), inner_lr=0.4, test_inner_steps=2)
    curve = model.adaptation_curve(image_batch(queries=2))
    assert curve.shape == (3, 2, 10, 5) and timed == [True] * 7  # an untimed vmap try, three paths twice
    assert model.evaluation_path == ("loop", "contiguous")
    assert (model.batching, model.memory_format) == (None, None)
    assert model.choose_batching(image_batch(queries=1)) == "vmap" and model.memory_format == "channels_last"
    assert timed[7:] == [False] * 8  # vmap ran in evaluation: not tried again untimed
    assert model.evaluation_path == ("loop", "contiguous")
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["evaluation_path"] == ["loop", "contiguous"]
    resumed = MAML(Conv4(hidden=8), inner_lr=0.4, test_inner_steps=2)
    resumed._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.batching, resumed.memory_format, resumed.evaluation_path) == (
        "vmap", "channels_last", ("loop", "contiguous"))
    # A path the new run's fixed settings rule out is not taken from the checkpoint.
    fixed = MAML(Conv4(hidden=8), inner_lr=0.4, memory_format="channels_last")
    fixed._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    fixed.on_load_checkpoint(checkpoint)
    assert fixed.evaluation_path is None
    # test or validate on a checkpoint never takes training's path (evaluation's: next test).
    evaluated = MAML(Conv4(hidden=8), inner_lr=0.4)
    evaluated._trainer = SimpleNamespace(state=SimpleNamespace(fn="test"),
                                         strategy=SimpleNamespace(root_device=torch.device("cpu")))
    evaluated.on_load_checkpoint(checkpoint)
    assert evaluated.batching is None


def test_a_model_that_fails_under_vmap_is_not_tried_under_it_again(monkeypatch):
    # Training found vmap failing (warned once); evaluation's choice then times the loops only.
    tried = []

    def timed_step(self, batch, batching, memory_format="contiguous", evaluation=False):
        tried.append((batching, evaluation))
        if batching == "vmap":
            raise RuntimeError("cannot vmap this")
        return 0.01

    monkeypatch.setattr(MAML, "_timed_step", timed_step)
    model = MAML(Conv4(hidden=8), inner_lr=0.4)
    with pytest.warns(UserWarning, match="cannot run under torch.func.vmap"):
        assert model.choose_batching(image_batch()) == "loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model.evaluation_outputs(image_batch(), "val")
    # One candidate left, the loop (evaluation leaves out the channels-last loop, _exact_for_evaluation): nothing timed.
    assert [batching for batching, evaluation in tried if evaluation] == []
    assert model.evaluation_path == ("loop", "contiguous")


def test_a_timed_evaluation_step_builds_no_graph_and_the_chosen_path_gives_the_loops_numbers():
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, test_inner_steps=3)
    batch = image_batch(queries=3)
    reference = MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, test_inner_steps=3, batching="loop",
                     memory_format="contiguous")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = reference.evaluation_outputs(batch, "val")
        outputs = model.evaluation_outputs(batch, "val")  # auto: times four paths, evaluation steps
    # Not the channels-last loop, whose adaptation is less exact in float32 (_exact_for_evaluation).
    assert set(model.evaluation_timings) == {"vmap", "vmap channels_last", "loop"}
    assert all(p.grad is None for p in model.parameters())
    assert not outputs.requires_grad
    torch.testing.assert_close(outputs, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixed", [dict(batching="vmap"), dict(memory_format="channels_last"), dict(batching="loop")])
def test_the_sanity_check_keeps_what_the_user_fixed(fixed, monkeypatch):
    from types import SimpleNamespace

    model = MAML(Conv4(hidden=8), inner_lr=0.4, **fixed)
    model._trainer = SimpleNamespace(sanity_checking=True, world_size=1, loggers=[], global_step=0,
                                     precision_plugin=None)
    ran_on = _recording_paths(monkeypatch)
    with torch.no_grad():
        model.evaluation_outputs(image_batch(queries=4), "val")
    expected = {"batching": "loop", "memory_format": "contiguous", **fixed}
    path = (expected["batching"], expected["memory_format"])
    # vmap with channels-last weights runs the support passes under vmap, the queries in the loop.
    assert set(ran_on) == ({("vmap", "contiguous"), ("loop", "channels_last")} if path == ("vmap", "channels_last")
                           else {path})
    assert model.evaluation_path is None or None not in model.requested_path
    assert (model.batching, model.memory_format) == model.requested_path == (
        fixed.get("batching"), "contiguous" if fixed.get("batching") == "vmap" else fixed.get("memory_format"))


def test_evaluation_on_the_machine_that_timed_it_reuses_the_checkpoints_evaluation_path(monkeypatch):
    # test/validate/predict from a checkpoint whose run timed evaluation on this machine (host,
    # device, torch, threads) take its path without timing; from another machine they time afresh.
    from types import SimpleNamespace

    from fewshot_lightning.algorithms import maml

    timed = []
    monkeypatch.setattr(MAML, "_timed_step", lambda self, batch, batching, memory_format="contiguous",
                        evaluation=False: timed.append(evaluation) or {"loop": 0.01, "vmap": 0.02}[batching])
    trained = MAML(Conv4(hidden=8), inner_lr=0.4)
    with torch.no_grad():
        trained.evaluation_outputs(image_batch(), "val")
    assert trained.evaluation_path == ("loop", "contiguous") and len(timed) == 7
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert checkpoint["evaluation_path_timed_on"] == maml.timing_signature(torch.device("cpu"))

    def tester():
        model = MAML(Conv4(hidden=8), inner_lr=0.4)
        model._trainer = SimpleNamespace(state=SimpleNamespace(fn="test"),
                                         strategy=SimpleNamespace(root_device=torch.device("cpu")))
        return model

    same = tester()
    same.on_load_checkpoint(checkpoint)
    assert same.evaluation_path == ("loop", "contiguous")
    same._trainer = None
    with torch.no_grad():
        same.evaluation_outputs(image_batch(), "val")
    assert len(timed) == 7  # nothing timed again
    monkeypatch.setattr(maml.platform, "node", lambda: "another-host")
    elsewhere = tester()
    elsewhere.on_load_checkpoint(checkpoint)
    assert elsewhere.evaluation_path is None  # timed afresh on its first evaluation batch
    fixed = MAML(Conv4(hidden=8), inner_lr=0.4, memory_format="channels_last")
    monkeypatch.setattr(maml.platform, "node", lambda: checkpoint["evaluation_path_timed_on"].split(" | ")[0])
    fixed._trainer = SimpleNamespace(state=SimpleNamespace(fn="test"),
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
    fixed.on_load_checkpoint(checkpoint)
    assert fixed.evaluation_path is None  # a path its fixed layout rules out is not taken


def test_the_curve_every_k_steps_has_the_full_curves_points_and_skips_the_other_query_passes(tmp_path):
    # test_curve_every=3 over 7 test steps: points after 0, 3, 6 and 7 steps, each the value the
    # full curve has there (same weights, same test tasks), the score itself unchanged, and a
    # query pass at those four steps only (eight with the full curve).
    import lightning as L

    from fewshot_lightning.algorithms import Reptile
    from fewshot_lightning.data import SinusoidDataModule

    def tested(every):
        torch.manual_seed(0)
        model = MAML(MLP(1, (8,), 1), inner_lr=0.01, test_inner_steps=7, test_curve_every=every)
        passes = []
        original = model.evaluation_predict
        model.evaluation_predict = lambda params, batch: passes.append(1) or original(params, batch)
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        result = trainer.test(model, SinusoidDataModule(test_tasks=20, meta_batch_size=10), verbose=False)[0]
        return result, len(passes)

    full, full_passes = tested(1)
    sparse, sparse_passes = tested(3)
    last_only, last_passes = tested(0)
    curve = lambda result: sorted(int(k.split("_")[2]) for k in result if k.startswith("test/mse_after_") and "ci95" not in k)
    assert curve(full) == list(range(8)) and curve(sparse) == [0, 3, 6, 7] and curve(last_only) == [7]
    for step in (0, 3, 6, 7):
        assert sparse[f"test/mse_after_{step}_steps"] == pytest.approx(full[f"test/mse_after_{step}_steps"], rel=1e-6)
    assert sparse["test/mse"] == pytest.approx(full["test/mse"], rel=1e-6) == last_only["test/mse"]
    assert (full_passes, sparse_passes, last_passes) == (2 * 8, 2 * 4, 2 * 1)  # two test batches
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="test_curve_every must be a whole number of inner steps"):
            MAML(MLP(), test_curve_every=bad)
    assert Reptile(MLP(), test_inner_steps=50, test_curve_every=10).curve_steps() == [0, 10, 20, 30, 40, 50]


def _counting_convolutions(monkeypatch):
    """The number of convolution calls from now on (Conv4's batched forward and its blocks both
    call ``torch.nn.functional.conv2d``), in a one-element list."""
    calls = [0]
    conv2d = F.conv2d

    def counted(*args, **kwargs):
        calls[0] += 1
        return conv2d(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counted)
    return calls


@pytest.mark.parametrize("path", [("vmap", "contiguous"), ("loop", "contiguous"), ("loop", "channels_last"),
                                  ("vmap", "channels_last")])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_passes_the_support_set_through_the_features_once_with_the_same_numbers(monkeypatch, path, first_order):
    # ANIL adapts the head alone, so the support passes up to the head are the same at every
    # inner step: they run once per adaptation. Three inner steps on two tasks of a Conv4: the
    # loss and the meta-gradient of every parameter, body included (second order reaches it
    # through the inner gradients), are those of the pass at every step, to rounding; the
    # convolutions called drop from (3 support + 1 query passes) to (1 + 1), 4 layers each, times
    # the tasks where the path runs them one by one.
    batching, memory_format = path
    batch = image_batch()
    per_pass = 1 if batching == "vmap" and memory_format == "contiguous" else batch.num_tasks
    query_pass = batch.num_tasks if memory_format == "channels_last" else per_pass
    support_pass = 1 if batching == "vmap" else batch.num_tasks
    results = {}
    for once in (True, False):
        torch.manual_seed(0)
        model = ANIL(Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=3, first_order=first_order,
                     batching=batching, memory_format=memory_format)
        model.head_features_once = once
        calls = _counting_convolutions(monkeypatch)
        results[once] = our_meta_gradient(model, batch)
        assert calls[0] == 4 * ((1 if once else 3) * support_pass + query_pass), (once, calls[0])
        monkeypatch.undo()
    (loss, grads), (reference_loss, reference_grads) = results[True], results[False]
    assert torch.allclose(loss, reference_loss, rtol=1e-6)
    scale = torch.cat([g.flatten() for g in reference_grads]).norm()
    assert scale > 1e-3
    body = torch.cat([g.flatten() for g in reference_grads[:-2]]).norm()
    assert body > 1e-3  # the features' parameters get a meta-gradient: the comparison covers them
    for a, b in zip(grads, reference_grads):
        assert (a - b).norm() <= 1e-5 * scale


def explicit_anil_meta_gradient(backbone, batch, lr, steps, first_order):
    """ANIL by hand: per task, the support features once, ``steps`` explicit gradient steps on
    the head alone (``create_graph`` unless first order), the mean query loss; its gradient with
    respect to every weight, the features' included."""
    w1, b1, w2, b2, w3, b3 = weights = [p for _, p in backbone.named_parameters()]
    features = lambda x: torch.relu(torch.relu(x @ w1.T + b1) @ w2.T + b2)
    total = 0
    for t in range(batch.num_tasks):
        support = features(batch.support_x[t])
        if first_order:
            support = support.detach()
        head = [w3, b3]
        for _ in range(steps):
            loss = F.mse_loss(support @ head[0].T + head[1], batch.support_y[t])
            grads = torch.autograd.grad(loss, head, create_graph=not first_order)
            head = [w - lr * g for w, g in zip(head, grads)]
        total = total + F.mse_loss(features(batch.query_x[t]) @ head[0].T + head[1], batch.query_y[t])
    meta_loss = total / batch.num_tasks
    return meta_loss, torch.autograd.grad(meta_loss, weights)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_on_an_mlp_passes_the_support_set_through_the_features_once(batching, first_order):
    # The MLP offers without_head() too (DetachableHead): ANIL on it takes the shortcut. Three
    # inner steps on three sinusoid-like tasks: the loss and the meta-gradient of every weight
    # are an explicit hand-written ANIL's (features once per task, head steps with
    # create_graph), and the ReLUs run (1 support + 1 query pass) x 2 layers per batched pass,
    # where the pass at every step runs them (3 + 1) x 2 times; per task on the loop.
    batch = regression_batch(tasks=3)
    per_pass = 2 * (1 if batching == "vmap" else batch.num_tasks)
    for once in (True, False):
        torch.manual_seed(0)
        backbone = MLP(1, (8, 8), 1)
        model = ANIL(backbone, inner_lr=0.3, inner_steps=3, first_order=first_order, batching=batching)
        model.head_features_once = once
        calls = [0]
        handles = [layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
                   for layer in backbone.features if isinstance(layer, nn.ReLU)]
        loss, grads = our_meta_gradient(model, batch)
        for handle in handles:
            handle.remove()
        assert calls[0] == per_pass * ((1 if once else 3) + 1), (once, calls[0])
        reference_loss, reference_grads = explicit_anil_meta_gradient(backbone, batch, 0.3, 3, first_order)
        assert torch.allclose(loss, reference_loss, rtol=1e-6)
        scale = torch.cat([g.flatten() for g in reference_grads]).norm()
        body = torch.cat([g.flatten() for g in reference_grads[:-2]]).norm()
        assert scale > 1e-3 and body > 1e-3  # the features' weights get a meta-gradient: compared too
        for a, b in zip(grads, reference_grads):
            assert (a - b).norm() <= 1e-5 * scale


def test_anil_features_once_with_a_head_that_is_no_linear_layer():
    # A head other than one nn.Linear runs under torch.func.vmap on the features (the batched
    # product covers nn.Linear alone): the same loss and meta-gradient as the pass at every step.
    batch = regression_batch(tasks=3)
    results = {}
    for once in (True, False):
        torch.manual_seed(0)
        backbone = MLP(1, (8, 8), 1)
        backbone.head = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
        model = ANIL(backbone, inner_lr=0.3, inner_steps=3, batching="loop")
        model.head_features_once = once
        assert model._adapts_head_only({}) == once and len(model.adapt_names) == 4
        results[once] = our_meta_gradient(model, batch)
    (loss, grads), (reference_loss, reference_grads) = results[True], results[False]
    assert torch.allclose(loss, reference_loss, rtol=1e-6)
    scale = torch.cat([g.flatten() for g in reference_grads]).norm()
    assert scale > 1e-3
    for a, b in zip(grads, reference_grads):
        assert (a - b).norm() <= 1e-5 * scale


def test_a_backbone_whose_layer_was_replaced_by_one_with_parameters_runs_its_forward_under_vmap():
    # MLP.forward_tasks batches nn.Linear layers itself; a layer swapped for another module with
    # parameters would run with the module's own weights for every task. Such a backbone says it
    # is not the one forward_tasks was written for (forward_tasks_supported), and vmap runs its
    # forward instead: the loop's gradients. Conv4 with another head alike.
    torch.manual_seed(0)
    backbone = MLP(1, (8, 8), 1)
    backbone.head = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
    assert not backbone.forward_tasks_supported()
    batch = regression_batch(tasks=2)
    loss, grads = our_meta_gradient(MAML(backbone, inner_lr=0.1, batching="vmap"), batch)
    reference_loss, reference_grads = our_meta_gradient(MAML(backbone, inner_lr=0.1, batching="loop"), batch)
    assert len(grads) == 8 and all(g.abs().sum() > 0 for g in reference_grads)
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, reference_grads))
    conv = Conv4(hidden=8, out_features=5)
    conv.head = nn.Sequential(nn.Linear(conv.feature_dim, 4), nn.Tanh(), nn.Linear(4, 5))
    assert not conv.forward_tasks_supported()
    loss, _ = our_meta_gradient(MAML(conv, inner_lr=0.1, batching="vmap"), image_batch())
    reference_loss, _ = our_meta_gradient(MAML(conv, inner_lr=0.1, batching="loop"), image_batch())
    assert torch.allclose(loss, reference_loss, rtol=1e-4)


def test_without_head_returns_the_heads_input_and_restores_the_head():
    # forward and forward_tasks of both backbones give the features inside the context (the head's
    # input: the head applied to them is the usual output), and the head again after it, also
    # after an exception inside.
    torch.manual_seed(0)
    mlp, conv = MLP(1, (8, 6), 2), Conv4(hidden=8, out_features=5)
    x_mlp, x_conv = torch.randn(3, 4, 1), torch.randn(3, 4, 1, 28, 28)
    for backbone, x in ((mlp, x_mlp), (conv, x_conv)):
        params = dict(backbone.named_parameters())
        full, full_tasks = backbone(x), backbone.forward_tasks(params, x)
        with backbone.without_head():
            features, features_tasks = backbone(x), backbone.forward_tasks(params, x)
        assert features.shape == (3, 4, backbone.head.in_features) == features_tasks.shape
        assert torch.allclose(backbone.head(features), full, atol=1e-5)
        assert torch.allclose(features_tasks, features, atol=1e-5)
        with pytest.raises(RuntimeError, match="inside"):
            with backbone.without_head():
                raise RuntimeError("inside")
        assert torch.equal(backbone(x), full) and torch.allclose(backbone.forward_tasks(params, x), full_tasks)


def test_a_backbone_that_runs_its_head_inside_without_head_is_stopped():
    # A user backbone that inherits DetachableHead but ignores _headless would hand ANIL the
    # head's output as features; with the head's in and out widths equal no shape betrays it.
    # The head's call inside the context raises, naming the backbone and the fix.
    from fewshot_lightning.models.blocks import DetachableHead

    class Careless(DetachableHead, nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(1, 5), nn.Linear(5, 5)
            self.output_shape = (5,)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = ANIL(Careless(), inner_lr=0.4, inner_steps=2, batching="vmap")
    batch = TaskBatch(torch.randn(2, 5, 1), torch.randint(0, 5, (2, 5)), torch.randn(2, 5, 1), torch.randint(0, 5, (2, 5)))
    with pytest.raises(RuntimeError, match=r"Careless called its head inside without_head\(\).*self\._headless"):
        model.training_step(batch, 0)
    # The check is gone after the context: the module runs as before, and without the shortcut ANIL trains.
    assert not model.backbone.head._forward_pre_hooks
    model.head_features_once = False
    assert torch.isfinite(model.training_step(batch, 0))


def test_anil_evaluation_adapts_to_the_same_head_with_the_features_once():
    # Evaluation (no outer graph) takes the same shortcut and lands on the same head weights.
    batch = image_batch()
    adapted = {}
    for once in (True, False):
        torch.manual_seed(0)
        model = ANIL(Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=4, batching="vmap")
        model.head_features_once = once
        adapted[once] = model.adapt(batch.support_x, batch.support_y, differentiable=False)
    assert set(adapted[True]) == {"head.weight", "head.bias"}
    for name, value in adapted[True].items():
        assert value.shape[0] == batch.num_tasks and not value.requires_grad
        assert torch.allclose(value, adapted[False][name], atol=1e-6), name


@pytest.mark.parametrize("make", [
    pytest.param(lambda: MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=3), id="MAML: every layer"),
    pytest.param(lambda: ANIL(Conv4(hidden=8, out_features=5), adapt=["head.weight"], inner_lr=0.4, inner_steps=3),
                 id="ANIL: part of the head"),
    pytest.param(lambda: ANIL(Conv4(hidden=8, out_features=5, track_running_stats=True), inner_lr=0.4,
                              inner_steps=3), id="ANIL: running statistics"),
    pytest.param(lambda: MetaSGD(Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=3), id="Meta-SGD"),
])
def test_the_features_run_at_every_step_where_the_shortcut_does_not_hold(monkeypatch, make):
    # Adapting more than the head changes the features at every step; adapting part of it, or a
    # backbone with running statistics (every pass updates them), keeps the pass at every step.
    torch.manual_seed(0)
    model = make()
    model.batching, model.memory_format = "loop", "contiguous"
    batch = image_batch()
    calls = _counting_convolutions(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.adapt(batch.support_x, batch.support_y)
    assert calls[0] == 4 * 3 * batch.num_tasks


def test_frozen_parameters_that_adapt_selects_are_named_with_the_selection_that_keeps_them_fixed():
    # requires_grad=False keeps a parameter out of the outer step, not out of the inner loop
    # (`adapt` decides that: by default every parameter). A user who froze a pretrained layer is
    # told so at construction, with the selection that keeps it fixed in both loops; that
    # selection adapts only the rest, without the warning.
    network = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    network[0].requires_grad_(False)
    with pytest.warns(UserWarning, match=r"MAML adapts 0\.weight, 0\.bias in the inner loop although they have "
                                         r"requires_grad=False .* adapt=\['!0\.weight', '!0\.bias'\]"):
        MAML(network, inner_lr=0.5, batching="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = MAML(network, inner_lr=0.5, batching="loop", adapt=["!0.weight", "!0.bias"])
        MAML(MLP(1, (8,), 1), inner_lr=0.5, batching="loop")  # nothing frozen: no warning
    assert fixed.adapt_names == ["2.weight", "2.bias"]


def test_evaluation_does_not_adapt_on_the_channels_last_loop_unless_asked(monkeypatch):
    # PyTorch's channels-last batch norm on the CPU is 70x-180x less exact in float32, and the
    # inner steps amplify it: on the Kanji config the test accuracy and loss moved with whichever
    # path auto took (the evaluation meta-batch, the machine's load). Training may take it.
    from types import SimpleNamespace

    times = {("vmap", "contiguous"): 0.05, ("vmap", "channels_last"): 0.04, ("loop", "contiguous"): 0.03,
             ("loop", "channels_last"): 0.01}
    monkeypatch.setattr(MAML, "_timed_step", lambda self, batch, batching, memory_format="contiguous",
                        evaluation=False: times[(batching, memory_format)])
    model = MAML(Conv4(hidden=8), inner_lr=0.4)
    assert model.choose_batching(image_batch()) == "loop" and model.memory_format == "channels_last"  # training's
    with torch.no_grad():
        model.evaluation_outputs(image_batch(), "val")
    assert model.evaluation_path == ("loop", "contiguous") and "loop channels_last" not in model.evaluation_timings
    # A short run evaluating untimed on training's path takes the loop channels-first instead.
    short = MAML(Conv4(hidden=8), inner_lr=0.4)
    short.batching, short.memory_format = "loop", "channels_last"
    short.untimed_evaluation_batches = 100
    short._trainer = SimpleNamespace(world_size=1)
    monkeypatch.setattr(MAML, "planned_evaluation_batches", lambda self: 2)
    assert short._untimed_evaluation_path() == ("loop", "contiguous")
    # Asked for, it is kept.
    fixed = MAML(Conv4(hidden=8), inner_lr=0.4, batching="loop", memory_format="channels_last")
    assert fixed._candidates(evaluation=True) == [("loop", "channels_last")]
