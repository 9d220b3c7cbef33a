"""Resuming: a run stopped and resumed ends exactly where an uninterrupted one does."""
import json
import re

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from fewshot_lightning.algorithms import AttentionLearner
from fewshot_lightning.callbacks import LastCheckpoint
from fewshot_lightning.data import EpisodicDataModule
from test_cli import ROOT, SINUSOID, versions

# Epochs of 3 batches, validation every 2 steps across them, a learned inner rate and a step
# schedule: what a resume must restore beyond the weights.
CHAIN = [
    "--config", SINUSOID, "--data.train_tasks", "75", "--data.val_tasks", "10", "--trainer.val_check_interval", "2",
    "--trainer.check_val_every_n_epoch", "null", "--model.init_args.learn_inner_lr", "true",
    "--model.init_args.lr_scheduler",
    json.dumps({"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 2, "gamma": 0.5}}),
]


def load(path):
    return torch.load(path, weights_only=True)


def max_difference(first, second):
    return max((first[key] - second[key]).abs().max().item() for key in first)


def optimizer_tensors(checkpoint):
    state = checkpoint["optimizer_states"][0]["state"]
    return {f"{index}.{name}": value for index, entry in state.items() for name, value in entry.items() if value.dim()}


def test_resumed_run_through_the_cli_equals_an_uninterrupted_one(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "lightning_logs" / "maml_sinusoid" / "version_0"
    saved = {}
    # Stopped after step 2 (mid-epoch, right after a validation), resumed with DataLoader workers
    # to step 3 (the end of the epoch), resumed again without them to step 6.
    for steps, workers, resume in ((2, "0", []), (3, "2", ["--ckpt_path", "last"]), (6, "0", ["--ckpt_path", "last"])):
        code, out = cli("fit", *CHAIN, "--trainer.max_steps", str(steps), "--data.num_workers", workers, *resume)
        assert code == 0, out[-3000:]
        saved[steps] = load(run / "checkpoints" / "last.ckpt")
        assert saved[steps]["global_step"] == steps
        assert "exists and is not empty" not in out
        assert "not resumable" not in out
    # Every segment wrote into the run's own folder, keeping each segment's config.
    assert versions(run.parent) == ["version_0"]
    assert {p.name for p in run.glob("config*.yaml")} == {"config.yaml", "config.resume1.yaml", "config.resume2.yaml"}

    (tmp_path / "uninterrupted").mkdir()
    monkeypatch.chdir(tmp_path / "uninterrupted")
    code, out = cli("fit", *CHAIN, "--trainer.max_steps", "6", "--data.num_workers", "0")
    assert code == 0, out[-3000:]
    uninterrupted = load(tmp_path / "uninterrupted" / "lightning_logs" / "maml_sinusoid" / "version_0" / "checkpoints" / "last.ckpt")

    # Weights (the learned inner rates among them), Adam's moments, the schedule and the loops agree.
    resumed = saved[6]
    assert "inner_lr.rates.head__weight" in resumed["state_dict"]
    assert max_difference(resumed["state_dict"], uninterrupted["state_dict"]) <= 1e-6
    assert max_difference(optimizer_tensors(resumed), optimizer_tensors(uninterrupted)) <= 1e-6
    assert resumed["lr_schedulers"] == uninterrupted["lr_schedulers"]
    assert resumed["lr_schedulers"][0]["_last_lr"] == [pytest.approx(1e-3 * 0.5 ** 3)]  # stepped 6 times, halved every 2
    assert (resumed["epoch"], resumed["global_step"]) == (uninterrupted["epoch"], uninterrupted["global_step"]) == (1, 6)
    # Training moved the weights: they are not equal because nothing happened after step 2.
    assert max_difference(saved[2]["state_dict"], uninterrupted["state_dict"]) > 1e-4


def clustered_images(classes=12, per_class=6, side=4):
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(classes, 1, side, side, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return patterns[labels] + 0.5 * torch.randn(len(labels), 1, side, side, generator=generator), labels


def attention_learner():
    L.seed_everything(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    backbone.output_shape = (8,)  # what the learner sizes its tokens from
    # Dropout draws from the global generator at every step: a resume must restore its state.
    return AttentionLearner(backbone, ways=3, model_dim=16, heads=2, layers=1, feedforward_dim=16, dropout=0.5)


def fit(model, steps, folder, ckpt_path=None):
    images, labels = clustered_images()
    data = EpisodicDataModule(images, labels, split_fractions=(0.5, 0.25, 0.25), ways=3, shots=1, queries=2, meta_batch_size=2,
                              train_tasks=4, num_workers=0)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[LastCheckpoint(every_n_train_steps=100, dirpath=str(folder))])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return load(folder / "last.ckpt")


def test_resume_restores_the_random_state_dropout_draws_from(tmp_path):
    reference = fit(attention_learner(), 5, tmp_path / "reference")
    # Epochs of 2 steps: stopped at an epoch's end (2), then mid-epoch (3); the global generator
    # is scrambled before each resume, as a new process would have it.
    for steps in (2, 3, 5):
        torch.manual_seed(1000 + steps)
        resumed = fit(attention_learner(), steps, tmp_path / "chain", "last" if steps > 2 else None)
        if steps == 3:
            step_3 = load(tmp_path / "chain" / "last.ckpt")
    assert resumed["global_step"] == 5
    assert max_difference(resumed["state_dict"], reference["state_dict"]) <= 1e-6

    # Without the saved random state the dropout masks, and so the weights, differ: the test can fail.
    del step_3["rng_states"]
    torch.save(step_3, tmp_path / "no_rng.ckpt")
    torch.manual_seed(1005)
    drifted = fit(attention_learner(), 5, tmp_path / "chain", str(tmp_path / "no_rng.ckpt"))
    assert max_difference(drifted["state_dict"], reference["state_dict"]) > 1e-4


class LastSavedSteps(L.Callback):
    """The global step held by the last checkpoint at ``path`` as each training batch starts
    (``None`` before the first save)."""

    def __init__(self, path):
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(load(self.path)["global_step"] if self.path.exists() else None)


def test_last_checkpoint_every_n_steps_and_after_the_final_one(tmp_path):
    recorder = LastSavedSteps(tmp_path / "last.ckpt")

    images, labels = clustered_images()
    data = EpisodicDataModule(images, labels, split_fractions=(0.5, 0.25, 0.25), ways=3, shots=1, queries=2, meta_batch_size=2,
                              train_tasks=40, num_workers=0)
    trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder, LastCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path))])
    trainer.fit(attention_learner(), data)
    # Seen at the start of steps 1..5: saved after steps 2 and 4; then after the final step 5.
    assert recorder.steps == [None, None, 2, 2, 4]
    assert load(tmp_path / "last.ckpt")["global_step"] == 5


def test_last_checkpoint_counts_steps_passed_for_a_learner_of_several_steps_a_batch(tmp_path):
    # MAML-RL takes outer_steps optimizer steps a batch: global_step went 4, 8, 12, ... and a save
    # "every 6 steps" came only at multiples of both (every 12; every 210 for 30 and 7).
    from fewshot_lightning.algorithms import MAMLRL
    from fewshot_lightning.rl import GaussianMLPPolicy, NavigationDataModule, PointNavigation

    recorder = LastSavedSteps(tmp_path / "last.ckpt")

    torch.manual_seed(0)
    model = MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=3), trajectories=2, outer_steps=4)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[recorder, LastCheckpoint(every_n_train_steps=6, dirpath=str(tmp_path))])
    trainer.fit(model, NavigationDataModule(meta_batch_size=2, train_tasks=20, val_tasks=2, test_tasks=2))
    # Seen at the start of batches 1..10 (global steps 0, 4, ..., 36): saved at the first batch end
    # past 6, 12, 18, 24, 30, 36 (steps 8, 12, 20, 24, 32, 36), then after the final one (40).
    assert recorder.steps == [None, None, 8, 12, 12, 20, 24, 24, 32, 36]
    assert load(tmp_path / "last.ckpt")["global_step"] == 40


def test_every_shipped_config_saves_a_checkpoint_to_resume_from():
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
        last = [c for c in callbacks if c["class_path"] == "fewshot_lightning.callbacks.LastCheckpoint"]
        assert len(last) == 1 and last[0]["init_args"]["every_n_train_steps"] >= 1, config.name
        # Saves before the end, so that a kill does not lose the whole run (configs bounded by
        # epochs, as the meta-RL ones, make several optimizer steps an iteration: 150 an epoch).
        max_steps = yaml.safe_load(config.read_text())["trainer"].get("max_steps", 150)
        assert last[0]["init_args"]["every_n_train_steps"] < max_steps, config.name
        # Only LastCheckpoint writes last.ckpt: a second writer would make last-v1.ckpt.
        assert not any(c.get("init_args", {}).get("save_last") for c in callbacks), config.name
        # Runs of each config in their own folder, so that `last` finds this config's runs only.
        assert yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]["name"] == config.stem


@pytest.mark.filterwarnings("ignore")
def test_overfit_batches_trains_on_the_first_batch_again_and_again(tmp_path):
    # Trainer(overfit_batches=N) rebuilds the training loader with a SequentialSampler of its
    # own; the resumable loader read its EpisodeSampler's position and stopped the run with
    # "'SequentialSampler' object has no attribute 'start'". It now counts from the start and
    # saves no position to resume (there is none: the same batches every epoch).
    from cli_support import clustered_images
    from learner_helpers import record_training_batches
    from fewshot_lightning.algorithms import MAML
    from fewshot_lightning.models import Conv4

    images, labels = clustered_images(classes=40, per_class=8, side=16, noise=0.6)
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=3, meta_batch_size=4, train_tasks=40,
                              val_tasks=8, num_workers=0)
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=8, out_features=5, image_size=16), inner_lr=0.4, batching="vmap")
    seen = record_training_batches(model, lambda batch: batch.query_x.clone())
    trainer = L.Trainer(max_steps=3, overfit_batches=1, val_check_interval=1, default_root_dir=tmp_path,
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert trainer.global_step == 3 and len(seen) == 3
    assert all(torch.equal(batch, seen[0]) for batch in seen)  # one batch, overfitted
    assert trainer.train_dataloader.state_dict() == {}


def test_resuming_with_other_data_arguments_says_the_stream_changes(tmp_path, monkeypatch, cli):
    # A resume with another meta_batch_size went on silently: model arguments that differ were
    # warned about, data arguments not, and the "exact continuation" was another task stream.
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", *CHAIN, "--trainer.max_steps", "2")
    assert code == 0, out[-3000:]
    code, out = cli("fit", *CHAIN, "--trainer.max_steps", "3", "--ckpt_path", "last", "--data.num_workers", "2")
    assert code == 0 and "Resuming with other data arguments" not in out, out[-3000:]
    code, out = cli("fit", *CHAIN, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.meta_batch_size", "3")
    assert code == 0, out[-3000:]
    assert re.search(r"Resuming with other data arguments than the run that saved last.*\.ckpt \(.*config\.yaml\): "
                     r"meta_batch_size \d+ then, 3 now\. The run goes on", out), out[-3000:]


def test_a_periodic_save_at_a_validation_step_holds_that_validation(tmp_path):
    # LastCheckpoint's save every N steps came before the validation due at the same step, and only
    # the final step's was saved again after it: a run killed after that save resumed without
    # the validation's best-model record (a worse later checkpoint became "best") or a plateau
    # scheduler's step.
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fewshot_lightning.algorithms import MAML
    from fewshot_lightning.data import SinusoidDataModule
    from fewshot_lightning.models import MLP

    kept = tmp_path / "as_killed.ckpt"

    class KillAfterTheSave(L.Callback):  # what a kill during step 5 leaves: last.ckpt as of step 4
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                kept.write_bytes((tmp_path / "last.ckpt").read_bytes())

    torch.manual_seed(0)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/mse", filename="best-{step}")
    trainer = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        callbacks=[LastCheckpoint(every_n_train_steps=4, dirpath=str(tmp_path)), best, KillAfterTheSave()])
    trainer.fit(MAML(MLP(), inner_lr=0.01, batching="vmap"), SinusoidDataModule(meta_batch_size=2, train_tasks=40,
                                                                               val_tasks=2, seed=3))
    saved = load(kept)
    assert saved["global_step"] == 4
    record = next(state for key, state in saved["callbacks"].items() if "val/mse" in key)
    assert record["best_model_path"].endswith("best-step=4.ckpt") and record["best_model_score"] is not None
