"""What Lightning's dispatch costs a training step: the callbacks' hooks, with and without the
empty ones; the default profiler's context around every hook; the step's signature; the batch's
transfer.

``fewshot-lightning fit --config configs/maml_sinusoid.yaml`` runs with ten callbacks (the
config's five, the CLI's own, Lightning's model summary), and Lightning calls each of the six
per-step training hooks on every one of them (``trainer/call.py``: ``_call_callback_hooks``),
overridden or not. ``MetaLearner.setup`` hides the inherited empty ones for the run
(``fewshot_lightning.hooks``). This script builds that run as the CLI does, stops it at its
third training batch, and times Lightning's own dispatch of the six hooks on the real trainer,
batch, outputs and optimizer (gradients in place), with every hook visible (Lightning as it
comes) and with the empty ones hidden, taking turns round by round; then the non-finite
guard's check of every gradient and the batch's task losses, ours (``callbacks._all_finite``: the
loss scaler's unscale kernel, factor 1) against the largest absolute value of each tensor, which
it used until 2026-11-28, and ``torch.nn.utils.get_total_norm``, which it used before that. Then three more things Lightning
does at every training step, each as Lightning does it and as a learner's run now has it: the
profiler contexts of one step (counted on the second batch of the same run; Lightning's default
``PassThroughProfiler.profile`` against ``contextlib.nullcontext``, ``hooks.quiet_profiler``),
``_build_kwargs``' reading of ``training_step``'s signature (``is_param_in_hook_signature``,
with and without the ``__signature__`` that ``hooks.cache_step_signatures`` stores), and the
batch's transfer to the CPU (``LightningModule.transfer_batch_to_device`` against
``MetaLearner``'s, which returns a batch already in place as it is). Medians, microseconds a
step.

    python benchmarks/callback_dispatch.py [--repeats 2000] [--rounds 7]

Run it alone: at a few microseconds a call, other work on the machine shows.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from fewshot_lightning.algorithms.maml import cpu_name
from fewshot_lightning.callbacks import _all_finite, _largest_magnitude_finite
from fewshot_lightning.cli import build_cli
from fewshot_lightning.hooks import STEP_METHODS, cache_step_signatures, hide_idle_hooks, restore_hooks, restore_profiler

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "maml_sinusoid.yaml")


class Stop(Exception):
    pass


class Capture(Callback):
    """Keeps what the hooks are called with at the third training batch, then stops the run."""

    def __init__(self) -> None:
        self.state = {}
        self.profile_calls = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the profiler contexts Lightning enters from here to the next batch's start: one step
        if batch_idx == 1:
            quiet = trainer.profiler.profile

            def counted(name):
                self.profile_calls += 1
                return quiet(name)

            trainer.profiler.profile = counted
        elif batch_idx == 2:
            trainer.profiler.profile = contextlib.nullcontext

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 2:
            self.state.update(trainer=trainer, optimizer=optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "trainer" in self.state:
            self.state.update(outputs=outputs, batch=batch, batch_idx=batch_idx)
            raise Stop


def mean_us(function, repeats: int) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)

    capture = Capture()
    with tempfile.TemporaryDirectory() as logs:
        try:
            build_cli(["fit", "--config", CONFIG, "--trainer.max_steps", "10", "--trainer.limit_val_batches", "0",
                       "--trainer.default_root_dir", logs, "--trainer.logger.init_args.save_dir", logs],
                      callbacks=[capture])
        except Stop:
            pass
    state = capture.state
    trainer, optimizer = state["trainer"], state["optimizer"]
    callbacks = [c for c in trainer.callbacks if c is not capture]
    trainer.callbacks = callbacks
    restore_hooks(callbacks)  # the run stopped in an exception: as Lightning left them
    restore_profiler(trainer.profiler)  # the hooks' dispatch timed with Lightning's own profiler
    loss = state["outputs"]["loss"]
    hooks = [("on_train_batch_start", (state["batch"], state["batch_idx"])), ("on_before_backward", (loss,)),
             ("on_after_backward", ()), ("on_before_optimizer_step", (optimizer,)),
             ("on_before_zero_grad", (optimizer,)), ("on_train_batch_end", (state["outputs"], state["batch"], state["batch_idx"]))]

    def step_hooks() -> None:
        for name, hook_args in hooks:
            call._call_callback_hooks(trainer, name, *hook_args)

    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    checked = grads + [trainer.lightning_module.train_task_losses]
    assert len(grads) == 6 and _all_finite(checked)

    module = trainer.lightning_module
    batch, device = state["batch"], module.device
    contexts = capture.profile_calls
    lightning_profile = PassThroughProfiler().profile

    def profile_contexts(profile) -> None:
        for _ in range(contexts):
            with profile("[Callback]name.hook"):
                pass

    step_functions = [getattr(type(module), name) for name in STEP_METHODS if hasattr(type(module), name)]

    def signature_read() -> bool:
        return is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)

    def forget_signatures() -> None:
        for function in step_functions:
            vars(function).pop("__signature__", None)

    times = {"all hooks (Lightning as it comes)": [], "empty hooks hidden": [],
             "guard check, get_total_norm": [], "guard check, largest absolute value of each (ours until 2026-11-28)": [],
             "guard check, ours": [],
             f"{contexts} profiler contexts, PassThroughProfiler.profile": [],
             f"{contexts} profiler contexts, contextlib.nullcontext": [],
             "training_step's signature read (Lightning as it comes)": [],
             "training_step's signature read, __signature__ stored": [],
             "batch transfer, LightningModule's": [], "batch transfer, MetaLearner's": []}
    hidden = 0
    for _ in range(args.rounds):
        restore_hooks(callbacks)
        times["all hooks (Lightning as it comes)"].append(mean_us(step_hooks, args.repeats))
        hidden = hide_idle_hooks(callbacks)
        times["empty hooks hidden"].append(mean_us(step_hooks, args.repeats))
        times["guard check, get_total_norm"].append(mean_us(
            lambda: bool(torch.nn.utils.get_total_norm([t.detach() for t in checked], norm_type=math.inf).isfinite()),
            args.repeats))
        times["guard check, largest absolute value of each (ours until 2026-11-28)"].append(
            mean_us(lambda: _largest_magnitude_finite(checked), args.repeats))
        times["guard check, ours"].append(mean_us(lambda: _all_finite(checked), args.repeats))
        times[f"{contexts} profiler contexts, PassThroughProfiler.profile"].append(
            mean_us(lambda: profile_contexts(lightning_profile), args.repeats))
        times[f"{contexts} profiler contexts, contextlib.nullcontext"].append(
            mean_us(lambda: profile_contexts(contextlib.nullcontext), args.repeats))
        forget_signatures()
        times["training_step's signature read (Lightning as it comes)"].append(mean_us(signature_read, args.repeats))
        cache_step_signatures(module)
        times["training_step's signature read, __signature__ stored"].append(mean_us(signature_read, args.repeats))
        times["batch transfer, LightningModule's"].append(mean_us(
            lambda: L.LightningModule.transfer_batch_to_device(module, batch, device, 0), args.repeats))
        times["batch transfer, MetaLearner's"].append(mean_us(
            lambda: module.transfer_batch_to_device(batch, device, 0), args.repeats))
    restore_hooks(callbacks)

    print(f"{cpu_name() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(callbacks)} callbacks ({', '.join(type(c).__name__ for c in callbacks)}); "
          f"{hidden} empty per-batch hooks hidden; {args.rounds} rounds x {args.repeats} calls, turns taken\n")
    print("| what, per training step | us (median of rounds) | min to max |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} to {max(values):.1f} |")
    print("\n(The six hooks' dispatch includes the work of the hooks that do something: the guard's "
          "check, the checkpoint and progress-bar bookkeeping.)")


if __name__ == "__main__":
    main()
