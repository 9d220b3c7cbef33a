"""iMAML's implicit meta-gradient against its closed form and against the unrolled inner loop."""
import weakref

import pytest
import torch
from torch import nn

from fewshot_lightning.algorithms import MAML, Reptile, iMAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.algorithms.imaml import conjugate_gradient, proximal_term, safeguarded_trajectory
from fewshot_lightning.data import SinusoidTasks, TaskBatch
from fewshot_lightning.inner import adapt, functional, task_params
from fewshot_lightning.models import MLP

LAM, LR = 2.0, 0.1


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def linear_problem(tasks=3, features=2, shots=6, queries=5):
    g = torch.Generator().manual_seed(3)
    batch = TaskBatch(torch.randn(tasks, shots, features, generator=g), torch.randn(tasks, shots, 1, generator=g),
                      torch.randn(tasks, queries, features, generator=g), torch.randn(tasks, queries, 1, generator=g))
    model = nn.Linear(features, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, features, generator=g))
        model.bias.copy_(torch.randn(1, generator=g))
    return model, batch


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def closed_form_meta_gradient(model, batch, lam):
    """Linear regression with MSE: the support loss is quadratic with Hessian H = 2 X^T X / n, the
    proximal problem's solution is phi* = (H + lam I)^-1 (lam theta + 2 X^T y / n), and the
    meta-gradient is the task mean of (I + H / lam)^-1 grad L_query(phi*). Parameters (w, b)."""
    design = torch.cat([batch.support_x, torch.ones_like(batch.support_x[..., :1])], -1)
    query = torch.cat([batch.query_x, torch.ones_like(batch.query_x[..., :1])], -1)
    n, q, d = design.shape[1], query.shape[1], design.shape[2]
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    hessian = 2 * design.transpose(1, 2) @ design / n
    eye = torch.eye(d)
    phi = torch.linalg.solve(hessian + lam * eye, (lam * theta + (2 * design.transpose(1, 2) @ batch.support_y / n)[..., 0]))
    query_gradient = 2 * query.transpose(1, 2) @ (query @ phi[..., None] - batch.query_y) / q
    return torch.linalg.solve(eye + hessian / lam, query_gradient)[..., 0].mean(0)


def imaml_gradient(model, batch, steps, cg_steps, batching="vmap"):
    learner = iMAML(model, inner_lr=LR, inner_steps=steps, lam=LAM, cg_steps=cg_steps, batching=batching)
    loss = per_task_loss(learner(batch), batch.query_y).mean()
    return flat(torch.autograd.grad(loss, list(model.parameters())))


def unrolled_gradient(model, batch, steps):
    """Backpropagation through ``steps`` gradient steps on support loss + lam/2 ||phi - theta||^2:
    the gradient of the same inner procedure, computed the expensive way."""
    theta = dict(model.named_parameters())
    forward = functional(model)
    params = adapt(forward, task_params(theta, batch.num_tasks), batch.support_x, batch.support_y, per_task_loss,
                   steps, LR, penalty=lambda p: proximal_term(p, theta, LAM))
    loss = per_task_loss(forward(params, batch.query_x), batch.query_y).mean()
    return flat(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_cg_meta_gradient_matches_the_closed_form(batching, float64):
    model, batch = linear_problem()
    exact = closed_form_meta_gradient(model, batch, LAM)
    # 300 inner steps solve the proximal problem to machine precision (contraction <= 0.8 per
    # step here), and 3 conjugate-gradient steps solve a 3-parameter system exactly.
    assert torch.allclose(imaml_gradient(model, batch, 300, cg_steps=3, batching=batching), exact, atol=1e-10)
    # One CG step is only the first Krylov direction: visibly off, so the check above can fail.
    assert (imaml_gradient(model, batch, 300, cg_steps=1) - exact).abs().max() > 1e-4


def test_implicit_and_unrolled_gradients_converge_together_as_inner_steps_grow(float64):
    model, batch = linear_problem()
    gaps = [(imaml_gradient(model, batch, k, cg_steps=3) - unrolled_gradient(model, batch, k)).abs().max()
            for k in (2, 8, 32, 128)]
    # Both tend to the gradient at the exact solution; their gap shrinks with the inner steps
    # (seen: 3e-1, 2e-2, 1e-5, 4e-16).
    assert all(later < 0.5 * earlier for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[0] > 1e-3 and gaps[-1] < 1e-10


def test_conjugate_gradient_solves_each_task_with_its_own_matrix(float64):
    g = torch.Generator().manual_seed(0)
    factors = torch.randn(4, 5, 5, generator=g)
    matrices = factors @ factors.transpose(1, 2) + torch.eye(5)  # symmetric positive definite
    rhs = torch.randn(4, 5, generator=g)
    solution = conjugate_gradient(lambda v: {"x": (matrices @ v["x"][..., None])[..., 0]}, {"x": rhs}, steps=5)
    assert torch.allclose(solution["x"], torch.linalg.solve(matrices, rhs), atol=1e-8)


def test_conjugate_gradient_stops_a_task_at_non_positive_curvature(float64):
    # Task 0: A = diag(1, -1) (indefinite), rhs = (1, 1). The first direction is rhs itself,
    # whose curvature is 1 - 1 = 0: no step is bounded along it, so task 0 stays at x = 0
    # (plain CG divides by that zero curvature and returns inf). Task 1: A = diag(2, 3),
    # positive definite, solved exactly in 2 steps: x = (1/2, 1/3), untouched by task 0.
    matrices = torch.stack([torch.diag(torch.tensor([1.0, -1.0])), torch.diag(torch.tensor([2.0, 3.0]))])
    rhs = torch.ones(2, 2)
    solution = conjugate_gradient(lambda v: {"x": (matrices @ v["x"][..., None])[..., 0]}, {"x": rhs}, steps=5)["x"]
    assert torch.equal(solution[0], torch.zeros(2))
    assert torch.allclose(solution[1], torch.tensor([1 / 2, 1 / 3]), atol=1e-12)
    # Task 0 with rhs (2, 1): curvature 4 - 1 = 3 > 0 for the first direction, so it takes that
    # step, alpha = |r|^2 / 3 = 5/3, x = (10/3, 5/3); the next direction is (20/9, 40/9), of
    # curvature (400 - 1600) / 81 < 0, and it stops there, finite.
    rhs = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    solution = conjugate_gradient(lambda v: {"x": (matrices @ v["x"][..., None])[..., 0]}, {"x": rhs}, steps=5)["x"]
    assert torch.allclose(solution[0], torch.tensor([10 / 3, 5 / 3]), atol=1e-12)


def saved_bytes_alive(build_loss):
    """Bytes of the tensors autograd saved while building ``build_loss()``'s graph that are still
    alive once it is built: the memory the outer backward pass holds on to."""
    saved = []

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = build_loss()
    alive = {id(t): t.untyped_storage().nbytes() for t in (ref() for ref in saved) if t is not None}
    return loss, sum(alive.values())


@pytest.mark.parametrize("algorithm", [iMAML, Reptile])
def test_memory_held_for_the_outer_step_does_not_grow_with_inner_steps(algorithm):
    batch = SinusoidTasks(shots=10).__getitems__(range(4))
    held = {}
    for steps in (2, 12):
        torch.manual_seed(0)
        model = algorithm(MLP(1, (32, 32), 1), inner_lr=0.01, inner_steps=steps, batching="vmap")
        _, held[steps] = saved_bytes_alive(lambda: model.training_losses(batch)[0].mean())
        torch.manual_seed(0)
        maml = MAML(MLP(1, (32, 32), 1), inner_lr=0.01, inner_steps=steps, batching="vmap")
        _, held["maml", steps] = saved_bytes_alive(lambda: maml.training_losses(batch)[0].mean())
    assert held[12] == held[2]
    # Second-order MAML keeps every inner step's graph: 6 times the steps, over 4 times the memory.
    assert held["maml", 12] > 4 * held["maml", 2] > 0


def test_evaluation_uses_test_lam_and_training_lam():
    model = iMAML(MLP(1, (8,), 1), lam=2.0, test_lam=0.0)
    params = task_params(dict(model.backbone.named_parameters()), 3, detach=True)
    shifted = {n: p + 0.5 for n, p in params.items()}
    penalty = model.inner_options(torch.zeros(3, 4, 1), 5)["penalty"]
    count = sum(p.numel() for p in model.backbone.parameters())
    assert torch.allclose(penalty(shifted), torch.full((3,), 0.5 * 2.0 * 0.25 * count))
    model.eval()
    assert model.inner_options(torch.zeros(3, 4, 1), 5) == {}  # test_lam 0: plain fine-tuning


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": 0.0}, "lam must be positive"),
        ({"cg_steps": 0}, "cg_steps must be at least 1, got 0"),
        ({"test_lam": -1.0}, "test_lam must be a finite number, 0 or more, got -1.0"),
        ({"first_order": True}, "iMAML takes no first_order=True: its meta-gradient is implicit"),
        ({"adapt": ["head."]}, r"iMAML takes no adapt=\['head.'\]"),
        ({"inner_solver": "newton"}, "inner_solver must be one of 'gd', 'hessian_free', got 'newton'"),
        ({"inner_cg_steps": 0}, "inner_cg_steps must be at least 1, got 0"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        iMAML(MLP(), **kwargs)


def scalar_problem(value):
    """One task, one parameter ``w``; ``forward`` hands ``w`` to the loss, which is ``value(w)``."""
    return (lambda params, x: params["w"].expand(x.shape[0], 1)), (lambda w, y: value(w[:, 0]))


def test_line_search_halves_a_step_that_would_diverge(float64):
    # F(w) = 150/2 w^2, gradient 150 w, fixed step 0.02: w <- (1 - 3) w = -2 w, F grows 4-fold a
    # step (curvature 150 > 2 / 0.02 = 100). The line search tries t = 1 (F x4, refused), then
    # t = 1/2: w <- (1 - 1.5) w = -w / 2, F x1/4, accepted (Armijo asks a decrease of 1e-4 * t *
    # lr * |g|^2 only). So every step halves |w|, where plain gradient descent doubles it.
    forward, loss = scalar_problem(lambda w: 75 * w ** 2)
    start = {"w": torch.ones(1, 1)}
    x = y = torch.zeros(1, 1, 1)
    fixed = [p["w"].item() for p in safeguarded_trajectory(forward, start, x, y, loss, 3, 0.02, halvings=0)]
    searched = [p["w"].item() for p in safeguarded_trajectory(forward, start, x, y, loss, 3, 0.02)]
    assert searched == [1.0, -0.5, 0.25, -0.125]
    # With no halving allowed the step of 1 is refused and w stays: never an increase of F.
    assert fixed == [1.0, 1.0, 1.0, 1.0]
    from fewshot_lightning.inner import adapt as plain_adapt
    plain = plain_adapt(forward, start, x, y, loss, 3, 0.02, differentiable=False)
    assert plain["w"].item() == pytest.approx(-8.0)  # plain gradient descent: (-2)^3


def test_line_search_leaves_stable_steps_alone(float64):
    # Where the fixed step decreases F enough, the line search takes it unchanged: the result
    # equals plain gradient descent on the proximal problem (the paper's "iMAML, GD").
    model, batch = linear_problem()
    plain = iMAML(model, inner_lr=LR, inner_steps=5, lam=LAM)
    searched = iMAML(model, inner_lr=LR, inner_steps=5, lam=LAM, line_search=True)
    for a, b in zip(plain.trajectory(batch.support_x, batch.support_y, 5, differentiable=False),
                    searched.trajectory(batch.support_x, batch.support_y, 5)):
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-14)


def test_newton_falls_back_to_the_gradient_at_negative_curvature(float64):
    # F(w) = w^4/4 - w^2/2 at w = 0.1: F'' = 3 w^2 - 1 < 0, so conjugate gradient stops at once
    # (no descent direction from the Newton system) and the step is the gradient one,
    # w - lr * F'(w) = 0.1 - 0.1 * (0.001 - 0.1) = 0.1099, which decreases F: accepted at t = 1.
    forward, loss = scalar_problem(lambda w: w ** 4 / 4 - w ** 2 / 2)
    steps = list(safeguarded_trajectory(forward, {"w": torch.full((1, 1), 0.1)}, torch.zeros(1, 1, 1),
                                        torch.zeros(1, 1, 1), loss, 1, 0.1, newton=True))
    assert steps[1]["w"].item() == pytest.approx(0.1099, abs=1e-15)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_hessian_free_solver_gives_the_closed_form_meta_gradient(batching, float64):
    # The proximal problem of linear regression is quadratic in 3 parameters: one Newton step
    # with 3 CG steps lands on its solution (Armijo accepts t = 1 at an exact Newton step), so
    # the implicit meta-gradient equals the closed form, where 1 step of gradient descent does not.
    model, batch = linear_problem()
    exact = closed_form_meta_gradient(model, batch, LAM)
    learner = iMAML(model, inner_lr=LR, inner_steps=1, lam=LAM, cg_steps=3, inner_solver="hessian_free",
                    inner_cg_steps=3, batching=batching)
    loss = per_task_loss(learner(batch), batch.query_y).mean()
    assert torch.allclose(flat(torch.autograd.grad(loss, list(model.parameters()))), exact, atol=1e-10)
    assert (imaml_gradient(model, batch, 1, cg_steps=3) - exact).abs().max() > 1e-3


def test_a_non_finite_gradient_is_passed_on_not_absorbed(float64):
    # Task 1's support target is inf (as an fp16 overflow makes a gradient): its parameters turn
    # non-finite, as under plain gradient descent, so the outer step sees it; task 0 is untouched.
    forward = lambda params, x: params["w"][:, None, :].expand(-1, x.shape[1], -1)
    loss = lambda out, y: (out - y).square().mean((1, 2))
    y = torch.tensor([[[1.0]], [[float("inf")]]])
    steps = list(safeguarded_trajectory(forward, {"w": torch.zeros(2, 1)}, torch.zeros(2, 1, 1), y, loss, 1, 0.25))
    assert steps[1]["w"][0].item() == pytest.approx(0.5)  # 0 - 0.25 * 2 * (0 - 1), F from 1 to 0.25
    assert not torch.isfinite(steps[1]["w"][1]).any()
