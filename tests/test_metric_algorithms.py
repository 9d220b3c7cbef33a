"""Metric-based (ProtoNet, MatchingNet, RelationNet) and model-based (AttentionLearner, CNP)
learners: their maths against independent loop implementations, their invariances, and short
fits that must beat chance by a stated margin. Tiny backbones on synthetic data keep it fast."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser
from torch import nn

from fewshot_lightning.data import scale_images
from fewshot_lightning.algorithms import CNP, AttentionLearner, MatchingNet, MetaLearner, ProtoNet, RelationNet
from fewshot_lightning.algorithms.blackbox import episode_attention_mask
from fewshot_lightning.cli import main as cli_main
from fewshot_lightning.data import EpisodicDataModule, SinusoidDataModule, TaskBatch
from fewshot_lightning.models import MLP, RelationEmbedding

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread buys nothing but contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def flat_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features))


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


# -- ProtoNet -------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_logits_match_a_loop_over_tasks_queries_and_classes(distance):
    torch.manual_seed(0)
    model = ProtoNet(flat_linear(12, 6), distance=distance)
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
    model = ProtoNet(flat_linear(12, 6))
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


# -- MatchingNet ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fce", [False, True])
def test_matchingnet_attention_is_a_distribution_over_the_support_set(fce):
    torch.manual_seed(0)
    model = MatchingNet(flat_linear(12, 6), fce=fce, fce_steps=3, embedding_dim=6)
    batch = random_episodes()
    attention = model.attention(batch)
    assert attention.shape == (3, 4 * 3, 4 * 2)  # [B, N*Q, N*K]
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 12), rtol=0, atol=1e-5)


def test_matchingnet_without_fce_is_softmax_cosine_attention_over_support_labels():
    torch.manual_seed(0)
    model = MatchingNet(flat_linear(12, 6), scale=2.0)
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
    model = MatchingNet(flat_linear(12, 6), fce=True, fce_steps=3, embedding_dim=6)
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


# -- RelationNet ----------------------------------------------------------------------------------
def test_relationnet_scores_in_unit_interval_and_pair_each_query_with_summed_class_maps():
    torch.manual_seed(0)
    # 16x16 images -> 8 x 4 x 4 maps; the relation module pools 4 -> 2 -> 1. Running statistics
    # in eval mode make the embedding per-sample, so the loop below may embed task by task.
    embedding = RelationEmbedding(in_channels=1, hidden=8, track_running_stats=True)
    model = RelationNet(embedding, feature_channels=8, feature_size=4, relation_channels=8, relation_hidden=4).eval()
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
        # One call on all pairs in (task, query, class) order: the relation module's batch norm
        # (no running statistics) then sees the same batch as in forward().
        expected = torch.sigmoid(model.relation(torch.stack(pairs))).view(2, 6, 3)
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_relationnet_losses_against_one_hot_targets(loss):
    torch.manual_seed(0)
    model = RelationNet(RelationEmbedding(hidden=8), feature_channels=8, feature_size=4,
                        relation_channels=8, relation_hidden=4, loss=loss)
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


def test_relationnet_names_a_feature_map_mismatch():
    model = RelationNet(RelationEmbedding(hidden=8), feature_channels=8, feature_size=7)
    batch = random_episodes(tasks=1, ways=2, shots=1, queries=1, x_shape=(1, 16, 16))
    with pytest.raises(ValueError, match=r"\[8, 7, 7\].*\[8, 4, 4\]"):
        model(batch)


# -- AttentionLearner (black box) -----------------------------------------------------------------
def small_attention_learner(in_features: int = 12, **kwargs) -> AttentionLearner:
    sizes = dict(ways=5, embedding_dim=32, model_dim=32, heads=4, layers=2, feedforward_dim=64)
    return AttentionLearner(flat_linear(in_features, 32), **{**sizes, **kwargs})


def test_attention_mask_lets_queries_see_the_support_set_and_themselves_only():
    blocked = episode_attention_mask(support=2, queries=2, device=torch.device("cpu"))
    expected = torch.tensor([
        [False, False, True, True],    # support tokens: support only
        [False, False, True, True],
        [False, False, False, True],   # query 1: support + itself
        [False, False, True, False],   # query 2: support + itself
    ])
    assert torch.equal(blocked, expected)


def test_attention_learner_is_invariant_to_support_order_and_blind_to_other_queries():
    torch.manual_seed(0)
    model = small_attention_learner().eval()
    batch = random_episodes(ways=5)
    with torch.no_grad():
        logits = model(batch)
        assert logits.shape == (3, 5 * 3, 5)
        # No positional encoding: attention sums over the support set, so only float rounding differs.
        torch.testing.assert_close(model(permute_support(batch)), logits, rtol=1e-5, atol=1e-5)
        changed = batch.query_x.clone()
        changed[:, 1:] = torch.randn_like(changed[:, 1:])
        again = model(TaskBatch(batch.support_x, batch.support_y, changed, batch.query_y))
        torch.testing.assert_close(again[:, 0], logits[:, 0], rtol=1e-5, atol=1e-5)


def test_attention_learner_takes_fewer_ways_than_it_was_built_for_but_not_more():
    torch.manual_seed(0)
    model = small_attention_learner(ways=5)
    assert model(random_episodes(ways=3)).shape == (3, 3 * 3, 3)
    with pytest.raises(ValueError, match="6 classes.*ways=5"):
        model(random_episodes(ways=6))


def test_attention_learner_learns_gaussian_clusters():
    L.seed_everything(0, workers=True, verbose=False)
    # Plain clusters (no noise dimensions): the black box must learn to match a query to the
    # support token of its class and copy that token's label, with no built-in metric to help.
    data, labels = hidden_clusters(signal_dim=16, noise_dim=0)
    datamodule = EpisodicDataModule(
        data, labels, ways=5, shots=1, queries=5, test_queries=15,
        meta_batch_size=16, train_tasks=16 * 150, test_tasks=100, num_workers=0,
    )
    model = small_attention_learner(in_features=16, optimizer=adam(3e-3))
    before, after = fit_and_test(model, datamodule, steps=150)
    assert before["test/acc"] < 0.3  # chance 0.2 (measured 0.21)
    assert after["test/acc"] > 0.2 + 0.6  # measured 0.99


# -- CNP ------------------------------------------------------------------------------------------
def sinusoid_batch(tasks=4, shots=10, queries=7, seed=0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand(tasks, 1, 1, generator=generator)
    phase = math.pi * torch.rand(tasks, 1, 1, generator=generator)
    support_x = 10 * torch.rand(tasks, shots, 1, generator=generator) - 5
    query_x = 10 * torch.rand(tasks, queries, 1, generator=generator) - 5
    support_y, query_y = amplitude * torch.sin(support_x - phase), amplitude * torch.sin(query_x - phase)
    return TaskBatch(support_x, support_y, query_x, query_y)


def small_cnp(**kwargs) -> CNP:
    return CNP(MLP(2, (32, 32), 32), representation_dim=32, decoder_hidden=(32, 32), **kwargs)


def test_cnp_shapes_context_order_invariance_and_gaussian_nll():
    torch.manual_seed(0)
    model = small_cnp()
    batch = sinusoid_batch()
    outputs = model(batch)
    assert outputs.shape == (4, 7, 1, 2)  # [B, Q, *y, (mean, sigma)]
    assert model.point_predictions(outputs).shape == batch.query_y.shape
    # Mean aggregation: the context order changes only float summation order.
    torch.testing.assert_close(model(permute_support(batch)), outputs, rtol=1e-5, atol=1e-6)

    mean, sigma = outputs[..., 0], outputs[..., 1]
    expected = -torch.distributions.Normal(mean, sigma).log_prob(batch.query_y).flatten(1).mean(1)
    torch.testing.assert_close(model.query_losses(outputs, batch), expected, rtol=1e-5, atol=1e-5)


def test_cnp_sigma_is_at_least_its_floor_even_for_extreme_decoder_outputs():
    model = small_cnp()
    with torch.no_grad():
        model.decoder.head.bias.fill_(-1e4)  # raw sigma -> -inf: softplus -> 0, sigma -> 0.1
        low = model(sinusoid_batch())[..., 1]
        model.decoder.head.bias.fill_(0.0)
        typical = model(sinusoid_batch())[..., 1]
    torch.testing.assert_close(low, torch.full_like(low, 0.1))
    # Near raw = 0: 0.1 + 0.9 * softplus(0) = 0.1 + 0.9 * ln 2 ~ 0.72; always above 0.1.
    assert (typical > 0.1).all()


def test_cnp_learns_sinusoids():
    L.seed_everything(0, workers=True, verbose=False)
    datamodule = SinusoidDataModule(shots=10, queries=10, meta_batch_size=16, train_tasks=16 * 600, test_tasks=100)
    before, after = fit_and_test(small_cnp(optimizer=adam(3e-3)), datamodule, steps=600)
    # The targets' variance is E[A^2] / 2 = (5^3 - 0.1^3) / (3 * 4.9) / 2 ~ 4.25, about what an
    # untrained CNP scores (measured 3.78). After 600 steps it reads amplitude and phase off the
    # context: measured 0.85 (± 0.24), asserted below 1.5 (about a third of the variance).
    assert before["test/mse"] > 2.5
    assert after["test/mse"] < 1.5


# -- hyperparameters, configs ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ProtoNet(nn.Identity(), distance="manhattan"), r"\('euclidean', 'cosine'\).*'manhattan'"),
        (lambda: ProtoNet(nn.Identity(), distance="cosine", scale=0.0), "scale must be positive, got 0.0"),
        (lambda: MatchingNet(nn.Identity(), scale=-1.0), "scale must be positive, got -1.0"),
        (lambda: MatchingNet(nn.Identity(), fce=True, fce_steps=0), "fce_steps must be at least 1, got 0"),
        (lambda: RelationNet(nn.Identity(), loss="l1"), r"\('mse', 'bce'\).*'l1'"),
        (lambda: RelationNet(nn.Identity(), feature_size=3), "feature_size 3 is too small"),
        (lambda: small_attention_learner(heads=3), "heads=3 and model_dim=32"),
        (lambda: CNP(nn.Identity(), x_dim=0), "x_dim must be at least 1, got 0"),
    ],
)
def test_bad_hyperparameters_raise_value_errors_that_name_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "name", ["protonet_kanji", "matchingnet_kanji", "relationnet_kanji", "blackbox_kanji", "cnp_sinusoid"]
)
def test_config_models_build_and_run_on_their_benchmark_shapes(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(MetaLearner, "model")
    # ``instantiate`` replaced ``instantiate_classes`` in jsonargparse 4.49; older versions have only the latter.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    model = instantiate(parser.parse_object({"model": config["model"]})).model
    if name.startswith("cnp"):
        batch = sinusoid_batch(tasks=1)
        assert model(batch).shape == (1, 7, 1, 2)
    else:
        # Kanji as the configs assume it: 1 x 28 x 28 images, 5-way 1-shot (2 queries to stay fast).
        batch = random_episodes(tasks=1, ways=5, shots=1, queries=2, x_shape=(1, 28, 28))
        assert model(batch).shape == (1, 5 * 2, 5)


def test_cnp_sinusoid_config_fits_through_the_cli(tmp_path):
    cli_main([
        "fit", "--config", str(CONFIGS / "cnp_sinusoid.yaml"), "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.val_tasks", "25",
    ])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
