"""Benchmark loaders, on small fixtures written in each dataset's real on-disk format (never a download).

The published splits need every class; where a fixture has fewer, the split logic is checked
on its own against the published counts, and the loading path on the fixture.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_lightning.data import TaskBatch
from fewshot_lightning.data.datasets import (
    CIFAR_FS_CLASSES, FC100_SUPERCLASSES, CIFARFSDataModule, FC100DataModule, MiniImageNetDataModule,
    OmniglotDataModule, TieredImageNetDataModule, load_cifar_fs, load_fc100, load_mini_imagenet, load_omniglot,
    load_tiered_imagenet, vinyals_split,
)
from fewshot_lightning.data.datasets import cifar_fs, omniglot

# CIFAR-100's published class hierarchy: 20 superclasses of 5 classes each. The release's meta
# file lists both levels in alphabetical order, which is what the coarse/fine label ids index.
CIFAR100_HIERARCHY = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
COARSE_NAMES = sorted(CIFAR100_HIERARCHY)
FINE_NAMES = sorted(name for members in CIFAR100_HIERARCHY.values() for name in members)
SPLITS = ("train", "val", "test")


def classes_of(labels: torch.Tensor) -> set:
    return set(torch.unique(labels).tolist())


# --------------------------------------------------------------------------------------------
# Omniglot
# --------------------------------------------------------------------------------------------

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
    assert next(iter(module.train_dataloader())).support_x.shape == (2, 3, 1, 28, 28)
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
    batch = next(iter(module.train_dataloader()))
    assert isinstance(batch, TaskBatch)
    # 2 tasks of 3-way 1-shot (3 support) and 2 queries per class (6 query).
    assert batch.support_x.shape == (2, 3, 1, 28, 28) and batch.query_x.shape == (2, 6, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) == 1.0
    assert sorted(batch.support_y[0].tolist()) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# mini-ImageNet
# --------------------------------------------------------------------------------------------

# Fixture: 3/2/2 classes of 3 images (the real split: 64/16/20 of 600).
MINI_CLASSES = {"train": 3, "val": 2, "test": 2}
MINI_PER_CLASS = 3


def write_mini_pickles(folder: Path, validation_name: str = "val") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    written, first_class = {}, 0
    for split, count in MINI_CLASSES.items():
        wnids = [f"n{first_class + c:08d}" for c in range(count)]
        first_class += count
        images = generator.integers(0, 256, (count * MINI_PER_CLASS, 84, 84, 3), dtype=np.uint8)
        # Interleaved indices, as the releases are not grouped by class: image i is of class i % count.
        class_dict = {wnid: list(range(c, count * MINI_PER_CLASS, count)) for c, wnid in enumerate(wnids)}
        name = validation_name if split == "val" else split
        with open(folder / f"mini-imagenet-cache-{name}.pkl", "wb") as handle:
            pickle.dump({"image_data": images, "class_dict": class_dict}, handle)
        written[split] = images
    return written


def test_mini_imagenet_reads_the_pickles(tmp_path):
    # learn2learn's copies spell the validation file "-validation": it must be found too.
    written = write_mini_pickles(tmp_path / "mini-imagenet", validation_name="validation")
    with pytest.warns(UserWarning, match=r"train 3 \(published 64\)"):
        splits = load_mini_imagenet(tmp_path)
    for split, count in MINI_CLASSES.items():
        data, labels = splits[split]
        assert data.shape == (count * MINI_PER_CLASS, 3, 84, 84) and data.dtype == torch.uint8
        # Pixels unchanged, only moved to channel-first.
        assert torch.equal(data, torch.from_numpy(written[split]).permute(0, 3, 1, 2))
        assert len(classes_of(labels)) == count
        # Image i is of the class i % count (the fixture's interleaving).
        assert torch.equal(labels - labels.min(), torch.arange(len(labels)) % count)
    # Class ids unique across splits: train 0-2, val 3-4, test 5-6.
    assert [sorted(classes_of(splits[s].labels)) for s in SPLITS] == [[0, 1, 2], [3, 4], [5, 6]]


def test_mini_imagenet_reads_images_and_split_csvs(tmp_path):
    folder = tmp_path / "mini-imagenet"
    (folder / "images").mkdir(parents=True)
    colours = {}
    for split, count in MINI_CLASSES.items():
        rows = ["filename,label"]
        for c in range(count):
            wnid = f"n{split}{c}"
            colours[wnid] = (40 * c + 20, 200 - 50 * c, 90 + len(split))
            for i in range(2):
                name = f"{wnid}{i:08d}.jpg"
                # Not 84x84: the loader resizes.
                Image.new("RGB", (100, 90), colours[wnid]).save(folder / "images" / name, quality=95)
                rows.append(f"{name},{wnid}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning):
        splits = load_mini_imagenet(tmp_path)
    data, labels = splits["train"]
    # 3 classes x 2 images, resized to 84x84.
    assert data.shape == (6, 3, 84, 84) and data.dtype == torch.uint8 and len(classes_of(labels)) == 3
    # Rows are class-ordered and classes sorted by wnid, so image 0 is n'train'0's flat colour (JPEG: +-4).
    assert (data[0].float().mean(dim=(1, 2)) - torch.tensor(colours["ntrain0"], dtype=torch.float)).abs().max() < 4
    assert all((folder / f"{split}-84px.pt").is_file() for split in SPLITS)


def test_mini_imagenet_missing_names_the_path_and_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_mini_imagenet(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "mini-imagenet") in message
    assert "mini-imagenet-cache-{train,val,test}.pkl" in message and "train.csv" in message
    assert "zenodo.org" in message


def test_mini_imagenet_partial_pickles_name_the_missing_file(tmp_path):
    write_mini_pickles(tmp_path / "mini-imagenet")
    (tmp_path / "mini-imagenet" / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-test.pkl is missing"):
        load_mini_imagenet(tmp_path)


def test_mini_imagenet_corrupt_pickle_names_the_file(tmp_path):
    write_mini_pickles(tmp_path / "mini-imagenet")
    path = tmp_path / "mini-imagenet" / "mini-imagenet-cache-train.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="corrupt") as error:
        load_mini_imagenet(tmp_path)
    assert str(path) in str(error.value)


def test_mini_imagenet_refuses_a_class_in_two_splits(tmp_path):
    write_mini_pickles(tmp_path / "mini-imagenet")
    folder = tmp_path / "mini-imagenet"
    shutil.copy(folder / "mini-imagenet-cache-val.pkl", folder / "mini-imagenet-cache-test.pkl")
    with pytest.raises(RuntimeError, match="is in both the val and the test split"):
        load_mini_imagenet(tmp_path)


def test_mini_imagenet_datamodule_decodes_in_prepare_data_and_batches_after_setup(tmp_path):
    write_mini_pickles(tmp_path / "mini-imagenet")
    module = MiniImageNetDataModule(tmp_path, ways=2, shots=1, queries=2, train_tasks=4, num_workers=0)
    assert module.meta_batch_size == 4  # its own default (MAML's mini-ImageNet setting), not the base's 32
    with pytest.warns(UserWarning, match="published"):
        module.prepare_data()
        module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    # 4 tasks of 2-way 1-shot 2-query over 3 training classes of 84x84 RGB.
    assert batch.support_x.shape == (4, 2, 3, 84, 84) and batch.query_x.shape == (4, 4, 3, 84, 84)


# --------------------------------------------------------------------------------------------
# tiered-ImageNet
# --------------------------------------------------------------------------------------------

TIERED_CLASSES = {"train": 3, "val": 2, "test": 2}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tiered(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(1)
    written = {}
    for split, count in TIERED_CLASSES.items():
        labels = np.repeat(np.arange(count), 2)  # each split numbers its classes from 0, as the release does
        images = generator.integers(0, 256, (len(labels), 84, 84, 3), dtype=np.uint8)
        # The release holds cv2.imencode output (uint8 arrays); bytes are accepted too.
        encoded = [np.frombuffer(png(image), dtype=np.uint8) if split == "train" else png(image) for image in images]
        with open(folder / f"{split}_images_png.pkl", "wb") as handle:
            pickle.dump(encoded, handle)
        with open(folder / f"{split}_labels.pkl", "wb") as handle:
            pickle.dump(
                {
                    "label_specific": labels,
                    "label_general": np.zeros_like(labels),
                    "label_specific_str": [f"n{split}{c}" for c in range(count)],
                    "label_general_str": ["category"],
                },
                handle,
            )
        written[split] = (images, labels)
    return written


def test_tiered_imagenet_decodes_once_into_a_memory_map(tmp_path):
    folder = tmp_path / "tiered-imagenet"
    written = write_tiered(folder)
    with pytest.warns(UserWarning, match=r"train 3 \(published 351\)"):
        splits = load_tiered_imagenet(tmp_path)
    for split, count in TIERED_CLASSES.items():
        data, labels = splits[split]
        # PNG is lossless: the decoded pixels are the written ones, channel-first.
        assert data.shape == (2 * count, 3, 84, 84) and data.dtype == torch.uint8
        assert torch.equal(data, torch.from_numpy(written[split][0]).permute(0, 3, 1, 2))
        assert len(classes_of(labels)) == count
        assert (folder / f"{split}_images_84px.npy").is_file()
    # Each split's 0-based labels are renumbered: train 0-2, val 3-4, test 5-6.
    assert [sorted(classes_of(splits[s].labels)) for s in SPLITS] == [[0, 1, 2], [3, 4], [5, 6]]
    # Later runs need only the labels and the map: the multi-gigabyte PNG pickles can go.
    for split in SPLITS:
        (folder / f"{split}_images_png.pkl").unlink()
    with pytest.warns(UserWarning):
        again = load_tiered_imagenet(tmp_path)
    assert torch.equal(again["val"].data, splits["val"].data)


def test_tiered_imagenet_missing_names_the_path_and_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_tiered_imagenet(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "tiered-imagenet") in message and "train_labels.pkl" in message
    assert "few-shot-ssl-public" in message


def test_tiered_imagenet_corrupt_png_names_the_file(tmp_path):
    folder = tmp_path / "tiered-imagenet"
    write_tiered(folder)
    with open(folder / "val_images_png.pkl", "wb") as handle:
        pickle.dump([b"\x89PNG broken", b"\x89PNG broken", b"x", b"y"], handle)
    with pytest.raises(RuntimeError, match="not a readable PNG") as error:
        load_tiered_imagenet(tmp_path)
    assert str(folder / "val_images_png.pkl") in str(error.value)
    # The failed decode left no half-written cache that a later run would trust.
    assert not (folder / "val_images_84px.npy").exists()


def test_tiered_imagenet_datamodule_decodes_in_prepare_data_and_batches_after_setup(tmp_path):
    folder = tmp_path / "tiered-imagenet"
    write_tiered(folder)
    module = TieredImageNetDataModule(tmp_path, ways=2, shots=1, queries=1, train_tasks=4, num_workers=0)
    with pytest.warns(UserWarning, match="published"):
        module.prepare_data()
    # prepare_data (once per node) did the decoding: setup on every rank only maps the files.
    assert all((folder / f"{split}_images_84px.npy").is_file() for split in SPLITS)
    for split in SPLITS:
        (folder / f"{split}_images_png.pkl").unlink()
    with pytest.warns(UserWarning, match="published"):
        module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch.support_x.shape == (4, 2, 3, 84, 84) and batch.query_x.shape == (4, 2, 3, 84, 84)


# --------------------------------------------------------------------------------------------
# CIFAR-FS and FC100
# --------------------------------------------------------------------------------------------

def test_cifar_fs_split_is_bertinettos_64_16_20_over_all_100_classes():
    counts = [len(CIFAR_FS_CLASSES[s]) for s in SPLITS]
    assert counts == [64, 16, 20]
    members = [set(CIFAR_FS_CLASSES[s]) for s in SPLITS]
    assert sum(len(m) for m in members) == 100 and set().union(*members) == set(FINE_NAMES)


def test_fc100_split_is_oreshkins_12_4_4_superclasses_and_60_20_20_classes():
    assert [len(FC100_SUPERCLASSES[s]) for s in SPLITS] == [12, 4, 4]
    assert sorted(sum((list(FC100_SUPERCLASSES[s]) for s in SPLITS), [])) == list(range(20))
    # TADAM's supplementary names them; the indices are their positions in CIFAR-100's meta.
    names = {s: {COARSE_NAMES[i] for i in FC100_SUPERCLASSES[s]} for s in SPLITS}
    assert names["val"] == {
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals",
    }
    assert names["test"] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert [5 * len(FC100_SUPERCLASSES[s]) for s in SPLITS] == [60, 20, 20]


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> torch.Tensor:
    """All 100 classes with a few 32x32 images each, in the python-pickle release's format.
    Returns every image row, train file first, as the loader pools them."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_of = {fine: COARSE_NAMES.index(coarse) for coarse, members in CIFAR100_HIERARCHY.items() for fine in members}
    generator = np.random.default_rng(2)
    rows = []
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        data = generator.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        content = {
            "filenames": [f"image_{i}.png" for i in range(len(fine))],
            "batch_label": f"{name} batch",
            "fine_labels": fine.tolist(),
            "coarse_labels": [coarse_of[FINE_NAMES[f]] for f in fine],
            "data": data,
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle)
        rows.append(data)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": FINE_NAMES, "coarse_label_names": COARSE_NAMES}, handle)
    return torch.from_numpy(np.concatenate(rows))


def test_cifar_fs_loads_the_published_split_from_the_cifar100_release(tmp_path):
    rows = write_cifar100(tmp_path)
    splits = load_cifar_fs(tmp_path)
    for split, classes in zip(SPLITS, (64, 16, 20)):
        data, labels = splits[split]
        # 3 images per class in the fixture (2 from the train file, 1 from the test file).
        assert data.shape == (3 * classes, 3, 32, 32) and data.dtype == torch.uint8
        assert {FINE_NAMES[c] for c in classes_of(labels)} == set(CIFAR_FS_CLASSES[split])
    assert classes_of(splits["train"].labels).isdisjoint(classes_of(splits["test"].labels))
    # Channel-major rows reshape to CHW. Samples keep the files' order, and "apple" (class 0, the
    # fixture's rows 0-1) is a CIFAR-FS training class, so the first training image is row 0.
    assert torch.equal(splits["train"].data[0], rows[0].view(3, 32, 32))


def test_fc100_loads_whole_superclasses(tmp_path):
    write_cifar100(tmp_path)
    splits = load_fc100(tmp_path)
    for split, classes in zip(SPLITS, (60, 20, 20)):
        data, labels = splits[split]
        assert data.shape == (3 * classes, 3, 32, 32) and len(classes_of(labels)) == classes
        names = {FINE_NAMES[i] for i in classes_of(labels)}
        superclasses = {COARSE_NAMES.index(c) for c, members in CIFAR100_HIERARCHY.items() if set(members) & names}
        assert superclasses == set(FC100_SUPERCLASSES[split])
    all_classes = [classes_of(splits[s].labels) for s in SPLITS]
    assert set().union(*all_classes) == set(range(100)) and sum(map(len, all_classes)) == 100


def test_cifar_missing_names_the_path_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_cifar_fs(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message and "meta" in message and "download=True" in message


def test_cifar_corrupt_file_names_the_file(tmp_path):
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(RuntimeError, match="corrupt") as error:
        load_fc100(tmp_path)
    assert str(path) in str(error.value)


def test_cifar_fs_batches_with_a_train_transform(tmp_path):
    write_cifar100(tmp_path)
    # The transform sees one uint8 CHW image and must return the float image the model gets.
    flip_and_scale = lambda image: image.flip(-1).float() / 255  # noqa: E731
    module = CIFARFSDataModule(
        tmp_path, ways=5, shots=1, queries=2, meta_batch_size=2, train_tasks=2, num_workers=0,
        train_transform=flip_and_scale,
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    # 2 tasks, 5 support and 10 query images of 3x32x32.
    assert batch.support_x.shape == (2, 5, 3, 32, 32) and batch.query_x.shape == (2, 10, 3, 32, 32)
    assert batch.support_x.dtype == torch.float32 and float(batch.support_x.max()) <= 1.0


def test_cifar_datamodule_downloads_in_prepare_data(tmp_path, monkeypatch):
    downloads = []

    def fake_cifar100(root, train, download):  # torchvision's CIFAR100, minus the network
        downloads.append((root, download))
        if not (Path(root) / "cifar-100-python").exists():
            write_cifar100(Path(root))

    monkeypatch.setattr(cifar_fs, "CIFAR100", fake_cifar100)
    module = FC100DataModule(tmp_path, download=True, ways=5, shots=1, queries=2, train_tasks=4, num_workers=0)
    module.prepare_data()
    assert downloads == [(str(tmp_path), True)]
    module.setup("fit")
    assert next(iter(module.train_dataloader())).support_x.shape == (4, 5, 3, 32, 32)
    # Without download=True nothing is fetched: prepare_data leaves the data to setup's loader.
    FC100DataModule(tmp_path).prepare_data()
    assert len(downloads) == 1
