"""Lightning's per-batch callback hooks, called only where a hook does something.

Lightning calls every per-batch hook (``on_train_batch_start``, ``on_before_backward``, ...,
``on_train_batch_end``) on every callback at every step, whether the callback overrides it or
not, each call through a profiler context whose name formats the callback's ``state_key``:
with the CLI's nine callbacks, 92 of their 108 per-batch hooks are inherited empty methods,
about 100 us a training step on a 2-core CPU (``benchmarks/callback_dispatch.py``), 4% of a
sinusoid MAML step. Lightning skips a hook that is not callable (``trainer/call.py``), so for
the length of a run each such inherited, empty hook is shadowed on the callback by ``None``,
and restored afterwards. A hook a class
overrides, or one set on the instance, is never touched; an inherited hook whose body does
anything is kept. The ``LightningModule``'s own hooks are left alone: Lightning reads their
signatures (``dataloader_idx``) before evaluation.
"""
from __future__ import annotations

import dis
from typing import Any, Iterable

import lightning as L

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
    return inherited is not None and inherited is getattr(L.Callback, name, None) and does_nothing(inherited)


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
