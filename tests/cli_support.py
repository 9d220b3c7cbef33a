"""Classes that tests name by ``class_path`` on the command line of ``fewshot-lightning`` run in a
subprocess (the tests folder is on its ``PYTHONPATH``), and the helper that runs it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import lightning as L
import torch

from fewshot_lightning.data import EpisodicDataModule, LabelledData

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def cli_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a CLI subprocess: this checkout and the tests folder importable, one
    torch thread per process (two shared cores)."""
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **(extra or {}))


def start_cli(*args: str, cwd: Path, env: Optional[Dict[str, str]] = None, log: str = "cli.log") -> subprocess.Popen:
    """Start the CLI; its stdout and stderr go to the file ``cwd / log`` (a pipe nobody reads
    while it runs could fill up and stall it)."""
    with open(Path(cwd) / log, "w") as output:
        return subprocess.Popen([sys.executable, "-m", "fewshot_lightning", *args], cwd=cwd, env=env or cli_env(),
                                stdout=output, stderr=subprocess.STDOUT, text=True)


def run_cli(*args: str, cwd: Path, env: Optional[Dict[str, str]] = None, log: str = "cli.log",
            timeout: float = 300) -> str:
    """Run the CLI to completion and return its output; fail the test with it on a non-zero exit."""
    process = start_cli(*args, cwd=cwd, env=env, log=log)
    process.wait(timeout=timeout)
    output = (Path(cwd) / log).read_text()
    assert process.returncode == 0, output[-5000:]
    return output


def clustered_images(classes: int, per_class: int, side: int, noise: float, seed: int = 0):
    """Each class is a random pattern; its samples are that pattern plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 1, side, side, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return patterns[labels] + noise * torch.randn(len(labels), 1, side, side, generator=generator), labels


class ClusteredImages(EpisodicDataModule):
    """Synthetic 1-channel image episodes made in memory (no download), for CLI tests.

    Args:
        classes, per_class, side, noise: see :func:`clustered_images`.
        flatten: give each sample as a vector of ``side * side`` features (for an ``MLP``).
        ways, shots, queries, meta_batch_size, train_tasks, val_tasks, test_tasks, seed: as
            :class:`~fewshot_lightning.data.EpisodicDataModule`.
    """

    def __init__(self, classes: int = 40, per_class: int = 8, side: int = 16, noise: float = 0.6,
                 flatten: bool = False, ways: int = 5, shots: int = 1, queries: int = 3, meta_batch_size: int = 4,
                 train_tasks: int = 400, val_tasks: int = 20, test_tasks: int = 20, seed: int = 0) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, meta_batch_size=meta_batch_size,
                         train_tasks=train_tasks, val_tasks=val_tasks, test_tasks=test_tasks, num_workers=0, seed=seed)
        self.images = dict(classes=classes, per_class=per_class, side=side, noise=noise)
        self.flatten = flatten

    def load_splits(self) -> Dict[str, LabelledData]:
        images, self.labels = clustered_images(**self.images)
        self.data = images.flatten(1) if self.flatten else images
        return super().load_splits()


class StepRecorder(L.Callback):
    """Write ``{"start": global_step at on_train_start, "steps": [global_step after each batch]}``
    to ``path`` (JSON, rewritten after every batch, so another process can watch it), on
    global rank 0."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict = {}

    def _write(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.record))
        partial.replace(self.path)  # atomic: a reader never sees half a file

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record = {"start": trainer.global_step, "steps": []}
        if trainer.is_global_zero:
            self._write()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.record["steps"].append(trainer.global_step)
        if trainer.is_global_zero:
            self._write()


class SigtermInSanityCheck(L.Callback):
    """Sends this process SIGTERM as the sanity check starts: before the first training step."""

    def on_sanity_check_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM as the training batch that ends at global step ``step + 1`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
