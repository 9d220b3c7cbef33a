"""The Kanji benchmark: the SVG path parser, deterministic bytes, sane images, a class-disjoint
split, a reused cache, the DataModule.

Most tests use a 64-character build (``num_characters=64``, about 1 s to render) rather than
the full 6,413; characters are seeded by code point, so their images are the same bytes in both.
"""
import hashlib
import importlib.metadata
import time

import numpy as np
import pytest
import torch

from fewshot_lightning.data import TaskBatch, scale_images
from fewshot_lightning.data.datasets import KanjiDataModule, load_kanji, render_kanji, split_characters
from fewshot_lightning.data.datasets import kanji as kanji_module
from fewshot_lightning.data.datasets._storage import CHECKSUM_KEY, save_atomic
from fewshot_lightning.data.datasets.kanji_render import render_character
from fewshot_lightning.data.datasets.svg_path import flatten, parse_path

SUBSET = 64
INSTANCES = 20

# SHA-256 of the 20 instances (20 x 28 x 28 uint8, C order) of a few characters, render seed 0,
# computed once from kanjivg 20260714. They pin the bytes: every machine must render exactly
# these (the renderer uses only exactly-rounded arithmetic; see kanji_render's docstring), and
# any change to the rendering or to the random streams it draws changes them. Bump
# FORMAT_VERSION then, so old caches are rebuilt, and record the new digests.
DIGESTS = {
    "一": "5dafd5de36009eb5ef39bbf1bdf8e3644c3226c10ff24c19ccdf9380b4c367bd",  # 1 stroke
    "乙": "0a63012a509a32996370dcd0a4f9cc25c003e04812b95a82fbf886594f6b0356",  # 1 stroke, curved
    "木": "a998b99e3ae31d7bccddad40bcad241a6781ef259728acf54a2c045b7c2c1b76",  # 4 strokes
    "漢": "21cd368fe3aca205ae6b353279900a1192ae2b06bb5f0ea649b0993bd5ed3a87",  # 13 strokes
    "鬱": "cfe3b0fab7eb7b7ba7ba11a27a54a81055b4da446aaba1b4ce4f653901b06afc",  # 29 strokes
}



def kanjivg_installed():
    try:
        importlib.metadata.distribution("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_kanjivg = pytest.mark.skipif(
    not kanjivg_installed(), reason="the Kanji benchmark is drawn from the kanjivg package's SVG files (pip install '.[kanji]')"
)


def cubic(*points):
    return np.asarray(points, dtype=np.float64).reshape(4, 2)


# ---------------------------------------------------------------- the SVG path parser


@pytest.mark.parametrize(
    "d, expected",
    [
        # Absolute cubic, as KanjiVG writes a stroke's first segment.
        ("M20,19.5C23.62,20.97 28.62,24.88 30.25,27.84", [[cubic(20, 19.5, 23.62, 20.97, 28.62, 24.88, 30.25, 27.84)]]),
        # Relative cubic: every point is relative to the current point (10, 20).
        ("M10,20c1,2,3,4,5,6", [[cubic(10, 20, 11, 22, 13, 24, 15, 26)]]),
        # Arguments repeated without the letter continue the command; the second cubic is
        # relative to the first's end (15, 26).
        ("m10,20c1,2,3,4,5,6 1,1,2,2,3,3", [[cubic(10, 20, 11, 22, 13, 24, 15, 26), cubic(15, 26, 16, 27, 17, 28, 18, 29)]]),
        # Smooth cubic: its first control point mirrors (10, 10) about the current point (10, 0).
        ("M0,0C0,10,10,10,10,0S20,-10,20,0", [[cubic(0, 0, 0, 10, 10, 10, 10, 0), cubic(10, 0, 10, -10, 20, -10, 20, 0)]]),
        # The same curve in relative commands (s after c mirrors too).
        ("M0,0c0,10,10,10,10,0s10,-10,10,0", [[cubic(0, 0, 0, 10, 10, 10, 10, 0), cubic(10, 0, 10, -10, 20, -10, 20, 0)]]),
        # A smooth cubic after no cubic takes the current point as its first control point.
        ("M0,0S5,5,10,0", [[cubic(0, 0, 0, 0, 5, 5, 10, 0)]]),
        # Separators: a sign or a second decimal point starts a new number ("1.5.5" is 1.5, 0.5);
        # pairs after a moveto are linetos, and a line is a cubic with controls at 1/3 and 2/3.
        ("M1.5.5-2.5,3.5", [[cubic(1.5, 0.5, 1.5 - 4 / 3, 0.5 + 1, -2.5 + 4 / 3, 3.5 - 1, -2.5, 3.5)]]),
        # H, V, h and a closepath back to the start; a second moveto starts a second subpath.
        ("M0,0H9V6h-9zM1e1,0l3,0", [
            [cubic(0, 0, 3, 0, 6, 0, 9, 0), cubic(9, 0, 9, 2, 9, 4, 9, 6),
             cubic(9, 6, 6, 6, 3, 6, 0, 6), cubic(0, 6, 0, 4, 0, 2, 0, 0)],
            [cubic(10, 0, 11, 0, 12, 0, 13, 0)],
        ]),
    ],
)
def test_parse_path_gives_the_hand_computed_control_points(d, expected):
    subpaths = parse_path(d)
    assert len(subpaths) == len(expected)
    for got, want in zip(subpaths, expected):
        np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "d, message",
    [
        ("M0,0Q1,1,2,2", "unsupported character 'Q'"),
        ("0,0L1,1", "must start with a moveto"),
        ("M0,0C1,2", "C needs 6 numbers"),
        ("M0,0L1,1Z2,2", "follows closepath"),
    ],
)
def test_parse_path_names_what_it_cannot_read(d, message):
    with pytest.raises(ValueError, match=message):
        parse_path(d)


def test_flatten_evaluates_the_bernstein_form():
    # B(1/2) of (0,0), (0,1), (1,1), (1,0) is (3/8 + 1/8, 3/8 + 3/8) = (0.5, 0.75); B(1/4) is
    # (27/64 * 0 + 9/64 * 1 + 1/64 * 1, 27/64 + 9/64) = (0.15625, 0.5625).
    arch = cubic(0, 0, 0, 1, 1, 1, 1, 0)[None]
    np.testing.assert_array_equal(flatten(arch, [2]), [[0, 0], [0.5, 0.75], [1, 0]])
    np.testing.assert_array_equal(flatten(arch, [4])[1], [0.15625, 0.5625])
    # A chain: the second cubic's points follow the first's, its start not repeated.
    chain = np.concatenate([arch, arch + [1, 0]])
    np.testing.assert_array_equal(flatten(chain, [2, 1]), [[0, 0], [0.5, 0.75], [1, 0], [2, 0]])
    with pytest.raises(ValueError, match="one count of at least 1 per cubic"):
        flatten(chain, [2, 0])


@needs_kanjivg
def test_every_base_form_kanji_of_kanjivg_parses():
    # All 6,413 base-form files (no -Kaisho, -Jinmei, ... variants) of U+4E00-U+9FFF: 79,040
    # strokes (counted once with this parser, about 4 s), each one subpath of cubics.
    files = kanji_module.kanjivg_files()
    assert len(files) == kanji_module.NUM_CHARACTERS == 6413
    assert all("-" not in path.name for path in files)
    assert (files[0].name, files[-1].name) == ("04e00.svg", "09fa0.svg")
    strokes = [kanji_module.read_strokes(path) for path in files]
    assert sum(len(s) for s in strokes) == 79040
    assert (min(len(s) for s in strokes), max(len(s) for s in strokes)) == (1, 30)


def test_a_damaged_kanjivg_file_is_named(tmp_path):
    path = tmp_path / "04e00.svg"
    path.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg"><g id="kvg:StrokePaths_04e00">'
        '<path id="kvg:04e00-s1" d="M11,54.25c3.19,0.62,6.25,0.75,9.73,0.5"/>'
        '<path id="kvg:04e00-s2" d="M1,1Q2,2,3,3"/></g></svg>'
    )
    with pytest.raises(RuntimeError, match=r"04e00.svg: stroke kvg:04e00-s2: .*unsupported character 'Q'"):
        kanji_module.read_strokes(path)
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg"><g id="kvg:04e00"/></svg>')
    with pytest.raises(RuntimeError, match="no kvg:StrokePaths group"):
        kanji_module.read_strokes(path)


# ---------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("kanji_root")


@pytest.fixture(scope="module")
def subset(root):
    return kanji_module.kanji_images(root, num_characters=SUBSET)


def strokes_of(character):
    return kanji_module.read_strokes(kanji_module.kanjivg_files()[0].parent / f"{ord(character):05x}.svg")


@needs_kanjivg
def test_rendering_matches_the_recorded_digests():
    for character, expected in DIGESTS.items():
        images = render_character(strokes_of(character), ord(character), INSTANCES, 28, seed=0)
        assert images.shape == (INSTANCES, 28, 28) and images.dtype == np.uint8
        assert hashlib.sha256(images.tobytes()).hexdigest() == expected, character


@needs_kanjivg
def test_building_twice_gives_the_same_bytes_and_subsets_agree(subset):
    again, _ = render_kanji(num_characters=SUBSET)
    assert torch.equal(again.images, subset.images)
    assert again.characters == subset.characters
    # 一 (U+4E00) is the first character in code-point order, so every even spread starts with it;
    # its images must not depend on which other characters are built, nor instance i on how many.
    assert subset.characters[0] == "一"
    assert hashlib.sha256(subset.images[:INSTANCES, 0].numpy().tobytes()).hexdigest() == DIGESTS["一"]
    five = render_character(strokes_of("一"), ord("一"), 5, 28, seed=0)
    assert np.array_equal(five, subset.images[:5, 0].numpy())
    # Another render seed is another set of "hands": 一's 20 images must differ.
    other, _ = render_kanji(num_characters=2, seed=1)
    assert not torch.equal(other.images[:INSTANCES], subset.images[:INSTANCES])


@needs_kanjivg
def test_images_are_uint8_28px_with_ink(subset):
    images, labels = subset.images, subset.labels
    assert images.shape == (SUBSET * INSTANCES, 1, 28, 28)
    assert images.dtype == torch.uint8
    # Full-ink pixels exist (255) and the background is exactly 0.
    assert int(images.min()) == 0 and int(images.max()) == 255
    assert torch.equal(labels, torch.arange(SUBSET).repeat_interleave(INSTANCES))
    ink = (images > 0).flatten(1).float().mean(1)
    # Measured: the sparsest image (a 1-stroke 一) has 5.0% inked pixels, the mean is 30.4%;
    # Omniglot's 28 px images sit in the same range.
    assert float(ink.min()) > 0.04
    assert 0.27 < float(ink.mean()) < 0.34


@needs_kanjivg
def test_instances_differ_but_cluster_by_character(subset):
    pixels = subset.images.flatten(1).float() / 255
    labels = subset.labels
    distance = torch.cdist(pixels, pixels)
    same = labels[:, None] == labels[None]
    itself = torch.eye(len(labels), dtype=torch.bool)
    # No two of the 1,280 images are identical: every "hand" is different (measured minimum
    # distance between two images: 2.6).
    assert float(distance[~itself].min()) > 1.0
    # On average an instance is closer to its own character's instances than to others'
    # (measured ratio 0.926), and that holds for every one of the 64 characters (worst 0.997:
    # the hands vary so much that raw pixels barely separate some characters).
    assert float(distance[same & ~itself].mean() / distance[~same].mean()) < 0.95
    for character in range(SUBSET):
        rows = labels == character
        within = distance[rows][:, rows][~torch.eye(INSTANCES, dtype=torch.bool)].mean()
        between = distance[rows][:, ~rows].mean()
        assert float(within) < float(between), subset.characters[character]
    # Leave-one-out nearest neighbour in raw pixels finds the character 47.3% of the time
    # (chance: 1 in 64): the classes are learnable, yet pixels alone are far from solving them.
    distance[itself] = float("inf")
    nearest_neighbour_accuracy = (labels[distance.argmin(1)] == labels).float().mean()
    assert 0.4 < float(nearest_neighbour_accuracy) < 0.55


# ---------------------------------------------------------------- split, cache, DataModule


def test_split_is_class_disjoint_with_the_stated_sizes():
    full = split_characters(6413, seed=0)
    assert {split: len(classes) for split, classes in full.items()} == {"train": 4000, "val": 1000, "test": 1413}
    assert np.array_equal(np.sort(np.concatenate(list(full.values()))), np.arange(6413))
    # A subset keeps the proportions: 64 * 4000/6413 = 39.9 and 64 * 1000/6413 = 9.98.
    small = split_characters(SUBSET, seed=0)
    assert [len(small[s]) for s in ("train", "val", "test")] == [40, 10, 14]
    assert not np.array_equal(split_characters(6413, seed=1)["test"], full["test"])


@needs_kanjivg
def test_load_kanji_returns_class_disjoint_splits_without_lightning(root, subset):
    splits = load_kanji(root, num_characters=SUBSET)
    assert list(splits) == ["train", "val", "test"]
    classes = {split: set(part.labels.tolist()) for split, part in splits.items()}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [40, 10, 14]
    assert not (classes["train"] & classes["val"] or classes["train"] & classes["test"] or classes["val"] & classes["test"])
    for part in splits.values():
        assert part.data.shape == (len(part.labels), 1, 28, 28) and part.data.dtype == torch.uint8
        # Every character keeps its 20 instances, and they are its rows of the full build.
        assert len(part.labels) == INSTANCES * len(set(part.labels.tolist()))
        assert torch.equal(part.data, subset.images[torch.isin(subset.labels, part.labels)])


@needs_kanjivg
def test_cache_is_written_once_and_reused(root, subset, monkeypatch):
    path = kanji_module.cache_path(root, num_characters=SUBSET)
    assert path.is_file() and path.name == "kanji_28px_20inst_seed0_64chars_v2.pt"

    def must_not_render(*args, **kwargs):
        raise AssertionError("the cache should have been loaded, not rendered again")

    monkeypatch.setattr(kanji_module, "render_kanji", must_not_render)
    started = time.perf_counter()
    loaded = kanji_module.kanji_images(root, num_characters=SUBSET)
    assert torch.equal(loaded.images, subset.images) and loaded.characters == subset.characters
    assert time.perf_counter() - started < 5.0


@needs_kanjivg
def test_corrupt_cache_is_rebuilt_and_other_files_are_kept(tmp_path):
    path = kanji_module.cache_path(tmp_path, num_characters=4)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    neighbour = path.parent / "my_notes.txt"
    neighbour.write_text("keep me")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = kanji_module.kanji_images(tmp_path, num_characters=4)
    assert rebuilt.images.shape == (4 * INSTANCES, 1, 28, 28)
    assert neighbour.read_text() == "keep me"
    # Only the cache and the neighbour: the temporary file was renamed into place.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "my_notes.txt"])


@needs_kanjivg
@pytest.mark.parametrize("key, stale", [("version", 1), ("seed", 7), ("source_sha256", "0" * 64)])
def test_cache_of_another_version_request_or_source_is_rebuilt(tmp_path, key, stale):
    fresh = kanji_module.kanji_images(tmp_path, num_characters=4)
    path = kanji_module.cache_path(tmp_path, num_characters=4)
    payload = torch.load(path, weights_only=True)
    recorded = payload[key]
    del payload[CHECKSUM_KEY]
    # As if an older renderer, another seed or other SVG files had written it (a sound file, checksummed).
    payload[key] = stale
    payload["images"] = torch.zeros_like(payload["images"])
    save_atomic(payload, path)
    with pytest.warns(UserWarning, match=f"{key} differs"):
        rebuilt = kanji_module.kanji_images(tmp_path, num_characters=4)
    assert torch.equal(rebuilt.images, fresh.images)
    assert torch.load(path, weights_only=True)[key] == recorded


def test_another_kanjivg_release_is_refused_with_the_fix(monkeypatch):
    class Release:
        version = "20990101"

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Release())
    with pytest.raises(RuntimeError, match=r"kanjivg 20990101 is installed.*pip install 'kanjivg==20260714'"):
        kanji_module.kanjivg_files()


@needs_kanjivg
def test_datamodule_episodes_have_task_batch_shapes(root, subset):
    data = KanjiDataModule(
        root=str(root), num_characters=SUBSET, ways=5, shots=1, queries=15, test_shots=5,
        meta_batch_size=4, train_tasks=8, val_tasks=4, num_workers=0,
    )
    data.prepare_data()
    data.setup("fit")
    # 40/10 characters, as split_characters states for 64.
    train_classes, val_classes = data.datasets["train"].classes, data.datasets["val"].classes
    assert (len(train_classes), len(val_classes)) == (40, 10)
    assert not set(train_classes.tolist()) & set(val_classes.tolist())
    # Classes are named by their character in the printed and saved class split.
    assert data.characters == subset.characters
    assert sorted(sum(data.class_split.values(), [])) == sorted(subset.characters)

    batch = scale_images(next(iter(data.train_dataloader())))
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 75, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0
    for task in range(4):
        assert sorted(batch.support_y[task].tolist()) == [0, 1, 2, 3, 4]
        # 15 queries of each of the 5 labels.
        assert torch.equal(torch.bincount(batch.query_y[task], minlength=5), torch.full((5,), 15))

    val_batch = scale_images(next(iter(data.val_dataloader())))
    # Evaluation uses test_shots=5: 5 ways x 5 shots; 5 + 15 = 20 uses every instance.
    assert val_batch.support_x.shape == (4, 25, 1, 28, 28)


def test_invalid_arguments_name_the_problem():
    with pytest.raises(ValueError, match="num_characters must be between 2 and 6413"):
        KanjiDataModule(num_characters=6414)
    with pytest.raises(ValueError, match="image_size must be at least 1"):
        KanjiDataModule(image_size=0)
    with pytest.raises(ValueError, match="instances must be at least 1"):
        KanjiDataModule(instances=0)


def test_too_few_characters_or_instances_name_the_kanji_options(tmp_path):
    # The advice was a generic "use a dataset whose val split has more classes" and "drop the
    # classes with fewer than 6 samples" (every class here): now the two options that fix it.
    from fewshot_lightning.data.datasets import KanjiDataModule

    few = KanjiDataModule(root=str(tmp_path), num_characters=4, ways=2, shots=1, queries=1, num_workers=0)
    few.prepare_data()
    with pytest.raises(ValueError, match=r"raise num_characters \(--data\.init_args\.num_characters, now 4; the split "
                                         r"gave train/val/test \d+/\d+/\d+ classes\) or leave it unset for all 6,413"):
        few.setup("fit")
    thin = KanjiDataModule(root=str(tmp_path), num_characters=SUBSET, instances=3, ways=2, shots=2, queries=2,
                           num_workers=0)
    thin.prepare_data()
    with pytest.raises(ValueError, match=r"or raise instances \(--data\.init_args\.instances, now 3: the images "
                                         r"rendered per character\) to at least 4\."):
        thin.setup("fit")
