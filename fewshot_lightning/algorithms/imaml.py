"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..inner import Forward, LossFn, Params, StepSize, rate
from .base import per_task_loss
from .maml import MAML, THROUGH_INNER_LOOP, refuse


#: iMAML's inner solvers: gradient descent ("iMAML, GD" in the paper) and Newton-CG ("iMAML, Hessian-Free").
SOLVERS = ("gd", "hessian_free")


class iMAML(MAML):  # noqa: N801 -- the paper's name
    """Implicit MAML: the meta-gradient from the implicit function theorem, not through the inner steps.

    Each task's adapted parameters approximately solve the proximal problem
    ``phi = argmin L_support(phi) + lam / 2 * ||phi - theta||^2`` (``inner_steps`` steps of
    gradient descent from ``theta``, batched over tasks, without any graph: memory does not
    grow with ``inner_steps``). At that solution ``d phi / d theta = (I + H / lam)^-1`` with ``H``
    the Hessian of the support loss at ``phi``, so the meta-gradient of the query loss ``g`` is
    the solution ``v`` of ``(I + H / lam) v = g``, found by ``cg_steps`` steps of conjugate
    gradient with Hessian-vector products, per task, batched over tasks.

    It is an autograd node: :meth:`forward` returns the query outputs, and backpropagating any
    loss of them (the base class's mean query loss) runs the solve, so the training step,
    gradient clipping, mixed precision and DDP are the ordinary ones.

    Two inner solvers, the paper's two variants: ``inner_solver="gd"`` ("iMAML, GD"),
    ``inner_steps`` steps of gradient descent of size ``inner_lr``; ``"hessian_free"``
    ("iMAML, Hessian-Free"), ``inner_steps`` Newton steps whose direction comes from
    ``inner_cg_steps`` conjugate-gradient steps on Hessian-vector products (paper: 5), with a
    line search for the step size. ``line_search=True`` adds that line search to gradient
    descent: each step is ``inner_lr * gradient`` if that decreases the inner objective
    enough (Armijo's condition), else halved until it does (:func:`safeguarded_trajectory`).
    Without it, a fixed step diverges on a task whose support loss has curvature above
    ``2 / inner_lr``; iMAML's meta-gradient, blind to the inner path, does not keep the
    initialisation away from such regions (MAML's does), and on sinusoid it drifts there
    within a few thousand steps. Evaluation solves the proximal problem with ``test_lam``
    (default ``lam``; 0 is plain fine-tuning, which the authors' accuracy script uses), with
    the same solver.

    Args:
        backbone: any ``nn.Module``; all its parameters are adapted.
        inner_lr: inner gradient-descent step size.
        inner_steps: inner steps while meta-training (paper, Omniglot: 16 for 5-way, 25 for 20-way).
        test_inner_steps: inner steps at evaluation (default ``inner_steps``).
        lam: strength of the proximal term, ``lambda`` (paper: 2.0). Must be positive.
        cg_steps: conjugate-gradient iterations of the meta-gradient solve (paper: 5).
        test_lam: proximal strength at evaluation, 0 or more (default ``lam``).
        inner_solver: ``"gd"`` (default) or ``"hessian_free"`` (Newton-CG with a line search).
        line_search: backtracking line search on gradient descent's steps (always on with
            ``"hessian_free"``). It costs one more support forward pass per step; where the
            fixed step already decreases the loss, the result is the same.
        inner_cg_steps: conjugate-gradient steps per Newton direction (``"hessian_free"``; paper: 5).
        **kwargs: :class:`MAML`'s other arguments (``batching``, ``per_step_lr``,
            ``per_parameter_lr``, ``optimizer``, ``lr_scheduler``). Those about differentiating
            through the inner loop (``first_order``, ``first_order_steps``, ``learn_inner_lr``,
            ``multi_step_loss_steps``) and ``adapt`` are refused.

    Example::

        import lightning as L
        from fewshot_lightning.algorithms import iMAML
        from fewshot_lightning.data import SinusoidDataModule
        from fewshot_lightning.models import MLP

        model = iMAML(MLP(), inner_lr=0.02, inner_steps=10, lam=1.0, cg_steps=5)
        L.Trainer(max_steps=2000).fit(model, SinusoidDataModule(shots=10, meta_batch_size=10))
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 16,
        test_inner_steps: Optional[int] = None,
        lam: float = 2.0,
        cg_steps: int = 5,
        test_lam: Optional[float] = None,
        inner_solver: str = "gd",
        line_search: bool = False,
        inner_cg_steps: int = 5,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        refuse(name, kwargs, THROUGH_INNER_LOOP, "its meta-gradient is implicit, independent of the inner path")
        refuse(name, kwargs, {"adapt": None}, "its meta-gradient here is derived for adapting every parameter")
        if not (lam > 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be positive and finite (the proximal term makes the implicit gradient exist), "
                             f"got {lam}.")
        for steps_name, steps in (("cg_steps", cg_steps), ("inner_cg_steps", inner_cg_steps)):
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
                raise TypeError(f"{steps_name} must be a whole number of conjugate-gradient steps, got {steps!r}.")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be at least 1, got {cg_steps}.")
        if test_lam is not None and not (test_lam >= 0 and math.isfinite(test_lam)):
            raise ValueError(f"test_lam must be a finite number, 0 or more, got {test_lam}.")
        if inner_solver not in SOLVERS:
            raise ValueError(f"inner_solver must be one of {', '.join(map(repr, SOLVERS))}, got {inner_solver!r}.")
        if inner_cg_steps < 1:
            raise ValueError(f"inner_cg_steps must be at least 1, got {inner_cg_steps}.")
        if inner_solver == "gd" and inner_cg_steps != 5:  # set, and unused: the other solver's option
            raise ValueError(
                f"inner_cg_steps={inner_cg_steps} is the conjugate-gradient steps of inner_solver='hessian_free', but "
                "inner_solver is 'gd' (gradient descent: no conjugate gradient): pass inner_solver='hessian_free', or "
                "drop inner_cg_steps.")
        super().__init__(backbone, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         **kwargs)
        self.lam = lam
        self.cg_steps = cg_steps
        self.test_lam = lam if test_lam is None else test_lam
        self.inner_solver = inner_solver
        self.inner_step_size = inner_lr  # fixed: iMAML learns no inner rates
        self.line_search = line_search or inner_solver == "hessian_free"
        self.inner_cg_steps = inner_cg_steps

    def differentiates_inner_gradient(self) -> bool:
        """Never: its meta-gradient is implicit (the inner steps are detached, the outer gradient
        solved for); compiled, it trains to the eager run's weights (``tests/test_compile.py``)."""
        return False

    def trajectory(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: Optional[bool] = None,
        differentiable: bool = True,
        batching: Optional[str] = None,
    ) -> Iterator[Params]:
        """Per-task parameters after 0, 1, ..., ``steps`` steps of the inner solver (see the class
        docstring). With ``line_search`` or the Hessian-free solver the iterates are always
        detached (:func:`safeguarded_trajectory`): iMAML's meta-gradient never needs their graph."""
        if not self.line_search:
            return super().trajectory(support_x, support_y, steps, first_order, differentiable, batching)
        return safeguarded_trajectory(
            self.functional(batching), self.initial_params(support_x.shape[0], detach=True), support_x, support_y,
            per_task_loss, steps, self.inner_lr, newton=self.inner_solver == "hessian_free",
            cg_steps=self.inner_cg_steps, loss_scale=self.inner_loss_scale(), **self.inner_options(support_x, steps),
        )

    def nonfinite_hint(self) -> str:
        """What to try when training meets a non-finite loss (:class:`~fewshot_lightning.callbacks.NonFiniteGuard`)."""
        if self.line_search:
            return ""
        return (
            f"iMAML's fixed-step inner gradient descent diverges on a task whose support loss has curvature above "
            f"2 / inner_lr = {2 / self.inner_step_size:g}: turn on its line search (line_search: true, CLI "
            "--model.init_args.line_search true) or use inner_solver: hessian_free."
        )

    def inner_options(self, support_x: Tensor, steps: int) -> Dict[str, Any]:
        """The proximal term around the current initialisation, with ``lam`` (``test_lam`` in eval
        mode, i.e. at validation and test)."""
        lam = self.lam if self.training else self.test_lam
        if lam == 0:
            return {}
        anchor = {name: p.detach() for name, p in self.backbone.named_parameters()}
        return {"penalty": lambda params: proximal_term(params, anchor, lam)}

    def training_outputs(self, batch: TaskBatch, batching: Optional[str] = None) -> Tensor:
        """Query outputs of the adapted parameters, whose backward pass is the implicit meta-gradient."""
        adapted = self.adapt(batch.support_x, batch.support_y, differentiable=False, batching=batching)
        forward = self.functional(batching)

        def solve(query_gradient: Params) -> Params:
            return implicit_meta_gradient(
                forward, adapted, batch.support_x, batch.support_y, per_task_loss, query_gradient, self.lam,
                self.cg_steps,
            )

        theta = self.initial_params(batch.num_tasks)
        names = list(adapted)
        linked = _ImplicitGradient.apply(solve, names, *(theta[n] for n in names), *(adapted[n] for n in names))
        return self.predict(dict(zip(names, linked)), batch.query_x, batching=batching)


class _ImplicitGradient(torch.autograd.Function):
    """Identity on the adapted parameters ``phi``; backward sends ``solve(dL/dphi)`` to ``theta``."""

    @staticmethod
    def forward(ctx, solve: Callable[[Params], Params], names: Sequence[str], *tensors: Tensor):
        ctx.solve, ctx.names = solve, list(names)
        adapted = tensors[len(names):]
        return tuple(phi.view_as(phi) for phi in adapted)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        meta_gradient = ctx.solve(dict(zip(ctx.names, grads)))
        return (None, None, *(meta_gradient[n] for n in ctx.names), *(None for _ in ctx.names))


def proximal_term(params: Params, anchor: Dict[str, Tensor], lam: float) -> Tensor:
    """``lam / 2 * ||phi - theta||^2`` per task, ``[B]``, for per-task ``params`` and shared ``anchor``."""
    return 0.5 * lam * sum((p - anchor[name]).square().flatten(1).sum(1) for name, p in params.items())


def implicit_meta_gradient(
    forward: Forward,
    adapted: Params,
    support_x: Tensor,
    support_y: Tensor,
    loss_fn: LossFn,
    query_gradient: Params,
    lam: float,
    cg_steps: int,
) -> Params:
    """Solve ``(I + H_i / lam) v_i = g_i`` for every task ``i`` by conjugate gradient.

    ``H_i`` is the Hessian of task ``i``'s support loss at its ``adapted`` parameters, applied
    through Hessian-vector products (double backward of the summed task losses: tasks share no
    parameters, so the products separate by task); ``g`` is ``query_gradient``. Returns ``v``.
    """
    with torch.enable_grad():
        phi = {name: p.detach().requires_grad_() for name, p in adapted.items()}
        names = list(phi)
        gradients = torch.autograd.grad(
            loss_fn(forward(phi, support_x), support_y).sum(), [phi[n] for n in names], create_graph=True
        )

        def matvec(vector: Params) -> Params:
            products = torch.autograd.grad(
                gradients, [phi[n] for n in names], grad_outputs=[vector[n] for n in names], retain_graph=True
            )
            return {n: vector[n] + product / lam for n, product in zip(names, products)}

        return conjugate_gradient(matvec, {n: query_gradient[n].detach() for n in names}, cg_steps)


def conjugate_gradient(matvec: Callable[[Params], Params], rhs: Params, steps: int) -> Params:
    """``steps`` iterations of conjugate gradient on ``A x = rhs`` from ``x = 0``, for every task.

    ``A`` (given as ``matvec``) should be symmetric positive definite per task; tensors carry a
    leading task dimension and each task runs its own scalars. A task stops moving, keeping the
    solution it has, when its residual reaches zero or when a search direction shows
    curvature ``p^T A p`` that is not positive (``A`` is not positive definite there, as
    ``I + H / lam`` is not where the support loss's Hessian has an eigenvalue below
    ``-lam``): a step along it is unbounded, and taking it turned iMAML's meta-gradient into
    inf on sinusoid (truncated CG, as in Steihaug's method).
    """
    solution = {n: torch.zeros_like(r) for n, r in rhs.items()}
    residual = dict(rhs)
    direction = dict(rhs)
    residual_norm = _task_dot(residual, residual)
    active = residual_norm > 0
    for _ in range(steps):
        product = matvec(direction)
        curvature = _task_dot(direction, product)
        # Curvature relative to the direction's length: float rounding makes a zero one tiny.
        active = active & (curvature > 1e-6 * _task_dot(direction, direction))
        alpha = torch.where(active, residual_norm / curvature.clamp_min(torch.finfo(curvature.dtype).tiny), 0)
        solution = {n: x + _per_task(alpha, x) * direction[n] for n, x in solution.items()}
        residual = {n: r - _per_task(alpha, r) * product[n] for n, r in residual.items()}
        new_norm = _task_dot(residual, residual)
        active = active & (new_norm > 0)
        beta = torch.where(active, new_norm / residual_norm.clamp_min(torch.finfo(new_norm.dtype).tiny), 0)
        direction = {n: residual[n] + _per_task(beta, d) * d for n, d in direction.items()}
        residual_norm = new_norm
    return solution


def _task_dot(a: Params, b: Params) -> Tensor:
    return sum((a[n] * b[n]).flatten(1).sum(1) for n in a)


def _per_task(scalars: Tensor, like: Tensor) -> Tensor:
    return scalars.view(-1, *([1] * (like.dim() - 1)))


#: Armijo's sufficient-decrease constant: a step ``t`` along ``d`` is taken when the objective
#: falls by at least ``ARMIJO * t * <grad, d>`` (Nocedal & Wright, Numerical Optimization, ch. 3).
ARMIJO = 1e-4


def safeguarded_trajectory(
    forward: Forward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    loss_fn: LossFn,
    steps: int,
    lr: StepSize,
    *,
    newton: bool = False,
    cg_steps: int = 5,
    penalty: Optional[Callable[[Params], Tensor]] = None,
    halvings: int = 20,
    loss_scale: Optional[float] = None,
) -> Iterator[Params]:
    """Per-task parameters before and after each of ``steps`` descent steps with a line search.

    Every task minimises ``F = loss_fn(forward(params, x), y) + penalty(params)`` on its support
    set along a direction ``d``: the scaled gradient ``lr * grad F`` (gradient descent), or with
    ``newton=True`` the approximate Newton direction ``H_F^-1 grad F`` from ``cg_steps`` steps of
    conjugate gradient on Hessian-vector products (the "Hessian-free" solver of iMAML's paper;
    a task whose CG finds no descent direction falls back to the gradient). The step along ``d``
    is the first of ``1, 1/2, 1/4, ...`` (``halvings`` halvings at most) that decreases ``F`` by
    Armijo's condition, per task; a task that finds none keeps its parameters. ``F`` therefore
    never increases, whatever the curvature: a fixed step ``lr`` diverges once the support
    loss's curvature exceeds ``2 / lr``, which the meta-parameters of iMAML, whose
    meta-gradient does not see the path of the inner solver, can drift into.

    The iterates are detached (no graph to the starting parameters): for iMAML's implicit
    meta-gradient and for evaluation. ``loss_scale`` as in :func:`~fewshot_lightning.inner.trajectory`;
    a task whose gradient is not finite (an fp16 overflow) takes the plain gradient step, so
    its parameters turn non-finite as they would without the line search and the overflow is seen.
    """
    if steps < 0:
        raise ValueError(f"steps must be 0 or more, got {steps}.")
    names = list(params)
    scale = 1.0 if loss_scale is None else loss_scale

    def objective(current: Params) -> Tensor:
        values = loss_fn(forward(current, support_x), support_y)
        return values if penalty is None else values + penalty(current)

    params = {n: p.detach() for n, p in params.items()}
    yield params
    for step in range(steps):
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
            values = objective(leaves)
            grads = torch.autograd.grad(values.sum() * scale, [leaves[n] for n in names], create_graph=newton)
            grads = dict(zip(names, grads))
            gradient = {n: g.detach() / scale for n, g in grads.items()}
            gradient_step = {n: rate(lr, step, n) * g for n, g in gradient.items()}
            direction = gradient_step
            if newton:
                def hessian_product(vector: Params) -> Params:
                    products = torch.autograd.grad(
                        [grads[n] for n in names], [leaves[n] for n in names],
                        grad_outputs=[vector[n] for n in names], retain_graph=True,
                    )
                    return dict(zip(names, products))

                # The Newton system H d = g scaled by the loss scale on both sides: d is unscaled.
                newton_direction = conjugate_gradient(hessian_product, {n: g.detach() for n, g in grads.items()}, cg_steps)
                descent = _task_dot(gradient, newton_direction) > 0
                direction = {n: torch.where(_per_task(descent, d), d, gradient_step[n]) for n, d in newton_direction.items()}
        searched = _line_search(objective, params, values.detach(), direction, _task_dot(gradient, direction), halvings)
        # A non-finite gradient (an fp16 overflow, NaN data) is passed on, not absorbed by the line
        # search: the task's parameters become non-finite as under plain gradient descent, so the
        # GradScaler skips the step and lowers its scale, or NonFiniteGuard names the task.
        finite = torch.isfinite(_task_dot(gradient, gradient))
        params = {n: torch.where(_per_task(finite, p), p, params[n] - gradient_step[n]) for n, p in searched.items()}
        yield params


def _line_search(
    objective: Callable[[Params], Tensor], params: Params, values: Tensor, direction: Params, slope: Tensor,
    halvings: int,
) -> Params:
    """``params - t * direction`` per task, ``t`` the first of 1, 1/2, ... meeting Armijo's condition."""
    step = torch.ones_like(values)
    accepted = torch.zeros_like(values, dtype=torch.bool)
    result = dict(params)
    with torch.no_grad():
        for _ in range(halvings + 1):
            candidate = {n: p - _per_task(step, p) * direction[n] for n, p in params.items()}
            candidate_values = objective(candidate)
            ok = ~accepted & torch.isfinite(candidate_values) & (candidate_values <= values - ARMIJO * step * slope)
            result = {n: torch.where(_per_task(ok, r), candidate[n], r) for n, r in result.items()}
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step / 2)
    return result
