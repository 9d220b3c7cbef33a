"""Few-shot accuracy on the offline Kanji benchmark: MAML and ProtoNets at 5/20-way, 1/5-shot;
Matching Networks, Relation Networks and the attention (black-box) learner at 5-way 1-shot.

Each (algorithm, setting) trains for a fixed wall-clock budget (``--minutes``) through the
Lightning Trainer, then is tested on 600 fixed test episodes (15 queries per class) of
classes never seen in training: accuracy ± 95% CI, training steps reached, seconds per
1,000 meta-training tasks, wall time.
The CPU budget is small, so the backbone is a Conv4 with 32 filters (MAML's mini-ImageNet
width) rather than Omniglot's 64, and these are short runs, not converged ones.

    python benchmarks/kanji.py [--minutes 2] [--algorithms ProtoNet MAML] [--settings 5x1 20x5] [--root data]
"""
from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from fewshot_lightning.algorithms import MAML, AttentionLearner, MatchingNet, ProtoNet, RelationNet
from fewshot_lightning.data.datasets import KanjiDataModule
from fewshot_lightning.models import Conv4, RelationEmbedding

from maml_step_time import cpu_name

SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]


def build(algorithm: str, ways: int, shots: int, root: str):
    if algorithm == "MAML":
        # Finn et al.'s Omniglot settings: 5-way one step of 0.4; 20-way five steps of 0.1
        # (here 1 step in training to fit the CPU budget; 3 at test).
        inner_lr = 0.4 if ways == 5 else 0.1
        model = MAML(Conv4(hidden=32, out_features=ways), inner_lr=inner_lr, inner_steps=1, test_inner_steps=3,
                     first_order=False)
        data = KanjiDataModule(root=root, ways=ways, shots=shots, queries=5, test_queries=15, meta_batch_size=4,
                               train_tasks=4 * 100_000, test_tasks=600, num_workers=0)
    elif algorithm == "ProtoNet":
        # Snell et al. train with more ways than they test (60-way for Omniglot); 2x the test ways here.
        model = ProtoNet(Conv4(hidden=32, out_features=None, track_running_stats=True))
        data = KanjiDataModule(root=root, ways=2 * ways, shots=shots, queries=5, test_ways=ways, test_queries=15,
                               meta_batch_size=1, train_tasks=100_000, test_tasks=600, num_workers=0)
    else:
        embedding = Conv4(hidden=32, out_features=None, track_running_stats=True)  # 32 features at 28x28
        if algorithm == "MatchingNet":
            model = MatchingNet(embedding)
        elif algorithm == "MatchingNet-scaled":  # the cosines scaled by a learned factor starting at 10
            model = MatchingNet(embedding, scale=10.0, learn_scale=True)
        elif algorithm == "RelationNet":
            model = RelationNet(RelationEmbedding(hidden=32), relation_channels=32)
        elif algorithm == "AttentionLearner":
            model = AttentionLearner(embedding, ways=ways, optimizer=lambda p: torch.optim.Adam(p, 1e-3))  # as its config
        else:
            raise ValueError(f"Unknown algorithm {algorithm!r}.")
        data = KanjiDataModule(root=root, ways=ways, shots=shots, queries=5, test_queries=15, meta_batch_size=4,
                               train_tasks=4 * 100_000, test_tasks=600, num_workers=0)
    return model, data


def run(algorithm: str, ways: int, shots: int, minutes: float, root: str) -> dict:
    L.seed_everything(0)
    model, data = build(algorithm, ways, shots, root)
    trainer = L.Trainer(
        max_time={"seconds": int(minutes * 60)}, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0, enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = trainer.test(model, data, verbose=False)[0]
    return {
        "algorithm": algorithm, "setting": f"{ways}-way {shots}-shot", "steps": trainer.global_step,
        "train_s": train_seconds, "test_s": time.perf_counter() - start,
        "s_per_1000": 1000 * train_seconds / max(1, trainer.global_step * data.meta_batch_size),
        "acc": 100 * result["test/acc"], "ci": 100 * result["test/acc_ci95"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per run")
    parser.add_argument("--algorithms", nargs="+", default=["ProtoNet", "MAML"])
    parser.add_argument("--settings", nargs="+", default=[f"{w}x{k}" for w, k in SETTINGS], help="WAYSxSHOTS")
    parser.add_argument("--root", default="data")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for algorithm in args.algorithms:
        for ways, shots in (map(int, setting.split("x")) for setting in args.settings):
            rows.append(run(algorithm, ways, shots, args.minutes, args.root))
            print(rows[-1], flush=True)
    print(f"\nMachine: {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"Training budget {args.minutes} min per run; 600 test episodes, 15 queries per class\n")
    print("| algorithm | setting | test accuracy (%) | training steps | s / 1,000 training tasks | training time | test time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['setting']} | {r['acc']:.1f} ± {r['ci']:.1f} | {r['steps']} | {r['s_per_1000']:.0f} | "
              f"{r['train_s'] / 60:.1f} min | {r['test_s']:.0f} s |")


if __name__ == "__main__":
    main()
