"""The DataModules' shared machinery: class splits, batches per split, per-split seeds, and
the errors that name what to fix."""
import pytest
import torch

from fewshot_lightning.data import EpisodicDataModule, split_by_class
from test_episodes import CLASSES, PER_CLASS, as_pinned, identity_data


def test_class_split_is_disjoint_and_sized():
    data, labels = identity_data()
    splits = split_by_class(data, labels, (0.6, 0.2, 0.2), seed=0)
    classes = {name: set(part.labels.unique().tolist()) for name, part in splits.items()}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert not (classes["train"] & classes["val"]) and not (classes["train"] & classes["test"])
    assert not (classes["val"] & classes["test"])
    assert sum(len(part.labels) for part in splits.values()) == CLASSES * PER_CLASS


def test_datamodule_batches_and_eval_episode_shape():
    data, labels = identity_data()
    dm = EpisodicDataModule(
        data, labels, ways=8, shots=1, queries=2, test_ways=5, test_shots=3, meta_batch_size=4,
        train_tasks=12, val_tasks=6, test_tasks=6, num_workers=0,
    )
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    val = list(dm.val_dataloader())
    assert train.support_x.shape == (4, 8, 2) and int(train.support_y.max()) == 7
    assert val[0].support_x.shape == (4, 15, 2) and val[1].support_x.shape == (2, 15, 2)  # 6 = 4 + 2
    # Validation episodes are the same on every pass.
    assert torch.equal(list(dm.val_dataloader())[0].support_x, val[0].support_x)


def test_a_dataloader_before_setup_names_the_setup_call():
    data, labels = identity_data()
    dm = EpisodicDataModule(data, labels, num_workers=0)
    # Lightning calls setup(stage) first; called by hand without it, the error says which call is missing.
    with pytest.raises(RuntimeError, match=r"no train tasks yet: call `setup\('fit'\)` before `train_dataloader\(\)`"):
        dm.train_dataloader()
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"call `setup\('test'\)` before `test_dataloader\(\)`"):
        dm.test_dataloader()
    assert dm.val_dataloader() is not None


def test_datamodule_names_the_split_that_cannot_hold_the_request():
    data, labels = identity_data()
    dm = EpisodicDataModule(data, labels, ways=5, test_ways=10, num_workers=0)  # round(30 * 0.16) = 5 val classes < 10
    with pytest.raises(ValueError, match="val split of EpisodicDataModule: Cannot sample 10-way tasks from 5 classes"):
        dm.setup("fit")


def test_the_datamodule_stream_is_the_recorded_one():
    # Recorded, like test_episodes.PINNED_TASKS, before the data refactor of issue 8: each split's
    # seed (seed * 3 + split index) and the sampler's epoch offset pick these exact tasks.
    ids = torch.arange(750)
    dm = EpisodicDataModule(
        ids.float()[:, None], ids // 25, ways=5, shots=1, queries=2, test_ways=3, meta_batch_size=2,
        train_tasks=8, val_tasks=4, test_tasks=4, num_workers=0, seed=2,
    )
    dm.setup("fit")
    dm.setup("test")
    train = dm.train_dataloader()
    train.sampler.set_epoch(3)
    assert as_pinned(next(iter(train))) == (
        [[475, 301, 608, 550, 406], [422, 25, 486, 235, 510]], [[3, 4, 1, 0, 2], [0, 4, 1, 3, 2]],
        [[413, 482, 623, 556, 620, 420, 551, 304, 496, 321], [508, 424, 505, 481, 37, 494, 246, 38, 229, 417]],
        [[2, 3, 1, 0, 1, 2, 0, 4, 3, 4], [2, 0, 2, 1, 4, 1, 3, 4, 3, 0]],
    )
    assert as_pinned(next(iter(dm.val_dataloader()))) == (
        [[148, 11, 674], [5, 166, 146]], [[2, 0, 1], [2, 0, 1]],
        [[22, 666, 132, 14, 131, 658], [157, 9, 145, 134, 7, 172]], [[0, 1, 2, 0, 2, 1], [0, 2, 1, 1, 2, 0]],
    )
    assert as_pinned(next(iter(dm.test_dataloader())))[:2] == ([[633, 742, 341], [181, 325, 540]], [[1, 0, 2], [2, 0, 1]])
