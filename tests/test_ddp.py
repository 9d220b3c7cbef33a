"""Two-process DDP on the CPU (gloo): a resumed run continues exactly, episodes are split
across ranks, and metrics and predictions are gathered over all of them."""
import torch

from test_cli import SINUSOID, read_metric, run_cli, versions

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
# Epochs of 3 steps (150 tasks: 3 batches of 25 on each of 2 ranks), validation every 2 steps.
SHORT = ["--config", SINUSOID, "--data.train_tasks", "150", "--data.val_tasks", "20", "--trainer.val_check_interval", "2",
         "--trainer.check_val_every_n_epoch", "null", "--model.init_args.batching", "vmap"]


def test_ddp_resume_and_evaluation_equal_single_process(tmp_path, monkeypatch, cli):
    chain, reference = tmp_path / "chain", tmp_path / "reference"
    chain.mkdir(), reference.mkdir()
    # Stopped mid-epoch after step 2, resumed across the epoch's end to step 4.
    outputs = [run_cli("fit", *SHORT, *DDP, "--trainer.max_steps", "2", cwd=chain)]
    outputs.append(run_cli("fit", *SHORT, *DDP, "--trainer.max_steps", "4", "--ckpt_path", "last", cwd=chain))
    outputs.append(run_cli("fit", *SHORT, *DDP, "--trainer.max_steps", "4", cwd=reference))
    assert "distributed_backend=gloo" in outputs[0]
    logs = "lightning_logs/maml_sinusoid"
    assert versions(chain / logs) == ["version_0"]
    resumed = torch.load(chain / logs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    uninterrupted = torch.load(reference / logs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == uninterrupted["global_step"] == 4
    for name, weight in uninterrupted["state_dict"].items():
        assert (resumed["state_dict"][name] - weight).abs().max() <= 1e-6, name

    # 101 test tasks: the two ranks get 51 and 50 (every task exactly once, none padded in).
    test = ["test", *SHORT, "--ckpt_path", "last", "--data.test_tasks", "101", "--data.meta_batch_size", "10"]
    monkeypatch.chdir(reference)
    code, single = cli(*test)  # in this process: one start-up less
    assert code == 0, single[-3000:]
    outputs.append(run_cli(*test, *DDP, cwd=reference))
    # The same 101 episodes, scored on two processes and reduced, give the single-process numbers.
    for name in ("test/mse", "test/mse_ci95", "test/mse_after_0_steps"):
        assert abs(read_metric(single, name) - read_metric(outputs[-1], name)) < 1e-4 * max(1.0, read_metric(single, name))

    # predict on two processes writes one file: every task once, in order, scoring as test did.
    outputs.append(run_cli("predict", *test[1:], *DDP, cwd=reference))
    predictions = torch.load(reference / logs / "version_3" / "predictions.pt", weights_only=True)
    assert predictions["task_index"].tolist() == list(range(101))
    per_task = (predictions["query_predictions"] - predictions["query_y"]).square().mean((1, 2))
    assert abs(per_task.mean().item() - read_metric(single, "test/mse")) < 1e-4 * max(1.0, read_metric(single, "test/mse"))

    # Lightning's advice to sync metrics that are already reduced: not shown.
    assert not any("sync_dist" in out for out in outputs)
