"""Lightning's training batch and optimization step, without its layers, where nothing needs them.

Around a learner's training step Lightning runs, at every batch, a dozen layers that on a
sinusoid MAML step (2 to 6 ms on a 2-core CPU) add up to a tenth or more of the step
(``benchmarks/speed.py --cases fit``): for the optimization step, a closure of three closures
(the training step, ``zero_grad``, ``backward``) handed through the module's ``optimizer_step``
hook, the ``LightningOptimizer`` wrapper, the strategy's and the precision plugin's
``optimizer_step`` and a further closure (``on_before_optimizer_step``, gradient clipping) to
the optimizer, which calls it, with calls of the module's empty ``on_before_*`` hooks and of
``configure_gradient_clipping``, which with no clipping set finds nothing to do after a dozen
calls; around it, for the batch, the three batch-transfer hooks, each looked up anew at every
batch between the module and the datamodule (``is_overridden``, twice), every hook called
through a profiler context whose name formats the callback's ``state_key``, and the training
step's signature read for ``batch_idx``.

:class:`LeanTrainingEpochLoop` (one batch) and :class:`LeanAutomaticOptimization` (its
optimization step) do the same things in the same order, with the same progress counters,
``_current_fx_name`` set wherever Lightning sets it (``self.log`` checks it), and the logger
connector's calls unchanged: the batch-transfer hooks each called on the object Lightning chose
for it at the run's first batch; callback hooks as Lightning calls them, less the profiler
context (Lightning's default profiler records nothing); a module or strategy hook only where its
class overrides the empty one of Lightning's base class; the training step (in the strategy's
and precision plugin's context), ``on_before_zero_grad``, the module's ``optimizer_zero_grad``
(or ``optimizer.zero_grad()`` where that hook is Lightning's), the backward pass
(``on_before_backward``, the module's ``backward``, ``on_after_backward``: called here where the
strategy's ``backward`` and the precision plugin's three steps of it are the base ones, through
the strategy otherwise, e.g. under mixed precision, whose plugin scales the loss there),
``on_before_optimizer_step``, gradient clipping where it is set or its hook overridden, then
``optimizer.step()``. The result is Lightning's, bit for bit: the hooks and what they see, the
weights, the optimizer's state, the loop's state in a checkpoint, the logged metrics
(``tests/test_lean_loop.py``).

They take a batch or a step only where nothing relies on the layers left out; anywhere else
Lightning's own runs. First, Lightning's code must be one the lean loop was checked against
(:data:`VERIFIED_LIGHTNING`: a hash of the source of every Lightning function whose work it
does or whose behaviour it relies on); any other version runs its own loop. Checked at every
batch, as it may change during a run: a loop restarting
from a checkpoint (its first batch), gradient accumulation, ``_skip_backward`` (stochastic
weight averaging), optimizer step pre-hooks (Lightning's step runs them before the training
step, as the optimizer calls the closure). Checked once a run:

- the module asks for it (``MetaLearner.lean_loop``, true by default);
- the profiler is Lightning's default, quieted (:func:`hooks.quiet_profiler`): with a profiler
  that records, every hook is timed as Lightning times it;
- one device, no process group (DDP's batches and steps run as Lightning runs them);
- for the batch: a plain data fetcher (not ``dataloader_iter`` steps), the strategy's
  ``batch_to_device`` and the module's batch-transfer plumbing are Lightning's base ones;
- for the step: one optimizer, from ``torch.optim`` and not ``LBFGS`` (an optimizer that calls
  the closure itself, e.g. a user's SAM, needs Lightning's); the module's ``optimizer_step`` is
  Lightning's (a learning-rate warm-up written there runs); the strategy's and the precision
  plugin's ``optimizer_step`` are the base ones (32- and 64-bit precision; mixed precision's
  loss scaling and any plugin that overrides them run as Lightning runs them).

:func:`use_lean_loop` installs both on a trainer's fit loop for a run, by class, so that the
loops' state, restored from a checkpoint or saved in one, stays the same objects;
:func:`restore_loop` undoes it.
"""
from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict
from typing import Any, Dict, Optional

import lightning as L
import torch

from .hooks import does_nothing

try:  # Lightning's private loop classes: where they move, Lightning's own loop runs
    from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
    from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult, _AutomaticOptimization
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import Strategy
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection, _ResultMetric
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
    from torch.optim.optimizer import _global_optimizer_pre_hooks
except ImportError:  # pragma: no cover - depends on the installed Lightning
    _AutomaticOptimization = _TrainingEpochLoop = None

#: The batch-transfer hooks, in the order Lightning calls them.
TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")

#: Fingerprints (:func:`lightning_fingerprint`) of the Lightning code whose behaviour the lean loop
#: reproduces, each checked by tests/test_lean_loop.py; with any other, Lightning's loop runs.
VERIFIED_LIGHTNING = {"6d4b61fe32c31e84": "lightning 2.6.6", "fdf009d93b51ebcb": "lightning 2.5.6"}

_FINGERPRINT: list = []


def _reproduced_code() -> list:
    """Lightning's functions whose work the lean loop does itself, or whose behaviour it relies on."""
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.trainer import call

    steps = _AutomaticOptimization
    return [
        _TrainingEpochLoop.advance, _TrainingEpochLoop._build_kwargs, steps.run, steps._make_closure,
        steps._make_zero_grad_fn, steps._make_backward_fn, steps._optimizer_step, steps._on_before_zero_grad,
        steps._optimizer_zero_grad, steps._training_step, Closure.closure, Precision.optimizer_step,
        Precision._wrap_closure, Precision._after_closure, Precision.pre_backward, Precision.backward,
        Precision.post_backward, Strategy.optimizer_step, Strategy.batch_to_device, Strategy.backward,
        Strategy.pre_backward, Strategy.post_backward, ClosureResult.from_training_step_output,
        ClosureResult.__post_init__, ClosureResult._clone_loss, L.LightningModule.backward,
        L.LightningModule._apply_batch_transfer_handler, L.LightningModule._on_before_batch_transfer,
        L.LightningModule._call_batch_hook, L.LightningModule.optimizer_step, L.LightningModule.optimizer_zero_grad,
        LightningOptimizer.step, call._call_callback_hooks, call._call_lightning_module_hook,
        call._call_strategy_hook, call._call_lightning_datamodule_hook,
        # what the logger connector's ``on_batch_end`` writes, and what changes it (``_batch_end``)
        _LoggerConnector.on_batch_end, _LoggerConnector.metrics.fget, _LoggerConnector.reset_metrics,
        _ResultCollection.metrics, _ResultCollection.valid_items, _ResultCollection._get_cache,
        _ResultCollection._forked_name, _ResultCollection.log, _ResultCollection.update_metrics,
        _ResultCollection.reset, _ResultMetric.update, _ResultMetric.reset,
    ]


def lightning_fingerprint() -> Optional[str]:
    """A hash of the source of the Lightning functions the lean loop reproduces (``None`` where
    it cannot be read): a Lightning whose loop code differs in any way from a verified one, even a
    comment, runs its own loop, as the lean loop would not know what changed."""
    if not _FINGERPRINT:
        try:
            digest = hashlib.sha256()
            for function in _reproduced_code():
                digest.update(inspect.getsource(function).encode())
            _FINGERPRINT.append(digest.hexdigest()[:16])
        except (OSError, TypeError, AttributeError, ImportError):
            _FINGERPRINT.append(None)
    return _FINGERPRINT[0]


def _lightnings(obj: Any, name: str, base: type) -> bool:
    """``obj``'s class takes ``name`` from ``base`` unchanged, and the instance does not shadow it."""
    return name not in getattr(obj, "__dict__", {}) and getattr(type(obj), name, None) is getattr(base, name, None)


def _empty_hook(obj: Any, name: str) -> bool:
    """``obj``'s ``name`` hook is an empty method of its class (Lightning's, or an empty override)."""
    if name in getattr(obj, "__dict__", {}):
        return False
    return does_nothing(getattr(type(obj), name, None))


def _run_wide_reason(trainer: Any) -> Optional[str]:
    module = trainer.lightning_module
    if _AutomaticOptimization is None:
        return "this Lightning's loop classes are not where they were"
    if not getattr(module, "lean_loop", False):
        return "the module does not ask for it (lean_loop)"
    if lightning_fingerprint() not in VERIFIED_LIGHTNING:
        return f"Lightning {L.__version__}'s loop code is not one the lean loop was checked against"
    if not getattr(trainer.profiler, "__dict__", {}).get("_fewshot_lightning_quiet"):
        return "a profiler that records every hook"
    if trainer.world_size > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return "more than one process"
    return None


def lean_step_possible(trainer: Any, optimizer: Any) -> Optional[str]:
    """``None`` where :class:`LeanAutomaticOptimization` may take a step of ``trainer``'s run with
    ``optimizer``; otherwise why not (for tests, and for anyone asking which step runs)."""
    reason = _run_wide_reason(trainer)
    if reason:
        return reason
    module = trainer.lightning_module
    if not module.automatic_optimization:
        return "manual optimization"
    if len(trainer.optimizers) != 1 or optimizer is not trainer.optimizers[0]:
        return "more than one optimizer"
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim") or issubclass(cls, torch.optim.LBFGS):
        return f"the optimizer {cls.__name__} may call the closure itself"
    if trainer.accumulate_grad_batches != 1:
        return "gradient accumulation"
    if not _lightnings(module, "optimizer_step", L.LightningModule):
        return "the module overrides optimizer_step"
    if not _lightnings(trainer.strategy, "optimizer_step", Strategy):
        return f"the strategy {type(trainer.strategy).__name__} has its own optimizer_step"
    precision = trainer.precision_plugin
    if not (_lightnings(precision, "optimizer_step", Precision) and _lightnings(precision, "_wrap_closure", Precision)):
        return f"the precision plugin {type(precision).__name__} has its own optimizer_step"
    return None


def lean_batch_possible(trainer: Any, data_fetcher: Any = None) -> Optional[str]:
    """``None`` where :class:`LeanTrainingEpochLoop` may run a batch of ``trainer``'s run;
    otherwise why not."""
    reason = _run_wide_reason(trainer)
    if reason:
        return reason
    if isinstance(data_fetcher, _DataLoaderIterDataFetcher):
        return "a training step that takes the dataloader iterator"
    if not _lightnings(trainer.strategy, "batch_to_device", Strategy):
        return f"the strategy {type(trainer.strategy).__name__} has its own batch_to_device"
    module = trainer.lightning_module
    for name in ("_on_before_batch_transfer", "_apply_batch_transfer_handler", "_call_batch_hook"):
        if not _lightnings(module, name, L.LightningModule):
            return f"the module overrides {name}"
    if getattr(trainer._data_connector, "_datahook_selector", None) is None:
        return "no data hook selector"
    return None


#: The callback hooks the lean batch and step call.
_LEAN_HOOKS = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
               "on_before_optimizer_step", "on_train_batch_end")


def _hook_lists(trainer: Any) -> Dict[str, tuple]:
    """For each of :data:`_LEAN_HOOKS`, the callbacks' bound hooks Lightning would call, in its
    order (the callable ones: not those :func:`hooks.hide_idle_hooks` hid for the run), and under
    ``"callbacks"`` the list they were read from."""
    lists: Dict[str, tuple] = {"callbacks": (trainer.callbacks, len(trainer.callbacks))}
    for name in _LEAN_HOOKS:
        lists[name] = tuple(hook for hook in (getattr(callback, name) for callback in trainer.callbacks) if callable(hook))
    return lists


def _callbacks(trainer: Any, module: Any, hooks: Dict[str, tuple], name: str, *args: Any) -> None:
    """Lightning's ``_call_callback_hooks`` less its profiler context (the quiet profiler's):
    the callbacks' ``name`` hooks from ``hooks`` (:func:`_hook_lists`, read at the run's first
    batch or step, and again wherever the list is another or of another length); a callback
    appended to the list meanwhile is called too, as Lightning's loop over the list would (one
    removed during a step is still called in that step; a hook set on a callback during the run
    is not seen)."""
    previous = module._current_fx_name
    module._current_fx_name = name
    for hook in hooks[name]:
        hook(trainer, module, *args)
    callbacks, count = hooks["callbacks"]
    if len(callbacks) != count:  # appended to since it was read: Lightning's loop over the list sees them
        for callback in callbacks[count:]:
            hook = getattr(callback, name)
            if callable(hook):
                hook(trainer, module, *args)
    module._current_fx_name = previous


def _current_hooks(plan: Any, trainer: Any) -> Dict[str, tuple]:
    """``plan.hooks``, read again where the trainer's callbacks list changed since."""
    callbacks, count = plan.hooks["callbacks"]
    if callbacks is not trainer.callbacks or count != len(callbacks):
        plan.hooks = _hook_lists(trainer)
    return plan.hooks


def _named(module: Any, name: str, function: Any, *args: Any) -> Any:
    """``function(*args)`` with the module's ``_current_fx_name`` set to ``name`` meanwhile, as
    Lightning's ``_call_*`` helpers set it (``self.log`` checks it)."""
    previous = module._current_fx_name
    module._current_fx_name = name
    output = function(*args)
    module._current_fx_name = previous
    return output


def _module_hook(module: Any, name: str, *args: Any) -> Any:
    """Lightning's ``_call_lightning_module_hook`` less its profiler context."""
    return _named(module, name, getattr(module, name), *args)


def _backward(trainer: Any, module: Any, plan: "_StepPlan", loss: torch.Tensor, hooks: Dict[str, tuple]) -> None:
    """The base strategy's ``backward`` with the base precision plugin's: ``on_before_backward``,
    the module's ``backward``, ``on_after_backward`` (the hooks less their profiler context, the
    module's only where overridden)."""
    _callbacks(trainer, module, hooks, "on_before_backward", loss)
    if plan.before_backward:
        _module_hook(module, "on_before_backward", loss)
    module.backward(loss)
    _callbacks(trainer, module, hooks, "on_after_backward")
    if plan.after_backward:
        _module_hook(module, "on_after_backward")


def _decided(loop: Any, possible: Any, plan_class: type, trainer: Any, subject: Any) -> Any:
    """``loop``'s plan (``plan_class(trainer, subject)``) where ``possible(trainer, subject)``
    says yes, else ``None``: decided once for the run's module and ``subject`` (its optimizer, its
    data fetcher), a "no" too, and kept on the loop as ``(what it was decided for, the plan)``."""
    key = (id(trainer.lightning_module), id(subject))
    held = loop._plan
    if held is None or held[0] != key:
        held = loop._plan = (key, plan_class(trainer, subject) if possible(trainer, subject) is None else None)
    return held[1]


class _StepPlan:
    """What a run's optimization steps may skip, decided at its first step."""

    __slots__ = ("zero_grad_hook", "before_zero_grad", "before_optimizer_step", "clip_hook",
                 "plain_backward", "before_backward", "after_backward", "hooks")

    def __init__(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
        module = trainer.lightning_module
        self.zero_grad_hook = not _lightnings(module, "optimizer_zero_grad", L.LightningModule)
        self.before_zero_grad = not _empty_hook(module, "on_before_zero_grad")
        self.before_optimizer_step = not _empty_hook(module, "on_before_optimizer_step")
        self.clip_hook = not _lightnings(module, "configure_gradient_clipping", L.LightningModule)
        # the strategy's ``backward`` and the precision plugin's three steps of it are the base
        # ones: the hooks and the module's ``backward`` are called here, without their layers
        strategy, precision = trainer.strategy, trainer.precision_plugin
        self.plain_backward = (all(_lightnings(strategy, name, Strategy) for name in ("backward", "pre_backward", "post_backward"))
                               and all(_lightnings(precision, name, Precision)
                                       for name in ("pre_backward", "backward", "post_backward")))
        self.before_backward = not _empty_hook(module, "on_before_backward")
        self.after_backward = not _empty_hook(module, "on_after_backward")
        self.hooks = _hook_lists(trainer)


class _BatchPlan:
    """What a run's batches may skip, decided at its first batch: which object serves each
    batch-transfer hook (Lightning's choice, with its warnings), which hooks do anything, and
    whether the training step takes ``batch_idx``."""

    __slots__ = ("transfer", "module_start", "module_end", "strategy_start", "takes_batch_idx", "hooks", "logged")

    def __init__(self, trainer: Any, data_fetcher: Any) -> None:
        module = trainer.lightning_module
        selector = trainer._data_connector._datahook_selector
        self.transfer = []
        for name in TRANSFER_HOOKS:
            owner = selector.get_instance(name)
            self.transfer.append((owner, owner is module, name))
        self.module_start = not _empty_hook(module, "on_train_batch_start")
        self.module_end = not _empty_hook(module, "on_train_batch_end")
        self.strategy_start = not _empty_hook(trainer.strategy, "on_train_batch_start")
        self.takes_batch_idx = is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)
        self.hooks = _hook_lists(trainer)
        self.logged: Optional[tuple] = None  # what the logger connector last wrote (_batch_end)


def _batch_end(trainer: Any, plan: _BatchPlan) -> None:
    """The logger connector's ``on_batch_end``, which rebuilds the logged metrics from the
    results at every batch (the progress bar's made numbers, an ``.item()`` each) and updates its
    three dicts with them (70 to 110 us a sinusoid step on a 2-core CPU, by an ad hoc timing inside
    ``fit``), though the training step logs on one step in 50 (``MetaLearner.training_metrics_read``). Its work is skipped where it
    would write what the dicts hold already: the same results, every metric in them the same
    object with the same cached step value (a ``self.log`` replaces it) and not reset since it
    last ran, the same three dicts, and every entry it wrote then still in its dict, the same
    object (one the progress bar or a callback read anew since, or validation overwrote, makes it
    run). What is left of it, dropping the batch from the results, is done either way."""
    connector = trainer._logger_connector
    results = trainer._results
    memo = plan.logged
    if (memo is not None and memo[0] is results and results.dataloader_idx is None
            and memo[1] is connector._progress_bar_metrics and memo[2] is connector._callback_metrics
            and memo[3] is connector._logged_metrics and len(memo[4]) == len(results)
            and all(metric is held[0] and metric._forward_cache is held[1] and metric.has_reset is held[2]
                    for metric, held in zip(results.values(), memo[4]))
            and all(into.get(key) is value for into, key, value in memo[5])):
        results.batch = None
        results.batch_size = None
        return
    connector.on_batch_end()
    plan.logged = None
    if type(connector) is _LoggerConnector and type(results) is _ResultCollection and results.dataloader_idx is None:
        written = connector.metrics  # what it wrote: on a step, the metrics' cached values again
        dicts = (connector._progress_bar_metrics, connector._callback_metrics, connector._logged_metrics)
        entries = [(into, key, into[key]) for into, part in zip(dicts, (written["pbar"], written["callback"], written["log"]))
                   for key in part]
        plan.logged = (results, *dicts, [(metric, metric._forward_cache, metric.has_reset) for metric in results.values()],
                       entries)


if _AutomaticOptimization is not None:

    class LeanAutomaticOptimization(_AutomaticOptimization):
        """Lightning's automatic optimization, taking the step itself where nothing needs
        Lightning's layers around it (see the module's docstring)."""

        _plan: Optional[tuple] = None  # (what it was decided for, the plan or None)

        def run(self, optimizer: torch.optim.Optimizer, batch_idx: int, kwargs: OrderedDict) -> Dict[str, Any]:
            trainer = self.trainer
            module = trainer.lightning_module
            plan = _decided(self, lean_step_possible, _StepPlan, trainer, optimizer)
            if (plan is None or self._skip_backward or trainer.accumulate_grad_batches != 1
                    or optimizer._optimizer_step_pre_hooks or _global_optimizer_pre_hooks):
                return super().run(optimizer, batch_idx, kwargs)

            progress = self.optim_progress.optimizer
            strategy = trainer.strategy
            hooks = _current_hooks(plan, trainer)
            progress.step.increment_ready()
            with torch.enable_grad():  # as Lightning's closure
                output = _named(module, "training_step", strategy.training_step, *kwargs.values())
                strategy.post_training_step()
                if isinstance(output, torch.Tensor):  # what ``from_training_step_output`` makes of it, less its
                    result = ClosureResult(output)     # division by the accumulation, here 1 (exact either way)
                else:
                    result = ClosureResult.from_training_step_output(output, trainer.accumulate_grad_batches)
                if result.closure_loss is None:
                    Closure.warning_cache.warn("`training_step` returned `None`. If this was on purpose, ignore this warning...")

                progress.zero_grad.increment_ready()
                _callbacks(trainer, module, hooks, "on_before_zero_grad", optimizer)
                if plan.before_zero_grad:
                    _module_hook(module, "on_before_zero_grad", optimizer)
                progress.zero_grad.increment_started()
                if plan.zero_grad_hook:
                    _module_hook(module, "optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer)
                else:
                    optimizer.zero_grad()
                progress.zero_grad.increment_completed()

                if result.closure_loss is not None:
                    if plan.plain_backward:
                        _named(module, "backward", _backward, trainer, module, plan, result.closure_loss, hooks)
                    else:
                        _named(module, "backward", strategy.backward, result.closure_loss, optimizer)

                # the precision plugin's ``_after_closure``
                _callbacks(trainer, module, hooks, "on_before_optimizer_step", optimizer)
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

    class LeanTrainingEpochLoop(_TrainingEpochLoop):
        """Lightning's training epoch loop, running a batch itself where nothing needs
        Lightning's layers around it (see the module's docstring)."""

        _plan: Optional[tuple] = None

        def advance(self, data_fetcher: Any) -> None:
            trainer = self.trainer
            module = trainer.lightning_module
            plan = _decided(self, lean_batch_possible, _BatchPlan, trainer, data_fetcher)
            if plan is None or self.restarting or not module.automatic_optimization:
                return super().advance(data_fetcher)

            self.val_loop.restarting = False
            hooks = _current_hooks(plan, trainer)
            batch, _, __ = next(data_fetcher)
            batch_idx = self.batch_idx + 1
            self.batch_progress.is_last_batch = data_fetcher.done

            batch = trainer.precision_plugin.convert_input(batch)
            device = trainer.strategy.root_device
            for owner, on_module, name in plan.transfer:
                args = (batch, device, 0) if name == "transfer_batch_to_device" else (batch, 0)
                if on_module:
                    batch = _module_hook(module, name, *args)
                elif name == "on_before_batch_transfer":
                    batch = owner.on_before_batch_transfer(*args)
                else:  # the datamodule's last two run inside the strategy's batch_to_device hook
                    batch = _named(module, "batch_to_device", getattr(owner, name), *args)

            self.batch_progress.increment_ready()
            trainer._logger_connector.on_batch_start(batch)

            output: Any = None
            skip_rest_of_epoch = False
            if batch is None:
                self._warning_cache.warn("train_dataloader yielded None. If this was on purpose, ignore this warning...")
            else:
                _callbacks(trainer, module, hooks, "on_train_batch_start", batch, batch_idx)
                response = _module_hook(module, "on_train_batch_start", batch, batch_idx) if plan.module_start else None
                if plan.strategy_start:
                    _named(module, "on_train_batch_start", trainer.strategy.on_train_batch_start, batch, batch_idx)
                skip_rest_of_epoch = response == -1
                if skip_rest_of_epoch:
                    self.batch_progress.increment_by(0, is_last_batch=True)
                else:
                    self.batch_progress.increment_started()
                    kwargs = OrderedDict(batch=batch, batch_idx=batch_idx) if plan.takes_batch_idx else OrderedDict(batch=batch)
                    output = self.automatic_optimization.run(trainer.optimizers[0], batch_idx, kwargs)

            self.batch_progress.increment_processed()
            self.update_lr_schedulers("step", update_plateau_schedulers=False)
            if self._num_ready_batches_reached():
                self.update_lr_schedulers("epoch", update_plateau_schedulers=False)
            if skip_rest_of_epoch:
                raise StopIteration

            _callbacks(trainer, module, hooks, "on_train_batch_end", output, batch, batch_idx)
            if plan.module_end:
                _module_hook(module, "on_train_batch_end", output, batch, batch_idx)
            _batch_end(trainer, plan)
            self.batch_progress.increment_completed()
            trainer._logger_connector.update_train_step_metrics()

else:  # pragma: no cover
    LeanAutomaticOptimization = LeanTrainingEpochLoop = None


def _loops(trainer: Any) -> tuple:
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return epoch_loop, getattr(epoch_loop, "automatic_optimization", None)


def use_lean_loop(trainer: Any) -> bool:
    """Run the fit loop's batches with :class:`LeanTrainingEpochLoop` and its optimization steps
    with :class:`LeanAutomaticOptimization`, each falling back to Lightning's own wherever
    :func:`lean_batch_possible` / :func:`lean_step_possible` say no. Only loops of Lightning's own
    classes are changed. Returns whether both now are lean."""
    if LeanAutomaticOptimization is None:
        return False
    epoch_loop, step_loop = _loops(trainer)
    for loop, lightnings, lean in ((epoch_loop, _TrainingEpochLoop, LeanTrainingEpochLoop),
                                   (step_loop, _AutomaticOptimization, LeanAutomaticOptimization)):
        if type(loop) is lightnings:
            loop.__class__ = lean
        if type(loop) is lean:
            loop._plan = None
    return type(epoch_loop) is LeanTrainingEpochLoop and type(step_loop) is LeanAutomaticOptimization


def restore_loop(trainer: Any) -> None:
    """Undo :func:`use_lean_loop`."""
    if LeanAutomaticOptimization is None:
        return
    for loop, lightnings, lean in zip(_loops(trainer), (_TrainingEpochLoop, _AutomaticOptimization),
                                      (LeanTrainingEpochLoop, LeanAutomaticOptimization)):
        if type(loop) is lean:
            loop.__dict__.pop("_plan", None)
            loop.__class__ = lightnings
