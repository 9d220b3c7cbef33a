"""Shared pieces of the learner tests: random episodes with the episode contract's labels,
synthetic data a learner must learn, tiny backbones, and a quiet Trainer."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from torch import nn

from fewshot_lightning.algorithms import MetaLearner
from fewshot_lightning.data import TaskBatch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def shuffled_labels(tasks: int, ways: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.arange(ways).repeat_interleave(per_class)
    return torch.stack([labels[torch.randperm(len(labels), generator=generator)] for _ in range(tasks)])


def random_episodes(tasks=3, ways=4, shots=2, queries=3, x_shape=(1, 3, 4), seed=0) -> TaskBatch:
    """Random inputs with the episode contract's labels: 0..N-1, shuffled within each task."""
    generator = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(tasks, ways * shots, *x_shape, generator=generator),
        shuffled_labels(tasks, ways, shots, generator),
        torch.randn(tasks, ways * queries, *x_shape, generator=generator),
        shuffled_labels(tasks, ways, queries, generator),
    )


def permute_support(batch: TaskBatch, seed: int = 1) -> TaskBatch:
    """The same tasks with every task's support set in a different order."""
    generator = torch.Generator().manual_seed(seed)
    shots = batch.support_x.shape[1]
    orders = torch.stack([torch.randperm(shots, generator=generator) for _ in range(batch.num_tasks)])
    tasks = torch.arange(batch.num_tasks).unsqueeze(1)
    return TaskBatch(batch.support_x[tasks, orders], batch.support_y[tasks, orders], batch.query_x, batch.query_y)


class FlatLinear(nn.Sequential):
    """Flatten, then one linear layer: the smallest embedding, stating its output shape."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, out_features))
        self.output_shape = (out_features,)


def hidden_clusters(classes=60, per_class=20, signal_dim=4, noise_dim=28, seed=0):
    """Gaussian clusters, one per class, in ``signal_dim`` dimensions (centres N(0, 1), spread
    0.1), padded with ``noise_dim`` dimensions of N(0, 3^2) noise. The noise dominates raw
    distances (expected squared distance ~ 2 * 28 * 9 = 504 against ~ 8 between centres), so an
    untrained embedding is near chance and a good one must learn to drop the noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, signal_dim, generator=generator)
    spread = 0.1 * torch.randn(classes * per_class, signal_dim, generator=generator)
    signal = centres.repeat_interleave(per_class, 0) + spread
    noise = 3.0 * torch.randn(classes * per_class, noise_dim, generator=generator)
    return torch.cat([signal, noise], 1), torch.arange(classes).repeat_interleave(per_class)


def sinusoid_batch(tasks=4, shots=10, queries=7, seed=0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand(tasks, 1, 1, generator=generator)
    phase = math.pi * torch.rand(tasks, 1, 1, generator=generator)
    support_x = 10 * torch.rand(tasks, shots, 1, generator=generator) - 5
    query_x = 10 * torch.rand(tasks, queries, 1, generator=generator) - 5
    support_y, query_y = amplitude * torch.sin(support_x - phase), amplitude * torch.sin(query_x - phase)
    return TaskBatch(support_x, support_y, query_x, query_y)


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def fit_and_test(model: MetaLearner, data: L.LightningDataModule, steps: int) -> tuple:
    """Test-set score (accuracy or MSE) before and after ``steps`` training steps."""
    before = quiet_trainer().test(model, data, verbose=False)[0]
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(model, data)
    after = quiet_trainer().test(model, data, verbose=False)[0]
    return before, after


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def config_model(name: str) -> MetaLearner:
    """The model a shipped config builds, through jsonargparse as the CLI does."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(MetaLearner, "model")
    # ``instantiate`` replaced ``instantiate_classes`` in jsonargparse 4.49; older versions have only the latter.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(parser.parse_object({"model": config["model"]})).model


def kanji_shaped_episodes(tasks=1) -> TaskBatch:
    """Kanji as the configs assume it: 1 x 28 x 28 images, 5-way 1-shot (2 queries to stay fast)."""
    return random_episodes(tasks=tasks, ways=5, shots=1, queries=2, x_shape=(1, 28, 28))


def record_training_batches(model: MetaLearner, record) -> list:
    """A list that gets ``record(batch)`` for every batch ``model.training_step`` is given (the
    step itself runs as before), so a test can see what the Trainer hands the module."""
    seen = []
    step = type(model).training_step

    def recording(self, batch, batch_idx):
        seen.append(record(batch))
        return step(self, batch, batch_idx)

    model.training_step = recording.__get__(model)
    return seen
