"""Lightning calls a callback's per-batch hook only where it does something (fewshot_lightning.hooks)."""
import lightning as L
import pytest
import torch
from lightning.pytorch.profilers import Profiler

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.hooks import PER_BATCH_HOOKS, does_nothing, hide_idle_hooks, restore_hooks
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
    """The same steps give the same weights with the empty hooks hidden as with all called."""
    import fewshot_lightning.algorithms.base as base

    def weights():
        L.seed_everything(0, verbose=False)
        return [p.detach().clone() for p in fit([Plain()], steps=4).lightning_module.parameters()]

    hidden = weights()
    monkeypatch.setattr(base, "hide_idle_hooks", lambda callbacks: 0)
    called = weights()
    assert len(hidden) == 6 and all(torch.equal(a, b) for a, b in zip(hidden, called))
    L.seed_everything(0, verbose=False)
    start = list(MAML(MLP(), inner_lr=0.01, batching="vmap").parameters())
    assert any(not torch.equal(a, b) for a, b in zip(hidden, start))  # four steps did train
