"""learn2learn as an independent reference for the MAML meta-gradient."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import SinusoidTasks
from fewshot_lightning.models import MLP

l2l = pytest.importorskip("learn2learn")


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_learn2learn(first_order):
    torch.manual_seed(0)
    backbone = MLP()
    reference = l2l.algorithms.MAML(copy.deepcopy(backbone), lr=0.01, first_order=first_order)
    ours = MAML(backbone, inner_lr=0.01, inner_steps=2, first_order=first_order)
    batch = SinusoidTasks(shots=10, queries=10, num_tasks=8).__getitems__(range(8))

    per_task_loss(ours(batch), batch.query_y).mean().backward()
    total = 0.0
    for t in range(batch.num_tasks):
        learner = reference.clone()
        for _ in range(2):
            learner.adapt(F.mse_loss(learner(batch.support_x[t]), batch.support_y[t]))
        total = total + F.mse_loss(learner(batch.query_x[t]), batch.query_y[t])
    (total / batch.num_tasks).backward()

    for (name, ours_param), ref_param in zip(backbone.named_parameters(), reference.module.parameters()):
        assert ours_param.grad is not None and ref_param.grad is not None, name
        assert torch.allclose(ours_param.grad, ref_param.grad, rtol=1e-4, atol=1e-6), name
