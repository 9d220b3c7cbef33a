"""``torch.compile`` of a backbone built from our layers (``ConvBlock``: batch norm with its own
double backward, max-pooling that keeps only its indices). Those are Python autograd Functions
with checks the compiler cannot trace: under compilation they step aside for ``F.batch_norm``
and ``F.max_pool2d``, so a compiled ``Conv4`` traces as one graph (it broke into twenty, and
inductor failed on it with torch 2.14), and computes what the eager module computes."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from fewshot_lightning.models import Conv4
from fewshot_lightning.models.max_pool import max_pool2d


def conv4_batch():
    torch.manual_seed(0)
    net = Conv4(in_channels=1, hidden=16, image_size=28, out_features=5)  # training mode: batch statistics
    x = torch.randn(10, 1, 28, 28)
    y = torch.randint(0, 5, (10,))
    return net, x, y


def test_a_conv4_in_training_mode_traces_as_one_graph():
    net, x, _ = conv4_batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x)
    # Our Functions' checks (a torch.func wrapper test the compiler cannot trace) broke the
    # graph at every batch norm and pooling: 19 breaks, 20 graphs.
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # Outside compilation our layers are used as before.
    probe = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert "_MaxPool2d" in type(max_pool2d(probe * 1, 2).grad_fn).__name__


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor compiles C++ on the CPU: no compiler here")
def test_a_compiled_conv4_trains_as_the_eager_one():
    net, x, y = conv4_batch()

    def loss_and_gradients(model):
        loss = F.cross_entropy(model(x), y)
        return loss, torch.autograd.grad(loss, list(net.parameters()))

    loss, grads = loss_and_gradients(net)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = loss_and_gradients(torch.compile(net))  # inductor, the default
    assert torch.allclose(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, grads):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert sum(g.abs().sum() for g in grads) > 0
