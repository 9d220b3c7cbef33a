"""The one source of task randomness: known values, no shared state, unrelated streams."""
import random

import numpy as np
import pytest
import torch

from fewshot_lightning.data import EpisodeDataset, Learn2LearnTasks, SinusoidTasks, TaskDataset
from fewshot_lightning.data.seeding import _splitmix64, task_uniforms, tasks_uniforms


def test_the_mixer_is_splitmix64():
    # The first three outputs of SplitMix64 seeded with 0, from the reference implementation
    # (Vigna, splitmix64.c): each step advances the state by the golden-ratio increment.
    gamma = 0x9E3779B97F4A7C15
    assert _splitmix64(0, 0) == 0xE220A8397B1DCDAF
    assert _splitmix64(gamma, 0) == 0x6E789E6AA1B965F4
    assert _splitmix64(2 * gamma % 2**64, 0) == 0x06C45D188009454F


def test_known_values():
    # Recorded from the seeding of EpisodeDataset before it moved here (commit 3d5f579: torch's
    # generator seeded by `mix64(seed, epoch, task)`); every published run's tasks come from them.
    expected = {
        (0, 0, 0): [0.1562047636084647, 0.043590688045737624, 0.020601627804137768],
        (0, 0, 1): [0.8809505085179167, 0.6916579866344253, 0.38422120410144267],
        (1, 0, 0): [0.003402363104365369, 0.32729060244471764, 0.13248946857165567],
        (7, 3, 12345): [0.2597369516758421, 0.5106256041258239, 0.3386014881771079],
    }
    for key, values in expected.items():
        uniforms = task_uniforms(*key, count=3)
        assert uniforms.dtype == np.float64 and uniforms.tolist() == values, key
    # 53-bit doubles: u * 2**53 is an exact integer (the learn2learn adapter's Python seed uses every bit).
    many = task_uniforms(1, 2, 3, 10_000) * 2**53
    assert np.array_equal(many, np.floor(many)) and 0 <= many.min() and many.max() < 2**53


def test_many_tasks_at_once_are_the_same_numbers():
    # The batched draw (one generator seeded again per task, rows written in place) that
    # SinusoidTasks and EpisodeDataset use for a meta-batch: bit for bit each task's own draw,
    # including the recorded known values above.
    pairs = [(0, 0), (0, 1), (3, 12345), (0, 0), (2, 7)]
    rows = tasks_uniforms(0, pairs, 5)
    assert rows.shape == (5, 5) and rows.dtype == np.float64
    for row, (epoch, task) in zip(rows, pairs):
        assert np.array_equal(row, task_uniforms(0, epoch, task, 5))
    assert rows[0, 0] == 0.1562047636084647 and rows[1, 0] == 0.8809505085179167
    assert tasks_uniforms(7, [(3, 12345)], 3)[0].tolist() == [0.2597369516758421, 0.5106256041258239, 0.3386014881771079]
    assert tasks_uniforms(0, [], 4).shape == (0, 4)


def test_no_shared_state():
    first = task_uniforms(3, 1, 4, 5)
    # Drawing other tasks, or using the global generators, changes nothing: each call is pure.
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    task_uniforms(3, 1, 5, 100)
    assert np.array_equal(task_uniforms(3, 1, 4, 5), first)
    # And it leaves the global generators where they were.
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    task_uniforms(0, 0, 0, 100)
    assert torch.equal(torch.rand(3), expected)


def test_distinct_and_unrelated_across_seed_epoch_and_task():
    grid = [(seed, epoch, task) for seed in range(4) for epoch in range(4) for task in range(64)]
    firsts = {tuple(task_uniforms(*key, count=4)) for key in grid}
    assert len(firsts) == len(grid)  # 1024 keys, 1024 different streams
    # Neighbouring keys must not give related streams. Over 4,000 tasks the first uniform has
    # mean 1/2 (standard error 0.0046) and neighbours' first uniforms a correlation of 0
    # (standard error 1/sqrt(4000) = 0.016): both are checked to 4 standard errors.
    tasks = np.array([task_uniforms(0, 0, task, 1)[0] for task in range(4_000)])
    seeds = np.array([task_uniforms(seed, 0, 0, 1)[0] for seed in range(4_000)])
    epochs = np.array([task_uniforms(0, epoch, 0, 1)[0] for epoch in range(4_000)])
    for stream in (tasks, seeds, epochs):
        assert abs(stream.mean() - 0.5) < 4 * 0.0046
        assert abs(np.corrcoef(stream[:-1], stream[1:])[0, 1]) < 4 * 0.016
    # Swapping roles gives other numbers: (seed, epoch, task) is an ordered key.
    assert not np.array_equal(task_uniforms(1, 2, 3, 4), task_uniforms(3, 2, 1, 4))


def test_a_dataset_index_is_an_epoch_and_a_task():
    dataset = TaskDataset(num_tasks=10, seed=3)
    # Index 25 of 10 tasks per epoch is task 5 of epoch 2.
    assert np.array_equal(dataset.uniforms(25, 6), task_uniforms(3, 2, 5, 6))


def episodes():
    ids = torch.arange(600)
    return EpisodeDataset(ids.float()[:, None], ids // 20, ways=5, shots=2, queries=3, num_tasks=50, seed=9)


def sinusoids():
    return SinusoidTasks(shots=5, queries=5, num_tasks=50, seed=9)


def learn2learn_tasks():
    from test_learn2learn_adapter import QUERIES, SHOTS, WAYS, make_taskset  # skips without learn2learn

    return Learn2LearnTasks(make_taskset(), WAYS, SHOTS, QUERIES, num_tasks=50, seed=9)


@pytest.mark.parametrize("make_dataset", [episodes, sinusoids, learn2learn_tasks], ids=lambda make: make.__name__)
def test_a_task_does_not_depend_on_its_batch(make_dataset):
    dataset = make_dataset()

    def batch(indices):
        if hasattr(dataset, "__getitems__"):
            return list(zip(*dataset.__getitems__(indices)))
        return [dataset[i] for i in indices]

    alone = dataset[57]  # task 7 of epoch 1
    # In batches with other neighbours, at other positions, after other tasks were drawn.
    for indices, position in (([3, 57, 12], 1), ([57, 0], 0), ([49, 8, 21, 57], 3)):
        task = batch(indices)[position]
        assert all(torch.equal(a, b) for a, b in zip(alone, task)), (indices, position)
    # Its neighbours are other tasks.
    assert not torch.equal(dataset[56][0], alone[0]) and not torch.equal(dataset[7][0], alone[0])
