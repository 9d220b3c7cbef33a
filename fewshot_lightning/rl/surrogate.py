"""Surrogate losses whose gradients are policy gradients: the inner (adaptation) loss and the
clipped outer loss of MAML for reinforcement learning.

Every function takes per-step tensors ``[B, ...]`` (log-probabilities under the parameters
being differentiated, the log-probabilities the samples were drawn with, advantages, a 0/1
or weight ``mask``) and returns one loss per task, ``[B]``: the weighted mean over the task's
steps, as MAML's code averages over all steps of a task's trajectories.

Second-order terms. MAML's meta-gradient differentiates the inner policy-gradient step, so it
needs the inner loss's Hessian, and a surrogate that only has the right gradient need not have
the right Hessian. Sampling from ``pi_theta`` makes the expected return's Hessian
``E[sum_t (grad^2 log pi_t + grad log pi_t grad log pi_t^T) A_t]`` (plus cross-time products).

- ``"lvc"`` (default): ``exp(log pi - stop_grad(log pi_sampling)) * A``, DiCE's "magic box"
  (Foerster et al., ICML 2018) applied to each action with its own advantage: the low
  variance curvature estimator of Rothfuss et al. (ProMP, ICLR 2019). Its gradient is the
  REINFORCE estimator; its Hessian keeps both terms above, so for a one-step problem (a
  bandit) it is an unbiased estimate of the exact Hessian. Over a trajectory it drops the
  products of score functions at different times (full DiCE keeps them, at a variance that
  grows with the horizon); Rothfuss et al. trade that bias for a far lower variance.
  Away from the sampling parameters (the later outer steps) the same expression is the
  importance-weighted policy gradient.
- ``"logprob"``: ``log pi * A`` (importance-weighted by a constant ratio away from the
  sampling parameters): MAML's original code. Same gradient, but its Hessian lacks the
  ``grad log pi grad log pi^T A`` term, so the meta-gradient misses how the inner step's
  samples depend on the initial policy (``tests/test_rl_surrogate.py`` shows the gap on a bandit).
"""
from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("lvc", "logprob")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-task weighted mean ``[B]`` of ``values`` ``[B, ...]`` over all but the first dimension."""
    return (values * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)


def policy_gradient_loss(
    log_probs: Tensor, sampling_log_probs: Tensor, advantages: Tensor, mask: Tensor, estimator: str = "lvc"
) -> Tensor:
    """The inner loss ``[B]``: minus a surrogate whose gradient is the policy gradient, with the
    second-order behaviour of ``estimator`` (see the module docstring)."""
    ratio = torch.exp(log_probs - sampling_log_probs.detach())
    if estimator == "lvc":
        return -masked_mean(ratio * advantages, mask)
    if estimator == "logprob":
        return -masked_mean(ratio.detach() * log_probs * advantages, mask)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")


def clipped_loss(log_probs: Tensor, sampling_log_probs: Tensor, advantages: Tensor, mask: Tensor, clip: float) -> Tensor:
    """PPO's clipped surrogate (Schulman et al., 2017), as a loss ``[B]``.

    ``min(r A, clip(r, 1 - clip, 1 + clip) A)`` with ``r`` the likelihood ratio of the new to
    the sampling policy: at the sampling parameters its gradient is the policy gradient; once
    ``r`` leaves ``[1 - clip, 1 + clip]`` in the direction the advantage favours, the sample
    stops pulling, which keeps several optimizer steps on the same samples near them.
    """
    ratio = torch.exp(log_probs - sampling_log_probs.detach())
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    return -masked_mean(surrogate, mask)
