"""GPU check: MAML and ProtoNet trained through the Lightning Trainer in fp32, bf16-mixed and
16-mixed, and one MAML meta-iteration against learn2learn's, on the same synthetic tasks.

Tasks are Omniglot-sized and synthetic (no download): 1,623 classes of 20 28x28 1-channel
images, each class a random blob pattern and its images that pattern plus noise. 5-way 1-shot,
15 queries per class, 32 tasks per step; Conv4 with 64 filters (Finn et al. 2017, Snell et al.
2017). MAML: one second-order inner step of 0.4, Adam 1e-3. ProtoNet: squared Euclidean
distance, Adam 1e-3. Each (algorithm, precision) trains ``--steps`` steps with
``Trainer(precision=...)``, so the library's real code paths run; a run passes if every loss
is finite and the mean loss of the last tenth of the steps is below 90% of the first tenth's
(``--smoke`` runs too few steps for the second half of that).
It prints tasks/s (after a warm-up, data loading included), peak GPU memory
(``torch.cuda.max_memory_allocated``) and, for 16-mixed, the gradient scaler's final scale
(65536 at the start, halved at every skipped step). The learn2learn comparison times a full
fp32 meta-iteration (inner step of all tasks, query loss, outer backward, Adam step) on the
same batches already on the device: learn2learn's ``clone()``/``adapt()`` loop of its README
against our MAML module in a plain loop. It also prints whether autocast reaches a
convolution run under ``torch.func.vmap`` on this device (on the CPU it does not).

The tables are markdown, for docs/benchmarks.md. Exit status 1 if any run fails its check.

    python benchmarks/gpu_check.py              # one GPU, about 2 to 4 minutes
    python benchmarks/gpu_check.py --smoke      # CPU, tiny sizes: checks that it runs
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

import lightning as L
import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import MAML, ProtoNet
from fewshot_lightning.data import EpisodicDataModule, TaskBatch, scale_images
from fewshot_lightning.models import Conv4

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
OMNIGLOT_CLASSES, OMNIGLOT_INSTANCES, SIDE = 1623, 20, 28


def omniglot_like(classes: int, instances: int, seed: int = 0):
    """``uint8 [classes * instances, 1, 28, 28]`` images and their labels: per class, blobs from a
    7x7 random field upsampled and thresholded, plus per-image Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.rand(classes, 1, 7, 7, generator=generator), size=SIDE, mode="bilinear",
                          align_corners=False)
    patterns = (field > 0.55).float()
    labels = torch.arange(classes).repeat_interleave(instances)
    images = patterns[labels] + 0.35 * torch.randn(len(labels), 1, SIDE, SIDE, generator=generator)
    return (images.clamp(0, 1) * 255).to(torch.uint8), labels


class Probe(L.Callback):
    """Training losses of every batch, and the wall time and number of the batches from the
    ``warmup``-th optimizer step on."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.losses: List[torch.Tensor] = []
        self.start: Optional[float] = None
        self.timed_batches = 0
        self.seconds = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None and trainer.global_step >= self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
            self.timed_batches = -len(self.losses)  # plus the count at the end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())  # no .item(): a sync per step would slow the GPU

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start
            self.timed_batches += len(self.losses)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(algorithm: str, hidden: int, batching: str):
    if algorithm == "MAML":
        return MAML(Conv4(in_channels=1, hidden=hidden, out_features=5, image_size=SIDE), inner_lr=0.4, inner_steps=1,
                    batching=batching)
    return ProtoNet(Conv4(in_channels=1, hidden=hidden, out_features=None, image_size=SIDE, track_running_stats=True))


def train(algorithm: str, precision: str, images, labels, args, accelerator: str) -> Dict[str, object]:
    L.seed_everything(0, verbose=False)
    model = build(algorithm, args.hidden, args.batching)
    data = EpisodicDataModule(images, labels, split_fractions=(1200, 100, 323), ways=5, shots=1, queries=15,
                              meta_batch_size=args.meta_batch, train_tasks=args.meta_batch * args.steps,
                              num_workers=args.num_workers)
    probe = Probe(args.warmup)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=args.steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    cuda = accelerator == "gpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, data)
    losses = torch.stack(probe.losses).float().cpu()
    tenth = max(1, len(losses) // 10)
    first, last = losses[:tenth].mean().item(), losses[-tenth:].mean().item()
    finite = bool(torch.isfinite(losses).all())
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {
        "algorithm": algorithm if algorithm != "MAML" else f"MAML ({model.batching})",
        "asked": precision, "ran": trainer.precision, "steps": len(losses),
        "tasks_per_s": args.meta_batch * probe.timed_batches / probe.seconds,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "first": first, "last": last, "finite": finite, "fell": last < 0.9 * first,
        "scale": scaler.get_scale() if scaler is not None else None,
    }


def meta_iteration_ms(step, batches: List[TaskBatch], device: torch.device, warmup: int) -> float:
    """Median milliseconds of ``step(batch)`` after ``warmup`` calls."""
    times = []
    for i, batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def against_learn2learn(images, labels, args, device: torch.device) -> Optional[Dict[str, object]]:
    try:
        import learn2learn as l2l
    except ImportError:
        return None
    data = EpisodicDataModule(images, labels, split_fractions=(1200, 100, 323), ways=5, shots=1, queries=15,
                              meta_batch_size=args.meta_batch, train_tasks=args.meta_batch * args.l2l_iterations,
                              num_workers=0)
    data.setup("fit")
    batches = [scale_images(TaskBatch(*(t.to(device) for t in batch))) for batch in data.train_dataloader()]
    torch.manual_seed(0)
    ours = build("MAML", args.hidden, args.batching).to(device)
    reference = l2l.algorithms.MAML(Conv4(in_channels=1, hidden=args.hidden, out_features=5, image_size=SIDE),
                                    lr=0.4, first_order=False).to(device)
    reference.module.load_state_dict(ours.backbone.state_dict())  # the same starting weights
    ours.choose_batching(batches[0])
    ours_optimizer = torch.optim.Adam(ours.parameters(), lr=1e-3)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)

    def ours_step(batch: TaskBatch) -> None:
        loss = ours.query_losses(ours(batch), batch).mean()
        ours_optimizer.zero_grad()
        loss.backward()
        ours_optimizer.step()

    def reference_step(batch: TaskBatch) -> None:
        reference_optimizer.zero_grad()
        total = 0.0
        for t in range(batch.num_tasks):
            learner = reference.clone()
            learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
            total = total + F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t])
        (total / batch.num_tasks).backward()
        reference_optimizer.step()

    warmup = min(5, len(batches) // 2)
    return {"batching": ours.batching, "ours": meta_iteration_ms(ours_step, batches, device, warmup),
            "learn2learn": meta_iteration_ms(reference_step, batches, device, warmup),
            "iterations": len(batches) - warmup}


def autocast_reaches_vmapped_conv(device: torch.device) -> str:
    """Whether autocast lowers the precision of a convolution run under ``torch.func.vmap``
    (MAML's batched inner loop), for each autocast dtype the Trainer would use here."""
    weights, images = torch.randn(2, 4, 3, 3, 3, device=device), torch.randn(2, 5, 3, 8, 8, device=device)
    answers = []
    for dtype in (torch.bfloat16,) if device.type == "cpu" else (torch.bfloat16, torch.float16):
        with torch.autocast(device.type, dtype=dtype):
            out = torch.func.vmap(lambda w, x: F.conv2d(x, w))(weights, images)
        name = str(dtype).replace("torch.", "")
        answers.append(f"{name}: {'yes' if out.dtype == dtype else 'no, the output is ' + str(out.dtype).replace('torch.', '')}")
    return "; ".join(answers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes and few steps: only checks that it runs")
    parser.add_argument("--steps", type=int, default=300, help="training steps per (algorithm, precision)")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the tasks/s timing")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="Conv4 filters")
    parser.add_argument("--batching", default="auto", choices=("auto", "vmap", "loop"), help="MAML's batching")
    parser.add_argument("--l2l-iterations", type=int, default=40, help="meta-iterations timed against learn2learn")
    parser.add_argument("--num-workers", type=int, default=4)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) to time anything.")
    if args.smoke:
        args.steps, args.warmup, args.meta_batch, args.hidden = 8, 2, 4, 8
        args.batching, args.l2l_iterations, args.num_workers = "vmap", 3, 0
        classes, instances = 100, 20
        torch.set_num_threads(1)
    else:
        classes, instances = OMNIGLOT_CLASSES, OMNIGLOT_INSTANCES
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("No GPU found: run with --smoke on a CPU.", file=sys.stderr)
        return 2
    accelerator, device = ("gpu", torch.device("cuda")) if cuda else ("cpu", torch.device("cpu"))
    began = time.perf_counter()
    images, labels = omniglot_like(classes, instances)

    rows = [train(algorithm, precision, images, labels, args, accelerator)
            for algorithm in ("MAML", "ProtoNet") for precision in PRECISIONS]
    comparison = against_learn2learn(images, labels, args, device)
    minutes = (time.perf_counter() - began) / 60

    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"\nDevice: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {L.__version__}; "
          f"{minutes:.1f} min in all{' (smoke run: tiny sizes)' if args.smoke else ''}")
    print(f"Tasks: {classes} classes x {instances} images, 28x28x1, 5-way 1-shot 15-query, {args.meta_batch} per step; "
          f"Conv4-{args.hidden}; {args.steps} steps per run, tasks/s after {args.warmup}")
    print(f"Autocast reaches a convolution under torch.func.vmap here: {autocast_reaches_vmapped_conv(device)}\n")
    print("| algorithm | precision (asked → ran) | tasks/s | peak memory (MiB) | loss, first → last tenth | "
          "16-mixed final scale | check |")
    print("|---|---|---|---|---|---|---|")
    failed = []
    for row in rows:
        ran = row["asked"] if row["ran"] == row["asked"] else f"{row['asked']} → {row['ran']}"
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "—"
        scale = f"{row['scale']:.0f}" if row["scale"] is not None else "—"
        if not row["finite"]:
            check = "FAIL: non-finite loss"
        elif args.smoke:
            check = "finite (smoke: too few steps to require a fall)"
        else:
            check = "pass" if row["fell"] else "FAIL: loss did not fall"
        if check.startswith("FAIL"):
            failed.append(f"{row['algorithm']} {row['asked']}")
        print(f"| {row['algorithm']} | {ran} | {row['tasks_per_s']:.0f} | {peak} | "
              f"{row['first']:.3f} → {row['last']:.3f} | {scale} | {check} |")
    if comparison is None:
        print("\nlearn2learn is not installed: no comparison (pip install learn2learn==0.2.0).")
    else:
        print(f"\nOne fp32 MAML meta-iteration, {args.meta_batch} tasks, median of {comparison['iterations']}:\n")
        print("| learn2learn clone/adapt (ms) | ours (ms) | ours, tasks/s | speed-up |")
        print("|---|---|---|---|")
        print(f"| {comparison['learn2learn']:.1f} | {comparison['ours']:.1f} ({comparison['batching']}) | "
              f"{1000 * args.meta_batch / comparison['ours']:.0f} | {comparison['learn2learn'] / comparison['ours']:.1f}x |")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    if cuda and minutes > 6:
        print(f"\nTook {minutes:.1f} min, over the 6-minute budget: lower --steps.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
