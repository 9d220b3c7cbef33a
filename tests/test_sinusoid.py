"""Sinusoid tasks, and MAML learning them."""
import math

import lightning as L
import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import SinusoidDataModule, SinusoidTasks
from fewshot_lightning.models import MLP


def fit_sinusoid(x, y):
    """Least squares for y = a sin x + b cos x: amplitude sqrt(a^2+b^2), phase atan2(-b, a)."""
    design = torch.cat([torch.sin(x), torch.cos(x)], dim=-1).double()
    coef = torch.linalg.lstsq(design, y.double()).solution.flatten()
    return coef, math.hypot(*coef.tolist()), math.atan2(-coef[1].item(), coef[0].item())


def test_tasks_follow_maml_distribution():
    tasks = SinusoidTasks(shots=10, queries=10, num_tasks=500, seed=0)
    batch = tasks.__getitems__(range(500))
    assert batch.support_x.shape == (500, 10, 1) and batch.query_y.shape == (500, 10, 1)
    assert batch.support_x.dtype == torch.float32
    assert -5 <= batch.support_x.min() and batch.support_x.max() <= 5
    amplitudes, phases = [], []
    for t in range(500):
        coef, amplitude, phase = fit_sinusoid(batch.support_x[t], batch.support_y[t])
        # Support and query come from the same sinusoid: the support fit predicts the query.
        query_pred = torch.cat([torch.sin(batch.query_x[t]), torch.cos(batch.query_x[t])], -1).double() @ coef
        assert torch.allclose(query_pred, batch.query_y[t].double().flatten(), atol=1e-4)
        amplitudes.append(amplitude)
        phases.append(phase)
    amplitudes, phases = torch.tensor(amplitudes), torch.tensor(phases)
    assert 0.1 - 1e-4 <= amplitudes.min() and amplitudes.max() <= 5.0 + 1e-4
    assert -1e-4 <= phases.min() and phases.max() <= math.pi + 1e-4
    # U[0.1, 5] has mean 2.55 and U[0, pi] mean pi/2; 500 draws land within 0.25 of each.
    assert abs(amplitudes.mean() - 2.55) < 0.25 and abs(phases.mean() - math.pi / 2) < 0.25


def test_maml_learns_to_adapt_on_sinusoids():
    L.seed_everything(0)
    model = MAML(MLP(), inner_lr=0.01, inner_steps=1, test_inner_steps=10)
    data = SinusoidDataModule(shots=10, meta_batch_size=10, train_tasks=10 * 600, test_tasks=200)
    untrained = MAML(MLP(), inner_lr=0.01, inner_steps=1, test_inner_steps=10)
    trainer = L.Trainer(
        max_steps=600, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, data)
    trained = trainer.test(model, data, verbose=False)[0]
    baseline = trainer.test(untrained, data, verbose=False)[0]
    # After meta-training, 10 steps of adaptation cut the query MSE by more than a third
    # (seen: 3.4 -> 1.8 after 600 steps, against 4.8 -> 4.3 untrained), far more than the same 10 steps do from a random init.
    assert trained["test/mse_after_10_steps"] < 0.65 * trained["test/mse_after_0_steps"]
    assert trained["test/mse"] < 0.75 * baseline["test/mse"]
    assert trained["test/mse_ci95"] > 0  # a real interval over 200 tasks
