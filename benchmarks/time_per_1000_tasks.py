"""Seconds of meta-training per 1,000 tasks for the metric- and model-based learners.

A plain loop (forward, backward, optimizer step) on random data, so the number is the model's
cost alone: no DataLoader, no Lightning. Classification: Conv4 (hidden 64) embeddings of 28x28
images, 5-way 1-shot 15-query (RelationNet: its own embedding, which keeps a 7x7 map). CNP:
sinusoid tasks, 10 context and 10 target points, the paper-sized encoder and decoder.

    python -m benchmarks.time_per_1000_tasks --meta-batch-size 8 --steps 3   # from the repository root
"""
from __future__ import annotations

import argparse
import time
import statistics
from typing import Callable, Dict, List

import torch

from fewshot_lightning.algorithms import CNP, AttentionLearner, MatchingNet, MetaLearner, ProtoNet, RelationNet
from fewshot_lightning.data import SinusoidTasks, TaskBatch, collate_tasks
from fewshot_lightning.models import MLP, Conv4, RelationEmbedding


def image_tasks(tasks: int, ways: int = 5, shots: int = 1, queries: int = 15, side: int = 28) -> TaskBatch:
    generator = torch.Generator().manual_seed(0)

    def shuffled_labels(per_class: int) -> torch.Tensor:
        labels = torch.arange(ways).repeat_interleave(per_class)
        return torch.stack([labels[torch.randperm(len(labels), generator=generator)] for _ in range(tasks)])

    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, side, side, generator=generator),
        shuffled_labels(shots),
        torch.rand(tasks, ways * queries, 1, side, side, generator=generator),
        shuffled_labels(queries),
    )


def sinusoid_tasks(tasks: int) -> TaskBatch:
    dataset = SinusoidTasks(shots=10, queries=10, num_tasks=tasks)
    return collate_tasks([dataset[i] for i in range(tasks)])


MODELS: Dict[str, Callable[[], MetaLearner]] = {
    "ProtoNet": lambda: ProtoNet(Conv4(hidden=64, out_features=None)),
    "MatchingNet": lambda: MatchingNet(Conv4(hidden=64, out_features=None)),
    "MatchingNet (FCE)": lambda: MatchingNet(Conv4(hidden=64, out_features=None), fce=True, embedding_dim=64),
    "RelationNet": lambda: RelationNet(RelationEmbedding(hidden=64), feature_channels=64, feature_size=7),
    "AttentionLearner": lambda: AttentionLearner(Conv4(hidden=64, out_features=None), ways=5, embedding_dim=64),
    "CNP (sinusoid)": lambda: CNP(MLP(2, (128, 128), 128)),
}


def step_seconds(model: MetaLearner, batch: TaskBatch, steps: int, warmup: int) -> List[float]:
    """Wall time of each of ``steps`` training steps, after ``warmup`` untimed ones."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.query_losses(model(batch), batch).mean().backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, sinusoids = image_tasks(args.meta_batch_size), sinusoid_tasks(args.meta_batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, meta-batch {args.meta_batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    # The minimum is the least disturbed by other work on a shared machine; the median shows the spread.
    print("| algorithm | s / step (median) | s / 1,000 tasks (min) | s / 1,000 tasks (median) |")
    print("|---|---:|---:|---:|")
    per_thousand = 1000 / args.meta_batch_size
    for name, build in MODELS.items():
        batch = sinusoids if name.startswith("CNP") else images
        times = step_seconds(build(), batch, args.steps, args.warmup)
        median = statistics.median(times)
        print(f"| {name} | {median:.3f} | {min(times) * per_thousand:.1f} | {median * per_thousand:.1f} |", flush=True)


if __name__ == "__main__":
    main()
