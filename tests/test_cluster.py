"""The cluster recipes in cluster/: their SLURM and torchrun settings agree with the Trainer
arguments they pass, the sbatch script runs DDP under a stand-in for srun, the optional requeue
config builds Lightning's SLURM environment, and the effective meta-batch message is right."""
import os
import re
import signal
import socket
import subprocess
import time

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from cli_support import ROOT, cli_env, clustered_images
from test_preemption import steps_recorded, wait_for
from fewshot_lightning.algorithms import MetaLearner
from fewshot_lightning.callbacks import describe
from fewshot_lightning.data import EpisodeDataset, EpisodeSampler, SinusoidTasks, TaskDataModule, collate_tasks

CLUSTER = ROOT / "cluster"


def sbatch_options(text: str) -> dict:
    """``--name=value`` of the active ``#SBATCH`` lines (``##SBATCH`` is a comment to SLURM)."""
    return {name: value for name, value in re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M)}


def test_sbatch_script_asks_for_2_nodes_of_4_gpus_one_task_each_with_requeue_on_sigusr1():
    text = (CLUSTER / "slurm_2x4.sbatch").read_text()
    options = sbatch_options(text)
    assert options["nodes"] == "2"
    assert options["ntasks-per-node"] == options["gpus-per-node"] == "4"  # one process per GPU
    assert int(options["cpus-per-task"]) >= 2  # the process and at least one DataLoader worker
    assert options["signal"] == "SIGUSR1@90"  # Lightning's default requeue signal
    assert "requeue" in options and "time" in options
    launch = text[text.index("srun fewshot-lightning fit"):]
    # The Trainer's layout comes from SLURM's own variables, so it cannot drift from the lines above.
    for argument in ('--trainer.devices "$SLURM_NTASKS_PER_NODE"', '--trainer.num_nodes "$SLURM_NNODES"',
                     "--trainer.strategy ddp", '--trainer.default_root_dir "$RUN_DIR"'):
        assert argument in launch
    assert "--ckpt_path" not in launch  # it would win over the HPC checkpoint of a requeued job
    assert "SRUN_CPUS_PER_TASK" in text


def test_torchrun_script_defaults_to_2_nodes_of_4_processes_with_a_c10d_rendezvous():
    text = (CLUSTER / "torchrun_2x4.sh").read_text()
    assert "NNODES=${NNODES:-2}" in text and "NPROC_PER_NODE=${NPROC_PER_NODE:-4}" in text
    launch = text[text.index("torchrun "):]
    for argument in ('--nnodes "$NNODES"', '--nproc-per-node "$NPROC_PER_NODE"', "--rdzv-backend c10d",
                     '--rdzv-endpoint "$RDZV_ENDPOINT"', '--rdzv-id "$RUN_ID"',
                     '--trainer.devices "$NPROC_PER_NODE"', '--trainer.num_nodes "$NNODES"', "--trainer.strategy ddp"):
        assert argument in launch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sbatch_script_trains_with_ddp_under_a_stand_in_for_srun_and_requeues_on_sigusr1(tmp_path):
    """One node, two tasks, on the CPU: the script's own command line, ranks from SLURM's
    variables. SIGUSR1 reaches the two tasks at different moments, as SLURM's does; both save
    at the same step end, and rank 0 requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(
        "#!/bin/bash\n# srun on one node: SLURM_NTASKS_PER_NODE copies, each with the variables srun sets.\n"
        "for ((i = 0; i < SLURM_NTASKS_PER_NODE; i++)); do\n"
        '  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_NTASKS=$SLURM_NTASKS_PER_NODE "$@" > task$i.log 2>&1 &\n'
        "  echo $! > task$i.pid\n"
        "done\nrc=0; for job in $(jobs -p); do wait $job || rc=$?; done; exit $rc\n"
    )
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path / "scontrol.log"}"\n')
    for script in (srun, scontrol):
        script.chmod(0o755)
    env = cli_env(dict(SLURM_JOB_ID="31", SLURM_JOB_NAME="fewshot", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2",
                       SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_NODELIST="localhost",
                       MASTER_PORT=str(free_port())))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    job = subprocess.Popen(
        ["bash", str(CLUSTER / "slurm_2x4.sbatch"), str(ROOT / "configs" / "maml_sinusoid.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.max_steps", "100000", "--trainer.limit_val_batches", "0",
         "--model.init_args.batching", "vmap", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
         "--trainer.callbacks+=cli_support.StepRecorder", "--trainer.callbacks.path", str(tmp_path / "steps.json")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    tasks = []
    try:
        wait_for(lambda: len(steps_recorded(tmp_path / "steps.json")) >= 3, 240, "three training steps", job)
        tasks = [int((tmp_path / f"task{i}.pid").read_text()) for i in range(2)]
        for pid in tasks:
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.3)
        wait_for(lambda: (tmp_path / "scontrol.log").is_file(), 60, "scontrol requeue", job)
        done = len(steps_recorded(tmp_path / "steps.json"))
        wait_for(lambda: len(steps_recorded(tmp_path / "steps.json")) >= done + 2, 60, "two more steps", job)
        for pid in tasks:  # SLURM ends the requeued job with SIGTERM to every task
            os.kill(pid, signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            for pid in tasks:
                os.kill(pid, signal.SIGKILL)
            job.kill()
    logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
    assert job.returncode == 0 and not any("Traceback" in log for log in logs), logs[0][-3000:] + logs[1][-3000:]
    assert "25 tasks per device x 2 devices x 1 node = 50 tasks per optimizer step" in logs[0]
    checkpoints = sorted((tmp_path / "runs" / "31").glob("hpc_ckpt_*.ckpt"))  # the job's default_root_dir
    # One save per step end that saw a request on either rank: one or two, each requeued once by rank 0.
    assert 1 <= len(checkpoints) <= 2
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 31"] * len(checkpoints)
    for path in checkpoints:
        step = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
        # Rank 1 announces nothing (rank-zero logging), so rank 0's log names every save.
        assert f"SIGUSR1 received: saving an HPC checkpoint at step {step} and requeuing." in logs[0]


def test_requeue_signal_config_builds_slurm_environment_with_sighup(monkeypatch):
    for name, value in dict(SLURM_JOB_ID="32", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1",
                            SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NAME="fewshot",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    cli = LightningCLI(MetaLearner, TaskDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       auto_configure_optimizers=False, save_config_callback=None, run=False,
                       args=["--config", str(ROOT / "configs" / "maml_sinusoid.yaml"),
                             "--config", str(CLUSTER / "requeue_signal.yaml"), "--trainer.logger", "false"])
    environment = cli.trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGHUP


def test_effective_meta_batch_message_multiplies_devices_nodes_and_accumulation():
    tasks = SinusoidTasks(num_tasks=25_000, seed=0)
    loader = DataLoader(tasks, batch_size=25, sampler=EpisodeSampler(tasks, num_replicas=8, rank=3),
                        collate_fn=collate_tasks)
    message = describe(loader, world_size=8, devices=4, nodes=2, accumulate=2)
    # 25 tasks x 8 processes x 2 accumulated batches; each rank walks 25,000 / 8 tasks an epoch.
    assert "25 tasks per device x 4 devices x 2 nodes x 2 accumulated batches = 400 tasks" in message
    assert "SinusoidTasks, 25000 an epoch" in message
    assert "rank r takes tasks r, r+8, r+16, ...: split across 8 ranks (3125 each)" in message

    images, labels = clustered_images(classes=12, per_class=4, side=4, noise=0.1)
    episodes = EpisodeDataset(images, labels, ways=5, shots=1, queries=3, num_tasks=10, seed=7)
    single = describe(DataLoader(episodes, batch_size=1), world_size=1, devices=1, nodes=1)
    assert single.startswith("Effective meta-batch: 1 task per device = 1 task per optimizer step.")
    assert "EpisodeDataset (5-way 1-shot 3-query episodes from 12 classes), 10 an epoch" in single
    assert "seed (7, e, i)" in single
