"""Episode sampling throughput: our EpisodeDataset against learn2learn's Taskset, same data, same run.

5-way 1-shot 15-query tasks over an in-memory dataset of 1000 classes x 20 uint8 images of
1x28x28 (Omniglot-sized). Timed:

* ``EpisodeDataset[i]`` for consecutive ``i`` (one task at a time);
* the same through a ``DataLoader`` with ``collate_tasks`` (meta-batches of 32,
  ``num_workers=0``), scaled to float in the dataset, and kept ``uint8`` (``scale=False``) as
  the DataModules do (they scale on the device, after the transfer);
* learn2learn's ``Taskset`` with ``FusedNWaysKShots``, ``LoadData``, ``RemapLabels`` and
  ``ConsecutiveLabels`` over an ``l2l.data.MetaDataset`` (``taskset.sample()``), the recipe of
  its examples and benchmarks. It returns the 80 samples unsplit and in uint8, so it does less
  than our sampler, which also splits support/query, shuffles and scales to float;
* for reference, the learn2learn taskset through our adapter (``Learn2LearnTasks``), which
  adds that split.

Each rate is the median of ``--repeats`` timed runs after a warm-up (the samplers take turns),
per wall-clock second and per CPU second. Prints a markdown table with the machine (CPU model, cores, load, library
versions).

    python benchmarks/sampling_throughput.py [--tasks 2000] [--repeats 5] [--compare module:Class]
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fewshot_lightning.data import EpisodeDataset, EpisodeSampler, collate_tasks

from maml_step_time import cpu_name

CLASSES, PER_CLASS, SIDE = 1000, 20, 28
WAYS, SHOTS, QUERIES = 5, 1, 15
META_BATCH = 32


def measure(runs: Dict[str, Callable[[int], None]], tasks: int, repeats: int) -> Dict[str, Tuple[float, float]]:
    """Median tasks per wall-clock second and per CPU second of this process, for each sampler.

    The samplers take turns, one timed run each per round, so a change in the machine's load
    during the benchmark hits them all alike. With one torch thread and no workers sampling is
    single-threaded: on an idle machine both rates agree; on a shared one the CPU-time rate is
    the steadier (time spent waiting for a core is not counted).
    """
    for run in runs.values():
        run(max(1, tasks // 10))  # warm-up
    wall: Dict[str, List[float]] = {name: [] for name in runs}
    cpu: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run(tasks)
            wall[name].append(tasks / (time.perf_counter() - start_wall))
            cpu[name].append(tasks / max(time.process_time() - start_cpu, 1e-9))
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in runs}


def ours_indexing(dataset: EpisodeDataset) -> Callable[[int], None]:
    def run(tasks: int) -> None:
        for i in range(tasks):
            dataset[i]

    return run


def ours_dataloader(dataset: EpisodeDataset) -> Callable[[int], None]:
    loader = DataLoader(
        dataset, batch_size=META_BATCH, sampler=EpisodeSampler(dataset, fixed=True),
        collate_fn=collate_tasks, num_workers=0,
    )

    def run(tasks: int) -> None:
        seen = 0
        while seen < tasks:
            for batch in loader:
                seen += batch.num_tasks
                if seen >= tasks:
                    break

    return run


def learn2learn_taskset(images: torch.Tensor, labels: torch.Tensor):
    import learn2learn as l2l

    # Passing labels_to_indices skips MetaDataset's pass over every sample (setup, not sampling).
    labels_to_indices = {int(c): np.flatnonzero(labels.numpy() == c).tolist() for c in torch.unique(labels)}
    dataset = l2l.data.MetaDataset(TensorDataset(images, labels), labels_to_indices=labels_to_indices)
    transforms = [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=WAYS, k=SHOTS + QUERIES),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
    ]
    return l2l.data.Taskset(dataset, transforms, num_tasks=-1)


def learn2learn_sampling(taskset) -> Callable[[int], None]:
    def run(tasks: int) -> None:
        for _ in range(tasks):
            taskset.sample()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per sampler (the median is shown)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1, as in DataLoader workers: for tensors this small a thread "
        "pool adds only synchronisation, which costs milliseconds per op when the cores are busy)",
    )
    parser.add_argument(
        "--compare", metavar="MODULE:CLASS", action="append", default=[],
        help="also time another EpisodeDataset implementation (same constructor), e.g. a proposed one",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CLASSES * PER_CLASS, 1, SIDE, SIDE), dtype=torch.uint8, generator=generator)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    # num_tasks large enough that no timed run wraps into a second epoch.
    ours = EpisodeDataset(images, labels, WAYS, SHOTS, QUERIES, num_tasks=10 * args.tasks, seed=0)

    # What the DataModules use: uint8 until the device, scaled there (on_after_batch_transfer).
    ours_uint8 = EpisodeDataset(images, labels, WAYS, SHOTS, QUERIES, num_tasks=10 * args.tasks, seed=0, scale=False)
    runs: Dict[str, Callable[[int], None]] = {
        "fewshot-lightning `EpisodeDataset[i]`": ours_indexing(ours),
        f"fewshot-lightning DataLoader (batch {META_BATCH}, `collate_tasks`, 0 workers), float": ours_dataloader(ours),
        f"fewshot-lightning DataLoader (batch {META_BATCH}), uint8 until the device, as the DataModules":
            ours_dataloader(ours_uint8),
    }
    for spec in args.compare:
        module_name, _, class_name = spec.partition(":")
        candidate = getattr(importlib.import_module(module_name), class_name)
        other = candidate(images, labels, WAYS, SHOTS, QUERIES, num_tasks=10 * args.tasks, seed=0)
        runs[f"`{spec}` `[i]`"] = ours_indexing(other)
        runs[f"`{spec}` DataLoader"] = ours_dataloader(other)
    versions = [f"torch {torch.__version__}", f"numpy {np.__version__}", f"Python {platform.python_version()}"]
    reference = None
    try:
        import learn2learn

        from fewshot_lightning.data.learn2learn_tasks import Learn2LearnTasks

        taskset = learn2learn_taskset(images, labels)
        reference = "learn2learn `Taskset.sample()` (FusedNWaysKShots, LoadData, RemapLabels, ConsecutiveLabels)"
        runs[reference] = learn2learn_sampling(taskset)
        adapter = Learn2LearnTasks(taskset, WAYS, SHOTS, QUERIES, num_tasks=10 * args.tasks)
        runs["learn2learn taskset through `Learn2LearnTasks` (adds split, relabel, float)"] = ours_indexing(adapter)
        versions.insert(1, f"learn2learn {learn2learn.__version__}")
    except ImportError:
        versions.insert(1, "learn2learn not installed (no comparison)")
    load_before = os.getloadavg()[0]
    rows = measure(runs, args.tasks, args.repeats)

    print(f"### Episode sampling throughput: {WAYS}-way {SHOTS}-shot {QUERIES}-query, "
          f"{CLASSES} classes x {PER_CLASS} uint8 images of 1x{SIDE}x{SIDE}\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores (1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after), "
          f"torch threads {torch.get_num_threads()}; "
          f"{', '.join(versions)}. Median of {args.repeats} runs of {args.tasks} tasks.\n")
    print("| Sampler | tasks/s (wall) | µs/task (wall) | tasks per CPU-second | vs learn2learn (wall / CPU) |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, cpu) in rows.items():
        ratio = f"{wall / rows[reference][0]:.1f}x / {cpu / rows[reference][1]:.1f}x" if reference else "n/a"
        print(f"| {name} | {wall:,.0f} | {1e6 / wall:,.0f} | {cpu:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
