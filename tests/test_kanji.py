"""The Kanji benchmark: deterministic bytes, sane images, a class-disjoint split, a reused cache.

Most tests use a 64-character build (``num_characters=64``, about 0.3 s to render) rather
than the full 6,394; characters are seeded by code point, so their images are the same
bytes in both.
"""
import hashlib
import importlib.util
import time

import numpy as np
import pytest
import torch

from fewshot_lightning.data import TaskBatch
from fewshot_lightning.data.datasets import KanjiDataModule, load_kanji, render_kanji, split_characters
from fewshot_lightning.data.datasets import kanji as kanji_module
from fewshot_lightning.data.datasets._storage import CHECKSUM_KEY, save_atomic

if importlib.util.find_spec("kanjidraw") is None:
    pytest.skip("the Kanji benchmark renders the kanjidraw package's stroke data", allow_module_level=True)

SUBSET = 64
INSTANCES = 20

# SHA-256 of the 20 instances (20 x 28 x 28 uint8, C order) of a few characters, render seed 0,
# computed once from kanjidraw 0.2.3's data.json. Any change to the rendering, or to the
# random streams it draws, changes these: bump FORMAT_VERSION then, so old caches rebuild.
DIGESTS = {
    "一": "844a3fb589c3f567de986756df4f7295db6e59232fa2ea56fbee1608998c76c6",  # 1 stroke
    "木": "9ef0534c715c250068739aa29485e6356d3f26c65dc3d79d0f46f30a8b41044f",  # 4 strokes
    "漢": "ad769aa6b8af263ee14e9ed762ca2a678a414376c1438afb8bcc975aef4dff28",  # 13 strokes
    "鬱": "b2ece06dae7ec76b417b0aafb50917c9b4b02a187fbe1da7f4e22934596779d6",  # 29 strokes, the most
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("kanji_root")


@pytest.fixture(scope="module")
def subset(root):
    return load_kanji(root, num_characters=SUBSET)


def test_rendering_matches_the_recorded_digests():
    characters, strokes, _ = kanji_module.load_strokes()
    for character, expected in DIGESTS.items():
        index = characters.index(character)
        images = kanji_module.render_character(strokes[index], ord(character), INSTANCES, 28, seed=0)
        assert images.shape == (INSTANCES, 28, 28) and images.dtype == np.uint8
        assert hashlib.sha256(images.tobytes()).hexdigest() == expected, character


def test_building_twice_gives_the_same_bytes_and_subsets_agree(subset):
    again, _ = render_kanji(num_characters=SUBSET)
    assert torch.equal(again.images, subset.images)
    assert again.characters == subset.characters
    # 一 (U+4E00) is the first character in code-point order, so every even spread starts with it;
    # its images must not depend on which other characters are built.
    assert subset.characters[0] == "一"
    first = subset.images[:INSTANCES, 0].numpy()
    assert hashlib.sha256(first.tobytes()).hexdigest() == DIGESTS["一"]
    # Another render seed is another set of "hands": 一's 20 images must differ.
    other, _ = render_kanji(num_characters=2, seed=1)
    assert not torch.equal(other.images[:INSTANCES], subset.images[:INSTANCES])


def test_images_are_uint8_28px_with_ink(subset):
    images, labels = subset.images, subset.labels
    assert images.shape == (SUBSET * INSTANCES, 1, 28, 28)
    assert images.dtype == torch.uint8
    # Full-ink pixels exist (255) and the background is exactly 0.
    assert int(images.min()) == 0 and int(images.max()) == 255
    assert torch.equal(labels, torch.arange(SUBSET).repeat_interleave(INSTANCES))
    ink = (images > 0).flatten(1).float().mean(1)
    # Measured: the sparsest image (a 1-stroke 一) has 5.6% inked pixels, the mean is 29.0%
    # (29.3% over the full set); Omniglot's 28 px images sit in the same range.
    assert float(ink.min()) > 0.04
    assert 0.25 < float(ink.mean()) < 0.33


def test_instances_differ_but_cluster_by_character(subset):
    pixels = subset.images.flatten(1).float() / 255
    labels = subset.labels
    distance = torch.cdist(pixels, pixels)
    same = labels[:, None] == labels[None]
    itself = torch.eye(len(labels), dtype=torch.bool)
    # No two of the 1,280 images are identical: every "hand" is different (measured minimum
    # distance between two instances of one character: 1.9).
    assert float(distance[~itself].min()) > 1.0
    # On average an instance is closer to its own character's instances than to others'
    # (measured ratio 0.883), and that holds for every one of the 64 characters (worst 0.972).
    assert float(distance[same & ~itself].mean() / distance[~same].mean()) < 0.9
    for character in range(SUBSET):
        rows = labels == character
        within = distance[rows][:, rows][~torch.eye(INSTANCES, dtype=torch.bool)].mean()
        between = distance[rows][:, ~rows].mean()
        assert float(within) < float(between), subset.characters[character]
    # Leave-one-out nearest neighbour in raw pixels finds the character 84.9% of the time
    # (chance: 1 in 64): the classes are learnable, yet pixels alone do not solve them.
    distance[itself] = float("inf")
    nearest_neighbour_accuracy = (labels[distance.argmin(1)] == labels).float().mean()
    assert 0.8 < float(nearest_neighbour_accuracy) < 0.9


def test_split_is_class_disjoint_with_the_stated_sizes():
    full = split_characters(6394, seed=0)
    assert {split: len(classes) for split, classes in full.items()} == {"train": 4000, "val": 1000, "test": 1394}
    assert np.array_equal(np.sort(np.concatenate(list(full.values()))), np.arange(6394))
    # A subset keeps the proportions: 64 * 4000/6394 = 40.04 and 64 * 1000/6394 = 10.01.
    small = split_characters(SUBSET, seed=0)
    assert [len(small[s]) for s in ("train", "val", "test")] == [40, 10, 14]
    assert not np.array_equal(split_characters(6394, seed=1)["test"], full["test"])


def test_cache_is_written_once_and_reused(root, subset, monkeypatch):
    path = kanji_module.cache_path(root, num_characters=SUBSET)
    assert path.is_file() and path.name == "kanji_28px_20inst_seed0_64chars_v1.pt"

    def must_not_render(*args, **kwargs):
        raise AssertionError("the cache should have been loaded, not rendered again")

    monkeypatch.setattr(kanji_module, "render_kanji", must_not_render)
    started = time.perf_counter()
    loaded = load_kanji(root, num_characters=SUBSET)
    assert torch.equal(loaded.images, subset.images) and loaded.characters == subset.characters
    assert time.perf_counter() - started < 5.0


def test_corrupt_cache_is_rebuilt_and_other_files_are_kept(tmp_path):
    path = kanji_module.cache_path(tmp_path, num_characters=4)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    neighbour = path.parent / "my_notes.txt"
    neighbour.write_text("keep me")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = load_kanji(tmp_path, num_characters=4)
    assert rebuilt.images.shape == (4 * INSTANCES, 1, 28, 28)
    assert neighbour.read_text() == "keep me"
    # Only the cache and the neighbour: the temporary file was renamed into place.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "my_notes.txt"])


def test_cache_of_another_request_is_not_reused(tmp_path):
    load_kanji(tmp_path, num_characters=4)
    path = kanji_module.cache_path(tmp_path, num_characters=4)
    payload = torch.load(path, weights_only=True)
    del payload[CHECKSUM_KEY]
    payload["seed"] = 7  # as if a different seed had been saved under this name (a sound file, checksummed)
    save_atomic(payload, path)
    with pytest.warns(UserWarning, match="seed differs"):
        load_kanji(tmp_path, num_characters=4)
    assert torch.load(path, weights_only=True)["seed"] == 0


def test_datamodule_episodes_have_task_batch_shapes(root, subset):
    data = KanjiDataModule(
        root=str(root), num_characters=SUBSET, ways=5, shots=1, queries=15, test_shots=5,
        meta_batch_size=4, train_tasks=8, val_tasks=4, num_workers=0,
    )
    data.prepare_data()
    data.setup("fit")
    # 40/10/14 characters, as split_characters states for 64.
    train_classes, val_classes = data.datasets["train"].classes, data.datasets["val"].classes
    assert (len(train_classes), len(val_classes)) == (40, 10)
    assert not set(train_classes.tolist()) & set(val_classes.tolist())
    assert data.characters == subset.characters

    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 75, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0
    for task in range(4):
        assert sorted(batch.support_y[task].tolist()) == [0, 1, 2, 3, 4]
        # 15 queries of each of the 5 labels.
        assert torch.equal(torch.bincount(batch.query_y[task], minlength=5), torch.full((5,), 15))

    val_batch = next(iter(data.val_dataloader()))
    # Evaluation uses test_shots=5: 5 ways x 5 shots; 5 + 15 = 20 uses every instance.
    assert val_batch.support_x.shape == (4, 25, 1, 28, 28)


def test_invalid_arguments_name_the_problem():
    with pytest.raises(ValueError, match="num_characters must be between 2 and 6394"):
        KanjiDataModule(num_characters=6395)
    with pytest.raises(ValueError, match="image_size must be at least 1"):
        KanjiDataModule(image_size=0)
