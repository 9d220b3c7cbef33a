"""Two-process DDP on the CPU (gloo): episodes split across ranks, metrics synced over all of them."""
import re

from test_cli import ROOT, run_cli


def read_metric(out, name):
    return float(re.search(rf"{name}\s+│?\s*([0-9.]+)", out).group(1))


def test_ddp_test_metrics_equal_single_process(tmp_path):
    config = str(ROOT / "configs" / "maml_sinusoid.yaml")
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    run_cli("fit", "--config", config, *logs, "--trainer.max_steps", "30", "--trainer.val_check_interval", "30",
            "--data.val_tasks", "20", cwd=tmp_path)
    ckpt = str(tmp_path / "logs" / "maml_sinusoid" / "version_0" / "checkpoints" / "last.ckpt")
    # 101 test tasks: the two ranks get 51 and 50 (every task exactly once, none padded in).
    test = ["test", "--config", config, *logs, "--ckpt_path", ckpt, "--data.test_tasks", "101",
            "--data.meta_batch_size", "10"]
    single = run_cli(*test, cwd=tmp_path)
    double = run_cli(*test, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     cwd=tmp_path)
    assert "ddp" in double.lower() or "distributed" in double.lower()
    # The same 101 episodes, scored on two processes and reduced, give the single-process numbers.
    for name in ("test/mse", "test/mse_ci95", "test/mse_after_0_steps"):
        assert abs(read_metric(single, name) - read_metric(double, name)) < 1e-4 * max(1.0, read_metric(single, name))
