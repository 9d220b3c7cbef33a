"""benchmarks/gpu_check.py --smoke runs on the CPU and prints its tables: every (algorithm,
precision) trained with finite losses, 16-mixed shown falling back to bf16-mixed, and the
learn2learn comparison when learn2learn is installed."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from cli_support import ROOT


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_trains_every_algorithm_and_precision_and_prints_markdown(monkeypatch, capsys):
    gpu_check = load_gpu_check()
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--smoke"])
    assert gpu_check.main() == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (MAML \(vmap\)|ProtoNet) \| ([^|]+) \| (\d+) \| — \| ([0-9.]+) → ([0-9.]+) \| — \| finite",
                      out, re.M)
    assert [(name, precision.strip()) for name, precision, *_ in rows] == [
        (name, precision) for name in ("MAML (vmap)", "ProtoNet")
        for precision in ("32-true", "bf16-mixed", "16-mixed → bf16-mixed")  # no fp16 on a CPU
    ]
    assert all(int(tasks_per_s) > 0 for *_, tasks_per_s, _, _ in rows)
    # An untrained 5-way classifier starts near ln 5 = 1.61 (ProtoNet's distances make it sharper).
    assert all(0.3 < float(first) < 3 for *_, first, _ in rows)
    assert "Autocast reaches a convolution under torch.func.vmap here: bfloat16: no, the output is float32" in out
    if importlib.util.find_spec("learn2learn") is None:
        pytest.skip("learn2learn is not installed: the comparison table is not printed")
    learn2learn_ms, ours_ms, speed_up = re.search(
        r"^\| ([0-9.]+) \| ([0-9.]+) \(vmap\) \| \d+ \| ([0-9.]+)x \|$", out, re.M).groups()
    assert float(speed_up) == pytest.approx(float(learn2learn_ms) / float(ours_ms), abs=0.06)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_the_gpu_session_script_runs_its_four_steps_and_writes_their_tables(tmp_path):
    # benchmarks/gpu_session/run.sh is what a session lent a GPU runs in one call; SMOKE=1 runs
    # the same four steps on the CPU, so a broken step or path shows here, not in the few
    # minutes of GPU time a session gets. Each table lands in $OUT.
    if importlib.util.find_spec("learn2learn") is None:
        pytest.skip("learn2learn is not installed: the script checks that it imports")
    env = {**os.environ, "SMOKE": "1", "CASES": "sinusoid", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session" / "run.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    speed, memory, check, layers = ((out / name).read_text()
                                    for name in ("speed_cuda.md", "memory_cuda.md", "gpu_check.md", "layers_cuda.md"))
    assert re.search(r"^\| sinusoid \| ours, vmap \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \| n/a \|$", speed, re.M)
    # Both learn2learn loops (summed losses; a backward per task) run; the ratios are against the
    # faster, or the smaller: one of them is 1.00x.
    assert re.search(r"^\| sinusoid \| learn2learn \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \| n/a \|$", speed, re.M)
    assert re.search(r"^\| sinusoid \| learn2learn, backward per task \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \| n/a \|$", speed, re.M)
    assert re.search(r"^\| sinusoid \| learn2learn(, backward per task)? \| [0-9.]+ \| [0-9.]+ \| 1\.00x \| n/a \|$", speed, re.M)
    assert re.search(r"^\| sinusoid \| learn2learn(, backward per task)? \| [0-9.]+ \| 1\.000x \|$", memory, re.M)
    assert "USDT:" not in memory  # the profiler's chatter is filtered out of the tables
    assert len(re.findall(r"^\| (MAML \(vmap\)|ProtoNet) \|", check, re.M)) == 6
    # Ours beside ours with our batch norm and pooling enabled on the device (here the CPU, where
    # they run anyway), against learn2learn.
    for contender in ("ours, vmap", "ours, vmap, our layers on the device", "learn2learn"):
        assert re.search(rf"^\| conv4-64-bn \| {contender} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \| n/a \|$", layers, re.M), layers
