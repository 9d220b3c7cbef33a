"""``bf16-mixed`` for every algorithm on the CPU, through the Trainer's precision flag: a few
training steps and a validation with tiny models, losses finite and close to fp32's.

Add a learner with one ``pytest.param`` line in ``LEARNERS``: a factory of a tiny model and the
kind of tasks it takes.
"""
import math

import lightning as L
import pytest
import torch

from cli_support import clustered_images
from learner_helpers import record_training_batches
from fewshot_lightning.algorithms import (
    ANIL, CAVIA, CNP, MAML, MAMLRL, AttentionLearner, MAMLPlusPlus, MatchingNet, MetaSGD, ProtoNet, RelationNet, Reptile,
    iMAML,
)
from fewshot_lightning.data import EpisodicDataModule, SinusoidDataModule
from fewshot_lightning.models import MLP, Conv4, FiLMConv4, RelationEmbedding
from fewshot_lightning.rl import GaussianMLPPolicy, NavigationDataModule, PointNavigation

STEPS = 3


def conv4(out_features=5):
    # Metric learners evaluate with running batch-norm statistics by default (the papers').
    return Conv4(hidden=8, out_features=out_features, image_size=16, track_running_stats=out_features is None)


LEARNERS = [
    pytest.param(lambda: MAML(conv4(), inner_lr=0.4, batching="vmap"), "images", id="MAML"),
    pytest.param(lambda: ANIL(conv4(), inner_lr=0.4, batching="vmap"), "images", id="ANIL"),
    pytest.param(lambda: MetaSGD(conv4(), inner_lr=0.4, batching="vmap"), "images", id="MetaSGD"),
    pytest.param(lambda: MAMLPlusPlus(conv4(), inner_lr=0.4, inner_steps=2, batching="vmap"), "images", id="MAMLPlusPlus"),
    pytest.param(lambda: Reptile(conv4(), inner_steps=2, test_inner_steps=2, batching="vmap"), "images", id="Reptile"),
    pytest.param(lambda: iMAML(conv4(), inner_steps=2, cg_steps=2, batching="vmap"), "images", id="iMAML"),
    pytest.param(lambda: iMAML(conv4(), inner_steps=2, cg_steps=2, inner_solver="hessian_free", batching="vmap"),
                 "images", id="iMAML-hessian-free"),
    pytest.param(lambda: CAVIA(FiLMConv4(hidden=8, image_size=16, context_dim=4), batching="vmap"), "images", id="CAVIA"),
    pytest.param(lambda: ProtoNet(conv4(None)), "images", id="ProtoNet"),
    pytest.param(lambda: MatchingNet(conv4(None)), "images", id="MatchingNet"),
    pytest.param(lambda: RelationNet(RelationEmbedding(hidden=8, image_size=16), relation_channels=8,
                                     relation_hidden=4), "images", id="RelationNet"),
    pytest.param(lambda: AttentionLearner(conv4(None), model_dim=32, heads=4, layers=1,
                                          feedforward_dim=32), "images", id="AttentionLearner"),
    pytest.param(lambda: CNP(MLP(2, (32, 32), 32), decoder_hidden=(32, 32)), "sinusoid",
                 id="CNP"),
]


def tasks(kind: str) -> L.LightningDataModule:
    if kind == "sinusoid":
        return SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_tasks=4 * STEPS, val_tasks=8)
    images, labels = clustered_images(classes=40, per_class=8, side=16, noise=0.6)
    return EpisodicDataModule(images, labels, ways=5, shots=1, queries=3, meta_batch_size=4,
                              train_tasks=4 * STEPS, val_tasks=8, num_workers=0)


def fp32_training_loss(model, batch) -> torch.Tensor:
    """The loss ``training_step`` returns, outside the Trainer: the mean of every learner's
    ``training_losses`` (MAML++'s multi-step sum and Reptile's distance included)."""
    return model.training_losses(batch)[0].mean()


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


@pytest.mark.parametrize("factory, kind", LEARNERS)
def test_bf16_mixed_trains_with_finite_losses_close_to_fp32(factory, kind):
    L.seed_everything(0, verbose=False)
    model, data = factory(), tasks(kind)
    data.setup("fit")
    first = next(iter(data.train_dataloader()))
    reference = float(fp32_training_loss(model, first))  # the same weights and batch

    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=STEPS, precision="bf16-mixed", accelerator="cpu", limit_val_batches=2,
                        num_sanity_val_steps=0, callbacks=[recorder], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)

    assert trainer.precision == "bf16-mixed"
    assert len(recorder.losses) == STEPS and all(math.isfinite(loss) for loss in recorder.losses)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation): through a few
    # layers the first loss stays within 2% of the fp32 loss of the same step (measured: 0.008% to
    # 0.3%). It must differ, though: the same CPU ops in fp32 would reproduce it exactly, so a
    # difference shows that autocast reached the computation.
    assert 0 < abs(recorder.losses[0] - reference) <= 0.02 * abs(reference), (recorder.losses[0], reference)
    # The weights stay fp32 (autocast casts copies) and finite after the optimizer steps.
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    metrics = trainer.callback_metrics
    if kind == "sinusoid":
        assert 0 < float(metrics["val/mse"]) < 50  # targets' second moment is ~4.2; an untrained net is near it
    else:
        assert 0 <= float(metrics["val/acc"]) <= 1
    assert math.isfinite(float(metrics["val/loss"]))


def test_bf16_mixed_meta_rl_trains_with_finite_losses_and_returns():
    """MAML-RL (manual optimization, rollouts in training_step) under the same flag. Its losses
    depend on sampled actions, which bf16 changes, so no comparison with fp32 here."""
    L.seed_everything(0, verbose=False)
    model = MAMLRL(GaussianMLPPolicy(hidden=(8, 8)), PointNavigation(horizon=10), trajectories=3, outer_steps=2,
                   test_inner_steps=1)
    data = NavigationDataModule(meta_batch_size=2, train_tasks=2 * STEPS, val_tasks=2, test_tasks=2)
    trainer = L.Trainer(max_epochs=1, precision="bf16-mixed", accelerator="cpu", limit_val_batches=1,
                        num_sanity_val_steps=0, log_every_n_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert trainer.precision == "bf16-mixed" and trainer.global_step == 2 * STEPS  # outer_steps per meta-iteration
    assert "train/loss" not in metrics  # zero by construction at the first outer step: not logged (maml_rl)
    # A return sums minus the distance to a goal in [-0.5, 0.5]^2 over at most 10 steps of at most
    # 0.1 from the origin: between -10 x (0.71 + 1.0) and 0.
    for name in ("train/return_pre", "train/return_post", "val/return_after_0_steps", "val/return_after_1_steps"):
        assert -17.1 < float(metrics[name]) <= 0, name
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())

# -- what README.md says about precision on the CPU; these fail if Lightning or PyTorch change it --
def test_16_mixed_on_the_cpu_warns_and_runs_bf16_mixed_without_a_scaler():
    with pytest.warns(UserWarning, match=r"fp16 is not supported on CPU. Using `precision='bf16-mixed'` instead"):
        trainer = L.Trainer(accelerator="cpu", precision="16-mixed", logger=False, enable_progress_bar=False)
    assert trainer.precision == "bf16-mixed"
    assert trainer.precision_plugin.scaler is None
    with trainer.precision_plugin.forward_context():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_autocast_does_not_reach_a_convolution_under_vmap_on_the_cpu():
    generator = torch.Generator().manual_seed(0)
    weights, images = torch.randn(2, 4, 3, 3, 3, generator=generator), torch.randn(2, 5, 3, 8, 8, generator=generator)
    convolve = torch.func.vmap(lambda w, x: torch.nn.functional.conv2d(x, w))
    exact = convolve(weights, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.conv2d(images[0], weights[0])
        vmapped = convolve(weights, images)
    assert plain.dtype == torch.bfloat16  # outside vmap autocast applies ...
    assert vmapped.dtype == torch.float32 and torch.equal(vmapped, exact)  # ... inside, the conv stays fp32


def test_autocast_reaches_conv4s_convolutions_on_the_batched_path(monkeypatch):
    # Conv4 batches tasks with its own forward_tasks (no torch.func.vmap), so under bf16-mixed
    # its convolutions run in bf16 on the CPU too, unlike a backbone run under vmap (above).
    from fewshot_lightning.inner import functional, task_params
    from fewshot_lightning.models import Conv4

    dtypes = []
    convolve = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: (lambda out: (dtypes.append(out.dtype), out)[1])(convolve(*a, **k)))
    model = Conv4(hidden=4, out_features=3)
    params = task_params(dict(model.named_parameters()), 2)
    x = torch.rand(2, 3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = functional(model, batching="vmap")(params, x)
    assert dtypes == [torch.bfloat16] * 4 and out.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("precision,dtype", [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
@pytest.mark.parametrize("learner", ["MAML", "ProtoNet"])
def test_true_precisions_see_images_in_their_dtype(precision, dtype, learner):
    # The DataModules keep images uint8 to the device and scale them after the transfer; the
    # trainer's precision converts a batch's floating tensors before it, when the images are
    # still uint8. So under 64-true or bf16-true the scaled float32 images met float64 or
    # bfloat16 weights ("Input type (float) and bias type (double) should be the same") and fit
    # stopped at its first step: the images now arrive in the precision's dtype, in train,
    # validation and test.
    images, labels = clustered_images(classes=40, per_class=8, side=16, noise=0.6)
    images = ((images - images.min()) / (images.max() - images.min()) * 255).to(torch.uint8)
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=3, meta_batch_size=4,
                              train_tasks=4 * STEPS, val_tasks=8, test_tasks=8, num_workers=0)
    model = MAML(conv4(), inner_lr=0.4, batching="vmap") if learner == "MAML" else ProtoNet(conv4(None))
    seen = record_training_batches(
        model, lambda batch: (batch.support_x.dtype, batch.query_x.dtype, batch.support_y.dtype))
    trainer = L.Trainer(max_steps=STEPS, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(model, data)
    assert trainer.global_step == STEPS
    assert seen and all(s == (dtype, dtype, torch.int64) for s in seen)
    result = trainer.test(model, data, verbose=False)[0]
    assert math.isfinite(result["test/acc"]) and 0.0 <= result["test/acc"] <= 1.0


@pytest.mark.filterwarnings("ignore")
def test_bf16_true_test_scores_every_episode_as_predict_does():
    # Under bf16-true Lightning converts the module, its metrics included: the episode sums were
    # bfloat16, so a test of 300 one-task batches counted 256 episodes (and warned that the
    # test was cut short, though nothing cut it) and reported a mean off by up to 0.25. The
    # reported accuracy is the mean of the same episodes' accuracies from predict.
    images, labels = clustered_images(classes=40, per_class=8, side=16, noise=0.6)
    data = EpisodicDataModule(images, labels, ways=3, shots=1, queries=2, meta_batch_size=1,
                              train_tasks=4, val_tasks=2, test_tasks=300, num_workers=0)
    torch.manual_seed(0)
    model = ProtoNet(conv4(None))
    trainer = L.Trainer(precision="bf16-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(model, data, verbose=False)[0]
    predictions = trainer.predict(model, data)
    accuracy = torch.cat([(out["query_predictions"] == out["query_y"]).double().mean(1) for out in predictions])
    assert accuracy.numel() == 300
    assert model.eval_metrics["test"]["score"].total.dtype == torch.float64
    assert result["test/acc"] == pytest.approx(accuracy.mean().item(), abs=1e-6)
    assert result["test/acc_ci95"] == pytest.approx(1.96 * accuracy.std().item() / math.sqrt(300), rel=1e-4)
