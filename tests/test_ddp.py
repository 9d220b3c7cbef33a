"""Two-process DDP on the CPU (gloo): episodes split across ranks, metrics synced over all of them,
and the same training steps as one process with the whole meta-batch."""
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from cli_support import ClusteredImages
from cli_support import run_cli as run_cli_with_tests
from fewshot_lightning.algorithms import AttentionLearner, MatchingNet, MetaLearner, ProtoNet, RelationNet
from fewshot_lightning.cli import main as cli_main
from fewshot_lightning.data import TaskBatch, TaskDataModule
from fewshot_lightning.models import Conv4, RelationEmbedding
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
       for name, config in [("MAML", "maml"), ("Reptile", "reptile"), ("iMAML", "imaml"), ("CAVIA", "cavia")]},
    # A batch-norm-free embedding: with Conv4, the metric learners share batch-norm statistics
    # across the tasks of a meta-batch (see the task-independence test below), so B tasks on
    # one process and B/W on each of W cannot agree.
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
              "--trainer.num_sanity_val_steps", "0"]
    start = initial_weights([*case, "--trainer.logger", "false"])
    cli_main(["fit", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / "single"),
              "--data.init_args.meta_batch_size", str(META_BATCH)])
    output = run_cli_with_tests(
        "fit", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / "ddp"),
        "--data.init_args.meta_batch_size", str(META_BATCH // WORLD),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(WORLD), "--trainer.strategy", "ddp", cwd=tmp_path,
    )
    return start, last_checkpoint(tmp_path / "single"), last_checkpoint(tmp_path / "ddp"), output


def test_ddp_takes_the_same_steps_as_one_process_with_the_whole_meta_batch(parity_runs):
    start, single, ddp, output = parity_runs
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


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="base.py's _log_eval logs the reduced val/test metrics without "
                   "sync_dist=True; Lightning warns at every epoch-level self.log under DDP (see the cluster report)")
def test_ddp_validation_logs_no_sync_dist_warning(parity_runs):
    output = parity_runs[-1]
    assert "val/" in output  # validation ran and logged
    assert "sync_dist" not in output


def conv4() -> Conv4:
    return Conv4(hidden=8, out_features=None, image_size=16)


# The learners that embed a meta-batch with episode_ops.embed_episodes, on batch-norm backbones.
BATCH_NORM_LEARNERS = {
    "ProtoNet": lambda: ProtoNet(conv4()),
    "MatchingNet": lambda: MatchingNet(conv4(), embedding_dim=8),
    "RelationNet": lambda: RelationNet(RelationEmbedding(hidden=8), feature_channels=8, feature_size=4,
                                       relation_channels=8, relation_hidden=4),
    "AttentionLearner": lambda: AttentionLearner(conv4(), embedding_dim=8, model_dim=32, heads=4, layers=1,
                                                 feedforward_dim=32),
}


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="episode_ops.embed_episodes runs the backbone once on the whole "
                   "meta-batch, so batch norm without running statistics mixes the tasks; fix in the cluster report")
@pytest.mark.parametrize("name", list(BATCH_NORM_LEARNERS))
def test_a_tasks_outputs_do_not_depend_on_the_other_tasks_of_its_meta_batch(name):
    """DESIGN.md's task independence, which DDP parity needs: W ranks of B/W tasks must score a
    task as one process of B tasks does. A task's training-mode outputs alone and with other
    tasks must agree to float precision."""
    data = ClusteredImages()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model = BATCH_NORM_LEARNERS[name]()
    together = model(batch)[:2]
    alone = model(TaskBatch(*(t[:2] for t in batch)))
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
