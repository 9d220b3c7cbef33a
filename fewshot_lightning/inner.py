"""The functional inner loop: gradient steps on a dict of parameters, no module surgery.

Everything here is a pure function of tensors built on :func:`torch.func.functional_call`.
The same per-task forward runs over a batch of tasks either under :func:`torch.func.vmap`
(one batched computation) or in a Python loop; both give the same numbers. Second order
means the adapted parameters stay differentiable functions of the initial ones
(``create_graph=True``); first order uses the inner gradients as constants (FOMAML).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

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


class FunctionalLearner:
    """Runs a module's inner loop over a batch of tasks as pure functions of its parameters.

    The adapted parameters of all tasks are one tensor per parameter with a leading task
    dimension: the initial value expanded ``B`` times, then moved by each task's gradient.
    Under ``vmap`` the forward pass runs every task at once with its own parameters, and a
    single ``torch.autograd.grad`` of the summed task losses yields every task's gradient
    (tasks share no parameters after the expansion, so the sum separates). That is cheaper
    than nesting ``torch.func.grad`` inside ``vmap``, which batches the backward pass op by op
    as well; ``benchmarks/maml_step_time.py`` measures the result against learn2learn.

    Args:
        module: the network; its own parameters are never modified in place.
        adapt: names of the parameters adapted in the inner loop (others stay fixed);
            ``None`` adapts all.
        batching: ``"vmap"``, ``"loop"``, or ``"auto"``: vmap if it runs the model (not, e.g.,
            batch norm that updates running stats: then the loop, with a warning) and is
            faster than the loop on a timed training batch.
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
        self._timings: Dict[str, float] = {}

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

        ``loss_fn(outputs, targets)`` maps ``[B, M, ...]`` outputs to per-task losses ``[B]``.
        With autograd enabled the result is differentiable with respect to the module's
        parameters (and learnable rates), through the inner steps unless ``first_order``.
        With autograd disabled (evaluation) the inner gradients are still taken, but no
        outer graph is kept.

        Returns query outputs ``[B, M, ...]``; with ``curve=True``, ``[steps + 1, B, M, ...]``:
        the query outputs before any step, after one step, ..., after ``steps`` steps.
        """
        args = (support_x, support_y, query_x, loss_fn, steps, lr, first_order, curve)
        if self.batching == "auto":
            return self._choose(*args)
        if self.batching == "vmap":
            return self._run(*args, batched=True)
        return self._loop(*args)

    def _loop(self, support_x, support_y, query_x, loss_fn, steps, lr, first_order, curve) -> Tensor:
        outputs = [
            self._run(
                support_x[i : i + 1], support_y[i : i + 1], query_x[i : i + 1], loss_fn, steps, lr, first_order, curve,
                batched=False,
            )
            for i in range(support_x.shape[0])
        ]
        return torch.cat(outputs, dim=1 if curve else 0)

    def _choose(self, *args) -> Tensor:
        """``batching="auto"``: the first batches try vmap, then time vmap against the loop
        (training steps only; the choice sticks). Both give the same numbers, so switching
        changes speed alone."""
        if not self._timings:  # first call: does vmap run this model at all?
            try:
                outputs = self._run(*args, batched=True)
            except (RuntimeError, ValueError) as error:
                warnings.warn(
                    f"{type(self.module).__name__} cannot run under torch.func.vmap ({error}); adapting tasks "
                    "one by one instead. Pass batching='loop' to skip this attempt.",
                    stacklevel=3,
                )
                self.batching = "loop"
                return self._loop(*args)
            self._timings["warmup"] = 0.0
            return outputs
        if not torch.is_grad_enabled():  # evaluation batches are not the ones to time
            return self._run(*args, batched=True)
        mode = "vmap" if "vmap" not in self._timings else "loop"
        start = time.perf_counter()
        outputs = self._run(*args, batched=True) if mode == "vmap" else self._loop(*args)
        self._timings[mode] = time.perf_counter() - start
        if mode == "loop":
            self.batching = "vmap" if self._timings["vmap"] <= self._timings["loop"] else "loop"
        return outputs

    def _run(self, support_x, support_y, query_x, loss_fn, steps, lr, first_order, curve, *, batched) -> Tensor:
        adapted, fixed = self.split_params()
        buffers = dict(self.module.named_buffers())
        tasks = support_x.shape[0]
        training = torch.is_grad_enabled()

        def forward_one(params: Params, x: Tensor) -> Tensor:
            return functional_call(self.module, {**params, **fixed, **buffers}, (x,))

        if batched:
            forward = vmap(forward_one, in_dims=(0, 0), randomness="different")
        else:  # one task: drop its task dimension around the call
            forward = lambda params, x: forward_one({n: p[0] for n, p in params.items()}, x[0]).unsqueeze(0)  # noqa: E731

        with torch.enable_grad():
            if training:
                params = {n: p.unsqueeze(0).expand(tasks, *p.shape) for n, p in adapted.items()}
            else:
                params = {n: p.detach().unsqueeze(0).expand(tasks, *p.shape).requires_grad_() for n, p in adapted.items()}
            create_graph = training and not first_order
            points = []
            for step in range(steps):
                if curve:
                    points.append(forward(params, query_x))
                loss = loss_fn(forward(params, support_x), support_y).sum()
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
                params = {
                    name: value - lr(step, name) * gradient
                    for (name, value), gradient in zip(params.items(), grads)
                }
                if not training:
                    params = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.set_grad_enabled(training):
            final = forward(params, query_x)
        if curve:
            return torch.stack([p.detach() for p in points] + [final])
        return final
