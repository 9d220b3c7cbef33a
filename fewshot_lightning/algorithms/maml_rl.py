"""MAML for reinforcement learning (Finn, Abbeel & Levine, ICML 2017, section 5.3), and ANIL for
policies (Raghu et al., ICLR 2020), on the functional inner loop."""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..inner import Params, adapt, functional, select_parameters, split_parameters, task_params
from ..metrics import MeanConfidenceInterval
from ..rl.navigation import PointNavigation
from ..rl.policy import gaussian_log_prob
from ..rl.returns import advantages
from ..rl.rollouts import PolicyForward, Rollouts, collect, task_noise
from ..rl.surrogate import ESTIMATORS, clipped_loss, policy_gradient_loss
from ..rl.tasks import GoalBatch
from .base import MetaLearner

#: Rollouts of one inner step and their advantages.
Support = Tuple[Rollouts, Tensor]


class MAMLRL(MetaLearner):
    """MAML for policies: adapt to a task with policy-gradient steps on the task's own rollouts,
    meta-train the initial policy for the return after adaptation.

    A training step takes a batch of tasks (:class:`~fewshot_lightning.rl.GoalBatch`) and, for
    all of them at once:

    1. rolls out ``trajectories`` episodes of the current policy in every task;
    2. adapts every task's policy with ``inner_steps`` REINFORCE steps (a linear feature
       baseline fitted per task by least squares on that task's rollouts, advantages
       standardised per task; :mod:`fewshot_lightning.rl.returns`), collecting fresh rollouts
       of the adapted policy before each further step;
    3. rolls out the adapted policies, and takes ``outer_steps`` optimizer steps on PPO's
       clipped surrogate of those rollouts, differentiated through the inner steps (second
       order, with the inner loss ``estimator``; :mod:`fewshot_lightning.rl.surrogate`). Each
       outer step recomputes the adaptation from the stored rollouts with the current
       parameters (the inner loss is importance-weighted, so it stays a policy gradient).

    The paper meta-optimises with TRPO. A clipped surrogate optimised by a torch optimizer
    keeps a trust region over several steps on the same rollouts (Rothfuss et al.'s ProMP
    does the same for MAML) and is ordinary Lightning manual optimization: any
    ``optimizer``/``lr_scheduler``, optimizer state in checkpoints, gradients averaged across
    DDP ranks by ``manual_backward``. TRPO would need conjugate gradients on Fisher-vector
    products through the inner step (third derivatives, or finite differences as in the
    paper's code) and a line search re-adapting every task, each with its own cross-rank
    reduction, outside any optimizer. One training step makes ``outer_steps`` optimizer
    steps, so Lightning's ``global_step`` (and ``max_steps``) count those; the configs bound
    training by epochs.

    Evaluation rolls out the initial policy and the policy after each of
    ``test_inner_steps`` adaptation steps on fixed held-out tasks and logs the mean return
    after each, ``{val,test}/return_after_<k>_steps``, with a 95% confidence interval over
    tasks (``..._ci95``). A return is the undiscounted sum of rewards of a trajectory,
    averaged over the task's ``trajectories``, as the papers report it.

    Every random draw of a task's rollouts comes from that task's seed, so a task gives the
    same trajectories in any batch, process or device: a run on two DDP ranks makes the same
    updates as one process given the same tasks.

    Args:
        backbone: the policy, an ``nn.Module`` whose ``forward(observations)`` returns the
            Gaussian's ``(mean, log_std)``, e.g. :class:`~fewshot_lightning.rl.GaussianMLPPolicy`.
        environment: the dynamics and rewards given a task (default
            :class:`~fewshot_lightning.rl.PointNavigation`, horizon 100).
        trajectories: episodes per task for every inner step and for the outer loss (20).
        inner_lr: step size of the first adaptation step (0.1).
        inner_steps: adaptation steps while meta-training (1).
        later_inner_lr: step size of every later step (default ``inner_lr / 2``: Finn et al.
            halve it after the first step).
        test_inner_steps: adaptation steps at validation and test; the return is logged after
            each.
        first_order: drop the second-order terms (first-order MAML).
        adapt: names of parameters to adapt, or prefixes ending in ``.``; default all.
            ``["head."]`` adapts the mean's last layer only: ANIL.
        estimator: ``"lvc"`` or ``"logprob"``, the inner surrogate
            (:func:`~fewshot_lightning.rl.policy_gradient_loss`).
        discount: discount of the returns behind the advantages (rllab's 0.99); reported
            returns are undiscounted.
        outer_steps: optimizer steps per batch of rollouts.
        clip: PPO's clipping range of the outer likelihood ratio.
        optimizer, lr_scheduler: see :class:`~.base.MetaLearner` (the scheduler steps once per
            training step).

    Example::

        import lightning as L
        from fewshot_lightning.algorithms import MAMLRL
        from fewshot_lightning.rl import GaussianMLPPolicy, NavigationDataModule

        model = MAMLRL(GaussianMLPPolicy(hidden=(100, 100)), inner_lr=0.1, trajectories=20)
        trainer = L.Trainer(max_epochs=10)
        trainer.fit(model, NavigationDataModule(meta_batch_size=20, train_tasks=1000))
        trainer.test(model, NavigationDataModule())   # test/return_after_1_steps ± ..._ci95
    """

    needs_grad_at_eval = True
    #: Goals to reach (:class:`~fewshot_lightning.rl.NavigationDataModule`), not labelled data.
    task_kinds = ("reinforcement",)

    def __init__(
        self,
        backbone: nn.Module,
        environment: Optional[PointNavigation] = None,
        trajectories: int = 20,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        later_inner_lr: Optional[float] = None,
        test_inner_steps: int = 3,
        first_order: bool = False,
        adapt: Optional[Sequence[str]] = None,
        estimator: str = "lvc",
        discount: float = 0.99,
        outer_steps: int = 5,
        clip: float = 0.2,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "environment", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        for name, value, least in (("trajectories", trajectories, 2), ("inner_steps", inner_steps, 1),
                                   ("test_inner_steps", test_inner_steps, 1), ("outer_steps", outer_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}.")
        later_inner_lr = inner_lr / 2 if later_inner_lr is None else later_inner_lr
        if not (inner_lr > 0 and later_inner_lr > 0):
            raise ValueError(f"inner step sizes must be positive, got inner_lr={inner_lr}, later_inner_lr={later_inner_lr}.")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}.")
        if not 0 < clip < 1:
            raise ValueError(f"clip must be in (0, 1), got {clip}.")
        self.environment = PointNavigation() if environment is None else environment
        for size in ("observation_size", "action_size"):
            expected, actual = getattr(self.environment, size), getattr(backbone, size, None)
            if actual is not None and actual != expected:
                raise ValueError(
                    f"the policy's {size} is {actual} but {type(self.environment).__name__} has {expected}: "
                    f"build the policy with {size}={expected}."
                )
        self.trajectories = trajectories
        self.inner_lr, self.later_inner_lr = inner_lr, later_inner_lr
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.first_order = first_order
        self.adapt_names = select_parameters(backbone, adapt)
        self.estimator, self.discount = estimator, discount
        self.outer_steps, self.clip = outer_steps, clip
        self.curves = nn.ModuleDict({stage: MeanConfidenceInterval(size=test_inner_steps + 1) for stage in ("val", "test")})

    # -- the building blocks ------------------------------------------------------------------
    def initial_params(self, tasks: int, detach: bool = False) -> Params:
        """The adapted parameters' starting point for ``tasks`` tasks, ``[tasks, ...]`` each."""
        return task_params(split_parameters(self.backbone, self.adapt_names)[0], tasks, detach)

    def functional(self) -> PolicyForward:
        """The policy as ``forward(params, observations)`` over tasks; parameters not adapted are shared."""
        return functional(self.backbone, split_parameters(self.backbone, self.adapt_names)[1])

    def rollouts(self, params: Params, batch: GoalBatch, phase: int) -> Rollouts:
        """``trajectories`` episodes of every task's policy; ``phase`` (the inner step they serve)
        picks the noise, so every phase of a task explores afresh."""
        shape = (self.trajectories, self.environment.horizon, self.environment.action_size)
        noise = task_noise(batch.seeds, phase, shape, like=batch.goals)
        return collect(self.functional(), params, self.environment, batch.goals, noise)

    def step_size(self, step: int) -> float:
        return self.inner_lr if step == 0 else self.later_inner_lr

    def adapt_step(self, params: Params, support: Support, step: int, differentiable: bool) -> Params:
        """Every task's parameters after one policy-gradient step on its ``support`` rollouts."""
        rollouts, task_advantages = support
        observations = rollouts.observations.flatten(1, 2)
        # adapt() feeds (outputs, targets) to the loss: the targets carry everything per step.
        targets = torch.cat(
            [rollouts.actions, task_advantages.unsqueeze(-1), rollouts.log_probs.unsqueeze(-1), rollouts.mask.unsqueeze(-1)],
            dim=-1,
        ).flatten(1, 2)
        return adapt(
            self.functional(), params, observations, targets, self.inner_loss, steps=1, lr=self.step_size(step),
            second_order=not self.first_order, differentiable=differentiable,
        )

    def inner_loss(self, outputs: Tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        """Per-task policy-gradient loss ``[B]`` from the policy's ``(mean, log_std)`` and the
        packed ``[actions, advantage, sampling log-prob, mask]`` of every step."""
        mean, log_std = outputs
        actions, task_advantages, sampling_log_probs, mask = targets[..., :-3], targets[..., -3], targets[..., -2], targets[..., -1]
        log_probs = gaussian_log_prob(actions, mean, log_std)
        return policy_gradient_loss(log_probs, sampling_log_probs, task_advantages, mask, self.estimator)

    def outer_loss(self, supports: List[Support], query: Rollouts, query_advantages: Tensor) -> Tensor:
        """The meta-loss: clipped surrogate of the adapted policies' rollouts, a differentiable
        function of the initial parameters through the inner steps on ``supports``."""
        params = self.initial_params(query.observations.shape[0])
        for step, support in enumerate(supports):
            params = self.adapt_step(params, support, step, differentiable=True)
        mean, log_std = self.functional()(params, query.observations.flatten(1, 2))
        log_probs = gaussian_log_prob(query.actions.flatten(1, 2), mean, log_std)
        return clipped_loss(log_probs, query.log_probs.flatten(1, 2), query_advantages.flatten(1, 2),
                            query.mask.flatten(1, 2), self.clip).mean()

    def sample(self, batch: GoalBatch) -> Tuple[List[Support], Rollouts, Tensor]:
        """Rollouts for one meta-update: those of every inner step with their advantages, then
        the adapted policies' rollouts and theirs. No outer graph is kept."""
        supports: List[Support] = []
        with torch.no_grad():
            params = self.initial_params(batch.num_tasks, detach=True)
            for step in range(self.inner_steps):
                rollouts = self.rollouts(params, batch, phase=step)
                supports.append((rollouts, advantages(rollouts, self.discount)))
                params = self.adapt_step(params, supports[-1], step, differentiable=False)
            query = self.rollouts(params, batch, phase=self.inner_steps)
            return supports, query, advantages(query, self.discount)

    def setup(self, stage: str) -> None:
        if stage == "predict":
            # predict_step reads labelled queries; a goal batch has none (it stopped with
            # "'GoalBatch' object has no attribute 'support_x'").
            raise ValueError(
                f"{type(self).__name__} has no predict: its tasks are goals to reach, not labelled queries to "
                "predict. Use test (or validate) for the return after each adaptation step.")
        super().setup(stage)

    def differentiates_inner_gradient(self) -> bool:
        """Whether the meta-gradient runs through the inner policy-gradient steps' own gradient
        (second order)."""
        return not self.first_order

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: GoalBatch, batch_idx: int) -> Tensor:
        supports, query, query_advantages = self.sample(batch)
        optimizer = self.optimizers()
        for outer_step in range(self.outer_steps):
            loss = self.outer_loss(supports, query, query_advantages)
            if outer_step == 0:
                first_loss = loss.detach()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        size = batch.num_tasks
        self.log("train/return_pre", supports[0][0].returns.mean(), prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/return_post", query.returns.mean(), prog_bar=True, batch_size=size, sync_dist=True)
        # No train/loss: at the first outer step the clipped surrogate's ratio is 1 and the
        # advantages are standardised per goal, so the loss is -mean(A) = 0 at every iteration.
        return first_loss

    # -- evaluation ---------------------------------------------------------------------------
    def adaptation_returns(self, batch: GoalBatch, steps: int) -> Tensor:
        """Mean return of every task's ``trajectories`` episodes after 0, 1, ..., ``steps``
        adaptation steps, ``[B, steps + 1]``; no outer graph."""
        with self._eval_context():
            # Tensors made under inference_mode cannot enter autograd; copies can.
            batch = GoalBatch(*(t.clone() for t in batch))
            params = self.initial_params(batch.num_tasks, detach=True)
            returns = []
            for step in range(steps + 1):
                rollouts = self.rollouts(params, batch, phase=step)
                returns.append(rollouts.returns.mean(1))
                if step < steps:
                    support = (rollouts, advantages(rollouts, self.discount))
                    params = self.adapt_step(params, support, step, differentiable=False)
        return torch.stack(returns, dim=1)

    @property
    def plateau_metric(self) -> Tuple[str, str]:
        """A ``ReduceLROnPlateau`` outer scheduler steps on the validation return after the
        last adaptation step (higher is better)."""
        return f"val/return_after_{self.test_inner_steps}_steps", "max"

    def _curve_sized(self, stage: str) -> None:
        # test_inner_steps may have been changed since construction (a script evaluating with
        # more or fewer steps): the curve has that many points, or goals and steps were mixed.
        self.curves[stage] = self.curves[stage].of_size(self.test_inner_steps + 1, self.device)

    def on_validation_epoch_start(self) -> None:
        self._curve_sized("val")

    def on_test_epoch_start(self) -> None:
        self._curve_sized("test")

    def environment_settings(self) -> Dict[str, Any]:
        """The environment's class and settings (its plain-valued attributes: ``horizon``,
        ``max_speed``, ``goal_tolerance``), saved in checkpoints: it is not a hyper-parameter (an
        object), so without this a test under another horizon or speed, whose returns are not
        comparable with training's, ran without a word."""
        settings = {name: value for name, value in sorted(vars(self.environment).items())
                    if not name.startswith("_") and isinstance(value, (bool, int, float, str))}
        return {"class": f"{type(self.environment).__module__}.{type(self.environment).__qualname__}", **settings}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["environment"] = self.environment_settings()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved, current = checkpoint.get("environment"), self.environment_settings()
        if isinstance(saved, dict) and saved != current:
            differ = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
            rank_zero_warn(
                "The checkpoint's policy was trained in " + ", ".join(f"{name}={saved.get(name)!r}" for name in differ)
                + "; this run's environment has " + ", ".join(f"{name}={current.get(name)!r}" for name in differ)
                + ", as configured: its returns are not comparable with training's (to evaluate as trained, pass "
                "the run's config.yaml).")

    def validation_step(self, batch: GoalBatch, batch_idx: int) -> None:
        self.curves["val"].update(self.adaptation_returns(batch, self.test_inner_steps))

    def test_step(self, batch: GoalBatch, batch_idx: int) -> None:
        self.curves["test"].update(self.adaptation_returns(batch, self.test_inner_steps))

    def _log_curve(self, stage: str) -> None:
        metric = self.curves[stage]
        if not metric.update_called:
            return
        # compute() reduces over processes: every rank logs the same numbers.
        means, ci95 = metric.compute()
        metric.reset()
        for step, (mean, interval) in enumerate(zip(means.tolist(), ci95.tolist())):
            self.log(f"{stage}/return_after_{step}_steps", mean, prog_bar=step == self.inner_steps)
            self._step_plateau(f"{stage}/return_after_{step}_steps", mean)
            self.log(f"{stage}/return_after_{step}_steps_ci95", interval)
        if stage == "test":
            # The same points as one series against the adaptation step, for any logger to draw.
            for logger in self.loggers:
                for step, mean in enumerate(means.tolist()):
                    logger.log_metrics({"test/adaptation_curve_return": mean}, step=step)

    def on_validation_epoch_end(self) -> None:
        self._log_curve("val")

    def on_test_epoch_end(self) -> None:
        self._warn_if_partial_test(self.curves["test"], "test/return_after_<k>_steps")
        self._log_curve("test")
