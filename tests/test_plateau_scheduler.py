"""ReduceLROnPlateau as the outer scheduler: stepped once per validation, on the validation loss.

Lightning steps a plateau scheduler at a training-step or epoch boundary on the last value of its
monitored metric; our validations fall every ``val_check_interval`` steps within and across
epochs, and Lightning refused the scheduler without a monitor (which a config cannot give). The
learner steps it itself after each validation. The tests make every validation after the first
"no improvement" (an absolute threshold far above any loss change), so with ``patience=0`` the
rate halves at each validation but the first: the final rate counts the steps exactly.
"""
import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP

from cli_support import run_cli

LR = 1e-3


def plateau(mode: str = "min"):
    return partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode=mode, factor=0.5, patience=0,
                   threshold=1e6, threshold_mode="abs")


def learner(mode: str = "min") -> MAML:
    return MAML(MLP(1, (8,), 1), inner_lr=0.01, optimizer=partial(torch.optim.Adam, lr=LR),
                lr_scheduler=plateau(mode))


def data(val_tasks: int = 4) -> SinusoidDataModule:
    return SinusoidDataModule(shots=5, queries=5, meta_batch_size=2, train_tasks=2 * 6, val_tasks=val_tasks,
                              test_tasks=4)


def trainer(tmp_path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, val_check_interval=3, check_val_every_n_epoch=None, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=2, **kwargs)


def lr_of(model: MAML) -> float:
    return model.optimizers().optimizer.param_groups[0]["lr"] if model._trainer else None


def test_plateau_steps_once_per_validation(tmp_path):
    L.seed_everything(0)
    model = learner()
    run = trainer(tmp_path, 15, enable_checkpointing=False)
    run.fit(model, data())
    # 15 steps, validation every 3: 5 validations (the sanity check is not one). The first sets
    # the best loss, the other four are no better by 1e6: the rate halved four times. Stepped at
    # every training step it would have halved about 14 times; never stepped, not at all.
    assert model._plateau_steps == 5
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** 4)
    assert model._plateau.best == pytest.approx(float(model._plateau.best))  # a float loss, not inf
    assert model._plateau.best < float("inf")


def test_plateau_state_resumes(tmp_path):
    L.seed_everything(0)
    first = trainer(tmp_path / "a", 9, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt",
                                                                                      save_last=True)])
    first.fit(learner(), data())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["plateau_scheduler"]["num_bad_epochs"] == 0 and saved["plateau_scheduler"]["best"] < float("inf")
    L.seed_everything(0)
    model = learner()
    resumed = trainer(tmp_path / "b", 15, enable_checkpointing=False)
    resumed.fit(model, data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # Three validations before the checkpoint (rate halved twice), two after: halved four times,
    # as without the interruption. A scheduler restarted at resume would take the fourth
    # validation as an improvement over its initial best (infinity) and end at 0.5 ** 3.
    assert model._plateau_steps == 2
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** 4)


def test_plateau_mode_must_match_the_metric(tmp_path):
    model = learner(mode="max")
    with pytest.raises(ValueError, match=r"steps on val/loss .* lower, but was built with mode='max': give it mode='min'"):
        trainer(tmp_path, 3, enable_checkpointing=False).fit(model, data())


def test_plateau_without_validation_warns(tmp_path):
    model = learner()
    with pytest.warns(UserWarning, match="ReduceLROnPlateau outer scheduler never stepped"):
        trainer(tmp_path, 3, enable_checkpointing=False, limit_val_batches=0).fit(model, data())
    assert model._plateau_steps == 0


def test_plateau_from_the_command_line_resumes_exactly(tmp_path):
    # configs/maml_sinusoid.yaml's own checkpoints (LastCheckpoint at the end of a step, `--ckpt_path
    # last`): 12 steps at once, and 6 then resumed to 12, validating every 3 steps.
    scheduler = {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "init_args": {"factor": 0.5, "patience": 1}}
    config = str(Path(__file__).parents[1] / "configs" / "maml_sinusoid.yaml")

    def fit(folder: str, steps: int, *extra: str) -> dict:
        run_cli("fit", "--config", config, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "3",
                "--data.init_args.val_tasks", "8", "--model.init_args.lr_scheduler", json.dumps(scheduler),
                "--trainer.logger.init_args.save_dir", folder, *extra, cwd=tmp_path)
        return torch.load(next((tmp_path / folder).rglob("last.ckpt")), weights_only=False)

    whole = fit("whole", 12)
    fit("parts", 6)
    resumed = fit("parts", 12, "--ckpt_path", "last")
    assert whole["plateau_scheduler"]["last_epoch"] == 4  # stepped by the 4 validations, not the 12 steps
    assert resumed["plateau_scheduler"] == whole["plateau_scheduler"]
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == whole["optimizer_states"][0]["param_groups"][0]["lr"]
