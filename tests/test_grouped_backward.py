"""``tasks_per_backward``: the meta-gradient accumulated over groups of tasks, each group's
graph freed before the next is built. The tasks are independent, so the gradient must be the
whole batch's mean-loss gradient: checked against the whole batch at once, against an explicit
per-task autograd loop (no learner code), through ``Trainer.fit`` (also under 16-bit mixed
precision's loss scaling), and the memory it is for: a smaller tensor peak."""
import importlib.util
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from fewshot_lightning.algorithms import ANIL, CAVIA, MAML, MAMLPlusPlus, MetaSGD, Reptile, iMAML
from fewshot_lightning.callbacks import NonFiniteGuard
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP, Conv4, ContextMLP
from learner_helpers import quiet_trainer, random_episodes
from test_maml_gradients import explicit_meta_gradient, regression_batch

IMAGES = dict(ways=5, shots=1, queries=3, x_shape=(1, 28, 28))

# name -> (learner for a given tasks_per_backward, a batch of 7 tasks for it)
LEARNERS = {
    "MAML Conv4-bn vmap": (lambda g: MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, batching="vmap",
                                          tasks_per_backward=g), lambda: random_episodes(7, **IMAGES)),
    "MAML Conv4-bn loop channels_last": (lambda g: MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, batching="loop",
                                                        memory_format="channels_last", tasks_per_backward=g),
                                         lambda: random_episodes(7, **IMAGES)),
    "first-order MAML": (lambda g: MAML(MLP(1, (8, 8), 1), inner_lr=0.05, inner_steps=2, first_order=True,
                                        tasks_per_backward=g, batching="vmap"), lambda: regression_batch(7)),
    "ANIL": (lambda g: ANIL(Conv4(hidden=8, out_features=5), inner_lr=0.4, batching="vmap", tasks_per_backward=g),
             lambda: random_episodes(7, **IMAGES)),
    "Meta-SGD": (lambda g: MetaSGD(MLP(1, (8, 8), 1), inner_lr=0.05, tasks_per_backward=g, batching="vmap"),
                 lambda: regression_batch(7)),
    "MAML++ multi-step loss": (lambda g: MAMLPlusPlus(MLP(1, (8, 8), 1), inner_lr=0.05, inner_steps=3,
                                                      multi_step_loss_steps=10, tasks_per_backward=g, batching="vmap"),
                               lambda: regression_batch(7)),
    "iMAML": (lambda g: iMAML(MLP(1, (8, 8), 1), inner_lr=0.05, inner_steps=3, tasks_per_backward=g, batching="vmap"),
              lambda: regression_batch(7)),
    "CAVIA": (lambda g: CAVIA(ContextMLP(hidden=(8, 8), context_dim=2), tasks_per_backward=g, batching="vmap"),
              lambda: regression_batch(7)),
}


def gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("name", list(LEARNERS))
@pytest.mark.parametrize("group", [1, 3])
def test_grouped_gradient_is_the_whole_batch_gradient(name, group):
    # 7 tasks in groups of 3 (3 + 3 + 1: a short last group) or of 1 (learn2learn's way).
    make, episodes = LEARNERS[name]
    torch.manual_seed(0)
    whole = make(None)
    grouped = make(group)
    grouped.load_state_dict(whole.state_dict())
    batch = episodes()
    loss, reference = gradients(whole, batch)
    grouped_loss, grads = gradients(grouped, batch)
    torch.testing.assert_close(grouped_loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grouped.train_task_losses, whole.train_task_losses, rtol=1e-6, atol=1e-7)
    assert grads.keys() == reference.keys() and len(reference) >= 4
    # Float additions in another order (ANIL's shared convolutions also sum over 7 tasks' images
    # in one call against 1 or 3): equal to 1e-5 of the gradient's size; a group dropped, counted
    # twice or divided by its own size instead of the batch's would be off by a tenth or more.
    scale = max(g.abs().max().item() for g in reference.values())
    for key, value in reference.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize("first_order", [False, True])
def test_grouped_gradient_matches_an_explicit_per_task_autograd_loop(first_order):
    # The same check as test_maml_gradients' whole-batch one: two inner steps written out with
    # torch.autograd.grad per task, no learner code; 5 tasks in groups of 2.
    backbone = MLP(1, (8, 8), 1)
    model = MAML(backbone, inner_lr=0.05, inner_steps=2, first_order=first_order, batching="loop",
                 tasks_per_backward=2)
    batch = regression_batch(5)
    loss = model.training_step(batch, 0)
    loss.backward()
    ref_loss, ref_grads = explicit_meta_gradient(backbone, batch, 0.05, 2, first_order)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for p, r in zip(backbone.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("name", ["MAML Conv4-bn vmap", "Meta-SGD", "iMAML"])
def test_parameter_hooks_see_the_batch_gradient_once(name):
    # A hook on a parameter (Tensor.register_hook: a mask, a scale, a logger's histogram) runs
    # once a backward pass, on the batch's gradient. In groups of 3 (7 tasks) it must too: run
    # on each group's part as well, a hook halving the gradient would halve it twice (0.25x)
    # and be called 4 times.
    make, episodes = LEARNERS[name]
    torch.manual_seed(0)
    whole, grouped = make(None), make(3)
    grouped.load_state_dict(whole.state_dict())
    batch = episodes()
    calls = {}
    for model in (whole, grouped):
        seen = calls[id(model)] = []
        for key, p in model.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, key=key, seen=seen: (seen.append(key), 0.5 * g)[1])
    _, reference = gradients(whole, batch)
    _, grads = gradients(grouped, batch)
    assert sorted(calls[id(grouped)]) == sorted(calls[id(whole)]) == sorted(reference), calls
    scale = max(g.abs().max().item() for g in reference.values())
    for key, value in reference.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-4, atol=1e-5 * scale, msg=key)
    # And they are still in place for the next step.
    _, again = gradients(grouped, batch)
    assert len(calls[id(grouped)]) == 2 * len(reference)
    for key, value in reference.items():
        torch.testing.assert_close(again[key], value, rtol=1e-4, atol=1e-5 * scale, msg=key)


def test_the_loss_scales_the_handed_gradient_and_cannot_be_differentiated_twice():
    # What Lightning does to a loss (a GradScaler's scale, 1/accumulate_grad_batches) multiplies
    # the gradient: backward of 3 x the loss gives 3 x the gradient.
    torch.manual_seed(0)
    model = MAML(MLP(1, (8,), 1), inner_lr=0.05, tasks_per_backward=2, batching="vmap")
    batch = regression_batch(4)
    _, once = gradients(model, batch)
    model.zero_grad(set_to_none=True)
    (3 * model.training_step(batch, 0)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 3 * once[name])
    loss = model.training_step(batch, 0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


def tensor_peak(step, monkeypatch) -> int:
    """The most bytes held at once by the tensors ``step()`` allocates: ``peak_bytes`` of
    ``benchmarks/optimization_family.py`` (the allocator's events through the profiler)."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # it imports its sibling maml_step_time
    spec = importlib.util.spec_from_file_location("optimization_family", benchmarks / "optimization_family.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_bytes(step, torch.device("cpu"))


def test_groups_of_one_task_hold_a_fraction_of_the_whole_batch_memory(monkeypatch):
    # Second-order MAML on 8 Conv4 tasks: what a step holds is the graph of every task's inner
    # step and query pass until the outer backward. One task at a time holds one task's graph
    # (plus the gradients accumulated so far, parameter-sized): well under half the whole batch's
    # (an eighth of the graph in theory; measured 0.13x here).
    peaks = {}
    for group in (None, 1):
        torch.manual_seed(0)
        model = MAML(Conv4(hidden=16, out_features=5), inner_lr=0.4, batching="loop", memory_format="contiguous",
                     tasks_per_backward=group)
        batch = random_episodes(8, ways=5, shots=1, queries=5, x_shape=(1, 28, 28))
        step = lambda: model.training_step(batch, 0).backward()  # noqa: E731
        step()
        model.zero_grad(set_to_none=True)
        peaks[group] = tensor_peak(step, monkeypatch)
    assert peaks[1] < 0.4 * peaks[None], peaks


def test_tasks_per_backward_refuses_what_means_nothing():
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"tasks_per_backward must be a whole number of tasks, 1 or more"):
            MAML(MLP(), tasks_per_backward=bad)
    with pytest.raises(ValueError, match=r"Reptile takes no tasks_per_backward=2: its update differentiates no graph"):
        Reptile(MLP(), tasks_per_backward=2)


class TinyLossMAML(MAML):
    """MAML with the query loss scaled by 1e-7: its fp16 gradients (about 1e-8) flush to zero
    unless the loss is scaled up first, as a GradScaler does."""

    def query_losses(self, outputs, batch):
        return 1e-7 * super().query_losses(outputs, batch)


def fit_weights(tasks_per_backward, precision_plugin=None, steps=4, learner=MAML, sgd_lr=None, accumulate=1):
    L.seed_everything(0)
    options = {} if sgd_lr is None else {"optimizer": lambda params: torch.optim.SGD(params, lr=sgd_lr)}
    model = learner(MLP(1, (16, 16), 1), inner_lr=0.01, batching="loop", tasks_per_backward=tasks_per_backward,
                    **options)
    plugins = [precision_plugin] if precision_plugin is not None else []
    guard = NonFiniteGuard()
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[guard], plugins=plugins,
                            accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, SinusoidDataModule(meta_batch_size=6, train_tasks=6 * steps * accumulate, num_workers=0))
    assert trainer.global_step == steps
    return {name: value.clone() for name, value in model.state_dict().items()}, guard


def initial_weights():
    L.seed_everything(0)
    return MAML(MLP(1, (16, 16), 1), inner_lr=0.01).state_dict()


def largest_move(weights, start):
    return max(float((weights[name] - start[name]).abs().max()) for name in start if start[name].is_floating_point())


def test_fit_in_groups_takes_the_whole_batch_steps():
    whole, _ = fit_weights(None)
    grouped, _ = fit_weights(4)
    for name, value in whole.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # four Adam steps of 1e-3: the agreement is not that of runs that never stepped
    assert largest_move(whole, initial_weights()) > 1e-3


def test_fit_in_groups_with_gradient_accumulation():
    # accumulate_grad_batches=2 divides each batch's loss by 2 and sums two batches' gradients
    # before a step: the handed-over gradient is multiplied the same way. Plain SGD, under which
    # a gradient off by a constant factor shows (Adam would normalise it away).
    whole, _ = fit_weights(None, accumulate=2, sgd_lr=0.1)
    grouped, _ = fit_weights(4, accumulate=2, sgd_lr=0.1)
    for name, value in whole.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert largest_move(whole, initial_weights()) > 1e-3


def test_fit_in_groups_under_16_bit_loss_scaling():
    # 16-mixed on the CPU (fp16 autocast, a GradScaler), plain SGD (Adam would hide a gradient
    # off by a constant factor) and a query loss whose fp16 gradients flush to zero unscaled: each
    # group's backward must be scaled by the scaler's scale (2^12) and unscaled after, and what
    # Lightning's scaled backward multiplies is unscaled by the scaler, so the steps are the whole
    # batch's (to fp16 rounding). Skipping the group's scaling leaves the gradients zero; skipping
    # the unscaling makes them 2^12 times too large.
    def plugin(scale):
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))

    whole, guard = fit_weights(None, plugin(2.0 ** 12), learner=TinyLossMAML, sgd_lr=1e4)
    assert guard.skipped == 0
    assert largest_move(whole, initial_weights()) > 1e-3
    grouped, guard = fit_weights(2, plugin(2.0 ** 12), learner=TinyLossMAML, sgd_lr=1e4)
    assert guard.skipped == 0
    for name, value in whole.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-3, atol=1e-5, msg=name)
    # A scale far too large overflows the fp16 backward; the guard skips those steps (policy
    # 'raise' notwithstanding) while the scaler halves its scale, as for the whole batch.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22)
    weights, guard = fit_weights(2, MixedPrecision("16-mixed", "cpu", scaler=scaler), steps=12)
    halvings = round(math.log2(2.0 ** 22 / scaler.get_scale()))
    assert 1 <= halvings <= guard.max_consecutive_skips and guard.skipped == halvings
    assert all(bool(torch.isfinite(value).all()) for value in weights.values())
