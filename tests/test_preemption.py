"""SLURM pre-emption on the CPU: SIGUSR1 to a running ``fit`` saves an HPC checkpoint and requeues
the job; the requeued job (the same command) resumes from it at the saved step.

The signals land anywhere in a MAML step, the vmapped inner loop included, where Lightning's
own handler would write a checkpoint of swapped per-task parameters and crash; the configs'
``RequeueAtStepEnd`` defers the save to the end of the step.

SLURM is simulated: its environment variables make Lightning pick ``SLURMEnvironment`` (as
``srun`` would), and a fake ``scontrol`` first on ``PATH`` records the requeue instead of
talking to a controller. The command-line test checks the signal path and that the step count
goes on; an in-process one that the requeued job ends with an uninterrupted run's weights.
"""
import json
import re
import os
import signal
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers.logger import Logger
import pytest
import torch
from torch import nn

from cli_support import ROOT, cli_env, run_cli, start_cli
from fewshot_lightning.algorithms import MAML
from fewshot_lightning.callbacks import RequeueAtStepEnd
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP

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


SIGNALS = 6


def test_sigusr1_saves_hpc_checkpoint_requeues_and_the_requeued_job_resumes_at_its_step(tmp_path):
    env = slurm_env(tmp_path)
    first = start_cli(*fit_args(tmp_path, 100_000, "first.json"), cwd=tmp_path, env=env, log="first.log")
    try:
        # Pre-empt only once training is under way, so the checkpoint has steps to carry over.
        wait_for(lambda: len(steps_recorded(tmp_path / "first.json")) >= 3, 240, "three training steps", first)
        for _ in range(SIGNALS):  # what `#SBATCH --signal=SIGUSR1@90` delivers, at arbitrary moments
            first.send_signal(signal.SIGUSR1)
            time.sleep(0.25)
        # Two more steps: every request has reached a step end.
        done = len(steps_recorded(tmp_path / "first.json"))
        wait_for(lambda: len(steps_recorded(tmp_path / "first.json")) >= done + 2, 120, "two more steps", first)
        # SLURM then stops the job with SIGTERM: Lightning ends fit cleanly.
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    log = (tmp_path / "first.log").read_text()
    assert first.returncode == 0 and "Traceback" not in log, log[-3000:]
    checkpoints = sorted((tmp_path / "run").glob("hpc_ckpt_*.ckpt"), key=lambda path: int(path.stem.split("_")[-1]))
    # Requests between two step ends coalesce into one save: 1 to SIGNALS checkpoints, one requeue each.
    assert 1 <= len(checkpoints) <= SIGNALS, log[-3000:]
    requeues = (tmp_path / "scontrol.log").read_text().splitlines()
    assert requeues == [f"requeue {JOB_ID}"] * len(checkpoints)
    saved = [torch.load(path, map_location="cpu", weights_only=False)["global_step"] for path in checkpoints]
    recorded = steps_recorded(tmp_path / "first.json")
    assert saved == sorted(set(saved)) and 3 <= saved[0] and saved[-1] <= recorded[-1], (saved, recorded)
    for step in saved:
        assert f"SIGUSR1 received: saving an HPC checkpoint at step {step} and requeuing." in log

    # The requeued job runs the same command (no --ckpt_path): Lightning finds the newest HPC
    # checkpoint in default_root_dir and restores from it.
    newest = saved[-1]
    out = run_cli(*fit_args(tmp_path, newest + 3, "second.json"), cwd=tmp_path, env=env, log="second.log")
    assert f"Restored all states from the checkpoint at {checkpoints[-1]}" in out
    assert "not resumable" not in out  # Lightning's warning for a loader that restarts its epoch
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["start"] == newest  # the step count goes on from the checkpoint ...
    assert second["steps"] == [newest + 1, newest + 2, newest + 3]  # ... to max_steps


# -- in process: a signal that lands inside the vmapped inner loop, deterministically -------------
class SignalsItselfInForward(nn.Module):
    """An MLP that sends its own process SIGUSR1 during its ``at_call``-th forward call: inside
    MAML's vmapped ``functional_call``, where the parameters are swapped for per-task tensors."""

    def __init__(self, at_call: int) -> None:
        super().__init__()
        self.mlp, self.calls, self.at_call = MLP(), 0, at_call

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at_call:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs at the next bytecode, here
        return self.mlp(x)


class WeightsAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.fixture
def simulated_slurm_job(tmp_path, monkeypatch):
    for name, value in slurm_env(tmp_path).items():
        if name.startswith("SLURM_") or name == "PATH":
            monkeypatch.setenv(name, value)
    # SLURMEnvironment writes these into os.environ when asked; set here, they are restored after.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    return tmp_path


def fit_with_a_signal_in_the_inner_loop(tmp_path, callbacks):
    # Two forward calls a step (support, then query): call 7 is the adaptation of step 4.
    model = MAML(SignalsItselfInForward(at_call=7), inner_lr=0.01, batching="vmap")
    trainer = L.Trainer(max_steps=6, accelerator="cpu", default_root_dir=tmp_path, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, SinusoidDataModule(meta_batch_size=4, train_tasks=40, val_tasks=4))


def test_lightnings_own_handler_fails_on_a_signal_inside_the_vmapped_inner_loop(simulated_slurm_job):
    """Why RequeueAtStepEnd exists; if Lightning ever defers its own save, this fails."""
    with pytest.raises(NotImplementedError, match="BatchedTensorImpl"):
        fit_with_a_signal_in_the_inner_loop(simulated_slurm_job, [])


def test_requeue_at_step_end_saves_the_weights_of_the_end_of_that_step(simulated_slurm_job):
    recorder = WeightsAfterEachStep()
    fit_with_a_signal_in_the_inner_loop(simulated_slurm_job, [RequeueAtStepEnd(), recorder])
    (path,) = simulated_slurm_job.glob("hpc_ckpt_*.ckpt")  # in default_root_dir
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4  # the step the signal came in
    for name, value in recorder.weights[4].items():
        assert torch.equal(checkpoint["state_dict"][name], value), name
    assert (simulated_slurm_job / "scontrol.log").read_text().split() == ["requeue", JOB_ID]
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handed back after fit


def fit_stopped_by(tmp_path, signum, said: str, code: int) -> None:
    """A ``fit`` outside SLURM sent ``signum`` after three steps: it exits with ``code``, saying
    it stopped by ``said`` at the end of a step that ``last.ckpt`` holds, and how to resume."""
    env = {key: value for key, value in cli_env().items() if not key.startswith("SLURM_")}
    run = start_cli(*fit_args(tmp_path, 100_000, "steps.json"), cwd=tmp_path, env=env, log="fit.log")
    try:
        wait_for(lambda: len(steps_recorded(tmp_path / "steps.json")) >= 3, 240, "three training steps", run)
        run.send_signal(signum)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    log = (tmp_path / "fit.log").read_text()
    assert run.returncode == code and "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    found = re.search(rf"fewshot-lightning: stopped by {said} at the end of step (\d+), before the run finished; "
                      r"checkpoints/last.ckpt holds that step\. Resume with the same command and --ckpt_path last\.", log)
    assert found, log[-3000:]
    last = next((tmp_path / "logs").glob("*/version_0/checkpoints/last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == int(found.group(1)) >= 3


def test_sigterm_outside_slurm_saves_the_step_and_exits_143_saying_how_to_resume(tmp_path):
    # docker stop, Kubernetes, systemd and `timeout` send SIGTERM: Lightning stopped at the next
    # batch with SystemExit and no code, so the command exited 0 with last.ckpt at the previous
    # periodic save, a half-trained run looking finished.
    fit_stopped_by(tmp_path, signal.SIGTERM, "SIGTERM", 143)


def test_the_requeued_job_ends_with_the_weights_of_an_uninterrupted_run(simulated_slurm_job):
    """The requeued job (no --ckpt_path: Lightning restores the newest hpc_ckpt) continues
    exactly: the tasks of the epoch after the saved step, the optimizer, the random state. The
    signal lands mid-epoch (step 4 of 10-step epochs), where Lightning's own DataLoader is not
    resumable and the task order would restart."""
    def run(at_call, steps, seed):
        torch.manual_seed(seed)
        model = MAML(SignalsItselfInForward(at_call=at_call), inner_lr=0.01, batching="vmap")
        recorder = WeightsAfterEachStep()
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", default_root_dir=simulated_slurm_job,
                            limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[RequeueAtStepEnd(), recorder])
        trainer.fit(model, SinusoidDataModule(meta_batch_size=4, train_tasks=40, val_tasks=4, seed=3))
        return trainer, recorder

    # The first job: SIGUSR1 inside step 4 (call 7) saves hpc_ckpt_1 there; the job goes on to step 12
    # (into the second epoch), as it would until SLURM's SIGTERM: the uninterrupted run.
    _, uninterrupted = run(at_call=7, steps=12, seed=0)
    (path,) = simulated_slurm_job.glob("hpc_ckpt_*.ckpt")
    assert torch.load(path, map_location="cpu", weights_only=False)["global_step"] == 4

    # The requeued job, the same command: seeded differently to show nothing but the checkpoint carries over.
    trainer, resumed = run(at_call=-1, steps=12, seed=1)
    assert sorted(resumed.weights) == list(range(5, 13))  # it restored step 4 and went on
    for step in (5, 10, 11, 12):  # mid-epoch, the epoch's last step, the next epoch
        for name, value in uninterrupted.weights[step].items():
            assert torch.allclose(resumed.weights[step][name], value, rtol=0, atol=1e-6), (step, name)
    # The steps differ from each other: equal weights are not equal because nothing moved.
    first, last = uninterrupted.weights[5], uninterrupted.weights[12]
    assert max((first[name] - last[name]).abs().max().item() for name in first) > 1e-4


class StepsLogged(Logger):
    """A logger that keeps every (step, name, value) it is given."""

    def __init__(self):
        super().__init__()
        self.points = []

    @property
    def name(self):
        return "steps"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.points += [(step, name, value) for name, value in metrics.items()]


def test_ctrl_c_stops_at_the_step_end_saves_it_and_exits_130_saying_how_to_resume(tmp_path):
    # Lightning's "graceful shutdown" on Ctrl-C exited 1 with last.ckpt at the previous periodic
    # save (1,800 steps behind on the sinusoid config) and no word on resuming.
    fit_stopped_by(tmp_path, signal.SIGINT, "Ctrl-C", 130)


class SigtermAt(L.Callback):
    """Sends this process SIGTERM as training step ``step + 1`` starts: handled at that step's end."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def outside_slurm(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)


def test_a_stop_by_signal_validates_only_where_a_validation_was_due(tmp_path, monkeypatch):
    # Lightning validates whenever Trainer.should_stop is set (early stopping's stop): a SIGTERM or
    # Ctrl-C at step 3 of a run validating every 5 steps ran a whole validation before exiting
    # (104 s on a 2,000-episode split, beyond SLURM's grace period), logged val metrics at step 3
    # and saved a "best" checkpoint an uninterrupted run never scores.
    outside_slurm(monkeypatch)

    class Validations(L.Callback):
        steps = []

        def on_validation_end(self, trainer, module):
            self.steps.append(trainer.global_step)

    def fit(stop_at):
        counted = Validations()
        counted.steps = []
        trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=1, val_check_interval=5,
                            check_val_every_n_epoch=None, num_sanity_val_steps=0, default_root_dir=tmp_path,
                            callbacks=[RequeueAtStepEnd(), SigtermAt(stop_at), counted,
                                       L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / f"best{stop_at}",
                                                                           monitor="val/mse", save_top_k=1)])
        trainer.fit(MAML(MLP(), inner_lr=0.01, batching="vmap"),
                    SinusoidDataModule(meta_batch_size=2, train_tasks=40, val_tasks=2, seed=3))
        return trainer, counted.steps

    stopped, validated = fit(2)  # the signal in step 3, none due there
    assert stopped.global_step == 3 and validated == []
    assert not list((tmp_path / "best2").glob("*.ckpt"))
    stopped, validated = fit(4)  # in step 5, where one is due: it runs, once
    assert stopped.global_step == 5 and validated == [5]
    # The wrapper is taken back with the fit.
    assert "_should_check_val_fx" not in vars(stopped.fit_loop.epoch_loop)


@pytest.mark.parametrize("how", ["max_steps, validated after", "max_steps, no validation", "sigterm, validation due",
                                 "sigterm, none due", "should_stop, validated at once"])
def test_a_resumed_run_logs_at_the_uninterrupted_runs_steps(tmp_path, monkeypatch, how):
    # A run whose last saved step was followed by a validation due there (every val_check_interval
    # steps, the final step of max_steps) resumed logging every point one step late: the batch was
    # counted twice, by Lightning's restart (which runs that batch's end again) and by the saved
    # state. Each way a run can stop, the resumed points must be the uninterrupted run's.
    from fewshot_lightning.callbacks import LastCheckpoint

    outside_slurm(monkeypatch)

    def fit(folder, steps, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        logger = StepsLogged()
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, log_every_n_steps=1,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                            val_check_interval=4, check_val_every_n_epoch=None, default_root_dir=folder,
                            callbacks=[RequeueAtStepEnd(), LastCheckpoint(every_n_train_steps=100, dirpath=folder),
                                       *callbacks])
        trainer.fit(MAML(MLP(), inner_lr=0.01, batching="vmap"),
                    SinusoidDataModule(meta_batch_size=2, train_tasks=40, val_tasks=2, seed=3), ckpt_path=ckpt_path)
        return trainer, [point for point in logger.points if point[1] != "epoch"]

    class StopAfter(L.Callback):  # as Lightning's Timer does: Lightning then validates at once
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                trainer.should_stop = True

    stop, callbacks = {"max_steps, validated after": (4, ()), "max_steps, no validation": (6, ()),
                       "sigterm, validation due": (12, [SigtermAt(7)]), "sigterm, none due": (12, [SigtermAt(5)]),
                       "should_stop, validated at once": (12, [StopAfter()])}[how]
    _, uninterrupted = fit(tmp_path / "whole", 12)
    stopped, _ = fit(tmp_path / "parts", stop, callbacks)
    assert stopped.global_step == {"max_steps, validated after": 4, "max_steps, no validation": 6,
                                   "sigterm, validation due": 8, "sigterm, none due": 6,
                                   "should_stop, validated at once": 6}[how]
    _, resumed = fit(tmp_path / "parts", 12, ckpt_path=str(tmp_path / "parts" / "last.ckpt"))
    later = [point for point in uninterrupted if point[0] >= stopped.global_step]
    assert later and [(s, n) for s, n, _ in resumed] == [(s, n) for s, n, _ in later]
    for (_, name, got), (_, _, want) in zip(resumed, later):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), name


def test_a_stop_at_a_step_that_logs_nothing_logs_that_steps_loss(tmp_path, monkeypatch):
    # Lightning writes the training metrics when a stop is asked; at a step the learner did not log
    # (log_every_n_steps 5) it wrote the last logged step's loss again at the stop step.
    outside_slurm(monkeypatch)

    def fit(every, callbacks=()):
        torch.manual_seed(0)
        logger = StepsLogged()
        trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=logger, log_every_n_steps=every,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            enable_checkpointing=False, callbacks=[RequeueAtStepEnd(), *callbacks])
        trainer.fit(MAML(MLP(), inner_lr=0.01, batching="vmap"),
                    SinusoidDataModule(meta_batch_size=2, train_tasks=40, val_tasks=2, seed=3))
        return trainer, {step: value for step, name, value in logger.points if name == "train/loss"}

    _, every_step = fit(1)
    stopped, points = fit(5, [SigtermAt(6)])  # stops at the end of step 7, logged at step 6 (counting from 0)
    assert stopped.global_step == 7 and sorted(points) == [4, 6]
    assert points[6] == pytest.approx(every_step[6], rel=1e-6) and points[6] != pytest.approx(points[4])


def test_a_signal_inside_an_accumulation_window_stops_after_the_windows_step(tmp_path, monkeypatch):
    # A SIGTERM (or Ctrl-C) during the first batch of a two-batch window stopped at that batch's end,
    # before the optimizer step: the window's gradients were dropped, and the resumed run stepped on
    # the window's second batch alone (every weight and Adam's state off, exit 0).
    from fewshot_lightning.callbacks import LastCheckpoint

    outside_slurm(monkeypatch)

    class SigtermAtBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:  # the first batch of the second window (steps 1 and 2 are batches 0-1 and 2-3)
                os.kill(os.getpid(), signal.SIGTERM)

    def fit(folder, steps, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, accumulate_grad_batches=2,
                            default_root_dir=folder, callbacks=[RequeueAtStepEnd(), LastCheckpoint(every_n_train_steps=100,
                                                                                                    dirpath=folder), *callbacks])
        model = MAML(MLP(), inner_lr=0.01, batching="vmap")
        trainer.fit(model, SinusoidDataModule(meta_batch_size=2, train_tasks=40, val_tasks=2, seed=3), ckpt_path=ckpt_path)
        return trainer, model

    _, uninterrupted = fit(tmp_path / "whole", 4)
    stopped, _ = fit(tmp_path / "parts", 4, [SigtermAtBatch()])
    callback = next(c for c in stopped.callbacks if isinstance(c, RequeueAtStepEnd))
    assert callback.stopped_by_sigterm_at == 2 and stopped.global_step == 2  # at the window's step, not before it
    assert stopped.fit_loop.epoch_loop.batch_progress.current.completed == 4
    _, resumed = fit(tmp_path / "parts", 4, ckpt_path=str(tmp_path / "parts" / "last.ckpt"))
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_sigterm_in_the_final_step_or_before_the_first_says_what_happened(tmp_path, monkeypatch, cli):
    # In the final step: "stopped by SIGTERM ... before the run finished. Resume with ..." and
    # exit 143 for a run that had finished. Before the first step (the sanity check): Lightning
    # stopped after the first step, with advice to resume from a last.ckpt that did not exist.
    outside_slurm(monkeypatch)
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "maml_sinusoid.yaml"),
              "--data.val_tasks", "25", "--trainer.limit_val_batches", "1", "--trainer.max_steps", "3"]
    code, out = cli("fit", *config, "--trainer.callbacks+", '{"class_path": "cli_support.SigtermAtStep", '
                    '"init_args": {"step": 2}}')
    assert code == 0 and "before the run finished" not in out, out[-3000:]
    assert "SIGTERM received during the final step 3: the run ends there, finished." in out
    last = next(tmp_path.glob("lightning_logs/*/version_0/checkpoints/last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    # Lightning's own handler takes a SIGTERM before training starts; the stop is taken over at the
    # first step's end, which is saved (Lightning stopped there with nothing saved).
    code, out = cli("fit", *config, "--trainer.callbacks+", '{"class_path": "cli_support.SigtermInSanityCheck"}')
    assert code == 143 and "Traceback" not in out, out[-3000:]
    assert ("fewshot-lightning: stopped by SIGTERM at the end of step 1, before the run finished; checkpoints/last.ckpt "
            "holds that step. Resume with the same command and --ckpt_path last.") in out
    last = next(tmp_path.glob("lightning_logs/*/version_1/checkpoints/last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1
