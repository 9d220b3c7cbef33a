"""``torch.compile`` of a backbone built from our layers (``ConvBlock``: batch norm with its own
double backward, max-pooling that keeps only its indices). Those are Python autograd Functions
with checks the compiler cannot trace: under compilation they step aside for ``F.batch_norm``
and ``F.max_pool2d``, so a compiled ``Conv4`` traces as one graph (it broke into twenty, and
inductor failed on it with torch 2.14), and computes what the eager module computes. And
``trainer.fit(torch.compile(learner))``: a learner that differentiates its inner gradient (second
order) is refused before it runs, one that does not trains."""
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
    torch._dynamo.reset()
    try:  # inductor's own toolchain (a C++ compiler, Python's headers), on something trivial
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as error:  # noqa: BLE001 -- any failure here is the machine's, not ours
        pytest.skip(f"inductor cannot compile on this machine: {type(error).__name__}")
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


def sinusoid_fit(model, steps=2):
    import lightning as L

    from fewshot_lightning.data import SinusoidDataModule

    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, SinusoidDataModule(meta_batch_size=4, train_tasks=40, num_workers=0))
    return trainer


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("learner,when", [("MAML", "at its first training step"),
                                          ("MAMLPlusPlus", "at step 3, when first_order_steps=3")])
def test_a_compiled_second_order_learner_is_refused_before_it_runs(learner, when):
    # trainer.fit(torch.compile(module)) compiles forward; its AOTAutograd backward cannot be
    # differentiated again, so second-order MAML stopped with PyTorch's "does not currently
    # support double backward", and MAML++ only when its first-order steps ended. Now the fit
    # stops before a step, saying when it would have failed and what to do.
    from fewshot_lightning import algorithms
    from fewshot_lightning.models import MLP

    kwargs = {"first_order_steps": 3} if learner == "MAMLPlusPlus" else {}
    model = getattr(algorithms, learner)(MLP(), inner_lr=0.01, **kwargs)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=rf"{learner} differentiates its inner loop's gradient.*torch\.compile.*"
                                         rf"{when}.*first_order=True"):
        sinusoid_fit(torch.compile(model, backend="aot_eager"))
    assert model.global_step == 0


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("learner", ["first-order MAML", "first-order CAVIA", "Reptile", "iMAML"])
def test_compiled_learners_that_differentiate_once_train_as_the_eager_ones(learner):
    # Lightning compiles forward and the step methods; these learners never differentiate a
    # compiled backward again, so they train, and to the eager run's weights (same seed, same
    # tasks; float rounding of the compiled graphs only).
    import lightning as L

    from fewshot_lightning.algorithms import CAVIA, MAML, Reptile, iMAML
    from fewshot_lightning.models import MLP, ContextMLP

    def build():
        torch.manual_seed(0)
        return {"first-order MAML": lambda: MAML(MLP(), inner_lr=0.01, first_order=True),
                "first-order CAVIA": lambda: CAVIA(ContextMLP(), inner_lr=0.01, first_order=True),
                "Reptile": lambda: Reptile(MLP(), inner_lr=0.01),
                "iMAML": lambda: iMAML(MLP(), inner_lr=0.01)}[learner]()

    eager, model = build(), build()
    before = [p.detach().clone() for p in model.parameters()]
    L.seed_everything(0)
    sinusoid_fit(eager)
    torch._dynamo.reset()
    L.seed_everything(0)
    trainer = sinusoid_fit(torch.compile(model, backend="aot_eager"))
    assert trainer.global_step == 2 and not model.differentiates_inner_gradient()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it trained
    for compiled_p, eager_p in zip(model.parameters(), eager.parameters()):
        assert torch.allclose(compiled_p, eager_p, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_compiled_maml_rl_is_refused_in_second_order_and_trains_in_first():
    # Lightning compiles the module's training_step too, so MAML-RL's second-order step stopped
    # at its first outer backward with PyTorch's "compiled with non-empty donated buffers which
    # requires create_graph=False". Now the fit stops before a step, as MAML's does; first order
    # trains compiled.
    import lightning as L

    from fewshot_lightning.algorithms import MAMLRL
    from fewshot_lightning.rl import GaussianMLPPolicy, NavigationDataModule, PointNavigation

    def fit(module):
        trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, NavigationDataModule(meta_batch_size=2, train_tasks=4, val_tasks=2, test_tasks=2))
        return trainer

    def learner(first_order):
        torch.manual_seed(0)
        return MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), trajectories=2,
                      first_order=first_order)

    second = learner(first_order=False)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"MAMLRL differentiates its inner loop's gradient.*torch\.compile.*"
                                         r"at its first training step.*first_order=True"):
        fit(torch.compile(second, backend="aot_eager"))
    assert second.global_step == 0
    first = learner(first_order=True)
    before = [p.detach().clone() for p in first.parameters()]
    torch._dynamo.reset()
    # One batch; MAML-RL takes outer_steps optimizer steps on it (manual optimization).
    assert fit(torch.compile(first, backend="aot_eager")).global_step == first.outer_steps
    assert any(not torch.equal(a, p) for a, p in zip(before, first.parameters()))
    assert all(torch.isfinite(p).all() for p in first.parameters())
