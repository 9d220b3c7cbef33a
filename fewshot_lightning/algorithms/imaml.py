"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.task import TaskBatch
from ..inner import Forward, LossFn, Params
from .base import per_task_loss
from .maml import MAML, THROUGH_INNER_LOOP, refuse


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

    This is the paper's "iMAML, GD" variant (gradient descent inner solver); its "Hessian-free"
    variant solves the inner problem with a second-order method instead. Evaluation solves the
    proximal problem with ``test_lam`` (default ``lam``; 0 is plain fine-tuning, which the
    authors' accuracy script uses).

    Args:
        backbone: any ``nn.Module``; all its parameters are adapted.
        inner_lr: inner gradient-descent step size.
        inner_steps: inner steps while meta-training (paper, Omniglot: 16 for 5-way, 25 for 20-way).
        test_inner_steps: inner steps at evaluation (default ``inner_steps``).
        lam: strength of the proximal term, ``lambda`` (paper: 2.0). Must be positive.
        cg_steps: conjugate-gradient iterations of the meta-gradient solve (paper: 5).
        test_lam: proximal strength at evaluation, 0 or more (default ``lam``).
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
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        refuse(name, kwargs, THROUGH_INNER_LOOP, "its meta-gradient is implicit, independent of the inner path")
        refuse(name, kwargs, {"adapt": None}, "its meta-gradient here is derived for adapting every parameter")
        if not lam > 0:
            raise ValueError(f"lam must be positive (the proximal term makes the implicit gradient exist), got {lam}.")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be at least 1, got {cg_steps}.")
        if test_lam is not None and test_lam < 0:
            raise ValueError(f"test_lam must be 0 or more, got {test_lam}.")
        super().__init__(backbone, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         **kwargs)
        self.lam = lam
        self.cg_steps = cg_steps
        self.test_lam = lam if test_lam is None else test_lam

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
