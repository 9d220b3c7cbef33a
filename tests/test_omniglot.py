"""Omniglot's loader and DataModule on fixtures of PNG drawings and zip archives in the
release's layout, with the release's alphabet and character names (never a download), and the
published split of Vinyals et al. that ships with the package."""
from __future__ import annotations

import configparser
import errno
import hashlib
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_lightning.data import scale_images
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.data.datasets import OmniglotDataModule, load_omniglot, omniglot, vinyals_split
from fewshot_lightning.data.datasets._storage import DataFileError

SPLITS = ("train", "val", "test")
ROTATIONS = ("rot000", "rot090", "rot180", "rot270")


def classes_of(labels: torch.Tensor) -> set:
    return set(torch.unique(labels).tolist())


# The 50 alphabets of the release (Lake et al. 2015) and their characters: 30 alphabets and 964
# characters in images_background, 20 and 659 in images_evaluation.
BACKGROUND = {
    "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
    "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46, "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
    "Braille": 26, "Burmese_(Myanmar)": 34, "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43,
    "Greek": 24, "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
    "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42,
    "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55,
}
EVALUATION = {
    "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26, "Ge_ez": 26,
    "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47, "Manipuri": 40, "Mongolian": 30,
    "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25,
    "Tibetan": 42, "ULOG": 26,
}
# The published test set: 13 alphabets of images_evaluation, these 12 whole and Gurmukhi's 42 to 45.
TEST_ALPHABETS = {
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti",
    "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
}
VAL_ALPHABETS = {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
# SHA-256 of the lists at github.com/jakesnell/prototypical-networks, commit c9bb4d2582,
# data/omniglot/splits/vinyals/: the shipped files are those bytes.
PUBLISHED_SHA256 = {
    "train": "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0",
    "val": "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a",
    "test": "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204",
}


def characters_of(names) -> set:
    return {name.rsplit("/", 1)[0] for name in names}


def test_the_shipped_split_is_the_published_one():
    split = vinyals_split()
    folder = Path(omniglot.__file__).parent / omniglot.SPLIT_LISTS
    for name in SPLITS:
        assert hashlib.sha256((folder / f"{name}.txt").read_bytes()).hexdigest() == PUBLISHED_SHA256[name], name
    # 1028 / 172 / 423 characters (Vinyals et al.'s 1200 training characters, 172 of them held
    # out for validation), each in its four rotations: 4112 / 688 / 1692 classes.
    assert [len(split[s]) for s in SPLITS] == [4112, 688, 1692]
    characters = {s: characters_of(split[s]) for s in SPLITS}
    assert [len(characters[s]) for s in SPLITS] == [1028, 172, 423]
    for s in SPLITS:
        assert len(set(split[s])) == len(split[s])
        assert set(split[s]) == {f"{c}/{r}" for c in characters[s] for r in ROTATIONS}
    assert characters["train"].isdisjoint(characters["val"] | characters["test"])
    assert characters["val"].isdisjoint(characters["test"])
    release = {f"{a}/character{i:02d}" for a, n in {**BACKGROUND, **EVALUATION}.items() for i in range(1, n + 1)}
    assert sum(BACKGROUND.values()) == 964 and sum(EVALUATION.values()) == 659
    assert set().union(*characters.values()) == release

    alphabets = {s: {name.split("/")[0] for name in characters[s]} for s in SPLITS}
    assert alphabets["test"] == TEST_ALPHABETS | {"Gurmukhi"} and TEST_ALPHABETS < set(EVALUATION)
    assert alphabets["val"] == VAL_ALPHABETS and VAL_ALPHABETS < set(BACKGROUND)
    assert alphabets["train"] == set(BACKGROUND) - VAL_ALPHABETS | set(EVALUATION) - TEST_ALPHABETS
    # The 12 whole test alphabets; Gurmukhi split between training (1 to 41) and test (42 to 45).
    for alphabet in TEST_ALPHABETS:
        assert {c for c in release if c.startswith(alphabet + "/")} <= characters["test"]
    assert {f"Gurmukhi/character{i}" for i in range(42, 46)} <= characters["test"]
    assert {f"Gurmukhi/character{i:02d}" for i in range(1, 42)} <= characters["train"]
    assert split["test"][0] == "Gurmukhi/character42/rot000" and split["test"][-1] == "ULOG/character26/rot270"
    assert "Latin/character01/rot090" in split["train"] and "Hebrew/character22/rot180" in split["val"]


def test_the_lists_are_package_data_so_an_installed_wheel_has_them():
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    patterns = config["options.package_data"]["fewshot_lightning.data.datasets"].split()
    package = Path(omniglot.__file__).parent
    packaged = {path for pattern in patterns for path in package.glob(pattern)}
    assert {package / omniglot.SPLIT_LISTS / f"{name}.txt" for name in SPLITS} <= packaged


def write_pattern(path: Path, pattern: np.ndarray) -> None:
    """A 1-bit drawing like Omniglot's: ``pattern`` (True = stroke) black on white."""
    Image.fromarray(np.where(pattern, 0, 255).astype(np.uint8)).convert("1").save(path)


def character_pattern(index: int, side: int = 28) -> np.ndarray:
    """A drawing unique to character ``index`` and unlike its own rotations: a 3x3 corner
    block (turning moves it to another corner) and the index's 11 bits along the top row."""
    pattern = np.zeros((side, side), dtype=bool)
    pattern[1:4, 1:4] = True
    for bit in range(11):
        pattern[6 + 2 * bit, 8:12] = bool(index >> bit & 1)
    return pattern


def test_the_whole_release_loads_into_exactly_the_published_classes(tmp_path):
    # Every character of the release by its real name, two 28x28 drawings each (no resize; an
    # episode needs two samples of a class).
    folder = tmp_path / "omniglot-py"
    drawn = {}
    for image_set, alphabets in (("images_background", BACKGROUND), ("images_evaluation", EVALUATION)):
        for alphabet, count in alphabets.items():
            for c in range(1, count + 1):
                target = folder / image_set / alphabet / f"character{c:02d}"
                target.mkdir(parents=True)
                drawn[f"{alphabet}/character{c:02d}"] = pattern = character_pattern(len(drawn))
                write_pattern(target / "0001_01.png", pattern)
                write_pattern(target / "0001_02.png", pattern)
    module = OmniglotDataModule(tmp_path, ways=5, shots=1, queries=1, num_workers=0)
    module.setup("fit")
    published = vinyals_split()
    # The classes of each split are the published ones, rotations included, and each class's
    # image is its character's drawing (inverted: strokes 255) turned as its name says.
    assert {s: set(module.class_split[s]) for s in SPLITS} == {s: set(published[s]) for s in SPLITS}
    for split in SPLITS:
        data, labels = module._splits[split]
        assert data.shape == (2 * len(published[split]), 1, 28, 28)
        for image, label in zip(data, labels.tolist()):
            character, rotation = module.class_name(label).rsplit("/", 1)
            expected = np.rot90(drawn[character], int(rotation[3:]) // 90)
            assert torch.equal(image[0], torch.from_numpy(np.where(expected, 255, 0).astype(np.uint8)))


# Fixture: a few characters by their real names, 4 drawings each (the real ones have 20):
# Latin 1 and 2 and Gurmukhi 40 and 41 are training characters, Armenian 1 and 2 validation
# ones and Gurmukhi 42 and 43 test ones in the published split.
OMNIGLOT_FIXTURE = {
    "images_background": {"Latin": (1, 2), "Armenian": (1, 2)}, "images_evaluation": {"Gurmukhi": (40, 41, 42, 43)},
}
DRAWINGS = 4


def drawing(character: int, index: int) -> Image.Image:
    """A 105x105 1-bit drawing like Omniglot's: black strokes on white. The stroke is an
    off-centre block, so each rotation differs, placed per character and drawing."""
    pixels = np.full((105, 105), 255, dtype=np.uint8)
    top, left = 8 + 4 * character, 10 + 6 * index
    pixels[top : top + 30, left : left + 12] = 0
    return Image.fromarray(pixels).convert("1")


def write_omniglot(folder: Path) -> None:
    character = 0
    for image_set, alphabets in OMNIGLOT_FIXTURE.items():
        for alphabet, numbers in alphabets.items():
            for c in numbers:
                target = folder / image_set / alphabet / f"character{c:02d}"
                target.mkdir(parents=True)
                for d in range(DRAWINGS):
                    drawing(character, d).save(target / f"{character:04d}_{d + 1:02d}.png")
                character += 1


def omniglot_module(root: Path, **kwargs) -> OmniglotDataModule:
    # 8 fixture characters: 4 train, 2 val, 2 test.
    return OmniglotDataModule(root, num_workers=0, **kwargs)


def load_fixture(root: Path, **kwargs) -> dict:
    return load_omniglot(root, **kwargs)


def test_omniglot_loads_the_published_rotated_classes_from_extracted_folders(tmp_path):
    write_omniglot(tmp_path / "omniglot-py")
    with pytest.warns(UserWarning, match="has 8 characters, not 1623"):
        splits = load_fixture(tmp_path)
    train, val, test = (splits[s] for s in SPLITS)
    # Characters x 4 rotations (the published lists rotate every split) x 4 drawings:
    # 4 training characters, 2 validation and 2 test ones.
    assert train.data.shape == (64, 1, 28, 28) and len(classes_of(train.labels)) == 16
    assert val.data.shape == (32, 1, 28, 28) and len(classes_of(val.labels)) == 8
    assert test.data.shape == (32, 1, 28, 28) and len(classes_of(test.labels)) == 8
    assert classes_of(train.labels).isdisjoint(classes_of(val.labels) | classes_of(test.labels))
    assert classes_of(val.labels).isdisjoint(classes_of(test.labels))
    for part in (train, val, test):
        assert part.data.dtype == torch.uint8
        # Inverted: strokes are 255 (the block's interior survives the resize), background 0.
        assert int(part.data.max()) == 255 and int(part.data.min()) == 0
        assert int(part.data[:, 0, -1, -1].max()) == 0
    # Class 4c + k is character c turned k quarter turns.
    upright = train.labels[0] - train.labels[0] % 4
    base = train.data[train.labels == upright]
    for turns in (1, 2, 3):
        assert torch.equal(train.data[train.labels == upright + turns], torch.rot90(base, turns, dims=(2, 3)))
    assert (tmp_path / "omniglot-py" / "omniglot-28px.pt").is_file()


def test_omniglot_reads_its_cache_without_the_raw_files_and_can_keep_only_upright_classes(tmp_path):
    write_omniglot(tmp_path / "omniglot-py")
    with pytest.warns(UserWarning):
        first = load_fixture(tmp_path)
    for image_set in OMNIGLOT_FIXTURE:
        shutil.rmtree(tmp_path / "omniglot-py" / image_set)
    with pytest.warns(UserWarning):
        again = load_fixture(tmp_path, eval_rotations=False)
    assert torch.equal(again["train"].data, first["train"].data)
    # Upright evaluation: the rot000 classes only, 2 characters of 4 drawings, which are the
    # rotated load's upright ones.
    for split in ("val", "test"):
        assert again[split].data.shape == (8, 1, 28, 28) and len(classes_of(again[split].labels)) == 2
        upright = first[split].labels % 4 == 0
        assert torch.equal(again[split].data, first[split].data[upright])
        assert torch.equal(again[split].labels, first[split].labels[upright])
    with pytest.warns(UserWarning):
        upright_training = load_fixture(tmp_path, train_rotations=False)["train"]
    assert upright_training.data.shape == (16, 1, 28, 28) and set((upright_training.labels % 4).tolist()) == {0}


@pytest.mark.filterwarnings("ignore:Omniglot in .* has 9 characters")
def test_a_character_outside_the_published_split_is_refused(tmp_path):
    write_omniglot(tmp_path / "omniglot-py")
    stray = tmp_path / "omniglot-py" / "images_background" / "Latin" / "character27"  # Latin has 26
    stray.mkdir()
    drawing(0, 0).save(stray / "0001_01.png")
    with pytest.raises(RuntimeError, match=r"1 character folders are not in the published Omniglot split .* "
                                          r"Latin/character27: these are not the official"):
        load_fixture(tmp_path)


def test_omniglot_extracts_a_verified_archive(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_omniglot(source)
    folder = tmp_path / "root" / "omniglot-py"
    folder.mkdir(parents=True)
    for image_set in OMNIGLOT_FIXTURE:
        archive = folder / f"{image_set}.zip"
        with zipfile.ZipFile(archive, "w") as handle:
            for path in sorted((source / image_set).rglob("*.png")):
                handle.write(path, path.relative_to(source).as_posix())
        # The fixture is not the official archive: make its MD5 the expected one.
        monkeypatch.setitem(omniglot.ARCHIVE_MD5, image_set, hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.warns(UserWarning):
        splits = load_fixture(tmp_path / "root", image_size=32)
    assert splits["train"].data.shape == (64, 1, 32, 32)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["images_background", "images_evaluation"]


def test_omniglot_datamodule_downloads_in_prepare_data_and_loads_in_setup(tmp_path, monkeypatch):
    # The official server, played by a folder of fixture archives whose MD5s are the expected ones.
    server = tmp_path / "server"
    write_omniglot(server)
    for image_set in OMNIGLOT_FIXTURE:
        with zipfile.ZipFile(server / f"{image_set}.zip", "w") as handle:
            for path in sorted((server / image_set).rglob("*.png")):
                handle.write(path, path.relative_to(server).as_posix())
        md5 = hashlib.md5((server / f"{image_set}.zip").read_bytes()).hexdigest()
        monkeypatch.setitem(omniglot.ARCHIVE_MD5, image_set, md5)
    fetched = []

    def download_url(url, folder, filename, md5):
        fetched.append((url.rsplit("/", 1)[1], md5))
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(server / filename, Path(folder) / filename)

    monkeypatch.setattr(omniglot, "download_url", download_url)
    module = omniglot_module(
        tmp_path / "root", download=True, ways=3, test_ways=2, shots=1, queries=2, meta_batch_size=2
    )
    with pytest.warns(UserWarning):
        module.prepare_data()
    # Both archives fetched with their MD5s, extracted and decoded into the cache, before any setup.
    assert fetched == [(f"{name}.zip", md5) for name, md5 in omniglot.ARCHIVE_MD5.items()]
    assert (tmp_path / "root" / "omniglot-py" / "omniglot-28px.pt").is_file() and module.datasets == {}
    with pytest.warns(UserWarning):
        module.setup("fit")
    assert scale_images(next(iter(module.train_dataloader()))).support_x.shape == (2, 3, 1, 28, 28)
    # Extracted folders are not fetched again.
    with pytest.warns(UserWarning):
        module.prepare_data()
    assert len(fetched) == 2


def test_omniglot_missing_data_names_the_path_and_the_archives(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_fixture(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "omniglot-py") in message
    assert "images_background.zip" in message and "download=True" in message


def test_omniglot_corrupt_archive_is_refused(tmp_path):
    folder = tmp_path / "omniglot-py"
    folder.mkdir()
    (folder / "images_background.zip").write_bytes(b"not a zip archive")
    with pytest.raises(RuntimeError, match="MD5") as error:
        load_fixture(tmp_path)
    assert str(folder / "images_background.zip") in str(error.value)


def test_omniglot_training_batches_are_task_batches_in_unit_range(tmp_path):
    write_omniglot(tmp_path / "omniglot-py")
    module = omniglot_module(tmp_path, ways=3, test_ways=2, shots=1, queries=2, meta_batch_size=2, train_tasks=4)
    with pytest.warns(UserWarning):
        module.setup("fit")
    batch = scale_images(next(iter(module.train_dataloader())))
    assert isinstance(batch, TaskBatch)
    # 2 tasks of 3-way 1-shot (3 support) and 2 queries per class (6 query).
    assert batch.support_x.shape == (2, 3, 1, 28, 28) and batch.query_x.shape == (2, 6, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) == 1.0
    assert sorted(batch.support_y[0].tolist()) == [0, 1, 2]
    # Classes are named as in the published lists, in label order.
    assert module.class_split["val"] == [f"Armenian/character0{c}/{r}" for c in (1, 2) for r in ROTATIONS]
    assert module.class_split["test"] == [f"Gurmukhi/character{c}/{r}" for c in (42, 43) for r in ROTATIONS]


def test_omniglot_unreadable_drawings_are_named_and_none_is_skipped(tmp_path):
    folder = tmp_path / "omniglot-py"
    write_omniglot(folder)
    broken = folder / "images_evaluation" / "Gurmukhi" / "character42" / "0006_02.png"
    broken.write_bytes(broken.read_bytes()[:49])  # the first half: the pixel data stops short
    with pytest.raises(RuntimeError) as error:
        load_fixture(tmp_path)
    assert str(error.value).startswith(
        f"1 of the 32 Omniglot drawings in {folder} could not be read: {broken} (OSError: image file is truncated). "
        f"None is skipped (the benchmark would change): delete {folder / 'images_background'} and "
        f"{folder / 'images_evaluation'} and run again"
    )


def test_hidden_files_beside_the_drawings_are_not_drawings(tmp_path):
    # Copied from a Mac onto another disk format, every file gets an AppleDouble twin ``._name``
    # (not a PNG), and folders a .DS_Store: read as drawings, they stopped the load with advice
    # to delete both extracted folders.
    folder = tmp_path / "omniglot-py"
    write_omniglot(folder)
    expected = load_fixture(tmp_path)
    character = folder / "images_background" / "Latin" / "character01"
    for drawing_file in sorted(character.glob("*.png")):
        (character / f"._{drawing_file.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (character.parent / ".DS_Store").write_bytes(b"Bud1")
    (folder / "images_background" / ".hidden_alphabet" / "character01").mkdir(parents=True)
    (folder / "omniglot-28px.pt").unlink()  # decode the folders again
    splits = load_fixture(tmp_path)
    for split in SPLITS:
        assert torch.equal(splits[split].data, expected[split].data)
        assert torch.equal(splits[split].labels, expected[split].labels)


@pytest.mark.filterwarnings("ignore:Omniglot in .* has 8 characters")
def test_omniglot_damaged_cache_is_rebuilt_from_the_extracted_folders(tmp_path):
    folder = tmp_path / "omniglot-py"
    write_omniglot(folder)
    first = load_fixture(tmp_path)
    cache = folder / "omniglot-28px.pt"
    content = bytearray(cache.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 512] = bytes(255 - b for b in content[middle : middle + 512])
    cache.write_bytes(bytes(content))
    with pytest.warns(UserWarning, match="omniglot-28px.pt is damaged"):
        again = load_fixture(tmp_path)
    assert all(torch.equal(again[split].data, first[split].data) for split in SPLITS)


@pytest.mark.filterwarnings("ignore:.*has 8 characters, not 1623")
def test_a_random_character_split_as_maml_and_reptile_draw_it(tmp_path):
    # MAML's and Reptile's Omniglot results are on characters drawn at random irrespective of
    # alphabet (cbfinn/maml: 1100 train, 100 val, 423 test), an easier test than Vinyals' mostly
    # unseen alphabets; the configs claiming the papers' setting ran Vinyals' split.
    write_omniglot(tmp_path / "omniglot-py")
    sizes = (4, 2, 2)
    module = omniglot_module(tmp_path, ways=2, shots=1, queries=1, split="random", split_sizes=sizes, split_seed=3)
    module.setup("fit")
    characters = {split: {name.rsplit("/", 1)[0] for name in names} for split, names in module.class_split.items()}
    assert [len(characters[s]) for s in SPLITS] == list(sizes)
    assert set.union(*characters.values()) == {f"{a}/character{c:02d}" for alphabets in OMNIGLOT_FIXTURE.values()
                                                for a, numbers in alphabets.items() for c in numbers}
    assert all(len(module.class_split[s]) == 4 * len(characters[s]) for s in SPLITS)  # four rotations each
    again = omniglot_module(tmp_path, ways=2, shots=1, queries=1, split="random", split_sizes=sizes, split_seed=3)
    again.setup("fit")
    assert again.class_split == module.class_split  # the seed fixes the draw
    other = [omniglot_module(tmp_path, ways=2, shots=1, queries=1, split="random", split_sizes=sizes, split_seed=seed)
             for seed in range(4, 8)]
    for candidate in other:
        candidate.setup("fit")
    assert any(candidate.class_split != module.class_split for candidate in other)
    with pytest.raises(ValueError, match=r"split_sizes must be three character counts .* the 8 characters, got \[9, 0, 0\]"):
        omniglot_module(tmp_path, ways=2, shots=1, queries=1, split="random", split_sizes=(9, 0, 0)).setup("fit")
    with pytest.raises(ValueError, match=r"split must be 'vinyals' .* or 'random'"):
        omniglot_module(tmp_path, split="alphabets")


@pytest.mark.filterwarnings("ignore:Omniglot in .* has 8 characters")
def test_the_cache_is_rebuilt_when_the_extracted_drawings_change(tmp_path):
    # The cache was never compared with the drawings: replaced ones kept the old pixels, silently.
    write_omniglot(tmp_path / "omniglot-py")
    first = load_fixture(tmp_path)
    character = tmp_path / "omniglot-py" / "images_background" / "Latin" / "character01"
    for path in character.glob("*.png"):
        Image.fromarray(np.full((105, 105), 255, dtype=np.uint8)).convert("1").save(path)  # blank drawings
    with pytest.warns(UserWarning, match=r"the extracted drawings changed since it was decoded\); rebuilding it"):
        again = load_fixture(tmp_path)
    changed = again["train"].data.flatten(1).amax(1) == 0  # blank: no stroke left after inversion
    assert int(changed.sum()) == 4 * DRAWINGS  # the character's drawings in its 4 rotations
    assert int((first["train"].data.flatten(1).amax(1) == 0).sum()) == 0
    # Unchanged drawings: the cache is read as it is, no rebuild.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_fixture(tmp_path)
    assert not [w for w in caught if "rebuilding" in str(w.message)]


def test_an_offline_download_is_named_in_one_error_with_where_to_put_the_files(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, folder, filename, md5):
        Path(folder).mkdir(parents=True, exist_ok=True)  # as torchvision's download_url does first
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(omniglot, "download_url", offline)
    with pytest.raises(DataFileError, match=r"Could not download https://raw.githubusercontent.com/.*images_background"
                                            r"\.zip .*offline\? Put the files in .*omniglot-py by hand"):
        omniglot.download_omniglot(tmp_path / "up-one-level")
    assert not (tmp_path / "up-one-level" / "omniglot-py").exists()  # the empty folder it made is gone


def test_a_read_only_data_folder_is_named_before_decoding(tmp_path, monkeypatch):
    # The cache write failed with a PermissionError traceback after the whole decoding pass.
    from fewshot_lightning.data.datasets import _storage

    write_omniglot(tmp_path / "omniglot-py")
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT and str(tmp_path) in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(_storage.os, "open", read_only)
    monkeypatch.setattr(omniglot, "decode_characters", lambda *args: pytest.fail("decoded before the check"))
    with pytest.raises(DataFileError, match=r"Cannot write omniglot-28px.pt in .*omniglot-py \(Permission denied\): "
                                            r"the data folder is read-only"):
        load_fixture(tmp_path)
