"""Non-finite numbers never reach the weights, and never a score."""
import copy
import math
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from fewshot_lightning.algorithms import ProtoNet
from fewshot_lightning.callbacks import NonFiniteError, NonFiniteGuard
from fewshot_lightning.data import EpisodicDataModule, split_by_class
from torch.utils.data import TensorDataset


def poisoned_data():
    """Clustered images of 20 classes with one NaN pixel in one training image: the 1-in-1,200
    case, small. A 5-way 3-image-per-class task of the 14 training classes holds that image about
    one time in six (its class 5 times in 14, the image 3 times in 6): here 6 of the 20 batches."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(20, 1, 4, 4, generator=generator)
    labels = torch.arange(20).repeat_interleave(6)
    images = patterns[labels] + 0.5 * torch.randn(len(labels), 1, 4, 4, generator=generator)
    fractions = (0.7, 0.15, 0.15)
    training_class = split_by_class(images, labels, fractions, seed=0)["train"].labels[0]
    images[(labels == training_class).nonzero()[0], 0, 1, 2] = float("nan")
    L.seed_everything(0)
    # As a Dataset of pairs, which setup does not read through: a float tensor with a NaN would
    # be refused before training (tests/test_datamodule.py); data read lazily reaches the guard.
    return EpisodicDataModule(TensorDataset(images, labels), labels, split_fractions=fractions, ways=5, shots=1,
                              queries=2, test_ways=3, meta_batch_size=2, train_tasks=40, num_workers=0)


class StepRecorder(L.Callback):
    """Before and after every training step: the weights, Adam's state, and whether the batch
    holds a NaN (read off the batch itself, independently of the guard)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        poisoned = any(bool(torch.isnan(t).any()) for t in (batch.support_x, batch.query_x))
        before = (copy.deepcopy(pl_module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()))
        self.steps.append({"poisoned": poisoned, "before": before, "batch_idx": batch_idx})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = (copy.deepcopy(pl_module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()))


def same(first, second):
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(same(first[key], second[key]) for key in first)
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(same(a, b) for a, b in zip(first, second))
    if isinstance(first, torch.Tensor):
        return torch.equal(first, second)
    return first == second


def test_skipped_steps_leave_weights_and_optimizer_state_untouched():
    data = poisoned_data()  # 20 steps of 2 tasks
    model = ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)))
    guard, recorder = NonFiniteGuard(policy="skip", max_consecutive_skips=5), StepRecorder()
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[guard, recorder])
    with pytest.warns(UserWarning) as warned:
        trainer.fit(model, data)
    messages = [str(w.message) for w in warned]

    poisoned = [step for step in recorder.steps if step["poisoned"]]
    clean = [step for step in recorder.steps if not step["poisoned"]]
    assert len(recorder.steps) == 20 and poisoned and clean  # both kinds happened, so both checks bite
    assert guard.skipped == len(poisoned)
    # One warning per skipped step, naming it, and a count at the end.
    skipped = [m for m in messages if re.match(r"Non-finite training loss at global_step \d+ \(epoch 0, batch_idx \d+\): .* Skipped the step", m)]
    assert len(skipped) == len(poisoned)
    # each names its own batch (read off the loop when the message is written)
    named = [int(re.search(r"batch_idx (\d+)\)", m).group(1)) for m in skipped]
    assert named == [step["batch_idx"] for step in poisoned]
    assert f"{len(poisoned)} training steps in all were skipped for non-finite losses or gradients (20 steps in this run)" in " ".join(messages)
    for step in poisoned:  # not a bit of the weights or of Adam's moments and step count moved
        assert same(step["before"], step["after"])
    for step in clean:
        assert not same(step["before"][0], step["after"][0])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_skipped_steps_leave_batch_norm_running_statistics_untouched():
    # The forward pass updates batch norm's running averages before the guard drops the step's
    # gradients: "skip" left them NaN, and every later validation and test scored chance (0.2
    # accuracy, NaN loss) with exit 0.
    data = poisoned_data()
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    model = ProtoNet(backbone)
    guard, recorder = NonFiniteGuard(policy="skip", max_consecutive_skips=5), StepRecorder()
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[guard, recorder])
    with pytest.warns(UserWarning):
        trainer.fit(model, data)
    poisoned = [step for step in recorder.steps if step["poisoned"]]
    assert poisoned and guard.skipped == len(poisoned)
    for step in poisoned:  # the running statistics too: the whole state_dict as before the step
        assert same(step["before"][0], step["after"][0])
    assert all(bool(torch.isfinite(b).all()) for b in backbone.buffers() if b.is_floating_point())
    # Running statistics that are not finite are refused at evaluation, as non-finite weights are.
    with torch.no_grad():
        backbone[1].running_var[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"Testing would score non-finite weights \(NaN or inf in "
                                             r"backbone\.1\.running_var\)"):
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(model, data)


def test_policy_raise_names_the_batch_and_a_nan_model_is_never_scored():
    data = poisoned_data()
    model = ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)))
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[NonFiniteGuard()])
    with pytest.raises(NonFiniteError, match=r"Non-finite training loss at global_step \d+ \(epoch 0, batch_idx \d+\): "
                                             r"task [01] of the 2 in the batch .* Their training-set indices: \d+"):
        trainer.fit(model, data)
    # The guard stopped before the step: the weights are finite.
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

    # Weights that went NaN without a guard are refused, not scored as 1/ways.
    with torch.no_grad():
        model.backbone[1].weight[0, 0] = float("nan")
    tester = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NonFiniteError, match=r"Testing would score non-finite weights \(NaN or inf in backbone\.1\.weight\)"):
        tester.test(model, data)


def test_fp16_loss_scale_overflows_are_skipped_not_raised():
    """16-bit mixed precision (on the CPU here) with a loss scale far too large: the first
    steps' gradients overflow, the GradScaler skips them and halves the scale, and the guard,
    even with policy 'raise', counts and warns rather than stopping the run."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 1, 4, 4, generator=generator)[torch.arange(20).repeat_interleave(6)]
    data = EpisodicDataModule(images, torch.arange(20).repeat_interleave(6), split_fractions=(0.7, 0.15, 0.15), ways=5,
                              shots=1, queries=2, test_ways=3, meta_batch_size=2, train_tasks=40, num_workers=0)
    L.seed_everything(0)
    model = ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    guard = NonFiniteGuard()
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[guard],
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    with pytest.warns(UserWarning) as warned:
        trainer.fit(model, data)
    overflows = [str(w.message) for w in warned if "loss scale" in str(w.message)]
    # The scaler halves its scale once per overflow and grows it only after 2,000 good steps.
    halvings = round(math.log2(2.0 ** 20 / scaler.get_scale()))
    assert 1 <= halvings <= guard.max_consecutive_skips
    assert guard.skipped == len(overflows) == halvings
    assert re.search(r"Non-finite gradient at global_step 0 .* with finite losses on all 2 tasks .* The 16-bit loss "
                     r"scale \(1\.04858e\+06\) overflowed; the GradScaler lowers it\. Skipped the step", overflows[0])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("learner", ["MAML", "iMAML line search", "iMAML Hessian-free"])
def test_fp16_scales_the_inner_loss_and_skips_inner_overflows_until_the_scale_fits(learner):
    """MAML under 16-bit mixed precision (on the CPU, with the loop so autocast reaches the
    layers): the inner loss is scaled by the GradScaler's current scale; with a scale far too
    large the fp16 inner gradients overflow, the query losses go non-finite, and each such step
    is skipped (even with policy 'raise') while the scaler halves its scale, until it fits.
    iMAML's line-searched solvers pass an overflowing inner gradient on rather than refusing
    the step quietly, so the same holds for them."""
    from fewshot_lightning.algorithms import MAML, iMAML
    from fewshot_lightning.data import SinusoidDataModule
    from fewshot_lightning.models import MLP

    L.seed_everything(0)
    if learner == "MAML":
        model = MAML(MLP(1, (16, 16), 1), inner_lr=0.01, batching="loop")
    else:
        solver = {"inner_solver": "hessian_free"} if learner.endswith("free") else {"line_search": True}
        model = iMAML(MLP(1, (16, 16), 1), inner_lr=0.01, inner_steps=2, batching="loop", **solver)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22)
    guard = NonFiniteGuard()
    used = []

    class InnerScale(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            used.append((pl_module.inner_loss_scale(), scaler.get_scale()))

    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[guard, InnerScale()],
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    with pytest.warns(UserWarning) as warned:
        trainer.fit(model, SinusoidDataModule(meta_batch_size=4, train_tasks=80))
    assert all(inner == outer for inner, outer in used)  # the inner loop uses the scaler's scale
    halvings = round(math.log2(2.0 ** 22 / scaler.get_scale()))
    # fp16 tops out near 2^16: a support loss of order one, scaled by 2^22, overflows in the backward.
    assert 1 <= halvings <= guard.max_consecutive_skips and guard.skipped == halvings
    overflows = [str(w.message) for w in warned if "overflowed (in the inner loop or the outer backward" in str(w.message)]
    assert len(overflows) == halvings and overflows[0].startswith("Non-finite training loss at global_step 0")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert trainer.global_step == 20


def test_a_scaled_inner_loss_gives_the_unscaled_gradient_steps():
    from fewshot_lightning.algorithms.base import per_task_loss
    from fewshot_lightning.inner import adapt, functional, task_params
    from fewshot_lightning.models import MLP

    net = MLP(1, (8,), 1)
    x, y = torch.randn(3, 5, 1), torch.randn(3, 5, 1)
    start = task_params(dict(net.named_parameters()), 3)
    plain = adapt(functional(net), start, x, y, per_task_loss, 2, 0.1)
    scaled = adapt(functional(net), start, x, y, per_task_loss, 2, 0.1, loss_scale=2.0 ** 12)
    for name in plain:  # in fp32 a power-of-two scale is exact: the same steps
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-6, atol=1e-7)


def test_imaml_divergence_names_its_line_search_which_prevents_it():
    # Sinusoid support losses of an MLP have curvature far above 2 / 0.5 = 4 (about 44 at
    # initialisation): fixed inner steps of 0.5 blow up on the first batch. The guard's message
    # then names iMAML's fix; with the line search on, the same run trains, finite.
    from fewshot_lightning.algorithms import iMAML
    from fewshot_lightning.data import SinusoidDataModule
    from fewshot_lightning.models import MLP

    def run(**options):
        L.seed_everything(0)
        model = iMAML(MLP(1, (40, 40), 1), inner_lr=0.5, inner_steps=10, lam=1.0, **options)
        data = SinusoidDataModule(shots=10, meta_batch_size=4, train_tasks=20, num_workers=0)
        trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[NonFiniteGuard()])
        trainer.fit(model, data)
        return model, trainer

    with pytest.raises(NonFiniteError, match=r"Stopped the run\. iMAML's fixed-step inner gradient descent diverges .* "
                                             r"2 / inner_lr = 4: turn on its line search \(line_search: true"):
        run()
    model, trainer = run(line_search=True)
    assert trainer.global_step == 5 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("kernel", [True, False], ids=["amp-kernel", "largest-magnitude"])
def test_the_guard_check_finds_any_single_non_finite_element_and_nothing_else(kernel, monkeypatch):
    # The guard's one-pass check against an element-by-element isfinite, by either of its two
    # ways (the AMP kernel, which takes a mix of dtypes; the largest absolute value of each tensor,
    # where the kernel refused tensors before): one bad element anywhere among many tensors is
    # found, and finite values as large as float32 allows (whose sum would overflow) are not mistaken.
    from fewshot_lightning import callbacks
    from fewshot_lightning.callbacks import _all_finite

    monkeypatch.setattr(callbacks, "_AMP_CHECK", [kernel])

    def clean():
        return [torch.randn(64, 32, 3, 3), torch.randn(5), torch.zeros(0), torch.randn(7, dtype=torch.float16),
                torch.full((4,), 3e38)]

    assert _all_finite(clean()) and _all_finite([]) and _all_finite([torch.zeros(0)])
    for index in (0, 1, 3, 4):
        for bad in (float("nan"), float("inf"), -float("inf")):
            tensors = clean()
            tensors[index].view(-1)[-1] = bad
            assert not _all_finite(tensors), (index, bad)
            assert not all(bool(t.isfinite().all()) for t in tensors)  # the slow check agrees
    assert callbacks._AMP_CHECK == [kernel]  # the kernel took the mix of dtypes
    # one dtype and device (without the kernel: the one-foreach path; the float16 tensor above
    # sends all to the other)
    same = [t for t in clean() if t.dtype == torch.float32]
    assert _all_finite(same)
    for index in range(len(same)):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for position in (0, -1):
                tensors = [t.clone() for t in same]
                if tensors[index].numel():
                    tensors[index].view(-1)[position] = bad
                    assert not _all_finite(tensors), (index, bad, position)


def test_the_guard_check_leaves_the_tensors_as_they_were():
    # The one-kernel path (mixed precision's unscale kernel, factor 1) stores every value back
    # bit for bit, leaves a tensor of an autograd graph untouched (it checks a copy), and its
    # flag, raised by a non-finite element, is lowered again for the next check.
    from fewshot_lightning.callbacks import _all_finite

    grads = [torch.randn(40, 1), torch.tensor([1e-45, -0.0, 3e38, -3e38]), torch.randn(40)]  # a denormal, -0
    losses = (torch.randn(5, requires_grad=True) * 2)
    before = [g.clone() for g in grads] + [losses.detach().clone()]
    versions = losses._version
    assert _all_finite(grads + [losses])
    assert all(torch.equal(a, b) and a.view(torch.int32).equal(b.view(torch.int32)) for a, b in zip(grads + [losses.detach()], before))
    assert losses._version == versions
    grads[1][1] = float("nan")
    assert not _all_finite(grads + [losses])
    grads[1][1] = 0.0
    assert _all_finite(grads + [losses]) and _all_finite(grads)


def test_a_sparse_gradient_is_checked_and_a_nan_in_it_is_named(monkeypatch):
    # nn.Embedding(sparse=True) gives a sparse gradient, which isfinite() cannot take: the guard
    # checks it anyway and, when it holds a NaN, names the parameter.
    from fewshot_lightning.callbacks import _all_finite

    from fewshot_lightning import callbacks

    monkeypatch.setattr(callbacks, "_AMP_CHECK", [True])
    table = nn.Embedding(10, 3, sparse=True)
    table(torch.tensor([1, 2])).sum().backward()
    assert table.weight.grad.layout == torch.sparse_coo and _all_finite([table.weight.grad])
    assert callbacks._AMP_CHECK == [False]  # the kernel refused it: the other way from then on
    table.weight.grad = torch.sparse_coo_tensor(torch.tensor([[4]]), torch.tensor([[1.0, float("nan"), 2.0]]), (10, 3),
                                                    check_invariants=True)
    assert not _all_finite([table.weight.grad])

    class Learner(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.table = table

    class FakeTrainer:
        global_step, current_epoch, world_size = 7, 0, 1
        fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=3))

    guard = NonFiniteGuard()
    message = guard._describe(FakeTrainer(), Learner(), [table.weight], None)
    assert "Non-finite gradient at global_step 7 (epoch 0, batch_idx 3)" in message and "table.weight" in message


def test_a_non_finite_evaluation_is_blamed_on_what_can_cause_it_for_the_learner():
    # A CNP under 16-true precision overflowed to val/mse nan and was told to lower inner_lr or
    # test_inner_steps, which it does not have.
    from types import SimpleNamespace

    from fewshot_lightning.algorithms import CNP, MAML
    from fewshot_lightning.models import MLP

    cnp, maml = CNP(MLP(2, (8,), 8), decoder_hidden=(8,)), MAML(MLP())
    assert cnp._nonfinite_prediction_cause() == "the model's outputs overflowed on those inputs"
    assert maml._nonfinite_prediction_cause().startswith("the test-time adaptation diverged there: lower inner_lr")
    for model in (cnp, maml):
        model._trainer = SimpleNamespace(precision="16-true")
        assert model._nonfinite_prediction_cause().startswith("under 16-true precision the activations overflowed")


def test_a_non_finite_evaluation_loss_beside_a_finite_accuracy_is_said():
    # An accuracy stays finite when the predictions are NaN (the argmax of NaN scores is class 0):
    # a test of a model with NaN outputs printed test/acc 0.33 and test/loss nan without a word.
    class LogOfInputs(nn.Module):  # NaN wherever an input is negative: every episode here
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return torch.log(x.flatten(1)) * self.scale

    data = poisoned_data()
    with pytest.warns(UserWarning, match=r"test/loss is nan while test/acc is finite: the predictions were not finite "
                                         r"on at least one test episode"):
        result = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
            ProtoNet(LogOfInputs()), data, verbose=False)[0]
    assert math.isnan(result["test/loss"]) and math.isfinite(result["test/acc"])


def test_skipped_steps_are_logged_on_the_runs_step_axis_with_several_optimizer_steps_a_batch():
    # MAML-RL takes outer_steps optimizer steps a batch: train/skipped_steps went to global_step
    # (1..10) while its other training curves are at the batch count (0..2).
    from functools import partial

    from fewshot_lightning.algorithms import MAMLRL
    from fewshot_lightning.rl import GaussianMLPPolicy, NavigationDataModule, PointNavigation
    from test_preemption import StepsLogged

    torch.manual_seed(0)
    model = MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=3), trajectories=2, outer_steps=3,
                   optimizer=partial(torch.optim.SGD, lr=1e39))  # inf weights after one step: every later one skipped
    logger = StepsLogged()
    trainer = L.Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[NonFiniteGuard(policy="skip", max_consecutive_skips=100)])
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="Training ended with non-finite weights"):
        trainer.fit(model, NavigationDataModule(meta_batch_size=2, train_tasks=6, val_tasks=2, test_tasks=2))
    skipped = {step for step, name, _ in logger.points if name == "train/skipped_steps"}
    curve = {step for step, name, _ in logger.points if name == "train/return_pre"}
    assert skipped and curve == {0, 1, 2} and skipped <= curve, (skipped, curve)


def test_under_gradient_accumulation_the_batch_with_the_non_finite_loss_is_named():
    # The step sees the window's last batch only: a NaN loss in the window's first batch was
    # reported as "Non-finite gradient ... with finite losses on all tasks of the batch", naming the
    # other batch and no task.
    data = poisoned_data()
    recorder = StepRecorder()
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accumulate_grad_batches=2,
                        callbacks=[NonFiniteGuard(), recorder])
    with pytest.raises(NonFiniteError) as error:
        trainer.fit(ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 8))), data)
    first = next(step["batch_idx"] for step in recorder.steps if step["poisoned"])
    assert first % 2 == 0  # the first batch of its window: the case the step did not see
    assert re.match(rf"Non-finite training loss at global_step {first // 2} \(epoch 0, batch_idx {first}\): task [01] of "
                    r"the 2 in the batch .* Their training-set indices: \d+", str(error.value)), str(error.value)


def test_a_buffer_that_is_infinite_by_design_is_not_refused():
    # The evaluation check of non-finite weights took in every floating buffer: a causal mask of
    # -inf (the usual attention mask) stopped training and testing as "non-finite weights".
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 8)
            self.register_buffer("mask", torch.triu(torch.full((8, 8), float("-inf")), 1))

        def forward(self, x):
            h = self.linear(x.flatten(1))
            return h + torch.softmax(h[:, None, :] + self.mask, -1).mean(1)

    data = poisoned_data()
    model = ProtoNet(Masked())
    result = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2).test(
        model, data, verbose=False)[0]
    assert math.isfinite(result["test/acc"])
