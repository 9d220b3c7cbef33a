"""Lightning calls a callback's per-batch hook only where it does something; the default
profiler's contexts, the step's signature and a batch already in place cost next to nothing
(fewshot_lightning.hooks, MetaLearner.transfer_batch_to_device)."""
import warnings
import contextlib
import functools
import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.profilers import PassThroughProfiler, Profiler
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import SinusoidDataModule, TaskBatch
from fewshot_lightning.hooks import (
    PER_BATCH_HOOKS,
    STEP_METHODS,
    cache_step_signatures,
    does_nothing,
    hide_idle_hooks,
    quiet_profiler,
    restore_hooks,
    restore_profiler,
)
from fewshot_lightning.models import MLP

STEPS = 3


def test_does_nothing_reads_the_body():
    def documented():
        """Only a docstring."""

    def passes():
        pass

    def returns_a_value():
        return 3

    def assigns(x):
        x.y = None

    def calls():
        print()

    assert does_nothing(documented) and does_nothing(passes) and does_nothing(lambda: None)
    assert not does_nothing(returns_a_value) and not does_nothing(assigns) and not does_nothing(calls)
    assert not does_nothing(print)  # no bytecode to read: kept
    # What the saving rests on: Lightning's base per-batch hooks are empty (if one gets a body,
    # it is no longer hidden and this line says why the saving shrank).
    assert all(does_nothing(getattr(L.Callback, name)) for name in PER_BATCH_HOOKS)


class Plain(L.Callback):
    """Overrides no hook: all twelve per-batch hooks are hidden during a run."""


class Busy(L.Callback):
    """Overrides one per-batch hook, and sees the others' state during the run."""

    def __init__(self, plain):
        self.plain, self.calls, self.seen = plain, 0, []

    def on_after_backward(self, trainer, pl_module):
        self.calls += 1
        self.seen.append({name: getattr(self.plain, name) for name in PER_BATCH_HOOKS})


class InstanceHook(L.Callback):
    """A hook set on the instance: its owner's, never hidden."""

    def __init__(self):
        self.calls = 0
        self.on_before_zero_grad = self.count

    def count(self, trainer, pl_module, optimizer):
        self.calls += 1


class Names(Profiler):
    """Records the name of every action Lightning profiles, one per hook call."""

    def __init__(self):
        super().__init__()
        self.names = []

    def start(self, action_name):
        self.names.append(action_name)

    def stop(self, action_name):
        pass

    def summary(self):
        return ""


def fit(callbacks, profiler=None, steps=STEPS):
    model = MAML(MLP(), inner_lr=0.01, batching="vmap")
    data = SinusoidDataModule(meta_batch_size=2, train_tasks=2 * steps, val_tasks=4, num_workers=0)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, profiler=profiler)
    trainer.fit(model, data)
    return trainer


def test_empty_hooks_are_not_called_and_come_back_after_the_run():
    plain, instance = Plain(), InstanceHook()
    busy = Busy(plain)
    names = Names()
    fit([plain, busy, instance], profiler=names)
    # during the run: the plain callback's twelve hooks hidden, the overridden and the instance's kept
    assert busy.calls == STEPS and instance.calls == STEPS
    assert all(value is None for value in busy.seen[0].values()) and len(busy.seen[0]) == 12
    called = [name for name in names.names if name.startswith("[Callback]")]
    assert not [name for name in called if "Plain" in name and any(hook in name for hook in PER_BATCH_HOOKS)]
    assert sum(name.endswith("Busy.on_after_backward") for name in called) == STEPS
    assert sum(name.endswith("InstanceHook.on_before_zero_grad") for name in called) == STEPS
    # Busy's other eleven per-batch hooks were not called either: only its own, and per-run hooks
    assert not [name for name in called if "Busy" in name and not name.endswith("on_after_backward")
                and any(hook in name for hook in PER_BATCH_HOOKS)]
    # after the run: nothing left on the instances
    assert not set(PER_BATCH_HOOKS) & set(vars(plain)) and callable(plain.on_before_backward)
    assert vars(instance)["on_before_zero_grad"] == instance.count
    assert set(PER_BATCH_HOOKS) & set(vars(busy)) == set()


class Fails(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("stop here")


def test_a_run_that_failed_leaves_nothing_the_next_run_keeps():
    plain = Plain()
    with pytest.raises(RuntimeError, match="stop here"):
        fit([plain, Fails()])
    # Lightning calls no module hook after an exception: the shadows are still there ...
    assert plain.on_before_backward is None
    # ... and the next run (a new trainer and learner) knows them as its own to restore
    busy = Busy(plain)
    fit([plain, busy])
    assert busy.calls == STEPS and all(value is None for value in busy.seen[0].values())
    assert not set(PER_BATCH_HOOKS) & set(vars(plain)) and callable(plain.on_before_backward)


def test_hide_and_restore_by_hand():
    plain, instance = Plain(), InstanceHook()
    assert hide_idle_hooks([plain, instance]) == 12 + 11
    assert plain.on_train_batch_end is None and instance.on_before_zero_grad == instance.count
    instance.on_train_batch_end = instance.count  # set by its owner meanwhile: kept by restore
    restore_hooks([plain, instance])
    assert callable(plain.on_train_batch_end) and instance.on_train_batch_end == instance.count
    assert not [name for name in PER_BATCH_HOOKS if name in vars(plain)]


def test_training_is_unchanged(monkeypatch):
    """The same steps give the same weights with the empty hooks hidden, the profiler quiet and
    the batch left in place as with Lightning as it comes."""
    import fewshot_lightning.algorithms.base as base

    def weights():
        L.seed_everything(0, verbose=False)
        return [p.detach().clone() for p in fit([Plain()], steps=4).lightning_module.parameters()]

    hidden = weights()
    # Lightning as it comes: every hook called, its profiler's contexts, its signature reads, its transfer
    monkeypatch.setattr(base, "hide_idle_hooks", lambda callbacks: 0)
    monkeypatch.setattr(base, "quiet_profiler", lambda profiler: False)
    monkeypatch.setattr(base, "cache_step_signatures", lambda module: 0)
    for name in STEP_METHODS:  # stored by the first run
        vars(getattr(MAML, name)).pop("__signature__", None)
    monkeypatch.setattr(base.MetaLearner, "transfer_batch_to_device", L.LightningModule.transfer_batch_to_device)
    called = weights()
    assert len(hidden) == 6 and all(torch.equal(a, b) for a, b in zip(hidden, called))
    L.seed_everything(0, verbose=False)
    start = list(MAML(MLP(), inner_lr=0.01, batching="vmap").parameters())
    assert any(not torch.equal(a, b) for a, b in zip(hidden, start))  # four steps did train


class SeesProfiler(L.Callback):
    """Records the trainer's profiler's ``profile`` at every training step, and what entering it
    yields."""

    def __init__(self):
        self.seen, self.yielded = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.profiler.profile)
        with trainer.profiler.profile(f"action {batch_idx}") as name:
            self.yielded.append(name)


def test_the_default_profiler_is_quiet_during_the_run_only():
    sees = SeesProfiler()
    trainer = fit([sees])
    assert type(trainer.profiler) is PassThroughProfiler
    # during the run: a null context, which yields the action's name as Lightning's profile does
    assert sees.seen == [contextlib.nullcontext] * STEPS
    assert sees.yielded == [f"action {index}" for index in range(STEPS)]
    # after it: Lightning's own again
    assert "profile" not in vars(trainer.profiler)
    with trainer.profiler.profile("action") as name:
        assert name == "action"
    assert trainer.profiler.profile.__func__ is PassThroughProfiler.profile


def test_other_profilers_are_left_alone():
    class Mine(PassThroughProfiler):
        pass

    mine, names = Mine(), Names()
    assert not quiet_profiler(mine) and not quiet_profiler(names)
    assert "profile" not in vars(mine) and "profile" not in vars(names)
    sees = SeesProfiler()
    fit([sees], profiler=names)
    # a profiler that records: every step's actions recorded, through its own profile
    assert all(profile.__func__ is Profiler.profile for profile in sees.seen)
    assert sees.yielded == [f"action {index}" for index in range(STEPS)]
    assert sum(name == "[Strategy]SingleDeviceStrategy.training_step" for name in names.names) == STEPS
    # by hand: shadowed once, restored, and a restore with nothing to undo does nothing
    default = PassThroughProfiler()
    assert quiet_profiler(default) and quiet_profiler(default) and default.profile is contextlib.nullcontext
    restore_profiler(default)
    restore_profiler(default)
    assert "profile" not in vars(default)


def test_step_signatures_are_stored_as_inspect_builds_them():
    def decorated(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return function(*args, **kwargs)
        return wrapper

    class Steps:
        def training_step(self, batch, batch_idx):
            pass

        @decorated
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            pass

        def test_step(self, batch):
            pass

        def predict_step(self, *args):
            pass

    given = inspect.signature(lambda self, x: None)
    Steps.predict_step.__signature__ = given  # set by its owner: kept
    steps = Steps()
    expected = {name: inspect.getfullargspec(getattr(steps, name)) for name in ("training_step", "validation_step", "test_step")}
    reads = {name: is_param_in_hook_signature(getattr(steps, name), "batch_idx", min_args=2) for name in expected}
    assert reads == {"training_step": True, "validation_step": True, "test_step": False}
    assert cache_step_signatures(steps) == 3 and cache_step_signatures(steps) == 0
    assert "__signature__" in vars(Steps.training_step) and "__signature__" in vars(Steps.test_step)
    assert "__signature__" in vars(Steps.validation_step.__wrapped__)  # where Lightning reads it
    assert Steps.predict_step.__signature__ is given
    for name, spec in expected.items():
        assert inspect.getfullargspec(getattr(steps, name)) == spec
        assert is_param_in_hook_signature(getattr(steps, name), "batch_idx", min_args=2) == reads[name]
    # and inspect now returns the stored object instead of building one
    assert inspect.signature(Steps.training_step) is vars(Steps.training_step)["__signature__"]


def test_a_batch_already_on_the_device_is_not_walked(monkeypatch):
    model = MAML(MLP(), inner_lr=0.01)
    batch = TaskBatch(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, 4, 1), torch.zeros(2, 4, 1))
    lightning_calls = []
    lightning_transfer = L.LightningModule.transfer_batch_to_device

    def recorded(self, batch, device, dataloader_idx):
        lightning_calls.append(type(batch))
        return lightning_transfer(self, batch, device, dataloader_idx)

    monkeypatch.setattr(L.LightningModule, "transfer_batch_to_device", recorded)
    assert model.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    assert lightning_calls == []
    # anything else goes to Lightning's: another container, another device, a non-tensor part
    as_tuple = model.transfer_batch_to_device(tuple(batch), torch.device("cpu"), 0)
    assert type(as_tuple) is tuple and all(a is b for a, b in zip(as_tuple, batch))
    elsewhere = batch._replace(query_y=torch.zeros(2, 4, 1, device="meta"))
    moved = model.transfer_batch_to_device(elsewhere, torch.device("meta"), 0)
    assert type(moved) is TaskBatch and all(part.device.type == "meta" for part in moved)
    assert lightning_calls == [tuple, TaskBatch]


def test_a_model_checkpoint_that_saves_nothing_between_validations_is_not_called_per_batch(tmp_path):
    """``ModelCheckpoint(monitor=...)`` with neither ``every_n_train_steps`` nor
    ``train_time_interval`` saves nothing at a training batch's end: that hook is hidden for the
    run; with either set it is kept, and it saves (every 2 steps: at steps 2 and 4)."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    from fewshot_lightning.callbacks import LastCheckpoint

    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/mse")
    every = ModelCheckpoint(dirpath=tmp_path / "every", every_n_train_steps=2, save_top_k=-1)
    timed = ModelCheckpoint(dirpath=tmp_path / "timed", train_time_interval=timedelta(hours=1))
    last = LastCheckpoint(every_n_train_steps=2, dirpath=tmp_path / "last")
    assert hide_idle_hooks([best, every, timed, last]) == 12 + 11 + 11 + 11  # all twelve on best
    assert best.on_train_batch_end is None
    assert callable(every.on_train_batch_end) and callable(timed.on_train_batch_end) and callable(last.on_train_batch_end)
    restore_hooks([best, every, timed, last])
    assert callable(best.on_train_batch_end)

    class Seen(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.hidden = best.on_train_batch_end is None

    seen = Seen()
    model = MAML(MLP(), inner_lr=0.01, batching="vmap")
    data = SinusoidDataModule(meta_batch_size=2, train_tasks=10, val_tasks=4, num_workers=0)
    trainer = L.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[best, every, last, seen], default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert seen.hidden and callable(best.on_train_batch_end)
    assert sorted(p.name for p in (tmp_path / "every").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert [p.name for p in (tmp_path / "last").iterdir()] == ["last.ckpt"]
    assert torch.load(tmp_path / "last" / "last.ckpt", weights_only=False)["global_step"] == 5
    assert not (tmp_path / "best").exists()  # no validation ran: nothing to monitor, nothing saved


def test_a_fit_with_a_datamodule_does_not_warn_about_our_transfer_hook(tmp_path):
    # Lightning warned at every fit with a DataModule that the module's transfer_batch_to_device
    # would be used: ours, meant to be, which our DataModules leave alone.
    from fewshot_lightning.data import SinusoidDataModule

    from lightning.pytorch.trainer.connectors import data_connector

    data_connector.warning_cache.clear()  # Lightning warns once a process
    with warnings.catch_warnings(record=True) as caught:
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(MAML(MLP(), inner_lr=0.01), SinusoidDataModule(meta_batch_size=2, train_tasks=4))
    assert trainer.global_step == 1
    assert not [w for w in caught if "transfer_batch_to_device" in str(w.message)]
