"""Classification with Conv4: learning above chance, batch-norm handling, mixed precision."""
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import EpisodicDataModule, TaskBatch
from fewshot_lightning.models import Conv4


def clustered_images(classes=40, per_class=12, side=16, noise=0.6):
    """Each class is a random 16x16 pattern; its samples are that pattern plus noise."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(classes, 1, side, side, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = patterns[labels] + noise * torch.randn(len(labels), 1, side, side, generator=g)
    return images, labels


def quiet_trainer(**kwargs):
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_maml_conv4_learns_5way_1shot_above_chance():
    L.seed_everything(0)
    images, labels = clustered_images()
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=5, meta_batch_size=4, train_tasks=4 * 60,
                              val_tasks=8, test_tasks=100, num_workers=0)
    model = MAML(Conv4(hidden=16, out_features=5, image_size=16), inner_lr=0.4, inner_steps=1, test_inner_steps=3)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, data)
    result = trainer.test(model, data, verbose=False)[0]
    # Chance is 0.20. One labelled example of a noisy pattern identifies its class well:
    # after 60 meta-steps the adapted network is far above chance (seen: about 0.9).
    assert result["test/acc"] > 0.20 + 0.40
    assert result["test/acc_after_0_steps"] < 0.35  # before adaptation labels are arbitrary
    assert 0 < result["test/acc_ci95"] < 0.1


@pytest.mark.parametrize("backbone", ["Conv4", "nn.Sequential"])
def test_maml_on_a_backbone_with_running_averages_uses_batch_statistics_in_training_and_evaluation(backbone):
    # The README: MAML evaluates with each task's own batch statistics. A backbone whose batch
    # norm tracks running averages (any torchvision network) evaluated with them instead, in
    # eval(): averages built from every inner-step pass and the discarded timing steps, scores
    # 1.27 apart from the batch statistics' on this batch, and no warning.
    images, labels = clustered_images(classes=5, per_class=4)
    batch = TaskBatch(images[None, ::2].clone(), (labels[None, ::2] % 5).clone(), images[None, 1::2].clone(), (labels[None, 1::2] % 5).clone())
    batch = TaskBatch(batch.support_x.repeat(2, 1, 1, 1, 1), batch.support_y.repeat(2, 1), batch.query_x.repeat(2, 1, 1, 1, 1), batch.query_y.repeat(2, 1))

    def make(track):
        torch.manual_seed(0)
        if backbone == "Conv4":
            return Conv4(hidden=8, out_features=5, image_size=16, track_running_stats=track)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 16 * 16, 5))

    tracked, plain = make(True), make(False)
    outputs = {}
    # Every path (the channels-last loop restrides the hidden buffers too: it failed on None at
    # first), and the non-transductive evaluation, whose passes go through the same forward.
    paths = [("vmap", "contiguous", True), ("loop", "contiguous", True), ("loop", "channels_last", True),
             ("vmap", "channels_last", True), ("loop", "contiguous", False)]
    for name, network in (("tracked", tracked), ("plain", plain)):
        for batching, memory_format, transductive in paths:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = MAML(network, inner_lr=0.1, batching=batching, memory_format=memory_format,
                             transductive=transductive)
            said = [str(w.message) for w in caught if "running averages" in str(w.message)]
            assert len(said) == (name == "tracked"), said
            model.training_losses(batch)[0].mean().backward()  # a training step: would move the averages
            model.eval()
            with torch.no_grad():
                outputs[name, batching, memory_format, transductive] = model.evaluation_outputs(batch, "val")
    for (name, batching, memory_format, transductive), value in outputs.items():
        torch.testing.assert_close(value, outputs["plain", "loop", "contiguous", transductive], rtol=1e-4, atol=1e-5,
                                   msg=str((name, batching, memory_format, transductive)))
    norms = [m for m in tracked.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)  # nothing updated
    assert all(int(m.num_batches_tracked) == 0 for m in norms)
    # The two tasks are identical, so they get identical predictions.
    assert torch.allclose(outputs["tracked", "vmap", "contiguous", True][0], outputs["tracked", "vmap", "contiguous", True][1],
                          atol=1e-5)


def test_bf16_mixed_precision_trains_with_finite_losses():
    L.seed_everything(0)
    images, labels = clustered_images(classes=40, per_class=8)
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=3, meta_batch_size=2, train_tasks=8,
                              val_tasks=4, test_tasks=4, num_workers=0)
    model = MAML(Conv4(hidden=8, out_features=5, image_size=16), inner_lr=0.4)
    trainer = quiet_trainer(max_steps=4, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(model, data)
    result = trainer.test(model, data, verbose=False)[0]
    assert torch.isfinite(torch.tensor(result["test/loss"]))
    assert 0.0 <= result["test/acc"] <= 1.0


def test_cpu_training_stops_probing_for_an_absent_gpu_driver_every_step(monkeypatch):
    # `import lightning` makes CUDA-built PyTorch load the NVIDIA management library on every
    # torch.cuda.is_available(), which torch.optim asks in every step: where no driver is
    # installed, a failed dlopen per step. Training on the CPU there must not pay it.
    import ctypes

    from fewshot_lightning.data import SinusoidDataModule
    from fewshot_lightning.models import MLP

    if not torch.backends.cuda.is_built() or torch.cuda._device_count_nvml() >= 0:
        pytest.skip("needs a CUDA build of PyTorch on a machine without an NVIDIA driver (as CI's)")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as `import lightning` leaves it; restored after
    loads = []
    original = ctypes.CDLL.__init__

    def counting(self, name, *args, **kwargs):
        if "nvidia-ml" in str(name):
            loads.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(ctypes.CDLL, "__init__", counting)
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1, requires_grad=True))]).step()  # no grad: only the probe
    assert len(loads) == 1  # what each step cost before (so the count below can fail)

    class CountFromTheFirstStep(L.Callback):
        def on_train_start(self, trainer, module):
            loads.clear()

    data = SinusoidDataModule(meta_batch_size=4, train_tasks=4 * 20, num_workers=0)
    trainer = quiet_trainer(max_steps=20, limit_val_batches=0, callbacks=[CountFromTheFirstStep()])
    trainer.fit(MAML(MLP(1, (8,), 1), inner_lr=0.01, batching="vmap"), data)
    assert trainer.global_step == 20 and loads == []  # 20 optimizer steps, not one probe
    assert not torch.cuda.is_available()  # the answer is unchanged


def test_learner_attribute_assignment_keeps_module_semantics_and_skips_checks_for_plain_values(monkeypatch):
    """``MetaLearner.__setattr__`` stores plain values (Lightning's ``_current_fx_name``, around
    every hook) without ``nn.Module``'s checks, and leaves parameters, buffers and submodules to
    ``nn.Module``: registering, replacing and clearing them must work exactly as before."""
    model = MAML(torch.nn.Linear(2, 3), inner_lr=0.1)
    calls = []
    module_setattr = torch.nn.Module.__setattr__
    monkeypatch.setattr(torch.nn.Module, "__setattr__", lambda self, name, value: (calls.append(name), module_setattr(self, name, value)))

    model._current_fx_name = "training_step"
    model.some_flag, model.some_count, model.some_rate = True, 3, 0.5
    assert (model._current_fx_name, model.some_flag, model.some_count, model.some_rate) == ("training_step", True, 3, 0.5)
    assert calls == [], "plain values should not go through nn.Module.__setattr__"

    model.extra = torch.nn.Parameter(torch.ones(2))  # registered as a parameter
    assert "extra" in dict(model.named_parameters())
    model.extra = None  # a parameter set to None stays registered, as None (nn.Module's rule)
    assert "extra" in model._parameters and model._parameters["extra"] is None and "extra" not in model.__dict__
    model.register_buffer("counter", torch.zeros(1))
    model.counter = None  # a buffer cleared, not shadowed by an instance attribute
    assert "counter" in model._buffers and model._buffers["counter"] is None and "counter" not in model.__dict__
    model.head = torch.nn.Linear(3, 1)
    assert "head" in model._modules
    model.head = None
    assert model._modules["head"] is None and "head" not in model.__dict__
    with pytest.raises(TypeError, match="cannot assign 'int' as parameter"):
        model.extra = 1  # nn.Module's own error: an int on a parameter's name
    assert calls.count("extra") == 3 and calls.count("counter") == 1 and calls.count("head") == 2


def test_uint8_batches_that_bypass_the_datamodule_are_scaled_by_the_learner(tmp_path):
    # The DataModules scale uint8 images after the transfer (on_after_batch_transfer); a Trainer
    # given their dataloaders, or training_step called directly, met float weights with uint8
    # images: "Input type (unsigned char) and bias type (float) should be the same".
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40 * 6, 1, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.arange(40).repeat_interleave(6)
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=2, meta_batch_size=2, train_tasks=4, val_tasks=2,
                              num_workers=0)
    data.setup("fit")
    raw = next(iter(data.train_dataloader()))
    assert raw.support_x.dtype == torch.uint8
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=8, out_features=5, image_size=16), inner_lr=0.1, batching="loop", memory_format="contiguous")
    scaled = TaskBatch(raw.support_x.float() / 255, raw.support_y, raw.query_x.float() / 255, raw.query_y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        torch.testing.assert_close(model.training_step(raw, 0), model.training_step(scaled, 0))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    assert trainer.global_step == 2


def test_uint8_batches_from_a_users_loader_are_evaluated_too(tmp_path):
    # test/validate/predict on uint8 TaskBatches from a plain DataLoader: the images were scaled
    # (new tensors) and the inference-mode check looked at them only, so the loader's labels
    # stayed inference tensors: "Inference tensors cannot be saved for backward".
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)

    def images(n):
        return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)

    tasks = [(images(5), torch.arange(5), images(10), torch.arange(5).repeat(2)) for _ in range(4)]
    loader = DataLoader(tasks, batch_size=2, collate_fn=lambda t: TaskBatch(*(torch.stack(p) for p in zip(*t))))
    model = MAML(Conv4(1, 8, 5, image_size=16), inner_lr=0.1, batching="loop", memory_format="contiguous")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trainer.test(model, dataloaders=loader, verbose=False)[0]
        validated = trainer.validate(model, dataloaders=loader, verbose=False)[0]
    assert 0.0 <= result["test/acc"] <= 1.0 and result["test/acc"] == validated["val/acc"]
