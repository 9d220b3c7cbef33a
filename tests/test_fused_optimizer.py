"""The outer optimizer runs fused where its implementation was left to us (algorithms.base.fused_if_unset)."""
import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import fused_if_unset
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP


def trained(optimizer, steps=10):
    L.seed_everything(0, verbose=False)
    model = MAML(MLP(), inner_lr=0.01, batching="vmap", optimizer=optimizer)
    data = SinusoidDataModule(meta_batch_size=5, train_tasks=5 * steps, num_workers=0)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return model, trainer.optimizers[0]


@pytest.mark.parametrize("name, options", [("Adam", {"lr": 1e-3}), ("AdamW", {"lr": 1e-3, "weight_decay": 0.1}),
                                           ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True})])
def test_the_fused_update_is_the_same_update(name, options):
    # Ten MAML steps with the default (fused) against the same optimizer told to loop over the
    # tensors (foreach=False, left as the user set it): the same weights to float32 rounding.
    cls = getattr(torch.optim, name)
    fused_model, fused = trained(lambda params: cls(params, **options))
    looped_model, looped = trained(lambda params: cls(params, foreach=False, **options))
    assert fused.param_groups[0]["fused"] is True and looped.param_groups[0]["fused"] is None
    assert looped.param_groups[0]["foreach"] is False
    for key, value in options.items():
        assert fused.param_groups[0][key] == value
    moved = 0.0
    for a, b, start in zip(fused_model.parameters(), looped_model.parameters(), MLP().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((a - start).abs().max().detach()))
    assert moved > 1e-3  # the weights did move: the comparison is not of two untrained nets


def test_what_is_left_as_built():
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    # the user's choice of implementation, another class, a subclass, an optimizer with state
    for optimizer in (torch.optim.Adam(params, foreach=True), torch.optim.Adam(params, fused=False),
                      torch.optim.RMSprop(params), type("MyAdam", (torch.optim.Adam,), {})(params),
                      torch.optim.Adam(params, differentiable=True)):
        assert fused_if_unset(optimizer) is optimizer
    stepped = torch.optim.Adam(params)
    params[0].grad = torch.ones_like(params[0])
    stepped.step()
    assert fused_if_unset(stepped) is stepped
    # parameters no fused kernel takes (complex): torch would only fail at the first step
    complex_params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]
    plain = torch.optim.Adam(complex_params)
    assert fused_if_unset(plain) is plain
    complex_params[0].grad = torch.ones_like(complex_params[0])
    plain.step()


def test_groups_keep_their_own_options():
    a, b = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    optimizer = fused_if_unset(torch.optim.Adam([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.01))
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.01]
    assert all(group["fused"] is True for group in optimizer.param_groups)
    assert optimizer.param_groups[0]["params"][0] is a and optimizer.param_groups[1]["params"][0] is b


def test_not_under_a_16_bit_loss_scaler():
    # The GradScaler then keeps torch's default implementation, with which the non-finite
    # guard's skipped steps were tested (tests/test_nonfinite.py): fused, a skipped step
    # records no inf check and the scaler's update fails.
    from lightning.pytorch.plugins import MixedPrecision

    L.seed_everything(0, verbose=False)
    model = MAML(MLP(), inner_lr=0.01, batching="loop")
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    trainer.fit(model, SinusoidDataModule(meta_batch_size=2, train_tasks=4, num_workers=0))
    assert trainer.optimizers[0].param_groups[0]["fused"] is None


def test_not_where_gradients_are_clipped_under_mixed_precision():
    # Lightning's mixed precision refuses to clip the gradients of a fused optimizer: every config
    # that clips (cavia_kanji, mamlpp_sinusoid, maml_miniimagenet, ...) stopped at its first step
    # under bf16-mixed with a traceback ("does not allow for gradient clipping").
    from functools import partial

    def fit(precision, clip, optimizer=torch.optim.Adam):
        L.seed_everything(0, verbose=False)
        model = MAML(MLP(), inner_lr=0.01, batching="vmap", optimizer=optimizer)
        trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, precision=precision,
                            gradient_clip_val=clip)
        trainer.fit(model, SinusoidDataModule(meta_batch_size=2, train_tasks=4, num_workers=0))
        assert trainer.global_step == 2 and all(torch.isfinite(p).all() for p in model.parameters())
        return trainer.optimizers[0].param_groups[0]["fused"]

    assert fit("bf16-mixed", 1.0) is None  # torch's default implementation, which Lightning clips
    assert fit("bf16-mixed", None) is True  # no clipping: fused as in 32-bit
    assert fit("32-true", 1.0) is True  # 32-bit clips fused optimizers
    with pytest.raises(ValueError, match=r"The optimizer Adam is given fused=True, and the trainer clips gradients "
                                         r"\(gradient_clip_val 1.0\) under mixed precision \(bf16-mixed\).*drop fused"):
        fit("bf16-mixed", 1.0, partial(torch.optim.Adam, fused=True))
