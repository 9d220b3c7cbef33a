"""Two-process DDP on the CPU (gloo): a resumed run continues exactly, episodes are split
across ranks, metrics and predictions are gathered over all of them, and W processes with B/W
tasks each take the same training steps as one process with B tasks."""
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from cli_support import run_cli as run_cli_with_tests
from fewshot_lightning.algorithms import MetaLearner
from fewshot_lightning.cli import main as cli_main
from fewshot_lightning.data import TaskDataModule
from test_cli import ROOT, SINUSOID, read_metric, run_cli, versions

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


def test_ddp_chooses_the_group_size_once_for_every_process(tmp_path):
    # tasks_per_backward="auto" times group sizes in a run of 200 steps or more: every process
    # times its own steps, then all take process 0's choice (a broadcast every process must
    # reach, or the run hangs). One decision in the log, the run to its end, and the checkpoint
    # records what was chosen.
    output = run_cli("fit", *SHORT, *DDP, "--trainer.max_steps", "200", "--trainer.val_check_interval", "100",
                     "--trainer.log_every_n_steps", "100", cwd=tmp_path)
    assert output.count("tasks_per_backward='auto' chose") == 1, output[-3000:]
    checkpoint = torch.load(tmp_path / "lightning_logs/maml_sinusoid/version_0/checkpoints/last.ckpt",
                            weights_only=False)
    assert checkpoint["global_step"] == 200
    # 25 tasks on each process: the whole batch, or groups of 13, 7, 4, 2 or 1.
    assert checkpoint["tasks_per_backward_chosen"] in (None, 13, 7, 4, 2, 1)
    assert "one training step of 25 tasks on 'vmap'" in output


# -- parity: W processes with B/W tasks each take the same steps as 1 process with B tasks --------
# DDP averages the W gradients; each is the mean loss gradient over B/W tasks, so their mean is
# the single process's gradient over the same B tasks (EpisodeSampler gives rank r tasks
# r, r+W, ..., so step i covers tasks iB..(i+1)B-1 either way). Reptile's outer step is the
# gradient of ||theta - phi||^2 / 2, so DDP averages it the same way. Add a learner by adding
# its CLI arguments here; regression configs on sinusoid and tiny backbones keep each case cheap.
PARITY_STEPS, META_BATCH, WORLD = 3, 4, 2
PARITY_CASES = {
    **{name: ["--config", str(ROOT / "configs" / f"{config}_sinusoid.yaml"), "--model.init_args.batching", "vmap",
              "--data.init_args.val_tasks", "20"]
       # MAML++ trains through MAML's outer step; add ("MAMLPlusPlus", "mamlpp") to check it too.
       # Reptile's outer step is a gradient of its own; iMAML and CAVIA train through the base
       # training step like MAML, so MAML's case covers how DDP averages them (each case costs
       # two CLI runs: add ("iMAML", "imaml"), ("CAVIA", "cavia") to check them directly).
       for name, config in [("MAML", "maml"), ("Reptile", "reptile")]},
    # The meta-gradient accumulated a task at a time, handed over in one backward pass, which
    # DDP's hooks average as any other.
    "MAML, tasks_per_backward 1": ["--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), "--model.init_args.batching",
                                   "vmap", "--data.init_args.val_tasks", "20", "--model.init_args.tasks_per_backward", "1"],
    # A batch-norm-free embedding: with Conv4, B tasks on one process and B/W on each of W run
    # different kernels (a lone task runs channels-last, ConvBlock.one_task_channels_last, whose
    # float32 batch-norm sums are less exact than the grouped NCHW path's: about 1e-5 relative
    # against 1e-7 on one layer's gradients, benchmarks/batch_norm_precision.py), and Adam amplifies that
    # rounding over steps: the same steps in exact arithmetic, not to this test's tolerance.
    "ProtoNet": ["--config", str(ROOT / "configs" / "protonet_kanji.yaml"),
                 "--model.init_args.backbone", "fewshot_lightning.models.MLP",
                 "--model.init_args.backbone.init_args.in_features", "256",
                 "--model.init_args.backbone.init_args.hidden", "[32]",
                 "--model.init_args.backbone.init_args.out_features", "16",
                 "--data", "cli_support.ClusteredImages", "--data.init_args.flatten", "true",
                 "--data.init_args.ways", "5", "--data.init_args.queries", "3",
                 "--data.init_args.train_tasks", "400", "--data.init_args.val_tasks", "20",
                 # Squared distances ignore a shift shared by all embeddings, so the head's bias has
                 # an exactly zero gradient; Adam would scale its float noise up to full-size steps.
                 "--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.init_args.lr", "0.1",
                 "--model.init_args.lr_scheduler", "null"],
}


def last_checkpoint(logs: Path) -> dict:
    (path,) = logs.glob("*/version_0/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def initial_weights(args: list) -> dict:
    """The model a ``fit`` with these arguments starts from (the config seeds it)."""
    cli = LightningCLI(MetaLearner, TaskDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       auto_configure_optimizers=False, save_config_callback=None, run=False, args=args)
    return {name: value.clone() for name, value in cli.model.state_dict().items()}


@pytest.fixture(scope="module", params=list(PARITY_CASES))
def parity_runs(request, tmp_path_factory):
    """One algorithm trained ``PARITY_STEPS`` steps, then validated, twice: in this process
    with ``META_BATCH`` tasks, and through DDP (gloo) on ``WORLD`` CPU processes with
    ``META_BATCH / WORLD`` tasks each."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    case = PARITY_CASES[request.param]
    common = [*case, "--trainer.max_steps", str(PARITY_STEPS), "--trainer.val_check_interval", str(PARITY_STEPS),
              "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1"]
    start = initial_weights([*case, "--trainer.logger", "false"])
    cli_main(["fit", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / "single"),
              "--data.init_args.meta_batch_size", str(META_BATCH)])
    output = run_cli_with_tests(
        "fit", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / "ddp"),
        "--data.init_args.meta_batch_size", str(META_BATCH // WORLD),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(WORLD), "--trainer.strategy", "ddp", cwd=tmp_path,
    )
    return (start, last_checkpoint(tmp_path / "single"), last_checkpoint(tmp_path / "ddp"), output,
            logged_training(tmp_path / "single"), logged_training(tmp_path / "ddp"))


def logged_training(logs: Path) -> dict:
    """The ``train/*`` scalars a run wrote to TensorBoard: name -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = logs.glob("*/version_0")
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag.startswith("train/")}


def test_ddp_takes_the_same_steps_as_one_process_with_the_whole_meta_batch(parity_runs):
    start, single, ddp, output = parity_runs[:4]
    assert single["global_step"] == ddp["global_step"] == PARITY_STEPS
    assert f"{META_BATCH // WORLD} tasks per device x {WORLD} devices x 1 node = {META_BATCH} tasks" in output
    weights = single["state_dict"]
    assert weights.keys() == ddp["state_dict"].keys()
    moved = 0.0
    for name, value in weights.items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
            moved = max(moved, float((value - start[name]).abs().max()))
    # Training moved the weights a thousand times further than the tolerance: the agreement
    # is not that of two runs that never stepped.
    assert moved > 1e-3
    # The optimizer's state (Adam's moments: running averages of the all-reduced gradients).
    for index, state in single["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ddp["optimizer_states"][0]["state"][index][key], value, rtol=1e-4, atol=1e-9)


def test_ddp_logs_the_training_loss_of_the_whole_step_not_process_0s_share(parity_runs):
    # Each process holds B/W of a step's tasks; the logged train/loss (TensorBoard, progress
    # bar) was process 0's mean over its own, 0.86 against the step's 3.42 on the sinusoid.
    single, ddp = parity_runs[4], parity_runs[5]
    assert "train/loss" in single and single.keys() == ddp.keys()
    for name, values in single.items():
        assert [step for step, _ in values] == [step for step, _ in ddp[name]] and len(values) == PARITY_STEPS, name
        torch.testing.assert_close([v for _, v in ddp[name]], [v for _, v in values], rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_validation_logs_no_sync_dist_warning(parity_runs):
    output = parity_runs[3]
    assert "val/" in output  # validation ran and logged
    assert "sync_dist" not in output


def test_ddp_with_auto_batching_decides_once_for_every_process(tmp_path):
    # batching="auto" times the paths on each process's first training batch and first
    # evaluation batch and takes process 0's choices (collective broadcasts: a process skipping
    # one would hang the run, hence the subprocess timeout). The run finishes, says once what
    # it chose for each, and saves both choices.
    args = [arg for arg in SHORT if arg not in ("--model.init_args.batching", "vmap")]
    output = run_cli("fit", *args, *DDP, "--trainer.max_steps", "2", cwd=tmp_path)
    # Logged by process 0 only, once for training and once for evaluation (the validation after
    # step 2): the sanity check (if it ran) times nothing.
    assert output.count("batching='auto' chose") == 2
    assert output.count("for training (one training step") == 1 and output.count("for evaluation (one evaluation") == 1
    saved = last_checkpoint(tmp_path / "lightning_logs")
    assert saved["batching"] in ("vmap", "loop") and saved["memory_format"] == "contiguous"  # an MLP: no 4-D weights
    assert saved["evaluation_path"] in (["vmap", "contiguous"], ["loop", "contiguous"])
