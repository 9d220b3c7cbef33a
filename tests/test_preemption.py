"""SLURM pre-emption on the CPU: SIGUSR1 to a running ``fit`` saves Lightning's HPC checkpoint and
requeues the job; the requeued job (the same command) resumes from it at the saved step.

SLURM is simulated: its environment variables make Lightning pick ``SLURMEnvironment`` (as
``srun`` would), and a fake ``scontrol`` first on ``PATH`` records the requeue instead of
talking to a controller. Whether the resumed run is *exactly* the uninterrupted one is tested
with the resume work, not here: this checks the signal path and that the step count goes on.
"""
import json
import os
import signal
import time
from pathlib import Path

import torch

from cli_support import ROOT, cli_env, run_cli, start_cli

JOB_ID = "4242"


def slurm_env(tmp_path: Path) -> dict:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path / "scontrol.log"}"\n')
    scontrol.chmod(0o755)
    one_task = dict(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="fewshot", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                    SLURM_NNODES="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0")
    env = cli_env(one_task)
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    return env


def wait_for(condition, timeout: float, what: str, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"fit exited (code {process.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def steps_recorded(path: Path) -> list:
    try:
        return json.loads(path.read_text())["steps"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def fit_args(tmp_path: Path, max_steps: int, record: str) -> list:
    return [
        "fit", "--config", str(ROOT / "configs" / "maml_sinusoid.yaml"),
        "--trainer.max_steps", str(max_steps), "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(tmp_path / "run"),  # where Lightning writes hpc_ckpt_N.ckpt
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--model.init_args.batching", "vmap",
        "--trainer.callbacks+=cli_support.StepRecorder", "--trainer.callbacks.path", str(tmp_path / record),
    ]


def test_sigusr1_saves_hpc_checkpoint_requeues_and_the_requeued_job_resumes_at_its_step(tmp_path):
    env = slurm_env(tmp_path)
    first = start_cli(*fit_args(tmp_path, 100_000, "first.json"), cwd=tmp_path, env=env, log="first.log")
    try:
        # Pre-empt only once training is under way, so the checkpoint has steps to carry over.
        wait_for(lambda: len(steps_recorded(tmp_path / "first.json")) >= 3, 240, "three training steps", first)
        first.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` delivers
        # Lightning saves the checkpoint, then calls `scontrol requeue <job id>`.
        requeue = wait_for(lambda: (tmp_path / "scontrol.log").is_file() and (tmp_path / "scontrol.log").read_text(),
                           60, "scontrol requeue", first)
        # SLURM then stops the job with SIGTERM: Lightning ends fit cleanly.
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    log = (tmp_path / "first.log").read_text()
    assert requeue.split() == ["requeue", JOB_ID], log[-3000:]
    assert "Handling auto-requeue signal" in log
    checkpoints = sorted((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    assert [c.name for c in checkpoints] == ["hpc_ckpt_1.ckpt"], log[-3000:]
    saved_step = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["global_step"]
    recorded = steps_recorded(tmp_path / "first.json")
    # The signal came after at least three steps and before the last recorded one ended.
    assert 3 <= saved_step <= recorded[-1], (saved_step, recorded)

    # The requeued job runs the same command (no --ckpt_path): Lightning finds the HPC
    # checkpoint in default_root_dir and restores from it.
    out = run_cli(*fit_args(tmp_path, saved_step + 3, "second.json"), cwd=tmp_path, env=env, log="second.log")
    assert f"Restored all states from the checkpoint at {checkpoints[0]}" in out
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["start"] == saved_step  # the step count goes on from the checkpoint ...
    assert second["steps"] == [saved_step + 1, saved_step + 2, saved_step + 3]  # ... to max_steps
