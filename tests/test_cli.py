"""The command line, end to end, in a subprocess: fit, then test from the checkpoint."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "fewshot_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_fit_then_test_from_checkpoint(tmp_path):
    config = str(ROOT / "configs" / "maml_sinusoid.yaml")
    short = ["--trainer.max_steps", "60", "--trainer.val_check_interval", "30", "--data.val_tasks", "50",
             "--data.test_tasks", "100", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    run_cli("fit", "--config", config, *short, cwd=tmp_path)
    run_dir = tmp_path / "logs" / "maml_sinusoid" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard logs
    assert (run_dir / "config.yaml").is_file()  # the exact config, to rerun it

    out = run_cli("test", "--config", config, *short, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), cwd=tmp_path)
    # Lightning's results table lists the MSE and its 95% interval over the 100 test tasks.
    mse = float(re.search(r"test/mse\s+│?\s*([0-9.]+)", out).group(1))
    ci95 = float(re.search(r"test/mse_ci95\s+│?\s*([0-9.]+)", out).group(1))
    # An MLP that outputs ~0 scores about the targets' second moment, E[A^2]/2 ~ 4.2; any real
    # run lands below 6 and above 0, with an interval narrower than the mean.
    assert 0 < mse < 6
    assert 0 < ci95 < mse
    # The second run logs to a new version: nothing of the first is overwritten.
    assert (tmp_path / "logs" / "maml_sinusoid" / "version_1").is_dir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_help_lists_algorithm_arguments(tmp_path):
    out = run_cli("fit", "--model", "fewshot_lightning.algorithms.MAML", "--model.help", "fewshot_lightning.algorithms.MAML", cwd=tmp_path)
    for argument in ("inner_lr", "inner_steps", "test_inner_steps", "first_order", "per_parameter_lr"):
        assert argument in out
