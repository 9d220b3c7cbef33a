"""The learn2learn adapter: our tasks hold exactly what the learn2learn taskset sampled."""
from __future__ import annotations

import random
import sys

import pytest
import torch

from fewshot_lightning.data import scale_images
from fewshot_lightning.data import TaskBatch, collate_tasks
from fewshot_lightning.data.learn2learn_tasks import Learn2LearnDataModule, Learn2LearnTasks, import_learn2learn

CLASSES, PER_CLASS = 20, 6
WAYS, SHOTS, QUERIES = 5, 2, 3


def make_taskset(per_class: int = SHOTS + QUERIES):
    """A learn2learn taskset over 20 classes x 6 uint8 images of 1x4x4, built as in
    learn2learn's examples. Pixel (0, 0) of sample ``i`` is ``i``, so a sample can be traced."""
    l2l = pytest.importorskip("learn2learn")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CLASSES * PER_CLASS, 1, 4, 4), dtype=torch.uint8, generator=generator)
    images[:, 0, 0, 0] = torch.arange(CLASSES * PER_CLASS, dtype=torch.uint8)
    labels = torch.arange(CLASSES * PER_CLASS) // PER_CLASS
    dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    transforms = [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=WAYS, k=per_class),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
    ]
    return l2l.data.Taskset(dataset, transforms, num_tasks=-1)  # TaskDataset is its deprecated alias


def sample_ids(x: torch.Tensor) -> list:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_tasks_hold_exactly_what_the_taskset_sampled():
    taskset = make_taskset()
    tasks = Learn2LearnTasks(taskset, WAYS, SHOTS, QUERIES, num_tasks=10, seed=7)
    for index in range(3):
        batch = tasks[index]
        # What learn2learn draws with Python's random seeded as documented.
        random.seed(tasks.task_seed(index))
        data, labels = taskset.get_task(taskset.sample_task_description())
        # 5-way 2-shot 3-query: 10 support and 15 query samples.
        assert batch.support_x.shape == (10, 1, 4, 4) and batch.query_x.shape == (15, 1, 4, 4)
        raw_ids = sample_ids(data.float() / 255)
        raw_label = dict(zip(raw_ids, labels.tolist()))
        # Per class, the taskset's first 2 samples are support and the other 3 query.
        expected_support = {i for c in range(WAYS) for i in [r for r in raw_ids if raw_label[r] == c][:SHOTS]}
        assert set(sample_ids(batch.support_x)) == expected_support
        assert set(sample_ids(batch.query_x)) == set(raw_ids) - expected_support
        # Same pixels, scaled from uint8 to [0, 1].
        position = {sample: p for p, sample in enumerate(raw_ids)}
        for x in torch.cat([batch.support_x, batch.query_x]):
            assert torch.equal(x, data[position[sample_ids(x[None])[0]]].float() / 255)
        # One new label per taskset class, the same in support and query: a bijection onto 0..4.
        mapping = {}
        for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
            for sample, new in zip(sample_ids(x), y.tolist()):
                assert mapping.setdefault(raw_label[sample], new) == new
        assert sorted(mapping.values()) == list(range(WAYS))
        assert batch.support_y.dtype == torch.long and torch.bincount(batch.support_y).tolist() == [SHOTS] * WAYS


def test_tasks_are_reproducible_and_leave_the_global_random_state_alone():
    taskset = make_taskset()
    tasks = Learn2LearnTasks(taskset, WAYS, SHOTS, QUERIES, num_tasks=10, seed=7)
    random.seed(123)
    state = random.getstate()
    first, again, other = tasks[4], tasks[4], tasks[5]
    assert random.getstate() == state
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # Another index draws other samples (5 of 20 classes: the same draw is very unlikely, and seeded here).
    assert set(sample_ids(first.support_x)) != set(sample_ids(other.support_x))
    # Epoch 1 (index 10 + 4) is a new task, not a replay of epoch 0.
    assert set(sample_ids(tasks[14].support_x)) != set(sample_ids(first.support_x))


def test_a_taskset_with_random_augmentation_gives_the_same_tasks_in_any_worker():
    # Only Python's random was seeded per task: learn2learn's augmentation (torchvision transforms,
    # torch's generator) made every task depend on the worker and on what ran before.
    l2l = pytest.importorskip("learn2learn")
    images = torch.arange(CLASSES * PER_CLASS, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    labels = torch.arange(CLASSES * PER_CLASS) // PER_CLASS

    class Jitter(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i] + torch.rand(1, 4, 4) * 0.5, int(labels[i])

    dataset = l2l.data.MetaDataset(Jitter())
    taskset = l2l.data.Taskset(dataset, [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=WAYS, k=SHOTS + QUERIES),
        l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
    ], num_tasks=-1)
    tasks = Learn2LearnTasks(taskset, WAYS, SHOTS, QUERIES, num_tasks=8, seed=7)

    def batches(workers):
        loader = torch.utils.data.DataLoader(tasks, batch_size=2, num_workers=workers, collate_fn=collate_tasks)
        return list(loader)

    torch.manual_seed(0)
    serial = batches(0)
    torch.manual_seed(1)
    for s, p in zip(serial, batches(2)):
        assert all(torch.equal(x, y) for x, y in zip(s, p))
    # The jitter is there (not a constant): fractional parts differ across samples.
    assert len(set((serial[0].support_x - serial[0].support_x.floor()).flatten().tolist())) > 10


def test_datamodule_batches_tasks_from_prebuilt_tasksets():
    taskset = make_taskset()
    module = Learn2LearnDataModule(
        tasksets={"train": taskset, "validation": taskset, "test": taskset}, ways=WAYS, shots=SHOTS,
        queries=QUERIES, meta_batch_size=4, train_tasks=8, val_tasks=4, num_workers=0,
    )
    module.setup("fit")
    batch = scale_images(next(iter(module.train_dataloader())))
    assert isinstance(batch, TaskBatch)
    # 4 tasks per batch of 10 support and 15 query images.
    assert batch.support_x.shape == (4, 10, 1, 4, 4) and batch.query_y.shape == (4, 15)
    val_batch = scale_images(next(iter(module.val_dataloader())))
    assert torch.equal(val_batch.query_x, scale_images(next(iter(module.val_dataloader()))).query_x)  # fixed episodes


def test_a_taskset_of_the_wrong_shape_is_explained():
    # 4 samples per class cannot make 2-shot 3-query episodes (5 needed).
    tasks = Learn2LearnTasks(make_taskset(per_class=4), WAYS, SHOTS, QUERIES, num_tasks=2)
    with pytest.raises(ValueError, match=r"FusedNWaysKShots\(n=5, k=5\)"):
        tasks[0]


def test_missing_learn2learn_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # makes `import learn2learn` fail
    with pytest.raises(ImportError, match="pip install learn2learn==0.2.0"):
        import_learn2learn()
    with pytest.raises(ImportError, match="pip install"):
        Learn2LearnDataModule(benchmark="omniglot")


def test_episodes_a_taskset_cannot_give_stop_at_setup_naming_the_split():
    # 20 classes of 6 samples: 21-way validation/test episodes, or 7 samples per class, failed in
    # learn2learn's sampler ("Sample larger than population"), the test's only after the fit.
    taskset = make_taskset()

    def module(**episodes):
        arguments = dict(ways=WAYS, shots=SHOTS, queries=QUERIES, meta_batch_size=2, train_tasks=2, val_tasks=2,
                         test_tasks=2, num_workers=0)
        arguments.update(episodes)
        return Learn2LearnDataModule(tasksets={"train": taskset, "val": taskset, "test": taskset}, **arguments)

    with pytest.raises(ValueError, match=r"test_ways = 21, but the val taskset's dataset has only 20 classes and the "
                                         r"test taskset's dataset has only 20 classes: set test_ways to at most 20"):
        module(test_ways=21).setup("fit")
    with pytest.raises(ValueError, match=r"need 7 samples per class, but 20 of the 20 classes of the train taskset's "
                                         r"dataset have fewer .*build the datasets with at least 7 samples per class"):
        module(shots=4, queries=3).setup("fit")
    module().setup("fit")  # what fits passes
    # A taskset giving tasks of another shape says which split's, shaped by which arguments, at
    # setup (one task of each split is drawn there).
    with pytest.raises(ValueError, match=r"The val taskset \(episodes of test_ways = 3, test_shots \(not set, so "
                                         r"shots = 2\), .*\) gave a task of 5 classes"):
        module(test_ways=3).setup("validate")
    # A taskset whose own transforms ask more than its dataset holds (7 samples of classes of 6):
    # learn2learn's sampler failed at the split's first batch.
    l2l = pytest.importorskip("learn2learn")
    dataset = taskset.dataset
    greedy = l2l.data.Taskset(dataset, [l2l.data.transforms.NWays(dataset, WAYS), l2l.data.transforms.KShots(dataset, 7),
                                        l2l.data.transforms.LoadData(dataset)], num_tasks=-1)
    with pytest.raises(ValueError, match=r"The test taskset \(episodes of .*\) could not draw a task; learn2learn "
                                         r"said: Sample larger than population.*FusedNWaysKShots\(n=5, k=5\)"):
        Learn2LearnDataModule(tasksets={"train": taskset, "val": taskset, "test": greedy}, ways=WAYS, shots=SHOTS,
                              queries=QUERIES, num_workers=0).setup("test")
