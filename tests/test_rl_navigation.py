"""The point-robot environment, its goals, rollouts, returns and the linear baseline, against
hand computations."""
import math

import numpy as np
import pytest
import torch

from fewshot_lightning.data import EpisodeSampler
from fewshot_lightning.rl import (
    GaussianMLPPolicy, GoalTasks, PointNavigation, advantages, collect, gaussian_log_prob, linear_baseline,
    reward_to_go, task_noise,
)
from fewshot_lightning.rl.returns import baseline_features


def zero_mean_unit_std(params, observations):
    """A 'policy' whose action is its noise: mean 0, standard deviation 1."""
    zeros = torch.zeros_like(observations)
    return zeros, zeros


def test_hand_computed_trajectory_clips_rewards_and_ends_at_the_goal():
    env = PointNavigation(horizon=4)
    goals = torch.tensor([[0.25, -0.1]], dtype=torch.float64)
    # Policy units: the first x-action 2.0 clips to 1 (velocity 0.1); -0.5 gives -0.05.
    actions = torch.tensor([[[[2.0, -0.5], [1.0, -0.5], [0.45, 0.05], [-1.0, 1.0]]]], dtype=torch.float64)
    rollouts = collect(zero_mean_unit_std, {}, env, goals, actions)
    # Positions (0, 0) -> (0.1, -0.05) -> (0.2, -0.1) -> (0.245, -0.095): within 0.01 of the goal
    # in both coordinates after step 3, which ends the episode before step 4.
    expected_positions = torch.tensor([[0.0, 0.0], [0.1, -0.05], [0.2, -0.1], [0.245, -0.095]], dtype=torch.float64)
    assert torch.allclose(rollouts.observations[0, 0], expected_positions)
    expected_rewards = torch.tensor([-math.sqrt(0.15**2 + 0.05**2), -0.05, -math.sqrt(2) * 0.005, 0.0], dtype=torch.float64)
    assert torch.allclose(rollouts.rewards[0, 0], expected_rewards)
    assert rollouts.mask[0, 0].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.allclose(rollouts.returns, expected_rewards.sum().view(1, 1))
    assert torch.equal(rollouts.actions, actions)  # stored as sampled, not clipped
    # Standard normal log-density of each action.
    expected_log_probs = -0.5 * actions.square().sum(-1) - math.log(2 * math.pi)
    assert torch.allclose(rollouts.log_probs, expected_log_probs)


def test_step_moves_at_most_max_speed_and_rewards_minus_distance():
    env = PointNavigation(max_speed=0.1)
    positions = torch.tensor([[[0.3, -0.2]]])
    goal = torch.tensor([[0.0, 0.0]])
    moved, reward, reached = env.step(positions, torch.tensor([[[-5.0, 0.3]]]), goal)
    assert torch.allclose(moved, torch.tensor([[[0.2, -0.17]]]))
    assert torch.allclose(reward, -torch.tensor([[math.hypot(0.2, 0.17)]]))
    assert not reached.any()


def test_tasks_and_trajectories_run_together_as_they_run_alone():
    torch.manual_seed(0)
    env = PointNavigation(horizon=30)
    policy = GaussianMLPPolicy(hidden=(8,))
    forward = torch.func.vmap(lambda p, x: torch.func.functional_call(policy, p, (x,)))
    params = {n: p.detach().unsqueeze(0).expand(3, *p.shape) for n, p in policy.named_parameters()}
    goals = torch.rand(3, 2) - 0.5
    noise = task_noise(torch.tensor([11, 12, 13]), 0, (4, 30, 2), like=goals)
    together = collect(forward, params, env, goals, noise)
    for b in range(3):
        alone = collect(forward, {n: p[b : b + 1] for n, p in params.items()}, env, goals[b : b + 1], noise[b : b + 1])
        for joint, single in zip(together, alone):
            assert torch.allclose(joint[b : b + 1], single, atol=1e-6)


def test_task_noise_depends_on_the_task_seed_and_phase_only():
    like = torch.zeros(1)
    batch = task_noise(torch.tensor([5, 7, 9]), phase=1, shape=(2, 3, 2), like=like)
    alone = task_noise(torch.tensor([7]), phase=1, shape=(2, 3, 2), like=like)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(task_noise(torch.tensor([7]), phase=2, shape=(2, 3, 2), like=like), alone)


def test_goal_tasks_follow_the_seed_epoch_index_contract():
    tasks = GoalTasks(num_tasks=10, seed=3)
    assert torch.equal(tasks[13].goals, GoalTasks(num_tasks=10, seed=3)[13].goals)  # reproducible
    assert not torch.equal(tasks[13].goals, tasks[3].goals)  # epoch 1 draws new goals
    assert tasks[13].seeds != tasks[3].seeds
    # Two DDP ranks walk disjoint halves of the one-process epoch.
    ranks = [list(EpisodeSampler(tasks, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(EpisodeSampler(tasks))
    # Uniform on [-0.5, 0.5]^2: 2,000 goals have mean 0 within 3 standard errors (0.29 / sqrt(2000)).
    goals = torch.stack([GoalTasks(2000, 0)[i].goals for i in range(2000)])
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    assert goals.mean(0).abs().max() < 3 * 0.2887 / math.sqrt(2000)
    with pytest.raises(ValueError, match="low < high"):
        GoalTasks(low=0.5, high=0.5)


def test_reward_to_go_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    # G_2 = 3, G_1 = 2 + 0.5 * 3, G_0 = 1 + 0.5 * 2 + 0.25 * 3.
    assert torch.allclose(reward_to_go(rewards, 0.5), torch.tensor([[2.75, 3.5, 3.0]]))


def test_linear_baseline_is_a_per_task_ridge_fit_on_valid_steps():
    torch.manual_seed(0)
    observations = torch.randn(2, 3, 5, 2, dtype=torch.float64)
    returns = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.ones(2, 3, 5, dtype=torch.float64)
    mask[0, 1, 3:] = 0  # one trajectory of task 0 ended early
    values = linear_baseline(observations, returns, mask)
    # Independent computation for task 0: numpy least squares on its valid steps.
    features = baseline_features(observations)[0].reshape(-1, 8).numpy()
    keep = mask[0].reshape(-1).numpy() == 1
    gram = features[keep].T @ features[keep] + 1e-5 * np.eye(8)
    coefficients = np.linalg.solve(gram, features[keep].T @ returns[0].reshape(-1).numpy()[keep])
    assert np.allclose(values[0].reshape(-1).numpy(), features @ coefficients, atol=1e-8)
    # Task 1's data does not move task 0's baseline.
    changed = returns.clone()
    changed[1] += 100
    assert torch.allclose(linear_baseline(observations, changed, mask)[0], values[0])
    # Returns that are a linear function of the features are reproduced (up to the ridge's
    # shrinkage of the small time features' coefficients).
    exact = 2 * observations[..., 0] - observations[..., 1].square() + 3 * torch.arange(5) / 100 - 1
    assert torch.allclose(linear_baseline(observations, exact, mask), exact, atol=1e-3)


def test_advantages_are_standardised_per_task_and_zero_after_the_episode():
    env = PointNavigation(horizon=20)
    goals = torch.tensor([[0.2, 0.1], [-0.4, 0.3]])
    rollouts = collect(zero_mean_unit_std, {}, env, goals, task_noise(torch.tensor([1, 2]), 0, (5, 20, 2), like=goals))
    mask = rollouts.mask.clone()
    mask[0, 0, 10:] = 0
    rollouts = rollouts._replace(mask=mask, rewards=rollouts.rewards * mask)
    values = advantages(rollouts, discount=0.99)
    assert torch.all(values[0, 0, 10:] == 0)
    for b in range(2):
        valid = values[b][mask[b] == 1]
        assert abs(valid.mean()) < 1e-5 and abs(valid.std(unbiased=False) - 1) < 1e-4


def test_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std, actions = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    assert torch.allclose(gaussian_log_prob(actions, mean, log_std), expected, atol=1e-6)
