"""Under deterministic algorithms (``Trainer(deterministic=True)``) MAML's ``auto`` choices are
made without timing: the paths round differently and training grows that into other weights, so
a timed choice (which the machine's load decides) made two runs of one seed end apart."""
import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import EpisodicDataModule
from fewshot_lightning.models import Conv4


@pytest.fixture
def deterministic_off_after():
    yield
    torch.use_deterministic_algorithms(False)


def fit(deterministic: bool) -> MAML:
    L.seed_everything(0)
    images, labels = torch.rand(120, 1, 16, 16), torch.arange(20).repeat_interleave(6)
    data = EpisodicDataModule(images, labels, ways=3, shots=1, queries=1, meta_batch_size=4, train_tasks=12,
                              val_tasks=4, split_fractions=(0.6, 0.2, 0.2), num_workers=0)
    model = MAML(Conv4(in_channels=1, hidden=8, image_size=16, out_features=3), inner_lr=0.1)
    model.group_timing_min_steps = 1  # a 3-step run would keep the whole batch untimed anyway
    L.Trainer(max_steps=3, deterministic=deterministic, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, data)
    return model


def test_auto_takes_vmap_untimed_and_runs_repeat(monkeypatch, deterministic_off_after):
    timed = []
    original = MAML._timed_step
    monkeypatch.setattr(MAML, "_timed_step", lambda self, *args, **kwargs: timed.append(args[1:]) or
                        original(self, *args, **kwargs))
    first = fit(deterministic=True)
    # vmap is run once to see that it runs at all (not timed: no second path); nothing else.
    assert (first.batching, first.memory_format, first.tasks_per_backward) == ("vmap", "contiguous", None)
    assert len(timed) <= 1 and first.batching_timings == {}
    second = fit(deterministic=True)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_without_it_auto_times_the_paths(monkeypatch):
    timed = []
    original = MAML._timed_step
    monkeypatch.setattr(MAML, "_timed_step", lambda self, *args, **kwargs: timed.append(args[1:]) or
                        original(self, *args, **kwargs))
    model = fit(deterministic=False)
    assert len(model.batching_timings) >= 2 and len(timed) >= 4


def test_the_log_names_the_choice_that_was_made(caplog):
    # With batching fixed, the log said "batching='auto' chose 'loop' with memory_format=...".
    import logging

    from learner_helpers import random_episodes

    caplog.set_level(logging.INFO)
    batch = random_episodes(tasks=2, ways=3, shots=1, queries=1, x_shape=(1, 16, 16))
    model = MAML(Conv4(in_channels=1, hidden=8, image_size=16, out_features=3), inner_lr=0.1, batching="loop")
    model.choose_batching(batch)
    assert model.batching == "loop"
    assert (f"MAML: memory_format='auto' chose {model.memory_format!r} (batching='loop') for training (one training "
            "step of 2 tasks: loop ") in caplog.text
    assert "batching='auto'" not in caplog.text


def test_deterministic_auto_stays_untimed_when_vmap_runs_out_of_memory(monkeypatch, deterministic_off_after):
    # A vmap out of memory (a GPU's) dropped the untimed choice: the other paths were timed.
    from learner_helpers import random_episodes

    torch.use_deterministic_algorithms(True)
    calls = []

    def step(self, batch, batching, memory_format="contiguous", evaluation=False):
        calls.append((batching, memory_format))
        if batching == "vmap":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return 0.01

    monkeypatch.setattr(MAML, "_timed_step", step)
    model = MAML(Conv4(in_channels=1, hidden=8, image_size=16, out_features=3), inner_lr=0.1)
    model.choose_batching(random_episodes(tasks=2, ways=3, shots=1, queries=1, x_shape=(1, 16, 16)))
    assert (model.batching, model.memory_format) == ("loop", "contiguous")
    assert calls == [("vmap", "contiguous")]  # the attempt that ran out of memory, nothing timed
