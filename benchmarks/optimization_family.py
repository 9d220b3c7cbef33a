"""The optimization-based family side by side: MAML (second and first order), Reptile, iMAML,
CAVIA (and MAML++ where it applies), in three parts (``--parts``):

``memory``: peak memory and time of one meta-iteration (every task's inner loop, the outer
loss, its backward pass and the Adam step) on Conv4 5-way 1-shot, 15 queries per class, 28x28
images, for 1, 5 and 10 inner steps, every algorithm on the same tasks in the same process.
Peak memory is the most memory that tensors allocated during the iteration hold at any moment,
net of what existed before it: on the CPU, PyTorch's allocator events recorded by
``torch.profiler`` (``profile_memory=True``), accumulated in time order; on a GPU,
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
allocated before the iteration. Both count exactly the tensor allocations of PyTorch's
allocator (no Python objects, no allocator caching). Time is the median over iterations,
timed without the profiler. Pixels do not change memory or time, so the tasks are random
images with labels. Second-order MAML keeps every inner step's graph; Reptile's and iMAML's
inner loops keep none, so their memory should stay flat in the number of steps.

``sinusoid``: each algorithm (and MAML++) trains ``--sinusoid-steps`` meta-iterations of 25
tasks on 10-shot sinusoids, with its ``configs/<algorithm>_sinusoid.yaml`` model, then is
scored on 600 test tasks: query MSE after 1 and after 10 inner steps, mean and 95% interval.
MAML++ learns its inner rates for its 5 steps; later steps reuse the last rate.

``kanji``: 5-way 1-shot on the offline Kanji benchmark, each algorithm (and MAML++) trained
for the same wall-clock budget (``--minutes``) with its paper's inner settings, then tested on
600 test episodes (15 queries per class); Conv4 with 32 filters as ``benchmarks/kanji.py``.
The test time includes the adaptation curve (query scores after every test step), so Reptile's
50 test steps cost 51 query passes per episode.

    python benchmarks/optimization_family.py [--parts memory sinusoid kanji] [--device cpu]
        [--steps 1 5 10] [--iterations 10] [--sinusoid-steps 20000] [--minutes 5] [--root data]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser

from fewshot_lightning.algorithms import CAVIA, MAML, MAMLPlusPlus, MetaLearner, Reptile, iMAML
from fewshot_lightning.data import SinusoidDataModule, TaskBatch
from fewshot_lightning.metrics import MeanConfidenceInterval
from fewshot_lightning.models import Conv4, FiLMConv4

from maml_step_time import cpu_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALGORITHMS = ["MAML", "FOMAML", "Reptile", "iMAML", "CAVIA"]


# -- part 1: memory and time per meta-iteration --------------------------------------------------
def image_learner(name: str, steps: int, hidden: int, ways: int = 5, image_size: int = 28) -> MAML:
    """The algorithm on a Conv4 with ``steps`` inner steps and its paper's other inner settings
    (the outer optimizer is the caller's)."""
    conv4 = Conv4(hidden=hidden, out_features=ways, image_size=image_size)
    if name in ("MAML", "FOMAML"):
        return MAML(conv4, inner_lr=0.4, inner_steps=steps, first_order=name == "FOMAML", batching="vmap")
    if name == "MAMLPlusPlus":
        return MAMLPlusPlus(conv4, inner_lr=0.1, inner_steps=steps, test_inner_steps=steps, batching="vmap",
                            multi_step_loss_steps=500)
    if name == "Reptile":
        return Reptile(conv4, inner_lr=0.001, inner_steps=steps, inner_batch_size=10, batching="vmap")
    if name == "iMAML":
        return iMAML(conv4, inner_lr=0.1, inner_steps=steps, lam=2.0, cg_steps=5, test_lam=0.0, batching="vmap")
    if name == "CAVIA":
        film = FiLMConv4(hidden=hidden, out_features=ways, image_size=image_size, context_dim=100, film_blocks=(2,))
        return CAVIA(film, inner_lr=1.0, inner_steps=steps, batching="vmap")
    raise ValueError(f"Unknown algorithm {name!r}; choose from {ALGORITHMS + ['MAMLPlusPlus']}.")


def random_episodes(count: int, tasks: int, ways: int, queries: int, device: torch.device) -> List[TaskBatch]:
    g = torch.Generator().manual_seed(0)
    support_y = torch.arange(ways).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    episodes = []
    for _ in range(count):
        support_x = torch.rand(tasks, ways, 1, 28, 28, generator=g)
        query_x = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
        episodes.append(TaskBatch(*(t.to(device) for t in (support_x, support_y, query_x, query_y))))
    return episodes


def meta_iteration(model: MAML, optimizer: torch.optim.Optimizer) -> Callable[[TaskBatch], None]:
    def run(batch: TaskBatch) -> None:
        loss = model.training_losses(batch)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes held by tensors allocated while ``step()`` runs, net of those before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: same-instant events keep their recorded order
    held = itertools.accumulate(e.nbytes() for e in events)
    return max(held, default=0)


def median_seconds(step: Callable[[], None], iterations: int, device: torch.device) -> float:
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_part(args) -> List[Dict]:
    device = torch.device(args.device)
    episodes = random_episodes(args.iterations + 2, args.tasks, 5, 15, device)
    rows = []
    for name in args.algorithms:
        for steps in args.steps:
            torch.manual_seed(0)
            model = image_learner(name, steps, args.hidden).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            iteration = meta_iteration(model, optimizer)
            iteration(episodes[0])  # creates the optimizer state and .grad tensors: not per-iteration costs
            peak = peak_bytes(lambda: iteration(episodes[1]), device)
            batches = iter(episodes[2:])
            seconds = median_seconds(lambda: iteration(next(batches)), args.iterations, device)
            rows.append({"algorithm": name, "steps": steps, "peak_mib": peak / 2**20, "ms": 1000 * seconds})
            print(rows[-1], flush=True)
    return rows


# -- part 2: sinusoid ------------------------------------------------------------------------
SINUSOID_CONFIGS = {"MAML": "maml", "FOMAML": "maml", "Reptile": "reptile", "iMAML": "imaml", "CAVIA": "cavia",
                    "MAMLPlusPlus": "mamlpp"}
CLIPPING = ("gradient_clip_val", "gradient_clip_algorithm")


def sinusoid_config(name: str) -> dict:
    """``configs/<algorithm>_sinusoid.yaml`` (FOMAML: MAML's)."""
    return yaml.safe_load((CONFIGS / f"{SINUSOID_CONFIGS[name]}_sinusoid.yaml").read_text())


def sinusoid_learner(name: str, steps: int) -> MAML:
    """The model section of ``configs/<algorithm>_sinusoid.yaml`` (FOMAML: MAML's, first order)."""
    model = sinusoid_config(name)["model"]
    model["init_args"]["batching"] = "vmap"
    if name == "FOMAML":
        model["init_args"]["first_order"] = True
    scheduler = model["init_args"].get("lr_scheduler")
    if scheduler is not None and "total_iters" in scheduler["init_args"]:
        scheduler["init_args"]["total_iters"] = steps  # Reptile's outer step anneals over the run
    parser = ArgumentParser()
    parser.add_subclass_arguments(MetaLearner, "model")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(parser.parse_object({"model": model})).model


def sinusoid_scores(model: MAML, tasks: int = 600) -> Dict[str, float]:
    """Query MSE after 1 and 10 inner steps on ``tasks`` test tasks, mean and 95% interval."""
    data = SinusoidDataModule(shots=10, queries=10, meta_batch_size=25, test_tasks=tasks)
    data.setup("test")
    model.eval()
    after = {1: MeanConfidenceInterval(), 10: MeanConfidenceInterval()}
    with torch.no_grad():
        for batch in data.test_dataloader():
            curve = model.adaptation_curve(batch, steps=10)
            for step, metric in after.items():
                metric.update((curve[step] - batch.query_y).square().flatten(1).mean(1))
    scores = {}
    for step, metric in after.items():
        mean, ci = metric.compute()
        scores[f"mse{step}"], scores[f"ci{step}"] = float(mean), float(ci)
    return scores


def with_mamlpp(args) -> List[str]:
    """The algorithms asked for, and MAML++ after them when ``--algorithms`` was left at its
    default (a run of chosen algorithms runs just those)."""
    return args.algorithms + ["MAMLPlusPlus"] if args.algorithms == ALGORITHMS else list(args.algorithms)


def sinusoid_part(args) -> List[Dict]:
    rows = []
    for name in with_mamlpp(args):
        L.seed_everything(0)
        model = sinusoid_learner(name, args.sinusoid_steps)
        data = SinusoidDataModule(shots=10, queries=10, meta_batch_size=25, train_tasks=25 * 1000)
        # The config's outer-gradient clipping (MAML++'s), as `fewshot-lightning fit` applies it.
        clipping = {k: v for k, v in sinusoid_config(name)["trainer"].items() if k in CLIPPING}
        trainer = L.Trainer(max_steps=args.sinusoid_steps, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, limit_val_batches=0, enable_progress_bar=False, **clipping)
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        rows.append({"algorithm": name, "train_s": seconds, **sinusoid_scores(model, args.test_tasks)})
        print(rows[-1], flush=True)
    return rows


# -- part 3: Kanji ---------------------------------------------------------------------------
def kanji_run(name: str, args) -> Dict:
    from fewshot_lightning.data.datasets import KanjiDataModule

    L.seed_everything(0)
    shots = 10 if name == "Reptile" else 1  # Reptile trains on its "training shots" (paper: 10)
    conv4 = Conv4(hidden=32)
    vmap = {"batching": "vmap"}  # "auto" would time both paths on the first batch, inside the budget
    if name in ("MAML", "FOMAML"):  # benchmarks/kanji.py's MAML: Finn et al.'s 5-way step of 0.4
        model = MAML(conv4, inner_lr=0.4, inner_steps=1, test_inner_steps=3, first_order=name == "FOMAML", **vmap)
    elif name in ("MAMLPlusPlus", "MAMLPlusPlus-shared-bn"):  # the latter without per-step batch norm
        model = MAMLPlusPlus(conv4, inner_lr=0.1, test_inner_steps=5, multi_step_loss_steps=500,
                             per_step_bn=name == "MAMLPlusPlus", **vmap)
    elif name == "Reptile":
        model = Reptile(conv4, inner_lr=0.001, inner_steps=5, inner_batch_size=10, test_inner_steps=50,
                        test_inner_batch_size=5, optimizer=lambda params: torch.optim.SGD(params, lr=1.0), **vmap)
    elif name == "iMAML":
        model = iMAML(conv4, inner_lr=0.1, inner_steps=16, lam=2.0, cg_steps=5, test_lam=0.0, **vmap)
    elif name == "CAVIA":
        film = FiLMConv4(hidden=32, context_dim=100, film_blocks=(2,))
        model = CAVIA(film, inner_lr=1.0, inner_steps=2, **vmap)
    else:
        raise ValueError(f"Unknown algorithm {name!r}.")
    data = KanjiDataModule(root=args.root, ways=5, shots=shots, queries=5, test_shots=1, test_queries=15,
                           meta_batch_size=4, train_tasks=4 * 100_000, test_tasks=args.test_tasks, num_workers=0)
    trainer = L.Trainer(max_time={"seconds": int(args.minutes * 60)}, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = trainer.test(model, data, verbose=False)[0]
    return {"algorithm": name, "steps": trainer.global_step, "train_s": train_seconds,
            "test_s": time.perf_counter() - start, "acc": 100 * result["test/acc"], "ci": 100 * result["test/acc_ci95"]}


def kanji_part(args) -> List[Dict]:
    rows = []
    for name in with_mamlpp(args):
        rows.append(kanji_run(name, args))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["memory", "sinusoid", "kanji"],
                        choices=["memory", "sinusoid", "kanji"])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS,
                        help="default: all five, and MAML++ in the sinusoid and kanji parts; named ones run alone "
                        "(kanji part: also MAMLPlusPlus-shared-bn, MAML++ without per-step batch norm)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the memory part)")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10], help="inner steps (memory part)")
    parser.add_argument("--iterations", type=int, default=10, help="timed meta-iterations per row (memory part)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-iteration (memory part)")
    parser.add_argument("--hidden", type=int, default=64, help="Conv4 filters (memory part)")
    parser.add_argument("--sinusoid-steps", type=int, default=20_000)
    parser.add_argument("--test-tasks", type=int, default=600, help="sinusoid and Kanji test tasks")
    parser.add_argument("--minutes", type=float, default=5.0, help="Kanji training budget per algorithm")
    parser.add_argument("--root", default="data", help="Kanji data folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {part: globals()[f"{part}_part"](args) for part in args.parts}

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"\nMachine: {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
          f"Lightning {L.__version__}")
    if "memory" in results:
        rows = results["memory"]
        steps = sorted({r["steps"] for r in rows})
        print(f"\nOne meta-iteration on {device}: Conv4-{args.hidden}, 5-way 1-shot, 15 queries per class, "
              f"{args.tasks} tasks; peak MiB held by the iteration's tensors / median ms over {args.iterations}\n")
        print("| algorithm | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for name in dict.fromkeys(r["algorithm"] for r in rows):
            cells = [next(r for r in rows if r["algorithm"] == name and r["steps"] == k) for k in steps]
            print(f"| {name} | " + " | ".join(f"{c['peak_mib']:.1f} MiB / {c['ms']:.0f} ms" for c in cells) + " |")
    if "sinusoid" in results:
        print(f"\nSinusoid 10-shot, {args.sinusoid_steps} meta-iterations of 25 tasks (configs/*_sinusoid.yaml "
              f"models), {args.test_tasks} test tasks, query MSE ± 95% CI\n")
        print("| algorithm | after 1 step | after 10 steps | training time |")
        print("|---|---|---|---|")
        for r in results["sinusoid"]:
            print(f"| {r['algorithm']} | {r['mse1']:.3f} ± {r['ci1']:.3f} | {r['mse10']:.3f} ± {r['ci10']:.3f} | "
                  f"{r['train_s'] / 60:.1f} min |")
    if "kanji" in results:
        print(f"\nKanji 5-way 1-shot, {args.minutes} min of training each, {args.test_tasks} test episodes, "
              "15 queries per class\n")
        print("| algorithm | test accuracy (%) | training steps | test time |")
        print("|---|---|---|---|")
        for r in results["kanji"]:
            print(f"| {r['algorithm']} | {r['acc']:.1f} ± {r['ci']:.1f} | {r['steps']} | {r['test_s']:.0f} s |")


if __name__ == "__main__":
    main()
