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
    """MAML++'s weights, written independently: uniform at step 0, all on the last step at the end."""
    progress = step / anneal_steps
    return [(1 - progress) / inner_steps + (progress if k == inner_steps - 1 else 0) for k in range(inner_steps)]


def test_step_loss_weights_anneal_from_uniform_to_the_last_step():
    model = MAML(MLP(), inner_steps=4, multi_step_loss_steps=100)
    assert torch.allclose(model.step_loss_weights(0), torch.full((4,), 0.25))
    middle = model.step_loss_weights(50)
    assert torch.allclose(middle, torch.tensor([0.125, 0.125, 0.125, 0.625]))
    assert torch.isclose(middle.sum(), torch.tensor(1.0))
    assert model.step_loss_weights(100) is None  # from here on, plain MAML: the last step only
    assert MAML(MLP(), inner_steps=4).step_loss_weights(0) is None  # off by default


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
