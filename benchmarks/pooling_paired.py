"""Our blocks' pooling against PyTorch's, paired iteration by iteration (issue 12).

``speed.py`` runs each contender for a block of iterations before the next takes its turn, so a
drift in the machine's speed between blocks (this 2-core VM's is several percent over minutes)
lands on one contender. Here the two take turns every iteration, on the same batches: ours as
the package builds it (max-pooling that keeps the indices; batch norm and pooling in one node
for passes differentiated twice, ``fewshot_lightning.models.blocks.differentiated_twice``), and
the same model with ``ConvBlock.lean_max_pool = False`` (``nn.MaxPool2d``, batch norm apart: the
layers before these changes). Reported: the median time of each and the median, first and third
quartile of the per-pair ratio (ours over PyTorch's pooling; under 1 is faster).

    python benchmarks/pooling_paired.py [--cases kanji-config mini] [--paths vmap "loop channels_last"] [--pairs 24]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fewshot_lightning.models.blocks import ConvBlock
from maml_step_time import cpu_name
from speed import CASES, ours, torch_layers


def paired(case_name: str, path: str, pairs: int, warmup: int) -> dict:
    case = CASES[case_name]
    torch.manual_seed(0)
    network = case.build()
    runs = {"ours": ours(case, network, path),
            "PyTorch's pooling": ours(case, torch_layers(network, batch_norm=False), path)}
    batches = [case.batch(seed, "cpu") for seed in range(4)]
    times = {name: [] for name in runs}
    for index in range(pairs + warmup):
        for name, step in runs.items():
            start = time.perf_counter()
            step(batches[index % len(batches)])
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["ours"], times["PyTorch's pooling"])]
    low, middle, high = statistics.quantiles(ratios, n=4)
    return {"ours": statistics.median(times["ours"]), "pytorch": statistics.median(times["PyTorch's pooling"]),
            "ratio": statistics.median(ratios), "q1": low, "q3": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["conv4-64-bn", "kanji-config", "mini", "mini-fo"],
                        choices=[name for name, case in CASES.items() if "vmap channels_last" in case.paths])
    parser.add_argument("--paths", nargs="+", default=["vmap", "loop channels_last"],
                        choices=["vmap", "vmap channels_last", "loop", "loop channels_last"])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert ConvBlock.lean_max_pool, "run with the package's defaults"
    print(f"Machine: {cpu_name()}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, 1-min load average {os.getloadavg()[0]:.1f} at start; {args.pairs} pairs after "
          f"{args.warmup} warm-up, whole batch\n")
    print("| case | path | ours (ms) | PyTorch's pooling (ms) | ours / PyTorch's, median of pairs (quartiles) |")
    print("|---|---|---:|---:|---|")
    for name in args.cases:
        for path in args.paths:
            r = paired(name, path, args.pairs if not name.startswith("mini") else max(4, args.pairs // 4), args.warmup)
            print(f"| {name} | {path} | {1000 * r['ours']:.1f} | {1000 * r['pytorch']:.1f} | {r['ratio']:.3f} "
                  f"({r['q1']:.3f} to {r['q3']:.3f}) |", flush=True)
    print(f"\n1-min load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
