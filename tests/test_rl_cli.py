"""MAML-RL through the command line: fit then test the shipped config (shortened), and a
2-process DDP fit that makes the same updates as one process given the same tasks."""
import math
import re

import pytest
import torch

from fewshot_lightning.rl import GaussianMLPPolicy
from test_cli import ROOT, run_cli

CONFIG = str(ROOT / "configs" / "maml_rl_navigation.yaml")
HORIZON = 10
LR = 1e-3  # the config's Adam learning rate
# Two meta-iterations of 4 goals (2 outer steps each), tiny policy and horizon: seconds, not minutes.
SHORT = ["--trainer.max_epochs", "1", "--data.train_tasks", "8", "--data.val_tasks", "2", "--data.test_tasks", "6",
         "--model.trajectories", "3", "--model.environment.horizon", str(HORIZON), "--model.backbone.hidden", "[16, 16]",
         "--model.outer_steps", "2", "--trainer.enable_model_summary", "false"]


def logs(directory):
    return ["--trainer.logger.init_args.save_dir", str(directory)]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("maml_rl")
    run_cli("fit", "--config", CONFIG, *SHORT, *logs(tmp_path / "logs"), "--data.meta_batch_size", "4",
            "--trainer.log_every_n_steps", "1", cwd=tmp_path)
    return tmp_path, tmp_path / "logs" / "maml_rl_navigation" / "version_0"


def test_training_logs_the_returns_and_no_constant_loss(single_process_run):
    # train/loss was the PPO surrogate at the first outer step: -mean of standardised advantages,
    # 1e-8 (float32) or 1e-18 (float64) at every iteration, a flat line in TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(single_process_run[1]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/return_pre", "train/return_post"} <= tags and "train/loss" not in tags
    assert all(value.value < 0 for value in events.Scalars("train/return_post"))  # minus distances


def read(out, name):
    return float(re.search(rf"{name}\s+│?\s*(-?[0-9.]+)", out).group(1))


def test_config_fits_and_tests_from_the_checkpoint(single_process_run):
    tmp_path, run_dir = single_process_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    out = run_cli("test", "--config", CONFIG, *SHORT, *logs(tmp_path / "logs"), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                  cwd=tmp_path)
    # Every reward is minus a distance of at most |goal| + horizon * max_speed * sqrt(2) = 0.71 + 1.41,
    # so a 10-step return lies in (-21.3, 0); the interval over 6 goals is narrower than the mean.
    bound = HORIZON * (math.sqrt(0.5) + HORIZON * 0.1 * math.sqrt(2))
    for step in range(4):  # test_inner_steps = 3: the return after 0, 1, 2 and 3 steps
        mean, ci95 = read(out, f"test/return_after_{step}_steps"), read(out, f"test/return_after_{step}_steps_ci95")
        assert -bound < mean < 0
        assert 0 < ci95 < -mean


def test_two_ddp_processes_make_the_same_updates_as_one(single_process_run):
    tmp_path, run_dir = single_process_run
    # Each rank takes 2 goals a step (rank 0 goals 0, 2; rank 1 goals 1, 3, ...): together the 4 of
    # the single process's step. Rollouts are seeded per goal and gradients averaged over ranks.
    run_cli("fit", "--config", CONFIG, *SHORT, *logs(tmp_path / "ddp"), "--data.meta_batch_size", "2", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)
    single = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    double = torch.load(tmp_path / "ddp" / "maml_rl_navigation" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert single["global_step"] == double["global_step"] == 4  # 2 meta-iterations x 2 outer steps
    torch.manual_seed(0)  # seed_everything: 0, and the policy is the first thing the CLI builds
    initial = GaussianMLPPolicy(hidden=(16, 16)).state_dict()
    for name, value in single["state_dict"].items():
        assert torch.allclose(value, double["state_dict"][name], atol=1e-6), name
        # Training moved the weights, by no more than Adam's ~lr per step (a wrong start would be ~0.1 away).
        moved = (value - initial[name.removeprefix("backbone.")]).abs().max().item()
        assert 0 < moved <= 4 * 3 * LR, (name, moved)
