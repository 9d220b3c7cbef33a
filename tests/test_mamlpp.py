"""MAML++'s options on MAML: the multi-step loss and derivative-order annealing."""
import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import MAML, MAMLPlusPlus
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP


def mlp_forward(weights, x):
    """The 1-H-1 MLP written out by hand: no functional_call, no vmap."""
    w1, b1, w2, b2 = weights
    return torch.relu(x @ w1.T + b1) @ w2.T + b2


def explicit_step_losses(backbone, batch, lr, steps, first_order):
    """Mean over tasks of the query loss after each inner step 1..steps, by explicit autograd."""
    weights = [p for _, p in backbone.named_parameters()]
    per_step = [0.0] * steps
    for t in range(batch.num_tasks):
        fast = weights
        for step in range(steps):
            loss = F.mse_loss(mlp_forward(fast, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads)]
            per_step[step] = per_step[step] + F.mse_loss(mlp_forward(fast, batch.query_x[t]), batch.query_y[t])
    return [loss / batch.num_tasks for loss in per_step]


def annealed_weights(step, anneal_steps, inner_steps):
    """MAML++'s weights, written independently from the authors' get_per_step_loss_importance_vector:
    uniform at step 0, moving to the last step, the others floored at 0.03 / inner_steps each."""
    decay, floor = step / anneal_steps / inner_steps, 0.03 / inner_steps
    weights = [max(1 / inner_steps - decay, floor) for _ in range(inner_steps - 1)]
    return weights + [min(1 / inner_steps + (inner_steps - 1) * decay, 1 - (inner_steps - 1) * floor)]


def test_step_loss_weights_anneal_from_uniform_to_the_last_step():
    model = MAML(MLP(), inner_steps=4, multi_step_loss_steps=100)
    assert torch.allclose(model.step_loss_weights(0), torch.full((4,), 0.25))
    middle = model.step_loss_weights(50)
    assert torch.allclose(middle, torch.tensor([0.125, 0.125, 0.125, 0.625]))
    assert torch.isclose(middle.sum(), torch.tensor(1.0))
    assert model.step_loss_weights(100) is None  # from here on, plain MAML: the last step only
    assert MAML(MLP(), inner_steps=4).step_loss_weights(0) is None  # off by default
    # Near the end the earlier steps keep 0.03 / 4 each (the authors' floor), not (1 - p) / 4.
    late = model.step_loss_weights(99)
    assert torch.allclose(late, torch.tensor([0.0075, 0.0075, 0.0075, 0.9775]))
    assert torch.isclose(late.sum(), torch.tensor(1.0))
    for step in (0, 10, 50, 96, 97, 99):
        assert torch.allclose(model.step_loss_weights(step), torch.tensor(annealed_weights(step, 100, 4))), step


class CheckMetaGradients(L.Callback):
    """At every training step, compare the gradients the Trainer is about to apply with the
    gradient of the independently computed MAML++ loss at that step."""

    def __init__(self, lr, inner_steps, anneal_steps, first_order_steps):
        self.lr, self.inner_steps = lr, inner_steps
        self.anneal_steps, self.first_order_steps = anneal_steps, first_order_steps
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch, self.before = batch, copy.deepcopy(module.backbone)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        step = trainer.global_step
        first_order = step < self.first_order_steps
        losses = explicit_step_losses(self.before, self.batch, self.lr, self.inner_steps, first_order)
        if step < self.anneal_steps:
            loss = sum(w * l for w, l in zip(annealed_weights(step, self.anneal_steps, self.inner_steps), losses))
        else:
            loss = losses[-1]
        expected = torch.autograd.grad(loss, list(self.before.parameters()), retain_graph=True)
        for (name, p), e in zip(module.backbone.named_parameters(), expected):
            assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-6), (step, name)
        # The first-order reference differs from the second-order one, so the check can fail.
        other = explicit_step_losses(self.before, self.batch, self.lr, self.inner_steps, not first_order)[-1]
        other_grad = torch.autograd.grad(other, list(self.before.parameters()))
        last_only = torch.autograd.grad(losses[-1], list(self.before.parameters()))
        assert max((a - b).abs().max() for a, b in zip(other_grad, last_only)) > 1e-4
        self.seen.append((step, first_order, step < self.anneal_steps))


def test_multi_step_loss_and_derivative_order_follow_the_global_step():
    torch.manual_seed(0)
    model = MAML(MLP(1, (8,), 1), inner_lr=0.1, inner_steps=3, batching="vmap", multi_step_loss_steps=3,
                 first_order_steps=2, optimizer=lambda params: torch.optim.SGD(params, lr=0.01))
    check = CheckMetaGradients(0.1, 3, anneal_steps=3, first_order_steps=2)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[check])
    trainer.fit(model, SinusoidDataModule(shots=5, queries=5, meta_batch_size=3, train_tasks=12))
    # Steps 0-1 first order, 2-3 second; steps 0-2 the weighted multi-step loss, 3 the last step only.
    assert check.seen == [(0, True, True), (1, True, True), (2, False, True), (3, False, False)]


def test_maml_plus_plus_turns_the_options_on():
    model = MAMLPlusPlus(MLP(1, (8,), 1), inner_lr=0.1)
    assert model.inner_steps == 5 and model.multi_step_loss_steps == 5000
    rates = dict(model.inner_lr.rates.named_parameters())
    assert rates["head__weight"].shape == (5,) and rates["head__weight"].requires_grad  # per step, learned
    assert model.hparams["per_step_lr"] and model.hparams["learn_inner_lr"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"multi_step_loss_steps": -1}, "multi_step_loss_steps must be 0 \\(off\\) or more, got -1"),
        ({"first_order_steps": -3}, "first_order_steps must be 0 \\(off\\) or more, got -3"),
        ({"first_order": True, "first_order_steps": 10}, "first_order=True trains first order throughout"),
    ],
)
def test_bad_schedules_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAML(MLP(), **kwargs)


# -- per-step batch-norm weights and biases (BNWB) ----------------------------------------------

def small_bn_net(ways=5):
    """conv -> batch norm -> ReLU -> linear on 8x8 grey images: small enough to write out by hand."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3, track_running_stats=False),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, ways))


def explicit_bn_forward(w, x):
    """small_bn_net written out: every weight given, batch norm on the batch's own statistics."""
    h = F.conv2d(x, w["0.weight"], w["0.bias"])
    h = F.batch_norm(h, None, None, w["1.weight"], w["1.bias"], training=True)
    return F.linear(torch.relu(h).flatten(1), w["4.weight"], w["4.bias"])


def bn_batch(tasks=2, ways=5, shots=2, queries=3, seed=0):
    from fewshot_lightning.data import TaskBatch

    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(tasks, ways * shots, 1, 8, 8, generator=g),
                     torch.arange(ways * shots).remainder(ways).repeat(tasks, 1),
                     torch.randn(tasks, ways * queries, 1, 8, 8, generator=g),
                     torch.arange(ways * queries).remainder(ways).repeat(tasks, 1))


def explicit_mamlpp_loss(model, batch, steps, weights=None):
    """MAML++ with per-step batch norm by explicit autograd, task by task: inner step k's support
    pass and the query pass after that step use row k of the per-step tables (the last row
    beyond it), as the authors' code passes ``num_step`` to both; the adapted weights take
    gradient steps at the model's per-step rates; the loss is the query loss after the last
    step, or the ``weights``-weighted sum over steps."""
    live = dict(model.backbone.named_parameters())
    norms = {name: model.step_norms[name.replace(".", "__")] for name in ("1.weight", "1.bias")}

    def row(k):
        return {name: table[min(k, table.shape[0] - 1)] for name, table in norms.items()}

    total = 0.0
    for t in range(batch.num_tasks):
        fast = {name: live[name] for name in ("0.weight", "0.bias", "4.weight", "4.bias")}
        step_losses = []
        for k in range(steps):
            loss = F.cross_entropy(explicit_bn_forward({**fast, **row(k)}, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - model.inner_lr(k, name) * g for (name, p), g in zip(fast.items(), grads)}
            query = explicit_bn_forward({**fast, **row(k)}, batch.query_x[t])
            step_losses.append(F.cross_entropy(query, batch.query_y[t]))
        total = total + (step_losses[-1] if weights is None else sum(w * l for w, l in zip(weights, step_losses)))
    return total / batch.num_tasks


def randomised_mamlpp(seed=0, **kwargs):
    """A MAMLPlusPlus on small_bn_net whose per-step tables and per-step rates all differ from row
    to row, so that a pass using the wrong step's row changes the numbers."""
    torch.manual_seed(seed)
    model = MAMLPlusPlus(small_bn_net(), inner_lr=0.3, **kwargs)
    with torch.no_grad():
        for table in model.step_norms.values():
            table.add_(0.3 * torch.randn_like(table))
        for rates in model.inner_lr.rates.values():
            rates.mul_(torch.empty_like(rates).uniform_(0.5, 1.5))
    return model


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("multi_step", [0, 100])
def test_per_step_batch_norm_matches_an_explicit_computation(batching, multi_step):
    # Loss and the gradient of every trainable tensor (adapted weights, per-step batch-norm
    # tables, per-step rates) against explicit autograd, 3 inner steps, second order, with
    # and without the multi-step loss; on both paths.
    model = randomised_mamlpp(inner_steps=3, multi_step_loss_steps=multi_step, batching=batching)
    assert set(model.per_step_norms) == {"1.weight", "1.bias"}
    assert all(table.shape == (3, 3) for table in model.step_norms.values())  # a row per inner step
    batch = bn_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = model.training_losses(batch)[0].mean()
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    weights = model.step_loss_weights(0)
    expected = explicit_mamlpp_loss(model, batch, 3, None if weights is None else weights.tolist())
    expected_grads = torch.autograd.grad(expected, trainable, allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for parameter, got, want in zip(trainable, grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    table_grads = [g for p, g in zip(trainable, grads) if any(p is t for t in model.step_norms.values())]
    assert len(table_grads) == 2 and all(g.abs().sum(1).min() > 0 for g in table_grads)  # every row used


def test_per_step_batch_norm_evaluates_beyond_the_training_steps_with_the_last_row():
    # test_inner_steps 5 > inner_steps 2: steps 1 to 4 and the query pass after the fifth take
    # row 1, the last; nothing is trained there (no outer graph).
    model = randomised_mamlpp(inner_steps=2, test_inner_steps=5, batching="loop", multi_step_loss_steps=0)
    batch = bn_batch(queries=2)
    with torch.no_grad():
        outputs = model.evaluation_outputs(batch, "val")
        curve = model.adaptation_curve(batch)
    assert curve.shape == (6, 2, 10, 5)
    torch.testing.assert_close(curve[-1], outputs)
    expected = []
    for t in range(batch.num_tasks):
        live = dict(model.backbone.named_parameters())
        fast = {name: live[name].detach() for name in ("0.weight", "0.bias", "4.weight", "4.bias")}
        for k in range(5):
            row = {name: model.step_norms[name.replace(".", "__")][min(k, 1)].detach() for name in ("1.weight", "1.bias")}
            with torch.enable_grad():
                fast = {n: p.requires_grad_() for n, p in fast.items()}
                loss = F.cross_entropy(explicit_bn_forward({**fast, **row}, batch.support_x[t]), batch.support_y[t])
                grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: (p - model.inner_lr(k, n) * g).detach() for (n, p), g in zip(fast.items(), grads)}
        row = {name: model.step_norms[name.replace(".", "__")][1].detach() for name in ("1.weight", "1.bias")}
        expected.append(explicit_bn_forward({**fast, **row}, batch.query_x[t]))
    torch.testing.assert_close(outputs, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_per_step_batch_norm_leaves_no_trainable_tensor_without_a_gradient():
    # The backbone's own batch-norm weights are replaced by the tables: requires_grad off, so
    # DDP (which fails on trainable parameters without a gradient) and the optimizer skip them;
    # every trainable tensor gets a gradient from one training step.
    from fewshot_lightning.models import Conv4

    model = MAMLPlusPlus(Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=2, batching="loop",
                         multi_step_loss_steps=0)
    assert len(model.per_step_norms) == 8  # four blocks, weight and bias
    assert not any(p.requires_grad for name, p in model.backbone.named_parameters() if name in model.per_step_norms)
    assert not any(name in model.per_step_norms for name in model.adapt_names)  # not adapted: no inner rate
    assert set(model.inner_lr.keys) == set(model.adapt_names)
    from fewshot_lightning.data import TaskBatch

    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(2, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 1),
                      torch.rand(2, 10, 1, 28, 28, generator=g), torch.arange(10).remainder(5).repeat(2, 1))
    model.training_losses(batch)[0].mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_frozen_batch_norm_weights_stay_frozen_in_their_per_step_copies():
    # The per-step copies of a batch-norm weight the user had frozen were trainable parameters:
    # the scale and shift the network used moved in training, with no warning.
    torch.manual_seed(0)
    net = small_bn_net()
    net[1].weight.requires_grad_(False)  # the scale frozen, the shift left trainable
    model = MAMLPlusPlus(net, inner_lr=0.3, inner_steps=2, multi_step_loss_steps=0, batching="loop")
    assert not model.step_norms["1__weight"].requires_grad and model.step_norms["1__bias"].requires_grad
    before = {name: table.detach().clone() for name, table in model.step_norms.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.training_losses(bn_batch())[0].mean().backward()
    optimizer.step()
    assert torch.equal(model.step_norms["1__weight"], before["1__weight"])
    assert not torch.equal(model.step_norms["1__bias"], before["1__bias"])


def test_per_step_batch_norm_is_on_by_default_with_batch_norm_and_can_be_turned_off():
    assert MAMLPlusPlus(MLP()).per_step_norms == () and len(MAMLPlusPlus(MLP()).step_norms) == 0
    with pytest.raises(ValueError, match="per_step_bn=True .* MLP has no batch-norm layer"):
        MAMLPlusPlus(MLP(), per_step_bn=True)
    off = MAMLPlusPlus(small_bn_net(), per_step_bn=False)
    assert off.per_step_norms == () and "1.weight" in off.adapt_names  # plain MAML's handling: adapted
    on = MAMLPlusPlus(small_bn_net())
    assert on.per_step_norms == ("1.weight", "1.bias") and "1.weight" not in on.adapt_names
    # The tables start as the backbone's own weight and bias, every row.
    torch.testing.assert_close(on.step_norms["1__weight"], on.backbone[1].weight.detach().expand(5, 3))


def test_per_step_batch_norm_gives_the_same_numbers_on_every_execution_path():
    # Conv4 (its own batched forward under vmap, the channels-last loop, the hybrid): loss and
    # meta-gradient of every path against the NCHW loop, with the multi-step loss on.
    from fewshot_lightning.data import TaskBatch
    from fewshot_lightning.models import Conv4

    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(2, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 1),
                      torch.rand(2, 10, 1, 28, 28, generator=g), torch.arange(10).remainder(5).repeat(2, 1))
    results = {}
    for batching, memory_format in [("loop", "contiguous"), ("vmap", "contiguous"), ("loop", "channels_last"),
                                    ("vmap", "channels_last")]:
        torch.manual_seed(0)
        model = MAMLPlusPlus(Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=2, multi_step_loss_steps=100,
                             batching=batching, memory_format=memory_format)
        with torch.no_grad():
            for table in model.step_norms.values():
                table.add_(0.3 * torch.randn_like(table))
        trainable = [p for p in model.parameters() if p.requires_grad]
        loss = model.training_losses(batch)[0].mean()
        results[batching, memory_format] = (loss, torch.autograd.grad(loss, trainable))
    reference_loss, reference_grads = results["loop", "contiguous"]
    scale = torch.cat([g.flatten() for g in reference_grads]).norm()
    for path, (loss, grads) in results.items():
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
        assert all((a - b).norm() <= 1e-4 * scale for a, b in zip(grads, reference_grads)), path


def test_weights_from_the_other_per_step_batch_norm_setting_name_the_setting_that_loads_them():
    from fewshot_lightning.algorithms.base import WeightsMismatchError

    without = MAMLPlusPlus(small_bn_net(), per_step_bn=False)  # as every MAML++ checkpoint before the option
    with pytest.raises(WeightsMismatchError, match="trained without per-step .* per_step_bn: false"):
        MAMLPlusPlus(small_bn_net()).load_state_dict(without.state_dict())
    with pytest.raises(WeightsMismatchError, match="trained with per-step .* per_step_bn: true"):
        without.load_state_dict(MAMLPlusPlus(small_bn_net()).state_dict())
    MAMLPlusPlus(small_bn_net(), per_step_bn=False).load_state_dict(without.state_dict())  # the same setting loads


def test_weights_saved_with_a_table_row_per_query_pass_are_refused_naming_why():
    # Until 2026-11-30 the tables had inner_steps + 1 rows (the query pass after step k took row
    # k + 1): such weights fit no model now, and loading them must say why, not "size mismatch".
    from fewshot_lightning.algorithms.base import WeightsMismatchError

    model = MAMLPlusPlus(small_bn_net(), inner_steps=3)
    old = model.state_dict()
    old.update({key: torch.cat([value, value[-1:]]) for key, value in old.items() if key.startswith("step_norms.")})
    with pytest.raises(WeightsMismatchError, match="4 per-step batch-norm copies for 3 inner steps: .* before 2026-11-30"):
        MAMLPlusPlus(small_bn_net(), inner_steps=3).load_state_dict(old)
    # Weights of a model with 4 inner steps are not mistaken for them (4 rates a parameter).
    four = MAMLPlusPlus(small_bn_net(), inner_steps=4).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch") as refused:
        MAMLPlusPlus(small_bn_net(), inner_steps=3).load_state_dict(four)
    assert "2026-11-30" not in str(refused.value)
