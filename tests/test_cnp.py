"""CNP: shapes, context-order invariance and the Gaussian NLL; the sigma floor; a short fit on
sinusoids; the representation size read from the encoder; bad arguments; its config, also
through the CLI."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from learner_helpers import CONFIGS, adam, config_model, fit_and_test, permute_support, sinusoid_batch
from torch import nn

from fewshot_lightning.algorithms import CNP
from fewshot_lightning.cli import main as cli_main
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP


def small_cnp(**kwargs) -> CNP:
    return CNP(MLP(2, (32, 32), 32), decoder_hidden=(32, 32), **kwargs)


def test_cnp_shapes_context_order_invariance_and_gaussian_nll():
    torch.manual_seed(0)
    model = small_cnp()
    # The decoder reads [r; x]: r's 32 features come from the encoder's output_shape.
    assert model.decoder.features[0].in_features == 32 + 1
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


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CNP(MLP(2, (8,), 8), x_dim=0), "x_dim must be at least 1, got 0"),
        (lambda: CNP(nn.Linear(2, 8)), r"Linear does not say its output shape"),
    ],
)
def test_bad_hyperparameters_raise_value_errors_that_name_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_cnp_sinusoid_config_builds_and_runs_on_sinusoid_shapes():
    model = config_model("cnp_sinusoid")
    assert model(sinusoid_batch(tasks=1)).shape == (1, 7, 1, 2)


def test_cnp_sinusoid_config_fits_through_the_cli(tmp_path):
    cli_main([
        "fit", "--config", str(CONFIGS / "cnp_sinusoid.yaml"), "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.val_tasks", "25",
    ])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_training_conditions_on_a_random_subset_and_scores_every_point():
    # Garnelo et al. (2018), section 2.4: a random subset of N ~ U{1..n-1} of a task's n
    # observations is the context; the loss is the NLL of all n. Recomputed here task by task
    # from the same draws, with the context points picked out by index.
    import math

    torch.manual_seed(0)
    model = small_cnp()
    batch = sinusoid_batch(tasks=4, shots=5, queries=3)
    torch.manual_seed(1)
    losses, outputs = model.training_losses(batch)
    assert outputs is None and losses.shape == (4,)
    torch.manual_seed(1)
    n = 8
    sizes = torch.randint(1, n, (4, 1))
    ranks = torch.rand(4, n).argsort(1).argsort(1)
    assert set(sizes.flatten().tolist()) != {sizes[0, 0].item()}  # the tasks drew different sizes
    for task in range(4):
        x = torch.cat([batch.support_x[task], batch.query_x[task]])
        y = torch.cat([batch.support_y[task], batch.query_y[task]])
        chosen = (ranks[task] < sizes[task]).nonzero().flatten()
        assert 1 <= len(chosen) <= n - 1
        r = model.backbone(torch.cat([x[chosen], y[chosen]], -1)).mean(0)
        mean, raw = model.decoder(torch.cat([r.expand(n, -1), x], -1)).chunk(2, -1)
        sigma = 0.1 + 0.9 * torch.nn.functional.softplus(raw)
        nll = 0.5 * ((y - mean) / sigma) ** 2 + sigma.log() + 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(losses[task], nll.mean(), rtol=1e-5, atol=1e-6)


def test_support_training_context_scores_the_queries_given_the_support_set():
    torch.manual_seed(0)
    model = small_cnp(training_context="support")
    batch = sinusoid_batch()
    losses, outputs = model.training_losses(batch)
    torch.testing.assert_close(losses, model.query_losses(model(batch), batch))


def test_random_training_context_refuses_a_batch_norm_encoder():
    encoder = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
    encoder.output_shape = (8,)
    with pytest.raises(ValueError, match=r"batch norm in Sequential would normalise the context with the "
                                         r"statistics of targets .* or training_context='support'"):
        CNP(encoder)
    with pytest.raises(ValueError, match=r"training_context must be one of \['random', 'support'\], got 'all'"):
        small_cnp(training_context="all")
