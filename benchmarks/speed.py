"""Training speed and memory: fewshot-lightning against learn2learn, same models, same tasks.

One command, one table. Every case runs one full meta-iteration per timed call (inner
adaptation of every task, query loss, outer backward, Adam step); contenders take turns
round by round on the same pre-built batches, warm-up iterations are excluded for each,
and the median is reported with tasks/s. learn2learn runs its own loop (``maml.clone()``,
``learner.adapt(loss)`` per task) two ways: the query losses summed before one backward pass
(``learn2learn``: its README's loop), and a backward pass per task as soon as its loss is
computed (``learn2learn, backward per task``: its examples' loop, ``maml_miniimagenet.py`` and
the others, which holds one task's graph at a time, so far less memory); on a model built of
our ``ConvBlock`` both also run on a copy that keeps the maps NCHW
(``one_task_channels_last=False``), and every "vs learn2learn" ratio is taken against the
fastest (or, for memory, the smallest) of its contenders. learn2learn runs the model with
PyTorch's batch norm and max-pooling (``F.batch_norm`` and ``nn.MaxPool2d``, what its users'
layers run); ours with ``fewshot_lightning.models.batch_norm``, whose double backward takes a
few passes over the maps, and ``fewshot_lightning.models.max_pool``, whose backward keeps the
indices of the maxima instead of the map pooled; same values and derivatives
(``--learn2learn-our-layers`` also times learn2learn on ours, shown beside and never a ratio's
reference; ``--ours-pytorch-max-pool`` also times ours on PyTorch's max-pooling). Those layers
of ours run on the CPU only; on a GPU, PyTorch's (``--our-layers-on-device`` also times ours with
them enabled there, for a GPU session to decide).
Ours runs on each of its execution paths (``vmap``, ``loop``, and for convolutional models
``loop channels_last`` and ``vmap channels_last``: support passes under vmap, query passes in
the channels-last loop; ``--paths`` picks some), and with ``--tasks-per-backward N`` also with
the meta-gradient accumulated N tasks at a time (``MAML(tasks_per_backward=N)``, the same
memory saving as learn2learn's per-task backward at N=1); below the table, the path
``batching="auto"`` picks on each case, with the timings it picked by, says which of them a
user of the defaults gets.

Cases (ways-shots-queries, meta-batch B, inner steps):

- ``sinusoid``: MLP 1-40-40-1, 10-shot, B=25, 1 step, second order (Finn et al. 2017);
- ``sinusoid-fo``: the same, first order;
- ``conv4-32``: Conv4 with 32 filters and no batch norm, 28x28, 5w1s15q, B=16, 1 step;
- ``conv4-64-bn``: our ``Conv4`` (64 filters, batch norm), 28x28, 5w1s15q, B=8, 1 step;
- ``kanji-config``: the training episodes of ``configs/maml_kanji.yaml``: Conv4-64 with batch
  norm, 28x28, 5w1s1q, B=32, 1 step;
- ``mini``: mini-ImageNet size, ``Conv4(hidden=32)`` on 84x84x3, 5w5s15q, B=4, 5 steps;
- ``mini-fo``: the same, first order;
- ``fit``: ``fewshot-lightning fit --config configs/maml_sinusoid.yaml`` (every callback of the
  shipped config and of the CLI) against a bare loop over the same ``training_step``: whole runs
  taking turns, and (``--fit-block``) bare-loop blocks interleaved inside one run, plus Lightning's
  batch and step against the lean ones on alternate batches;
- ``sampling``: see ``benchmarks/sampling_throughput.py`` (run separately).

Peak memory: each (case, contender) also runs alone in a fresh subprocess, and the peak
resident set size reached during its iterations, a first one included (the kernel's mark
reset just before them, ``VmHWM``), less the RSS before them is reported (on a GPU: ``torch.cuda.max_memory_allocated``).
Peak RSS also holds what the C allocator keeps of freed memory, so it varies from run to run;
``--tensor-memory`` gives exact tensor peaks.

    python benchmarks/speed.py [--cases sinusoid conv4-64-bn ...] [--iterations 30] [--rounds 3] [--device cpu]
    python benchmarks/speed.py --tensor-memory [--cases ...]   # exact tensor peaks, no timing
    python benchmarks/speed.py --cpu-allocator keep [...]      # both libraries with glibc keeping freed memory

Both libraries run in this one process, so they share its C allocator: glibc's defaults unless
``--cpu-allocator keep``, the ``fewshot-lightning`` command's default on the CPU
(``benchmarks/cpu_allocator.py`` compares the settings, each contender in its own process).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.maml import path_name
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import SinusoidTasks, TaskBatch
from fewshot_lightning.models import MLP, Conv4
from fewshot_lightning.models.blocks import ConvBlock, TaskBatchNorm2d

from maml_step_time import cpu_name


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    tasks: int
    steps: int
    inner_lr: float
    first_order: bool
    batch: Callable[[int, str], TaskBatch]  # (seed, device) -> batch
    paths: tuple  # our execution paths: "vmap", "vmap channels_last", "loop", "loop channels_last"


def sinusoid_batch(tasks: int) -> Callable[[int, str], TaskBatch]:
    source = SinusoidTasks(shots=10, queries=10, num_tasks=10**6)
    return lambda seed, device: TaskBatch(*(t.to(device) for t in source.__getitems__(range(seed * tasks, (seed + 1) * tasks))))


def image_batch(tasks: int, ways: int, shots: int, queries: int, channels: int, side: int):
    def make(seed: int, device: str) -> TaskBatch:
        g = torch.Generator().manual_seed(seed)
        support_y = torch.stack([torch.randperm(ways * shots, generator=g) % ways for _ in range(tasks)])
        query_y = torch.stack([torch.randperm(ways * queries, generator=g) % ways for _ in range(tasks)])
        batch = TaskBatch(torch.rand(tasks, ways * shots, channels, side, side, generator=g), support_y,
                          torch.rand(tasks, ways * queries, channels, side, side, generator=g), query_y)
        return TaskBatch(*(t.to(device) for t in batch))

    return make


def conv4_without_batch_norm(hidden: int = 32, ways: int = 5) -> nn.Module:
    layers: List[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))


MLP_PATHS = ("vmap", "loop")
CONV_PATHS = ("vmap", "vmap channels_last", "loop", "loop channels_last")
CASES: Dict[str, Case] = {
    "sinusoid": Case(MLP, 25, 1, 0.01, False, sinusoid_batch(25), MLP_PATHS),
    "sinusoid-fo": Case(MLP, 25, 1, 0.01, True, sinusoid_batch(25), MLP_PATHS),
    "conv4-32": Case(conv4_without_batch_norm, 16, 1, 0.4, False, image_batch(16, 5, 1, 15, 1, 28), CONV_PATHS),
    "conv4-64-bn": Case(lambda: Conv4(hidden=64, out_features=5), 8, 1, 0.4, False, image_batch(8, 5, 1, 15, 1, 28),
                        CONV_PATHS),
    # The shipped configs/maml_kanji.yaml's training episodes: one query per class, 32 tasks.
    "kanji-config": Case(lambda: Conv4(hidden=64, out_features=5), 32, 1, 0.4, False, image_batch(32, 5, 1, 1, 1, 28),
                         CONV_PATHS),
    "mini": Case(lambda: Conv4(in_channels=3, hidden=32, out_features=5, image_size=84), 4, 5, 0.01, False,
                 image_batch(4, 5, 5, 15, 3, 84), CONV_PATHS),
    "mini-fo": Case(lambda: Conv4(in_channels=3, hidden=32, out_features=5, image_size=84), 4, 5, 0.01, True,
                    image_batch(4, 5, 5, 15, 3, 84), CONV_PATHS),
}


GROUPED = "tasks_per_backward="


def ours(case: Case, network: nn.Module, path: str, tasks_per_backward: Optional[int] = None) -> Callable[[TaskBatch], None]:
    batching, _, memory_format = path.partition(" ")
    model = MAML(copy.deepcopy(network), inner_lr=case.inner_lr, inner_steps=case.steps,
                 first_order=case.first_order, batching=batching, memory_format=memory_format or "contiguous",
                 tasks_per_backward=tasks_per_backward).to(next(network.parameters()).device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: TaskBatch) -> None:
        if tasks_per_backward is None:
            loss = per_task_loss(model(batch), batch.query_y).mean()
        else:  # the training step's grouped backward (MetaLearner.grouped_loss)
            loss = model.grouped_loss(batch, tasks_per_backward)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def learn2learn(case: Case, network: nn.Module, per_task: bool = False) -> Callable[[TaskBatch], None]:
    """learn2learn's loop (``maml.clone()``, ``learner.adapt(loss)`` per task): the tasks' query
    losses summed before one ``backward()``, as in its README; with ``per_task``, as its
    examples (``examples/vision/maml_miniimagenet.py`` and the others) run it: ``backward()`` on
    each task's query loss as soon as it is computed, the gradients accumulating in ``.grad``
    (divided by the number of tasks), so one task's graph is held at a time."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(copy.deepcopy(network), lr=case.inner_lr, first_order=case.first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    loss_fn = F.mse_loss if case.batch(0, "cpu").support_y.is_floating_point() else F.cross_entropy

    def step(batch: TaskBatch) -> None:
        optimizer.zero_grad()
        total = 0.0
        for t in range(batch.num_tasks):
            learner = maml.clone()
            for _ in range(case.steps):
                learner.adapt(loss_fn(learner(batch.support_x[t]), batch.support_y[t]))
            loss = loss_fn(learner(batch.query_x[t]), batch.query_y[t])
            if per_task:
                (loss / batch.num_tasks).backward()
            else:
                total = total + loss
        if not per_task:
            (total / batch.num_tasks).backward()
        optimizer.step()

    return step


#: Suffix of the learn2learn contenders run on our batch norm and max-pooling
#: (``--learn2learn-our-layers``): shown, never the reference of a ratio.
OUR_LAYERS = ", our batch norm and max-pool"
#: Suffix of our contenders run on PyTorch's max-pooling (``--ours-pytorch-max-pool``).
PYTORCH_MAX_POOL = ", PyTorch's max-pool"
#: Suffix of ours with our batch norm and max-pooling enabled on the device too
#: (``--our-layers-on-device``; by default they run on the CPU only, elsewhere PyTorch's).
ON_DEVICE = ", our layers on the device"


def torch_layers(network: nn.Module, batch_norm: bool = True, max_pool: bool = True) -> nn.Module:
    """A copy of ``network`` whose layers of ours run PyTorch's: with ``batch_norm``, its
    ``TaskBatchNorm2d`` call ``F.batch_norm``, as a learn2learn user's ``nn.BatchNorm2d`` does
    (else ``fewshot_lightning.models.batch_norm``, whose double backward is a few passes over the
    maps); with ``max_pool``, its ``ConvBlock`` pool with their ``nn.MaxPool2d``, which keeps the
    map pooled for the backward, after batch norm's own node (else
    ``fewshot_lightning.models.max_pool``, which keeps the indices of the maxima, in one node with
    batch norm for passes differentiated twice: ``ConvBlock.pools_in_norm``). Same values and
    derivatives either way."""
    copied = copy.deepcopy(network)
    for layer in copied.modules():
        if isinstance(layer, TaskBatchNorm2d):
            layer.fused_double_backward = not batch_norm
        if isinstance(layer, ConvBlock):
            layer.lean_max_pool = not max_pool
    return copied


def layers_on(device_type: str, step: Callable[[TaskBatch], None]) -> Callable[[TaskBatch], None]:
    """``step`` with our batch norm (its own double backward) and max-pooling (its backward
    keeping the indices, the one node of both) enabled on ``device_type`` too, for its duration:
    their ``DEVICES`` hold the CPU only, where they were measured, and a GPU session is to decide
    whether they pay there (cuDNN's batch norm against PyTorch's native kernels with our double
    backward)."""
    from fewshot_lightning.models import batch_norm as norm_module, max_pool as pool_module

    def run(batch: TaskBatch) -> None:
        saved = norm_module.DEVICES, norm_module.POOL_DEVICES, pool_module.DEVICES
        norm_module.DEVICES, norm_module.POOL_DEVICES, pool_module.DEVICES = (
            kinds if device_type in kinds else kinds + (device_type,) for kinds in saved)
        try:
            step(batch)
        finally:
            norm_module.DEVICES, norm_module.POOL_DEVICES, pool_module.DEVICES = saved

    return run


def contenders(case: Case, device: str, learn2learn_channels_last: bool = False, paths: Optional[List[str]] = None,
               groups: List[int] = (), learn2learn_our_layers: bool = False,
               ours_pytorch_max_pool: bool = False,
               our_layers_on_device: bool = False) -> Dict[str, Callable[[TaskBatch], None]]:
    """Every contender of ``case`` by name: ours on each of ``paths`` (default: the case's), and
    with ``tasks_per_backward`` set to each of ``groups`` on the same paths
    (``"ours, <path>, tasks_per_backward=<N>"``); learn2learn summing the tasks' query losses
    before one backward pass (its README's loop) and with a backward pass per task (its
    examples'), each also on the NCHW module for a model of our ``ConvBlock``. With
    ``our_layers_on_device``, ours on each path also with our layers enabled on ``device``
    (:func:`layers_on`; on the CPU the same as the default)."""
    torch.manual_seed(0)
    network = case.build().to(device)
    runs = {f"ours, {path}": ours(case, network, path) for path in (paths or case.paths)}
    runs.update({f"ours, {path}, {GROUPED}{group}": ours(case, network, path, group)
                 for path in (paths or case.paths) for group in groups})
    has_our_layers = any(isinstance(module, (TaskBatchNorm2d, ConvBlock)) for module in network.modules())
    if ours_pytorch_max_pool and has_our_layers:
        pooled = torch_layers(network, batch_norm=False)
        runs.update({f"ours, {path}{PYTORCH_MAX_POOL}": ours(case, pooled, path) for path in (paths or case.paths)})
    if our_layers_on_device and has_our_layers:
        kind = torch.device(device).type
        runs.update({f"ours, {path}{ON_DEVICE}": layers_on(kind, ours(case, network, path))
                     for path in (paths or case.paths)})
    # learn2learn runs the model with PyTorch's batch norm and max-pooling, as its users' layers do.
    theirs = torch_layers(network)
    try:
        runs["learn2learn"] = learn2learn(case, theirs)
        runs["learn2learn, backward per task"] = learn2learn(case, theirs, per_task=True)
        if learn2learn_our_layers and has_our_layers:
            runs["learn2learn" + OUR_LAYERS] = learn2learn(case, torch_layers(network, False, False))
        if any(isinstance(module, ConvBlock) for module in network.modules()):
            # Our ConvBlock runs a lone task's maps channels-last, and learn2learn adapts one task
            # at a time, so it inherits that choice; on a module that keeps NCHW it can be faster
            # (mini-ImageNet size, second order: twice). The ratios take the faster of the two.
            nchw = copy.deepcopy(theirs)
            for block in nchw.modules():
                if isinstance(block, ConvBlock):
                    block.one_task_channels_last = False
            runs["learn2learn, NCHW module"] = learn2learn(case, nchw)
            runs["learn2learn, NCHW module, backward per task"] = learn2learn(case, nchw, per_task=True)
            if learn2learn_our_layers and has_our_layers:
                runs["learn2learn, NCHW module" + OUR_LAYERS] = learn2learn(case, torch_layers(nchw, False, False))
        if learn2learn_channels_last and "loop channels_last" in case.paths:
            # What a learn2learn user can do for the same layout: convert the module.
            runs["learn2learn, module channels_last"] = learn2learn(
                case, copy.deepcopy(theirs).to(memory_format=torch.channels_last))
    except ImportError:
        pass
    return runs


def auto_choice(case: Case, device: str) -> str:
    """The path ``batching="auto"`` (with ``memory_format="auto"``) picks for this case here, then
    the group size ``tasks_per_backward="auto"`` picks on that path (timed as in a run planning
    enough steps to time it: ``MAML.group_timing_min_steps``), and the timings they picked by:
    what a user of the defaults runs."""
    import logging

    torch.manual_seed(0)
    model = MAML(case.build(), inner_lr=case.inner_lr, inner_steps=case.steps,
                 first_order=case.first_order).to(device)
    from lightning_utilities.core import rank_zero

    # rank_zero_info's logger (the package that imported last names it: learn2learn brings pytorch_lightning)
    loggers = [logging.getLogger("lightning.pytorch"), rank_zero.log]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)  # the decision's own log line would split the table
    try:
        model.choose_batching(case.batch(0, device))
        model.choose_tasks_per_backward(case.batch(0, device), force=True)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    path = path_name(model.batching, model.memory_format)
    timings = ", ".join(f"{name} {ms:.1f} ms" for name, ms in model.batching_timings.items())
    group = model.tasks_per_backward
    groups = ", ".join(f"{name} {ms:.1f} ms" for name, ms in model.group_timings.items())
    return (f"{path}" + (f" (its timed step: {timings})" if timings else "")
            + f"; tasks_per_backward {'the whole batch' if group is None else group}"
            + (f" (on that path: {groups})" if groups else ""))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(case: Case, device: str, iterations: int, rounds: int, warmup: int,
              learn2learn_channels_last: bool = False, paths: Optional[List[str]] = None,
              groups: List[int] = (), learn2learn_our_layers: bool = False,
              ours_pytorch_max_pool: bool = False, our_layers_on_device: bool = False) -> Dict[str, float]:
    """Median seconds per meta-iteration of each contender; contenders alternate every round."""
    runs = contenders(case, device, learn2learn_channels_last, paths, groups, learn2learn_our_layers,
                      ours_pytorch_max_pool, our_layers_on_device)
    batches = [case.batch(i, device) for i in range(iterations)]
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for round_index in range(rounds):
        for name, step in runs.items():
            for i, batch in enumerate(batches):
                synchronize(device)
                start = time.perf_counter()
                step(batch)
                synchronize(device)
                if round_index > 0 or i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(case_name: str, contender: str, device: str, iterations: int) -> float:
    """MiB the contender's iterations add at their peak, measured alone in this process: on the
    CPU from just before its first iteration (so one-off allocations, such as oneDNN's cached
    kernels, count, for every contender alike) to the end; on a GPU after a warm-up iteration."""
    case = CASES[case_name]
    step = contender_by_name(case, contender, device)
    batches = [case.batch(i, device) for i in range(iterations)]
    if device.startswith("cuda"):
        step(batches[0])  # allocator warm-up, not counted
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for batch in batches:
            step(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = rss_bytes()
    reset = reset_peak_rss()
    for batch in [batches[0]] + batches:
        step(batch)
    peak = peak_rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - before) / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: ``5`` to ``/proc/self/clear_refs``), so the peak
    read after the iterations is theirs, not one reached earlier (importing, building the
    batches); ``ru_maxrss`` cannot be reset. False where it cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def contender_by_name(case: Case, name: str, device: str) -> Callable[[TaskBatch], None]:
    """The contender ``contenders`` names ``name`` (a grouped one of ours built alone)."""
    if GROUPED in name:
        _, path, group = name.split(", ")
        return contenders(case, device, True, [path], [int(group[len(GROUPED):])])[name]
    return contenders(case, device, learn2learn_channels_last=True, learn2learn_our_layers=True,
                      ours_pytorch_max_pool=True, our_layers_on_device=True)[name]


def tensor_peaks(case_name: str, device: str, paths: Optional[List[str]] = None, groups: List[int] = (),
                 ours_pytorch_max_pool: bool = False, our_layers_on_device: bool = False) -> Dict[str, float]:
    """MiB held at the peak by the tensors one meta-iteration allocates, per contender (after a
    warm-up iteration; ``optimization_family.peak_bytes``: the allocator's own events on the CPU,
    ``max_memory_allocated`` on a GPU). Exact and repeatable, unlike peak RSS, which also holds
    whatever the C allocator keeps of freed memory."""
    from optimization_family import peak_bytes

    case = CASES[case_name]
    runs = contenders(case, device, paths=paths, groups=groups, ours_pytorch_max_pool=ours_pytorch_max_pool,
                      our_layers_on_device=our_layers_on_device)
    batches = [case.batch(i, device) for i in range(2)]
    peaks = {}
    for name, step in runs.items():
        step(batches[0])
        peaks[name] = peak_bytes(lambda: step(batches[1]), torch.device(device)) / 2**20
    return peaks


def measure_memory(case_name: str, names: List[str], device: str, iterations: int,
                   cpu_allocator: str = "system") -> Dict[str, Optional[float]]:
    result = {}
    for name in names:
        command = [sys.executable, __file__, "--memory-probe", case_name, name, "--device", device,
                   "--iterations", str(iterations), "--threads", str(torch.get_num_threads()),
                   "--cpu-allocator", cpu_allocator]
        probe = subprocess.run(command, capture_output=True, text=True)
        result[name] = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else None
    return result


def fit_overhead(steps: int, rounds: int, cpu_allocator: str = "system") -> Dict[str, List[float]]:
    """Seconds per training step, one figure per round: ``fewshot-lightning fit --config
    configs/maml_sinusoid.yaml`` (the CLI exactly as ``main`` builds it, so every callback of
    the shipped config and of the CLI is in place: progress bar, TensorBoard logger, both
    checkpoint callbacks, the non-finite guard, the requeue and run-folder callbacks; no
    validation), ``Trainer.fit`` with no logger, checkpoint or progress bar (Lightning's loop
    alone), the same with manual optimization (``manual_backward`` and the optimizer's ``step``
    inside ``training_step``), and a bare loop over the same ``training_step`` and optimizer. Steady state: the
    first ``steps // 5`` steps of each run are excluded. The four take turns round by round."""
    import tempfile

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from fewshot_lightning.cli import build_cli
    from fewshot_lightning.data import SinusoidDataModule

    skip = steps // 5
    config = str(Path(__file__).resolve().parents[1] / "configs" / "maml_sinusoid.yaml")

    class StepClock(Callback):
        def __init__(self) -> None:
            self.stamps: List[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.stamps.append(time.perf_counter())

    def per_step(stamps: List[float]) -> float:
        return (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)

    def with_cli() -> float:
        clock = StepClock()
        with tempfile.TemporaryDirectory() as logs:
            build_cli(["fit", "--config", config, "--trainer.max_steps", str(steps),
                       "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", logs,
                       "--trainer.logger.init_args.save_dir", logs, "--data.init_args.train_tasks", str(25 * steps),
                       # the command's allocator setting is process-wide: the script's, for all three
                       "--cpu_allocator", cpu_allocator],
                      callbacks=[clock])
        return per_step(clock.stamps)

    def loop_alone(learner: type = MAML) -> float:
        L.seed_everything(0, verbose=False)
        model = learner(MLP(), inner_lr=0.01, batching="vmap")
        data = SinusoidDataModule(meta_batch_size=25, train_tasks=25 * steps, num_workers=0)
        clock = StepClock()
        trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
        trainer.fit(model, data)
        return per_step(clock.stamps)

    class ManualMAML(MAML):
        """The same step under Lightning's manual optimization: its optimizer wrapper, which
        keeps the precision plugin and the optimizer hooks (``manual_backward``, ``step``)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return loss

    def bare() -> float:
        L.seed_everything(0, verbose=False)
        model = MAML(MLP(), inner_lr=0.01, batching="vmap")
        optimizer = model.configure_optimizers()
        data = SinusoidDataModule(meta_batch_size=25, train_tasks=25 * steps, num_workers=0)
        data.setup("fit")
        stamps = []
        for index, batch in enumerate(data.train_dataloader()):
            stamps.append(time.perf_counter())
            loss = model.training_step(batch, index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return per_step(stamps)

    times: Dict[str, List[float]] = {"CLI, shipped config": [], "Trainer.fit, no callbacks": [],
                                     "Trainer.fit, no callbacks, manual optimization": [], "bare loop": []}
    for _ in range(rounds):
        times["CLI, shipped config"].append(with_cli())
        times["Trainer.fit, no callbacks"].append(loop_alone())
        times["Trainer.fit, no callbacks, manual optimization"].append(loop_alone(ManualMAML))
        times["bare loop"].append(bare())
    return times


def fit_overhead_interleaved(steps: int, block: int) -> Dict[str, object]:
    """The same comparison, immune to a machine whose speed drifts from minute to minute: in one
    ``fit`` (the CLI's, then Lightning's loop alone), after every ``block`` training steps a
    callback runs ``block`` steps of the bare loop (its own learner, optimizer and tasks), so
    each block of the run's steps is paired with the bare block timed right after it; reported
    are the median and quartiles of the blocks' ratios (the first pair, warm-up, excluded). And,
    in one run of Lightning's loop alone, Lightning's own batch and optimization step and the
    lean ones (``fewshot_lightning.lean_loop``) take every other batch: the median difference of
    neighbouring batches is what the lean loop saves."""
    import tempfile

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from fewshot_lightning.cli import build_cli
    from fewshot_lightning.data import SinusoidDataModule
    from fewshot_lightning.lean_loop import LeanAutomaticOptimization, LeanTrainingEpochLoop

    config = str(Path(__file__).resolve().parents[1] / "configs" / "maml_sinusoid.yaml")

    class BareBlocks(Callback):
        def __init__(self) -> None:
            torch.manual_seed(1)
            self.model = MAML(MLP(), inner_lr=0.01, batching="vmap")
            self.optimizer = self.model.configure_optimizers()
            data = SinusoidDataModule(meta_batch_size=25, train_tasks=25 * steps, num_workers=0)
            data.setup("fit")
            self.batches = iter(data.train_dataloader())
            self.fit_marks: List[Optional[float]] = []
            self.bare: List[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.fit_marks.append(time.perf_counter())
            if batch_idx and batch_idx % block == 0:
                start = time.perf_counter()
                for index in range(block):
                    loss = self.model.training_step(next(self.batches), index)
                    self.optimizer.zero_grad()
                    loss.backward()
                    self.optimizer.step()
                self.bare.append((time.perf_counter() - start) / block)
                self.fit_marks += [None, time.perf_counter()]

        def ratios(self) -> List[float]:
            fit, current = [], []
            for mark in self.fit_marks:
                if mark is None:
                    fit.append((current[-1] - current[0]) / (len(current) - 1))
                    current = []
                else:
                    current.append(mark)
            pairs = list(zip(fit, self.bare))[1:]
            return [a / b for a, b in pairs]

    def quartiles(values: List[float]) -> List[float]:
        q = statistics.quantiles(values, n=4)
        return [q[0], statistics.median(values), q[2]]

    result: Dict[str, object] = {}
    blocks = BareBlocks()
    with tempfile.TemporaryDirectory() as logs:
        build_cli(["fit", "--config", config, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                   "--trainer.default_root_dir", logs, "--trainer.logger.init_args.save_dir", logs,
                   "--data.init_args.train_tasks", str(25 * steps)], callbacks=[blocks])
    result["CLI, shipped config"] = quartiles(blocks.ratios())

    class Alternating(LeanTrainingEpochLoop):
        """Lightning's batch and step at odd batches, the lean ones at even batches; stamps each
        batch's start (before its transfer, which the batch's time includes)."""

        stamps: List[tuple] = []

        def advance(self, data_fetcher) -> None:
            index = self.batch_progress.current.ready
            Alternating.stamps.append((index, time.perf_counter()))
            if index % 2 == 0:
                return super().advance(data_fetcher)
            step = self.automatic_optimization
            step.__class__ = _AutomaticOptimization
            try:
                return _TrainingEpochLoop.advance(self, data_fetcher)
            finally:
                step.__class__ = LeanAutomaticOptimization

    class AlternateBatches(Callback):
        """Puts :class:`Alternating` in the lean epoch loop's place for the run."""

        def on_fit_start(self, trainer, module) -> None:
            if type(trainer.fit_loop.epoch_loop) is LeanTrainingEpochLoop:
                trainer.fit_loop.epoch_loop.__class__ = Alternating

        def on_fit_end(self, trainer, module) -> None:
            if type(trainer.fit_loop.epoch_loop) is Alternating:
                trainer.fit_loop.epoch_loop.__class__ = LeanTrainingEpochLoop

    def alone(callback: Callback) -> None:
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        trainer.fit(MAML(MLP(), inner_lr=0.01, batching="vmap"),
                    SinusoidDataModule(meta_batch_size=25, train_tasks=25 * steps, num_workers=0))

    blocks = BareBlocks()
    alone(blocks)
    result["Trainer.fit, no callbacks"] = quartiles(blocks.ratios())
    Alternating.stamps = []
    alone(AlternateBatches())
    stamps = Alternating.stamps[steps // 5:]
    durations = [(index, later - earlier) for (index, earlier), (_, later) in zip(stamps, stamps[1:])]
    lean = [d for index, d in durations if index % 2 == 0]
    lightnings = [d for index, d in durations if index % 2 == 1]
    result["lean loop"] = (statistics.median(lean), statistics.median(lightnings),
                           statistics.median(b - a for a, b in zip(lean, lightnings)))
    return result


def reference_of(values: Dict[str, float]) -> Optional[float]:
    """The learn2learn figure ratios are taken against: the lowest (fastest, or least memory) of
    its contenders, so that no layout choice of ours handicaps it."""
    theirs = [value for name, value in values.items() if name.startswith("learn2learn") and OUR_LAYERS not in name]
    return min(theirs) if theirs else None


def case_paths(case_name: str, paths: Optional[List[str]]) -> Optional[List[str]]:
    """Those of ``paths`` the case has (``None``: all of its paths)."""
    if not paths:
        return None
    chosen = [path for path in CASES[case_name].paths if path in paths]
    if not chosen:
        raise SystemExit(f"--paths {' '.join(paths)}: the case {case_name} has none of them (its paths: "
                         f"{', '.join(CASES[case_name].paths)}).")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES) + ["fit"], choices=list(CASES) + ["fit"])
    parser.add_argument("--iterations", type=int, default=12, help="meta-iterations per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="iterations of the first round not timed")
    parser.add_argument("--fit-steps", type=int, default=1000)
    parser.add_argument("--fit-rounds", type=int, default=5, help="rounds of the fit case (its runs take turns; 0: not run)")
    parser.add_argument("--fit-block", type=int, default=50,
                        help="the fit case's interleaved measurement: steps per block (0: not run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-auto", action="store_true", help="skip reporting the path batching='auto' picks")
    parser.add_argument("--learn2learn-channels-last", action="store_true",
                        help="also time learn2learn on the module converted to channels-last (convolutional cases)")
    parser.add_argument("--learn2learn-our-layers", "--learn2learn-our-batch-norm", action="store_true",
                        dest="learn2learn_our_layers",
                        help="also time learn2learn on the model with our batch norm (its double backward) and max-pool "
                        "(its backward keeping the indices) (shown, not a ratio's reference: learn2learn's users run "
                        "PyTorch's)")
    parser.add_argument("--ours-pytorch-max-pool", action="store_true",
                        help="also time ours on each path with PyTorch's max-pooling (nn.MaxPool2d, which keeps the map "
                        "pooled for the backward) instead of fewshot_lightning.models.max_pool")
    parser.add_argument("--our-layers-on-device", action="store_true",
                        help="also time ours on each path with our batch norm and max-pooling enabled on --device "
                        "(they run on the CPU only by default; on a GPU, PyTorch's: this measures whether they pay "
                        "there; on the CPU the same as the default)")
    parser.add_argument("--tensor-memory", action="store_true",
                        help="only the tensor-peak table (exact, no timing): see tensor_peaks")
    parser.add_argument("--cpu-allocator", choices=["system", "keep"], default="system",
                        help="keep: fewshot_lightning.allocator.keep_freed_memory for the whole process (both "
                        "libraries), as the fewshot-lightning command does on the CPU; see cpu_allocator.py")
    parser.add_argument("--paths", nargs="+", choices=CONV_PATHS,
                        help="only these of our execution paths (those a case has; default: all of each case's)")
    parser.add_argument("--tasks-per-backward", nargs="+", type=int, default=[], metavar="N",
                        help="also run ours on each path with tasks_per_backward=N (the meta-gradient accumulated "
                        "N tasks at a time: MetaLearner.grouped_loss)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_allocator == "keep":
        from fewshot_lightning.allocator import keep_freed_memory

        if not keep_freed_memory():
            parser.error("--cpu-allocator keep needs glibc")
    if args.memory_probe:
        print(json.dumps(peak_memory(*args.memory_probe, args.device, min(args.iterations, 5))))
        return

    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"Machine: {machine}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, 1-min load average {os.getloadavg()[0]:.1f} at start, CPU allocator "
          f"{args.cpu_allocator}")
    if args.tensor_memory:
        print("| case | contender | tensor peak (MiB) | vs learn2learn |")
        print("|---|---|---:|---:|")
        for name in (case for case in args.cases if case != "fit"):
            peaks = tensor_peaks(name, args.device, case_paths(name, args.paths), args.tasks_per_backward,
                                 args.ours_pytorch_max_pool, args.our_layers_on_device)
            reference = reference_of(peaks)
            for contender, mib in peaks.items():
                ratio = f"{mib / reference:.3f}x" if reference else "n/a"
                print(f"| {name} | {contender} | {mib:.1f} | {ratio} |", flush=True)
        return
    print(f"Median of {args.rounds} rounds x {args.iterations} meta-iterations per contender, alternating, "
          f"{args.warmup} warm-up iterations excluded.\n")
    print("| case | contender | ms / meta-iteration | tasks/s | vs learn2learn | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    choices = {}
    for name in args.cases:
        if name == "fit":
            continue
        case = CASES[name]
        if not args.no_auto:
            choices[name] = auto_choice(case, args.device)
        times = time_case(case, args.device, args.iterations, args.rounds, args.warmup, args.learn2learn_channels_last,
                          case_paths(name, args.paths), args.tasks_per_backward, args.learn2learn_our_layers,
                          args.ours_pytorch_max_pool, args.our_layers_on_device)
        memory = {} if args.no_memory else measure_memory(name, list(times), args.device, args.iterations,
                                                          args.cpu_allocator)
        reference = reference_of(times)
        for contender, seconds in times.items():
            ratio = f"{reference / seconds:.2f}x" if reference else "n/a"
            mib = memory.get(contender)
            print(f"| {name} | {contender} | {1000 * seconds:.1f} | {case.tasks / seconds:.{0 if case.tasks / seconds >= 10 else 2}f} | {ratio} | "
                  f"{'n/a' if mib is None else f'{mib:.0f}'} |", flush=True)
    if choices:
        print("\nPath `batching=\"auto\"` (and `memory_format=\"auto\"`) picks, then group size `tasks_per_backward=\"auto\"` "
              "picks on that path, timed on the case's first batch:")
        for name, choice in choices.items():
            print(f"- {name}: {choice}")
    if "fit" in args.cases:
        overhead = fit_overhead(args.fit_steps, args.fit_rounds, args.cpu_allocator) if args.fit_rounds else {}
        bare = overhead.get("bare loop")
        if overhead:
            print(f"\n`fit --config configs/maml_sinusoid.yaml` against a bare loop over the same training_step, "
                  f"{args.fit_steps} steps (first {args.fit_steps // 5} excluded), {args.fit_rounds} rounds taking turns; "
                  "ms/step, median (min to max), and overhead as the ratio of medians (and of the fastest rounds; "
                  "and the median of each round's own ratio, which a machine whose speed drifts between rounds "
                  "disturbs least):")
        for name, values in overhead.items():
            ratio = "" if name == "bare loop" else (
                f": {statistics.median(values) / statistics.median(bare):.2f}x ({min(values) / min(bare):.2f}x; "
                f"round by round {statistics.median(v / b for v, b in zip(values, bare)):.2f}x)")
            print(f"- {name}: {1000 * statistics.median(values):.2f} ms ({1000 * min(values):.2f} to "
                  f"{1000 * max(values):.2f}){ratio}")
        if args.fit_block:
            interleaved = fit_overhead_interleaved(args.fit_steps, args.fit_block)
            print(f"\nThe same, interleaved in one run ({args.fit_steps} steps): after every {args.fit_block} steps of `fit`, "
                  f"{args.fit_block} steps of the bare loop; `fit`'s time a step over the bare loop's, block by block "
                  "(median, and first to third quartile):")
            for name in ("CLI, shipped config", "Trainer.fit, no callbacks"):
                low, middle, high = interleaved[name]
                print(f"- {name}: {middle:.3f}x ({low:.3f}x to {high:.3f}x)")
            lean, lightnings, saved = interleaved["lean loop"]
            print(f"- Lightning's loop alone, its own batch and optimization step and the lean ones (fewshot_lightning.lean_loop) "
                  f"taking every other batch: lean {1000 * lean:.2f} ms, Lightning's {1000 * lightnings:.2f} ms a step (medians); "
                  f"neighbouring steps differ by {1e6 * saved:.0f} us (median)")
    print(f"\n1-min load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
