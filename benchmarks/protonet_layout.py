"""Does a lone task's channels-last layout pay for ProtoNet on the Kanji config? (issue 12)

``ConvBlock.one_task_channels_last`` runs a single task's maps channels-last on the CPU; ProtoNet's
configs train one episode a step (``meta_batch_size: 1``), so every one of its steps takes it. This
times, on the shapes of ``configs/protonet_kanji.yaml`` (Conv4-64 with running batch-norm
statistics, 28x28 grey images), a training step (60-way 1-shot 5-query: embedding, prototypes,
loss, backward, Adam) and an evaluation episode (5-way 1-shot 15-query, eval mode, no gradient),
with the attribute on and off, the two taking turns round by round on the same episodes; medians
(ms) of the rounds' medians, and each round's ratio.

    python benchmarks/protonet_layout.py [--rounds 5] [--steps 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fewshot_lightning.algorithms import ProtoNet
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import Conv4
from fewshot_lightning.models.blocks import ConvBlock
from maml_step_time import cpu_name


def episode(ways: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
    def part(per_class):
        labels = torch.arange(ways).repeat_interleave(per_class)[None]
        return torch.rand(1, ways * per_class, 1, 28, 28, generator=generator), labels

    return TaskBatch(*part(shots), *part(queries))


def timed(function, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ProtoNet(Conv4(in_channels=1, hidden=64, out_features=None, image_size=28, track_running_stats=True),
                     batch_norm_stats="running")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    train, evaluation = episode(60, 1, 5, generator), episode(5, 1, 15, generator)

    def training_step():
        model.train()
        loss = model.training_losses(train)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def evaluation_episode():
        model.eval()
        with torch.no_grad():
            model(evaluation)

    results = {(work, layout): [] for work in ("training step", "evaluation episode") for layout in (True, False)}
    for round_ in range(args.rounds + 1):  # the first round warms up, not counted
        for layout in (True, False) if round_ % 2 == 0 else (False, True):
            ConvBlock.one_task_channels_last = layout
            for work, function in (("training step", training_step), ("evaluation episode", evaluation_episode)):
                ms = timed(function, args.steps)
                if round_:
                    results[(work, layout)].append(ms)
    ConvBlock.one_task_channels_last = True
    print(f"Machine: {cpu_name()}; {os.cpu_count()} cores, {args.threads} torch threads, "
          f"torch {torch.__version__}, 1-min load average {os.getloadavg()[0]:.1f} at end; "
          f"{args.rounds} rounds x {args.steps} steps each\n")
    print("| work | channels-last (ms) | NCHW (ms) | NCHW / channels-last, median of rounds (min-max) |")
    print("|---|---:|---:|---:|")
    for work in ("training step", "evaluation episode"):
        last, first = results[(work, True)], results[(work, False)]
        ratios = [b / a for a, b in zip(last, first)]
        print(f"| {work} | {statistics.median(last):.1f} | {statistics.median(first):.1f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
