"""MAML and ANIL for policies on 2D point navigation, run exactly as their configs say.

Each config is trained through the same LightningCLI parser the ``fewshot-lightning`` command
uses (so the numbers are those of ``fewshot-lightning fit --config ...``), then the checkpoint
with the best validation return after one step is tested on the config's held-out goals:
the mean return (undiscounted sum over the horizon, averaged over 20 trajectories per goal)
after 0, 1, 2 and 3 policy-gradient steps, with 95% confidence intervals over goals. The
untrained policy, adapted the same way, is tested first as a baseline. Load averages are
printed, since the machine may be shared.

    python benchmarks/maml_rl_navigation.py [--configs configs/maml_rl_navigation.yaml configs/anil_rl_navigation.yaml]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from lightning.pytorch.cli import LightningCLI

from fewshot_lightning.algorithms import MetaLearner
from fewshot_lightning.data import TaskDataModule

from maml_step_time import cpu_name


def curve(result: dict, steps: int) -> str:
    return " | ".join(
        f"{result[f'test/return_after_{k}_steps']:.1f} ± {result[f'test/return_after_{k}_steps_ci95']:.1f}"
        for k in range(steps + 1)
    )


def run(config: str, save_dir: str) -> list:
    cli = LightningCLI(
        MetaLearner, TaskDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        auto_configure_optimizers=False,
        args=["--config", config, "--trainer.logger.init_args.save_dir", save_dir],
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    name = os.path.basename(config)
    steps = model.test_inner_steps
    untrained = trainer.test(model, data, verbose=False)[0]
    load_before = os.getloadavg()
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    iterations = trainer.global_step // model.outer_steps  # each meta-iteration makes outer_steps optimizer steps
    trained = trainer.test(model, data, ckpt_path="best", verbose=False)[0]
    best = os.path.basename(trainer.checkpoint_callback.best_model_path)
    return [
        f"| {name}, untrained | — | {curve(untrained, steps)} | — | — |",
        f"| {name}, {best} | {iterations} | {curve(trained, steps)} | {seconds / 60:.1f} min | "
        f"{seconds / iterations:.2f} s (load {load_before[0]:.1f} → {load_after[0]:.1f}) |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/maml_rl_navigation.yaml", "configs/anil_rl_navigation.yaml"])
    parser.add_argument("--save-dir", default="lightning_logs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for config in args.configs for row in run(config, args.save_dir)]
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print("Mean return ± 95% CI over the test goals, after k policy-gradient steps\n")
    print("| config, checkpoint | meta-iterations | k = 0 | k = 1 | k = 2 | k = 3 | training time | per meta-iteration |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
