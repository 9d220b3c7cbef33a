"""``batching="auto"`` times evaluation's paths (two evaluation steps on each) only where the run
evaluates enough batches to repay it; a short run (a smoke test, ``--trainer.limit_test_batches
1``) evaluates untimed on training's path, or the path its checkpoint's training chose."""
import logging

import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import EpisodicDataModule
from fewshot_lightning.models import Conv4


def data():
    images, labels = torch.rand(120, 1, 16, 16), torch.arange(20).repeat_interleave(6)
    return EpisodicDataModule(images, labels, ways=3, shots=1, queries=2, meta_batch_size=2, train_tasks=40,
                              val_tasks=8, test_tasks=8, split_fractions=(0.6, 0.2, 0.2), num_workers=0)


@pytest.fixture
def timed(monkeypatch):
    """The evaluation flags of every timed step, the steps themselves running as usual."""
    calls = []
    timed_step = MAML._timed_step

    def spy(self, batch, batching, memory_format="contiguous", evaluation=False):
        calls.append(evaluation)
        return timed_step(self, batch, batching, memory_format, evaluation=evaluation)

    monkeypatch.setattr(MAML, "_timed_step", spy)
    return calls


def trainer(tmp_path, **kwargs):
    options = dict(max_steps=4, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return L.Trainer(**options)


def test_a_short_fit_validates_untimed_on_trainings_path(tmp_path, timed, caplog):
    model = MAML(Conv4(hidden=8, image_size=16, out_features=3), inner_lr=0.4)
    fit = trainer(tmp_path)
    lightning_log = logging.getLogger("lightning.pytorch")  # does not propagate to the root logger
    lightning_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            fit.fit(model, data())
    finally:
        lightning_log.removeHandler(caplog.handler)
    # Two validations of two batches: 4 planned, at most twice the 4 candidate paths.
    assert timed == [False] * 9  # training's choice only: a first untimed vmap try, then 4 paths twice
    assert model.evaluation_path is None and model.evaluation_timings == {}
    assert model._untimed_path == (model.batching, model.memory_format)
    assert "runs evaluation on" in caplog.text and "(training's path) untimed: this run evaluates 4 batches" in caplog.text

    # From its checkpoint, a one-batch test runs untimed on the path training chose.
    timed.clear()
    tested = MAML(Conv4(hidden=8, image_size=16, out_features=3), inner_lr=0.4)
    trainer(tmp_path, limit_test_batches=1).test(tested, data(), ckpt_path=fit.checkpoint_callback.best_model_path)
    assert timed == []
    assert tested._untimed_path == (model.batching, model.memory_format)


def test_enough_batches_or_the_setting_time_evaluation(tmp_path, timed):
    # 3 validations of 4 batches: 12 planned, more than 6 (evaluation's three paths, the
    # channels-last loop left out, twice): evaluation is timed on its own steps.
    model = MAML(Conv4(hidden=8, image_size=16, out_features=3), inner_lr=0.4)
    fit = trainer(tmp_path, max_steps=6, limit_val_batches=4)
    fit.fit(model, data())
    assert timed.count(True) == 6 and model.evaluation_path is not None and model._untimed_path is None
    # untimed_evaluation_batches = 0 times even a one-batch test.
    timed.clear()
    tested = MAML(Conv4(hidden=8, image_size=16, out_features=3), inner_lr=0.4)
    tested.untimed_evaluation_batches = 0
    trainer(tmp_path, limit_test_batches=1).test(tested, data())
    assert timed.count(True) == 7 and tested.evaluation_path is not None  # and an untimed first vmap try


def test_planned_batches_of_each_stage(tmp_path):
    model = MAML(Conv4(hidden=8, image_size=16, out_features=3), inner_lr=0.4)
    seen = {}

    class Record(L.Callback):
        def on_validation_batch_start(self, trainer, module, *args):
            seen.setdefault(trainer.state.fn, module.planned_evaluation_batches())

        on_test_batch_start = on_validation_batch_start

    callbacks = [Record()]
    trainer(tmp_path, max_steps=6, limit_val_batches=3, callbacks=callbacks).fit(model, data())
    trainer(tmp_path, limit_val_batches=3, callbacks=callbacks).validate(model, data())
    trainer(tmp_path, limit_test_batches=2, callbacks=callbacks).test(model, data())
    # fit: 3 validation batches x (6 steps // 2); validate: 3; test: 2.
    assert {fn.value: n for fn, n in seen.items()} == {"fit": 9.0, "validate": 3.0, "test": 2.0}
