"""The functional inner loop: small pure functions over a batch of tasks.

Every tensor of per-task state carries a leading task dimension ``B``. Nothing here keeps
state between calls or reads a global mode: every choice is an argument.

- :func:`task_params` gives each of ``B`` tasks its own copy of some parameters (an
  ``expand`` view: no memory, and gradients flow back to the originals).
- :func:`functional` turns an ``nn.Module`` into ``forward(params, x)``: the module's outputs
  for every task under that task's parameters, batched with :func:`torch.func.vmap` or as a
  Python loop (``batching``). Parameters the module does not own (CAVIA's context) can be
  passed to its ``forward`` as keyword arguments.
- :func:`adapt` returns the parameters of every task after ``steps`` gradient steps on its
  support loss; :func:`trajectory` yields them after 0, 1, ..., ``steps`` steps (an adaptation
  curve is a loop over it in the caller). Second order or first order, differentiable or not,
  plain gradient descent or Adam, full support set or mini-batches, with an extra term that
  sees the parameters (iMAML's proximal term): all arguments.

One ``torch.autograd.grad`` of the *summed* task losses gives every task's gradient at once:
tasks share no parameters after :func:`task_params`, so the sum separates. That is cheaper
than nesting ``torch.func.grad`` inside ``vmap``, which batches the backward pass op by op as
well; ``benchmarks/maml_step_time.py`` measures the result against learn2learn.

Example, a MAML training step written from these pieces::

    forward = functional(backbone)
    theta = dict(backbone.named_parameters())
    params = adapt(forward, task_params(theta, batch.num_tasks), batch.support_x, batch.support_y,
                   per_task_loss, steps=1, lr=0.4)
    loss = per_task_loss(forward(params, batch.query_x), batch.query_y).mean()
    loss.backward()   # the meta-gradient, through the inner step
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ._text import listed
from .models.blocks import differentiated_twice, keep_layout

Params = Dict[str, Tensor]
#: ``forward(params, x)``: per-task parameters ``[B, ...]`` and inputs ``[B, M, ...]`` to outputs ``[B, M, ...]``.
Forward = Callable[[Params, Tensor], Tensor]
#: ``loss_fn(outputs, targets)``: ``[B, M, ...]`` outputs to per-task losses ``[B]``.
LossFn = Callable[[Tensor, Tensor], Tensor]
#: A step size: one number for every parameter and step, or ``lr(step, name)``.
StepSize = Union[float, Tensor, Callable[[int, str], Union[float, Tensor]]]
BATCHING = ("vmap", "loop")
#: Layouts of the per-task convolution weights under the loop: ``"contiguous"`` (the tensors as
#: given) or ``"channels_last"`` (every 4-D weight restrided NHWC, so convolutions, batch norm and
#: pooling run channels-last).
MEMORY_FORMATS = ("contiguous", "channels_last")


def task_params(params: Mapping[str, Tensor], tasks: int, detach: bool = False) -> Params:
    """Each parameter repeated for ``tasks`` tasks along a new leading dimension.

    An ``expand`` view, so nothing is copied and the gradient of a loss with respect to the
    originals sums over tasks. ``detach=True`` cuts them from the originals (evaluation, or an
    algorithm that needs only the values).
    """
    return {name: (p.detach() if detach else p).unsqueeze(0).expand(tasks, *p.shape) for name, p in params.items()}


def functional(
    module: nn.Module,
    fixed: Optional[Mapping[str, Tensor]] = None,
    buffers: Optional[Mapping[str, Tensor]] = None,
    batching: str = "vmap",
    keyword_params: Sequence[str] = (),
    memory_format: str = "contiguous",
) -> Forward:
    """``forward(params, x)``: ``module`` run on every task's inputs with that task's parameters.

    Args:
        module: the network; its parameters are never modified (they are replaced for the call
            by :func:`call_with`, which also takes a layer registered under two names and
            weights tied across layers). Its buffers are the module's own unless ``buffers``
            says otherwise: in training mode, batch norm with running statistics updates them
            (``"loop"``: each task and step moves them, as in MAML's reference code).
        fixed: parameters shared by all tasks (no task dimension), e.g. the ones not adapted.
            Parameters in neither ``params`` nor ``fixed`` keep the module's own values.
        buffers: buffers to use (default: the module's own).
        batching: ``"vmap"`` runs all tasks as one batched computation: the module's own
            ``forward_tasks(params, x)`` if it has one (a forward written for a batch of tasks,
            as :class:`~fewshot_lightning.models.MLP` and :class:`~fewshot_lightning.models.Conv4`
            have: the per-task parameters with a leading task dimension, the shared ones as the
            module holds them), otherwise :func:`torch.func.vmap` of its ``forward`` (an
            activation that an ``nn.Sequential`` follows with max pooling then gets its input
            tasks-first, see :class:`tasks_first_into`). ``"loop"`` runs the tasks one by one (for modules vmap cannot run, such as batch norm updating running
            statistics). All give the same numbers.
        keyword_params: names in ``params`` that are not module parameters but keyword
            arguments of ``module.forward`` (a per-task context vector, as in CAVIA).
        memory_format: ``"channels_last"`` (loop only) passes every 4-D tensor (convolution
            weights) to the module in the channels-last layout, a differentiable copy made
            each call unless it is already so strided; convolutions then answer channels-last
            and batch norm and pooling follow. Same numbers to rounding; faster or slower
            depending on the model and device (on a 2-core CPU, Conv4 MAML on 28x28 grey
            images ran about 1.25x as fast as the NCHW loop, ``benchmarks/speed.py``).
            ``"contiguous"`` (default) leaves the tensors as they are and runs every layer
            channels-first: the loop runs inside
            :func:`~fewshot_lightning.models.blocks.keep_layout`, so a
            :class:`~fewshot_lightning.models.blocks.ConvBlock` does not switch a lone task to
            channels-last (which made a second-order step on 84x84 colour images about twice
            as slow).
    """
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}.")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}.")
    if memory_format == "channels_last" and batching != "loop":
        raise ValueError(
            "memory_format='channels_last' applies to batching='loop' (vmap runs the tasks' convolutions as one "
            "grouped convolution, channels-first): pass batching='loop', or memory_format='contiguous'."
        )
    shared = dict(fixed or {})
    shared.update(dict(module.named_buffers()) if buffers is None else buffers)
    keywords = frozenset(keyword_params)
    tied = tied_names(module)

    def call(common: Params, params: Params, x: Tensor) -> Tensor:
        weights = {name: value for name, value in params.items() if name not in keywords}
        kwargs = {name: params[name] for name in keywords}
        return call_with(module, {**common, **weights}, (x,), kwargs, tied)

    def one_task(params: Params, x: Tensor) -> Tensor:
        return call(shared, params, x)

    if batching == "vmap":
        forward_tasks = getattr(module, "forward_tasks", None)
        if forward_tasks is not None and not keywords and not dict(module.named_buffers()) \
                and _defined_together(type(module), "forward", "forward_tasks") and _runs_as_built(module):
            rest = {n: p for n, p in module.named_parameters() if n not in shared}

            def batched(params: Params, x: Tensor) -> Tensor:
                _check_tasks(params, x)
                # Shared parameters go in as the module holds them, without a task dimension.
                others = {n: p for n, p in rest.items() if n not in params}
                return forward_tasks({**shared, **others, **params}, x)

            return batched
        vmapped = _named_vmap_failures(vmap(one_task, in_dims=(0, 0), randomness="different"), module)
        before_pooling = activations_before_max_pooling(module)

        def task_first(params: Params, x: Tensor) -> Tensor:
            _check_tasks(params, x)
            if not before_pooling:
                return vmapped(params, x)
            with tasks_first_into(before_pooling):
                return vmapped(params, x)

        return task_first

    # Tasks are taken apart with unbind, not indexing: the gradient of an unbind is one stack of
    # the tasks' gradients, where indexing makes a zero tensor of all tasks' size per task.
    def looped(params: Params, x: Tensor) -> Tensor:
        _check_tasks(params, x)
        per_task = {name: p.unbind(0) for name, p in params.items()}
        with keep_layout():
            return _stacked([
                one_task({name: values[i] for name, values in per_task.items()}, inputs)
                for i, inputs in enumerate(x.unbind(0))
            ])

    if memory_format == "contiguous":
        return looped

    def looped_channels_last(params: Params, x: Tensor) -> Tensor:
        _check_tasks(params, x)
        common = {name: channels_last(p) for name, p in shared.items()}
        per_task = {name: p.unbind(0) for name, p in params.items()}
        return _stacked([
            call(common, {name: channels_last(values[i]) for name, values in per_task.items()}, inputs)
            for i, inputs in enumerate(x.unbind(0))
        ])

    return looped_channels_last


def _check_tasks(params: Params, x: Tensor) -> None:
    """Stop where ``x`` is not ``[tasks, samples, ...]`` for the per-task ``params`` (one sample
    set passed without its task dimension): named here, not as a failed expand inside a layer."""
    first = next(iter(params.items()), None)
    if first is None or not isinstance(x, Tensor):
        return
    name, value = first
    if x.dim() == 0 or value.dim() == 0 or x.shape[0] != value.shape[0]:
        raise ValueError(
            f"forward(params, x) takes x as [tasks, samples, ...] for per-task params ({name} is "
            f"{list(value.shape)}: {value.shape[0] if value.dim() else '?'} tasks), but x is {list(x.shape)}. Add the "
            "task dimension (x.unsqueeze(0) for one task, with params for one task), or pass one set of samples per "
            "task.")


def tied_names(module: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """The parameters and buffers of ``module`` held by more than one of its layers (weights
    tied across layers, as ``self.decoder.weight = self.encoder.weight``): each of their names
    -> one name per layer holding it, for :func:`call_with`. Empty for most networks. A
    submodule registered under two names (``self.again = self.block``) is one layer holding
    its tensors, not a tie: its tensors are not listed."""
    holders: Dict[int, Dict[Tuple[int, str], str]] = {}
    names: Dict[int, list] = {}
    for prefix, layer in module.named_modules(remove_duplicate=False):
        for table in (layer._parameters, layer._buffers):
            for attribute, tensor in table.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{attribute}" if prefix else attribute
                holders.setdefault(id(tensor), {}).setdefault((id(layer), attribute), name)
                names.setdefault(id(tensor), []).append(name)
    return {name: tuple(held.values()) for key, held in holders.items() if len(held) > 1 for name in names[key]}


def call_with(module: nn.Module, tensors: Mapping[str, Optional[Tensor]], args: tuple,
              kwargs: Optional[Dict[str, object]] = None,
              tied: Optional[Mapping[str, Tuple[str, ...]]] = None) -> object:
    """``module(*args, **kwargs)`` with some of its parameters and buffers replaced by
    ``tensors`` for the call (:func:`torch.func.functional_call`, ``strict=False``); a tensor
    given under one name of a tied weight replaces it in every layer holding it (``tied``: from
    :func:`tied_names`).

    The ties are expanded here and the call made with ``tie_weights=False``: torch's own
    expansion (``tie_weights=True``, its default) lists a submodule registered under two names
    twice, swaps its tensors in twice and, restoring, puts the first swap's tensor back in place
    of the parameter: after the call the module holds one task's adapted tensor instead of its
    parameter, which the optimizer no longer reaches and a checkpoint saves
    (pytorch/pytorch#164759, open in torch 2.14)."""
    if tied:
        tensors = dict(tensors)
        for name in [name for name in tensors if name in tied]:
            for alias in tied[name]:
                tensors.setdefault(alias, tensors[name])
    return functional_call(module, tensors, args, kwargs, tie_weights=False, strict=False)


#: Element-wise activation modules: their backward keeps their input or output.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Tanh, nn.Sigmoid)
MAX_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
               nn.AdaptiveMaxPool3d)


def activations_before_max_pooling(module: nn.Module) -> Tuple[nn.Module, ...]:
    """The activation modules of ``module`` that an ``nn.Sequential`` follows directly with max
    pooling (a convolutional block's ``ReLU, MaxPool2d``)."""
    found = []
    for sequential in module.modules():
        if isinstance(sequential, nn.Sequential):
            children = list(sequential.children())
            found.extend(a for a, b in zip(children, children[1:])
                         if isinstance(a, ACTIVATIONS) and isinstance(b, MAX_POOLING))
    return tuple(found)


class tasks_first_into:
    """While open, the given modules make their input contiguous first: under
    :func:`torch.func.vmap` that lays the tasks out first in memory.

    A convolution under vmap answers with the task dimension second in memory (all tasks' maps
    are one grouped convolution's channels), and max pooling needs it first: it copies its
    input, and keeps the copy for its backward, while the activation before it keeps the
    original for its own, the same values twice, for every pooled layer, until the outer
    backward. The copy made before the activation instead is the one both keep (Conv4 with 32
    filters and no batch norm, 16 tasks: 310 MiB at peak against 299 for the loop;
    ``benchmarks/speed.py --tensor-memory``). Only the modules' input is affected; the hooks go
    when it closes, and the module is left as it was."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = modules
        self.handles: list = []

    def __enter__(self) -> "tasks_first_into":
        self.handles = [m.register_forward_pre_hook(_contiguous_input) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _contiguous_input(module: nn.Module, args: Tuple) -> Tuple:
    return (args[0].contiguous(), *args[1:])


def _named_vmap_failures(vmapped: Callable, module: nn.Module) -> Callable:
    """``vmapped``, whose failure on batch norm updating running statistics (functorch's "were
    not batched ... see the functorch website") also says what to do here."""
    def call(params: Params, x: Tensor) -> object:
        try:
            return vmapped(params, x)
        except RuntimeError as error:
            if "running_mean" not in str(error) and "running_var" not in str(error):
                raise
            raise RuntimeError(
                f"{type(module).__name__} has batch norm that updates running statistics in training mode, which "
                "vmap cannot batch over tasks: pass batching='loop' (the tasks one by one, each updating them), or "
                f"build the layers with track_running_stats=False. ({error})") from error

    return call


def _stacked(outputs: list) -> object:
    """The tasks' outputs stacked along a new first dimension: tensors, or tuples, lists and
    dicts of them (a policy's ``(mean, log_std)``), as vmap returns them."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if isinstance(first, dict):
        return {key: _stacked([output[key] for output in outputs]) for key in first}
    if isinstance(first, (tuple, list)):
        parts = [_stacked([output[i] for output in outputs]) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    raise TypeError(f"The module returned a {type(first).__name__}: functional() stacks tensors, and tuples, lists "
                    "and dicts of them, one per task.")


def _runs_as_built(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward_tasks`` computes what its ``forward`` does: it says so
    itself (``forward_tasks_supported()``: its layers are those it was written for), and no
    layer of it has hooks (``forward_tasks`` calls no layer's ``__call__``, so a hook that
    changes an output was skipped) or a parametrization (weight norm: the weights it reads are
    not the layer's parameters). Otherwise vmap runs its ``forward``."""
    supported = getattr(module, "forward_tasks_supported", None)
    if supported is not None and not supported():
        return False
    from torch.nn.modules import module as module_globals
    from torch.nn.utils import parametrize

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    return not any(layer._forward_hooks or layer._forward_pre_hooks or parametrize.is_parametrized(layer)
                   for layer in module.modules())


def _defined_together(cls: type, *names: str) -> bool:
    """Whether the methods ``names`` of ``cls`` come from the same class of its MRO: a subclass
    that overrides ``forward`` but not ``forward_tasks`` must not be run by the parent's
    ``forward_tasks``, which would compute the parent's function."""
    owners = {next(klass for klass in cls.__mro__ if name in vars(klass)) for name in names}
    return len(owners) == 1


def channels_last(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A 4-D ``tensor`` strided channels-last (NHWC), copied (differentiably) unless it already
    is; other tensors as they are. Unlike ``contiguous(memory_format=...)`` it also restrides a
    tensor with one input channel, which counts as contiguous in both layouts, yet whose strides
    decide the layout a convolution answers in (the first layer of a network on grey images)."""
    if tensor is None or tensor.dim() != 4:  # None: a buffer hidden for the call (batch norm's running averages)
        return tensor
    n, c, h, w = tensor.shape
    if tensor.stride() == (h * w * c, 1, w * c, c):
        return tensor
    return tensor.clone(memory_format=torch.channels_last)


def predict(
    module: nn.Module, params: Params, x: Tensor, fixed: Optional[Mapping[str, Tensor]] = None, batching: str = "vmap",
    memory_format: str = "contiguous",
) -> Tensor:
    """Outputs ``[B, M, ...]`` of ``module`` on ``x`` ``[B, M, ...]`` under per-task ``params``."""
    return functional(module, fixed, batching=batching, memory_format=memory_format)(params, x)


class GradientDescent:
    """The inner update ``p <- p - lr * g``: MAML's, and Reptile's SGD variant."""

    def init(self, params: Params) -> Tuple:
        return ()

    def update(self, step: int, params: Params, grads: Params, state: Tuple, lr: StepSize) -> Tuple[Params, Tuple]:
        return {name: p - rate(lr, step, name) * grads[name] for name, p in params.items()}, state


class Adam:
    """The Adam update (Kingma & Ba, 2015) for per-task parameters, as a pure function.

    Reptile's inner loop (Nichol, Achiam & Schulman, 2018) uses it with ``betas=(0, 0.999)``.
    The state (first and second moments, one per task) is returned, never stored.
    """

    def __init__(self, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if len(betas) != 2 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Adam betas must be two numbers in [0, 1), got {betas}.")
        if not eps > 0:
            raise ValueError(f"Adam eps must be positive, got {eps}.")
        self.betas, self.eps = tuple(betas), eps

    def init(self, params: Params) -> Tuple[Params, Params]:
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return zeros, dict(zeros)

    def update(
        self, step: int, params: Params, grads: Params, state: Tuple[Params, Params], lr: StepSize
    ) -> Tuple[Params, Tuple[Params, Params]]:
        beta1, beta2 = self.betas
        first, second = state
        first = {n: beta1 * first[n] + (1 - beta1) * g for n, g in grads.items()}
        second = {n: beta2 * second[n] + (1 - beta2) * g * g for n, g in grads.items()}
        correction1, correction2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
        updated = {
            n: p - rate(lr, step, n) * (first[n] / correction1) / ((second[n] / correction2).sqrt() + self.eps)
            for n, p in params.items()
        }
        return updated, (first, second)


InnerOptimizer = Union[GradientDescent, Adam]


def rate(lr: StepSize, step: int, name: str) -> Union[float, Tensor]:
    """The step size of parameter ``name`` at inner step ``step``."""
    return lr(step, name) if callable(lr) else lr


def trajectory(
    forward: Forward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    loss_fn: LossFn,
    steps: int,
    lr: StepSize,
    *,
    second_order: bool = True,
    differentiable: bool = True,
    penalty: Optional[Callable[[Params], Tensor]] = None,
    optimizer: Optional[InnerOptimizer] = None,
    minibatch: Optional[Callable[[int], Tensor]] = None,
    loss_scale: Optional[Union[float, Tensor]] = None,
    per_step: Optional[Callable[[int], Params]] = None,
) -> Iterator[Params]:
    """Yield the per-task parameters before any step, after one, ..., after ``steps`` steps.

    Step ``k`` minimises, for every task at once, ``loss_fn(forward(params, x), y)`` on its
    support set (plus ``penalty(params)``, a per-task ``[B]`` term that sees the parameters,
    such as iMAML's ``lambda / 2 * ||phi - theta||^2``), with ``optimizer`` (default
    :class:`GradientDescent`) and step size ``lr``.

    Args:
        forward: from :func:`functional`, or any ``forward(params, x)`` (e.g. one that feeds a
            context vector to a network).
        params: per-task starting parameters ``[B, ...]`` (:func:`task_params`). Entries that do
            not require grad are made to (a context initialised to zeros, detached weights).
        second_order: keep the graph of every inner gradient (``create_graph=True``) so the
            result is a second-order differentiable function of the starting parameters
            (MAML); ``False`` treats inner gradients as constants (first-order MAML).
        differentiable: ``False`` detaches every yielded step, so no graph outlives a step:
            for evaluation, and for algorithms that need only the adapted values (Reptile,
            iMAML). Memory then does not grow with ``steps``.
        minibatch: ``minibatch(k)`` gives the support indices (``[m]``, or ``[B, m]`` per task)
            used at step ``k``; default the whole support set.
        loss_scale: under 16-bit mixed precision, the factor the support loss is multiplied by
            before the inner backward pass (so small gradients do not flush to zero in fp16) and
            the gradients divided by after it, as a ``GradScaler`` does for the outer loss. An
            overflow gives infinite gradients, hence infinite adapted parameters and query loss:
            the outer ``GradScaler`` then skips the step and lowers its scale, which the caller
            passes here again.
        per_step: ``per_step(k)`` gives tensors that the forward receives among the parameters
            at step ``k`` (counting from 0) and that are yielded with the parameters after that
            step (``per_step(0)`` with the starting ones), instead of being adapted (no inner
            gradient is taken for them): MAML++'s per-step batch norm weights and biases, which
            the authors' code uses for a step's support pass and for the query pass after it.
            Per-task ``[B, ...]``, like ``params``; names not in ``params``.

    Inner gradients are taken with autograd on even under ``torch.no_grad``; whether a graph
    to the outer parameters is kept is ``differentiable``'s business alone.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be a whole number of inner steps, got {steps!r} ({type(steps).__name__}).")
    if steps < 0:
        raise ValueError(f"steps must be 0 or more, got {steps}.")
    if steps and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Inner steps take gradients, which torch.inference_mode() forbids. Adapt under torch.no_grad() instead "
            "(inner gradients are still taken there), or inside torch.inference_mode(False) on tensors made outside "
            "inference mode. (Lightning evaluates under inference mode: a MetaLearner whose evaluation adapts says "
            "so with the class attribute needs_grad_at_eval = True.)")
    if isinstance(lr, Tensor) and lr.numel() == 1 and not lr.requires_grad:
        value = float(lr)  # a step size held as a tensor (not a learned one, which may go anywhere)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"lr must be a positive finite step size, got {lr!r}.")
    elif isinstance(lr, bool) or not (isinstance(lr, (numbers.Real, Tensor)) or callable(lr)):
        raise TypeError(f"lr must be a step size (a number, a tensor, or a function (step, name) -> step size), got "
                        f"{lr!r} ({type(lr).__name__}).")
    elif isinstance(lr, numbers.Real) and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite step size, got {lr!r}.")
    tasks = support_x.shape[0]
    if steps and support_x.dim() >= 2 and support_x.shape[1] == 0:
        raise ValueError(
            f"support_x holds no samples (shape {list(support_x.shape)}, [tasks, samples, ...]): there is nothing "
            f"to adapt on in {steps} inner step{'s' if steps != 1 else ''} (the loss of an empty set is NaN). Give "
            "each task a support set, or steps=0.")
    unbatched = {n: list(p.shape) for n, p in params.items() if p.dim() == 0 or p.shape[0] != tasks}
    if unbatched:
        raise ValueError(
            f"params must be per task, [tasks, ...] with tasks = {tasks} (support_x's first dimension), but "
            f"{listed([f'{n} is {shape}' for n, shape in unbatched.items()], 3)}. Expand the module's parameters to one copy per task with "
            "task_params(dict(module.named_parameters()), tasks).")
    optimizer = GradientDescent() if optimizer is None else optimizer
    params = _ready(params, differentiable)
    state = optimizer.init(params)

    def at(step: int, params: Params) -> Params:
        if per_step is None:
            return params
        given = per_step(step)
        clash = set(given) & set(params)
        if clash:
            raise ValueError(f"per_step gives {sorted(clash)}, which are adapted parameters: they cannot be both.")
        return {**params, **given}

    yield _visible(at(0, params), differentiable)
    for step in range(steps):
        x, y = (support_x, support_y) if minibatch is None else _subset(support_x, support_y, minibatch(step))
        with torch.enable_grad(), (differentiated_twice() if differentiable and second_order else nullcontext()):
            losses = loss_fn(forward(at(step, params), x), y)
            if losses.shape != (tasks,):
                raise ValueError(
                    f"loss_fn must return one loss per task, shape [{tasks}], but returned {list(losses.shape)}: each "
                    "task adapts on its own loss. Reduce over a task's samples only, e.g. "
                    "fewshot_lightning.algorithms.base.per_task_loss (cross-entropy or MSE per task), not "
                    "F.cross_entropy's batch mean.")
            if penalty is not None:
                extra = penalty(params)
                if not isinstance(extra, Tensor) or extra.shape != (tasks,):
                    # [B, 1] broadcast the losses to [B, B]: every task's loss counted B times.
                    raise ValueError(
                        f"penalty must return one value per task, shape [{tasks}], but returned "
                        f"{list(extra.shape) if isinstance(extra, Tensor) else type(extra).__name__}: sum each task's "
                        "term over its parameters only (e.g. .flatten(1).sum(1)).")
                losses = losses + extra
            names = list(params)
            total = losses.sum() if loss_scale is None else losses.sum() * loss_scale
            grads = torch.autograd.grad(total, [params[n] for n in names], create_graph=differentiable and second_order,
                                        allow_unused=True)
            grads = _unused_as_zero(names, grads, params)
            if loss_scale is not None:
                grads = [g / loss_scale for g in grads]
            params, state = optimizer.update(step, params, dict(zip(names, grads)), state, lr)
        if not differentiable:
            state = _detached(state)
        params = _ready(params, differentiable)
        yield _visible(at(step, params), differentiable)  # the tensors of the step just taken


def _unused_as_zero(names: Sequence[str], grads: Sequence[Optional[Tensor]], params: Params) -> List[Tensor]:
    """The inner gradients, zero for adapted tensors the loss does not depend on (a layer the
    forward never calls), with a warning naming them; an error if it depends on none of them."""
    unused = [name for name, grad in zip(names, grads) if grad is None]
    if not unused:
        return list(grads)
    shown = listed(unused, 4)
    if len(unused) == len(names):
        raise ValueError(
            f"The support loss does not depend on any adapted tensor ({shown}): the forward ignores the parameters "
            "it is given (does it call a module other than the one made functional, or detach them?), so the inner "
            "loop cannot adapt anything.")
    warnings.warn(
        f"The support loss does not depend on the adapted tensors {shown} (parameters the backbone's forward never "
        f"uses): their inner gradient is zero and they stay as they are. Leave them out of the inner loop, e.g. "
        f"adapt={['!' + name for name in unused[:2]]!r}, or out of the backbone.",
        stacklevel=3,
    )
    return [torch.zeros_like(params[name]) if grad is None else grad for name, grad in zip(names, grads)]


def adapt(
    forward: Forward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    loss_fn: LossFn,
    steps: int,
    lr: StepSize,
    **options,
) -> Params:
    """The per-task parameters after ``steps`` inner steps: the last of :func:`trajectory`
    (same arguments and keyword options)."""
    for params in trajectory(forward, params, support_x, support_y, loss_fn, steps, lr, **options):
        pass
    return params


def _ready(params: Params, differentiable: bool) -> Params:
    """Parameters an inner gradient can be taken with respect to."""
    if differentiable:
        return {n: p if _in_graph(p) else p.detach().requires_grad_() for n, p in params.items()}
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def _in_graph(p: Tensor) -> bool:
    # A view made under no_grad says requires_grad=True yet has no grad_fn linking it to its
    # base: a gradient with respect to it cannot be taken, so it counts as outside the graph.
    return p.requires_grad and (p.grad_fn is not None or p._base is None)


def _visible(params: Params, differentiable: bool) -> Params:
    return params if differentiable else {n: p.detach() for n, p in params.items()}


def _detached(state):
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(_detached(v) for v in state)
    return state


def _subset(support_x: Tensor, support_y: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
    if index.dim() == 1:
        return support_x.index_select(1, index), support_y.index_select(1, index)
    return _take(support_x, index), _take(support_y, index)


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[b, index[b]]`` for every task ``b``."""
    shaped = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, shaped)


class InnerLearningRate(nn.Module):
    """Inner-loop learning rates: one scalar, or per step, per parameter tensor, per element.

    Call it as ``lr(step, name)``: it is a :data:`StepSize`.

    Args:
        shapes: name -> shape of every adapted parameter.
        init: initial value of every rate (must be positive).
        steps: number of inner steps the per-step rates cover; later steps reuse the last.
        per_step: a separate rate for each step (MAML++ style).
        per_parameter: one rate per element of each parameter (Meta-SGD, Li et al. 2017).
        learnable: rates are ``nn.Parameter`` s trained by the outer loop.
    """

    def __init__(
        self,
        shapes: Mapping[str, torch.Size],
        init: float,
        steps: int = 1,
        per_step: bool = False,
        per_parameter: bool = False,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        if not init > 0:
            raise ValueError(f"inner learning rate must be positive, got {init}.")
        self.init = float(init)
        self.per_step = per_step
        self.per_parameter = per_parameter
        self.learnable = learnable
        self.tensor_rates = learnable or per_step or per_parameter
        # ParameterDict keys may not contain '.', parameter names do.
        self.keys = {name: name.replace(".", "__") for name in shapes}
        rates = {}
        if self.tensor_rates:
            for name, shape in shapes.items():
                size = (steps if per_step else 1,) + (tuple(shape) if per_parameter else ())
                rates[self.keys[name]] = nn.Parameter(torch.full(size, self.init), requires_grad=learnable)
        self.rates = nn.ParameterDict(rates)

    def forward(self, step: int, name: str) -> Union[float, Tensor]:
        if not self.tensor_rates:
            return self.init
        rates = self.rates[self.keys[name]]
        return rates[min(step, rates.shape[0] - 1)]


def select_parameters(module: nn.Module, selection: Optional[Iterable[str]]) -> list:
    """Parameter names of ``module`` chosen by ``selection``, in the module's order.

    Entries are exact names, prefixes ending in ``"."`` (``"head."``), or shell-style patterns
    (``"features.*.weight"``); an entry starting with ``"!"`` removes what it matches. Entries
    apply in order, starting from nothing, or from every parameter if the first entry removes.
    ``None`` chooses all. For example ``["!features.*.1.*"]`` adapts everything but the batch
    norm layers of :class:`~fewshot_lightning.models.Conv4` (as MAML's original code).
    """
    names = [name for name, _ in module.named_parameters()]
    if selection is None:
        return names
    if isinstance(selection, str):
        # adapt="head." read as the characters 'h', 'e', ...: "adapt entry 'h' matches no parameter".
        raise TypeError(f"adapt takes a list of names, prefixes or patterns, got the string {selection!r}: "
                        f"write adapt=[{selection!r}].")
    entries = list(selection)
    chosen = set(names) if entries and entries[0].startswith("!") else set()
    for entry in entries:
        pattern = entry[1:] if entry.startswith("!") else entry
        matches = {n for n in names if n == pattern or (pattern.endswith(".") and n.startswith(pattern))
                   or fnmatch.fnmatchcase(n, pattern)}
        if not matches:
            raise ValueError(
                f"adapt entry {entry!r} matches no parameter of {type(module).__name__}; its parameters are {names}."
            )
        chosen = chosen - matches if entry.startswith("!") else chosen | matches
    if not chosen:
        raise ValueError(f"adapt={entries} selects no parameter of {type(module).__name__} to adapt.")
    return [n for n in names if n in chosen]


def split_parameters(module: nn.Module, names: Iterable[str]) -> Tuple[Params, Params]:
    """``(adapted, fixed)``: ``module``'s parameters named in ``names`` and the others, the live
    tensors (``fixed`` is what :func:`functional` takes to share them across tasks)."""
    chosen = set(names)
    parameters = dict(module.named_parameters())
    return (
        {n: p for n, p in parameters.items() if n in chosen},
        {n: p for n, p in parameters.items() if n not in chosen},
    )
