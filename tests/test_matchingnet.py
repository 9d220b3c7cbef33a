"""MatchingNet: attention is a distribution over the support set; without FCE it is softmax
cosine attention (against a loop); FCE shapes, gradients and query independence; a short fit
on hidden clusters; bad arguments; its config."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from learner_helpers import FlatLinear, adam, config_model, fit_and_test, hidden_clusters, kanji_shaped_episodes, random_episodes
from torch import nn

from fewshot_lightning.algorithms import MatchingNet
from fewshot_lightning.data import EpisodicDataModule, TaskBatch


@pytest.mark.parametrize("fce", [False, True])
def test_matchingnet_attention_is_a_distribution_over_the_support_set(fce):
    torch.manual_seed(0)
    model = MatchingNet(FlatLinear(12, 6), fce=fce, fce_steps=3)
    batch = random_episodes()
    attention = model.attention(batch)
    assert attention.shape == (3, 4 * 3, 4 * 2)  # [B, N*Q, N*K]
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 12), rtol=0, atol=1e-5)


def test_matchingnet_without_fce_is_softmax_cosine_attention_over_support_labels():
    torch.manual_seed(0)
    model = MatchingNet(FlatLinear(12, 6), scale=2.0)
    batch = random_episodes()
    log_probs = model(batch)
    assert log_probs.shape == (3, 4 * 3, 4)

    with torch.no_grad():
        expected_attention = torch.empty(3, 12, 8)
        expected_probs = torch.zeros(3, 12, 4)
        for task in range(3):
            support = model.backbone(batch.support_x[task])
            query = model.backbone(batch.query_x[task])
            for q in range(12):
                similarities = torch.stack([F.cosine_similarity(query[q], s, dim=0) for s in support])
                weights = torch.softmax(2.0 * similarities, dim=0)
                expected_attention[task, q] = weights
                for i in range(8):
                    expected_probs[task, q, batch.support_y[task, i]] += weights[i]
    torch.testing.assert_close(model.attention(batch).detach(), expected_attention, rtol=1e-5, atol=1e-6)
    # forward() is the log of the attention-weighted one-hot labels.
    torch.testing.assert_close(log_probs.detach(), expected_probs.log(), rtol=1e-5, atol=1e-5)


def test_matchingnet_fce_shapes_gradients_and_query_independence():
    torch.manual_seed(0)
    model = MatchingNet(FlatLinear(12, 6), fce=True, fce_steps=3)
    # The LSTMs are sized from the backbone's output_shape.
    assert model.support_lstm.input_size == 6 and model.query_lstm.hidden_size == 6
    batch = random_episodes()
    log_probs = model(batch)
    assert log_probs.shape == (3, 4 * 3, 4)
    # Probabilities over the N classes sum to one.
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 12), rtol=0, atol=1e-5)
    model.query_losses(log_probs, batch).mean().backward()
    for name in ("support_lstm.weight_ih_l0", "support_lstm.weight_ih_l0_reverse", "query_lstm.weight_ih"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name

    # Changing every query but the first leaves the first query's prediction as it was.
    changed = batch.query_x.clone()
    changed[:, 1:] = torch.randn_like(changed[:, 1:])
    again = model(TaskBatch(batch.support_x, batch.support_y, changed, batch.query_y))
    torch.testing.assert_close(again[:, 0], log_probs[:, 0], rtol=1e-5, atol=1e-6)


def test_matchingnet_learns_hidden_clusters():
    L.seed_everything(0, workers=True, verbose=False)
    data, labels = hidden_clusters()
    datamodule = EpisodicDataModule(
        data, labels, ways=5, shots=1, queries=5, test_queries=15,
        meta_batch_size=8, train_tasks=800, test_tasks=100, num_workers=0,
    )
    before, after = fit_and_test(MatchingNet(nn.Linear(32, 16), optimizer=adam(1e-2)), datamodule, steps=100)
    assert before["test/acc"] < 0.3  # chance 0.2 (measured 0.21)
    assert after["test/acc"] > 0.2 + 0.6  # measured 0.96


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MatchingNet(nn.Identity(), scale=-1.0), "scale must be positive, got -1.0"),
        (lambda: MatchingNet(FlatLinear(12, 6), fce=True, fce_steps=0), "fce_steps must be at least 1, got 0"),
        # Without an output shape the LSTMs cannot be sized: the message says what to add.
        (lambda: MatchingNet(nn.Linear(12, 6), fce=True), r"Linear does not say its output shape.*`output_shape`"),
    ],
)
def test_bad_hyperparameters_raise_value_errors_that_name_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_matchingnet_kanji_config_builds_and_runs_on_kanji_shapes():
    model = config_model("matchingnet_kanji")
    assert model(kanji_shaped_episodes()).shape == (1, 5 * 2, 5)
