"""Where one convolutional MAML meta-iteration spends its time (issue 12).

A case of ``benchmarks/speed.py`` (``--case``): ``conv4-64-bn`` (the default: Conv4-64 with batch
norm, 28x28, 5-way 1-shot 15 queries, 8 tasks, 1 inner step, second order) or ``mini``
(Conv4-32 with batch norm on 84x84x3, 5-way 5-shot 15 queries, 4 tasks, 5 inner steps; ``mini-fo``
the same, first order), on the
path given (``--batching``, ``--memory-format``; ``--tasks-per-backward N`` accumulates the
meta-gradient N tasks at a time). ``--batch-norm pytorch`` runs the model's batch-norm layers on
``F.batch_norm`` instead of ``fewshot_lightning.models.batch_norm`` (same values and
derivatives; PyTorch's double backward), ``--max-pool pytorch`` their max-pooling on
``nn.MaxPool2d`` instead of ``fewshot_lightning.models.max_pool`` and the one node with batch
norm for second-order passes (same values and derivatives; the map pooled kept for the backward). ``--contender learn2learn`` (or ``learn2learn-nchw``,
the module's blocks keeping NCHW maps) profiles ``speed.py``'s learn2learn loop on the same case
instead, for an operator-by-operator comparison (with ``--tasks-per-backward 1``, its examples'
loop, a backward pass per task, against ours with the same option). Two views of the same iteration:

1. phases (one-step cases), timed with the phase boundaries synchronised: support forward, inner
   gradient (``autograd.grad`` with ``create_graph``), the update, query forward under the
   adapted weights, outer backward (through the inner gradient: the double backward), Adam step;
   built from the same public pieces ``MAML.trajectory`` uses (``initial_params``,
   ``functional``), so it is our step taken apart, not another implementation;
2. operators: ``torch.profiler`` self time per ATen operator over whole iterations
   (``MAML.training_step`` + backward + step), the convolutions' forward, backward and
   double-backward kernels among them; ``--shapes`` splits each operator by its input shapes.

    python benchmarks/profile_conv_maml.py [--case mini] [--iterations 10] [--batching loop] [--memory-format contiguous]
        [--batch-norm ours] [--max-pool ours] [--tasks-per-backward N] [--shapes] [--threads 2] [--contender learn2learn]
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
from fewshot_lightning.models.blocks import ConvBlock
from maml_step_time import cpu_name
from speed import CASES, learn2learn, torch_layers

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
    parser.add_argument("--case", default="conv4-64-bn", choices=("conv4-64-bn", "mini", "mini-fo"))
    parser.add_argument("--contender", default="ours", choices=("ours", "learn2learn", "learn2learn-nchw"),
                        help="whose iteration to profile: ours (on --batching/--memory-format), or learn2learn's loop "
                        "as speed.py runs it, on the module as built or on its NCHW copy")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batching", default="loop", choices=("loop", "vmap"))
    parser.add_argument("--memory-format", default="contiguous", choices=("contiguous", "channels_last"))
    parser.add_argument("--batch-norm", default="ours", choices=("ours", "pytorch"),
                        help="ours: fewshot_lightning.models.batch_norm (the default of our layers); pytorch: F.batch_norm")
    parser.add_argument("--max-pool", default="ours", choices=("ours", "pytorch"),
                        help="ours: fewshot_lightning.models.max_pool (the default of our blocks); pytorch: nn.MaxPool2d")
    parser.add_argument("--tasks-per-backward", type=int, default=None,
                        help="ours: MAML(tasks_per_backward=N); with a learn2learn contender, 1 runs its examples' "
                        "loop (a backward pass per task) instead of its README's")
    parser.add_argument("--shapes", action="store_true",
                        help="operators split by input shapes (the profiler's shape records: with --case mini "
                        "--batch-norm pytorch they took over 24 GiB on the 2-core VM of docs/benchmarks.md)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cpu-allocator", choices=("system", "keep"), default="system",
                        help="keep: glibc keeps freed memory, as the fewshot-lightning command does on the CPU")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_allocator == "keep":
        from fewshot_lightning.allocator import keep_freed_memory

        if not keep_freed_memory():
            parser.error("--cpu-allocator keep needs glibc")
    torch.manual_seed(0)
    case = CASES[args.case]
    model = MAML(torch_layers(case.build(), batch_norm=args.batch_norm == "pytorch",
                              max_pool=args.max_pool == "pytorch"), inner_lr=case.inner_lr,
                 inner_steps=case.steps, first_order=case.first_order, batching=args.batching,
                 memory_format=args.memory_format, tasks_per_backward=args.tasks_per_backward)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    batches = [case.batch(seed, "cpu") for seed in range(args.iterations + 2)]
    print(f"Machine: {cpu_name()}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, 1-min load average {os.getloadavg()[0]:.1f}, CPU allocator {args.cpu_allocator}")
    print(f"{args.case}: {case.tasks} tasks, {case.steps} inner step(s), "
          f"{'first' if case.first_order else 'second'} order, batching={args.batching}, "
          f"memory_format={args.memory_format}, batch norm {args.batch_norm}, max-pool {args.max_pool}, tasks_per_backward="
          f"{args.tasks_per_backward}; median of {args.iterations} iterations after 2 warm-up\n")

    def our_iteration(batch) -> None:
        loss = model.training_step(batch, 0)  # in groups of tasks: their gradients, handed over by backward
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    iteration = our_iteration
    if args.contender != "ours":  # speed.py's learn2learn contender, on PyTorch's layers as its users run them
        theirs = torch_layers(case.build())
        if args.contender == "learn2learn-nchw":
            for block in theirs.modules():
                if isinstance(block, ConvBlock):
                    block.one_task_channels_last = False
        if args.tasks_per_backward not in (None, 1):
            parser.error("with a learn2learn contender --tasks-per-backward is 1 (its per-task loop) or not given")
        per_task = args.tasks_per_backward == 1
        iteration = learn2learn(case, theirs, per_task=per_task)
        print(f"learn2learn's loop ({args.contender}, {'a backward pass per task' if per_task else 'summed losses'}), "
              "not ours: --batching, --memory-format, --batch-norm and --max-pool do not apply\n")

    if case.steps == 1 and args.tasks_per_backward is None and args.contender == "ours":
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
    else:
        whole = []
        for index, batch in enumerate(batches):
            start = time.perf_counter()
            iteration(batch)
            if index >= 2:
                whole.append(time.perf_counter() - start)
        print(f"Whole iteration, without the profiler: {1000 * statistics.median(whole):.1f} ms (median)\n")

    # Operators over whole iterations of the real training step.
    for batch in batches[:2]:
        iteration(batch)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for batch in batches[2:]:
            iteration(batch)
    events = sorted(prof.key_averages(group_by_input_shape=args.shapes), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    spent = sum(e.self_cpu_time_total for e in events)
    print(f"| operator (self time){' | input shapes' if args.shapes else ''} | calls / iteration | ms / iteration | share |")
    print(f"|---{'|---' if args.shapes else ''}|---:|---:|---:|")
    for event in events[:args.top]:
        shapes = f" | {[list(shape) for shape in event.input_shapes if shape]}" if args.shapes else ""
        print(f"| `{event.key}`{shapes} | {event.count / args.iterations:.0f} | "
              f"{event.self_cpu_time_total / 1000 / args.iterations:.1f} | {100 * event.self_cpu_time_total / spent:.0f}% |")
    print(f"\nAll operators: {spent / 1000 / args.iterations:.1f} ms / iteration under the profiler.")


if __name__ == "__main__":
    main()
