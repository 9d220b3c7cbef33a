"""The surrogate losses on a softmax bandit with closed forms, and MAML-RL's meta-gradient
against finite differences.

Bandit: three arms with rewards ``r``, policy ``softmax(theta)``, expected reward
``J(theta) = softmax(theta) . r``. Its gradient and Hessian are exact (autograd of that closed
form), and an expectation over actions is exact too: every arm, weighted by its probability.
The surrogates average per-sample terms with ``mask`` weights, so feeding them all arms with
``mask = pi`` gives the expected estimator with no sampling error.
"""
import pytest
import torch
from torch import nn

from fewshot_lightning.algorithms import MAMLRL
from fewshot_lightning.inner import adapt, functional, task_params
from fewshot_lightning.rl import GaussianMLPPolicy, GoalTasks, PointNavigation, clipped_loss, collate_goals, policy_gradient_loss

REWARDS = torch.tensor([1.0, 0.3, -0.5], dtype=torch.float64)
THETA = torch.tensor([0.2, -0.4, 0.5], dtype=torch.float64)
BASELINE = 0.2  # any constant baseline leaves the expectations unchanged


def expected_reward(theta):
    return torch.softmax(theta, -1) @ REWARDS


class Logits(nn.Module):
    """The bandit policy as a module: its parameter is the logits, its input is ignored."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta.expand(x.shape[0], -1)


def bandit_loss(estimator):
    """Inner loss for adapt(): targets carry (arm, mask weight); log-probs come from the logits."""

    def loss(logits, targets):
        arms, weights = targets[..., 0].long(), targets[..., 1]
        log_probs = torch.log_softmax(logits, -1).gather(-1, arms.unsqueeze(-1)).squeeze(-1)
        return policy_gradient_loss(log_probs, log_probs, REWARDS[arms] - BASELINE, weights, estimator)

    return loss


def all_arms(theta):
    """Every arm once, weighted by its probability under ``theta``: the exact expectation."""
    arms = torch.arange(3, dtype=torch.float64)
    return torch.stack([arms, torch.softmax(theta.detach(), -1)], -1).unsqueeze(0)  # [1, 3, 2]


@pytest.mark.parametrize("estimator", ["lvc", "logprob"])
def test_gradient_is_the_reinforce_estimator_and_its_expectation_is_exact(estimator):
    theta = THETA.clone().requires_grad_()
    arms = torch.tensor([0, 2, 2, 1])
    targets = torch.stack([arms.double(), torch.ones(4, dtype=torch.float64)], -1).unsqueeze(0)
    loss = bandit_loss(estimator)(theta.expand(1, 4, 3), targets)
    (gradient,) = torch.autograd.grad(-loss.sum(), theta)
    # REINFORCE by hand: mean over samples of (onehot(a) - pi) (r_a - b).
    pi = torch.softmax(THETA, -1)
    by_hand = torch.stack([(torch.eye(3, dtype=torch.float64)[a] - pi) * (REWARDS[a] - BASELINE) for a in arms]).mean(0)
    assert torch.allclose(gradient, by_hand, atol=1e-12)
    # In expectation: the exact gradient pi * (r - J).
    loss = bandit_loss(estimator)(theta.expand(1, 3, 3), all_arms(THETA))
    (expected,) = torch.autograd.grad(-loss.sum(), theta)
    assert torch.allclose(expected, torch.func.grad(expected_reward)(THETA), atol=1e-12)


def test_lvc_hessian_is_exact_in_expectation_and_the_logprob_surrogate_misses_a_term():
    exact = torch.autograd.functional.hessian(expected_reward, THETA)
    hessians = {}
    for estimator in ("lvc", "logprob"):
        objective = lambda theta: -bandit_loss(estimator)(theta.expand(1, 3, 3), all_arms(THETA)).sum()
        hessians[estimator] = torch.autograd.functional.hessian(objective, THETA.clone())
    assert torch.allclose(hessians["lvc"], exact, atol=1e-12)
    # What the log-prob surrogate lacks is E[grad log pi grad log pi^T (r - b)], not small here.
    assert (hessians["logprob"] - exact).abs().max() > 0.05


def meta_gradient(estimator, alpha):
    """Gradient of the expected post-update reward through one inner step, by our pieces:
    adapt() on the inner surrogate, then the clipped outer surrogate of the adapted policy."""
    policy = Logits(THETA)
    forward = functional(policy)
    dummy = torch.zeros(1, 3, 1, dtype=torch.float64)
    # adapt() descends a loss; a negative step size is not needed: the loss is minus the objective.
    adapted = adapt(forward, task_params(dict(policy.named_parameters()), 1), dummy, all_arms(THETA),
                    bandit_loss(estimator), steps=1, lr=alpha)["theta"]  # [1, 3]
    post = all_arms(adapted[0])
    log_probs = torch.log_softmax(adapted, -1)  # log pi'(a) of the arms a = 0, 1, 2, in that order
    loss = clipped_loss(log_probs, log_probs, (REWARDS - BASELINE).unsqueeze(0), post[..., 1], clip=0.2)
    (gradient,) = torch.autograd.grad(loss.sum(), policy.theta)
    return -gradient


def test_meta_gradient_through_one_inner_step_is_exact_with_lvc():
    alpha = 0.7
    # Exact: the gradient of J(theta + alpha grad J(theta)), by autograd of the closed form.
    exact = torch.func.grad(lambda theta: expected_reward(theta + alpha * torch.func.grad(expected_reward)(theta)))(THETA)
    assert torch.allclose(meta_gradient("lvc", alpha), exact, atol=1e-12)
    # First order in alpha the two agree; MAML's log-prob surrogate is off at second order.
    gap = (meta_gradient("logprob", alpha) - exact).abs().max()
    assert gap > 0.01


def test_maml_rl_meta_gradient_matches_finite_differences_and_first_order_does_not():
    """The training loss as a function of the initial parameters (rollouts fixed): autograd
    through the inner step agrees with central differences; first-order MAML does not."""
    torch.manual_seed(0)
    batch = collate_goals([GoalTasks(10, 0)[i] for i in range(2)])
    batch = batch._replace(goals=batch.goals.double())
    model = MAMLRL(GaussianMLPPolicy(hidden=(8, 8)), PointNavigation(horizon=10), trajectories=3, inner_lr=0.5).double()
    supports, query, query_advantages = model.sample(batch)
    parameters = list(model.parameters())
    direction = [torch.randn_like(p) for p in parameters]

    def loss_along(step):
        with torch.no_grad():
            for p, d in zip(parameters, direction):
                p.add_(step * d)
        value = model.outer_loss(supports, query, query_advantages).item()
        with torch.no_grad():
            for p, d in zip(parameters, direction):
                p.sub_(step * d)
        return value

    h = 1e-5
    numeric = (loss_along(h) - loss_along(-h)) / (2 * h)
    slopes = {}
    for first_order in (False, True):
        model.first_order = first_order
        gradients = torch.autograd.grad(model.outer_loss(supports, query, query_advantages), parameters)
        slopes[first_order] = sum((g * d).sum() for g, d in zip(gradients, direction)).item()
    assert abs(slopes[False] - numeric) < 1e-6 * max(1.0, abs(numeric))
    assert abs(slopes[True] - numeric) > 1e-3 * abs(numeric)
