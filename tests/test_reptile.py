"""Reptile (fewshot_lightning/algorithms/reptile.py) against per-task torch.optim loops."""
import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import Reptile
from fewshot_lightning.algorithms.reptile import minibatch_schedule
from fewshot_lightning.data import SinusoidDataModule, SinusoidTasks
from fewshot_lightning.models import MLP


def fine_tune(model, x, y, lr, steps, betas=(0.0, 0.999), indices=None):
    """One task: a module copy trained by torch.optim.Adam, nothing of fewshot_lightning.inner."""
    task_model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(task_model.parameters(), lr=lr, betas=betas, eps=1e-8)
    for step in range(steps):
        pick = slice(None) if indices is None else indices[step]
        optimizer.zero_grad()
        F.mse_loss(task_model(x[pick]), y[pick]).backward()
        optimizer.step()
    return {name: p.detach() for name, p in task_model.named_parameters()}


def mean_of_fine_tuned(backbone, batch, lr, steps, schedule=None):
    tuned = [
        fine_tune(backbone, batch.support_x[t], batch.support_y[t], lr, steps,
                  indices=None if schedule is None else schedule[:, t])
        for t in range(batch.num_tasks)
    ]
    return {name: torch.stack([task[name] for task in tuned]).mean(0) for name in tuned[0]}


class RecordFirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch = batch
        self.before = copy.deepcopy(module.backbone)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_one_sgd_step_of_lr_1_lands_on_the_mean_fine_tuned_weights(clip):
    # Through the Trainer's automatic optimization: the returned loss's gradient is
    # theta - mean(phi), so SGD with lr 1 moves theta exactly onto mean(phi). With gradient
    # clipping by norm, the same direction is kept and the step shrinks to the clip norm.
    torch.manual_seed(0)
    model = Reptile(MLP(1, (8,), 1), inner_lr=0.01, inner_steps=3, batching="vmap",
                    optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    record = RecordFirstBatch()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[record],
                        gradient_clip_val=clip, gradient_clip_algorithm="norm")
    trainer.fit(model, SinusoidDataModule(shots=10, meta_batch_size=4, train_tasks=4))
    expected = mean_of_fine_tuned(record.before, record.batch, 0.01, 3)
    before = dict(record.before.named_parameters())
    moved = {n: p.detach() - before[n].detach() for n, p in model.backbone.named_parameters()}
    wanted = {n: expected[n] - before[n].detach() for n in expected}
    if clip is None:
        for name, p in model.backbone.named_parameters():
            assert torch.allclose(p, expected[name], atol=1e-6), name
    else:
        norm = torch.cat([m.flatten() for m in moved.values()]).norm()
        full = torch.cat([w.flatten() for w in wanted.values()]).norm()
        assert full > 10 * clip  # clipping really shortened the step
        assert torch.isclose(norm, torch.tensor(clip), rtol=1e-3)
        for name in moved:
            assert torch.allclose(moved[name], wanted[name] * (clip / full), atol=1e-7), name


def test_mini_batches_follow_the_schedule_drawn_for_the_step():
    torch.manual_seed(0)
    backbone = MLP(1, (8,), 1)
    model = Reptile(backbone, inner_lr=0.01, inner_steps=4, inner_batch_size=3, batching="loop")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = SinusoidTasks(shots=5).__getitems__(range(3))
    before = copy.deepcopy(backbone)
    torch.manual_seed(7)
    loss = model.training_step(batch, 0)
    torch.manual_seed(7)  # the same draw, independently: 4 steps of 3 of the 5 support points
    schedule = minibatch_schedule(3, 5, 3, 4)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    expected = mean_of_fine_tuned(before, batch, 0.01, 4, schedule)
    for name, p in backbone.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-6), name


def test_the_outer_gradient_of_a_batch_is_the_mean_of_its_parts():
    # What DDP relies on: averaging the gradients of equal shares of the tasks (one per rank)
    # gives the gradient of the whole batch, i.e. theta - mean over all tasks of phi.
    model = Reptile(MLP(1, (8,), 1), inner_lr=0.01, inner_steps=2, batching="vmap")
    batch = SinusoidTasks().__getitems__(range(4))
    parts = [type(batch)(*(t[:2] for t in batch)), type(batch)(*(t[2:] for t in batch))]
    params = list(model.backbone.parameters())

    def gradient(tasks):
        return torch.autograd.grad(model.training_losses(tasks)[0].mean(), params)

    whole = gradient(batch)
    halves = [gradient(part) for part in parts]
    for g, a, b in zip(whole, *halves):
        assert torch.allclose(g, (a + b) / 2, atol=1e-7)
    adapted = model.adapt(batch.support_x, batch.support_y, differentiable=False)
    for g, (name, theta) in zip(whole, model.backbone.named_parameters()):
        assert torch.allclose(g, theta.detach() - adapted[name].mean(0), atol=1e-7)


def test_minibatch_schedule_walks_each_support_set_in_shuffled_passes():
    torch.manual_seed(0)
    schedule = minibatch_schedule(tasks=3, size=10, batch_size=4, steps=5)
    assert schedule.shape == (5, 3, 4)
    for task in range(3):
        stream = schedule[:, task].flatten()  # 20 draws = two full passes over the 10 samples
        for start in (0, 10):
            assert sorted(stream[start:start + 10].tolist()) == list(range(10))
    assert not torch.equal(schedule[:, 0], schedule[:, 1])  # each task shuffles on its own


def test_evaluation_uses_the_test_batch_size_and_steps():
    model = Reptile(MLP(1, (8,), 1), inner_batch_size=2, test_inner_batch_size=3, test_inner_steps=7)
    support_x = torch.zeros(2, 5, 1)
    assert model.inner_options(support_x, 4)["minibatch"](3).shape == (2, 2)
    model.eval()
    options = model.inner_options(support_x, 7)
    assert options["minibatch"](6).shape == (2, 3)
    model.test_inner_batch_size = None  # the whole support set: no mini-batches
    assert "minibatch" not in model.inner_options(support_x, 7)


def test_evaluation_fine_tuning_lowers_the_support_loss_and_keeps_no_graph():
    model = Reptile(MLP(1, (16,), 1), inner_lr=0.01, test_inner_steps=20, batching="vmap").eval()
    batch = SinusoidTasks(shots=10).__getitems__(range(3))
    with torch.no_grad():
        curve = model.adaptation_curve(batch)
    assert curve.shape == (21, 3, 10, 1) and not curve.requires_grad
    start, end = (F.mse_loss(curve[k], batch.query_y) for k in (0, 20))
    assert end < 0.9 * start  # 20 Adam steps on 10 points of the same sinusoid help the queries


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"first_order": True}, "Reptile takes no first_order=True"),
        ({"learn_inner_lr": True}, "Reptile takes no learn_inner_lr=True"),
        ({"multi_step_loss_steps": 10}, "Reptile takes no multi_step_loss_steps=10"),
        ({"adapt": ["head."]}, r"Reptile takes no adapt=\['head.'\]: it fine-tunes every parameter"),
        ({"inner_optimizer": "rmsprop"}, r"inner_optimizer must be one of \('adam', 'sgd'\), got 'rmsprop'"),
        ({"inner_batch_size": 0}, "inner_batch_size must be a whole number, at least 1"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Reptile(MLP(), **kwargs)


def test_evaluation_adapts_a_task_alike_in_any_batch_and_after_any_draws():
    # Evaluation's support mini-batches came from the global generator, drawn for the whole batch:
    # a task adapted differently alone than in its batch (0.64 apart) and after other draws
    # (--seed_everything moved test/loss of the same checkpoint on the same episodes).
    torch.manual_seed(0)
    model = Reptile(MLP(1, (8,), 1), inner_lr=0.05, inner_steps=2, test_inner_steps=5, inner_optimizer="sgd",
                    batching="vmap", inner_batch_size=3, test_inner_batch_size=3).eval()
    batch = SinusoidTasks(shots=10).__getitems__(range(3))
    torch.manual_seed(123)
    together = model._adapted_query_outputs(batch)
    torch.manual_seed(999)
    alone = model._adapted_query_outputs(type(batch)(*(t[1:2] for t in batch)))
    assert torch.allclose(together[1:2], alone, atol=1e-6)
    torch.rand(100)
    assert torch.equal(model._adapted_query_outputs(batch), together)
    # Still mini-batches of 3 in shuffled passes (one order for every task), not the whole set.
    options = model.inner_options(batch.support_x, 5)
    steps = torch.stack([options["minibatch"](step) for step in range(5)])
    assert steps.shape == (5, 3, 3) and torch.equal(steps[:, 0], steps[:, 2])
    assert sorted(steps[:, 0].flatten()[:10].tolist()) == list(range(10))
    # Training keeps drawing each task's own order from the run's generator.
    model.train()
    options = model.inner_options(batch.support_x, 5)
    steps = torch.stack([options["minibatch"](step) for step in range(5)])
    assert not torch.equal(steps[:, 0], steps[:, 1])


def test_timing_the_paths_draws_nothing_from_the_runs_generator():
    # batching='auto' timed full training steps, whose mini-batch draws moved the global
    # generator: the run then trained on other mini-batches than with its chosen path fixed
    # (weights 3.4e-3 apart after two steps of the Kanji config).
    from fewshot_lightning.models import Conv4
    from test_maml_gradients import image_batch

    torch.manual_seed(0)
    model = Reptile(Conv4(hidden=8, out_features=5), inner_steps=3, inner_batch_size=2)
    batch = image_batch()
    state = torch.get_rng_state()
    model.choose_batching(batch)
    assert len(model.batching_timings) == 4  # every path was timed, with steps that drew mini-batches
    assert torch.equal(torch.get_rng_state(), state)
    model.eval()
    model._evaluation_execution(batch)
    assert torch.equal(torch.get_rng_state(), state)
