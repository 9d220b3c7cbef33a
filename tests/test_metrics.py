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
