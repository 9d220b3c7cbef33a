"""Optimization-based meta-learning: MAML, first-order MAML, ANIL, Meta-SGD and MAML++."""
from __future__ import annotations

import contextlib
import math
import numbers
import platform
import time
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from .._text import listed
from ..data.task import TaskBatch
from ..inner import (
    BATCHING, MEMORY_FORMATS, Forward, InnerLearningRate, Params, channels_last, functional, select_parameters,
    split_parameters, task_params, trajectory,
)
from ..metrics import MeanConfidenceInterval
from .base import MetaLearner, TaskShapeError, WeightsMismatchError, per_task_loss
from .episode_ops import running_buffers


#: How much faster than the channels-first paths a channels-last path must time to be chosen
#: by "auto" (a relative margin, so that timing noise does not decide a near tie).
CHANNELS_LAST_MARGIN = 0.05
#: With ``tasks_per_backward="auto"``, the slowest a group size may time against the fastest size
#: timed and still be chosen (a relative margin: the smallest group within it holds the least
#: memory at no more than this cost in time).
GROUP_MARGIN = 0.05


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    Each training step adapts ``backbone`` to every task of the batch with ``inner_steps``
    gradient steps on its support set, then returns the mean query loss of the adapted
    networks; its backward pass is the meta-gradient, through the inner steps (second
    order) or not (``first_order=True``: FOMAML). Tasks run batched under ``torch.func.vmap``.

    The pieces are public, for algorithms built on MAML and for your own code:
    :meth:`initial_params`, :meth:`trajectory` / :meth:`adapt` (per-task adapted parameters)
    and :meth:`predict` (outputs under given per-task parameters); see
    :mod:`fewshot_lightning.inner` for the pure functions underneath.

    Evaluation adapts with ``test_inner_steps`` steps and keeps no outer graph; at test time
    it also records the query score after every step (the adaptation curve), logged as
    ``test/<score>_after_<k>_steps`` and as a series ``test/adaptation_curve_<score>``
    against the step, for any logger.

    Args:
        backbone: any ``nn.Module`` mapping inputs to logits (classification) or predictions.
        inner_lr: inner-loop step size (initial value if learned).
        inner_steps: inner steps while meta-training.
        test_inner_steps: inner steps at validation/test (default: ``inner_steps``).
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: train the inner learning rates with the outer loop.
        per_step_lr: a separate rate per inner step.
        per_parameter_lr: a rate per parameter element (Meta-SGD).
        adapt: names of parameters to adapt, or prefixes ending in ``.`` (``["head."]``);
            default all, frozen ones (``requires_grad=False``) included: the outer loop leaves
            those unchanged, the inner loop adapts them (a warning at construction names them
            and the selection that keeps them fixed).
        batching: ``"vmap"`` or ``"loop"`` over the tasks of a batch (same numbers, different
            speed), or ``"auto"``: on the first batch, try vmap (falling back to the loop with a
            warning if the model cannot run under it), time one training step of each, keep the faster for the whole run and
            log both timings. Evaluation (validation, test, prediction, adaptation curves)
            adapts without the outer graph, a different workload: under ``"auto"`` it makes its
            own choice, once, on its first batch (:meth:`choose_batching`).
        memory_format: layout of the task-by-task passes: ``"contiguous"`` (NCHW throughout),
            ``"channels_last"`` (every 4-D weight passed NHWC, so convolutions, batch norm and
            pooling run channels-last; with ``batching="vmap"`` the support passes run under
            vmap, channels-first, and the query passes task by task, channels-last, see
            :meth:`execution`), or ``"auto"`` (default): for a model with 4-D weights, each
            batching is timed both ways on the first batch and the fastest of the four paths is
            kept and logged (a channels-last one only if at least 5% faster than the
            channels-first ones, see :meth:`choose_batching`). Same numbers to rounding. On a
            2-core CPU the channels-last loop ran Conv4 MAML on 28x28 grey images about 1.25x as
            fast as the NCHW loop; on 84x84x3 images 1.5x as fast first order, and half as fast
            second order (``benchmarks/speed.py``, docs/benchmarks.md).
        optimizer, lr_scheduler: see :class:`~.base.MetaLearner`.
        multi_step_loss_steps: MAML++'s multi-step loss (Antoniou, Edwards & Storkey, ICLR 2019):
            for this many outer steps the training loss is a weighted sum of the query losses
            after every inner step, the weights moving linearly from uniform to all on the last
            step; afterwards only the last step counts (as plain MAML). 0 (default) turns it off.
        first_order_steps: MAML++'s derivative-order annealing: the first this many outer steps
            are first order, the rest second order. 0 (default) turns it off.
        transductive: at evaluation (validation, test, prediction, adaptation curves), pass
            each task's queries together (``True``, default: with batch norm on batch
            statistics, a query's output depends on the other queries of its task, the
            *transductive* setting of MAML's and Reptile's papers), or each query in a batch
            with the support set alone and keep its output (``False``: Reptile's
            non-transductive setting; (S + 1) x Q images pass instead of Q, one pass per query,
            so the query passes cost S + 1 times more or worse: on a 2-core CPU, 32 Kanji tasks
            of 5-way 1-shot with 25 queries, 15 s a query pass against 1.5 to 3 s, and a test
            batch makes one after every inner step; under ``batching="auto"`` evaluation's
            choice times eight such evaluation steps in a run with more than eight evaluation
            batches: fix ``batching`` and ``memory_format`` to skip them). Training is
            unaffected. Without batch norm on batch statistics the two give the same outputs.
        test_curve_every: the test's adaptation curve scores the queries after every this many
            inner steps (and after the last); each point is a query pass (75 images in 5-way
            15-query episodes, against 5 support images a step), so a long curve can cost more
            than the adaptation: Reptile's Kanji test (50 steps, 25 queries) took 3.6 s a batch
            with every point, 1.8 s with every fifth, on a 2-core CPU (docs/benchmarks.md). 0:
            the last only (no curve). The test's score is the same whatever the setting.
        tasks_per_backward: build and differentiate the training loss this many tasks at a
            time, accumulating the meta-gradient (as learn2learn's examples call ``backward()``
            once per task): the memory a step holds is one group's graph, not the whole
            batch's; the same gradient up to float rounding, as the tasks are independent
            (:meth:`~.base.MetaLearner.grouped_loss`). ``None``: the whole batch at once, in
            fewer, larger kernels. ``"auto"`` (default): in a run planning at least
            :attr:`group_timing_min_steps` training steps (200), time a training step on the
            path chosen (see ``batching``) with the whole batch, then with groups of half as
            many tasks, a quarter, ... down to one, stopping at the first size more than 5%
            slower than the fastest so far, and keep the smallest group within 5% of the fastest
            (:data:`GROUP_MARGIN`; logged with every timing, and on a GPU each size's peak
            memory): the least memory at about the best speed. A shorter run, or one with no
            planned length (no trainer, no ``max_steps`` or ``max_epochs``), keeps the whole
            batch untimed. The timing runs the whole batch's step (as ``batching="auto"``'s
            does), so the run's peak is still the whole batch's: to cap it, set a number, which
            the timed steps of ``batching="auto"`` then keep too. Where a timed step runs out of
            memory (a GPU's ``torch.OutOfMemoryError``), that path or size is left out, and if
            no path fits the whole batch, "auto" halves the tasks per backward pass until one
            does, in a short run too (logged); a set number that does not fit stops the run
            with that error, saying what to change. On the 2-core CPU of
            docs/benchmarks.md, second-order Conv4-64 MAML on the Kanji config's 32 tasks
            (``benchmarks/speed.py``): the whole batch at once peaked at 567-582 MiB RSS, groups
            of 4 at 135 MiB in 1.03x to 1.05x the time, one task at a time at 52 MiB (as much
            as learn2learn's per-task backward) in 1.6x to 1.7x the time. Evaluation keeps no
            outer graph and is unaffected. Reptile, which differentiates no graph through the
            adaptation, refuses a number ("auto" and ``None`` both mean the whole batch there).

    Both MAML++ schedules follow the trainer's ``global_step``, so a resumed run continues them.

    Example::

        from fewshot_lightning.algorithms import MAML
        from fewshot_lightning.data import SinusoidDataModule
        from fewshot_lightning.models import MLP
        import lightning as L

        model = MAML(MLP(), inner_lr=0.01, inner_steps=1, test_inner_steps=10)
        L.Trainer(max_steps=2000).fit(model, SinusoidDataModule(shots=10, meta_batch_size=25))
    """

    needs_grad_at_eval = True
    #: With ``batching="auto"``, a run planning at most this many evaluation batches does not
    #: time evaluation's paths (``None``: twice the candidate paths; 0 always times).
    untimed_evaluation_batches: Optional[int] = None
    #: The inner loss is scaled like the outer one under 16-bit mixed precision, so a non-finite
    #: query loss there may be an inner overflow (see NonFiniteGuard).
    scales_inner_loss = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_steps: Optional[int] = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        per_step_lr: bool = False,
        per_parameter_lr: bool = False,
        adapt: Optional[Sequence[str]] = None,
        batching: str = "auto",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        multi_step_loss_steps: int = 0,
        first_order_steps: int = 0,
        memory_format: str = "auto",
        transductive: bool = True,
        test_curve_every: int = 1,
        tasks_per_backward: Optional[Union[int, str]] = "auto",
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        for name, value in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
            # test_inner_steps None means inner_steps; inner_steps has no such default.
            if (value is not None or name == "inner_steps") and \
                    (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"{name} must be a whole number of steps, got {value!r} ({type(value).__name__}).")
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be at least 1, got {inner_steps}.")
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if test_inner_steps < 1:
            raise ValueError(f"test_inner_steps must be at least 1, got {test_inner_steps}.")
        try:
            positive = not isinstance(inner_lr, (str, bool)) and bool(inner_lr > 0) and math.isfinite(float(inner_lr))
        except (TypeError, RuntimeError, ValueError):  # a string, a tensor of several values
            positive = False
        if not positive:
            raise ValueError(f"inner_lr must be a positive finite number, got {inner_lr!r} (e.g. 0.4).")
        if batching not in ("auto",) + BATCHING:
            raise ValueError(f"batching must be 'auto', 'vmap' or 'loop', got {batching!r}.")
        if memory_format not in ("auto",) + MEMORY_FORMATS:
            raise ValueError(f"memory_format must be 'auto', 'contiguous' or 'channels_last', got {memory_format!r}.")
        if isinstance(test_curve_every, bool) or not isinstance(test_curve_every, int) or test_curve_every < 0:
            raise ValueError(
                f"test_curve_every must be a whole number of inner steps, 0 (no curve) or more, got {test_curve_every!r}."
            )
        if tasks_per_backward is not None and tasks_per_backward != "auto" and (
                isinstance(tasks_per_backward, bool) or not isinstance(tasks_per_backward, int) or tasks_per_backward < 1):
            raise ValueError(
                f"tasks_per_backward must be a whole number of tasks, 1 or more, None for the whole batch at once, or "
                f"'auto' to time group sizes on the first training batch, got {tasks_per_backward!r}.")
        #: The meta-gradient's backward pass in groups of this many tasks (see the argument);
        #: ``None``: the whole batch. Under ``"auto"``, ``None`` until chosen.
        self.tasks_per_backward = None if tasks_per_backward == "auto" else tasks_per_backward
        #: Whether ``tasks_per_backward`` is "auto", to be chosen by timing (see the argument).
        self.tasks_per_backward_auto = tasks_per_backward == "auto"
        #: Under "auto": milliseconds of the timed training step for each group size tried
        #: (``"whole batch"``, ``"4"``, ...), once chosen by timing; empty otherwise.
        self.group_timings: Dict[str, float] = {}
        #: Under "auto": ``True`` once the group size was chosen by timing (or restored with a
        #: resumed fit), else the ``id`` of the trainer whose run keeps the whole batch untimed.
        self._group_decision: Any = None
        if multi_step_loss_steps < 0:
            raise ValueError(f"multi_step_loss_steps must be 0 (off) or more, got {multi_step_loss_steps}.")
        if first_order_steps < 0:
            raise ValueError(f"first_order_steps must be 0 (off) or more, got {first_order_steps}.")
        if first_order and first_order_steps:
            raise ValueError(
                f"first_order=True trains first order throughout, so first_order_steps={first_order_steps} would "
                "never switch to second order: drop one of them."
            )
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps
        #: The test's adaptation curve scores the queries after every this many inner steps
        #: (and after the last); 0: after the last only. See the ``test_curve_every`` argument.
        self.test_curve_every = test_curve_every
        self.first_order = first_order
        #: Whether evaluation passes a task's queries together (see the ``transductive`` argument).
        self.transductive = transductive
        self.multi_step_loss_steps = multi_step_loss_steps
        self.first_order_steps = first_order_steps
        shapes = self.adapted_shapes(backbone, adapt)
        #: Names of the adapted tensors, in order.
        self.adapt_names = list(shapes)
        #: The backbone's batch-norm running averages, hidden (``None``) in every pass: batch norm
        #: normalises each pass with its task's own batch statistics, in training and evaluation
        #: (see the ``transductive`` argument), and updates nothing.
        self._hidden_running: Dict[str, None] = dict.fromkeys(running_buffers(backbone))
        if self._hidden_running:
            layers = sorted({name.rsplit(".", 1)[0] for name in self._hidden_running})
            warnings.warn(
                f"{type(self).__name__} normalises every pass with the task's own batch statistics, in training and "
                f"evaluation (transductive, as MAML's code; transductive=False classifies each query with the support "
                f"set alone): the running averages of {type(backbone).__name__}'s batch norm "
                f"({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}) are neither used nor updated. Build it "
                "with track_running_stats=False to silence this.",
                stacklevel=2,
            )
        frozen = [name for name, p in backbone.named_parameters() if name in shapes and not p.requires_grad]
        if frozen:
            shown = listed(frozen, 4)
            warnings.warn(
                f"{type(self).__name__} adapts {shown} in the inner loop although they have requires_grad=False "
                f"(adapt={adapt!r} selects them; the outer loop leaves them as they are). To keep them fixed in both "
                f"loops, leave them out of adapt, e.g. adapt={['!' + name for name in frozen[:2]]!r}.",
                stacklevel=2,
            )
        #: The batching in use: fixed by the constructor, or by the first batch under "auto".
        self.batching = None if batching == "auto" else batching
        #: The layout of the task-by-task passes: fixed by the constructor, or by the first batch
        #: under "auto" ("contiguous" at once for a model without 4-D weights, or when vmap is
        #: fixed with memory_format "auto").
        self.memory_format = None if memory_format == "auto" else memory_format
        #: Milliseconds of the timed training step on each candidate path, once "auto" has chosen
        #: (``"vmap"``, ``"vmap channels_last"``, ``"loop"``, ``"loop channels_last"``); empty if
        #: nothing was timed.
        self.batching_timings: Dict[str, float] = {}
        #: Whether the backbone has 4-D (convolution) weights, for which the layout is a choice.
        self.convolutional = any(p.dim() == 4 for p in backbone.parameters())
        if memory_format == "channels_last" and not self.convolutional:
            raise ValueError(
                f"memory_format='channels_last' lays out 4-D (convolution) weights, and {type(backbone).__name__} "
                "has none: it would change nothing. Use memory_format='auto' or 'contiguous'."
            )
        if memory_format == "auto" and (batching == "vmap" or not self.convolutional):
            self.memory_format = "contiguous"
        #: What the constructor fixed, (batching, memory format), ``None`` where "auto": both
        #: choices (training's and evaluation's) are made among the paths that agree with it.
        self.requested_path: Tuple[Optional[str], Optional[str]] = (self.batching, self.memory_format)
        #: The path evaluation runs on, (batching, memory format): fixed with the constructor's
        #: choices, otherwise chosen on the first evaluation batch outside fit's sanity check
        #: (``None`` until then); see :meth:`choose_batching`.
        self.evaluation_path: Optional[Tuple[str, str]] = (
            (self.batching, self.memory_format) if None not in self.requested_path else None)
        #: Milliseconds of the timed evaluation step on each candidate path, once chosen.
        self.evaluation_timings: Dict[str, float] = {}
        #: Evaluation's path when too few batches are planned to time it (see _untimed_evaluation_path).
        self._untimed_path: Optional[Tuple[str, str]] = None
        #: Outside fit, the training path a loaded checkpoint recorded (untimed evaluation's fallback).
        self._saved_training_path: Optional[Tuple[str, str]] = None
        self.inner_lr = InnerLearningRate(
            shapes, inner_lr, inner_steps, per_step=per_step_lr, per_parameter=per_parameter_lr,
            learnable=learn_inner_lr,
        )
        self.test_curve = MeanConfidenceInterval(size=len(self.curve_steps()))
        #: The path of the passes running now, when it is not training's (evaluation, a timed
        #: candidate): read by :meth:`execution`; ``None`` otherwise.
        self._running_path: Optional[Tuple[str, str]] = None
        #: Whether the backbone ran (``True``) or failed to run (``False``) under vmap when "auto"
        #: tried it (``None``: not tried): a later choice neither tries it again nor times it
        #: after a failure.
        self._vmap_runs: Optional[bool] = None
        self._split: Optional[Tuple[Params, Params]] = None
        self._functionals: Dict[str, Forward] = {}
        self._head_alone: Optional[bool] = None  # see _adapts_head_only

    # -- the building blocks ------------------------------------------------------------------
    def adapted_shapes(self, backbone: nn.Module, adapt: Optional[Sequence[str]]) -> Dict[str, torch.Size]:
        """Name -> shape of every tensor the inner loop adapts (it sizes the inner learning rates):
        the backbone parameters ``adapt`` selects. Called once, by the constructor."""
        parameters = dict(backbone.named_parameters())
        return {name: parameters[name].shape for name in select_parameters(backbone, adapt)}

    def initial_params(self, tasks: int, detach: bool = False) -> Params:
        """The adapted parameters' starting point for ``tasks`` tasks, ``[tasks, ...]`` each
        (4-D ones copied channels-last first when that layout is in use, so every step's
        parameters inherit it)."""
        start = self._parameter_split()[0]
        if self.execution() == ("loop", "channels_last"):
            start = {name: channels_last(p) for name, p in start.items()}
        return task_params(start, tasks, detach)

    def functional(self, batching: Optional[str] = None, memory_format: Optional[str] = None) -> Forward:
        """The backbone as ``forward(params, x)`` over tasks; parameters not adapted are shared.
        ``batching`` and ``memory_format`` default to the ones chosen (see :meth:`choose_batching`)."""
        batching, memory_format = self.execution(batching, memory_format)
        key = (batching, memory_format)
        if key not in self._functionals:
            self._functionals[key] = functional(
                self.backbone, self._parameter_split()[1], buffers=self.pass_buffers(), batching=batching,
                memory_format=memory_format,
            )
        return self._functionals[key]

    def pass_buffers(self) -> Optional[Dict[str, Optional[Tensor]]]:
        """The buffers every pass runs with: the backbone's own, batch norm's running averages
        hidden (``None``), so batch norm uses each task's batch statistics in training and
        evaluation alike; ``None`` (the module's own) where it keeps none."""
        if not self._hidden_running:
            return None
        return {**dict(self.backbone.named_buffers()), **self._hidden_running}

    def execution(self, batching: Optional[str] = None, memory_format: Optional[str] = None,
                  query: bool = False) -> Tuple[str, str]:
        """(batching, memory format) of a forward, as :func:`~fewshot_lightning.inner.functional`
        takes them: the ones given, else the ones chosen, else vmap and contiguous.

        The chosen pair ``("vmap", "channels_last")`` runs the support passes (adaptation) with
        vmap, channels-first, and the query passes (``query=True``) task by task, channels-last:
        the tasks' small support sets batched into larger kernels, their larger query sets in the
        layout where a CPU's batch norm and pooling are fastest."""
        chosen_batching, chosen_format = self._running_path or (self.batching, self.memory_format)
        batching = batching or chosen_batching or "vmap"
        if memory_format is None:
            memory_format = (chosen_format if batching in ("loop", chosen_batching) else None) or "contiguous"
        if batching == "vmap" and memory_format == "channels_last":
            return ("loop", "channels_last") if query else ("vmap", "contiguous")
        return batching, memory_format

    def _parameter_split(self) -> Tuple[Params, Params]:
        """(adapted, fixed) parameters of the backbone, the live tensors, looked up once: a
        sinusoid step is short enough for walking the module tree a few times a step to show."""
        if self._split is None:
            self._split = split_parameters(self.backbone, self.adapt_names)
        return self._split

    #: With ``tasks_per_backward="auto"``, the fewest planned training steps for which group sizes
    #: are timed (timing takes up to two steps per size tried: twelve for 32 tasks); a shorter
    #: run keeps the whole batch. 0 times in any run that plans its length.
    group_timing_min_steps: int = 200

    def backward_group(self, batch: TaskBatch) -> Optional[int]:
        """This step's tasks per backward pass; under ``tasks_per_backward="auto"`` decided on
        the first training batch (see the argument, and :meth:`choose_tasks_per_backward`)."""
        if self.tasks_per_backward_auto and self._group_decision is not True \
                and self._group_decision != id(self._trainer):
            self.choose_tasks_per_backward(batch)  # the path first, then the group size
        return self.tasks_per_backward

    def planned_training_steps(self) -> Optional[float]:
        """The training steps the running ``fit`` plans (``max_steps``, else ``max_epochs`` times
        the batches an epoch); ``None`` without a trainer or a finite plan."""
        trainer = self._trainer
        if trainer is None:
            return None
        steps = trainer.max_steps
        if steps is None or steps < 0:
            epochs, per_epoch = trainer.max_epochs, trainer.num_training_batches
            if epochs is None or epochs < 1 or not isinstance(per_epoch, (int, float)):
                return None
            steps = epochs * per_epoch
        return float(steps) if math.isfinite(steps) else None

    def choose_tasks_per_backward(self, batch: TaskBatch, force: bool = False) -> Optional[int]:
        """Under ``tasks_per_backward="auto"``, decide the group size on ``batch`` (a training
        batch) and return it (``None``: the whole batch): in a run planning at least
        :attr:`group_timing_min_steps` training steps, by timing a training step on the path
        chosen (:meth:`choose_batching`, made first) with the whole batch and with groups of half
        as many tasks, a quarter, ... down to one task, twice each (the better time counts),
        stopping at the first size more than :data:`GROUP_MARGIN` (5%) slower than the fastest so
        far; the smallest group within 5% of the fastest is kept (one group's graph is what a
        step holds, so it holds the least memory at about the best speed). Every timing is logged,
        with each size's peak memory on a GPU; a size that runs out of memory is left out (not a
        stop), and the sizes start at the group the path was timed at when the whole batch ran
        out of memory on every path (:meth:`_fewer_tasks_per_backward`). Under DDP every process
        keeps process 0's choice. Otherwise (a shorter run, no planned length, a batch of one
        task, nothing trainable) the whole batch, or that group, untimed, for this run.
        ``force=True`` times whatever the run plans (your own training loop, a benchmark): the
        choice then holds until the module is rebuilt."""
        # The path first (timed at the whole batch, or at fewer tasks if the whole batch ran out
        # of memory on every path: then tasks_per_backward holds that many).
        self.choose_batching(batch)
        planned = self.planned_training_steps()
        trainable = [p for p in self.parameters() if p.requires_grad]
        tasks = batch.num_tasks
        if torch.are_deterministic_algorithms_enabled() and not force and tasks >= 2 and trainable:
            # Groups sum the meta-gradient in another order: a timed choice would make a run
            # depend on the machine's load (see _timed_choice).
            self._group_decision = id(self._trainer)
            rank_zero_info(
                f"{type(self).__name__}: tasks_per_backward='auto' keeps {self._tasks_per_graph(batch)} of the "
                f"{tasks} tasks per backward pass untimed: deterministic algorithms are on (Trainer(deterministic=True)).")
            return self.tasks_per_backward
        if tasks < 2 or not trainable or (
                not force and (planned is None or planned < self.group_timing_min_steps)):
            self._group_decision = id(self._trainer)
            if self._trainer is not None and planned is not None and tasks >= 2 and trainable:
                held = self._tasks_per_graph(batch)
                kept = f"the whole batch of {tasks} tasks" if held >= tasks else f"groups of {held} of its {tasks} tasks"
                rank_zero_info(
                    f"{type(self).__name__}: tasks_per_backward='auto' keeps {kept} untimed: this run plans "
                    f"{planned:.0f} training steps, fewer than group_timing_min_steps={self.group_timing_min_steps} "
                    "(timing group sizes takes up to two steps a size)."
                )
            return self.tasks_per_backward
        sizes = [self._tasks_per_graph(batch)]
        while sizes[-1] > 1:
            sizes.append(-(-sizes[-1] // 2))
        timings: Dict[int, float] = {}
        peaks: Dict[int, float] = {}
        exhausted: Dict[int, str] = {}  # sizes that ran out of memory (their message)
        stopped = None
        with torch.inference_mode(False), torch.enable_grad():
            for size in sizes:
                try:
                    runs = [self._timed_group_step(batch, size, trainable) for _ in range(2)]
                except RuntimeError as error:
                    if not out_of_memory(error):
                        raise
                    exhausted[size] = str(error)
                    release_memory(batch.support_x.device)
                else:
                    timings[size] = min(seconds for seconds, _ in runs)
                    if runs[0][1] is not None:
                        peaks[size] = max(peak for _, peak in runs)
                    if timings[size] > (1 + GROUP_MARGIN) * min(timings.values()):
                        stopped = size
                        break
        if not timings:
            raise torch.OutOfMemoryError(f"{exhausted[1]}\n{out_of_memory_hint(type(self).__name__, 1)}")
        fastest = min(timings.values())
        chosen = min(size for size, seconds in timings.items() if seconds <= (1 + GROUP_MARGIN) * fastest)
        group = None if chosen >= tasks else chosen
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every process groups as process 0 timed: the gradient is the same either way, to
            # rounding, and a run should not depend on which process's timing came out ahead.
            group = self.trainer.strategy.broadcast(group, src=0)
        self.tasks_per_backward = group
        self._group_decision = True

        def name(size: int) -> str:
            return "whole batch" if size == tasks else str(size)

        self.group_timings = {name(size): 1000 * seconds for size, seconds in timings.items()}
        shown = ", ".join(
            f"{name(size)} " + ("out of memory" if size in exhausted else f"{1000 * timings[size]:.1f} ms")
            + (f" {peaks[size] / 2**20:.0f} MiB peak" if size in peaks else "")
            for size in sorted(set(timings) | set(exhausted), reverse=True))
        stop = (f"; {stopped} was more than {GROUP_MARGIN:.0%} slower than the fastest, so no smaller group was tried"
                if stopped is not None and stopped > 1 else "")
        rank_zero_info(
            f"{type(self).__name__}: tasks_per_backward='auto' chose "
            f"{'the whole batch' if group is None else f'{group} tasks per backward pass'} (the smallest group within "
            f"{GROUP_MARGIN:.0%} of the fastest; one training step of {tasks} tasks on "
            f"{path_name(*self.execution())!r}: {shown}{stop})."
        )
        for logger in self.loggers:
            logger.log_metrics(
                {f"batching/tasks_per_backward_{name(size).replace(' ', '_')}_ms": 1000 * seconds
                 for size, seconds in timings.items()},
                step=self.global_step,
            )
        return group

    def _step_gradients(self, batch: TaskBatch, group: Optional[int], trainable: list,
                        batching: Optional[str] = None) -> None:
        """A training step's loss and meta-gradient (discarded: nothing is written to ``.grad``),
        the backward pass in groups of ``group`` tasks as :meth:`~.base.MetaLearner.grouped_loss`
        runs it, or the whole batch's (``None``, or a group as large); ``batching`` as
        :meth:`training_losses` takes it."""
        if group is not None and group < batch.num_tasks:
            self._group_gradients(batch, group, trainable, None,
                                  losses_of=lambda part: self.training_losses(part, batching))
        else:
            loss = self.training_losses(batch, batching)[0].mean()
            torch.autograd.grad(loss, trainable, allow_unused=True)

    def _timed_group_step(self, batch: TaskBatch, size: int, trainable: list) -> Tuple[float, Optional[float]]:
        """Seconds one training step's loss and meta-gradient take with the backward pass in
        groups of ``size`` tasks (the whole batch if ``size`` is its size), and on a GPU the
        step's peak allocated bytes (``None`` elsewhere). Nothing is written to ``.grad``."""
        device = batch.support_x.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with random_state_kept(device):
            self._step_gradients(batch, size, trainable)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, (float(torch.cuda.max_memory_allocated(device)) if cuda else None)

    def __getstate__(self) -> Dict[str, Any]:
        # A copy (deepcopy, pickling for spawned processes) looks its own parameters up again:
        # the cached forwards hold this instance's.
        return {**self.__dict__, "_split": None, "_functionals": {}, "_head_alone": None}

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the module may replace parameter tensors: look them up again.
        self._split, self._functionals, self._head_alone = None, {}, None
        return super()._apply(fn, *args, **kwargs)

    def trajectory(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: Optional[bool] = None,
        differentiable: bool = True,
        batching: Optional[str] = None,
    ) -> Iterator[Params]:
        """Per-task parameters after 0, 1, ..., ``steps`` inner steps on the support set.

        ``differentiable=False`` (evaluation) detaches every step: no outer graph is built.
        ``first_order`` defaults to :meth:`uses_first_order` at the current outer step.
        """
        first_order = self.uses_first_order() if first_order is None else first_order
        options = self.inner_options(support_x, steps)
        forward, inputs = self.functional(batching), support_x
        if steps > 0 and self._adapts_head_only(options):
            # The support passes up to the head are the same at every inner step: once.
            with self.backbone.without_head():
                inputs = forward({}, support_x)
            if first_order or not differentiable:
                inputs = inputs.detach()  # no inner gradient is differentiated through them
            forward = self._head_functional()
        return trajectory(
            forward, self.initial_params(support_x.shape[0], detach=not differentiable),
            inputs, support_y, per_task_loss, steps, self.inner_lr,
            second_order=not first_order, differentiable=differentiable, loss_scale=self.inner_loss_scale(),
            **options,
        )

    #: Whether a learner that adapts exactly the backbone's ``head`` (ANIL's default) passes each
    #: task's support set through the rest once per adaptation, not once per inner step, where
    #: the backbone offers ``without_head()`` (:class:`~fewshot_lightning.models.Conv4` and
    #: :class:`~fewshot_lightning.models.MLP`, from :class:`~fewshot_lightning.models.blocks.DetachableHead`) and holds
    #: no buffers (running statistics that every pass would update), unless inner steps take
    #: minibatches of the support set or per-step weights (MAML++). Same numbers to rounding.
    head_features_once: bool = True

    def _adapts_head_only(self, options: Mapping[str, Any]) -> bool:
        # Per-step weights change the passes up to the head; minibatches change their batch statistics.
        if not self.head_features_once or options.get("per_step") is not None or options.get("minibatch") is not None:
            return False
        if self._head_alone is None:
            # What the backbone and the adapted names allow, looked up once (a walk of the
            # module tree, tens of microseconds: a sinusoid MAML step is short enough to show it).
            backbone = self.backbone
            head = getattr(backbone, "head", None)
            self._head_alone = (
                head is not None and hasattr(backbone, "without_head") and next(backbone.buffers(), None) is None
                and set(self.adapt_names) == {f"head.{name}" for name, _ in head.named_parameters()})
        return self._head_alone

    def _head_functional(self) -> Forward:
        """The head alone as ``forward(params, features)`` over tasks, ``params`` named as in
        the backbone (``head.weight``)."""
        if "head" not in self._functionals:
            head = self.backbone.head
            if type(head) is nn.Linear:
                # Every task's head in one batched product (vmap of a linear layer is several ops).
                def linear(params: Params, x: Tensor) -> Tensor:
                    weight = params["head.weight"].transpose(-1, -2)
                    if "head.bias" not in params:
                        return torch.bmm(x, weight)
                    return torch.baddbmm(params["head.bias"].unsqueeze(-2), x, weight)

                self._functionals["head"] = linear
            else:
                head_forward = functional(head, batching="vmap")
                skip = len("head.")
                self._functionals["head"] = lambda params, x: head_forward(
                    {name[skip:]: value for name, value in params.items()}, x)
        return self._functionals["head"]

    def inner_loss_scale(self) -> Optional[float]:
        """Under 16-bit mixed precision, the ``GradScaler``'s current scale: the inner loss is
        scaled by it too, so fp16 inner gradients neither flush to zero nor go unnoticed when
        they overflow (see :func:`~fewshot_lightning.inner.trajectory`). ``None`` otherwise
        (fp32 and bf16 need no scaling)."""
        if self._trainer is None:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler.get_scale()

    def inner_options(self, support_x: Tensor, steps: int) -> Dict[str, Any]:
        """Extra keyword options of :func:`~fewshot_lightning.inner.trajectory` (``penalty``,
        ``optimizer``, ``minibatch``) for ``steps`` steps on the tasks of ``support_x``: none for
        MAML (plain gradient descent on the whole support set). Algorithms built on MAML
        override it."""
        return {}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None, **options) -> Params:
        """Per-task parameters after ``steps`` (default ``inner_steps``) inner steps; keyword
        options as :meth:`trajectory`."""
        for params in self.trajectory(support_x, support_y, self.inner_steps if steps is None else steps, **options):
            pass
        return params

    def predict(self, params: Params, x: Tensor, batching: Optional[str] = None) -> Tensor:
        """Backbone outputs on ``x`` ``[B, M, ...]`` under per-task ``params`` (the query passes:
        see :meth:`execution`)."""
        return self.functional(*self.execution(batching, query=True))(params, x)

    # -- training and evaluation --------------------------------------------------------------
    def forward(self, batch: TaskBatch) -> Tensor:
        """Query outputs after the training-time adaptation, differentiable for the meta-gradient."""
        self.choose_batching(batch)
        return self.training_outputs(batch)

    def training_outputs(self, batch: TaskBatch, batching: Optional[str] = None) -> Tensor:
        """:meth:`forward` with the batching given (default: the one chosen)."""
        params = self.adapt(batch.support_x, batch.support_y, batching=batching)
        return self.predict(params, batch.query_x, batching=batching)

    def uses_first_order(self, step: Optional[int] = None) -> bool:
        """Whether outer step ``step`` (default: the trainer's ``global_step``) is first order."""
        if self.first_order or self.first_order_steps <= 0:  # no step count needed (it costs a few us a step)
            return bool(self.first_order)
        step = self.global_step if step is None else step
        return step < self.first_order_steps

    def step_loss_weights(self, step: Optional[int] = None) -> Optional[Tensor]:
        """MAML++'s weights of the query losses after inner steps 1..``inner_steps`` at outer step
        ``step`` (default: the trainer's ``global_step``), or ``None`` once only the last counts.

        At progress ``p = step / multi_step_loss_steps`` every step but the last weighs
        ``max((1 - p) / N, 0.03 / N)`` and the last ``min((1 - p) / N + p, 1 - (N - 1) * 0.03 / N)``
        (``N = inner_steps``): uniform at first, moving linearly towards the last step, the
        weights summing to one throughout; the others keep at least ``0.03 / N`` each until the
        annealing ends, as in the authors' code (``get_per_step_loss_importance_vector``, whose
        progress moves once per "epoch" of 500 steps, here at every step).
        """
        if self.inner_steps == 1 or self.multi_step_loss_steps <= 0:
            return None
        step = self.global_step if step is None else step
        if step >= self.multi_step_loss_steps:
            return None
        steps = self.inner_steps
        progress = step / self.multi_step_loss_steps
        floor = MULTI_STEP_LOSS_FLOOR / steps
        weights = torch.full((steps,), max((1 - progress) / steps, floor))
        weights[-1] = min((1 - progress) / steps + progress, 1 - (steps - 1) * floor)
        return weights

    def training_losses(self, batch: TaskBatch, batching: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Each task's outer loss ``[B]`` and the query outputs after the last inner step.

        With the multi-step loss active (:meth:`step_loss_weights`), a task's loss is the
        weighted sum over inner steps of its query losses; otherwise its query loss after the
        last step. ``batching`` overrides the chosen one (otherwise chosen now, once).
        """
        if batching is None:
            self.choose_batching(batch)
        weights = self.step_loss_weights()
        if weights is None:
            outputs = self.training_outputs(batch, batching)
            return self.query_losses(outputs, batch), outputs
        step_losses = []
        steps = self.trajectory(batch.support_x, batch.support_y, self.inner_steps, batching=batching)
        next(steps)  # the starting point: MAML++ weighs the losses after each step
        for params in steps:
            outputs = self.predict(params, batch.query_x, batching=batching)
            step_losses.append(self.query_losses(outputs, batch))
        losses = torch.stack(step_losses, dim=1)  # [B, steps]
        return losses @ weights.to(losses), outputs

    def evaluation_outputs(self, batch: TaskBatch, stage: str) -> Tensor:
        with self.running_on(self._evaluation_execution(batch)):
            if stage != "test":
                return self._adapted_query_outputs(batch)
            scores = []
            points = set(self.curve_steps())
            for step, params in enumerate(self.trajectory(batch.support_x, batch.support_y, self.test_inner_steps,
                                                          differentiable=False)):
                if step in points:  # a query pass only where the curve has a point (always the last)
                    outputs = self.evaluation_predict(params, batch)
                    scores.append(self.scores(outputs, batch))
        self.test_curve.update(torch.stack(scores, dim=1))
        return outputs

    def curve_steps(self) -> List[int]:
        """The inner steps after which the test's adaptation curve scores the queries: 0,
        ``test_curve_every``, twice that, ..., and ``test_inner_steps`` (only the last with
        ``test_curve_every=0``)."""
        last, every = self.test_inner_steps, self.test_curve_every
        return sorted(set(range(0, last, every)) | {last}) if every else [last]

    def adaptation_curve(self, batch: TaskBatch, steps: Optional[int] = None) -> Tensor:
        """Query outputs after 0, 1, ..., ``steps`` inner steps, ``[steps + 1, B, M, ...]``, no graph."""
        steps = self.test_inner_steps if steps is None else steps
        with self.running_on(self._evaluation_execution(batch)):
            trajectory = self.trajectory(batch.support_x, batch.support_y, steps, differentiable=False)
            return torch.stack([self.evaluation_predict(params, batch) for params in trajectory])

    def _adapted_query_outputs(self, batch: TaskBatch) -> Tensor:
        """Validation's workload: adaptation over ``test_inner_steps`` without the outer graph,
        then the query outputs, on the path in use."""
        params = self.adapt(batch.support_x, batch.support_y, self.test_inner_steps, differentiable=False)
        return self.evaluation_predict(params, batch)

    def evaluation_predict(self, params: Params, batch: TaskBatch) -> Tensor:
        """Query outputs at evaluation under the adapted ``params``: :meth:`predict` on the
        queries, or with ``transductive=False`` each query passed in a batch with the support
        set alone (``[support, query_j]``), its output kept: ``[B, M, ...]`` either way."""
        if self.transductive:
            return self.predict(params, batch.query_x)
        outputs = []
        for j in range(batch.query_x.shape[1]):
            alone = torch.cat([batch.support_x, batch.query_x[:, j:j + 1]], dim=1)
            outputs.append(self.predict(params, alone)[:, -1])
        return torch.stack(outputs, dim=1)

    @contextlib.contextmanager
    def running_on(self, path: Optional[Tuple[str, str]]) -> Iterator[None]:
        """Run the passes inside on ``path`` (batching, memory format) instead of training's
        (``None``: training's)."""
        previous = self._running_path
        self._running_path = path
        try:
            yield
        finally:
            self._running_path = previous

    def on_test_epoch_start(self) -> None:
        # test_inner_steps may have been changed since construction (a script evaluating with
        # more steps): the curve then has that many points.
        self.test_curve = self.test_curve.of_size(len(self.curve_steps()), self.device)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self.test_curve.update_called:
            return
        curve, _ = self.test_curve.compute()
        # Its states are updated outside inference mode (evaluation_outputs adapts under
        # autograd); reset in the test's inference mode they would become inference tensors, and
        # the next test of the same model (trainer.test twice in a notebook) failed updating them.
        with torch.inference_mode(False):
            self.test_curve.reset()
        name = self.score_name
        points = list(zip(self.curve_steps(), curve.reshape(-1).tolist()))
        for step, value in points:
            # Already reduced over processes (see MetaLearner._log_eval for sync_dist).
            self.log(f"test/{name}_after_{step}_steps", value, sync_dist=True)
        # The same points as one series against the inner step, so a logger can draw the curve.
        for logger in self.loggers:
            for step, value in points:
                logger.log_metrics({f"test/adaptation_curve_{name}": value}, step=step)

    # -- checks before running -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._check_output_width(stage)

    def differentiates_inner_gradient(self) -> bool:
        """Whether some training step of this run differentiates the inner loop's gradient
        (second order, at any outer step of a MAML++ schedule)."""
        return not self.first_order

    def arguments_in_weights(self) -> Dict[str, str]:
        """``inner_lr`` too where the inner learning rates are tensors (per step, per parameter or
        learned: MAML++, Meta-SGD), which a checkpoint restores."""
        held = super().arguments_in_weights()
        if self.inner_lr.tensor_rates:
            held["inner_lr"] = "inner_lr.rates"
        return held

    def class_scores(self) -> Optional[int]:
        """How many class scores the backbone outputs per sample: its ``output_shape`` if that is
        one number, else the ``out_features`` of a ``head`` that is an ``nn.Linear``, or of the last
        layer of an ``nn.Sequential`` backbone that is one; ``None`` if none says."""
        shape = getattr(self.backbone, "output_shape", None)
        if shape is not None:
            return int(shape[0]) if len(shape) == 1 else None
        head = getattr(self.backbone, "head", None)
        if head is None and isinstance(self.backbone, nn.Sequential) and len(self.backbone):
            head = self.backbone[-1]
        return head.out_features if isinstance(head, nn.Linear) else None

    def _check_output_width(self, stage: str) -> None:
        """Classification episodes of N ways need N class scores: fewer, and a label has no output
        (cross-entropy's "Target 5 is out of bounds" on the CPU, a device-side assert on a GPU);
        more, and the extra scores, never a target, are trained down but can still win the argmax
        at evaluation. The episodes the stage runs (at ``fit`` training and validation) are
        compared with the backbone before anything runs: fewer is an error, more a warning, both
        naming the options to change."""
        datamodule = getattr(self.trainer, "datamodule", None)
        shapes = getattr(datamodule, "episode_shape", None)
        width = self.class_scores()
        if not isinstance(shapes, dict) or getattr(datamodule, "regression", False) or width is None:
            return
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage, ())
        warned = set()
        for split in splits:
            ways = shapes[split][0]
            described = datamodule.episode_arguments(split)[1][0]
            fix = (f"build the backbone with out_features={ways} (--model.init_args.backbone.init_args.out_features "
                   f"{ways})" + (f" or ask for {width}-way episodes" if width >= 2 else ""))
            episodes = {"train": "training", "val": "validation", "test": "test"}[split]
            if width < ways:
                raise ValueError(
                    f"{type(self).__name__}'s backbone outputs {width} class scores, but the {episodes} episodes "
                    f"are {ways}-way ({described}): "
                    + (f"label {width} has" if width == ways - 1 else f"labels {width} to {ways - 1} have")
                    + f" no score. {'Either ' + fix if width >= 2 else fix[0].upper() + fix[1:]}."
                )
            if width > ways and ways not in warned:
                warned.add(ways)
                warnings.warn(
                    f"{type(self).__name__}'s backbone outputs {width} class scores for {ways}-way {episodes} "
                    f"episodes ({described}): the other {width - ways} are never a target but can still be the "
                    f"predicted class. The papers' setting has one per way: {fix}.",
                    stacklevel=2,
                )

    # -- batching -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["batching"] = self.batching
        checkpoint["memory_format"] = self.memory_format
        checkpoint["evaluation_path"] = list(self.evaluation_path) if self.evaluation_path is not None else None
        if self.tasks_per_backward_auto and self._group_decision is not None:
            # A resumed run keeps the group size this one ran (timed, or the whole batch untimed):
            # the gradient agrees only to rounding.
            checkpoint["tasks_per_backward_chosen"] = self.tasks_per_backward
        if self.evaluation_timings:  # timed here: where, so that evaluation on the same machine reuses it
            checkpoint["evaluation_path_timed_on"] = timing_signature(self.device)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # A resumed run keeps the paths the interrupted one timed and chose: vmap and the loop
        # agree only to rounding, and a fresh timing could pick the other.
        saved = checkpoint.get("evaluation_path")
        if self._trainer is not None and self.trainer.state.fn != "fit":
            timed_on = checkpoint.get("evaluation_path_timed_on")
            if self.evaluation_path is None and saved is not None and self._evaluation_may_take(tuple(saved)) \
                    and timed_on == timing_signature(self.trainer.strategy.root_device):
                # validate/test/predict on the machine that timed evaluation in training: no need
                # to time it again (on another machine, or another device, it is timed afresh).
                self.evaluation_path = (saved[0], saved[1])
                rank_zero_info(f"{type(self).__name__}: evaluation runs on {path_name(*self.evaluation_path)!r}, "
                               "as timed on this machine by the run that saved the checkpoint.")
            if checkpoint.get("batching") is not None:
                trained = (checkpoint["batching"], checkpoint.get("memory_format") or "contiguous")
                self._saved_training_path = trained if self._agrees(trained) and trained in self._candidates() else None
        if self._trainer is not None and self.trainer.state.fn == "fit":
            if self.batching is None:
                self.batching = checkpoint.get("batching")
            if self.memory_format is None:
                self.memory_format = checkpoint.get("memory_format")
                if self.memory_format is None and self.batching is not None:
                    self.memory_format = "contiguous"  # a checkpoint from before the layout was chosen
            if self.evaluation_path is None and saved is not None and self._evaluation_may_take(tuple(saved)):
                self.evaluation_path = (saved[0], saved[1])
            if self.tasks_per_backward_auto and ("tasks_per_backward_chosen" in checkpoint or "batching" in checkpoint):
                # (A checkpoint of a MAML run from before "auto" existed: it ran the whole batch.)
                self.tasks_per_backward = checkpoint.get("tasks_per_backward_chosen")
                self._group_decision = True

    def _agrees(self, path: Tuple[str, str]) -> bool:
        """Whether ``path`` is one the constructor's fixed choices allow."""
        return all(fixed is None or fixed == chosen for fixed, chosen in zip(self.requested_path, path))

    def _evaluation_may_take(self, path: Tuple[str, str]) -> bool:
        """Whether evaluation may run on ``path`` (a checkpoint's): allowed and exact enough."""
        return self._agrees(path) and self._exact_for_evaluation(path)

    def _candidates(self, evaluation: bool = False) -> List[Tuple[str, str]]:
        """The paths the constructor's fixed choices allow, vmap's first (BATCHING's order), less
        vmap once the backbone failed to run under it; for ``evaluation`` also less the
        channels-last loop, unless fixed (:meth:`_exact_for_evaluation`)."""
        batchings, formats = self.requested_path
        return [
            (batching, memory_format)
            for batching in (BATCHING if batchings is None else (batchings,))
            for memory_format in ([formats] if formats is not None else list(MEMORY_FORMATS))
            if (memory_format == "contiguous" or self.convolutional)
            and not (batching == "vmap" and self._vmap_runs is False)
            and not (evaluation and not self._exact_for_evaluation((batching, memory_format)))
        ]

    def _exact_for_evaluation(self, path: Tuple[str, str]) -> bool:
        """Whether evaluation may adapt on ``path`` unasked. Not on the channels-last loop, whose
        adaptation runs PyTorch's channels-last batch norm on the CPU, 70x to 180x less exact in
        float32 than NCHW (benchmarks/batch_norm_precision.py), an error the inner steps amplify
        (adapted parameters 0.2 relative from float64 after 3 steps of 0.4, against 4.5e-6:
        benchmarks/evaluation_path_precision.py):
        the printed scores then moved with whatever made ``auto`` pick it (the evaluation
        meta-batch, the machine's load). Training may take it (noise of the order of a gradient
        estimate's is no bias there); ``vmap channels_last`` adapts channels-first. A path the
        constructor fixed is kept."""
        return path != ("loop", "channels_last") or self.requested_path == path

    def choose_batching(self, batch: TaskBatch, evaluation: bool = False) -> str:
        """With ``batching="auto"`` (or ``memory_format="auto"``), decide once, on this batch, how
        the tasks run: vmap, the loop, and for models with 4-D weights also the loop with
        channels-last weights and vmap for the support passes with the query passes in the
        channels-last loop (``"vmap channels_last"``, see :meth:`execution`); a fixed
        ``batching`` or ``memory_format`` keeps only the paths that agree with it.

        vmap must first run the model at all; then one full training step (adaptation, query
        loss, meta-gradient; in groups when ``tasks_per_backward`` sets a number, as training will
        run it) is timed on each candidate path, twice, and the fastest (by its better time) is
        kept for the rest of the run (a path that runs out of memory is left out: see
        :meth:`_fewer_tasks_per_backward` for when all do); a channels-last path must beat the
        channels-first ones by :data:`CHANNELS_LAST_MARGIN` (5%), so that a near tie, which timing
        noise decides, keeps the layout the module has. All paths compute the same function; each
        rounds its own way in float32, which training can grow into other weights (so under
        deterministic algorithms, ``Trainer(deterministic=True)``, nothing is timed: vmap, else the
        loop, is taken). The decision and every timing are logged.
        Returns the batching chosen.

        ``evaluation=True`` (evaluation calls it so: validation, test, prediction, an adaptation
        curve) makes evaluation's own choice, :attr:`evaluation_path`, the same way on an
        evaluation step (adaptation over ``test_inner_steps`` without the outer graph, the
        query pass; no second-order backward, whose best path can differ), once, whether or not
        training has chosen (training's own choice is made on its first batch). Fit's sanity
        check (validation episodes before any training) times nothing: it runs the loop in the
        fixed layout, or channels-first, and the first validation after training starts decides.
        A run planning too few evaluation batches to repay the timing evaluates untimed on
        training's path (see :meth:`_untimed_evaluation_path`).
        """
        if evaluation:
            return self._evaluation_execution(batch)[0]
        if self.batching is not None and self.memory_format is not None:
            return self.batching
        self.batching, self.memory_format, self.batching_timings = self._timed_choice(batch, evaluation=False)
        return self.batching

    def _evaluation_execution(self, batch: TaskBatch) -> Tuple[str, str]:
        """The path evaluation runs ``batch`` on: :attr:`evaluation_path`, chosen now if not yet
        (see :meth:`choose_batching`)."""
        if self.evaluation_path is not None:
            return self.evaluation_path
        if self._trainer is not None and bool(getattr(self.trainer, "sanity_checking", False)):
            # Fit's sanity check runs a validation episode or two before any training batch.
            # Timing every path there cost as much again as the real choice (a minute at
            # mini-ImageNet size), for a check; run them untimed task by task in the fixed
            # layout, which every model can do, and leave the choice to the first validation.
            return self._fixed_loop_path()
        untimed = self._untimed_evaluation_path()
        if untimed is not None:
            return untimed
        batching, memory_format, self.evaluation_timings = self._timed_choice(batch, evaluation=True)
        self.evaluation_path = (batching, memory_format)
        return self.evaluation_path

    def _fixed_loop_path(self) -> Tuple[str, str]:
        """The path evaluation takes untimed with nothing chosen: the batching and layout the
        constructor fixed, else the task-by-task loop (which every model runs), channels-first."""
        batchings, formats = self.requested_path
        return batchings or "loop", formats or "contiguous"

    def planned_evaluation_batches(self) -> Optional[float]:
        """How many evaluation batches the running stage will run in all (``None`` if unknown:
        no trainer, or a fit with no end in steps or epochs): ``validate``, ``test`` and
        ``predict`` their dataloaders' batches; ``fit`` its validation batches times the
        validations until it ends, estimated from ``max_steps`` (or ``max_epochs``),
        ``val_check_interval`` and ``check_val_every_n_epoch``."""
        trainer = self._trainer
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if trainer is None or fn is None:
            return None
        if trainer.testing:
            counts = trainer.num_test_batches
        elif trainer.predicting:
            counts = trainer.num_predict_batches
        elif trainer.validating and fn == "validate":
            counts = trainer.num_val_batches
        elif fn == "fit":
            # Validations up to the end of training, estimated: every val_check_batch training
            # batches of every check_val_every_n_epoch-th epoch (exact for step-counted runs).
            every, steps = trainer.val_check_batch, self.planned_training_steps()
            if steps is None or not isinstance(every, (int, float)) or not math.isfinite(every) or every < 1:
                return None
            validations = max(1, int(steps // every) // (trainer.check_val_every_n_epoch or 1))
            return float(sum(trainer.num_val_batches) * validations)
        else:
            return None
        return float(sum(counts))

    def _untimed_evaluation_path(self) -> Optional[Tuple[str, str]]:
        """The path for a run with too few evaluation batches to repay timing: timing runs two
        evaluation steps on each candidate path (six on the three evaluation may take), which the fastest path
        can only win back over more batches than that (at most the fallback's time per batch
        saved on each, and the paths measured differ by under 2x: docs/benchmarks.md). With at
        most :attr:`untimed_evaluation_batches` planned (default: twice the candidates),
        evaluation runs untimed on training's path if it has one (restored with a resumed fit's
        checkpoint; outside fit, the path the checkpoint's training chose), else on the loop.
        Not stored as :attr:`evaluation_path` (nothing was timed); logged once. Off under DDP,
        where every process must take part in the same choice."""
        candidates = self._candidates(evaluation=True)
        planned = self.planned_evaluation_batches()
        limit = self.untimed_evaluation_batches
        limit = 2 * len(candidates) if limit is None else limit
        if len(candidates) < 2 or planned is None or planned > limit or self.trainer.world_size > 1:
            return None
        if self.batching is not None and self.memory_format is not None:
            path, source = (self.batching, self.memory_format), "training's path"
        elif self._saved_training_path is not None:
            path, source = self._saved_training_path, "the checkpoint's training path"
        else:
            path = self._fixed_loop_path()
            source = "the loop" if self.requested_path[0] is None else "the fixed path"
        if not self._exact_for_evaluation(path):
            path, source = ("loop", "contiguous"), f"the loop channels-first: {source}, the channels-last loop, adapts less exactly"
        if path != self._untimed_path:
            self._untimed_path = path
            rank_zero_info(
                f"{type(self).__name__}: batching='auto' runs evaluation on {path_name(*path)!r} ({source}) "
                f"untimed: this run evaluates {planned:.0f} batch{'es' if planned != 1 else ''}, too few to repay "
                f"timing {len(candidates)} paths twice."
            )
        return path

    def _timed_choice(self, batch: TaskBatch, evaluation: bool) -> Tuple[str, str, Dict[str, float]]:
        """Time a step (training's, or with ``evaluation`` evaluation's) on every candidate path
        and return the chosen (batching, memory format) and the timings in ms by path name
        (empty when there was nothing to time); logs the decision."""
        candidates = self._candidates(evaluation)
        timings: Dict[Tuple[str, str], List[float]] = {}
        # Training's candidates that ran out of memory (a GPU's): dropped from the choice; if
        # every one did, "auto" groups the tasks (below). The message only: the error's frames
        # would hold the failed step's tensors.
        exhausted: Dict[Tuple[str, str], str] = {}
        vmap_failure: Optional[str] = None
        with torch.inference_mode(False), torch.enable_grad():
            if batch.support_x.is_inference():
                batch = TaskBatch(*(t.clone() for t in batch))
            if candidates[0][0] == "vmap" and any(batching == "loop" for batching, _ in candidates) \
                    and self._vmap_runs is None:
                try:
                    self._timed_step(batch, *candidates[0], evaluation=evaluation)
                    self._vmap_runs = True
                except TaskShapeError:
                    raise  # the same on every path: the user's to fix
                except (RuntimeError, ValueError) as error:
                    if out_of_memory(error) and not evaluation:
                        exhausted[candidates[0]] = str(error)
                    else:
                        vmap_failure = str(error)
                if vmap_failure is not None:
                    # The same batch on the loop first: if it fails there too, the input or the
                    # backbone is at fault (a wrong channel count, say), not vmap, and the loop's
                    # error is the one to see, without a warning blaming vmap.
                    # (Not for a module Lightning compiled, trainer.fit(torch.compile(module)):
                    # there the extra step would run in compiled frames, where iMAML's
                    # Hessian-vector products differentiate a compiled backward again, which
                    # fails; the training step's own backward runs outside them.)
                    if not self.compiled_by_lightning() and not torch.compiler.is_compiling():
                        loop = next(candidate for candidate in candidates if candidate[0] == "loop")
                        self._timed_step(batch, *loop, evaluation=evaluation)
                    warnings.warn(
                        f"{type(self.backbone).__name__} cannot run under torch.func.vmap ({vmap_failure}); adapting "
                        "tasks one by one instead. Pass batching='loop' to skip this attempt.",
                        stacklevel=3,
                    )
                    self._vmap_runs = False
                    candidates = [candidate for candidate in candidates if candidate[0] == "loop"]
                if exhausted:
                    release_memory(batch.support_x.device)
            left = [candidate for candidate in candidates if candidate not in exhausted]
            if len(candidates) > 1 and left and torch.are_deterministic_algorithms_enabled():
                # Timing decides by the machine's load: the paths round differently, and training
                # (Adam) grows that into other weights, so a run would not repeat itself.
                chosen = next((c for c in (("vmap", "contiguous"), ("loop", "contiguous")) if c in left), left[0])
                rank_zero_info(
                    f"{type(self).__name__}: batching='auto' takes {path_name(*chosen)!r} for "
                    f"{'evaluation' if evaluation else 'training'} untimed: deterministic algorithms are on "
                    "(Trainer(deterministic=True)), and a timed choice can differ from run to run.")
                return (*chosen, {})
            if len(candidates) > 1:
                timings = {candidate: [] for candidate in candidates if candidate not in exhausted}
                for _ in range(2):
                    for candidate in list(timings):
                        try:
                            timings[candidate].append(self._timed_step(batch, *candidate, evaluation=evaluation))
                        except RuntimeError as error:
                            if evaluation or not out_of_memory(error):
                                raise
                            exhausted[candidate] = str(error)
                            del timings[candidate]
                        if candidate in exhausted:
                            release_memory(batch.support_x.device)
        if exhausted and not timings:
            # Not one path fits this many tasks' graphs at once.
            return self._fewer_tasks_per_backward(batch, exhausted)
        if not timings:
            return (*candidates[0], {})
        best = {candidate: min(times) for candidate, times in timings.items()}
        if exhausted:
            rank_zero_info(
                f"{type(self).__name__}: batching='auto' leaves out {', '.join(repr(path_name(*c)) for c in exhausted)}: "
                f"out of memory with {self._tasks_per_graph(batch)} tasks per backward pass."
            )
        judged = dict(best)
        if any(memory_format == "contiguous" for _, memory_format in judged):
            # The copy of the weights into the other layout must pay for itself clearly: within
            # the margin the two layouts are a coin toss decided by timing noise.
            for candidate in judged:
                if candidate[1] == "channels_last":
                    judged[candidate] /= 1 - CHANNELS_LAST_MARGIN
        batching, memory_format = min(judged, key=judged.get)
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every process runs the path process 0 timed: they step in lockstep anyway, and a
            # run should not depend on which process's timing came out ahead.
            batching, memory_format = self.trainer.strategy.broadcast((batching, memory_format), src=0)
        milliseconds = {path_name(*c): 1000 * t for c, t in best.items()}
        if self.requested_path[0] is not None:  # batching fixed: only the layout was chosen
            chooser, chosen = "memory_format='auto'", f"{memory_format!r} (batching={batching!r})"
        else:
            chooser = "batching='auto'"
            chosen = repr(batching) + (" with memory_format='channels_last'" if memory_format == "channels_last" else "")
        step = "evaluation" if evaluation else "training"
        rank_zero_info(
            f"{type(self).__name__}: {chooser} chose {chosen} for {step} (one {step} step of "
            f"{batch.num_tasks} tasks: " + ", ".join(f"{path} {ms:.1f} ms" for path, ms in milliseconds.items()) + ")."
        )
        prefix = "batching/evaluation_" if evaluation else "batching/"
        for logger in self.loggers:
            logger.log_metrics(
                {f"{prefix}{path.replace(' ', '_')}_ms": ms for path, ms in milliseconds.items()},
                step=self.global_step if self._trainer is not None else 0,
            )
        return batching, memory_format, milliseconds

    def _tasks_per_graph(self, batch: TaskBatch) -> int:
        """How many tasks' graphs a training step holds at once: the group size, else the batch."""
        group = self.tasks_per_backward
        return batch.num_tasks if group is None else min(group, batch.num_tasks)

    def _fewer_tasks_per_backward(self, batch: TaskBatch, exhausted: Dict[Tuple[str, str], str]
                                  ) -> Tuple[str, str, Dict[str, float]]:
        """Every candidate path ran out of memory timing a training step: under
        ``tasks_per_backward="auto"`` try again with groups of half as many tasks (down to one),
        else raise the out-of-memory error, with what to change."""
        held = self._tasks_per_graph(batch)
        if not self.tasks_per_backward_auto or held <= 1:
            message = next(iter(exhausted.values()))
            raise torch.OutOfMemoryError(f"{message}\n{out_of_memory_hint(type(self).__name__, held)}")
        self.tasks_per_backward = -(-held // 2)
        rank_zero_info(
            f"{type(self).__name__}: out of memory on every path with {held} tasks per backward pass "
            f"({', '.join(path_name(*c) for c in exhausted)}); tasks_per_backward='auto' tries "
            f"{self.tasks_per_backward}."
        )
        return self._timed_choice(batch, evaluation=False)

    def _timed_step(self, batch: TaskBatch, batching: str, memory_format: str = "contiguous",
                    evaluation: bool = False) -> float:
        # A GPU runs kernels asynchronously: the clock reads after they finish, not after launch.
        device = batch.support_x.device
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
        # The random draws a step makes (Reptile's support mini-batches, a backbone's dropout)
        # are not taken from the run's stream: the steps after a timing run as they would have.
        with self.running_on((batching, memory_format)), random_state_kept(device):  # read by execution()
            synchronize(device)
            start = time.perf_counter()
            if evaluation:
                with torch.no_grad():  # as _evaluate runs it: no outer graph
                    self._adapted_query_outputs(batch)
            else:
                # As the training step will run: a group's graph at a time. A group size set to
                # fit the memory must hold for the timing too, not only after it.
                trainable = [p for p in self.parameters() if p.requires_grad]
                self._step_gradients(batch, self.tasks_per_backward, trainable, batching)
            synchronize(device)
            return time.perf_counter() - start


@contextlib.contextmanager
def random_state_kept(device: torch.device) -> Iterator[None]:
    """Within it, PyTorch's random generators (the CPU's, and ``device``'s if it is a GPU) draw
    as usual, and are put back as they were on leaving: a timing step consumes nothing of the
    run's random stream."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else ``platform.processor()`` (may be empty)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def timing_signature(device: torch.device) -> str:
    """What a timed path choice holds for: this machine (host name), the device (its CUDA name,
    or the CPU's model), torch's version and its intra-op threads."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name() or platform.machine()
    return f"{platform.node()} | {device.type}: {name} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed for want of memory: a GPU's
    ``torch.OutOfMemoryError``, or the CPU allocator's refusal (a ``RuntimeError``)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


def out_of_memory_hint(learner: str, tasks: int) -> str:
    """What to change when a training step of ``tasks`` tasks' graphs does not fit."""
    return (f"{learner} ran out of memory holding {tasks} task{'s' if tasks != 1 else ''}' graphs for one backward "
            "pass. Fewer at a time give the same gradient: tasks_per_backward=N "
            "(--model.init_args.tasks_per_backward N; 'auto' halves it until a step fits), or a smaller "
            "--data.init_args.meta_batch_size.")


def release_memory(device: torch.device) -> None:
    """Hand a GPU's cached blocks back after a step that ran out of memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def path_name(batching: str, memory_format: str) -> str:
    """How logs and :attr:`MAML.batching_timings` name an execution path: ``"vmap"``,
    ``"loop"``, ``"loop channels_last"`` or ``"vmap channels_last"``."""
    return batching + (" channels_last" if memory_format == "channels_last" else "")


class ANIL(MAML):
    """Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020): MAML that adapts only
    the head.

    Arguments as :class:`MAML`; ``adapt`` defaults to ``["head."]`` (our backbones name their
    last layer ``head``). With a :class:`~fewshot_lightning.models.Conv4` or
    :class:`~fewshot_lightning.models.MLP` a task's support set goes through the layers below
    the head once per adaptation, not once per inner step (see
    :attr:`MAML.head_features_once`; same numbers).
    """

    def __init__(self, backbone: nn.Module, adapt: Optional[Sequence[str]] = ("head.",), **kwargs) -> None:
        super().__init__(backbone, adapt=adapt, **kwargs)


class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML whose inner learning rate is a learned
    tensor with one entry per parameter element (direction and size of the step).

    Arguments as :class:`MAML`, less ``learn_inner_lr`` and ``per_parameter_lr`` (both always
    on); ``inner_lr`` initialises every rate.
    """

    def __init__(self, backbone: nn.Module, **kwargs) -> None:
        for fixed in ("learn_inner_lr", "per_parameter_lr"):
            # True is what it sets anyway, and what its checkpoint's saved hyper-parameters hold
            # (load_from_checkpoint passes them back).
            if fixed in kwargs and kwargs.pop(fixed) is not True:
                raise ValueError(f"MetaSGD always learns per-parameter rates; remove {fixed!r} (or use MAML).")
        super().__init__(backbone, learn_inner_lr=True, per_parameter_lr=True, **kwargs)


class MAMLPlusPlus(MAML):
    """MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019): MAML with
    the paper's training options.

    On by default: the multi-step loss with annealed weights (``multi_step_loss_steps``),
    per-step learnable inner learning rates for every parameter tensor (``per_step_lr``,
    ``learn_inner_lr``) and per-step batch-norm weights and biases (the paper's BNWB,
    ``per_step_bn``). Off unless given, as in :class:`MAML`: derivative-order annealing
    (``first_order_steps``, first order for that many outer steps; the authors' Omniglot
    configuration does not anneal, their mini-ImageNet one does for 10 "epochs") and cosine
    annealing of the outer learning rate (``lr_scheduler``:
    ``torch.optim.lr_scheduler.CosineAnnealingLR``). The ``configs/mamlpp_*.yaml`` files set
    both as the authors' configurations do. ``inner_lr`` (the rates' initial value) defaults to
    MAML's 0.01; the authors' Omniglot configuration starts at 0.1, their mini-ImageNet one at 0.01.

    Per-step batch norm: every batch-norm layer's weight and bias get ``inner_steps``
    meta-learned copies, held in :attr:`step_norms` as ``[inner_steps, C]`` tensors; the
    support pass of inner step ``k`` (counting from 0) and the query pass after it use copy
    ``k``, as the authors' code does (its ``num_step``), the query pass before any step copy 0,
    and steps beyond ``inner_steps`` (``test_inner_steps`` larger) the last. They
    are not adapted in the inner loop (no inner gradient, no inner rate), as in the authors'
    code. Each copy starts as the backbone's own weight and bias, which are then no longer used
    (``requires_grad`` off). The paper's per-step running statistics (BNRS) do not apply:
    batch norm here normalises each task with its own batch statistics, in training and in
    evaluation (as the authors' code does), and keeps no running averages.

    Args:
        backbone: any ``nn.Module``.
        inner_steps: inner steps (the paper: 5).
        per_step_lr, learn_inner_lr: learnable per-step, per-layer inner rates (on).
        multi_step_loss_steps: outer steps of the multi-step loss; the authors' Omniglot
            configuration anneals it over 10 "epochs" of 500 steps.
        per_step_bn: per-step batch-norm weights and biases; default (``None``) on when the
            backbone has batch-norm layers with weights. ``True`` without any is an error.
        **kwargs: :class:`MAML`'s other arguments (``first_order_steps`` included).

    Example::

        from fewshot_lightning.algorithms import MAMLPlusPlus
        from fewshot_lightning.models import Conv4

        model = MAMLPlusPlus(Conv4(hidden=64, out_features=20), inner_lr=0.1, test_inner_steps=5)
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_steps: int = 5,
        per_step_lr: bool = True,
        learn_inner_lr: bool = True,
        multi_step_loss_steps: int = 5000,
        per_step_bn: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        norms = batch_norm_parameters(backbone)
        if per_step_bn and not norms:
            raise ValueError(
                f"per_step_bn=True gives every batch-norm layer's weight and bias a copy per inner step, and "
                f"{type(backbone).__name__} has no batch-norm layer with weights: drop per_step_bn (or set it to "
                "false), or use a backbone with batch norm."
            )
        #: Names of the backbone's batch-norm weights and biases that take a copy per inner step
        #: (empty with ``per_step_bn`` off). Set before MAML's constructor, which reads it
        #: through :meth:`adapted_shapes`.
        self.per_step_norms: Tuple[str, ...] = tuple(norms) if per_step_bn is not False else ()
        super().__init__(
            backbone, inner_steps=inner_steps, per_step_lr=per_step_lr, learn_inner_lr=learn_inner_lr,
            multi_step_loss_steps=multi_step_loss_steps, **kwargs,
        )
        live = dict(self.backbone.named_parameters())
        #: The per-step batch-norm weights and biases, ``[inner_steps, C]`` each, under the
        #: backbone parameter's name with ``.`` as ``__`` (as :class:`~fewshot_lightning.inner.InnerLearningRate`).
        #: A frozen one (``requires_grad=False`` when the learner is built) gives frozen copies.
        self.step_norms = nn.ParameterDict({
            name.replace(".", "__"): nn.Parameter(live[name].detach().unsqueeze(0).repeat(
                inner_steps, *([1] * live[name].dim())), requires_grad=live[name].requires_grad)
            for name in self.per_step_norms
        })
        for name in self.per_step_norms:
            live[name].requires_grad_(False)  # replaced by the copies: unused, and no gradient expected

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        saved_tables = any(key.startswith("step_norms.") for key in state_dict)
        if bool(self.per_step_norms) != saved_tables and kwargs.get("strict", args[0] if args else True):
            # Weights from before per-step batch norm existed (2026-11-28), or trained with the
            # other setting: say which setting loads them.
            setting = "false" if saved_tables is False else "true"
            raise WeightsMismatchError(
                f"{type(self).__name__}: these weights were trained {'with' if saved_tables else 'without'} per-step "
                f"batch-norm weights and biases, and the model is configured {'without' if saved_tables else 'with'} "
                f"them: set per_step_bn: {setting} (CLI: --model.init_args.per_step_bn {setting}) to load them."
            )
        def rows(prefix: str) -> set:
            return {int(value.shape[0]) for key, value in state_dict.items()
                    if key.startswith(prefix) and isinstance(value, Tensor) and value.dim() >= 1}

        tables, rates = rows("step_norms."), rows("inner_lr.rates.")
        if len(tables) == 1 and len(rates) == 1 and getattr(self.inner_lr, "per_step", False) \
                and tables == {next(iter(rates)) + 1}:
            # Until 2026-11-30 the query pass after step k used a copy of its own (k + 1): one
            # table row more than the per-step rates have steps.
            steps = next(iter(rates))
            raise WeightsMismatchError(
                f"{type(self).__name__}: these weights hold {steps + 1} per-step batch-norm copies for {steps} inner "
                "steps: they were trained before 2026-11-30, when the query pass after each inner step used a copy "
                "of its own; it now uses that step's copy, as the authors' code does, and no exact conversion "
                "exists. Train again (or load them with the release that saved them)."
            )
        return super().load_state_dict(state_dict, *args, **kwargs)

    def adapted_shapes(self, backbone: nn.Module, adapt: Optional[Sequence[str]]) -> Dict[str, torch.Size]:
        # The per-step batch-norm tensors are set per step, not adapted.
        shapes = super().adapted_shapes(backbone, adapt)
        return {name: shape for name, shape in shapes.items() if name not in self.per_step_norms}

    def _parameter_split(self) -> Tuple[Params, Params]:
        if self._split is None:
            adapted, fixed = split_parameters(self.backbone, self.adapt_names)
            # The forward receives the per-step batch-norm tensors with the adapted ones, per task.
            self._split = adapted, {n: p for n, p in fixed.items() if n not in self.per_step_norms}
        return self._split

    def step_norm_params(self, step: int, tasks: int) -> Params:
        """The per-step batch-norm weights and biases of inner step ``step`` (the last copy beyond
        ``inner_steps``), repeated for ``tasks`` tasks, ``[tasks, C]`` each."""
        params = {}
        for name in self.per_step_norms:
            table = self.step_norms[name.replace(".", "__")]
            row = table[min(step, table.shape[0] - 1)]
            params[name] = row.unsqueeze(0).expand(tasks, *row.shape)
        return params

    def inner_options(self, support_x: Tensor, steps: int) -> Dict[str, Any]:
        options = super().inner_options(support_x, steps)
        if self.per_step_norms:
            tasks = support_x.shape[0]
            options["per_step"] = lambda step: self.step_norm_params(step, tasks)
        return options


def batch_norm_parameters(module: nn.Module) -> List[str]:
    """Names of the weights and biases of ``module``'s batch-norm layers (any
    ``nn.modules.batchnorm._BatchNorm``: ``BatchNorm1d/2d/3d``, ``TaskBatchNorm2d``), in order."""
    names = []
    for prefix, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            names += [f"{prefix}.{name}" if prefix else name for name, _ in layer.named_parameters(recurse=False)]
    return names


#: MAML++'s least total weight of the query losses before the last step while the multi-step
#: loss anneals (the authors' ``min_value_for_non_final_losses``: 0.03 / inner_steps each).
MULTI_STEP_LOSS_FLOOR = 0.03

#: MAML's arguments about differentiating through the inner loop, and their "off" values.
THROUGH_INNER_LOOP = {"first_order": False, "first_order_steps": 0, "learn_inner_lr": False, "multi_step_loss_steps": 0}


def refuse(algorithm: str, kwargs: Dict[str, Any], defaults: Dict[str, Any], reason: str) -> None:
    """Raise if ``kwargs`` sets one of MAML's arguments in ``defaults``, which mean nothing for
    ``algorithm``, to other than its default (the CLI passes every default explicitly); a
    default given as a tuple lists the values that all mean "off"."""
    for name, default in defaults.items():
        accepted = default if isinstance(default, tuple) else (default,)
        if name in kwargs and kwargs[name] not in accepted:
            raise ValueError(
                f"{algorithm} takes no {name}={kwargs[name]!r}: {reason}. Leave it at "
                f"{' or '.join(repr(value) for value in accepted)} (or use MAML)."
            )
