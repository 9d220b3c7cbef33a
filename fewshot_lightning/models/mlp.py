"""Fully connected network; the 1-40-40-1 ReLU net of MAML's sinusoid experiments by default."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .blocks import DetachableHead, check_widths


class MLP(DetachableHead, nn.Module):
    """``in_features -> hidden... -> out_features`` with ReLU between layers.

    The last layer is ``head``. Defaults give the sinusoid regressor of Finn et al.,
    "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks" (ICML 2017).
    Inputs may carry any number of leading dimensions (it has no batch statistics, so tasks in
    a batch never affect one another).

    Attributes:
        output_shape: ``(out_features,)``, the shape of one sample's output.
        input_shape: ``(in_features,)``, the shape of one sample's input (``input_arguments``
            names the argument behind it).
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        check_widths("MLP", in_features=in_features, out_features=out_features,
                     **{f"hidden[{index}]": size for index, size in enumerate(hidden)})
        layers = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        self.output_shape: Tuple[int, ...] = (out_features,)
        self.input_shape: Tuple[int, ...] = (in_features,)
        self.input_arguments: Tuple[str, ...] = ("in_features",)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return features if self._headless else self.head(features)

    def forward_tasks_supported(self) -> bool:
        """Whether :meth:`forward_tasks` computes ``forward``: while the layers are linear ones
        and element-wise activations (a layer acting across samples or features, such as
        ``Softmax(dim=1)``, would see ``[T, M, F]`` there where ``forward`` gives it ``[M, F]``)."""
        return type(self.head) is nn.Linear and all(
            type(layer) is nn.Linear or type(layer) in ELEMENTWISE for layer in self.features)

    def forward_tasks(self, params: Dict[str, Tensor], x: Tensor) -> Tensor:
        """The outputs of every task under its own parameters, in one batched matrix product
        per layer: ``params`` holds every parameter, per task with a leading task dimension
        ``[T, ...]`` or shared by all tasks as the module holds it; ``x`` is
        ``[T, M, in_features]``; returns ``[T, M, out_features]``.

        The same function as ``forward`` under ``torch.func.vmap``, in about a twelfth of the
        operations (vmap turns each linear layer into some ten), which is most of a sinusoid
        MAML step's time; :func:`~fewshot_lightning.inner.functional` uses it.
        """
        # Samples may have leading dimensions of their own (``forward`` takes any): one per row here.
        hidden = x.reshape(x.shape[0], -1, x.shape[-1])
        layers = [(f"features.{i}", layer) for i, layer in enumerate(self.features)]
        if not self._headless:
            layers.append(("head", self.head))
        for name, layer in layers:
            if isinstance(layer, nn.Linear):
                weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
                if weight.dim() == 2:  # shared: the same for every task, an expand view
                    weight = weight.expand(x.shape[0], *weight.shape)
                if bias is None:  # nn.Linear(..., bias=False)
                    hidden = torch.bmm(hidden, weight.transpose(1, 2))
                    continue
                if bias.dim() == 1:
                    bias = bias.expand(x.shape[0], *bias.shape)
                hidden = torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2))
            elif (layer._parameters or layer._modules) and next(layer.parameters(), None) is not None:
                # (the first test keeps this free for the activations, met at every call)
                raise ValueError(
                    f"MLP.forward_tasks runs nn.Linear layers and parameter-free ones (activations), but {name!r} is a "
                    f"{type(layer).__name__} with parameters of its own: give the learner batching='loop', or a backbone "
                    f"of your own without forward_tasks (torch.func.vmap then batches its forward).")
            else:
                hidden = layer(hidden)
        return hidden.reshape(*x.shape[:-1], hidden.shape[-1])


#: Parameter-free layers that act on each element alone, as :meth:`MLP.forward_tasks` may run them.
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
               nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign,
               nn.Identity, nn.Dropout)
