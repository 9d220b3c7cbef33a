"""Episode sampling: shapes, labels, disjointness, reproducibility across epochs, ranks, workers."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fewshot_lightning.data import (
    EpisodeDataset,
    EpisodeSampler,
    EpisodicDataModule,
    TaskBatch,
    collate_tasks,
    split_by_class,
)

CLASSES, PER_CLASS = 30, 25


def identity_data():
    """Sample j is the vector [j, j] and has class j // 25: each sample identifies itself."""
    ids = torch.arange(CLASSES * PER_CLASS)
    return ids.float().repeat(2, 1).T.contiguous(), ids // PER_CLASS


def test_task_shapes_labels_and_no_support_query_overlap():
    data, labels = identity_data()
    dataset = EpisodeDataset(data, labels, ways=5, shots=3, queries=4, num_tasks=50, seed=1)
    for index in range(50):
        sx, sy, qx, qy = dataset[index]
        assert sx.shape == (15, 2) and qx.shape == (20, 2)
        assert sy.dtype == torch.long and qy.dtype == torch.long
        # Every label 0..4 appears exactly K times in the support and Q times in the query.
        assert torch.bincount(sy, minlength=5).tolist() == [3] * 5
        assert torch.bincount(qy, minlength=5).tolist() == [4] * 5
        support_ids, query_ids = sx[:, 0].long(), qx[:, 0].long()
        assert len(set(support_ids.tolist()) | set(query_ids.tolist())) == 35  # no sample twice
        # A task label means one original class, the same in support and query.
        for label in range(5):
            classes = torch.cat([labels[support_ids[sy == label]], labels[query_ids[qy == label]]])
            assert classes.unique().numel() == 1


def test_labels_are_shuffled_per_task_and_support_order_is_not_grouped():
    data, labels = identity_data()
    dataset = EpisodeDataset(data, labels, ways=5, shots=2, queries=2, num_tasks=200, seed=0)
    class_of_label0 = {int(labels[int(dataset[i].support_x[dataset[i].support_y == 0][0, 0])]) for i in range(200)}
    # 200 tasks drawing 5 of 30 classes: label 0 lands on many different classes (~all 30).
    assert len(class_of_label0) >= 20
    sorted_order = sum(bool((dataset[i].support_y.diff() >= 0).all()) for i in range(200))
    assert sorted_order < 5  # P(10 shuffled labels come out sorted) is about 1/113400


def test_same_index_same_task_and_epochs_differ():
    data, labels = identity_data()
    a = EpisodeDataset(data, labels, ways=5, shots=1, queries=2, num_tasks=10, seed=7)
    b = EpisodeDataset(data, labels, ways=5, shots=1, queries=2, num_tasks=10, seed=7)
    c = EpisodeDataset(data, labels, ways=5, shots=1, queries=2, num_tasks=10, seed=8)
    for index in (0, 3, 25):
        assert all(torch.equal(x, y) for x, y in zip(a[index], b[index]))
    assert not torch.equal(a[3].support_x, c[3].support_x)  # another seed, another task
    assert not torch.equal(a[3].support_x, a[13].support_x)  # task 3 of epoch 1 is new


def test_sampler_splits_tasks_across_ranks_and_epochs():
    data, labels = identity_data()
    dataset = EpisodeDataset(data, labels, num_tasks=10, ways=2, shots=1, queries=1)
    ranks = [EpisodeSampler(dataset, num_replicas=3, rank=r) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    seen = [list(s) for s in ranks]
    # 10 tasks over 3 ranks: 3 each (one dropped so ranks step together), disjoint, all from epoch 2.
    assert [len(s) for s in seen] == [3, 3, 3]
    flat = sum(seen, [])
    assert len(set(flat)) == 9 and all(20 <= i < 30 for i in flat)
    fixed = [list(EpisodeSampler(dataset, fixed=True, num_replicas=3, rank=r)) for r in range(3)]
    # Evaluation: every task exactly once, the same whatever the epoch.
    assert sorted(sum(fixed, [])) == list(range(10))


def test_workers_do_not_change_the_tasks():
    data, labels = identity_data()
    dataset = EpisodeDataset(data, labels, ways=5, shots=1, queries=3, num_tasks=16, seed=3)

    def batches(workers):
        sampler = EpisodeSampler(dataset)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_tasks, num_workers=workers)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 4 and isinstance(serial[0], TaskBatch)
    assert serial[0].support_x.shape == (4, 5, 2)
    for s, p in zip(serial, parallel):
        assert all(torch.equal(x, y) for x, y in zip(s, p))


def test_dataset_of_pairs_and_uint8_scaling():
    images = torch.randint(0, 256, (60, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(6).repeat_interleave(10)
    from_tensor = EpisodeDataset(images, labels, ways=3, shots=2, queries=2, num_tasks=5)
    task = from_tensor[0]
    assert task.support_x.dtype == torch.float32
    assert 0.0 <= float(task.support_x.min()) and float(task.support_x.max()) <= 1.0
    # A Dataset of (x, y) pairs with a `targets` attribute gives the same tasks as the tensor.
    pairs = TensorDataset(images.float() / 255, labels)
    pairs.targets = labels
    from_pairs = EpisodeDataset(pairs, None, ways=3, shots=2, queries=2, num_tasks=5)
    assert torch.allclose(from_pairs[0].support_x, task.support_x)
    assert torch.equal(from_pairs[0].query_y, task.query_y)


def test_impossible_requests_name_the_numbers():
    data, labels = identity_data()
    with pytest.raises(ValueError, match="Cannot sample 31-way tasks from 30 classes"):
        EpisodeDataset(data, labels, ways=31, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"5-shot 21-query tasks need 26 samples per class.*smallest has 25"):
        EpisodeDataset(data, labels, ways=5, shots=5, queries=21)
    with pytest.raises(ValueError, match="shots must be at least 1, got 0"):
        EpisodeDataset(data, labels, ways=5, shots=0, queries=1)
    with pytest.raises(ValueError, match="Got 3 labels for 750 samples"):
        EpisodeDataset(data, labels[:3])


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


def test_datamodule_names_the_split_that_cannot_hold_the_request():
    data, labels = identity_data()
    dm = EpisodicDataModule(data, labels, ways=5, test_ways=10, num_workers=0)  # round(30 * 0.16) = 5 val classes < 10
    with pytest.raises(ValueError, match="val split of EpisodicDataModule: Cannot sample 10-way tasks from 5 classes"):
        dm.setup("fit")
