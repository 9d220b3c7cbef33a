"""Evaluation with and without transduction (the MAML family's ``transductive`` argument):
with batch norm on batch statistics, a transductive query's output depends on the other
queries of its task; a non-transductive one (Reptile's setting) is computed in a batch with the
support set alone."""
import pytest
import torch

from fewshot_lightning.algorithms import MAML, Reptile
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import MLP, Conv4


def image_batch(tasks=2, ways=3, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.rand(tasks, ways, 1, 28, 28, generator=g), torch.arange(ways).repeat(tasks, 1),
                     torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
                     torch.arange(ways * queries).remainder(ways).repeat(tasks, 1))


def pair(learner=MAML, **kwargs):
    """The same weights, transductive and not."""
    torch.manual_seed(0)
    on = learner(Conv4(hidden=8, out_features=3), batching="loop", memory_format="contiguous", **kwargs)
    off = learner(Conv4(hidden=8, out_features=3), batching="loop", memory_format="contiguous", transductive=False,
                  **kwargs)
    off.load_state_dict(on.state_dict())
    return on, off


@pytest.mark.parametrize("learner, kwargs", [(MAML, dict(inner_lr=0.4, test_inner_steps=2)),
                                             (Reptile, dict(inner_lr=0.01, test_inner_steps=2))])
def test_a_non_transductive_query_depends_on_the_support_set_alone(learner, kwargs):
    on, off = pair(learner, **kwargs)
    batch = image_batch()
    with torch.no_grad():
        alone = off.evaluation_outputs(batch, "val")
        together = on.evaluation_outputs(batch, "val")
        # The first query again, with its task's other queries replaced by other images.
        others = image_batch(seed=1)
        swapped = TaskBatch(batch.support_x, batch.support_y,
                            torch.cat([batch.query_x[:, :1], others.query_x[:, 1:]], dim=1), batch.query_y)
        alone_swapped = off.evaluation_outputs(swapped, "val")
        together_swapped = on.evaluation_outputs(swapped, "val")
    assert alone.shape == together.shape == (2, 6, 3)
    torch.testing.assert_close(alone_swapped[:, 0], alone[:, 0])  # unchanged: it never saw the others
    assert (together_swapped[:, 0] - together[:, 0]).abs().max() > 1e-4  # transductive: it did
    # And exactly the adapted network on [support, that query] with batch statistics of both.
    params = off.adapt(batch.support_x, batch.support_y, off.test_inner_steps, differentiable=False)
    with torch.no_grad():
        for j in (0, 4):
            expected = off.predict(params, torch.cat([batch.support_x, batch.query_x[:, j:j + 1]], dim=1))[:, -1]
            torch.testing.assert_close(alone[:, j], expected)


def test_test_curve_and_adaptation_curve_follow_the_setting():
    on, off = pair(MAML, inner_lr=0.4, test_inner_steps=2)
    batch = image_batch()
    with torch.no_grad():
        curve = off.adaptation_curve(batch)
        outputs = off.evaluation_outputs(batch, "test")  # the test stage: scores after every step
    assert curve.shape == (3, 2, 6, 3)
    torch.testing.assert_close(curve[-1], outputs)
    assert off.test_curve.update_called


def test_without_batch_norm_the_two_settings_agree():
    # An MLP has no batch statistics: each query's output is its own either way.
    torch.manual_seed(0)
    on = MAML(MLP(), inner_lr=0.01, test_inner_steps=3)
    off = MAML(MLP(), inner_lr=0.01, test_inner_steps=3, transductive=False)
    off.load_state_dict(on.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 15, 1, generator=g) * 10 - 5
    batch = TaskBatch(x[:, :5], torch.sin(x[:, :5]), x[:, 5:], torch.sin(x[:, 5:]))
    with torch.no_grad():
        torch.testing.assert_close(off.evaluation_outputs(batch, "val"), on.evaluation_outputs(batch, "val"))
