"""Episode sampling: shapes, labels, disjointness, reproducibility across epochs, ranks, workers."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fewshot_lightning.data import EpisodeDataset, EpisodeSampler, TaskBatch, collate_tasks

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


class NoisyAugmentation:
    """An augmentation drawing from all three global generators, as torchvision's (torch),
    albumentations' (numpy) and older code's (Python's random) do."""

    def __call__(self, x):
        import random

        import numpy as np
        return x + torch.rand(()) + float(np.random.rand()) + random.random()


def test_random_augmentation_keeps_tasks_independent_of_workers_and_of_what_ran_before():
    # A transform's random draws came from whatever state each worker's (or the main process's)
    # global generators had: the training tasks changed with num_workers and with any torch
    # call before the run, and dataset[i] gave another task at every call.
    data, labels = identity_data()
    dataset = EpisodeDataset(data, labels, ways=5, shots=1, queries=3, num_tasks=16, seed=3,
                             transform=NoisyAugmentation())

    def batches(workers):
        sampler = EpisodeSampler(dataset)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_tasks, num_workers=workers)
        return list(loader)

    import random

    import numpy as np
    torch.manual_seed(0)
    serial = batches(0)
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    again, parallel = batches(0), batches(2)
    for s, a, p in zip(serial, again, parallel):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(s, a, p))
    # A task drawn alone is the same at every call, and leaves the caller's generators as they were
    # (a DataLoader draws its own base seed from torch's: checked here without one).
    state = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = dataset[20]
    assert torch.equal(first.support_x, dataset[20].support_x)
    assert torch.equal(torch.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])
    assert random.getstate() == state[2]
    # The augmentation is random across tasks and samples: each sample's offset (three uniforms
    # summed, in [0, 3)) is the augmented value less the sample's own id.
    offsets = torch.cat([b.support_x - b.support_x.floor() for b in serial]).flatten()
    assert len(set(offsets.tolist())) > 20
    # Sample ids are recovered exactly: offsets stay below 3 and each sample is [j, j] + noise.
    assert torch.all(first.support_x[:, 0] == first.support_x[:, 1])


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
    with pytest.raises(ValueError, match="ways = 31, but the data has only 30 classes: set ways to at most 30"):
        EpisodeDataset(data, labels, ways=31, shots=1, queries=1)
    with pytest.raises(
        ValueError,
        match=r"shots = 5 and queries = 21 need 26 samples per class, but 30 of the 30 classes of the data have fewer "
        r"\(the smallest, class 0, has 25\): lower shots and queries to sum to at most 25",
    ):
        EpisodeDataset(data, labels, ways=5, shots=5, queries=21)
    # Advice that can be followed: with one class, or a class of one sample, no number fits.
    with pytest.raises(ValueError, match="the data has 1 class, and an episode needs at least 2: use data with more"):
        EpisodeDataset(data[:25], labels[:25], ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"1 of the 30 classes of the data \(class 29\) has a single sample, and"):
        EpisodeDataset(data[:-24], labels[:-24], ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="shots must be at least 1, got 0"):
        EpisodeDataset(data, labels, ways=5, shots=0, queries=1)
    with pytest.raises(ValueError, match="got 3 labels for 750 samples"):
        EpisodeDataset(data, labels[:3])


# The task stream, pinned: sample indices (support, then query) and labels of a few tasks,
# recorded from the sampler of commit 3d5f579 (before the data refactor of issue 8). Any change
# to seeding or drawing changes them, and with them every published number of a run. Covered:
# the argsort path (narrow classes), the argpartition path (classes wider than 4 * (K + Q)),
# ragged class sizes and later epochs (index >= num_tasks); test_datamodule.py pins the
# DataModule's per-split seeds.
PINNED_TASKS = {
    # (classes, per class, ways, shots, queries, num_tasks, seed): {index: (support, support_y, query, query_y)}
    (30, 25, 5, 2, 3, 100, 11): {
        0: ([308, 348, 28, 301, 349, 619, 606, 38, 472, 450], [3, 4, 2, 3, 4, 1, 1, 2, 0, 0],
            [338, 458, 40, 318, 468, 29, 620, 329, 344, 465, 312, 36, 615, 320, 609],
            [4, 0, 2, 3, 0, 2, 1, 4, 4, 0, 3, 2, 1, 3, 1]),
        42: ([347, 321, 55, 157, 344, 405, 67, 314, 420, 151], [3, 1, 0, 4, 3, 2, 0, 1, 2, 4],
             [150, 315, 50, 170, 309, 342, 160, 400, 335, 305, 61, 416, 424, 60, 330],
             [4, 1, 0, 4, 1, 3, 4, 2, 3, 1, 0, 2, 2, 0, 3]),
        1337: ([745, 339, 120, 728, 122, 344, 233, 239, 538, 529], [3, 1, 4, 3, 4, 1, 2, 2, 0, 0],
               [530, 328, 540, 109, 113, 743, 243, 238, 228, 536, 731, 729, 335, 334, 104],
               [0, 1, 0, 4, 4, 3, 2, 2, 2, 0, 3, 3, 1, 1, 4]),
    },
    (8, 600, 3, 1, 2, 50, 3): {
        5: ([2195, 1285, 3671], [1, 0, 2], [2387, 1727, 1428, 1815, 3779, 3880], [1, 0, 0, 1, 2, 2]),
        260: ([2913, 2304, 719], [0, 1, 2], [2356, 758, 1987, 2771, 2909, 667], [1, 2, 1, 0, 0, 2]),
    },
}
# Class c holds 4 + c samples: 4-way 1-shot 3-query, 20 tasks, seed 0.
PINNED_RAGGED = {
    1: ([37, 56, 67, 44], [2, 1, 0, 3], [46, 55, 50, 62, 71, 40, 47, 32, 31, 52, 70, 33],
        [3, 1, 1, 0, 0, 3, 3, 2, 2, 1, 0, 2]),
    33: ([14, 3, 7, 48], [2, 1, 3, 0], [13, 43, 12, 2, 0, 6, 8, 11, 44, 40, 5, 1], [2, 0, 2, 1, 1, 3, 3, 2, 0, 0, 3, 1]),
}


def as_pinned(task):
    return (task.support_x[..., 0].long().tolist(), task.support_y.tolist(),
            task.query_x[..., 0].long().tolist(), task.query_y.tolist())


def test_the_task_stream_is_the_recorded_one():
    for (classes, per_class, ways, shots, queries, num_tasks, seed), tasks in PINNED_TASKS.items():
        ids = torch.arange(classes * per_class)
        dataset = EpisodeDataset(ids.float()[:, None], ids // per_class, ways, shots, queries, num_tasks, seed)
        for index, expected in tasks.items():
            assert as_pinned(dataset[index]) == expected, (classes, index)
        # A batch drawn through __getitems__ (the DataLoader's path) is the same tasks.
        batch = dataset.__getitems__(list(tasks))
        assert [as_pinned(TaskBatch(*task)) for task in zip(*batch)] == [as_pinned(dataset[i]) for i in tasks]
    labels = torch.cat([torch.full((4 + c,), c) for c in range(10)])
    ragged = EpisodeDataset(torch.arange(len(labels)).float()[:, None], labels, 4, 1, 3, num_tasks=20, seed=0)
    for index, expected in PINNED_RAGGED.items():
        assert as_pinned(ragged[index]) == expected, index
