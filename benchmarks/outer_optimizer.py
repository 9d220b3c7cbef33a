"""The outer optimizer's step, fused (what ``MetaLearner.configure_optimizers`` now builds where
the config leaves the implementation open) against torch's default on the CPU (a Python loop
over the parameter tensors), side by side in one process, taking turns.

Two tables: ``optimizer.step()`` alone on the parameters of the sinusoid MLP (6 tensors) and of
Conv4-64 (18), gradients in place; and a whole sinusoid MAML meta-iteration (MLP 1-40-40-1, 25
tasks, one second-order step on the ``vmap`` path, Adam 1e-3) on pre-built batches, the two
runs on two copies of the same model. Medians of rounds; the ratio is default over fused.

    python benchmarks/outer_optimizer.py [--rounds 9] [--calls 1000]

Run it alone.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import fused_if_unset, skip_failing_nvml_probe
from fewshot_lightning.algorithms.maml import cpu_name
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP, Conv4


def mean_us(function, calls: int) -> float:
    for _ in range(10):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def optimizers(params, name: str):
    cls = getattr(torch.optim, name)
    options = {"momentum": 0.9} if name == "SGD" else {}
    default = cls(params, lr=1e-3, **options)
    fused = fused_if_unset(cls(params, lr=1e-3, **options))
    assert fused.param_groups[0]["fused"] is True and default.param_groups[0]["fused"] is None
    return default, fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=50, help="meta-iterations a round, whole-step table")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    skip_failing_nvml_probe()  # as a CPU training run does: no NVML probe at every step
    torch.manual_seed(0)

    print(f"{cpu_name() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds\n")
    print("| parameters | optimizer | default (us / step) | fused (us / step) | default / fused |")
    print("|---|---|---:|---:|---:|")
    for label, net in (("MLP 1-40-40-1 (6 tensors)", MLP()), ("Conv4-64 (18 tensors)", Conv4(hidden=64))):
        for p in net.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for name in ("Adam", "AdamW", "SGD"):
            default, fused = optimizers(list(net.parameters()), name)
            times = {"default": [], "fused": []}
            for _ in range(args.rounds):
                times["default"].append(mean_us(default.step, args.calls))
                times["fused"].append(mean_us(fused.step, args.calls))
            d, f = statistics.median(times["default"]), statistics.median(times["fused"])
            print(f"| {label} | {name} | {d:.1f} | {f:.1f} | {d / f:.2f}x |")

    models = {key: MAML(MLP(), inner_lr=0.01, batching="vmap") for key in ("default", "fused")}
    models["fused"].load_state_dict(models["default"].state_dict())
    steps = {"default": torch.optim.Adam(models["default"].parameters(), lr=1e-3),
             "fused": fused_if_unset(torch.optim.Adam(models["fused"].parameters(), lr=1e-3))}
    data = SinusoidDataModule(meta_batch_size=25, train_tasks=25 * args.iterations, num_workers=0)
    data.setup("fit")
    batches = list(data.train_dataloader())

    def run(key: str) -> float:
        model, optimizer = models[key], steps[key]
        start = time.perf_counter()
        for index, batch in enumerate(batches):
            loss = model.training_step(batch, index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / len(batches) * 1e3

    times = {"default": [], "fused": []}
    for round_index in range(args.rounds + 1):
        for key in times:
            value = run(key)
            if round_index:  # the first round warms up
                times[key].append(value)
    d, f = statistics.median(times["default"]), statistics.median(times["fused"])
    paired = statistics.median(a / b for a, b in zip(times["default"], times["fused"]))
    print(f"\nSinusoid MAML meta-iteration ({args.iterations} a round): default Adam {d:.3f} ms, "
          f"fused {f:.3f} ms: {d / f:.3f}x by the medians, {paired:.3f}x round by round")


if __name__ == "__main__":
    main()
