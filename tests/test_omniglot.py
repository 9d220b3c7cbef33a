"""Omniglot's loader and DataModule on a fixture of PNG drawings and zip archives in the
release's layout (never a download). The published split needs all 1623 characters: it is
checked on its own against the published counts, and the loading path on the fixture."""
from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_lightning.data import scale_images
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.data.datasets import OmniglotDataModule, load_omniglot, omniglot, vinyals_split

SPLITS = ("train", "val", "test")


def classes_of(labels: torch.Tensor) -> set:
    return set(torch.unique(labels).tolist())


# Fixture: 5 background and 3 evaluation characters, 4 drawings each (the real ones have 20).
OMNIGLOT_FIXTURE = {"images_background": {"Alpha": 3, "Beta": 2}, "images_evaluation": {"Gamma": 3}}
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
        for alphabet, count in alphabets.items():
            for c in range(1, count + 1):
                target = folder / image_set / alphabet / f"character{c:02d}"
                target.mkdir(parents=True)
                for d in range(DRAWINGS):
                    drawing(character, d).save(target / f"{character:04d}_{d + 1:02d}.png")
                character += 1


def omniglot_module(root: Path, **kwargs) -> OmniglotDataModule:
    # 8 fixture characters: 4 train, 2 val, 2 test.
    return OmniglotDataModule(root, train_characters=4, val_characters=2, num_workers=0, **kwargs)


def load_fixture(root: Path, **kwargs) -> dict:
    return load_omniglot(root, train_characters=4, val_characters=2, **kwargs)


def test_vinyals_split_has_the_published_counts_and_is_a_fixed_shuffle():
    # 964 background + 659 evaluation characters; names as the loader builds them.
    names = [f"images_background/A{i // 20}/character{i % 20:02d}" for i in range(964)]
    names += [f"images_evaluation/E{i // 20}/character{i % 20:02d}" for i in range(659)]
    split = vinyals_split(names)
    # Vinyals et al.: 1200 train / 423 test; MAML's code holds 100 of the 1200 out for validation.
    assert [len(split[s]) for s in SPLITS] == [1100, 100, 423]
    assert set(split["train"]).isdisjoint(split["val"]) and set(split["train"]).isdisjoint(split["test"])
    assert set(split["val"]).isdisjoint(split["test"])
    assert set().union(*split.values()) == set(names)
    # Pooled across both sets: a shuffle, not "background = train".
    assert any(name.startswith("images_evaluation") for name in split["train"])
    # Depends on the names only, not on the order a filesystem lists them in.
    assert vinyals_split(names[::-1]) == split
    assert vinyals_split(names, seed=1)["test"] != split["test"]


def test_omniglot_loads_rotated_training_classes_from_extracted_folders(tmp_path):
    write_omniglot(tmp_path / "omniglot-py")
    with pytest.warns(UserWarning, match="has 8 characters, not 1623"):
        splits = load_fixture(tmp_path)
    train, val, test = (splits[s] for s in SPLITS)
    # 4 characters x 4 rotations = 16 training classes of 4 drawings; val/test upright by default.
    assert train.data.shape == (64, 1, 28, 28) and len(classes_of(train.labels)) == 16
    assert val.data.shape == (8, 1, 28, 28) and len(classes_of(val.labels)) == 2
    assert test.data.shape == (8, 1, 28, 28) and len(classes_of(test.labels)) == 2
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


def test_omniglot_reads_its_cache_without_the_raw_files_and_can_rotate_evaluation(tmp_path):
    write_omniglot(tmp_path / "omniglot-py")
    with pytest.warns(UserWarning):
        first = load_fixture(tmp_path)
    for image_set in OMNIGLOT_FIXTURE:
        shutil.rmtree(tmp_path / "omniglot-py" / image_set)
    with pytest.warns(UserWarning):
        again = load_fixture(tmp_path, eval_rotations=True)
    assert torch.equal(again["train"].data, first["train"].data)
    # Rotated evaluation: 2 characters x 4 rotations = 8 test classes, 32 images.
    assert again["test"].data.shape == (32, 1, 28, 28) and len(classes_of(again["test"].labels)) == 8


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


def test_omniglot_unreadable_drawings_are_named_and_none_is_skipped(tmp_path):
    folder = tmp_path / "omniglot-py"
    write_omniglot(folder)
    broken = folder / "images_evaluation" / "Gamma" / "character02" / "0006_02.png"
    broken.write_bytes(broken.read_bytes()[:49])  # the first half: the pixel data stops short
    with pytest.raises(RuntimeError) as error:
        load_fixture(tmp_path)
    assert str(error.value).startswith(
        f"1 of the 32 Omniglot drawings in {folder} could not be read: {broken} (OSError: image file is truncated). "
        f"None is skipped (the benchmark would change): delete {folder / 'images_background'} and "
        f"{folder / 'images_evaluation'} and run again"
    )


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
