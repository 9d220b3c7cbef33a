"""Time one MAML meta-iteration: fewshot-lightning against learn2learn, same model and tasks.

Sinusoid, 10-shot, MLP 1-40-40-1, one inner step of 0.01, meta-batch 25, second order, Adam.
Each contender runs the full meta-iteration: inner adaptation of every task, query loss,
outer backward and optimizer step. learn2learn's is the loop of its README and examples
(`maml.clone()` then `learner.adapt(loss)` per task).

    python benchmarks/maml_step_time.py [--iterations 300] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.algorithms.maml import cpu_name as model_name
from fewshot_lightning.data import SinusoidTasks
from fewshot_lightning.models import MLP


def cpu_name() -> str:
    return model_name() or "unknown CPU"


def time_loop(step, batches, warmup: int = 20) -> float:
    """Median milliseconds per call of ``step(batch)`` after ``warmup`` calls."""
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


def ours(batches, first_order: bool, batching: str) -> float:
    torch.manual_seed(0)
    model = MAML(MLP(), inner_lr=0.01, inner_steps=1, first_order=first_order, batching=batching)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch):
        loss = per_task_loss(model(batch), batch.query_y).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return time_loop(step, batches)


def learn2learn(batches, first_order: bool) -> float:
    import learn2learn as l2l

    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(MLP(), lr=0.01, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step(batch):
        optimizer.zero_grad()
        total = 0.0
        for t in range(batch.num_tasks):
            learner = maml.clone()
            learner.adapt(F.mse_loss(learner(batch.support_x[t]), batch.support_y[t]))
            total = total + F.mse_loss(learner(batch.query_x[t]), batch.query_y[t])
        (total / batch.num_tasks).backward()
        optimizer.step()

    return time_loop(step, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = SinusoidTasks(shots=10, queries=10, num_tasks=25 * args.iterations)
    batches = [tasks.__getitems__(range(i * 25, (i + 1) * 25)) for i in range(args.iterations)]

    rows = []
    for first_order in (False, True):
        name = "FOMAML" if first_order else "MAML"
        reference = learn2learn(batches, first_order)
        vmapped = ours(batches, first_order, "vmap")
        looped = ours(batches, first_order, "loop")
        rows.append((name, reference, vmapped, looped))

    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"Median ms per meta-iteration over {args.iterations - 20} iterations (25 tasks, sinusoid 10-shot, MLP 1-40-40-1)\n")
    print("| algorithm | learn2learn clone/adapt | ours, vmap | ours, loop | speed-up (vmap) |")
    print("|---|---|---|---|---|")
    for name, reference, vmapped, looped in rows:
        print(f"| {name} | {reference:.2f} | {vmapped:.2f} | {looped:.2f} | {reference / vmapped:.1f}x |")


if __name__ == "__main__":
    main()
