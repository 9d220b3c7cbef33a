"""What the C allocator costs a MAML step on the CPU: ``benchmarks/speed.py``'s cases, each
contender alone in a fresh process, with glibc's default allocator (``system``) and with
``fewshot_lightning.allocator.keep_freed_memory`` (``keep``: freed memory kept in the heap for
reuse, blocks up to 32 MiB from it, what ``fewshot-lightning`` does on the CPU by default;
``keep_all``: every block from the heap, ``--cpu_allocator keep_all``). Processes take turns:
every (contender, allocator) pair once per round.

Reported per pair: median ms per meta-iteration (a warm-up iteration excluded), page faults and
system (kernel) CPU seconds per iteration, and the peak RSS the iterations add (the kernel's
peak mark reset just before the warm-up, as ``speed.py`` measures it). The same-process table of
``speed.py`` gives both libraries the same allocator; this one also shows what each gets out of
the box: learn2learn in a script of its own runs on glibc's defaults unless its user changes
them, which they can (``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647``, and
``MALLOC_MMAP_MAX_=0`` for ``keep_all``).

``--allocators`` also takes two kinds of setting that are no remedy but show why (the heap holes
of docs/benchmarks.md): ``threshold_N`` serves blocks above N MiB with a fresh ``mmap`` (glibc's
threshold fixed there, freed heap memory kept as with ``keep``), and ``keep_trim`` is ``keep``
with ``malloc_trim(0)`` after every iteration (free heap pages given back to the kernel between
steps). And another allocator: ``tbbmalloc``, oneTBB's scalable allocator put in glibc's place
with ``LD_PRELOAD`` (its ``libtbbmalloc_proxy``, from the ``tbb`` package on PyPI: ``pip install
tbb``; not a dependency of fewshot-lightning).

    python benchmarks/cpu_allocator.py [--cases mini mini-fo kanji-config conv4-64-bn] [--rounds 2]
        [--allocators system keep keep_all threshold_4 keep_trim tbbmalloc]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ALLOCATORS = ("system", "keep", "keep_all")
#: Ours on the path ``auto`` took for the case in docs/benchmarks.md's table, and learn2learn on
#: the module it was faster on there (on Kanji on both: the two were within noise).
CONTENDERS = {
    "mini": ["ours, vmap", "learn2learn, NCHW module"],
    "mini-fo": ["ours, loop channels_last", "learn2learn"],
    "kanji-config": ["ours, vmap", "learn2learn", "learn2learn, NCHW module"],
    "conv4-64-bn": ["ours, vmap channels_last", "learn2learn"],
    "conv4-32": ["ours, vmap channels_last", "learn2learn"],
    "sinusoid": ["ours, vmap", "learn2learn"],
}
#: Timed iterations per process, by case (about 20 s of work each).
ITERATIONS = {"mini": 3, "mini-fo": 8, "kanji-config": 16, "conv4-64-bn": 24, "conv4-32": 30, "sinusoid": 400}


#: The proxy library that replaces malloc and free with oneTBB's (``LD_PRELOAD``), and the
#: allocator library it loads.
TBB_PROXY, TBB_MALLOC = "libtbbmalloc_proxy.so.2", "libtbbmalloc.so.2"


def tbbmalloc_preload() -> str:
    """``LD_PRELOAD`` for oneTBB's malloc from the installed ``tbb`` package (both libraries by
    path: the package's folder is not on the loader's path), else an error that says how to get it."""
    from importlib import metadata

    try:
        files = {file.name: file for file in metadata.distribution("tbb").files or []}
    except metadata.PackageNotFoundError:
        files = {}
    if TBB_PROXY not in files or TBB_MALLOC not in files:
        raise RuntimeError(f"tbbmalloc: {TBB_PROXY} not found; it comes with oneTBB's package: pip install tbb")
    return ":".join(str(files[name].locate()) for name in (TBB_MALLOC, TBB_PROXY))


def allocator_setting(name: str) -> str:
    """``name`` if it names a setting (for argparse), else an error."""
    if name in ALLOCATORS or name in ("keep_trim", "tbbmalloc"):
        return name
    if name.startswith("threshold_"):
        try:
            if float(name[len("threshold_"):]) > 0:
                return name
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{name!r}: expected one of {ALLOCATORS}, keep_trim, tbbmalloc or threshold_<MiB>")


def child(case_name: str, contender: str, allocator: str, iterations: int) -> Dict[str, object]:
    from fewshot_lightning import allocator as allocators

    after_step = None
    if allocator.startswith("threshold_"):
        libc = allocators.glibc()
        assert libc is not None, "glibc only"
        threshold = int(float(allocator[len("threshold_"):]) * 2**20)
        assert libc.mallopt(allocators.M_MMAP_THRESHOLD, threshold) == 1
        assert libc.mallopt(allocators.M_TRIM_THRESHOLD, allocators.TRIM_THRESHOLD) == 1
    elif allocator == "tbbmalloc":  # put in place by the parent; make sure it is
        with open("/proc/self/maps") as maps:
            assert TBB_PROXY in maps.read(), f"{TBB_PROXY} is not loaded (LD_PRELOAD)"
    elif allocator != "system":
        assert allocators.keep_freed_memory(all_blocks=allocator == "keep_all"), "glibc only"
        if allocator == "keep_trim":
            after_step = allocators.glibc().malloc_trim
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import speed

    torch.set_num_threads(2)
    case = speed.CASES[case_name]
    step = speed.contenders(case, "cpu", learn2learn_channels_last=True)[contender]
    batches = [case.batch(i, "cpu") for i in range(iterations + 1)]
    before = speed.rss_bytes()
    speed.reset_peak_rss()
    step(batches[0])  # warm-up (oneDNN's kernels, the allocator's first blocks): not timed
    if after_step is not None:
        after_step(0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times: List[float] = []
    for batch in batches[1:]:
        start = time.perf_counter()
        step(batch)
        if after_step is not None:
            after_step(0)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "ms": 1000 * statistics.median(times),
        "faults": (after.ru_minflt - usage.ru_minflt) / iterations,
        "system_s": (after.ru_stime - usage.ru_stime) / iterations,
        "peak_rss_mib": (speed.peak_rss_bytes() - before) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["mini", "mini-fo", "kanji-config", "conv4-64-bn"],
                        choices=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--allocators", nargs="+", type=allocator_setting, default=list(ALLOCATORS),
                        help="settings: system, keep, keep_all, keep_trim, threshold_<MiB>")
    parser.add_argument("--child", nargs=4, metavar=("CASE", "CONTENDER", "ALLOCATOR", "ITERATIONS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, contender, allocator, iterations = args.child
        print(json.dumps(child(case, contender, allocator, int(iterations))))
        return
    environments = {allocator: dict(os.environ) for allocator in args.allocators}  # the children's
    if "tbbmalloc" in args.allocators:
        try:
            environments["tbbmalloc"]["LD_PRELOAD"] = tbbmalloc_preload()
        except RuntimeError as error:
            parser.error(str(error))

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import speed

    print(f"Machine: {speed.cpu_name()}; {os.cpu_count()} cores, 2 torch threads; 1-min load average "
          f"{os.getloadavg()[0]:.1f} at start; {args.rounds} rounds, each pair in a fresh process per round")
    print("| case | contender | allocator | ms / meta-iteration | page faults / iteration | system s / iteration "
          "| peak RSS (MiB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for case in args.cases:
        pairs = [(contender, allocator) for contender in CONTENDERS[case] for allocator in args.allocators]
        results: Dict[tuple, List[Dict[str, float]]] = {pair: [] for pair in pairs}
        for _ in range(args.rounds):
            for contender, allocator in pairs:
                command = [sys.executable, os.path.abspath(__file__), "--child", case, contender, allocator,
                           str(ITERATIONS[case])]
                done = subprocess.run(command, capture_output=True, text=True, env=environments[allocator])
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-2000:])
                results[(contender, allocator)].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for contender, allocator in pairs:
            runs = results[(contender, allocator)]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            spread = "/".join(f"{run['ms']:.0f}" for run in runs)
            print(f"| {case} | {contender} | {allocator} | {median['ms']:.1f} ({spread}) | {median['faults']:.0f} "
                  f"| {median['system_s']:.2f} | {median['peak_rss_mib']:.0f} |", flush=True)
    print(f"\n1-min load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
