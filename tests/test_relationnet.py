"""RelationNet: scores in [0, 1] pairing each query with summed class maps (against a loop);
its losses against one-hot targets; shapes read from the backbone; the reference's unpadded
mini-ImageNet networks; bad arguments; its config."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from learner_helpers import FlatLinear, config_model, kanji_shaped_episodes, random_episodes
from torch import nn

from fewshot_lightning.algorithms import RelationNet
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import RelationEmbedding


def test_relationnet_scores_in_unit_interval_and_pair_each_query_with_summed_class_maps():
    torch.manual_seed(0)
    # 16x16 images -> 8 x 4 x 4 maps; the relation module pools 4 -> 2 -> 1. Running statistics
    # in eval mode make both networks per-sample, so the loop below may run them on anything.
    embedding = RelationEmbedding(in_channels=1, hidden=8, image_size=16, track_running_stats=True)
    model = RelationNet(embedding, relation_channels=8, relation_hidden=4, batch_norm_stats="running").eval()
    batch = random_episodes(tasks=2, ways=3, shots=2, queries=2, x_shape=(1, 16, 16))
    scores = model(batch)
    assert scores.shape == (2, 3 * 2, 3)  # [B, N*Q, N]
    assert ((scores >= 0) & (scores <= 1)).all()

    with torch.no_grad():
        pairs = []
        for task in range(2):
            support = model.backbone(batch.support_x[task])
            query = model.backbone(batch.query_x[task])
            for q in range(6):
                for c in range(3):
                    class_map = support[batch.support_y[task] == c].sum(0)  # the paper's K-shot sum
                    pairs.append(torch.cat([query[q], class_map]))
        expected = torch.sigmoid(model.relation(torch.stack(pairs))).view(2, 6, 3)
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-5, atol=1e-6)


def test_relationnet_normalises_each_task_with_its_own_statistics_by_default():
    """The reference code never switches to eval mode: every task is normalised with its own
    batch statistics, in the embedding and the relation module, in evaluation too; and it embeds
    the support set and the query set in two calls (``feature_encoder(samples)``,
    ``feature_encoder(batches)``), each with its own statistics."""
    torch.manual_seed(0)
    model = RelationNet(RelationEmbedding(hidden=8, image_size=16), relation_channels=8, relation_hidden=4).eval()
    batch = random_episodes(tasks=2, ways=3, shots=1, queries=2, x_shape=(1, 16, 16))
    with torch.no_grad():
        scores = model(batch)
        for task in range(2):
            # One task through plain calls: batch norm over that task's support images, then over
            # its query images, then over its pairs.
            support, query = model.backbone(batch.support_x[task]), model.backbone(batch.query_x[task])
            classes = support[batch.support_y[task].argsort()]  # 1-shot: the class map is the support map
            pairs = torch.cat([query.unsqueeze(1).expand(-1, 3, -1, -1, -1), classes.expand(6, -1, -1, -1, -1)], 2)
            expected = torch.sigmoid(model.relation(pairs.flatten(0, 1))).view(6, 3)
            torch.testing.assert_close(scores[task], expected, rtol=1e-5, atol=1e-6)
    # "task" builds the relation module without running statistics: it would never use them.
    assert model.relation.blocks[0][1].running_mean is None


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_relationnet_losses_against_one_hot_targets(loss):
    torch.manual_seed(0)
    model = RelationNet(RelationEmbedding(hidden=8, image_size=16), relation_channels=8, relation_hidden=4, loss=loss)
    batch = random_episodes(tasks=2, ways=3, shots=1, queries=2, x_shape=(1, 16, 16))
    scores = model(batch)
    targets = F.one_hot(batch.query_y, 3).float()
    if loss == "mse":
        expected = ((scores - targets) ** 2).mean((1, 2))
    else:
        expected = -(targets * scores.log() + (1 - targets) * (1 - scores).log()).mean((1, 2))
    torch.testing.assert_close(model.query_losses(scores, batch), expected, rtol=1e-5, atol=1e-6)
    model.query_losses(scores, batch).mean().backward()
    assert model.relation.fc[0].weight.grad.abs().sum() > 0


def test_relationnet_reads_the_feature_map_shape_from_the_backbone():
    model = RelationNet(RelationEmbedding(hidden=8, image_size=16))
    assert model.feature_shape == (8, 4, 4)
    assert model.relation.blocks[0][0].in_channels == 2 * 8  # a pair is two maps side by side
    # A backbone built for 28x28 images given 16x16 ones: the message names both shapes.
    model = RelationNet(RelationEmbedding(hidden=8, image_size=28))
    batch = random_episodes(tasks=1, ways=2, shots=1, queries=1, x_shape=(1, 16, 16))
    with pytest.raises(ValueError, match=r"\[8, 7, 7\].*\[8, 4, 4\]"):
        model(batch)


def test_unpadded_networks_give_the_reference_mini_imagenet_shapes():
    """Sung et al.'s mini-ImageNet code: unpadded convolutions in the embedding's pooling
    blocks (84 -> 82 -> 41 -> 39 -> 19) and in the relation module (19 -> 17 -> 8 -> 6 -> 3)."""
    embedding = RelationEmbedding(in_channels=3, hidden=64, image_size=84, padding=0)
    assert embedding.output_shape == (64, 19, 19)
    model = RelationNet(embedding, relation_padding=0)
    assert model.relation.map_shape == (64, 3, 3)
    assert model.relation.fc[0].in_features == 64 * 3 * 3
    with torch.no_grad():
        maps = embedding(torch.randn(2, 3, 84, 84))
        assert maps.shape == (2, 64, 19, 19)
        assert model.relation(torch.cat([maps, maps], 1)).shape == (2,)
    # Omniglot-size images through the same unpadded embedding: 28 -> 26 -> 13 -> 11 -> 5.
    assert RelationEmbedding(image_size=28, padding=0).output_shape == (64, 5, 5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: RelationNet(RelationEmbedding(hidden=8), loss="l1"), r"\('mse', 'bce'\).*'l1'"),
        (lambda: RelationNet(RelationEmbedding(hidden=8, image_size=12)), "feature_size 3 is too small"),
        (lambda: RelationNet(FlatLinear(12, 6)), r"square feature maps \[C, H, W\].*\[6\]"),
        (lambda: RelationNet(RelationEmbedding(hidden=8), relation_padding=2), "padding must be 0"),
        (lambda: RelationNet(nn.Identity()), r"Identity does not say its output shape"),
    ],
)
def test_bad_hyperparameters_raise_value_errors_that_name_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_relationnet_kanji_config_builds_and_runs_on_kanji_shapes():
    model = config_model("relationnet_kanji")
    assert model(kanji_shaped_episodes()).shape == (1, 5 * 2, 5)


def test_relationnet_bce_keeps_float64():
    # BCE runs outside autocast in float32 for half-precision scores; float64 scores (a float64
    # model, a gradient check) lost their precision to that cast.
    scores = torch.tensor([[[0.2, 0.7, 0.1], [0.6, 0.3, 0.4]]], dtype=torch.float64, requires_grad=True)
    batch = TaskBatch(torch.zeros(1, 3, 1, 4, 4), torch.tensor([[0, 1, 2]]), torch.zeros(1, 2, 1, 4, 4), torch.tensor([[1, 0]]))
    model = RelationNet(RelationEmbedding(hidden=8, image_size=16), relation_channels=8, relation_hidden=4, loss="bce")
    losses = model.query_losses(scores, batch)
    targets = F.one_hot(batch.query_y, 3).double()
    expected = -(targets * scores.log() + (1 - targets) * (1 - scores).log()).mean((1, 2))
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected, rtol=1e-14, atol=1e-15)
