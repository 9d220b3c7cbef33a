"""Where one convolutional MAML meta-iteration spends its time (issue 12).

Conv4-64 with batch norm, 28x28, 5-way 1-shot 15 queries, 8 tasks, 1 inner step, second order:
the ``conv4-64-bn`` case of ``benchmarks/speed.py``, on the loop (``--memory-format
channels_last``: with channels-last weights, the path ``batching="auto"`` took on the 2-core CPU
of ``docs/benchmarks.md``). Two views of the same iteration:

1. phases, timed with the phase boundaries synchronised: support forward, inner gradient
   (``autograd.grad`` with ``create_graph``), the update, query forward under the adapted
   weights, outer backward (through the inner gradient: the double backward), Adam step;
   built from the same public pieces ``MAML.trajectory`` uses (``initial_params``,
   ``functional``), so it is our step taken apart, not another implementation;
2. operators: ``torch.profiler`` self time per ATen operator over whole iterations
   (``MAML.training_step`` + backward + step), the convolutions' forward, backward and
   double-backward kernels among them.

    python benchmarks/profile_conv_maml.py [--iterations 10] [--batching loop] [--memory-format contiguous] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.models import Conv4
from maml_step_time import cpu_name
from speed import image_batch

PHASES = ("support forward", "inner gradient", "update", "query forward", "outer backward", "Adam step")


def phase_times(model: MAML, optimizer, batch, batching: str) -> dict:
    times = {}
    clock = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = now - clock
        clock = now

    forward = model.functional(batching)
    params = model.initial_params(batch.num_tasks)
    support = forward(params, batch.support_x)
    inner_loss = per_task_loss(support, batch.support_y).sum()
    mark("support forward")
    grads = torch.autograd.grad(inner_loss, list(params.values()), create_graph=True)
    mark("inner gradient")
    adapted = {name: p - model.inner_lr(0, name) * g for (name, p), g in zip(params.items(), grads)}
    mark("update")
    query = forward(adapted, batch.query_x)
    loss = per_task_loss(query, batch.query_y).mean()
    mark("query forward")
    optimizer.zero_grad()
    loss.backward()
    mark("outer backward")
    optimizer.step()
    mark("Adam step")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batching", default="loop", choices=("loop", "vmap"))
    parser.add_argument("--memory-format", default="contiguous", choices=("contiguous", "channels_last"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=64, out_features=5), inner_lr=0.4, inner_steps=1, batching=args.batching,
                 memory_format=args.memory_format)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    make = image_batch(8, 5, 1, 15, 1, 28)
    batches = [make(seed, "cpu") for seed in range(args.iterations + 2)]
    print(f"Machine: {cpu_name()}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, 1-min load average {os.getloadavg()[0]:.1f}")
    print(f"Conv4-64-bn MAML, 5w1s15q 28x28, 8 tasks, 1 step, second order, batching={args.batching}, "
          f"memory_format={args.memory_format}; "
          f"median of {args.iterations} iterations after 2 warm-up\n")

    samples = {name: [] for name in PHASES}
    whole = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        times = phase_times(model, optimizer, batch, args.batching)
        elapsed = time.perf_counter() - start
        if index >= 2:
            whole.append(elapsed)
            for name in PHASES:
                samples[name].append(times[name])
    total = statistics.median(whole)
    print("| phase | ms | share |")
    print("|---|---:|---:|")
    for name in PHASES:
        ms = 1000 * statistics.median(samples[name])
        print(f"| {name} | {ms:.1f} | {100 * ms / (1000 * total):.0f}% |")
    print(f"| whole iteration | {1000 * total:.1f} | 100% |\n")

    # Operators over whole iterations of the real training step.
    def iteration(batch) -> None:
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for batch in batches[:2]:
        iteration(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[2:]:
            iteration(batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    spent = sum(e.self_cpu_time_total for e in events)
    print("| operator (self time) | calls / iteration | ms / iteration | share |")
    print("|---|---:|---:|---:|")
    for event in events[:15]:
        print(f"| `{event.key}` | {event.count / args.iterations:.0f} | "
              f"{event.self_cpu_time_total / 1000 / args.iterations:.1f} | {100 * event.self_cpu_time_total / spent:.0f}% |")
    print(f"\nAll operators: {spent / 1000 / args.iterations:.1f} ms / iteration under the profiler.")


if __name__ == "__main__":
    main()
