"""Lightning's per-batch callback hooks, called only where a hook does something.

Lightning calls every per-batch hook (``on_train_batch_start``, ``on_before_backward``, ...,
``on_train_batch_end``) on every callback at every step, whether the callback overrides it or
not, each call through a profiler context whose name formats the callback's ``state_key``:
with the CLI's nine callbacks, 92 of their 108 per-batch hooks are inherited empty methods,
about 100 us a training step on a 2-core CPU (``benchmarks/callback_dispatch.py``), 4% of a
sinusoid MAML step. Lightning skips a hook that is not callable (``trainer/call.py``), so for
the length of a run each such inherited, empty hook is shadowed on the callback by ``None``,
and restored afterwards; so is the ``on_train_batch_end`` of a ``ModelCheckpoint`` that saves
neither every N training steps nor every interval of time, which then does nothing. A hook a class
overrides, or one set on the instance, is never touched; an inherited hook whose body does
anything is kept. The ``LightningModule``'s own hooks are left alone: Lightning reads their
signatures (``dataloader_idx``) before evaluation.

Two more things Lightning does at every step, for nothing, are made cheap the same way, for the
length of a run: the default profiler (``PassThroughProfiler``, which records nothing) enters a
generator-based context manager around every hook it calls, some twenty-five a training step;
its ``profile`` is shadowed on the instance by ``contextlib.nullcontext``, which yields the same
action name (:func:`quiet_profiler`). And Lightning reads ``training_step``'s signature with
``inspect.getfullargspec`` at every training step (``_build_kwargs``: does it take
``batch_idx``?), the evaluation steps' at every evaluation batch; :func:`cache_step_signatures`
stores each step function's signature on it as ``__signature__`` (PEP 362), where ``inspect``
finds it instead of building it afresh: the same signature, read once.
"""
from __future__ import annotations

import contextlib
import dis
import inspect
import types
from typing import Any, Iterable

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import PassThroughProfiler

#: The hooks Lightning calls once or more every batch (per-run hooks cost nothing to keep).
PER_BATCH_HOOKS = (
    "on_train_batch_start", "on_train_batch_end",
    "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end",
    "on_predict_batch_start", "on_predict_batch_end",
    "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
)

_NOTHING = frozenset({"RESUME", "NOP", "CACHE", "LOAD_CONST", "RETURN_VALUE", "RETURN_CONST"})


def does_nothing(function: Any) -> bool:
    """Whether ``function``'s body only returns ``None`` (a docstring, ``pass``): read from its
    bytecode, so a base hook that Lightning gives a body one day is no longer skipped."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    for instruction in dis.get_instructions(code):
        if instruction.opname not in _NOTHING:
            return False
        if instruction.opname in ("LOAD_CONST", "RETURN_CONST") and instruction.argval is not None:
            return False
    return True


#: Where a callback records the hooks hidden on it, so that they are known as ours, not its own.
_MARK = "_fewshot_lightning_hidden_hooks"


def _idle(callback: Any, name: str) -> bool:
    if name in vars(callback):  # set on the instance: the owner's choice
        return False
    inherited = getattr(type(callback), name, None)
    if name == "on_train_batch_end" and inherited is ModelCheckpoint.on_train_batch_end:
        return _saves_only_at_epoch_or_validation_end(callback)
    return inherited is not None and inherited is getattr(L.Callback, name, None) and does_nothing(inherited)


def _saves_only_at_epoch_or_validation_end(checkpoint: ModelCheckpoint) -> bool:
    """A ``ModelCheckpoint`` with neither ``every_n_train_steps`` nor ``train_time_interval``
    (the CLI's ``ModelCheckpoint(monitor=...)`` for the best model): its ``on_train_batch_end``,
    which saves every N training steps or every interval of time, returns at every batch without
    doing anything ("we skip saving during training", its documentation says; so its code does in
    Lightning 2.5 and 2.6), after some twenty attribute reads."""
    steps = getattr(checkpoint, "_every_n_train_steps", None)
    return isinstance(steps, int) and steps < 1 and getattr(checkpoint, "_train_time_interval", 0) is None


def hide_idle_hooks(callbacks: Iterable[Any]) -> int:
    """Shadow, on each of ``callbacks``, every per-batch hook inherited unchanged from
    ``Callback`` and empty, so that Lightning skips its call; first undo what an earlier run
    hid and did not restore (one that ended in an exception). Returns how many were hidden."""
    callbacks = [callback for callback in callbacks if hasattr(callback, "__dict__")]
    restore_hooks(callbacks)
    count = 0
    for callback in callbacks:
        names = tuple(name for name in PER_BATCH_HOOKS if _idle(callback, name))
        for name in names:
            object.__setattr__(callback, name, None)
        if names:
            object.__setattr__(callback, _MARK, names)
        count += len(names)
    return count


def restore_hooks(callbacks: Iterable[Any]) -> None:
    """Undo :func:`hide_idle_hooks` (leaving alone a hook set on the instance since)."""
    for callback in callbacks:
        held = getattr(callback, "__dict__", {})
        for name in held.pop(_MARK, ()):
            if name in held and held[name] is None:
                del held[name]


#: Where a profiler records that its ``profile`` was shadowed by :func:`quiet_profiler`.
_PROFILER_MARK = "_fewshot_lightning_quiet"


def quiet_profiler(profiler: Any) -> bool:
    """Shadow the ``profile`` of Lightning's default profiler, which records nothing, by
    ``contextlib.nullcontext`` (entering it yields the action's name, as ``profile`` does).
    Any other profiler (``simple``, ``advanced``, ``pytorch``, a user's subclass, even of
    ``PassThroughProfiler``) is left alone. Returns whether the profiler was shadowed."""
    if type(profiler) is not PassThroughProfiler or "profile" in vars(profiler):
        return bool(getattr(profiler, "__dict__", {}).get(_PROFILER_MARK))
    profiler.profile = contextlib.nullcontext
    profiler.__dict__[_PROFILER_MARK] = True
    return True


def restore_profiler(profiler: Any) -> None:
    """Undo :func:`quiet_profiler`."""
    held = getattr(profiler, "__dict__", {})
    if held.pop(_PROFILER_MARK, False) and held.get("profile") is contextlib.nullcontext:
        del held["profile"]


#: The step methods whose signature Lightning reads at every batch.
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def cache_step_signatures(module: Any) -> int:
    """Store on each step function of ``module``'s class its signature as ``__signature__``,
    which ``inspect`` returns as it is instead of building it (Lightning reads it at every batch).
    Only plain Python functions, one decorator level unwrapped as Lightning does
    (``utilities/signature_utils.py``), and only where no ``__signature__`` is set; the value is
    ``inspect``'s own (``follow_wrapped=False``, as ``getfullargspec`` reads it), so what anyone
    reads is unchanged. Returns how many were stored."""
    count = 0
    for name in STEP_METHODS:
        function = getattr(type(module), name, None)
        function = getattr(function, "__wrapped__", function)
        if isinstance(function, types.FunctionType) and "__signature__" not in vars(function):
            function.__signature__ = inspect.signature(function, follow_wrapped=False)
            count += 1
    return count
