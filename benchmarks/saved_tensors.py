"""What the autograd graph of one MAML training step holds for the outer backward: the tensors
saved by its nodes (each storage counted once), in total and by node and attribute, for one of
``benchmarks/speed.py``'s cases on one path. This is the memory that stays alive from the end of
the forward to the outer backward; the backward's own temporaries come on top (``speed.py
--tensor-memory`` measures the whole peak).

Paths: ``vmap`` (the model's own ``forward_tasks`` where it has one, as ``batching="vmap"``
runs it), ``torch.func.vmap`` (the same model forced through ``torch.func.vmap``: a subclass
with a ``forward`` of its own, which ``inner.functional`` does not hand to the parent's
``forward_tasks``), ``loop``, ``loop channels_last``.

    python benchmarks/saved_tensors.py [--case kanji-config] [--paths vmap torch.func.vmap loop]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Dict, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402

from fewshot_lightning.algorithms import MAML  # noqa: E402


def saved_tensors(loss: torch.Tensor) -> Tuple[int, Dict[str, Tuple[int, int]]]:
    """(total bytes, {node.attribute: (bytes, tensors)}) over the graph behind ``loss``."""
    seen = set()
    totals: Dict[str, list] = collections.defaultdict(lambda: [0, 0])
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attribute in dir(node):
            if not attribute.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attribute)
            except RuntimeError:  # freed, or not a tensor on this node
                continue
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() in seen:
                        continue
                    seen.add(storage.data_ptr())
                    entry = totals[f"{node.name()}.{attribute}"]
                    entry[0] += storage.nbytes()
                    entry[1] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(entry[0] for entry in totals.values()), {key: tuple(value) for key, value in totals.items()}


def model_for(case: speed.Case, path: str) -> MAML:
    torch.manual_seed(0)
    network = case.build()
    batching, _, memory_format = ("vmap" if path == "torch.func.vmap" else path).partition(" ")
    if path == "torch.func.vmap":
        class PlainForward(type(network)):  # a forward of its own: run under torch.func.vmap
            def forward(self, x):
                return super().forward(x)

        network.__class__ = PlainForward
    return MAML(network, inner_lr=case.inner_lr, inner_steps=case.steps, first_order=case.first_order,
                batching=batching, memory_format=memory_format or "contiguous")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="kanji-config", choices=list(speed.CASES))
    parser.add_argument("--paths", nargs="+", default=["vmap", "torch.func.vmap", "loop"],
                        choices=["vmap", "torch.func.vmap", "loop", "loop channels_last", "vmap channels_last"])
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    case = speed.CASES[args.case]
    batch = case.batch(0, "cpu")
    for path in args.paths:
        model = model_for(case, path)
        total, parts = saved_tensors(speed.per_task_loss(model(batch), batch.query_y).mean())
        print(f"\n{args.case}, {path}: {total / 2**20:.1f} MiB saved for the outer backward")
        print("| node.attribute | MiB | tensors |\n|---|---:|---:|")
        for key, (size, count) in sorted(parts.items(), key=lambda item: -item[1][0])[: args.top]:
            print(f"| `{key}` | {size / 2**20:.1f} | {count} |")


if __name__ == "__main__":
    main()
