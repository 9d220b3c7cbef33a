"""Resuming ``fit`` with an outer optimizer or scheduler set up otherwise than the checkpoint's is
refused: Lightning restores their saved state over the configured one, so the run trained with the
checkpoint's learning rate (or step size) while its config recorded the new one, exit 0; another
optimizer class failed inside its step (``KeyError: 'momentum'``)."""
from functools import partial

import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP


def learner(optimizer=partial(torch.optim.Adam, lr=1e-3), lr_scheduler=None) -> MAML:
    return MAML(MLP(1, (8,), 1), inner_lr=0.01, optimizer=optimizer, lr_scheduler=lr_scheduler)


def fit(model, folder, steps, ckpt_path=None):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=folder,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)])
    trainer.fit(model, SinusoidDataModule(shots=5, queries=5, meta_batch_size=2, train_tasks=8, val_tasks=2),
                ckpt_path=ckpt_path)
    return trainer


STEP = partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    fit(learner(lr_scheduler=STEP), folder, 3)
    return folder / "last.ckpt"


def test_the_same_settings_resume(saved, tmp_path):
    trainer = fit(learner(lr_scheduler=STEP), tmp_path, 5, ckpt_path=saved)
    assert trainer.global_step == 5
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)  # stepped 5 times


@pytest.mark.parametrize("model, said", [
    (lambda: learner(partial(torch.optim.Adam, lr=0.5), STEP), r"optimizer lr=0.5 \(the checkpoint's: 0.001\)"),
    (lambda: learner(partial(torch.optim.Adam, lr=1e-3, weight_decay=0.1), STEP),
     r"optimizer weight_decay=0.1 \(the checkpoint's: 0(\.0)?\)"),
    (lambda: learner(partial(torch.optim.SGD, lr=1e-3), STEP),
     r"the optimizer \(SGD\) is not the checkpoint's \(Adam\)"),
    (lambda: learner(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)),
     r"scheduler step_size=1 \(the checkpoint's: 2\)"),
    (lambda: learner(lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=10)),
     r"the scheduler \(CosineAnnealingLR\) is not the checkpoint's"),
    (lambda: learner(), r"a learning-rate scheduler is dropped"),
])
def test_other_settings_are_refused_naming_them(saved, tmp_path, model, said):
    with pytest.raises(ValueError, match=r"Resuming from the checkpoint restores its outer optimizer and "
                                         r"learning-rate scheduler as they were saved, but this run sets them up "
                                         rf"otherwise: .*{said}.*Resume with the settings it was trained with"):
        fit(model(), tmp_path, 5, ckpt_path=saved)


def test_a_new_run_from_the_weights_may_change_them(saved, tmp_path):
    # load_from_checkpoint starts a new run from the weights: any optimizer.
    model = MAML.load_from_checkpoint(saved, backbone=MLP(1, (8,), 1), optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = fit(model, tmp_path, 2)
    assert trainer.global_step == 2 and trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_without_a_scheduler_the_rate_itself_is_compared(tmp_path):
    fit(learner(), tmp_path / "a", 2)
    with pytest.raises(ValueError, match=r"optimizer lr=0.01 \(the checkpoint's: 0.001\)"):
        fit(learner(partial(torch.optim.Adam, lr=0.01)), tmp_path / "b", 4, ckpt_path=tmp_path / "a" / "last.ckpt")


PLATEAU = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=0)


def fit_validating(model, folder, steps, ckpt_path=None):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=2, check_val_every_n_epoch=None, default_root_dir=folder,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)])
    trainer.fit(model, SinusoidDataModule(shots=5, queries=5, meta_batch_size=2, train_tasks=8, val_tasks=2),
                ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("model, said", [
    # ReduceLROnPlateau sets no initial_lr: the rate was not compared, and a changed one trained on
    # at the checkpoint's; its min_lr was taken for progress; dropping it was not seen.
    (lambda: learner(partial(torch.optim.Adam, lr=0.5), PLATEAU), r"optimizer lr=0.5 \(the checkpoint's: 0.001\)"),
    (lambda: learner(lr_scheduler=partial(PLATEAU, min_lr=0.01)), r"scheduler min_lrs=\[0.01\] \(the checkpoint's: \[0"),
    (lambda: learner(), r"a learning-rate scheduler is dropped"),
    (lambda: learner(lr_scheduler=STEP), r"the scheduler \(StepLR\) is not the checkpoint's"),
])
def test_plateau_settings_are_compared_too(tmp_path, model, said):
    fit_validating(learner(lr_scheduler=PLATEAU), tmp_path / "a", 4)
    with pytest.raises(ValueError, match=said):
        fit_validating(model(), tmp_path / "b", 6, ckpt_path=tmp_path / "a" / "last.ckpt")


def test_a_new_run_from_a_checkpoint_keeps_its_own_plateau(tmp_path):
    # The checkpoint's ReduceLROnPlateau state (its factor, patience, step count) was loaded into
    # every later fit of a module that had loaded it.
    fit_validating(learner(lr_scheduler=PLATEAU), tmp_path / "a", 4)
    model = MAML.load_from_checkpoint(tmp_path / "a" / "last.ckpt", backbone=MLP(1, (8,), 1),
                                      lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.1,
                                                           patience=7))
    fit_validating(model, tmp_path / "b", 2)
    assert (model._plateau.factor, model._plateau.patience, model._plateau.last_epoch) == (0.1, 7, 1)


def test_an_older_checkpoint_with_fewer_optimizer_settings_resumes(saved, tmp_path):
    # A checkpoint from a torch without one of Adam's settings (decoupled_weight_decay) and from before
    # the optimizer class was recorded was refused as "another optimizer".
    checkpoint = torch.load(saved, weights_only=False)
    checkpoint.pop("outer_optimizer", None)
    for group in checkpoint["optimizer_states"][0]["param_groups"]:
        group.pop("decoupled_weight_decay", None)
    torch.save(checkpoint, tmp_path / "older.ckpt")
    assert fit(learner(lr_scheduler=STEP), tmp_path, 5, ckpt_path=tmp_path / "older.ckpt").global_step == 5
