"""The command line, end to end: fit, test and predict from checkpoints, and what a user sees
when something is wrong. Most runs call ``main`` in this process (the same code as the console
script, without paying the imports again); ``run_cli`` starts a real process where one is needed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewshot_lightning.algorithms import MetaLearner
from fewshot_lightning.cli import FewShotCLI, main
from fewshot_lightning.data import TaskDataModule

ROOT = Path(__file__).resolve().parents[1]
SINUSOID = str(ROOT / "configs" / "maml_sinusoid.yaml")


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "fewshot_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def read_metric(out, name):
    return float(re.search(rf"{re.escape(name)}\s+│?\s*([0-9.]+)", out).group(1))


def versions(logs):
    return sorted(path.name for path in logs.iterdir()) if logs.is_dir() else []


def test_fit_then_test_and_predict_from_checkpoints(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)  # the config logs to the relative lightning_logs/
    short = ["--config", SINUSOID, "--trainer.max_steps", "60", "--trainer.val_check_interval", "30",
             "--data.val_tasks", "50", "--data.test_tasks", "100"]
    code, out = cli("fit", *short)
    assert code == 0, out[-3000:]
    run_dir = tmp_path / "lightning_logs" / "maml_sinusoid" / "version_0"
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 60  # saved after the final step
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard logs
    assert (run_dir / "config.yaml").is_file()  # the exact config, to rerun it

    code, out = cli("test", *short, "--ckpt_path", "last")
    assert code == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {Path('lightning_logs/maml_sinusoid/version_0/checkpoints/last.ckpt')}" in out
    # Lightning's results table lists the MSE and its 95% interval over the 100 test tasks.
    mse, ci95 = read_metric(out, "test/mse"), read_metric(out, "test/mse_ci95")
    # An MLP that outputs ~0 scores about the targets' second moment, E[A^2]/2 ~ 4.2; any real
    # run lands below 6 and above 0, with an interval narrower than the mean.
    assert 0 < mse < 6
    assert 0 < ci95 < mse
    # Noise a user would read as a fault: none of it.
    for noise in ("dirpath has changed", "LeafSpec", "sync_dist"):
        assert noise not in out
    # The test logs to a new version: nothing of the first run is overwritten.
    assert versions(run_dir.parent) == ["version_0", "version_1"]

    # predict writes the query predictions of the same 100 test tasks; scored independently
    # here, they give the MSE that test printed for the same checkpoint.
    code, out = cli("predict", *short, "--ckpt_path", "last")
    assert code == 0, out[-3000:]
    predictions = torch.load(run_dir.parent / "version_2" / "predictions.pt", weights_only=True)
    assert predictions["task_index"].tolist() == list(range(100))
    assert predictions["query_predictions"].shape == predictions["query_y"].shape == (100, 10, 1)
    per_task = (predictions["query_predictions"] - predictions["query_y"]).square().mean((1, 2))
    assert per_task.mean().item() == pytest.approx(mse, rel=1e-5)
    assert "These predictions cover" not in out
    # A batch limit left in: said, as for a partial test.
    code, out = cli("predict", *short, "--ckpt_path", "last", "--trainer.limit_predict_batches", "1")
    assert code == 0 and "These predictions cover 25 of the 100 test episodes" in out, out[-3000:]

    # best: the run's ModelCheckpoint monitors val/mse, validated at steps 30 and 60.
    code, out = cli("validate", *short, "--ckpt_path", "best")
    assert code == 0, out[-3000:]
    best = list(checkpoints.glob("best-step=*.ckpt"))
    assert len(best) == 1 and f"Restoring states from the checkpoint path at {best[0].relative_to(tmp_path)}" in out


def test_last_is_the_newest_branch_after_resuming_from_an_earlier_checkpoint(tmp_path, monkeypatch, cli):
    # A fit resumed from the best checkpoint of step 5 writes its last weights (step 12) to
    # last-v1.ckpt beside the first branch's last.ckpt (step 10); `--ckpt_path last` took
    # last.ckpt, the older branch, without a word.
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "max.yaml"  # the earliest validation is the best: a checkpoint before the last
    config.write_text(Path(SINUSOID).read_text().replace("mode: min", "mode: max"))
    short = ["--config", str(config), "--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "2",
             "--data.test_tasks", "10"]
    code, out = cli("fit", *short, "--trainer.max_steps", "10")
    assert code == 0, out[-3000:]
    checkpoints = tmp_path / "lightning_logs" / "maml_sinusoid" / "version_0" / "checkpoints"
    best = checkpoints / "best-step=5.ckpt"
    assert best.is_file()
    code, out = cli("fit", *short, "--trainer.max_steps", "12", "--ckpt_path", str(best))
    assert code == 0, out[-3000:]
    steps = {path.name: torch.load(path, weights_only=True)["global_step"] for path in checkpoints.glob("last*.ckpt")}
    assert steps == {"last.ckpt": 10, "last-v1.ckpt": 12}
    code, out = cli("test", *short, "--ckpt_path", "last")
    assert code == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {(checkpoints / 'last-v1.ckpt').relative_to(tmp_path)}" in out


def test_a_damaged_or_foreign_checkpoint_file_is_named_in_one_line(tmp_path, monkeypatch, cli):
    # A checkpoint cut short (a kill while saving), a config or a predictions file given as
    # --ckpt_path ended in a traceback from fsspec ("OSError: [Errno 22] Invalid argument"), the
    # unpickler ("Weights only load failed") or Lightning (KeyError: 'pytorch-lightning_version').
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--trainer.limit_val_batches", "0", "--data.test_tasks", "5"]
    code, out = cli("fit", *short, "--trainer.max_steps", "2")
    assert code == 0, out[-3000:]
    last = tmp_path / "lightning_logs" / "maml_sinusoid" / "version_0" / "checkpoints" / "last.ckpt"
    (tmp_path / "cut.ckpt").write_bytes(last.read_bytes()[:20000])
    torch.save({"query_predictions": torch.zeros(2)}, tmp_path / "predictions.pt")
    expected = {
        "cut.ckpt": "error: --ckpt_path cut.ckpt is cut short (20,000 bytes; its end is missing): a run stopped while "
                    "saving it",
        SINUSOID: f"error: --ckpt_path {SINUSOID} is not a checkpoint file (a torch.save archive): it starts with b'# ",
        "predictions.pt": "error: --ckpt_path predictions.pt is not a Lightning checkpoint: it holds 'query_predictions' "
                          "but no 'state_dict'",
    }
    for path, message in expected.items():
        code, out = cli("test", *short, "--ckpt_path", path)
        assert code == 1 and message in out, out[-3000:]
        assert "Traceback" not in out
    # The checkpoint itself, and "last" (which resolves to it), still load.
    for path in (str(last), "last"):
        code, out = cli("test", *short, "--ckpt_path", path)
        assert code == 0, out[-3000:]


def test_runs_without_a_logger_resume_evaluate_and_keep_every_file(tmp_path, monkeypatch, cli):
    # With --trainer.logger false every run saves its config in default_root_dir: a resumed
    # fit, a test or a predict of the run there stopped ("holds the config an earlier run saved
    # there"), and the advice (another default_root_dir) broke --ckpt_path last. A second
    # predict overwrote the first's predictions.pt.
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--trainer.logger", "false", "--trainer.default_root_dir", "run",
             "--trainer.limit_val_batches", "0", "--data.test_tasks", "5"]
    for args in (("fit", "--trainer.max_steps", "2"), ("fit", "--trainer.max_steps", "4", "--ckpt_path", "last"),
                 ("test", "--ckpt_path", "last"), ("predict", "--ckpt_path", "last"), ("predict", "--ckpt_path", "last")):
        code, out = cli(args[0], *short, *args[1:])
        assert code == 0, (args, out[-3000:])
    run = tmp_path / "run"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(path.name for path in run.iterdir() if path.is_file()) == [
        "config.predict1.yaml", "config.predict2.yaml", "config.resume1.yaml", "config.test1.yaml", "config.yaml",
        "predictions.pt", "predictions1.pt"]
    # A new fit over the earlier one is still refused: its checkpoints would mix with the first's.
    code, out = cli("fit", *short, "--trainer.max_steps", "2")
    assert code == 1 and "holds the config an earlier run saved there" in out


def test_a_failed_resume_leaves_the_run_folder_as_it_was(tmp_path, monkeypatch, cli):
    # A resume refused at loading (another inner_steps: the weights do not fit) left
    # config.resume1.yaml, recording a run that never happened, and an events file.
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "mamlpp_sinusoid.yaml")
    code, out = cli("fit", "--config", config, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    assert code == 0, out[-3000:]
    run = tmp_path / "lightning_logs" / "mamlpp_sinusoid" / "version_0"
    before = sorted(path.name for path in run.iterdir())
    code, out = cli("fit", "--config", config, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
                    "--ckpt_path", "last", "--model.init_args.inner_steps", "3")
    assert code == 1 and "do not fit the model as configured" in out
    assert sorted(path.name for path in run.iterdir()) == before


def test_evaluating_without_a_checkpoint_is_an_explicit_choice(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--data.test_tasks", "10"]
    logs = tmp_path / "lightning_logs" / "maml_sinusoid"

    code, out = cli("test", *short)
    assert code == 1
    assert "error: test needs trained weights: pass --ckpt_path with a .ckpt file, or 'last' or 'best' (from the newest " \
           f"run in {Path('lightning_logs/maml_sinusoid/<version>/checkpoints')}). To test the untrained initial weights " \
           "on purpose, pass --untrained true." in out
    assert "Traceback" not in out and "test/mse" not in out

    for option in ("last", "best"):
        code, out = cli("test", *short, "--ckpt_path", option)
        assert code == 1
        assert f"error: --ckpt_path {option}: found no run with checkpoints: " \
               f"{Path('lightning_logs/maml_sinusoid')} does not exist. Pass the path of a .ckpt file" in out
    assert not logs.exists()  # failed runs leave no folder behind

    # A folder with runs but none with a checkpoint (a test of untrained weights, on purpose).
    code, out = cli("test", *short, "--untrained", "true")
    assert code == 0 and 0 < read_metric(out, "test/mse")
    code, out = cli("fit", *short, "--ckpt_path", "last")
    assert code == 1
    assert f"none of the 1 version folders in {Path('lightning_logs/maml_sinusoid')} (version_0) holds " \
           "checkpoints. Drop --ckpt_path to start a new run" in out
    assert versions(logs) == ["version_0"]


def test_bad_argument_is_one_short_message(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--model.init_args.inner_steps", "0")
    assert code == 1
    # Two lines, and the traceback's 69 lines gone.
    report = out[out.index("error:"):].splitlines()[:2]
    assert report[0] == "error: MAML: inner_steps must be at least 1, got 0."
    assert re.fullmatch(r"\(ValueError at fewshot_lightning\.algorithms\.maml:\d+; FEWSHOT_LIGHTNING_TRACEBACK=1 shows the traceback\)", report[1])
    assert "Union subtypes" not in out and "Traceback" not in out
    monkeypatch.setenv("FEWSHOT_LIGHTNING_TRACEBACK", "1")
    with pytest.raises(ValueError, match="Union subtypes"):
        main(["fit", "--config", SINUSOID, "--model.init_args.inner_steps", "0"])


def test_a_checkpoint_of_another_configuration_is_one_short_message(tmp_path, monkeypatch, cli):
    # Scoring weights with a config they were not trained with (here a smaller backbone) fails
    # in nn.Module with a bare "Error(s) in loading state_dict"; the user reads what and why.
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    assert code == 0, out[-3000:]
    code, out = cli("validate", "--config", SINUSOID, "--ckpt_path", "last", "--trainer.limit_val_batches", "1",
                    "--model.init_args.backbone.init_args.hidden", "[20, 20]")
    assert code == 1
    report = out[out.index("error:"):].splitlines()
    assert report[0].startswith("error: MAML: these weights do not fit the model as configured")
    assert "size mismatch for backbone" in report[0] and "torch.Size([20, 1])" in report[0]
    assert report[1].startswith("(WeightsMismatchError at fewshot_lightning.algorithms.base:")
    assert "Traceback" not in out


def test_a_batch_limit_of_1_is_one_batch_and_1_0_all_of_them(tmp_path, monkeypatch, cli):
    # Trainer reads an int as a number of batches and a float as a fraction. Lightning's CLI read
    # "--trainer.limit_test_batches 1" as 1.0 (its union type tried float first): every test
    # batch was scored, exit 0, where the user asked for one.
    from lightning.pytorch.callbacks import Callback

    from fewshot_lightning.cli import BATCH_LIMITS, build_cli

    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    assert code == 0, out[-3000:]

    class Count(Callback):
        batches = 0

        def on_test_batch_end(self, *args) -> None:
            self.batches += 1

    def tested(limit):
        count = Count()
        last = tmp_path / "lightning_logs" / "maml_sinusoid" / "version_0" / "checkpoints" / "last.ckpt"
        build_cli(["test", "--config", SINUSOID, "--ckpt_path", str(last), "--data.test_tasks", "100",
                   "--trainer.limit_test_batches", limit], callbacks=[count])
        return count.batches

    every = tested("1.0")
    assert every == 4  # 100 test tasks in batches of 25
    assert tested("1") == 1
    assert tested("3") == 3
    assert tested("0.5") == 2

    # The same in a config file, for all four options: 1 is an int, 1.0 a float.
    limits = tmp_path / "limits.yaml"
    limits.write_text("trainer:\n" + "".join(f"  {name}: {1 if i % 2 else 1.0}\n" for i, name in enumerate(BATCH_LIMITS)))
    parsed = FewShotCLI(MetaLearner, TaskDataModule, args=["--config", SINUSOID, "--config", str(limits),
                                                           "--trainer.logger", "false"],
                        run=False, subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False)
    for i, name in enumerate(BATCH_LIMITS):
        value = getattr(parsed.trainer, name)
        assert (type(value), value) == ((int, 1) if i % 2 else (float, 1.0)), name


@pytest.mark.parametrize("given, expected", [("2", (int, 2)), ("1", (int, 1)), ("0.25", (float, 0.25))])
def test_val_check_interval_reads_an_integer_as_batches(given, expected):
    # Lightning 2.5's Trainer types val_check_interval Union[float, int, None]: its CLI read "2" as
    # 2.0, which Trainer refuses with check_val_every_n_epoch null, and "1" as a whole epoch.
    # (Lightning 2.6 writes int first: there this checks that the order is kept.)
    parsed = FewShotCLI(MetaLearner, TaskDataModule, args=["--config", SINUSOID, "--trainer.logger", "false",
                                                           "--trainer.val_check_interval", given],
                        run=False, subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False)
    value = parsed.trainer.val_check_interval
    assert (type(value), value) == expected


def test_an_argument_the_checkpoint_holds_in_its_weights_cannot_be_changed_silently(tmp_path, monkeypatch, cli):
    # MAML++'s per-step inner learning rates are tensors the checkpoint restores: a test or a
    # resume with another --model.init_args.inner_lr ran the checkpoint's rates (the same
    # test/mse for 0.01 and 0.5), under a warning saying the configured value was used.
    monkeypatch.chdir(tmp_path)
    mamlpp = str(ROOT / "configs" / "mamlpp_sinusoid.yaml")
    code, out = cli("fit", "--config", mamlpp, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    assert code == 0, out[-3000:]
    for subcommand in ("test", "fit"):
        code, out = cli(subcommand, "--config", mamlpp, "--ckpt_path", "last", "--trainer.limit_test_batches", "1",
                        "--trainer.max_steps", "3", "--model.init_args.inner_lr", "0.5")
        assert code == 1, out[-3000:]
        assert ("--ckpt_path last.ckpt was saved with inner_lr=0.01 and this run sets inner_lr=0.5, but MAMLPlusPlus "
                "keeps inner_lr in its weights (inner_lr.rates), which the checkpoint restores: the configured value "
                "would not be used. Remove --model.init_args.inner_lr") in out, subcommand
    # The checkpoint's own value is accepted, and plain MAML (a float rate) still takes a new one.
    code, out = cli("test", "--config", mamlpp, "--ckpt_path", "last", "--trainer.limit_test_batches", "1",
                    "--model.init_args.inner_lr", "0.01")
    assert code == 0, out[-3000:]
    from fewshot_lightning.algorithms import MAML, MatchingNet, ProtoNet
    from fewshot_lightning.models import MLP, Conv4

    assert MAML(MLP()).arguments_in_weights() == {}
    assert MAML(MLP(), per_step_lr=True).arguments_in_weights() == {"inner_lr": "inner_lr.rates"}
    assert ProtoNet(Conv4(hidden=4, out_features=None, track_running_stats=True), scale=1.0).arguments_in_weights() == {
        "scale": "log_scale"}
    # With scale=None the distance sets the starting log_scale, which a checkpoint restores.
    assert ProtoNet(Conv4(hidden=4, out_features=None, track_running_stats=True)).arguments_in_weights() == {
        "scale": "log_scale", "distance": "log_scale, whose starting value the distance sets while scale is None"}
    assert MatchingNet(Conv4(hidden=4, out_features=None, track_running_stats=True), learn_scale=True).arguments_in_weights() == {
        "scale": "log_scale"}


def test_the_config_decides_not_the_checkpoints_saved_arguments(tmp_path, monkeypatch, cli):
    # Lightning's CLI replaced the configured model arguments with those saved in a checkpoint
    # given by path (not for "last"): a test asked for 3 inner steps ran the saved 10, and a
    # checkpoint of another learner swapped the configured one, exit 0 both.
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    assert code == 0, out[-3000:]
    path = str(Path("lightning_logs/maml_sinusoid/version_0/checkpoints/last.ckpt"))
    for checkpoint in ("last", path):
        code, out = cli("test", "--config", SINUSOID, "--ckpt_path", checkpoint, "--trainer.limit_test_batches", "1",
                        "--model.init_args.test_inner_steps", "3")
        assert code == 0, out[-3000:]
        # The adaptation curve: after 0, 1, 2 and 3 steps, none after 4.
        assert "test/mse_after_3_steps" in out and "test/mse_after_4_steps" not in out, checkpoint
        assert ("--ckpt_path last.ckpt was saved with test_inner_steps=10; this run uses test_inner_steps=3, as "
                "configured") in out, checkpoint
    # No warning where they agree.
    code, out = cli("test", "--config", SINUSOID, "--ckpt_path", path, "--trainer.limit_test_batches", "1")
    assert code == 0 and "was saved with" not in out
    from fewshot_lightning.algorithms.base import same_value
    assert same_value((0.0, 0.999), [0.0, 0.999]) and not same_value([0.0, 0.9], [0.0, 0.999])
    assert same_value(torch.ones(2), torch.ones(2)) and not same_value(torch.ones(2), torch.zeros(2))

    # A checkpoint of another learner: one short error naming both.
    reptile = str(ROOT / "configs" / "reptile_sinusoid.yaml")
    code, out = cli("test", "--config", reptile, "--ckpt_path", path, "--trainer.limit_test_batches", "1")
    assert code == 1
    assert (f"error: --ckpt_path {path} was saved by fewshot_lightning.algorithms.MAML, but the config's model is "
            "fewshot_lightning.algorithms.reptile.Reptile: pass the config of the run that saved it") in out


def test_a_checkpoint_the_comparison_cannot_read_is_left_to_lightning(tmp_path):
    # An old (non-zip) file cannot be memory-mapped: the comparison steps aside instead of
    # failing with a traceback of its own (Lightning's load then reports what it finds).
    old = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "elsewhere.Other"}}, old, _use_new_zipfile_serialization=False)

    class Configured:
        model = None  # never reached: nothing was read

    assert FewShotCLI._compare_with(Configured(), str(old)) is None


def test_a_second_run_without_a_logger_keeps_the_first_ones_config(tmp_path, monkeypatch, cli):
    # Without a logger a run saves its config.yaml in default_root_dir; Lightning refuses to
    # overwrite another run's, which printed a traceback whose fixes were LightningCLI's Python
    # arguments. One short message, the file kept.
    monkeypatch.chdir(tmp_path)
    short = ["fit", "--config", SINUSOID, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
             "--trainer.logger", "false"]
    code, out = cli(*short)
    assert code == 0, out[-3000:]
    saved = (tmp_path / "config.yaml").read_text()
    code, out = cli(*short, "--model.init_args.inner_lr", "0.5")
    assert code == 1
    assert (f"error: {tmp_path / 'config.yaml'} holds the config an earlier run saved there (runs without a logger "
            f"save theirs in the trainer's default_root_dir, {tmp_path}); it is kept. Pass --trainer.default_root_dir "
            "with another folder") in out
    assert "Traceback" not in out
    assert (tmp_path / "config.yaml").read_text() == saved


def test_nonfinite_loss_stops_the_run_and_names_the_batch(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    # An inner step of 1e30 makes every adapted network, so every query loss, inf or NaN.
    diverging = ["--config", SINUSOID, "--model.init_args.inner_lr", "1e30", "--trainer.max_steps", "5",
                 "--trainer.num_sanity_val_steps", "0", "--model.init_args.batching", "vmap"]
    code, out = cli("fit", *diverging)
    assert code == 1
    assert "error: Non-finite training loss at global_step 0 (epoch 0, batch_idx 0): tasks 0, 1, 2, 3, 4, 5, 6, 7 and " \
           "17 more of the 25 in the batch (counting from 0) had a loss of " in out
    assert "Their training-set indices: 0, 1, 2, 3, 4, 5, 6, 7 and 17 more" in out
    assert "Stopped the run." in out and "--nonfinite.policy skip" in out
    assert not (tmp_path / "lightning_logs" / "maml_sinusoid").exists()  # nothing trained: no folder left

    # Skipping, the run goes on, but not forever: the third bad step in a row stops it.
    code, out = cli("fit", *diverging, "--nonfinite.policy", "skip", "--nonfinite.max_consecutive_skips", "2")
    assert code == 1
    assert out.count("Skipped the step") == 2
    assert "Non-finite training loss at global_step 2 (epoch 0, batch_idx 2)" in out
    assert "Their training-set indices: 50, 51, 52" in out  # the third batch of 25 tasks
    assert "That is 3 non-finite steps in a row (max_consecutive_skips=2): stopped the run" in out


def test_runs_started_together_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fewshot-lightning"])
    # Both CLIs exist before either writes a thing, as two runs started at the same moment:
    # Lightning's logger alone would give both version_0.
    first, second = (FewShotCLI(MetaLearner, TaskDataModule, args=["--config", SINUSOID], run=False, subclass_mode_model=True,
                                subclass_mode_data=True, auto_configure_optimizers=False) for _ in range(2))
    first._claim_run_folder(None)
    second._claim_run_folder(None)
    assert (first.trainer.logger.version, second.trainer.logger.version) == (0, 1)
    assert versions(tmp_path / "lightning_logs" / "maml_sinusoid") == ["version_0", "version_1"]


def test_help_lists_algorithm_arguments(cli):
    code, out = cli("fit", "--model", "fewshot_lightning.algorithms.MAML", "--model.help", "fewshot_lightning.algorithms.MAML")
    assert code == 0
    for argument in ("inner_lr", "inner_steps", "test_inner_steps", "first_order", "per_parameter_lr"):
        assert argument in out


def test_our_deliberate_errors_are_told_from_failing_calls_by_the_bytecode_not_the_source(monkeypatch):
    # The CLI reports a ValueError our code raises on purpose in two lines, and a call failing
    # on one of our lines with its traceback. It used to tell them apart by reading the line back
    # from the source file, which a user may be editing while a run goes on (a shifted file gave
    # a traceback for a deliberate error): with every source line unreadable, the same answers.
    import linecache

    from fewshot_lightning.cli import _raised_by_raise_statement, _user_error
    from fewshot_lightning.inner import select_parameters

    def failing_call():
        return open("/nonexistent/folder/file")  # OSError from a builtin, on this line

    errors = []
    for action in (lambda: select_parameters(torch.nn.Linear(1, 1), ["nope"]), failing_call):
        try:
            action()
        except (ValueError, OSError) as error:
            errors.append(error)
    deliberate, failed = errors
    monkeypatch.setattr(linecache, "getline", lambda *args, **kwargs: "")
    assert _raised_by_raise_statement(deliberate) and not _raised_by_raise_statement(failed)
    assert _user_error(deliberate) is deliberate
    assert _user_error(failed) is None  # raised outside the package, and by a call


@pytest.mark.parametrize("args,expected", [
    (["--model.init_args.inner_steps", "abc"], "error: --model.init_args.inner_steps: Expected a <class 'int'>. Got value: abc"),
    (["--model.init_args.foo", "1"], "error: --model.init_args.foo: not an argument of fewshot_lightning.algorithms.MAML"),
    (["--data.init_args.shots", "x"], "error: --data.init_args.shots: Expected a <class 'int'>. Got value: x"),
    (["--trainer.max_steps", "x"], "error: --trainer.max_steps: Expected a <class 'int'>. Got value: x"),
    (["--bogus", "3"], "error: unrecognized arguments: --bogus 3"),
])
def test_a_value_the_parser_refuses_is_one_short_message(args, expected, tmp_path, monkeypatch, cli):
    # A wrong type on the command line printed argparse's sixty-line usage and jsonargparse's
    # nested report of each Union member tried, and exited with 2, not the 1 the README promises.
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, *args)
    assert code == 1
    lines = out[out.index("error:"):].splitlines()
    assert lines[0] == expected
    assert lines[1] == ("(fewshot-lightning fit --help lists the arguments; FEWSHOT_LIGHTNING_TRACEBACK=1 shows the "
                        "parser's whole report)")
    assert "usage:" not in out and "Union subtypes" not in out
    monkeypatch.setenv("FEWSHOT_LIGHTNING_TRACEBACK", "1")
    code, out = cli("fit", "--config", SINUSOID, *args)
    assert code == 2 and "usage:" in out


def test_a_scalar_for_a_list_argument_says_a_list_is_expected():
    # The nested Union of an Optional[Sequence] argument condensed to nothing: "error: --model.init_args.adapt: ".
    from fewshot_lightning.cli import condensed_parse_error

    report = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'fewshot_lightning.algorithms.base.MetaLearner'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'fewshot_lightning.algorithms.MAMLRL':
        Parser key "adapt":
          Does not validate against any of the Union subtypes
          Subtypes: [typing.Sequence[str], <class 'NoneType'>]
          Errors:
            - Expected a <class 'collections.abc.Sequence'>
            - Expected a <class 'NoneType'>
          Given value type: <class 'str'>
          Given value: head.
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='adapt', val='head.')"""
    assert condensed_parse_error(report) == "--model.init_args.adapt: Expected a list, e.g. [a, b]. Got value: head."


def test_a_nested_class_argument_is_named_as_typed():
    from fewshot_lightning.cli import condensed_parse_error

    report = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'fewshot_lightning.algorithms.MAML':
        Parser key "backbone":
          Problem with given class_path 'fewshot_lightning.models.MLP':
            Parser key "hidden":
              Expected a <class 'collections.abc.Sequence'>. Got value: 8
    - Expected a <class 'NoneType'>
  Given value: NestedArg(key='backbone.init_args.hidden', val='8')"""
    assert condensed_parse_error(report) == ("--model.init_args.backbone.init_args.hidden: Expected a list, e.g. [a, b]. "
                                             "Got value: 8")


def test_trainer_settings_lightning_divides_by_or_refuses_are_one_short_message(tmp_path, monkeypatch, cli):
    # accumulate_grad_batches 0 and val_check_interval 0 ended in "integer modulo by zero" inside
    # Lightning's loop; a val_check_interval above the epoch's batches in Lightning's traceback.
    monkeypatch.chdir(tmp_path)
    for args, expected in [
        (["--trainer.accumulate_grad_batches", "0"], "error: --trainer.accumulate_grad_batches must be at least 1"),
        (["--trainer.val_check_interval", "0"], "error: --trainer.val_check_interval must be positive"),
        (["--trainer.val_check_interval", "10", "--data.init_args.train_tasks", "200", "--trainer.max_steps", "20",
          "--trainer.check_val_every_n_epoch", "1"],
         "error:  `val_check_interval` (10) must be less than or equal to the number of the training batches (8)"),
        # Lightning's device layer (lightning.fabric) refuses with a TypeError: -1 (all GPUs) on a CPU was a
        # 30-line traceback; so was an accelerator whose package is missing.
        (["--trainer.accelerator", "cpu", "--trainer.devices", "-1"],
         "error: `devices` selected with `CPUAccelerator` should be an int > 0."),
        (["--trainer.accelerator", "tpu"], "error: XLAAccelerator: Requirement 'torch_xla"),
    ]:
        code, out = cli("fit", "--config", SINUSOID, *args)
        assert code == 1 and expected in out and "Traceback" not in out, out[-3000:]
        # Nothing left of a first run that failed before a batch: not even an empty lightning_logs/.
        assert not (tmp_path / "lightning_logs").exists(), list(tmp_path.rglob("*"))


def test_files_that_are_not_run_checkpoints_are_named(tmp_path, monkeypatch, cli):
    # A state_dict saved with torch.save, a list, an old pickle and a folder reached Lightning's
    # loader: KeyError 'pytorch-lightning_version', a TypeError, "no such file" for a folder.
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")
    assert code == 0, out[-3000:]
    saved = torch.load(next(tmp_path.glob("lightning_logs/*/version_0/checkpoints/last.ckpt")), weights_only=False)
    torch.save({"state_dict": saved["state_dict"]}, tmp_path / "weights.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    torch.save({"state_dict": saved["state_dict"]}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    (tmp_path / "folder.ckpt").mkdir()
    for name, expected in [
        ("weights.ckpt", "holds a 'state_dict' but not the rest of a Lightning checkpoint (no 'pytorch-lightning_version'"),
        ("list.ckpt", "is not a Lightning checkpoint: it holds a list"),
        ("old.ckpt", "the file is not a Lightning checkpoint (it has no 'pytorch-lightning_version' entry)"),
        ("folder.ckpt", "--ckpt_path folder.ckpt is a folder: pass a checkpoint file"),
    ]:
        code, out = cli("test", "--config", SINUSOID, "--ckpt_path", name, "--trainer.limit_test_batches", "1")
        assert code == 1 and expected in out and "Traceback" not in out, (name, out[-3000:])


def test_a_learner_whose_backbone_argument_has_no_type_is_told_to_annotate_it(tmp_path, monkeypatch, cli):
    # The README's custom learner without `backbone: nn.Module`: any backbone option on the
    # command line reached the learner as jsonargparse's NestedArg, and a whole traceback ended
    # in "backbone must be a torch.nn.Module ..., got NestedArg".
    (tmp_path / "untyped_learner.py").write_text(
        "from fewshot_lightning.algorithms import MAML\n\n\n"
        "class Untyped(MAML):\n"
        "    def __init__(self, backbone, inner_lr: float = 0.4, **kwargs):\n"
        "        super().__init__(backbone, inner_lr=inner_lr, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--model", "untyped_learner.Untyped", "--model.backbone",
                    "fewshot_lightning.models.MLP", "--model.backbone.in_features", "1", "--trainer.max_steps", "1")
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert "annotate the argument, `backbone: torch.nn.Module`, in Untyped.__init__" in out


def test_optimizer_arguments_torch_refuses_are_named_in_one_line(tmp_path, monkeypatch, cli):
    # torch.optim's ValueError ("Invalid learning rate: -1.0") ended in a 55-line traceback; the
    # learner's own arguments already got one line.
    monkeypatch.chdir(tmp_path)
    for argument, message in ((["--model.init_args.optimizer.init_args.lr", "-1"], "Invalid learning rate: -1.0"),
                              (["--model.init_args.optimizer.init_args.betas", "[0.9,1.5]"],
                               "Invalid beta parameter at index 1: 1.5")):
        code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "2", *argument)
        assert code == 1 and f"error: Adam: {message} (refused by torch.optim: see --model.init_args.optimizer" in out, out[-3000:]
        assert "Traceback" not in out
    assert not (tmp_path / "lightning_logs" / "maml_sinusoid").exists() or not any(
        (tmp_path / "lightning_logs" / "maml_sinusoid").iterdir())  # nothing left of the refused runs


def test_switching_off_the_progress_bar_or_checkpointing_drops_the_configs_callbacks(tmp_path, monkeypatch, cli):
    # Lightning's Trainer refused the flags on every shipped config ("configured with
    # enable_progress_bar=False but found TQDMProgressBar in callbacks list").
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false")
    assert code == 0, out[-3000:]
    assert "--trainer.enable_progress_bar false: the config's TQDMProgressBar callback is left out." in out
    assert "--trainer.enable_checkpointing false: the config's LastCheckpoint callback is left out. No checkpoint" in out
    run = tmp_path / "lightning_logs" / "maml_sinusoid" / "version_0"
    assert run.is_dir() and not list(run.rglob("*.ckpt"))
    assert "Epoch 0:" not in out  # no progress bar


def test_last_is_the_newest_run_also_when_it_has_a_named_version(tmp_path, monkeypatch, cli):
    # `--ckpt_path last` looked at version_N folders only: after a run given a version name, it
    # tested (and resumed) the older version_0, exit 0.
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--trainer.limit_val_batches", "0", "--data.test_tasks", "5", "--trainer.max_steps"]
    code, out = cli("fit", *short, "2")
    assert code == 0, out[-3000:]
    code, out = cli("fit", *short, "3", "--trainer.logger.init_args.version", "exp2")
    assert code == 0, out[-3000:]
    runs = Path("lightning_logs") / "maml_sinusoid"
    code, out = cli("test", *short, "2", "--ckpt_path", "last")
    assert code == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {runs / 'exp2' / 'checkpoints' / 'last.ckpt'}" in out
    # Resumed and trained on, version_0 holds the newest last checkpoint: `last` is it.
    code, out = cli("fit", *short, "4", "--ckpt_path", str(runs / "version_0" / "checkpoints" / "last.ckpt"))
    assert code == 0, out[-3000:]
    code, out = cli("test", *short, "2", "--ckpt_path", "last")
    assert code == 0, out[-3000:]
    assert "version_0" in re.search(r"Restoring states from the checkpoint path at (\S+)", out).group(1)


def test_last_and_best_never_take_an_older_run_in_place_of_the_newest(tmp_path, monkeypatch, cli):
    # A run killed before its first last checkpoint (LastCheckpoint saves every 2,000 steps)
    # was passed over: `fit --ckpt_path last` ("the same command") resumed the finished run before
    # it and overwrote that run's last.ckpt; `best` took the older run's best, and a config
    # without LastCheckpoint found "no run with checkpoints" beside a best-step=N.ckpt.
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--data.val_tasks", "25", "--trainer.limit_val_batches", "1",
             "--data.test_tasks", "5", "--trainer.val_check_interval", "2", "--trainer.max_steps"]
    code, out = cli("fit", *short, "2")
    assert code == 0, out[-3000:]
    runs = Path("lightning_logs") / "maml_sinusoid"
    finished = (runs / "version_0" / "checkpoints" / "last.ckpt").read_bytes()
    code, out = cli("fit", *short, "4")
    assert code == 0, out[-3000:]
    newest = runs / "version_1" / "checkpoints"
    (newest / "last.ckpt").unlink()  # as if killed before saving it
    best = next(newest.glob("best-*.ckpt"))
    code, out = cli("fit", *short, "6", "--ckpt_path", "last")
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert (f"error: --ckpt_path last: the newest run, {runs / 'version_1'}, holds only {best.name}, no last.ckpt: it "
            f"stopped before its first last checkpoint") in out, out[-3000:]
    assert f"Pass one of its checkpoints to go on from it (--ckpt_path {best})" in out
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").read_bytes() == finished
    code, out = cli("test", *short, "2", "--ckpt_path", "best")
    assert code == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {best}" in out
    # The test's run folder records the file `best` meant then (it said `ckpt_path: best`).
    tested = max(runs.glob("version_*"), key=lambda run: int(run.name.split("_")[1]))
    assert f"ckpt_path: {best}\n" in (tested / "config.yaml").read_text()
    # Killed before any checkpoint: still the newest run (its checkpoint folder is made at the start).
    best.unlink()
    code, out = cli("test", *short, "2", "--ckpt_path", "last")
    assert code == 1 and f"the newest run, {runs / 'version_1'}, holds no checkpoint, no last.ckpt" in out, out[-3000:]
    # Evaluation runs save no checkpoint and are not runs that trained: the version_1 fit stays the newest.
    assert not (runs / "version_2" / "checkpoints").exists() and not (runs / "version_3" / "checkpoints").exists()


def test_a_run_with_a_named_version_resumed_by_last_goes_on_in_its_folder(tmp_path, monkeypatch, cli):
    # `fit --ckpt_path last` restored exp1's last.ckpt, then wrote the continuation (its events,
    # last.ckpt, best checkpoint) into a new version_0 folder: the run's curves split in two.
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--trainer.limit_val_batches", "0", "--data.test_tasks", "5", "--trainer.max_steps"]
    code, out = cli("fit", *short, "2", "--trainer.logger.init_args.version", "exp1")
    assert code == 0, out[-3000:]
    code, out = cli("fit", *short, "4", "--ckpt_path", "last")
    assert code == 0, out[-3000:]
    runs = Path("lightning_logs") / "maml_sinusoid"
    assert sorted(path.name for path in runs.iterdir()) == ["exp1"]
    assert torch.load(runs / "exp1" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert (runs / "exp1" / "config.resume1.yaml").is_file()


def test_a_named_run_killed_before_its_first_save_is_still_the_newest(tmp_path, monkeypatch, cli):
    # The checkpoint folder a fit makes at its start was made for numbered runs only: a run given a
    # version name and killed before its first save was passed over, and `fit --ckpt_path last`
    # trained the finished version_0 on, overwriting its last.ckpt.
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--trainer.limit_val_batches", "0", "--data.test_tasks", "5", "--trainer.max_steps"]
    code, out = cli("fit", *short, "2")
    assert code == 0, out[-3000:]
    runs = Path("lightning_logs") / "maml_sinusoid"
    finished = (runs / "version_0" / "checkpoints" / "last.ckpt").read_bytes()
    code, out = cli("fit", *short, "2", "--trainer.logger.init_args.version", "exp1")
    assert code == 0, out[-3000:]
    (runs / "exp1" / "checkpoints" / "last.ckpt").unlink()  # as if killed before its first save
    code, out = cli("fit", *short, "4", "--ckpt_path", "last")
    assert code == 1 and f"the newest run, {runs / 'exp1'}, holds no checkpoint, no last.ckpt" in out, out[-3000:]
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").read_bytes() == finished
    # Named again, it is refused without pointing at a last.ckpt it does not have.
    code, out = cli("fit", *short, "4", "--trainer.logger.init_args.version", "exp1")
    assert code == 1 and "holds an earlier run" in out and "to train that run on" not in out, out[-3000:]
    # A named fit that fails before its first batch leaves no folder (and so no empty run in the way).
    code, out = cli("fit", *short, "2", "--trainer.logger.init_args.version", "exp2", "--model.init_args.inner_lr", "-1")
    assert code == 1 and not (runs / "exp2").exists(), out[-3000:]


def test_a_log_folder_that_cannot_be_made_is_named_with_the_fix(tmp_path, monkeypatch, cli):
    # A read-only (or full) save_dir stopped with a 37-line traceback from Path.mkdir that did
    # not name the option to change.
    import errno

    monkeypatch.chdir(tmp_path)
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "readonly" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "1",
                    "--trainer.logger.init_args.save_dir", "readonly/logs")
    assert code == 1 and "Traceback" not in out
    assert (f"error: Cannot make the run's log folder {Path('readonly/logs/maml_sinusoid/version_0')}: Read-only file "
            "system. Point --trainer.logger.init_args.save_dir at a folder you can write to.") in " ".join(out.split())


def test_resuming_into_a_run_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch, cli):
    # A read-only run folder (a finished run archived read-only, chattr +i) failed in TensorBoard's
    # writer thread with a 30-line PermissionError traceback. (Simulated: root writes anywhere.)
    import errno
    import tempfile

    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--trainer.limit_val_batches", "0", "--data.test_tasks", "5", "--trainer.max_steps"]
    code, out = cli("fit", *short, "2")
    assert code == 0, out[-3000:]
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and "version_0" in str(dir):
            raise OSError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, out = cli("fit", *short, "4", "--ckpt_path", "last")
    assert code == 1 and "Traceback" not in out, out[-3000:]
    run = Path("lightning_logs") / "maml_sinusoid" / "version_0"
    assert (f"error: Cannot write into the resumed run's folder {run.resolve()}: Permission denied. A resumed fit goes on "
            "writing there") in " ".join(out.split())


def test_help_says_what_ckpt_path_takes_here(cli):
    # --help gave Lightning's text for Trainer.fit ("If None and the model instance was passed, use
    # the current weights"), which this command refuses.
    for subcommand in ("fit", "test"):
        code, out = cli(subcommand, "--help")
        text = " ".join(out.split())
        assert code == 0 and "a checkpoint file, or 'last' (the newest last checkpoint of this config's runs" in text
        assert "required, unless --untrained true scores the initial weights" in text
        assert "use the current weights" not in text


def test_several_nodes_without_a_launcher_are_refused(tmp_path, monkeypatch, cli):
    # `--trainer.num_nodes 2` on one machine (no SLURM, no torchrun) waited for the other node until
    # the process group timed out (half an hour), leaving an empty run folder.
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith(("SLURM_", "MASTER_", "TORCHELASTIC", "GROUP_RANK"))]:
        monkeypatch.delenv(name)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.max_steps", "1", "--trainer.num_nodes", "2")
    assert code == 1
    assert ("error: --trainer.num_nodes 2 without a launcher for the other machines (no SLURM job, no torchrun, no "
            "MASTER_ADDR)") in " ".join(out.split())
    assert not (tmp_path / "lightning_logs").exists()


def test_a_named_version_resumes_from_its_hpc_checkpoint(tmp_path, monkeypatch, cli):
    # A requeued job with a named version (`--ckpt_path hpc`, or none under SLURM) was refused as
    # writing into an earlier run, pointed at a last.ckpt older than the HPC checkpoint.
    import shutil

    monkeypatch.chdir(tmp_path)
    run = ["fit", "--config", SINUSOID, "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.version", "exp1"]
    code, out = cli(*run, "--trainer.max_steps", "2")
    assert code == 0, out[-3000:]
    folder = Path("lightning_logs") / "maml_sinusoid" / "exp1"
    shutil.copy(folder / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt")  # default_root_dir: here
    code, out = cli(*run, "--trainer.max_steps", "3", "--ckpt_path", "hpc")
    assert code == 0, out[-3000:]
    assert (folder / "config.resume1.yaml").is_file()
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    # Without a checkpoint to go on from, the folder is still refused.
    code, out = cli(*run, "--trainer.max_steps", "3")
    assert code == 1 and "holds an earlier run" in out


def test_a_checkpoint_older_than_an_argument_is_said(tmp_path, monkeypatch, cli):
    # A CNP run saved before training_context existed resumed with the new default (the paper's
    # objective) without a word: the two halves of the run trained on different objectives.
    monkeypatch.chdir(tmp_path)
    config = str(Path(SINUSOID).parent / "cnp_sinusoid.yaml")
    run = ["fit", "--config", config, "--trainer.limit_val_batches", "0", "--data.init_args.test_tasks", "4"]
    code, out = cli(*run, "--trainer.max_steps", "2")
    assert code == 0, out[-3000:]
    last = next(Path("lightning_logs").rglob("last.ckpt"))
    checkpoint = torch.load(last, weights_only=False)
    del checkpoint["hyper_parameters"]["training_context"]  # as the code of 2026-11-29 saved it
    torch.save(checkpoint, tmp_path / "older.ckpt")
    code, out = cli(*run, "--trainer.max_steps", "3", "--ckpt_path", "older.ckpt")
    assert code == 0, out[-3000:]
    assert ("--ckpt_path older.ckpt was saved before CNP took training_context; this run uses "
            "training_context='random', as configured.") in " ".join(out.split())


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_asked_for_on_a_machine_without_one_names_the_cpu(tmp_path, monkeypatch, cli):
    # Lightning's "No supported gpu backend found!" said neither that no GPU is visible nor the fix.
    monkeypatch.chdir(tmp_path)
    code, out = cli("fit", "--config", SINUSOID, "--trainer.accelerator", "gpu", "--trainer.max_steps", "1")
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert ("error: No supported gpu backend found! PyTorch sees no GPU here (no CUDA device, no MPS): train with "
            "--trainer.accelerator cpu (or auto)") in out
