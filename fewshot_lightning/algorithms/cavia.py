"""CAVIA (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson, "Fast Context Adaptation via Meta-Learning", ICML 2019)."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..inner import Forward, Params, functional
from .maml import MAML, refuse

CONTEXT = "context"


class CAVIA(MAML):
    """CAVIA: adapt only a context vector fed to the network; meta-learn the network's weights.

    Every task starts from a context of zeros and takes ``inner_steps`` gradient steps on it
    (its support loss, through the whole network); the network's weights are shared by all
    tasks and untouched by the inner loop. The outer loop trains the weights on the query loss
    of the adapted contexts, second order through the context updates by default
    (``first_order=True`` drops that). Being :class:`MAML` with a different adapted
    tensor, it keeps MAML's batching over tasks, adaptation curve at test time, per-step and
    learnable inner rates (on the context) and MAML++ schedules.

    The backbone must take the context as ``forward(x, context=...)`` and name its size in a
    ``context_dim`` attribute: :class:`~fewshot_lightning.models.ContextMLP` (concatenated to the
    input, for regression) or :class:`~fewshot_lightning.models.FiLMConv4` (FiLM on conv
    blocks, for images).

    Args:
        backbone: a context-conditioned network, as above.
        inner_lr: inner step size on the context (paper: 1.0).
        **kwargs: :class:`MAML`'s other arguments (``inner_steps``, ``test_inner_steps``,
            ``first_order``, ``learn_inner_lr``, ``per_step_lr``, ``per_parameter_lr``,
            ``batching``, ``optimizer``, ``lr_scheduler``, ``multi_step_loss_steps``,
            ``first_order_steps``); ``adapt`` is refused (the context is what adapts).

    Example (the paper's sinusoid setting: 5 context parameters, MLP 40-40, one step of 1.0)::

        import lightning as L
        from fewshot_lightning.algorithms import CAVIA
        from fewshot_lightning.data import SinusoidDataModule
        from fewshot_lightning.models import ContextMLP

        model = CAVIA(ContextMLP(context_dim=5), inner_lr=1.0, inner_steps=1, test_inner_steps=10)
        L.Trainer(max_steps=2000).fit(model, SinusoidDataModule(shots=10, meta_batch_size=25))
    """

    def __init__(self, backbone: nn.Module, inner_lr: float = 1.0, **kwargs: Any) -> None:
        refuse(type(self).__name__, kwargs, {"adapt": None}, "only the context adapts")
        context_dim = getattr(backbone, "context_dim", None)
        if not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(
                f"CAVIA needs a backbone that takes forward(x, context=...) and has an integer context_dim; "
                f"{type(backbone).__name__} has context_dim={context_dim!r}. Use models.ContextMLP or models.FiLMConv4."
            )
        try:
            parameters = inspect.signature(backbone.forward).parameters
        except (TypeError, ValueError):  # no signature to read: left to the first step
            parameters = {"context": None}
        takes_context = "context" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values() if p is not None)
        if not takes_context:
            raise ValueError(
                f"CAVIA needs a backbone that takes forward(x, context=...); {type(backbone).__name__}.forward takes "
                f"({', '.join(parameters)}). Use models.ContextMLP or models.FiLMConv4, or add the context argument.")
        super().__init__(backbone, inner_lr=inner_lr, **kwargs)

    def adapted_shapes(self, backbone: nn.Module, adapt: Optional[Sequence[str]]) -> Dict[str, torch.Size]:
        """One adapted tensor: the context, ``[context_dim]`` per task."""
        return {CONTEXT: torch.Size([backbone.context_dim])}

    def initial_params(self, tasks: int, detach: bool = False) -> Params:
        """A zero context for each of ``tasks`` tasks, ``[tasks, context_dim]``: reset for every task."""
        weight = next(self.backbone.parameters())
        return {CONTEXT: weight.new_zeros(tasks, self.backbone.context_dim)}

    def functional(self, batching: Optional[str] = None, memory_format: Optional[str] = None) -> Forward:
        """The backbone as ``forward({"context": c}, x)``: every weight shared, the context per task."""
        batching, memory_format = self.execution(batching, memory_format)
        return functional(
            self.backbone, dict(self.backbone.named_parameters()), buffers=self.pass_buffers(), batching=batching,
            keyword_params=[CONTEXT], memory_format=memory_format,
        )
