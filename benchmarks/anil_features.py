"""ANIL on Conv4: the support set through the features once per adaptation, against once per
inner step, and against learn2learn's ANIL, same model and tasks.

ANIL (Raghu et al., ICLR 2020) adapts the head alone, so a task's support features do not change
between inner steps. ``MAML.head_features_once`` (on by default) computes them once; with it off,
the backbone runs whole at every step, as it did before. learn2learn's ANIL, as in its examples,
computes the features once per task and adapts ``l2l.algorithms.MAML(head)``; here it passes the
support and the query images through the features separately, per task, so that batch norm uses
each task's own statistics as ours does (its examples pass a task's support and query images
together). Conv4-64 (batch norm on batch statistics), 28x28 grey images, 5-way 1-shot 15-query,
meta-batch 16, five inner steps of 0.4, second order; a meta-iteration is the adaptation of every
task, the query loss and the outer backward. The contenders take turns; the first round's first
iterations are not timed. Last, the path ``batching="auto"`` picks on its own timing.

    python benchmarks/anil_features.py [--iterations 4] [--rounds 3] [--steps 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import ANIL
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import Conv4

from maml_step_time import cpu_name

TASKS, WAYS, SHOTS, QUERIES, LR = 16, 5, 1, 15, 0.4


def make_batch(seed: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    return TaskBatch(torch.rand(TASKS, WAYS * SHOTS, 1, 28, 28, generator=g), labels.repeat_interleave(SHOTS).repeat(TASKS, 1),
                     torch.rand(TASKS, WAYS * QUERIES, 1, 28, 28, generator=g),
                     labels.repeat_interleave(QUERIES).repeat(TASKS, 1))


def ours(steps: int, once: bool, batching: str, memory_format: str) -> Callable[[TaskBatch], None]:
    torch.manual_seed(0)
    model = ANIL(Conv4(hidden=64, out_features=WAYS), inner_lr=LR, inner_steps=steps, batching=batching,
                 memory_format=memory_format)
    model.head_features_once = once

    def step(batch: TaskBatch) -> None:
        model.zero_grad(set_to_none=True)
        per_task_loss(model.training_outputs(batch), batch.query_y).mean().backward()

    return step


def learn2learn(steps: int) -> Callable[[TaskBatch], None]:
    import learn2learn as l2l

    torch.manual_seed(0)
    network = Conv4(hidden=64, out_features=WAYS)
    head = l2l.algorithms.MAML(network.head, lr=LR, first_order=False)

    def features(x: torch.Tensor) -> torch.Tensor:
        with network.without_head():  # Conv4 as built, on one task's images, up to its head
            return network(x)

    def step(batch: TaskBatch) -> None:
        network.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(batch.num_tasks):
            learner = head.clone()
            support, query = features(batch.support_x[t]), features(batch.query_x[t])
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(support), batch.support_y[t]))
            total = total + F.cross_entropy(learner(query), batch.query_y[t])
        (total / batch.num_tasks).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4, help="meta-iterations per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="iterations of the first round not timed")
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {cpu_name()}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, 1-min load average {os.getloadavg()[0]:.1f} at start")
    contenders: Dict[str, Callable[[TaskBatch], None]] = {}
    for batching, memory_format in (("vmap", "contiguous"), ("vmap", "channels_last"), ("loop", "channels_last")):
        path = batching + (" channels_last" if memory_format == "channels_last" else "")
        contenders[f"ours, {path}, features once"] = ours(args.steps, True, batching, memory_format)
        contenders[f"ours, {path}, features every step"] = ours(args.steps, False, batching, memory_format)
    try:
        contenders["learn2learn (features once per task)"] = learn2learn(args.steps)
    except ImportError:
        print("learn2learn is not installed: its row is left out.")
    batches = [make_batch(i) for i in range(args.iterations)]
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, step in contenders.items():
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                step(batch)
                if round_ > 0 or i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    reference = statistics.median(times.get("learn2learn (features once per task)", [float("nan")]))
    print(f"\nANIL, Conv4-64, 28x28, {WAYS}-way {SHOTS}-shot {QUERIES}-query, meta-batch {TASKS}, {args.steps} inner steps, "
          f"second order; median of {args.rounds} rounds x {args.iterations} meta-iterations, taking turns.\n")
    print("| contender | ms / meta-iteration | vs learn2learn |")
    print("|---|---:|---:|")
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"| {name} | {ms:.1f} | {reference * 1e3 / ms:.2f}x |")
    # What batching="auto" picks for this model on its own timing of one training step.
    torch.manual_seed(0)
    model = ANIL(Conv4(hidden=64, out_features=WAYS), inner_lr=LR, inner_steps=args.steps)
    model.choose_batching(batches[0])
    timings = ", ".join(f"{path} {ms:.1f} ms" for path, ms in model.batching_timings.items())
    print(f"\nbatching='auto' picks {model.batching}, {model.memory_format} ({timings}).")


if __name__ == "__main__":
    main()
