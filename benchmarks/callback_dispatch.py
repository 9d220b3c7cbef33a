"""What Lightning's callback dispatch costs a training step, with and without the empty hooks.

``fewshot-lightning fit --config configs/maml_sinusoid.yaml`` runs with ten callbacks (the
config's five, the CLI's own, Lightning's model summary), and Lightning calls each of the six
per-step training hooks on every one of them (``trainer/call.py``: ``_call_callback_hooks``),
overridden or not. ``MetaLearner.setup`` hides the inherited empty ones for the run
(``fewshot_lightning.hooks``). This script builds that run as the CLI does, stops it at its
third training batch, and times Lightning's own dispatch of the six hooks on the real trainer,
batch, outputs and optimizer (gradients in place), with every hook visible (Lightning as it
comes) and with the empty ones hidden, taking turns round by round; then the non-finite
guard's check of every gradient and the batch's task losses, ours (``callbacks._all_finite``)
against ``torch.nn.utils.get_total_norm``, which it used before. Medians, microseconds a step.

    python benchmarks/callback_dispatch.py [--repeats 2000] [--rounds 7]

Run it alone: at a few microseconds a call, other work on the machine shows.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call

from fewshot_lightning.algorithms.maml import cpu_name
from fewshot_lightning.callbacks import _all_finite
from fewshot_lightning.cli import build_cli
from fewshot_lightning.hooks import hide_idle_hooks, restore_hooks

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "maml_sinusoid.yaml")


class Stop(Exception):
    pass


class Capture(Callback):
    """Keeps what the hooks are called with at the third training batch, then stops the run."""

    def __init__(self) -> None:
        self.state = {}

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

    times = {"all hooks (Lightning as it comes)": [], "empty hooks hidden": [],
             "guard check, get_total_norm": [], "guard check, ours": []}
    hidden = 0
    for _ in range(args.rounds):
        restore_hooks(callbacks)
        times["all hooks (Lightning as it comes)"].append(mean_us(step_hooks, args.repeats))
        hidden = hide_idle_hooks(callbacks)
        times["empty hooks hidden"].append(mean_us(step_hooks, args.repeats))
        times["guard check, get_total_norm"].append(mean_us(
            lambda: bool(torch.nn.utils.get_total_norm([t.detach() for t in checked], norm_type=math.inf).isfinite()),
            args.repeats))
        times["guard check, ours"].append(mean_us(lambda: _all_finite(checked), args.repeats))
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
