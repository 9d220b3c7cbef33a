"""fewshot_lightning.allocator: with glibc keeping freed memory, the steps of a training loop
reuse the memory of the previous ones (no page faults); with glibc's defaults each large
activation is mapped afresh, one fault per 4 KiB page. Run in child processes: the setting is
process-wide."""
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot_lightning import allocator

SINUSOID = str(Path(__file__).resolve().parents[1] / "configs" / "maml_sinusoid.yaml")

PROBE = """
import resource, sys, torch
from fewshot_lightning.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # a second call changes nothing
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 42 * 42, 5))
x = torch.randn(48, 3, 84, 84)  # the first maps: 41 MiB, above any mmap threshold glibc picks itself
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[3:]))  # steady state: the last three steps
"""


def steady_state_faults(mode):
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(allocator.glibc() is None, reason="the setting exists for glibc only")
def test_kept_memory_is_reused_without_page_faults():
    # A training step frees its activations and allocates them again the next step: with glibc's
    # defaults each is mapped afresh (a fault per 4 KiB page: the first block's maps alone are
    # 10,584 pages), with the memory kept the steps reuse it (here 0 faults in most runs, and at
    # times some 6,500, where a thread's own arena gave back a heap: 40 times fewer still).
    pages = 48 * 32 * 84 * 84 * 4 // 4096
    system = steady_state_faults("system")
    assert system >= 3 * pages  # every step maps its large blocks again
    assert steady_state_faults("keep") <= 0.1 * system


def test_the_cli_keeps_freed_memory_on_the_cpu_unless_told_not_to(tmp_path, monkeypatch, cli):
    # The setting itself is tested above, in child processes; here it is recorded, not applied.
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "in_effect", lambda: bool(calls))
    monkeypatch.chdir(tmp_path)
    short = ["--config", SINUSOID, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    code, out = cli("fit", *short)
    assert code == 0, out[-3000:]
    assert calls == [1] and out.count("CPU allocator: glibc serves tensors from its heap") == 1
    code, out = cli("fit", *short, "--cpu_allocator", "system")
    assert code == 0 and calls == [1] and "CPU allocator" not in out
    code, out = cli("fit", *short, "--cpu_allocator", "jemalloc")
    assert code != 0 and "cpu_allocator" in out
