"""ANIL on Conv4 (or the sinusoid MLP): the support set through the features once per adaptation,
against once per inner step, and against learn2learn's ANIL, same model and tasks.

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

``--model mlp``: the sinusoid regressor instead (MLP 1-40-40-1, 10 shots and 10 queries a task,
meta-batch 25, inner steps of 0.01, mean squared error), on the vmap and loop paths.

    python benchmarks/anil_features.py [--model conv4|mlp] [--iterations 4] [--rounds 3] [--steps 5] [--threads 2]
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
from fewshot_lightning.models import MLP, Conv4

from maml_step_time import cpu_name

TASKS, WAYS, SHOTS, QUERIES, LR = 16, 5, 1, 15, 0.4
#: --model mlp: tasks, shots, queries and inner learning rate of MAML's sinusoid experiments.
MLP_TASKS, MLP_SHOTS, MLP_QUERIES, MLP_LR = 25, 10, 10, 0.01


def make_batch(seed: int, model: str = "conv4") -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    if model == "mlp":
        x = torch.rand(MLP_TASKS, MLP_SHOTS + MLP_QUERIES, 1, generator=g) * 10 - 5
        y = torch.sin(x + torch.rand(MLP_TASKS, 1, 1, generator=g) * 3.14) * (torch.rand(MLP_TASKS, 1, 1, generator=g) * 4.9 + 0.1)
        return TaskBatch(x[:, :MLP_SHOTS], y[:, :MLP_SHOTS], x[:, MLP_SHOTS:], y[:, MLP_SHOTS:])
    labels = torch.arange(WAYS)
    return TaskBatch(torch.rand(TASKS, WAYS * SHOTS, 1, 28, 28, generator=g), labels.repeat_interleave(SHOTS).repeat(TASKS, 1),
                     torch.rand(TASKS, WAYS * QUERIES, 1, 28, 28, generator=g),
                     labels.repeat_interleave(QUERIES).repeat(TASKS, 1))


def network(model: str) -> torch.nn.Module:
    return MLP(1, (40, 40), 1) if model == "mlp" else Conv4(hidden=64, out_features=WAYS)


def inner_lr(model: str) -> float:
    return MLP_LR if model == "mlp" else LR


def ours(steps: int, once: bool, batching: str, memory_format: str, model_name: str = "conv4") -> Callable[[TaskBatch], None]:
    torch.manual_seed(0)
    model = ANIL(network(model_name), inner_lr=inner_lr(model_name), inner_steps=steps,
                 batching=batching, memory_format=memory_format)
    model.head_features_once = once

    def step(batch: TaskBatch) -> None:
        model.zero_grad(set_to_none=True)
        per_task_loss(model.training_outputs(batch), batch.query_y).mean().backward()

    return step


def learn2learn(steps: int, model_name: str = "conv4") -> Callable[[TaskBatch], None]:
    import learn2learn as l2l

    torch.manual_seed(0)
    net = network(model_name)
    head = l2l.algorithms.MAML(net.head, lr=inner_lr(model_name), first_order=False)
    loss = F.mse_loss if model_name == "mlp" else F.cross_entropy

    def features(x: torch.Tensor) -> torch.Tensor:
        with net.without_head():  # the network as built, on one task's inputs, up to its head
            return net(x)

    def step(batch: TaskBatch) -> None:
        net.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(batch.num_tasks):
            learner = head.clone()
            support, query = features(batch.support_x[t]), features(batch.query_x[t])
            for _ in range(steps):
                learner.adapt(loss(learner(support), batch.support_y[t]))
            total = total + loss(learner(query), batch.query_y[t])
        (total / batch.num_tasks).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["conv4", "mlp"], default="conv4")
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
    paths = ((("vmap", "contiguous"), ("loop", "contiguous")) if args.model == "mlp" else
             (("vmap", "contiguous"), ("vmap", "channels_last"), ("loop", "channels_last")))
    for batching, memory_format in paths:
        path = batching + (" channels_last" if memory_format == "channels_last" else "")
        contenders[f"ours, {path}, features once"] = ours(args.steps, True, batching, memory_format, args.model)
        contenders[f"ours, {path}, features every step"] = ours(args.steps, False, batching, memory_format, args.model)
    try:
        contenders["learn2learn (features once per task)"] = learn2learn(args.steps, args.model)
    except ImportError:
        print("learn2learn is not installed: its row is left out.")
    batches = [make_batch(i, args.model) for i in range(args.iterations)]
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, step in contenders.items():
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                step(batch)
                if round_ > 0 or i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    reference = statistics.median(times.get("learn2learn (features once per task)", [float("nan")]))
    case = (f"MLP 1-40-40-1, sinusoid, {MLP_SHOTS} shots {MLP_QUERIES} queries, meta-batch {MLP_TASKS}" if args.model == "mlp"
            else f"Conv4-64, 28x28, {WAYS}-way {SHOTS}-shot {QUERIES}-query, meta-batch {TASKS}")
    print(f"\nANIL, {case}, {args.steps} inner steps, "
          f"second order; median of {args.rounds} rounds x {args.iterations} meta-iterations, taking turns.\n")
    print("| contender | ms / meta-iteration | vs learn2learn |")
    print("|---|---:|---:|")
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"| {name} | {ms:.1f} | {reference * 1e3 / ms:.2f}x |")
    # What batching="auto" picks for this model on its own timing of one training step.
    torch.manual_seed(0)
    model = ANIL(network(args.model), inner_lr=inner_lr(args.model), inner_steps=args.steps)
    model.choose_batching(batches[0])
    timings = ", ".join(f"{path} {ms:.1f} ms" for path, ms in model.batching_timings.items())
    print(f"\nbatching='auto' picks {model.batching}, {model.memory_format} ({timings}).")


if __name__ == "__main__":
    main()
