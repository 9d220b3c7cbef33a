"""Training metrics are logged on the steps something reads them, and those readers see exactly
what logging on every step would show them."""
import csv

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from fewshot_lightning.algorithms import MAML, Reptile
from fewshot_lightning.data import SinusoidDataModule
from fewshot_lightning.models import MLP

STEPS = 12


class EveryStep(MAML):
    """The reference: logs on every step, as Lightning's users usually do."""

    def training_metrics_read(self, batch_idx):
        return True


class Seen(Callback):
    """What the progress bar and monitoring callbacks would read after each step, and the loss."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((batch_idx, float(outputs["loss"]), trainer.progress_bar_metrics.get("train/loss"),
                          trainer.callback_metrics.get("train/loss")))


def fit(model_class, tmp_path, name, callbacks=(), log_every_n_steps=4, bar=None):
    L.seed_everything(0)
    model = model_class(MLP(1, (8,), 1), inner_lr=0.01)
    calls = []
    original = model.log_training
    model.log_training = lambda *args: (calls.append(model.global_step), original(*args))
    seen = Seen()
    trainer = L.Trainer(max_steps=STEPS, limit_val_batches=0, enable_model_summary=False,
                        logger=CSVLogger(tmp_path, name=name), log_every_n_steps=log_every_n_steps,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        enable_progress_bar=bar is not None, callbacks=[*callbacks, seen, *([bar] if bar else [])])
    trainer.fit(model, SinusoidDataModule(shots=5, queries=5, meta_batch_size=3, train_tasks=3 * STEPS, num_workers=0))
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        written = [(row["step"], row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    return calls, written, seen.rows


def test_the_loggers_get_the_same_values_with_a_quarter_of_the_calls(tmp_path):
    calls, written, _ = fit(MAML, tmp_path, "skipping")
    every_calls, every_written, _ = fit(EveryStep, tmp_path, "every")
    assert every_calls == list(range(STEPS))
    assert calls == [3, 7, 11]  # log_every_n_steps=4: the steps Lightning writes
    assert written == every_written and len(written) == 3


def test_the_progress_bar_shows_the_loss_of_each_step_it_refreshes_on(tmp_path):
    calls, _, rows = fit(MAML, tmp_path, "bar", log_every_n_steps=50, bar=TQDMProgressBar(refresh_rate=5))
    assert calls == [4, 9, 11]  # every 5th batch, and the epoch's last (12 batches)
    for batch_idx, loss, shown, _ in rows:
        if batch_idx in (4, 9, 11):
            assert shown == pytest.approx(loss)


def test_a_callback_monitoring_a_training_metric_sees_every_step(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss", every_n_train_steps=3)
    calls, _, rows = fit(MAML, tmp_path, "monitor", log_every_n_steps=50, callbacks=[checkpoint])
    assert calls == list(range(STEPS))
    assert all(monitored == pytest.approx(loss) for _, loss, _, monitored in rows)
    assert checkpoint.best_model_score is not None


def test_reptile_computes_its_query_pass_only_on_read_steps(tmp_path):
    calls, written, _ = fit(Reptile, tmp_path, "reptile")
    assert calls == [3, 7, 11] and len(written) == 3


def test_a_test_of_fewer_episodes_than_the_test_set_says_so(tmp_path):
    # 100 test tasks in batches of 25: one batch scores 25 of them, which is not the protocol's
    # number however the results table looks; the whole set raises no such warning. The same
    # model is tested twice: MAML's adaptation curve, reset in the first test's inference mode,
    # failed the second test's update ("Inplace update to inference tensor") until it was reset
    # outside it.
    import warnings

    model = MAML(MLP(), inner_lr=0.01, batching="vmap")
    data = SinusoidDataModule(meta_batch_size=25, test_tasks=100, num_workers=0)

    def test(**limit):
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, **limit)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            trainer.test(model, data)
        return [str(w.message) for w in warned if "test episodes" in str(w.message)]

    assert test(limit_test_batches=1) == [
        "This test scored 25 of the 100 test episodes (--trainer.limit_test_batches?): its test/mse and interval "
        "are not the full protocol's, which the papers report."]
    assert test() == []
