"""Sinusoid regression at the paper's budget: MAML and Meta-SGD (and CNP), 10-shot, 70,000 meta-iterations.

Setting of Finn et al. (2017) and Li et al. (2017): MLP 1-40-40-1, one inner step (lr 0.01,
Meta-SGD: learned per-parameter rates initialised at 0.01), Adam 1e-3, 25 tasks per step.
Training runs through the real Lightning Trainer; evaluation is 600 test tasks, query MSE
after 1 and after 10 inner steps, with 95% confidence intervals.

    python benchmarks/sinusoid.py [--steps 70000] [--algorithms MAML MetaSGD CNP]
"""
from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from fewshot_lightning.algorithms import CNP, MAML, MetaSGD
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP

from maml_step_time import cpu_name


def build(name: str):
    if name == "CNP":  # Garnelo et al.'s sizes: 128-wide encoder and decoder
        return CNP(MLP(2, (128, 128), 128), x_dim=1, y_dim=1, decoder_hidden=(128, 128))
    algorithm = {"MAML": MAML, "MetaSGD": MetaSGD}[name]
    return algorithm(MLP(), inner_lr=0.01, inner_steps=1, test_inner_steps=10)


def run(name: str, steps: int) -> dict:
    L.seed_everything(0)
    model = build(name)
    data = SinusoidDataModule(shots=10, queries=10, meta_batch_size=25, train_tasks=25 * 1000, test_tasks=600)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - start
    # Meta-SGD learns its rates for exactly one step (repeating that step diverges), so, as in
    # its paper, it is scored after one step only.
    # CNP takes no gradient steps: its one figure goes in the first column.
    result = trainer.test(model, data, verbose=False)[0] if name == "MAML" else {}
    model.test_inner_steps = 1
    after_one = trainer.test(model, data, verbose=False)[0]
    return {
        "name": name,
        "seconds": train_seconds,
        "ms_per_step": 1000 * train_seconds / steps,
        "mse1": after_one["test/mse"],
        "ci1": after_one["test/mse_ci95"],
        "mse10": result.get("test/mse"),
        "ci10": result.get("test/mse_ci95"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=70_000)
    parser.add_argument("--algorithms", nargs="+", default=["MAML", "MetaSGD"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(name, args.steps) for name in args.algorithms]
    print(f"\nMachine: {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"{args.steps} meta-iterations of 25 tasks; 600 test tasks; query MSE ± 95% CI\n")
    print("| algorithm | MSE after 1 step | MSE after 10 steps | training time | ms / iteration |")
    print("|---|---|---|---|---|")
    for r in rows:
        ten = "—" if r["mse10"] is None else f"{r['mse10']:.3f} ± {r['ci10']:.3f}"
        print(
            f"| {r['name']} | {r['mse1']:.3f} ± {r['ci1']:.3f} | {ten} | "
            f"{r['seconds'] / 60:.1f} min | {r['ms_per_step']:.1f} |"
        )


if __name__ == "__main__":
    main()
