"""Lightning's automatic optimization step, without its layers, where nothing needs them.

For one training step with one optimizer, Lightning builds a closure of three closures (the
training step, ``zero_grad``, ``backward``), hands it through the module's ``optimizer_step``
hook, the ``LightningOptimizer`` wrapper, the strategy's and the precision plugin's
``optimizer_step`` and a further closure that calls ``on_before_optimizer_step`` and the
gradient-clipping hook, to the optimizer, which calls it; on the way it calls the module's
empty ``on_before_*`` hooks and ``configure_gradient_clipping``, which with no clipping set
finds nothing to do after a dozen calls. On a 2-core CPU that is a few tenths of a millisecond
a step, 10-15% of a sinusoid MAML step (``benchmarks/speed.py --cases fit``).

:class:`LeanAutomaticOptimization` runs the same step in the same order: the training step (in
the strategy's and precision plugin's context, ``_current_fx_name`` set as Lightning sets it),
``on_before_zero_grad`` (callbacks, then the module), the module's ``optimizer_zero_grad`` (or
``optimizer.zero_grad()`` where that hook is Lightning's), the strategy's ``backward`` (with its
``on_before_backward`` / ``on_after_backward`` hooks and the module's ``backward``),
``on_before_optimizer_step``, gradient clipping where it is set or the hook overridden, then
``optimizer.step()``, with the same progress counters; it calls a module hook only where the
module's class overrides Lightning's empty one, and callback hooks as Lightning does, without
its profiler contexts. Its result is what Lightning's would be, down to the weights, the
optimizer's state and the loop's state in a checkpoint (``tests/test_optimization_step.py``).

It takes the step only where nothing relies on the layers it leaves out, checked at every step
against what is cheap to change and once a run against the rest; anywhere else Lightning's own
step runs:

- one optimizer, from ``torch.optim`` and not ``LBFGS`` (an optimizer that calls the closure
  itself, e.g. a user's SAM, needs Lightning's);
- no gradient accumulation, ``_skip_backward`` unset (stochastic weight averaging sets it), no
  optimizer step pre-hook (Lightning's step runs them before the training step, as the optimizer
  calls the closure), all checked at every step, as they may change during a run;
- the module's ``optimizer_step`` is Lightning's (a user's learning-rate warm-up there runs);
- the strategy's and the precision plugin's ``optimizer_step`` are Lightning's base ones
  (32- and 64-bit precision on one device; mixed precision's loss scaling, DDP's model
  averaging and any plugin that overrides them run as Lightning runs them);
- the profiler is Lightning's default, which records nothing (:func:`hooks.quiet_profiler`):
  with a profiler that records, every hook is timed as Lightning times it.

:func:`use_lean_step` installs it on a trainer's fit loop for a run (by class, so the loop's state,
restored from a checkpoint or saved in one, is the same object); :func:`restore_step` undoes it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional

import lightning as L
import torch

from .hooks import does_nothing

try:  # Lightning's private loop classes: where they move, Lightning's own step runs
    from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult, _AutomaticOptimization
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import Strategy
    from torch.optim.optimizer import _global_optimizer_pre_hooks
except ImportError:  # pragma: no cover - depends on the installed Lightning
    _AutomaticOptimization = None


def _lightning_default(module: Any, name: str) -> bool:
    return getattr(type(module), name, None) is getattr(L.LightningModule, name, None)


def _empty_module_hook(module: Any, name: str) -> bool:
    """The module's ``name`` hook is an empty method (Lightning's or an empty override)."""
    if name in vars(module):
        return False
    return does_nothing(getattr(type(module), name, None))


class _Plan:
    """What a run's steps may skip, decided at its first step."""

    __slots__ = ("optimizer", "module", "zero_grad_hook", "before_zero_grad", "before_optimizer_step", "clip_hook")

    def __init__(self, optimizer: torch.optim.Optimizer, module: Any) -> None:
        self.optimizer = optimizer
        self.module = module
        self.zero_grad_hook = not _lightning_default(module, "optimizer_zero_grad")
        self.before_zero_grad = not _empty_module_hook(module, "on_before_zero_grad")
        self.before_optimizer_step = not _empty_module_hook(module, "on_before_optimizer_step")
        self.clip_hook = not _lightning_default(module, "configure_gradient_clipping")


def lean_step_possible(trainer: Any, optimizer: Any) -> Optional[str]:
    """``None`` where :class:`LeanAutomaticOptimization` may take a step of ``trainer``'s run with
    ``optimizer``; otherwise why not (for tests and for anyone asking which step ran)."""
    module = trainer.lightning_module
    if _AutomaticOptimization is None:
        return "this Lightning's loop classes are not where they were"
    if not getattr(module, "lean_optimization_step", False):
        return "the module does not ask for it (lean_optimization_step)"
    if not module.automatic_optimization:
        return "manual optimization"
    if len(trainer.optimizers) != 1 or optimizer is not trainer.optimizers[0]:
        return "more than one optimizer"
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim") or issubclass(cls, torch.optim.LBFGS):
        return f"the optimizer {cls.__name__} may call the closure itself"
    if trainer.accumulate_grad_batches != 1:
        return "gradient accumulation"
    if not _lightning_default(module, "optimizer_step"):
        return "the module overrides optimizer_step"
    if type(trainer.strategy).optimizer_step is not Strategy.optimizer_step:
        return f"the strategy {type(trainer.strategy).__name__} has its own optimizer_step"
    precision = trainer.precision_plugin
    if type(precision).optimizer_step is not Precision.optimizer_step or type(precision)._wrap_closure is not Precision._wrap_closure:
        return f"the precision plugin {type(precision).__name__} has its own optimizer_step"
    if not getattr(trainer.profiler, "__dict__", {}).get("_fewshot_lightning_quiet"):
        return "a profiler that records every hook"
    return None


def _callbacks(trainer: Any, module: Any, name: str, *args: Any) -> None:
    """Lightning's ``_call_callback_hooks`` less its profiler context (the quiet profiler's)."""
    previous = module._current_fx_name
    module._current_fx_name = name
    for callback in trainer.callbacks:
        hook = getattr(callback, name)
        if callable(hook):
            hook(trainer, module, *args)
    module._current_fx_name = previous


def _module_hook(module: Any, name: str, *args: Any) -> Any:
    previous = module._current_fx_name
    module._current_fx_name = name
    output = getattr(module, name)(*args)
    module._current_fx_name = previous
    return output


if _AutomaticOptimization is not None:

    class LeanAutomaticOptimization(_AutomaticOptimization):
        """Lightning's automatic optimization, taking the step itself where nothing needs
        Lightning's layers around it (see the module's docstring)."""

        _plan: Optional[_Plan] = None

        def run(self, optimizer: torch.optim.Optimizer, batch_idx: int, kwargs: OrderedDict) -> Dict[str, Any]:
            trainer = self.trainer
            module = trainer.lightning_module
            plan = self._plan
            if plan is None or plan.optimizer is not optimizer or plan.module is not module:
                plan = self._plan = None
                if lean_step_possible(trainer, optimizer) is None:
                    plan = self._plan = _Plan(optimizer, module)
            # what may change during a run: stochastic weight averaging's _skip_backward, an accumulation
            # schedule, and optimizer step pre-hooks (which Lightning's step runs before the training step)
            if (plan is None or self._skip_backward or trainer.accumulate_grad_batches != 1
                    or optimizer._optimizer_step_pre_hooks or _global_optimizer_pre_hooks):
                return super().run(optimizer, batch_idx, kwargs)

            progress = self.optim_progress.optimizer
            strategy = trainer.strategy
            progress.step.increment_ready()
            with torch.enable_grad():  # as Lightning's closure
                previous = module._current_fx_name
                module._current_fx_name = "training_step"
                output = strategy.training_step(*kwargs.values())
                module._current_fx_name = previous
                strategy.post_training_step()
                if output is None and trainer.world_size > 1:  # as Lightning refuses it
                    raise RuntimeError("Skipping the `training_step` by returning None in distributed training is not supported.")
                result = ClosureResult.from_training_step_output(output, trainer.accumulate_grad_batches)
                if result.closure_loss is None:
                    Closure.warning_cache.warn("`training_step` returned `None`. If this was on purpose, ignore this warning...")

                progress.zero_grad.increment_ready()
                _callbacks(trainer, module, "on_before_zero_grad", optimizer)
                if plan.before_zero_grad:
                    _module_hook(module, "on_before_zero_grad", optimizer)
                progress.zero_grad.increment_started()
                if plan.zero_grad_hook:
                    _module_hook(module, "optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer)
                else:
                    optimizer.zero_grad()
                progress.zero_grad.increment_completed()

                if result.closure_loss is not None:
                    previous = module._current_fx_name
                    module._current_fx_name = "backward"
                    strategy.backward(result.closure_loss, optimizer)
                    module._current_fx_name = previous

                # the precision plugin's ``_after_closure``
                _callbacks(trainer, module, "on_before_optimizer_step", optimizer)
                if plan.before_optimizer_step:
                    _module_hook(module, "on_before_optimizer_step", optimizer)
                if plan.clip_hook or trainer.gradient_clip_val:
                    trainer.precision_plugin._clip_gradients(module, optimizer, trainer.gradient_clip_val,
                                                             trainer.gradient_clip_algorithm)
            optimizer.step()
            progress.step.increment_completed()
            if result.loss is None:
                return {}
            return result.asdict()

else:  # pragma: no cover
    LeanAutomaticOptimization = None


def use_lean_step(trainer: Any) -> bool:
    """Take the fit loop's automatic optimization steps with :class:`LeanAutomaticOptimization`
    (which falls back to Lightning's step wherever :func:`lean_step_possible` says no). Only a
    loop of Lightning's own class is changed. Returns whether it now is lean."""
    loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "automatic_optimization", None)
    if LeanAutomaticOptimization is None or loop is None:
        return False
    if type(loop) is _AutomaticOptimization:
        loop.__class__ = LeanAutomaticOptimization
    if type(loop) is LeanAutomaticOptimization:
        loop._plan = None
        return True
    return False


def restore_step(trainer: Any) -> None:
    """Undo :func:`use_lean_step`."""
    loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "automatic_optimization", None)
    if LeanAutomaticOptimization is not None and type(loop) is LeanAutomaticOptimization:
        loop.__dict__.pop("_plan", None)
        loop.__class__ = _AutomaticOptimization
