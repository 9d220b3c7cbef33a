"""The functional inner loop: gradient steps on a dict of parameters, no module surgery.

Everything here is a pure function of tensors built on :func:`torch.func.functional_call`
and :func:`torch.func.grad`. The same per-task function runs over a batch of tasks either
under :func:`torch.func.vmap` (one batched computation) or in a Python loop; both give the
same numbers. Second order means the adapted parameters stay differentiable functions of
the initial ones; first order detaches the inner gradients (FOMAML).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = Dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class InnerLearningRate(nn.Module):
    """Inner-loop learning rates: one scalar, or per step, per parameter tensor, per element.

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


def gradient_steps(
    forward: Callable[[Params, Tensor], Tensor],
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    loss_fn: LossFn,
    steps: int,
    lr: Callable[[int, str], Union[float, Tensor]],
    first_order: bool = False,
    query_x: Optional[Tensor] = None,
) -> Tuple[Params, List[Tensor]]:
    """Adapt ``params`` to one task by ``steps`` steps of gradient descent on the support loss.

    ``forward(params, x)`` runs the network with ``params`` substituted. Returns the adapted
    parameters and, if ``query_x`` is given, the query outputs before each step (the
    adaptation curve; the output after the last step is left to the caller).
    """
    loss_of = lambda p: loss_fn(forward(p, support_x), support_y)  # noqa: E731
    gradient_of = grad(loss_of)
    before_each_step = []
    for step in range(steps):
        if query_x is not None:
            before_each_step.append(forward(params, query_x))
        grads = gradient_of(params)
        params = {
            name: value - lr(step, name) * (grads[name].detach() if first_order else grads[name])
            for name, value in params.items()
        }
    return params, before_each_step


class FunctionalLearner:
    """Runs a module's inner loop over a batch of tasks as pure functions of its parameters.

    Args:
        module: the network; its own parameters are never modified in place.
        adapt: names of the parameters adapted in the inner loop (others stay fixed);
            ``None`` adapts all.
        batching: ``"vmap"``, ``"loop"``, or ``"auto"`` (vmap, falling back to the loop, with a
            warning, for models vmap cannot run, e.g. batch norm that updates running stats).
    """

    def __init__(self, module: nn.Module, adapt: Optional[Iterable[str]] = None, batching: str = "auto") -> None:
        if batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"batching must be 'auto', 'vmap' or 'loop', got {batching!r}.")
        self.module = module
        names = [name for name, _ in module.named_parameters()]
        self.adapt_names = list(names if adapt is None else adapt)
        unknown = sorted(set(self.adapt_names) - set(names))
        if unknown:
            raise ValueError(f"Cannot adapt {unknown}: {type(module).__name__} has no such parameters.")
        if not self.adapt_names:
            raise ValueError("No parameters selected for adaptation.")
        self.batching = batching

    def split_params(self) -> Tuple[Params, Params]:
        """(adapted, fixed) parameter dicts of the module, as live tensors (gradients flow)."""
        adapted, fixed = {}, {}
        wanted = set(self.adapt_names)
        for name, value in self.module.named_parameters():
            (adapted if name in wanted else fixed)[name] = value
        return adapted, fixed

    def run(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        loss_fn: LossFn,
        steps: int,
        lr: Callable[[int, str], Union[float, Tensor]],
        first_order: bool = False,
        curve: bool = False,
    ) -> Tensor:
        """Adapt to every task of the batch and predict its query set.

        Returns query outputs ``[B, M, ...]``; with ``curve=True``, ``[steps + 1, B, M, ...]``:
        the query outputs before any step, after one step, ..., after ``steps`` steps.
        """
        adapted, fixed = self.split_params()
        buffers = dict(self.module.named_buffers())

        def forward(params: Params, x: Tensor) -> Tensor:
            return functional_call(self.module, {**params, **fixed, **buffers}, (x,))

        def one_task(params: Params, task_support_x: Tensor, task_support_y: Tensor, task_query_x: Tensor):
            params, curve_points = gradient_steps(
                forward, params, task_support_x, task_support_y, loss_fn, steps, lr, first_order,
                query_x=task_query_x if curve else None,
            )
            final = forward(params, task_query_x)
            return torch.stack(curve_points + [final]) if curve else final

        if self.batching != "loop":
            try:
                batched = vmap(one_task, in_dims=(None, 0, 0, 0), randomness="different")
                outputs = batched(adapted, support_x, support_y, query_x)
                return outputs.transpose(0, 1) if curve else outputs
            except (RuntimeError, ValueError) as error:
                if self.batching == "vmap":
                    raise
                warnings.warn(
                    f"{type(self.module).__name__} cannot run under torch.func.vmap ({error}); adapting tasks "
                    "one by one instead. Pass batching='loop' to skip this attempt.",
                    stacklevel=2,
                )
                self.batching = "loop"
        outputs = [one_task(adapted, *task) for task in zip(support_x, support_y, query_x)]
        return torch.stack(outputs, dim=1 if curve else 0)
