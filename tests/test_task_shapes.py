"""Tasks whose shapes do not fit the learner are refused with the fix, on every path, instead of
being broadcast into a number."""
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fewshot_lightning.algorithms import CNP, MAML
from fewshot_lightning.algorithms.base import TaskShapeError, per_task_loss
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import MLP


def regression_batches(tasks, points, trailing):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, tasks, points, 1, generator=g) * 10 - 5
    y = torch.sin(x) if trailing else torch.sin(x).squeeze(-1)
    return DataLoader([TaskBatch(x[i], y[i], x[i], y[i]) for i in range(2)], batch_size=None)


def fit(model, data):
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return trainer


def test_regression_predictions_and_targets_of_different_shapes_are_refused():
    # [B, M, 1] predictions against [B, M] targets broadcast to [B, M, M]: with as many tasks as
    # points (5 and 5) MAML trained and tested on that with no error.
    assert per_task_loss(torch.zeros(5, 5, 1), torch.ones(5, 5, 1)).shape == (5,)
    with pytest.raises(TaskShapeError, match=r"\(5, 5, 1\) and targets of shape \(5, 5\).*unsqueeze\(-1\)"):
        per_task_loss(torch.zeros(5, 5, 1), torch.ones(5, 5))
    for batching in ("auto", "vmap", "loop"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(TaskShapeError, match=r"\(5, 5, 1\) and targets of shape \(5, 5\)"):
                fit(MAML(MLP(), inner_lr=0.01, batching=batching), regression_batches(5, 5, trailing=False))
        # Not reported as a backbone vmap cannot run (auto tried vmap first and fell back to the loop).
        assert not [w for w in caught if "cannot run under torch.func.vmap" in str(w.message)]
    with pytest.raises(TaskShapeError, match=r"\(2, 5, 2\) and targets of shape \(2, 5, 1\)"):
        fit(MAML(MLP(1, (8,), 2), inner_lr=0.01), regression_batches(2, 5, trailing=True))
    assert fit(MAML(MLP(), inner_lr=0.01), regression_batches(5, 5, trailing=True)).global_step == 2


def test_cnp_names_points_without_a_value_dimension():
    with pytest.raises(TaskShapeError, match=r"CNP reads .*support_y is \[2, 5\].*unsqueeze\(-1\)"):
        fit(CNP(MLP(2, (16,), 16)), regression_batches(2, 5, trailing=False))
