"""How many tasks ``Conv4.forward_tasks`` should run at once on the CPU: time and tensor peak
of a second-order MAML meta-iteration on ``batching="vmap"`` for several values of
``Conv4.cpu_chunk_bytes`` (the most bytes a group of tasks' first feature map may hold), with
learn2learn (as ``speed.py`` runs it: on the module, and on a copy that keeps NCHW maps; ratios
against the faster) and our channels-last loop on the same module and batches in the same run.

Cases are ``benchmarks/speed.py``'s (same model, tasks and batches). Contenders take turns
round by round, a warm-up iteration before each contender's timed ones, medians; the tensor
peak is ``speed.py --tensor-memory``'s (the allocator's own events, after a warm-up iteration).

    python benchmarks/conv4_task_chunks.py [--cases kanji-config conv4-64-bn] [--iterations 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402
from optimization_family import peak_bytes  # noqa: E402

from fewshot_lightning.models import Conv4  # noqa: E402

MiB = 2**20
DEFAULT = Conv4.cpu_chunk_bytes
BUDGETS: Dict[str, Optional[int]] = {
    "all tasks at once": None, "32 MiB": 32 * MiB, "16 MiB": 16 * MiB, "8 MiB (default)": 8 * MiB,
    "4 MiB": 4 * MiB, "one task a group": 1,
}


def tasks_per_group(network: Conv4, batch, budget: Optional[int]) -> str:
    saved = Conv4.cpu_chunk_bytes
    Conv4.cpu_chunk_bytes = budget
    try:
        return "/".join(str(min(network._tasks_per_chunk(x), x.shape[0])) for x in (batch.support_x, batch.query_x))
    finally:
        Conv4.cpu_chunk_bytes = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["kanji-config", "conv4-64-bn"],
                        choices=[name for name, case in speed.CASES.items() if "loop channels_last" in case.paths])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {speed.cpu_name()}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, 1-min load average {os.getloadavg()[0]:.1f} at start")
    print(f"Median of {args.rounds} rounds x {args.iterations} meta-iterations, a warm-up iteration before each.\n")
    print("| case | contender | tasks a group (support/query pass) | ms / meta-iteration | vs learn2learn | tensor peak (MiB) | vs learn2learn |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.cases:
        case = speed.CASES[name]
        torch.manual_seed(0)
        network = case.build()
        if not isinstance(network, Conv4):
            raise SystemExit(f"case {name!r} does not use Conv4")
        batches = [case.batch(seed, "cpu") for seed in range(max(2, args.iterations))]
        vmap_step = speed.ours(case, network, "vmap")
        runs: Dict[str, Callable] = {}
        groups: Dict[str, str] = {}

        def with_budget(budget: Optional[int]) -> Callable:
            def step(batch) -> None:
                Conv4.cpu_chunk_bytes = budget  # the class default, which the model's copy reads
                try:
                    vmap_step(batch)
                finally:  # every other contender runs with the package's default
                    Conv4.cpu_chunk_bytes = DEFAULT
            return step

        for label, budget in BUDGETS.items():
            runs[f"ours, vmap, {label}"] = with_budget(budget)
            groups[f"ours, vmap, {label}"] = tasks_per_group(network, batches[0], budget)
        runs["ours, loop channels_last"] = speed.ours(case, network, "loop channels_last")
        runs.update({name: step for name, step in speed.contenders(case, "cpu").items() if name.startswith("learn2learn")})
        peaks = {}
        for label, step in runs.items():
            step(batches[0])
            peaks[label] = peak_bytes(lambda: step(batches[1]), torch.device("cpu")) / MiB
        times: Dict[str, list] = {label: [] for label in runs}
        for _ in range(args.rounds):
            for label, step in runs.items():
                step(batches[0])
                start = time.perf_counter()
                for index in range(args.iterations):
                    step(batches[index % len(batches)])
                times[label].append((time.perf_counter() - start) / args.iterations * 1000)
        reference_ms = speed.reference_of({label: statistics.median(values) for label, values in times.items()})
        reference_peak = speed.reference_of(peaks)
        for label in runs:
            ms = statistics.median(times[label])
            print(f"| {name} | {label} | {groups.get(label, '')} | {ms:.1f} | {reference_ms / ms:.2f}x | "
                  f"{peaks[label]:.1f} | {peaks[label] / reference_peak:.3f}x |", flush=True)
    print(f"\n1-min load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
