"""Episodic evaluation: the mean of a per-episode score with its 95% confidence interval."""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanConfidenceInterval(Metric):
    """Mean of per-episode values and the half-width of its 95% confidence interval.

    ``compute()`` returns ``(mean, ci95)`` with ``ci95 = 1.96 * s / sqrt(n)``, ``s`` the sample
    standard deviation over the ``n`` episodes: the figure few-shot papers report as
    ``mean ± ci95`` over 600 test episodes. Sums are reduced across processes, so under DDP
    every rank reports the interval over all episodes of all ranks.

    ``size > 1`` tracks a vector per episode (``update`` takes ``[n, size]``), e.g. the query
    score after each inner step of an adaptation curve; ``compute()`` then returns two
    ``[size]`` tensors.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, size: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}.")
        self.size = size
        shape = () if size == 1 else (size,)
        self.add_state("total", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    _STATES = ("total", "total_sq", "count")

    def _apply(self, fn: Callable, exclude_state=()) -> "MeanConfidenceInterval":
        """Moves the sums with the module, but keeps them float64: Lightning's ``bf16-true`` and
        ``16-true`` precisions convert the whole module (``module.to(dtype)``), which made the
        sums bfloat16, where an episode count stops at 256 and a mean over 600 episodes was off
        by 0.25 (a test reported 0.60 for a model scoring 0.35)."""
        this = super()._apply(fn, exclude_state=tuple(exclude_state) + self._STATES)
        device = fn(torch.zeros(1, device=self.total.device)).device
        # MPS has no float64: there the sums are float32, still never the 16-bit types.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        for name in self._STATES:
            if name in exclude_state:
                continue
            this._defaults[name] = this._defaults[name].to(device=device, dtype=dtype)
            setattr(this, name, getattr(this, name).to(device=device, dtype=dtype))
        return this

    def of_size(self, size: int, device: torch.device) -> "MeanConfidenceInterval":
        """This metric, or a new one on ``device`` tracking ``size`` values per episode where
        this one tracks another number (an adaptation curve whose step count was changed since
        the learner was built), made outside inference mode (its states are updated outside it)."""
        if self.size == size:
            return self
        with torch.inference_mode(False):
            return MeanConfidenceInterval(size=size).to(device)

    def update(self, values: Tensor) -> None:
        values = values.detach().double().reshape(-1, self.size)
        self.total += values.sum(0).reshape(self.total.shape)
        self.total_sq += values.square().sum(0).reshape(self.total.shape)
        self.count += values.shape[0]

    def compute(self) -> Tuple[Tensor, Tensor]:
        n = self.count
        mean = self.total / n
        if n < 2:
            return mean.float(), torch.full_like(mean, float("nan")).float()
        variance = ((self.total_sq - n * mean * mean) / (n - 1)).clamp_min(0.0)
        return mean.float(), (1.96 * variance.sqrt() / math.sqrt(float(n))).float()
