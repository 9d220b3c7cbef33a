"""The episodic mean and 95% confidence interval."""
import math

import pytest
import torch

from fewshot_lightning.metrics import MeanConfidenceInterval


def test_mean_and_interval_match_the_textbook_formula():
    values = torch.tensor([0.2, 0.6, 0.8, 1.0, 0.4, 0.6])
    metric = MeanConfidenceInterval()
    metric.update(values[:2])  # in pieces, as evaluation batches arrive
    metric.update(values[2:])
    mean, ci95 = metric.compute()
    # Sample standard deviation (n - 1) of these six values is sqrt(0.08) = 0.2828...
    assert float(mean) == pytest.approx(0.6)
    assert float(ci95) == pytest.approx(1.96 * math.sqrt(0.08) / math.sqrt(6), rel=1e-6)


def test_interval_shrinks_with_the_square_root_of_the_episode_count():
    torch.manual_seed(0)
    few, many = MeanConfidenceInterval(), MeanConfidenceInterval()
    values = torch.rand(6000)
    few.update(values[:600])
    many.update(values)
    # Ten times the episodes: the interval narrows by about sqrt(10) = 3.16.
    ratio = float(few.compute()[1] / many.compute()[1])
    assert 2.8 < ratio < 3.5


def test_single_value_has_no_interval():
    metric = MeanConfidenceInterval()
    metric.update(torch.tensor([0.5]))
    mean, ci95 = metric.compute()
    assert float(mean) == 0.5 and math.isnan(float(ci95))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sums_stay_float64_when_the_module_is_converted(dtype):
    # Lightning's bf16-true and 16-true precisions convert the whole module with .to(dtype); the
    # sums became 16-bit, where a count stops at 256 (bfloat16) and a 600-episode mean was off
    # by 0.25. They stay float64 and count every episode.
    metric = MeanConfidenceInterval().to(dtype)
    assert metric.total.dtype == metric.total_sq.dtype == metric.count.dtype == torch.float64
    values = torch.linspace(0.0, 1.0, 600, dtype=dtype)
    for chunk in values.split(1):
        metric.update(chunk)
    mean, ci95 = metric.compute()
    assert metric.count.item() == 600
    exact = values.double()
    assert mean.item() == pytest.approx(exact.mean().item(), abs=1e-6)
    assert ci95.item() == pytest.approx(1.96 * exact.std().item() / math.sqrt(600), rel=1e-5)
    metric.reset()  # the defaults it resets to were converted too
    assert metric.total.dtype == metric.count.dtype == torch.float64
