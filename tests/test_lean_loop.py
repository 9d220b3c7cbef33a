"""The lean training batch and optimization step (fewshot_lightning.lean_loop) give what
Lightning's own give: the same hooks in the same order with the same ``_current_fx_name``, the
same gradients at ``on_before_optimizer_step``, the same weights, optimizer state, loop state and
logged metrics after a run, bit for bit (the same operations on the same tensors on the CPU); and
they step aside, to Lightning's, wherever a layer they leave out is needed. (Every learner takes it by
default: tests/test_resume.py's exact resumes through the CLI run on it.)"""
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.callbacks import NonFiniteGuard
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP
from fewshot_lightning.lean_loop import (
    VERIFIED_LIGHTNING,
    LeanAutomaticOptimization,
    LeanTrainingEpochLoop,
    lean_batch_possible,
    lean_step_possible,
    lightning_fingerprint,
)

STEPS = 5


class Recorder(L.Callback):
    """Records every optimization hook with the module's ``_current_fx_name`` inside it, the
    gradients' norm before each optimizer step, and which step class ran."""

    def __init__(self):
        self.events, self.grad_norms, self.step_classes, self.reasons, self.batch_reasons = [], [], [], [], []

    def _record(self, name, pl_module, *extra):
        self.events.append((name, pl_module._current_fx_name) + extra)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record("on_train_batch_start", pl_module, batch_idx)

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self._record("on_before_zero_grad", pl_module, type(optimizer).__name__)

    def on_before_backward(self, trainer, pl_module, loss):
        self._record("on_before_backward", pl_module, repr(loss.detach().item()))

    def on_after_backward(self, trainer, pl_module):
        self._record("on_after_backward", pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._record("on_before_optimizer_step", pl_module, type(optimizer).__name__)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(repr(torch.stack([g.norm() for g in grads]).norm().item()) if grads else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record("on_train_batch_end", pl_module, batch_idx, sorted(outputs))
        epoch_loop = trainer.fit_loop.epoch_loop
        self.step_classes.append((type(epoch_loop).__name__, type(epoch_loop.automatic_optimization).__name__))
        self.reasons.append(lean_step_possible(trainer, trainer.optimizers[0]))
        self.batch_reasons.append(lean_batch_possible(trainer, trainer.fit_loop._data_fetcher))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("on_validation_batch_start", pl_module, batch_idx)


def run(lean=True, model_class=MAML, callbacks=(), steps=STEPS, data_class=SinusoidDataModule, model_kwargs=None,
        **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    model = model_class(MLP(), inner_lr=0.01, batching="vmap", **(model_kwargs or {}))
    model.lean_loop = lean
    recorder = Recorder()
    settings = dict(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    settings.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[recorder, *callbacks], **settings)
    trainer.fit(model, data_class(meta_batch_size=4, train_tasks=4 * steps, val_tasks=8, num_workers=0))
    return model, trainer, recorder


def same(a, b):
    """Equal, tensors bit for bit, through lists (LBFGS keeps its history in lists)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(a, b):
    (model_a, trainer_a, rec_a), (model_b, trainer_b, rec_b) = a, b
    assert rec_a.events == rec_b.events
    assert rec_a.grad_norms == rec_b.grad_norms
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
    state_a, state_b = trainer_a.optimizers[0].state_dict(), trainer_b.optimizers[0].state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for key, value in state_a["state"].items():
        for name, held in value.items():
            assert same(held, state_b["state"][key][name]), (key, name)
    assert trainer_a.fit_loop.state_dict() == trainer_b.fit_loop.state_dict()
    assert trainer_a.global_step == trainer_b.global_step
    for metrics in ("logged_metrics", "callback_metrics", "progress_bar_metrics"):
        a, b = getattr(trainer_a, metrics), getattr(trainer_b, metrics)
        assert sorted(a) == sorted(b) and all(same(a[key], b[key]) for key in a), metrics


def test_lean_step_matches_lightnings_step():
    lean, stock = run(lean=True), run(lean=False)
    # The lean step ran at every step of the first run, Lightning's at every step of the second.
    assert lean[2].step_classes == [("LeanTrainingEpochLoop", "LeanAutomaticOptimization")] * STEPS
    assert lean[2].reasons == lean[2].batch_reasons == [None] * STEPS
    assert stock[2].reasons == ["the module does not ask for it (lean_loop)"] * STEPS
    assert_same_run(lean, stock)
    assert lean[1].global_step == STEPS
    # The hooks in Lightning's order, each seeing its own name as _current_fx_name (self.log checks it).
    first_step = [event[:2] for event in lean[2].events[:6]]
    assert first_step == [("on_train_batch_start", "on_train_batch_start"), ("on_before_zero_grad", "on_before_zero_grad"),
                          ("on_before_backward", "on_before_backward"), ("on_after_backward", "on_after_backward"),
                          ("on_before_optimizer_step", "on_before_optimizer_step"),
                          ("on_train_batch_end", "on_train_batch_end")]
    assert lean[2].events[5][3] == ["loss"]  # the step's output, as Lightning passes it on
    # The loops are Lightning's own again after the run.
    assert type(lean[1].fit_loop.epoch_loop.automatic_optimization) is _AutomaticOptimization
    assert type(lean[1].fit_loop.epoch_loop) is _TrainingEpochLoop


def test_gradient_clipping_is_applied_as_lightning_applies_it():
    clipped_lean, clipped_stock = run(True, gradient_clip_val=0.05), run(False, gradient_clip_val=0.05)
    assert clipped_lean[2].reasons == [None] * STEPS
    assert_same_run(clipped_lean, clipped_stock)
    # The clipping did something: the weights differ from an unclipped run's.
    unclipped = run(True)
    assert not all(torch.equal(p, q) for p, q in zip(clipped_lean[0].parameters(), unclipped[0].parameters()))


class HookedMAML(MAML):
    """Overrides the module hooks the lean step calls only where overridden, and logs in one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def on_before_zero_grad(self, optimizer):
        self.calls.append(("on_before_zero_grad", self._current_fx_name))

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.calls.append(("optimizer_zero_grad", self._current_fx_name, batch_idx))
        optimizer.zero_grad()

    def on_before_backward(self, loss):
        self.calls.append(("on_before_backward", self._current_fx_name, repr(loss.item())))

    def backward(self, loss, *args, **kwargs):
        self.calls.append(("backward", self._current_fx_name))
        (2 * loss).backward(*args, **kwargs)  # a different gradient than Lightning's default backward

    def on_after_backward(self):
        self.calls.append(("on_after_backward", self._current_fx_name))
        self.log("after_backward", float(len(self.calls)))

    def on_before_optimizer_step(self, optimizer):
        self.calls.append(("on_before_optimizer_step", self._current_fx_name))
        self.log("grad_steps", float(len(self.calls)))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.calls.append(("configure_gradient_clipping", self._current_fx_name))
        torch.nn.utils.clip_grad_value_(self.parameters(), 0.01)


def test_module_hooks_a_learner_overrides_are_called():
    lean, stock = run(True, HookedMAML), run(False, HookedMAML)
    assert lean[2].reasons == [None] * STEPS
    assert lean[0].calls == stock[0].calls
    assert [call[:2] for call in lean[0].calls[:7]] == [
        ("on_before_zero_grad", "on_before_zero_grad"), ("optimizer_zero_grad", "optimizer_zero_grad"),
        ("on_before_backward", "on_before_backward"), ("backward", "backward"), ("on_after_backward", "on_after_backward"),
        ("on_before_optimizer_step", "on_before_optimizer_step"), ("configure_gradient_clipping", "configure_gradient_clipping")]
    assert len(lean[0].calls) == 7 * STEPS
    assert_same_run(lean, stock)
    # The module's own backward ran (it doubles the loss): the gradients differ from MAML's.
    plain = run(True)
    assert lean[2].grad_norms != plain[2].grad_norms


class DoublingPrecision(L.pytorch.plugins.precision.Precision):
    """A precision plugin with its own ``pre_backward`` (scales the loss, as mixed precision's does)."""

    def pre_backward(self, tensor, module):
        return super().pre_backward(2 * tensor, module)


def test_a_precision_plugin_with_its_own_backward_steps_run_as_lightning_runs_them():
    lean, stock = run(True, plugins=[DoublingPrecision()]), run(False, plugins=[DoublingPrecision()])
    assert lean[2].reasons == [None] * STEPS  # the step is lean, its backward Lightning's
    assert_same_run(lean, stock)
    assert lean[2].grad_norms != run(True)[2].grad_norms  # the plugin's scaling took effect


class WarmupMAML(MAML):
    """A learning-rate warm-up in ``optimizer_step``, the Lightning idiom: needs Lightning's step."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (self.trainer.global_step + 1) / 3)
        optimizer.step(closure=optimizer_closure)


class SkipsMAML(MAML):
    """Skips every other step by returning ``None``, as Lightning allows on one device."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 2 else loss


@pytest.mark.parametrize("case", ["accumulate", "profiler", "optimizer_step", "lbfgs"])
def test_steps_aside_where_lightnings_layers_are_needed(case):
    kwargs, model_class = {}, MAML
    if case == "accumulate":
        kwargs = {"accumulate_grad_batches": 2}
        reason = "gradient accumulation"
    elif case == "profiler":
        kwargs = {"profiler": "simple"}
        reason = "a profiler that records every hook"
    elif case == "optimizer_step":
        model_class, reason = WarmupMAML, "the module overrides optimizer_step"
    else:
        reason = "the optimizer LBFGS may call the closure itself"

        class LBFGSMAML(MAML):
            def configure_optimizers(self):
                return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)

        model_class = LBFGSMAML
    lean, stock = run(True, model_class, **kwargs), run(False, model_class, **kwargs)
    assert lean[2].reasons and set(lean[2].reasons) == {reason}
    assert_same_run(lean, stock)


def test_an_accumulation_schedule_that_starts_during_the_run():
    """Lightning's GradientAccumulationScheduler sets accumulate_grad_batches at an epoch's start:
    the lean step takes the first epoch's steps, Lightning's the accumulating ones."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    def scheduled(lean):
        L.seed_everything(0, verbose=False)
        model = MAML(MLP(), inner_lr=0.01, batching="vmap")
        model.lean_loop = lean
        recorder = Recorder()
        trainer = L.Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[recorder, GradientAccumulationScheduler({1: 2})])
        trainer.fit(model, SinusoidDataModule(meta_batch_size=4, train_tasks=16, num_workers=0))
        return model, trainer, recorder

    lean, stock = scheduled(True), scheduled(False)
    assert lean[2].reasons == [None] * 4 + ["gradient accumulation"] * 4
    assert lean[1].global_step == 4 + 2
    assert_same_run(lean, stock)


def test_an_optimizer_pre_hook_runs_where_lightning_runs_it():
    """Lightning's step runs an optimizer's step pre-hooks before the training step (the
    optimizer calls the closure): a run with one takes Lightning's step, hooks in its order."""

    class PreHooked(MAML):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.order.append("pre-hook"))
            return optimizer

        def training_step(self, batch, batch_idx):
            self.order.append("training_step")
            return super().training_step(batch, batch_idx)

    runs = []
    for lean in (True, False):
        PreHooked.order = []
        runs.append(run(lean, PreHooked))
        assert PreHooked.order[:4] == ["pre-hook", "training_step"] * 2
    assert_same_run(*runs)


def test_a_skipped_training_step_is_skipped_as_lightning_skips_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lean = run(True, SkipsMAML)
    assert any("`training_step` returned `None`" in str(w.message) for w in caught)
    stock = run(False, SkipsMAML)
    assert lean[2].reasons == [None] * STEPS
    assert_same_run(lean, stock)
    # Steps 1 and 3 ran no backward: three backward passes in five steps.
    assert sum(event[0] == "on_after_backward" for event in lean[2].events) == 3


def test_the_non_finite_guard_skips_as_before():
    class NaNAtTwo(MAML):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss

    with pytest.warns(UserWarning, match="Skipped the step"):
        lean = run(True, NaNAtTwo, callbacks=[NonFiniteGuard(policy="skip")])
    with pytest.warns(UserWarning, match="Skipped the step"):
        stock = run(False, NaNAtTwo, callbacks=[NonFiniteGuard(policy="skip")])
    assert all(torch.isfinite(p).all() for p in lean[0].parameters())
    assert_same_run(lean, stock)


def test_this_lightning_is_one_the_lean_loop_was_checked_against():
    # If this fails, Lightning's loop code differs from every verified one: the lean loop is off
    # (Lightning's own runs, correct but slower) and this file's equivalence tests fail. Read
    # what changed in the functions of lean_loop._reproduced_code(), mend the lean loop where it
    # must follow, run this file against it, and add the new fingerprint to VERIFIED_LIGHTNING.
    fingerprint = lightning_fingerprint()
    assert fingerprint in VERIFIED_LIGHTNING, (L.__version__, fingerprint)


def test_a_lightning_it_was_not_checked_against_runs_its_own_loop(monkeypatch):
    monkeypatch.setattr("fewshot_lightning.lean_loop.VERIFIED_LIGHTNING", {})
    lean, stock = run(True), run(False)
    reason = f"Lightning {L.__version__}'s loop code is not one the lean loop was checked against"
    assert lean[2].reasons == lean[2].batch_reasons == [reason] * STEPS
    assert_same_run(lean, stock)


def test_install_is_by_class_and_undone():
    model, trainer, _ = run(True, steps=1)
    for loop in (trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.automatic_optimization):
        assert type(loop) in (_TrainingEpochLoop, _AutomaticOptimization) and "_plan" not in vars(loop)
    assert issubclass(LeanAutomaticOptimization, _AutomaticOptimization)
    assert issubclass(LeanTrainingEpochLoop, _TrainingEpochLoop)


class TransferData(SinusoidDataModule):
    """A datamodule that serves ``on_after_batch_transfer``, as Lightning lets it."""

    calls = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("datamodule on_after_batch_transfer", dataloader_idx, self.trainer.lightning_module._current_fx_name))
        return batch._replace(support_y=batch.support_y * 0.5)


class TransferMAML(MAML):
    """A learner with its own ``on_before_batch_transfer``, logging in it and at the batch's end."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        TransferData.calls.append(("module on_before_batch_transfer", self._current_fx_name))
        return batch

    def on_train_batch_end(self, outputs, batch, batch_idx):
        TransferData.calls.append(("module on_train_batch_end", self._current_fx_name, batch_idx))
        self.log("support_mean", batch.support_y.mean())


def test_batches_with_transfer_hooks_validation_schedule_and_logging_match(tmp_path):
    """The batch-transfer hooks on the objects Lightning picks (the datamodule's
    on_after_batch_transfer, the module's on_before_batch_transfer), validation every two steps,
    a step learning-rate schedule and a logger writing every step: the same as Lightning's loop."""
    runs, calls_of = [], []
    for lean in (True, False):
        TransferData.calls = []
        runs.append(run(lean, TransferMAML, data_class=TransferData, steps=6, limit_val_batches=2, val_check_interval=2,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=1,
                        logger=CSVLogger(tmp_path, name=str(lean), version=0),
                        model_kwargs={"lr_scheduler": lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}))
        calls_of.append(TransferData.calls)
    lean, stock = runs
    calls = calls_of[0]
    assert calls == calls_of[1]  # the same hooks, with the same _current_fx_name inside
    assert lean[2].batch_reasons == [None] * 6 and lean[2].reasons == [None] * 6
    assert_same_run(lean, stock)
    # Each training and validation batch went through both transfer hooks; the module's batch end logged.
    assert calls.count(("module on_before_batch_transfer", "on_before_batch_transfer")) == 6 + 3 * 2
    # training and validation batches, inside the strategy's batch_to_device hook both
    assert calls.count(("datamodule on_after_batch_transfer", 0, "batch_to_device")) == 6 + 3 * 2
    assert ("module on_train_batch_end", "on_train_batch_end", 5) in calls
    assert sum(event[0] == "on_validation_batch_start" for event in lean[2].events) == 3 * 2
    assert lean[0].lr_schedulers().state_dict() == stock[0].lr_schedulers().state_dict()
    assert lean[0].lr_schedulers().get_last_lr() == [pytest.approx(1e-3 * 0.5 ** 3)]
    written = [(tmp_path / name / "version_0" / "metrics.csv").read_text() for name in ("True", "False")]
    assert written[0] == written[1] and "support_mean" in written[0] and written[0].count("\n") > 6


class StopsEpochMAML(MAML):
    """Ends each epoch at its third batch by returning -1 from ``on_train_batch_start``."""

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        return -1 if batch_idx == 2 else None


def test_an_epoch_ended_by_on_train_batch_start_ends_as_in_lightning():
    lean = run(True, StopsEpochMAML, steps=4, max_epochs=2)
    stock = run(False, StopsEpochMAML, steps=4, max_epochs=2)
    assert_same_run(lean, stock)
    assert lean[1].global_step == 2 * 2  # two steps an epoch, two epochs
    assert lean[2].batch_reasons == [None] * 4


class AddsACallback(L.Callback):
    """Appends a recording callback to the trainer's list at the end of batch 1."""

    def __init__(self):
        self.added = Recorder()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            trainer.callbacks.append(self.added)


def test_a_callback_added_during_the_run_is_called_as_lightning_calls_it():
    """The lean loop reads the callbacks' hooks once a run, and again where the list changed."""
    lean_adder, stock_adder = AddsACallback(), AddsACallback()
    lean, stock = run(True, callbacks=[lean_adder]), run(False, callbacks=[stock_adder])
    assert lean[2].reasons == [None] * STEPS
    assert_same_run(lean, stock)
    assert lean_adder.added.events == stock_adder.added.events
    # Lightning's loop over the list reaches it in the very hook that appended it (batch 1's
    # on_train_batch_end), then at every hook of batches 2 to 4: six a batch
    assert lean_adder.added.events[0][:3] == ("on_train_batch_end", "on_train_batch_end", 1)
    assert len(lean_adder.added.events) == 1 + 3 * 6


class LogsSometimesMAML(MAML):
    """Logs ``loss`` at every third training step (to the progress bar too) and in validation
    under the same name, and ``every`` at every step: what the logger connector writes at a
    batch's end changes at some steps and not at others, and validation overwrites an entry."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx % 3 == 0:
            self.log("loss", loss, on_step=True, prog_bar=True)
        if batch_idx == 4:
            self.log("late", loss * 2, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("loss", torch.tensor(123.0))


class ConnectorDicts(L.Callback):
    """The logger connector's three dicts as they stand at each training batch's start and each
    validation batch's start (read directly: the trainer's properties would refresh them)."""

    def __init__(self):
        self.seen = []

    def _snapshot(self, trainer, where):
        connector = trainer._logger_connector
        self.seen.append((where, [sorted((key, value.item() if torch.is_tensor(value) else value) for key, value in d.items())
                                  for d in (connector._progress_bar_metrics, connector._callback_metrics,
                                            connector._logged_metrics)]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._snapshot(trainer, ("train", batch_idx))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._snapshot(trainer, ("val", trainer.global_step))

    def on_train_end(self, trainer, pl_module):
        self._snapshot(trainer, "end")


def test_the_logged_metrics_after_each_batch_are_lightnings_though_rebuilt_only_where_they_changed(monkeypatch):
    # The lean batch skips the logger connector's on_batch_end where it would write what its
    # dicts hold already; after every batch they are what Lightning's loop leaves, also where
    # validation wrote the same name in between and where a new metric appears mid-epoch.
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    calls = []
    original = _LoggerConnector.on_batch_end
    monkeypatch.setattr(_LoggerConnector, "on_batch_end", lambda self: calls.append(self.trainer.global_step) or original(self))
    snapshots = []
    for lean in (True, False):
        calls.clear()
        dicts = ConnectorDicts()
        runs = run(lean, LogsSometimesMAML, callbacks=[dicts], steps=9, limit_val_batches=1, val_check_interval=2,
                   check_val_every_n_epoch=None, num_sanity_val_steps=0)
        snapshots.append(dicts.seen)
        if lean:
            lean_run, lean_calls = runs, list(calls)
        else:
            stock_run, stock_calls = runs, list(calls)
    assert snapshots[0] == snapshots[1]
    assert_same_run(lean_run, stock_run)
    # What they held: the callback metrics' "loss" from validation (123) right after it ran, and
    # the training step's cached value again after the next batch, which logged nothing (written
    # back by that batch's end: the case where skipping it would have left 123); "late" from batch 4 on.
    callback_loss = {place: dict(dicts[1]).get("loss") for place, dicts in snapshots[1] if place != "end"}
    assert callback_loss[("train", 2)] == callback_loss[("train", 6)] == 123.0
    assert callback_loss[("train", 3)] == callback_loss[("train", 1)] != 123.0
    assert "late" not in dict(dict(snapshots[1])[("train", 4)][1]) and "late" in dict(dict(snapshots[1])[("train", 5)][1])
    # Lightning's loop rebuilt them at all nine training batches (and at validation's); the lean one
    # skipped some training batches' rebuilds (those where nothing was logged and nothing overwrote).
    assert len(stock_calls) > len(lean_calls) > 0, (stock_calls, lean_calls)
