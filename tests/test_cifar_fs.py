"""CIFAR-FS and FC100: their published splits, checked against CIFAR-100's class hierarchy,
and their loaders and DataModules on a fixture in the CIFAR-100 python release's format."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_lightning.data import scale_images
from fewshot_lightning.data.datasets import (
    CIFAR_FS_CLASSES, FC100_SUPERCLASSES, CIFARFSDataModule, FC100DataModule, cifar_fs, load_cifar_fs, load_fc100,
)

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
    batch = scale_images(next(iter(module.train_dataloader())))
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
    assert scale_images(next(iter(module.train_dataloader()))).support_x.shape == (4, 5, 3, 32, 32)
    # Without download=True nothing is fetched: prepare_data leaves the data to setup's loader.
    FC100DataModule(tmp_path).prepare_data()
    assert len(downloads) == 1


def test_an_offline_download_is_one_error_saying_where_to_put_the_archive(tmp_path, monkeypatch):
    import urllib.error

    from fewshot_lightning.data.datasets._storage import DataFileError

    def offline(root, train, download):  # torchvision's CIFAR100 on a machine without network
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(cifar_fs, "CIFAR100", offline)
    with pytest.raises(DataFileError, match=r"Could not download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz "
                                            r".*Put the files in .*elsewhere by hand \(cifar-100-python.tar.gz"):
        FC100DataModule(tmp_path / "elsewhere", download=True).prepare_data()
    assert not (tmp_path / "elsewhere").exists()
