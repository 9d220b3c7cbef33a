"""One of issue 12's candidates, measured: ``torch.compile`` of the query forward pass of MAML.

Second-order MAML differentiates the inner gradient, and AOTAutograd's compiled backward
cannot be differentiated again, so the support pass cannot be compiled; the *query* pass is
differentiated once (its backward reaches the adapted parameters, whose own graph back to
the initialisation stays eager). This script compiles exactly that: each task's query
forward, ``functional_call`` of the backbone under the task's adapted parameters, with
``torch.compile(dynamic=False)`` (inductor), and times full meta-iterations against the
eager loop on ``benchmarks/speed.py``'s cases and batches, taking turns, medians after a
warm-up round. It checks the first step's loss agrees before timing.

First-order MAML differentiates no inner gradient, so there every pass can be compiled:
``--whole-step`` (first-order cases only) compiles each pass's loss, support and query alike
(``functional_call`` of the backbone and the cross-entropy, inductor, ``dynamic=False``; the
gradients taken by eager ``torch.autograd.grad``, which runs the compiled backward), a task at a
time, the query gradients at the adapted weights summed into the meta-gradient as first-order
MAML's, against the eager loop with ``tasks_per_backward=1`` (the same one task at a time).

    python benchmarks/compile_query_forward.py [--cases conv4-64-bn conv4-32 mini-fo] [--iterations 6] [--rounds 4]
        [--memory-format channels_last] [--whole-step]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch.func import functional_call

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.inner import channels_last
from fewshot_lightning.models.blocks import keep_layout

from maml_step_time import cpu_name
from speed import CASES, Case


def meta_iteration(case: Case, network: torch.nn.Module, compiled: bool,
                   memory_format: str = "contiguous") -> Callable[[TaskBatch], torch.Tensor]:
    model = MAML(copy.deepcopy(network), inner_lr=case.inner_lr, inner_steps=case.steps,
                 first_order=case.first_order, batching="loop", memory_format=memory_format)
    if compiled:
        _, fixed = model._parameter_split()
        backbone, buffers = model.backbone, dict(model.backbone.named_buffers())

        shared = {name: channels_last(p) for name, p in fixed.items()} if memory_format == "channels_last" else fixed

        def one_task(params, x):
            return functional_call(backbone, {**shared, **buffers, **params}, (x,), strict=False)

        query_forward = torch.compile(one_task, dynamic=False)

        # The layout of the eager loop it replaces: NCHW throughout (ConvBlock's switch of a lone
        # task to channels-last off, as inner.functional's NCHW loop does), or every 4-D
        # parameter passed channels-last.
        layout = channels_last if memory_format == "channels_last" else (lambda p: p)

        def predict(params, x, batching=None):
            with contextlib.nullcontext() if memory_format == "channels_last" else keep_layout():
                return torch.stack([query_forward({n: layout(p[i]) for n, p in params.items()}, x[i])
                                    for i in range(x.shape[0])])

        model.predict = predict  # training_outputs: adapt (eager), then predict on the queries
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: TaskBatch) -> torch.Tensor:
        loss = per_task_loss(model(batch), batch.query_y).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def first_order_iteration(case: Case, network: torch.nn.Module, compiled: bool,
                          memory_format: str = "contiguous") -> Callable[[TaskBatch], torch.Tensor]:
    """A first-order MAML meta-iteration a task at a time: eager, ``MAML(first_order=True,
    tasks_per_backward=1)``'s own loop; compiled, every pass's loss compiled (support passes
    and the query pass), each differentiated once by eager ``autograd.grad``."""
    if not case.first_order:
        raise SystemExit("--whole-step compiles every pass, which only first-order MAML allows (its inner gradients "
                         "are not differentiated again); choose first-order cases, e.g. --cases mini-fo sinusoid-fo")
    model = MAML(copy.deepcopy(network), inner_lr=case.inner_lr, inner_steps=case.steps, first_order=True,
                 batching="loop", memory_format=memory_format, tasks_per_backward=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if not compiled:
        def eager_step(batch: TaskBatch) -> torch.Tensor:
            loss = model.grouped_loss(batch, 1)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.detach()

        return eager_step
    backbone = model.backbone
    buffers = dict(backbone.named_buffers())
    loss_fn = torch.nn.functional.mse_loss if case.batch(0, "cpu").support_y.is_floating_point() \
        else torch.nn.functional.cross_entropy
    layout = channels_last if memory_format == "channels_last" else (lambda p: p)

    def pass_loss(params, x, y):
        return loss_fn(functional_call(backbone, {**buffers, **params}, (x,)), y)

    compiled_loss = torch.compile(pass_loss, dynamic=False)

    def gradient(params, x, y):
        loss = compiled_loss(params, x, y)
        return loss, torch.autograd.grad(loss, list(params.values()))

    def compiled_step(batch: TaskBatch) -> torch.Tensor:
        total, losses = None, []
        with contextlib.nullcontext() if memory_format == "channels_last" else keep_layout():
            for t in range(batch.num_tasks):
                params = {n: layout(p.detach()).requires_grad_() for n, p in backbone.named_parameters()}
                for _ in range(case.steps):
                    _, grads = gradient(params, batch.support_x[t], batch.support_y[t])
                    params = {n: (p - case.inner_lr * g).detach().requires_grad_()
                              for (n, p), g in zip(params.items(), grads)}
                loss, grads = gradient(params, batch.query_x[t], batch.query_y[t])
                losses.append(loss.detach())
                total = list(grads) if total is None else [a + g for a, g in zip(total, grads)]
        optimizer.zero_grad()
        for p, g in zip(backbone.parameters(), total):
            p.grad = (g / batch.num_tasks).contiguous()
        optimizer.step()
        return torch.stack(losses).mean()

    return compiled_step


def measure(name: str, iterations: int, rounds: int, memory_format: str = "contiguous",
            whole_step: bool = False) -> Dict[str, float]:
    case = CASES[name]
    torch.manual_seed(0)
    network = case.build()
    batches = [case.batch(i, "cpu") for i in range(iterations)]
    build = first_order_iteration if whole_step else meta_iteration
    runs = {"eager": build(case, network, False, memory_format),
            "compiled": build(case, network, True, memory_format)}
    start = time.perf_counter()
    first = {label: float(step(batches[0])) for label, step in runs.items()}
    compile_s = time.perf_counter() - start
    if abs(first["eager"] - first["compiled"]) > 1e-4 * max(1.0, abs(first["eager"])):
        raise RuntimeError(f"{name}: compiled loss {first['compiled']} differs from eager {first['eager']}")
    times: Dict[str, List[float]] = {label: [] for label in runs}
    for round_index in range(rounds):
        for label, step in runs.items():
            for batch in batches:
                begin = time.perf_counter()
                step(batch)
                if round_index > 0:
                    times[label].append(time.perf_counter() - begin)
    eager, compiled = (statistics.median(times[label]) for label in ("eager", "compiled"))
    return {"eager_ms": eager * 1e3, "compiled_ms": compiled * 1e3, "speedup": eager / compiled,
            "first_step_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["conv4-64-bn", "conv4-32", "mini-fo"], choices=sorted(CASES))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                        help="the loop's layout, eager and compiled alike (channels_last: auto's path on 28x28 grey images)")
    parser.add_argument("--whole-step", action="store_true",
                        help="first-order cases: compile every pass (support and query), a task at a time, "
                             "against the eager loop with tasks_per_backward=1")
    args = parser.parse_args()
    if args.whole_step:
        for name in args.cases:
            if not CASES[name].first_order:
                parser.error(f"--whole-step compiles every pass, which only first-order MAML allows; {name} is second "
                             f"order (first-order cases: "
                             f"{', '.join(n for n, c in sorted(CASES.items()) if c.first_order)})")
    torch.set_num_threads(args.threads)
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, torch {torch.__version__}; "
          f"load average before {os.getloadavg()[0]:.2f}; the loop's layout: {args.memory_format}"
          + ("; every pass compiled, a task at a time" if args.whole_step else ""))
    compiled_label = "compiled, every pass" if args.whole_step else "compiled query forward"
    print(f"| case | eager loop (ms) | {compiled_label} (ms) | speedup | first step, compiling (s) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.cases:
        row = measure(name, args.iterations, args.rounds, args.memory_format, args.whole_step)
        print(f"| {name} | {row['eager_ms']:.1f} | {row['compiled_ms']:.1f} | {row['speedup']:.2f}x | "
              f"{row['first_step_s']:.0f} |", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
