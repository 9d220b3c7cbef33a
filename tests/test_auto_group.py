"""``tasks_per_backward="auto"`` (MAML's default): in a run planning enough training steps, time
a training step with the whole batch and with groups of half as many tasks, a quarter, ... and
keep the smallest group within 5% of the fastest (the least memory at about the best speed); a
short run, or one with no planned length, keeps the whole batch untimed. The rule is checked on
fixed timings (which sizes are tried, where it stops, what it keeps), and on real ones through
``Trainer.fit``: the choice follows the rule on the timings it logged, the run's steps are the
whole batch's to rounding, and a resumed run keeps the choice without timing again."""
import logging

import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAML, Reptile, iMAML
from fewshot_lightning.algorithms.maml import GROUP_MARGIN, path_name
from fewshot_lightning.data import EpisodicDataModule, SinusoidDataModule
from fewshot_lightning.models import MLP, Conv4
from learner_helpers import quiet_trainer, random_episodes
from test_maml_gradients import regression_batch


def with_timings(monkeypatch, seconds_by_size):
    """Replace the timed group step with fixed times by group size; returns the sizes asked, in order."""
    asked = []

    def fake(self, batch, size, trainable):
        asked.append(size)
        return seconds_by_size[size], None

    monkeypatch.setattr(MAML, "_timed_group_step", fake)
    return asked


@pytest.mark.parametrize("seconds, tried, chosen", [
    # 8 tasks: sizes 8, 4, 2, 1. Groups of 4 are 3% slower (within 5%), 2 are 20% slower: stop there.
    ({8: 1.00, 4: 1.03, 2: 1.20, 1: 1.50}, [8, 4, 2], 4),
    # Groups of 4 already 6% slower: the whole batch, nothing smaller tried.
    ({8: 1.00, 4: 1.06, 2: 0.50, 1: 0.50}, [8, 4], None),
    # Smaller is faster down to one task: one task at a time.
    ({8: 1.00, 4: 0.95, 2: 0.92, 1: 0.93}, [8, 4, 2, 1], 1),
    # The fastest is 2; 4 (within 5% of it) is larger than 1 (within 5% too): the smallest, 1.
    ({8: 1.10, 4: 0.99, 2: 0.95, 1: 0.99}, [8, 4, 2, 1], 1),
    # 1 is 6% slower than the fastest (2): 2.
    ({8: 1.10, 4: 0.99, 2: 0.95, 1: 1.01}, [8, 4, 2, 1], 2),
])
def test_the_smallest_group_within_the_margin_of_the_fastest(monkeypatch, seconds, tried, chosen):
    assert GROUP_MARGIN == 0.05
    asked = with_timings(monkeypatch, seconds)
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    batch = regression_batch(8)
    assert model.choose_tasks_per_backward(batch, force=True) == chosen
    assert asked == [size for size in tried for _ in range(2)]  # each size timed twice, largest first
    assert model.tasks_per_backward == chosen
    assert list(model.group_timings) == ["whole batch"] + [str(size) for size in tried[1:]]
    assert model.group_timings["whole batch"] == pytest.approx(1000 * seconds[8])
    # Decided: the training steps that follow neither time again nor change it.
    asked.clear()
    model.training_step(batch, 0)
    assert asked == [] and model.tasks_per_backward == chosen


def test_odd_batches_halve_rounding_up(monkeypatch):
    asked = with_timings(monkeypatch, {7: 1.0, 4: 1.0, 2: 1.0, 1: 1.0})
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    assert model.choose_tasks_per_backward(regression_batch(7), force=True) == 1
    assert asked[::2] == [7, 4, 2, 1]


def test_without_a_planned_run_the_whole_batch_untimed(monkeypatch):
    asked = with_timings(monkeypatch, {})  # any timing would fail: no entry
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    assert model.tasks_per_backward is None and model.tasks_per_backward_auto
    model.training_step(regression_batch(6), 0)  # no trainer: no planned length
    assert asked == [] and model.tasks_per_backward is None and model.group_timings == {}


def fit(model, steps, tmp_path=None, meta_batch=6, ckpt_path=None):
    """``steps`` training steps of sinusoid tasks, ``meta_batch`` a step; with ``tmp_path``,
    checkpoints saved there (and resumed from ``ckpt_path``). Lightning's log lines reach
    ``caplog`` (conftest's autouse fixture); at INFO inside ``caplog.at_level(logging.INFO)``."""
    options = dict(max_steps=steps, limit_val_batches=0)
    trainer = quiet_trainer(**options) if tmp_path is None else L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **options)
    trainer.fit(model, SinusoidDataModule(meta_batch_size=meta_batch, train_tasks=meta_batch * max(steps, 1),
                                          num_workers=0), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.filterwarnings("ignore")
def test_a_short_run_keeps_the_whole_batch_and_says_so(monkeypatch, caplog):
    asked = with_timings(monkeypatch, {})
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    with caplog.at_level(logging.INFO):
        fit(model, 3)
    assert asked == [] and model.tasks_per_backward is None
    assert "tasks_per_backward='auto' keeps the whole batch of 6 tasks untimed: this run plans 3 training steps, " \
           "fewer than group_timing_min_steps=200" in caplog.text
    assert caplog.text.count("keeps the whole batch") == 1  # once a run, not once a step


@pytest.mark.filterwarnings("ignore")
def test_a_planned_run_times_real_steps_and_follows_the_rule(monkeypatch, caplog, tmp_path):
    # group_timing_min_steps = 0: this 4-step run times, on real steps of a small Conv4 MAML.
    monkeypatch.setattr(MAML, "group_timing_min_steps", 0)
    L.seed_everything(0)
    model = MAML(Conv4(hidden=8, image_size=16, out_features=3), inner_lr=0.4, batching="vmap")
    images, labels = torch.rand(120, 1, 16, 16), torch.arange(20).repeat_interleave(6)
    data = EpisodicDataModule(images, labels, ways=3, shots=1, queries=2, meta_batch_size=8, train_tasks=32,
                              val_tasks=8, test_tasks=8, split_fractions=(0.6, 0.2, 0.2), num_workers=0)
    with caplog.at_level(logging.INFO):
        trainer = quiet_trainer(max_steps=4, limit_val_batches=0)
        trainer.fit(model, data)
    timings = {8 if name == "whole batch" else int(name): ms for name, ms in model.group_timings.items()}
    sizes = list(timings)
    assert sizes == [8, 4, 2, 1][:len(sizes)] and len(sizes) >= 2
    fastest = min(timings.values())
    # Every size but the last was within the margin of the fastest before it; the last was not,
    # unless it was one task (nothing smaller to try).
    for index, size in enumerate(sizes):
        within = timings[size] <= (1 + GROUP_MARGIN) * min(timings[s] for s in sizes[:index + 1])
        assert within if index < len(sizes) - 1 else (size == 1 or not within), (size, timings)
    expected = min(size for size, ms in timings.items() if ms <= (1 + GROUP_MARGIN) * fastest)
    assert model.tasks_per_backward == (None if expected == 8 else expected)
    assert "tasks_per_backward='auto' chose" in caplog.text and "whole batch" in caplog.text
    assert trainer.global_step == 4


def weights_after(group, steps=3):
    L.seed_everything(0)
    model = MAML(MLP(1, (16, 16), 1), inner_lr=0.01, batching="loop", tasks_per_backward=group)
    fit(model, steps)
    return model, {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore")
def test_the_chosen_groups_train_as_the_whole_batch(monkeypatch):
    # Fixed timings make 'auto' choose groups of 2 of the 6 tasks; the steps must be the whole batch's.
    monkeypatch.setattr(MAML, "group_timing_min_steps", 0)
    with_timings(monkeypatch, {6: 1.0, 3: 1.0, 2: 1.0, 1: 2.0})
    auto, grouped = weights_after("auto")
    assert auto.tasks_per_backward == 2
    _, whole = weights_after(None)
    start = MAML(MLP(1, (16, 16), 1), inner_lr=0.01).state_dict()
    moved = max(float((whole[name] - start[name]).abs().max()) for name in start)
    assert moved > 1e-3  # three Adam steps of 1e-3 moved the weights
    for name, value in whole.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore")
def test_a_resumed_run_keeps_the_choice_untimed(monkeypatch, tmp_path):
    monkeypatch.setattr(MAML, "group_timing_min_steps", 0)
    with_timings(monkeypatch, {6: 1.0, 3: 1.0, 2: 1.0, 1: 2.0})
    L.seed_everything(0)
    first = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    trainer = fit(first, 2, tmp_path)
    assert first.tasks_per_backward == 2
    checkpoint = trainer.checkpoint_callback.best_model_path
    assert torch.load(checkpoint, weights_only=False)["tasks_per_backward_chosen"] == 2
    # Resumed on a machine where every group times alike (the rule would now pick 1): it is not timed.
    asked = with_timings(monkeypatch, {6: 1.0, 3: 1.0, 2: 1.0, 1: 1.0})
    resumed = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    trainer = fit(resumed, 4, tmp_path, ckpt_path=checkpoint)
    assert trainer.global_step == 4 and asked == [] and resumed.tasks_per_backward == 2
    # A fixed setting is kept as given, whatever the checkpoint says.
    fixed = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap", tasks_per_backward=3)
    trainer = fit(fixed, 4, tmp_path, ckpt_path=checkpoint)
    assert fixed.tasks_per_backward == 3 and asked == []
    # A checkpoint saved before 'auto' existed (no record of it) ran the whole batch: so does its resumption.
    saved = torch.load(checkpoint, weights_only=False)
    del saved["tasks_per_backward_chosen"]
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    resumed = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    trainer = fit(resumed, 4, tmp_path, ckpt_path=old)
    assert trainer.global_step == 4 and asked == [] and resumed.tasks_per_backward is None


@pytest.mark.filterwarnings("ignore")
def test_a_short_runs_checkpoint_resumes_on_the_whole_batch(monkeypatch, tmp_path):
    # The saved run kept the whole batch untimed (2 planned steps); resumed into a run long enough
    # to time, it continues as it ran rather than timing in the middle.
    L.seed_everything(0)
    first = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    trainer = fit(first, 2, tmp_path)
    assert first.tasks_per_backward is None
    checkpoint = trainer.checkpoint_callback.best_model_path
    assert torch.load(checkpoint, weights_only=False)["tasks_per_backward_chosen"] is None
    monkeypatch.setattr(MAML, "group_timing_min_steps", 0)
    asked = with_timings(monkeypatch, {6: 1.0, 3: 1.0, 2: 1.0, 1: 1.0})
    resumed = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    trainer = fit(resumed, 4, tmp_path, ckpt_path=checkpoint)
    assert trainer.global_step == 4 and asked == [] and resumed.tasks_per_backward is None


def test_the_setting_is_checked_and_learners_without_a_graph_take_auto_or_none():
    for bad in ("Auto", "4", 0, 2.0, True):
        with pytest.raises(ValueError, match=r"tasks_per_backward must be a whole number of tasks, 1 or more, None "
                                             r"for the whole batch at once, or 'auto'"):
            MAML(MLP(), tasks_per_backward=bad)
    assert MAML(MLP()).tasks_per_backward_auto and iMAML(MLP()).tasks_per_backward_auto
    # Reptile differentiates no graph through the adaptation: 'auto' (the CLI passes MAML's
    # default explicitly) and None both mean the whole batch; a group size is refused.
    for accepted in ("auto", None):
        model = Reptile(MLP(), tasks_per_backward=accepted)
        assert model.tasks_per_backward is None and not model.tasks_per_backward_auto
    with pytest.raises(ValueError, match=r"Reptile takes no tasks_per_backward=2: .* Leave it at 'auto' or None"):
        Reptile(MLP(), tasks_per_backward=2)


def test_a_set_group_size_holds_while_the_paths_are_timed(monkeypatch):
    # batching="auto" times a training step on each path before the first one runs. A group size
    # set so that a step fits in memory must hold for those steps too: with tasks_per_backward=1
    # the timing holds one task's graph, well under half the whole batch's (measured 0.13x here;
    # before, the timed steps ran the whole batch whatever the setting).
    from test_grouped_backward import tensor_peak

    peaks = {}
    for group in (None, 1):
        torch.manual_seed(0)
        model = MAML(Conv4(hidden=16, out_features=5), inner_lr=0.4, batching="loop", tasks_per_backward=group)
        batch = random_episodes(8, ways=5, shots=1, queries=5, x_shape=(1, 28, 28))

        def choose():
            model.batching, model.memory_format = None, None  # undecided: time both layouts again
            model.choose_batching(batch)
            assert set(model.batching_timings) == {"loop", "loop channels_last"}

        choose()
        peaks[group] = tensor_peak(choose, monkeypatch)
    assert peaks[1] < 0.4 * peaks[None], peaks


# -- out of memory (a GPU's torch.OutOfMemoryError, simulated) ----------------------------------
def memory_for(monkeypatch, tasks, paths=None):
    """Make MAML's training losses raise torch.OutOfMemoryError for more than ``tasks`` tasks at
    once (on ``paths`` only, if given), as a GPU that holds that many tasks' graphs would."""
    losses_of = MAML.training_losses

    def losses(self, batch, batching=None):
        if batching is None:
            self.choose_batching(batch)  # as MAML.training_losses does first: the path timing
        path = path_name(*self.execution(batching))
        if batch.num_tasks > tasks and (paths is None or path in paths):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return losses_of(self, batch, batching)

    monkeypatch.setattr(MAML, "training_losses", losses)


def fit_logged(model, steps, caplog):
    with caplog.at_level(logging.INFO):
        return fit(model, steps, meta_batch=8)


@pytest.mark.filterwarnings("ignore")
def test_when_no_path_fits_the_batch_auto_halves_the_tasks_per_backward(monkeypatch, caplog):
    # Two tasks' graphs fit, eight do not (on either path): the path timing halves 8 -> 4 -> 2,
    # chooses a path at 2, and this short run trains in groups of 2 without running out.
    memory_for(monkeypatch, 2)
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05)
    trainer = fit_logged(model, 3, caplog)
    assert trainer.global_step == 3 and model.tasks_per_backward == 2
    assert set(model.batching_timings) == {"vmap", "loop"}  # timed at 2, where both fit
    text = caplog.text
    assert "out of memory on every path with 8 tasks per backward pass (vmap, loop); tasks_per_backward='auto' " \
           "tries 4" in text
    assert "with 4 tasks per backward pass (vmap, loop); tasks_per_backward='auto' tries 2" in text
    assert "keeps groups of 2 of its 8 tasks untimed" in text


@pytest.mark.filterwarnings("ignore")
def test_a_timed_run_times_only_the_groups_that_fit(monkeypatch, caplog):
    monkeypatch.setattr(MAML, "group_timing_min_steps", 0)
    memory_for(monkeypatch, 3)
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05)
    trainer = fit_logged(model, 3, caplog)
    assert trainer.global_step == 3
    # The path was timed at 2 tasks per backward pass (8 and 4 ran out); the group timing starts there.
    assert list(model.group_timings) == ["2", "1"] and model.tasks_per_backward in (2, 1)


def test_the_group_timing_skips_a_size_that_runs_out(monkeypatch, caplog):
    def fake(self, batch, size, trainable):
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {2: 1.0, 1: 1.02}[size], None

    monkeypatch.setattr(MAML, "_timed_group_step", fake)
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    with caplog.at_level(logging.INFO):
        assert model.choose_tasks_per_backward(regression_batch(8), force=True) == 1
    assert list(model.group_timings) == ["2", "1"]
    assert "whole batch out of memory, 4 out of memory, 2 1000.0 ms, 1 1020.0 ms" in caplog.text
    # Not even one task fits: the error, naming what to change.
    monkeypatch.setattr(MAML, "_timed_group_step",
                        lambda self, batch, size, trainable: (_ for _ in ()).throw(torch.OutOfMemoryError("out")))
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, batching="vmap")
    with pytest.raises(torch.OutOfMemoryError, match=r"MAML ran out of memory holding 1 task' graphs"):
        model.choose_tasks_per_backward(regression_batch(8), force=True)


@pytest.mark.filterwarnings("ignore")
def test_a_path_that_runs_out_is_left_out(monkeypatch, caplog):
    memory_for(monkeypatch, 0, paths={"vmap"})
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05)
    trainer = fit_logged(model, 2, caplog)
    assert trainer.global_step == 2 and model.batching == "loop" and model.tasks_per_backward is None
    assert set(model.batching_timings) == {"loop"}
    assert "batching='auto' leaves out 'vmap': out of memory with 8 tasks per backward pass" in caplog.text


@pytest.mark.filterwarnings("ignore")
def test_a_set_group_size_that_does_not_fit_stops_with_what_to_change(monkeypatch):
    memory_for(monkeypatch, 2)
    model = MAML(MLP(1, (8, 8), 1), inner_lr=0.05, tasks_per_backward=4)
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory.*\n"
                                                     r"MAML ran out of memory holding 4 tasks' graphs for one backward "
                                                     r"pass\. Fewer at a time give the same gradient: "
                                                     r"tasks_per_backward=N"):
        fit(model, 2, meta_batch=8)


@pytest.mark.filterwarnings("ignore")
def test_the_command_adds_what_to_change_to_an_out_of_memory_error(monkeypatch, cli, tmp_path):
    # A step that runs out of memory where nothing was timed (batching fixed): the error reaches
    # the command with its traceback and a note on what lowers a step's memory.
    from fewshot_lightning.cli import OUT_OF_MEMORY_NOTE
    from test_cli import SINUSOID

    memory_for(monkeypatch, 0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        cli("fit", "--config", SINUSOID, "--trainer.max_steps", "2", "--model.init_args.batching", "vmap",
            "--model.init_args.tasks_per_backward", "null", "--data.init_args.val_tasks", "5")
    assert OUT_OF_MEMORY_NOTE in getattr(raised.value, "__notes__", [])
    assert "--model.init_args.tasks_per_backward N" in OUT_OF_MEMORY_NOTE
    # Not even one task fits on any path: MAML's own error already says what to change; the
    # command adds no second note saying it again.
    with pytest.raises(torch.OutOfMemoryError, match=r"MAML ran out of memory holding 1 task' graphs") as raised:
        cli("fit", "--config", SINUSOID, "--trainer.max_steps", "2", "--data.init_args.val_tasks", "5")
    assert OUT_OF_MEMORY_NOTE not in getattr(raised.value, "__notes__", [])
