"""ProtoNet: logits against a loop over tasks, queries and classes; support-order invariance;
a short fit that must learn to ignore noise; batch-norm modes; bad arguments; its configs."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from learner_helpers import (
    FlatLinear, adam, config_model, fit_and_test, hidden_clusters, kanji_shaped_episodes, permute_support,
    random_episodes,
)
from torch import nn

from fewshot_lightning.algorithms import ProtoNet
from fewshot_lightning.data import EpisodicDataModule, scale_images
from fewshot_lightning.models import Conv4


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_logits_match_a_loop_over_tasks_queries_and_classes(distance):
    torch.manual_seed(0)
    model = ProtoNet(FlatLinear(12, 6), distance=distance)
    batch = random_episodes()
    logits = model(batch)
    assert logits.shape == (3, 4 * 3, 4)

    with torch.no_grad():
        expected = torch.empty_like(logits)
        for task in range(3):
            support = model.backbone(batch.support_x[task])
            query = model.backbone(batch.query_x[task])
            for c in range(4):
                prototype = support[batch.support_y[task] == c].mean(0)
                for q in range(12):
                    if distance == "euclidean":
                        # The paper's logit: minus the squared Euclidean distance (scale 1).
                        expected[task, q, c] = -((query[q] - prototype) ** 2).sum()
                    else:
                        # Cosine similarity times the default scale of 10.
                        cosine = torch.dot(query[q], prototype) / (query[q].norm() * prototype.norm())
                        expected[task, q, c] = 10 * cosine
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-4)


def test_protonet_predictions_do_not_depend_on_support_order():
    torch.manual_seed(0)
    model = ProtoNet(FlatLinear(12, 6))
    batch = random_episodes()
    # A mean is order-free; only float summation order can differ, ~1e-6 at these magnitudes.
    torch.testing.assert_close(model(permute_support(batch)), model(batch), rtol=1e-5, atol=1e-5)


def test_protonet_trains_20_way_evaluates_5_way_and_learns_to_ignore_noise():
    L.seed_everything(0, workers=True, verbose=False)
    data, labels = hidden_clusters()
    datamodule = EpisodicDataModule(
        data, labels, ways=20, shots=1, queries=5, test_ways=5, test_queries=15,
        meta_batch_size=8, train_tasks=800, test_tasks=100, num_workers=0,
    )
    model = ProtoNet(nn.Linear(32, 16), optimizer=adam(1e-2))
    datamodule.setup("fit")
    datamodule.setup("test")
    # N is read from the labels: the same model gives 20 logits in training and 5 at test.
    assert model(scale_images(next(iter(datamodule.train_dataloader())))).shape == (8, 20 * 5, 20)
    assert model(scale_images(next(iter(datamodule.test_dataloader())))).shape == (8, 5 * 15, 5)

    before, after = fit_and_test(model, datamodule, steps=100)
    # Untrained, the noise dimensions swamp the distances: chance is 1/5 = 0.2 (measured 0.20).
    assert before["test/acc"] < 0.3
    # After 100 steps the embedding drops the noise: chance + 0.7 (measured 0.99).
    assert after["test/acc"] > 0.2 + 0.7


def test_protonet_evaluates_with_running_statistics_by_default_and_its_own_with_task():
    """Snell et al. evaluate in eval mode (running statistics); "task" normalises each
    evaluation task with its own batch statistics instead."""
    torch.manual_seed(0)
    backbone = Conv4(hidden=4, out_features=None, image_size=16, track_running_stats=True)
    batch = random_episodes(tasks=2, ways=3, shots=1, queries=2, x_shape=(1, 16, 16))
    running = ProtoNet(backbone).eval()
    transductive = ProtoNet(backbone, batch_norm_stats="task").eval()
    with torch.no_grad():
        # With running statistics every image is normalised on its own: the logits are those of
        # embeddings computed one image at a time.
        images = torch.cat([batch.support_x, batch.query_x], 1)
        alone = torch.stack([torch.cat([backbone(image[None]) for image in task]) for task in images])
        support, query = alone[:, :3], alone[:, 3:]
        expected = -torch.cdist(query, support).square()  # 1-shot: the prototypes are the support embeddings
        by_label = expected.gather(2, batch.support_y.argsort(1).unsqueeze(1).expand(-1, 6, -1))
        torch.testing.assert_close(running(batch), by_label, rtol=1e-4, atol=1e-4)
        # With the task's own statistics the embeddings differ, so do the logits.
        assert not torch.allclose(transductive(batch), running(batch), atol=1e-3)
    # Neither mode touches the running statistics in evaluation.
    assert torch.equal(backbone.features[0][1].running_var, torch.ones(4))


def test_protonet_names_missing_running_statistics_and_a_narrow_embedding():
    with pytest.raises(ValueError, match=r"running batch-norm statistics.*'features\.0\.1' keeps none.*"
                                         r"track_running_stats=True.*batch_norm_stats='task'"):
        ProtoNet(Conv4(out_features=None))
    # Conv4's default 5-unit head is a classifier's output, not an embedding (issue 10: 96.3%
    # instead of 98.3% on Kanji).
    with pytest.warns(UserWarning, match=r"only 5 dimensions.*narrows 64 features.*out_features=None"):
        ProtoNet(Conv4(track_running_stats=True))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ProtoNet(nn.Identity(), distance="manhattan"), r"\('euclidean', 'cosine'\).*'manhattan'"),
        (lambda: ProtoNet(nn.Identity(), distance="cosine", scale=0.0), "scale must be positive, got 0.0"),
        (lambda: ProtoNet(nn.Identity(), batch_norm_stats="batch"), r"\('task', 'running'\), got 'batch'"),
    ],
)
def test_bad_hyperparameters_raise_value_errors_that_name_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_protonet_kanji_config_builds_and_runs_on_kanji_shapes():
    model = config_model("protonet_kanji")
    assert model(kanji_shaped_episodes()).shape == (1, 5 * 2, 5)
