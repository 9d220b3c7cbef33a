"""ImageFolderDataModule on a small folder of PNGs written here: 10 classes x 4 solid-colour images.

Solid colours make every decoded pixel predictable: resizing a constant image leaves it
constant, so each class's pixels must equal its colour exactly.
"""
import pytest
import torch
from PIL import Image

from fewshot_lightning.data import TaskBatch
from fewshot_lightning.data.datasets import ImageFolderDataModule
from fewshot_lightning.data.datasets import folder as folder_module
from fewshot_lightning.data.datasets.folder import load_image_folder, read_image_folder

NUM_CLASSES = 10
PER_CLASS = 4
CLASSES = [f"class_{k:02d}" for k in range(NUM_CLASSES)]


def colour(k: int):
    return (20 * k + 10, 200 - 15 * k, 50)


def write_folder(root):
    for k, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            # Sizes vary and are not square: every image is resized to image_size x image_size.
            Image.new("RGB", (30 + 5 * i, 24 + 3 * k), colour(k)).save(folder / f"img_{i}.png")
        (folder / "notes.txt").write_text("not an image: skipped")
    return root


@pytest.fixture
def root(tmp_path):
    return write_folder(tmp_path / "images")


def test_rgb_images_are_decoded_resized_and_labelled(root):
    folder = read_image_folder(str(root), image_size=16, channels=3)
    assert folder.classes == CLASSES
    assert folder.images.shape == (NUM_CLASSES * PER_CLASS, 3, 16, 16)
    assert folder.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(folder.labels), torch.full((NUM_CLASSES,), PER_CLASS))
    for k in range(NUM_CLASSES):
        expected = torch.tensor(colour(k), dtype=torch.uint8).view(1, 3, 1, 1).expand(PER_CLASS, 3, 16, 16)
        assert torch.equal(folder.images[folder.labels == k], expected)


def test_grayscale_uses_luma(root):
    folder = read_image_folder(str(root), image_size=8, channels=1)
    assert folder.images.shape == (NUM_CLASSES * PER_CLASS, 1, 8, 8)
    # Class 0 is (10, 200, 50): ITU-R 601-2 luma 0.299*10 + 0.587*200 + 0.114*50 = 126.1 -> 126.
    assert torch.all(folder.images[folder.labels == 0] == 126)


def test_cache_is_reused_and_a_changed_folder_rebuilds(root, monkeypatch):
    first = read_image_folder(str(root), image_size=16, channels=3)
    caches = list((root / ".fewshot_cache").glob("images_16px_3ch_*.pt"))
    assert len(caches) == 1

    calls = []
    real_decode = folder_module.decode_image

    def counting_decode(*args):
        calls.append(args[0])
        return real_decode(*args)

    monkeypatch.setattr(folder_module, "decode_image", counting_decode)
    second = read_image_folder(str(root), image_size=16, channels=3)
    assert calls == [] and torch.equal(first.images, second.images)
    # The cache folder is hidden: it is not taken for an 11th class.
    assert second.classes == CLASSES

    Image.new("RGB", (20, 20), colour(0)).save(root / CLASSES[0] / "img_new.png")
    third = read_image_folder(str(root), image_size=16, channels=3)
    # One more image: all 41 are decoded again, into a second cache file.
    assert len(calls) == NUM_CLASSES * PER_CLASS + 1
    assert third.images.shape[0] == NUM_CLASSES * PER_CLASS + 1
    assert len(list((root / ".fewshot_cache").glob("images_16px_3ch_*.pt"))) == 2


def test_cache_dir_keeps_the_image_folder_untouched(root, tmp_path):
    cache_dir = tmp_path / "cache"
    read_image_folder(str(root), image_size=16, channels=3, cache_dir=str(cache_dir))
    assert not (root / ".fewshot_cache").exists()
    assert len(list(cache_dir.glob("*.pt"))) == 1


def test_datamodule_fraction_split_and_episodes(root):
    data = ImageFolderDataModule(
        root=str(root), image_size=16, channels=3, ways=2, shots=1, queries=3,
        meta_batch_size=3, train_tasks=6, val_tasks=3, test_tasks=3, num_workers=0,
    )
    data.prepare_data()
    data.setup()
    classes = {split: set(data.datasets[split].classes.tolist()) for split in ("train", "val", "test")}
    # Default fractions 0.64/0.16/0.20 of 10 classes: round(6.4) = 6, round(1.6) = 2, the rest 2.
    assert [len(classes[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert classes["train"] | classes["val"] | classes["test"] == set(range(NUM_CLASSES))
    assert not (classes["train"] & classes["val"] or classes["train"] & classes["test"] or classes["val"] & classes["test"])

    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (3, 2, 3, 16, 16) and batch.query_x.shape == (3, 6, 3, 16, 16)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) <= 1.0
    assert sorted(batch.support_y[0].tolist()) == [0, 1]


def test_user_given_class_lists(root):
    data = ImageFolderDataModule(
        root=str(root), image_size=8, channels=1, ways=2, shots=1, queries=3, num_workers=0,
        train_classes=CLASSES[:5], val_classes=CLASSES[5:7], test_classes=CLASSES[8:],
    )
    data.setup()
    # Labels are indices into the sorted class names; class_07 is in no list, so it is unused.
    assert data.datasets["train"].classes.tolist() == [0, 1, 2, 3, 4]
    assert data.datasets["val"].classes.tolist() == [5, 6]
    assert data.datasets["test"].classes.tolist() == [8, 9]
    assert data.classes == CLASSES


def test_load_image_folder_splits_without_lightning(root):
    by_fraction = load_image_folder(str(root), image_size=8, channels=1, split_fractions=(0.5, 0.2, 0.3), split_seed=1)
    sizes = {split: len(part.labels.unique()) for split, part in by_fraction.items()}
    # 10 classes: round(5.0) = 5 train, round(2.0) = 2 val, the other 3 test; 4 images each.
    assert sizes == {"train": 5, "val": 2, "test": 3}
    assert by_fraction["test"].data.shape == (3 * PER_CLASS, 1, 8, 8)
    listed = load_image_folder(
        str(root), image_size=8, channels=1, train_classes=CLASSES[:5], val_classes=CLASSES[5:7], test_classes=CLASSES[8:]
    )
    # Labels index the sorted class folder names, as ImageFolderDataModule.classes lists them.
    assert [part.labels.unique().tolist() for part in listed.values()] == [[0, 1, 2, 3, 4], [5, 6], [8, 9]]


def test_overlapping_or_partial_or_unknown_class_lists_raise(root):
    with pytest.raises(ValueError, match="'class_03' is in both train_classes and test_classes"):
        ImageFolderDataModule(
            root=str(root), train_classes=CLASSES[:4], val_classes=CLASSES[4:6], test_classes=CLASSES[3:],
        )
    with pytest.raises(ValueError, match="but not test_classes"):
        ImageFolderDataModule(root=str(root), train_classes=CLASSES[:4], val_classes=CLASSES[4:6])
    data = ImageFolderDataModule(
        root=str(root), image_size=8, num_workers=0,
        train_classes=CLASSES[:4], val_classes=["no_such_class"], test_classes=CLASSES[6:],
    )
    with pytest.raises(ValueError, match="no_such_class are not image-holding sub-folders"):
        data.setup()


def test_missing_root_names_the_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    data = ImageFolderDataModule(root=str(missing), num_workers=0)
    with pytest.raises(FileNotFoundError, match="one sub-folder per class") as error:
        data.setup()
    assert str(missing) in str(error.value)


def test_folder_without_images_raises(tmp_path):
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "loose.png").write_bytes(b"")  # directly in root: not read, as the message says
    with pytest.raises(FileNotFoundError, match="holds no images in class sub-folders"):
        read_image_folder(str(tmp_path))


def test_class_folder_without_images_is_skipped(root):
    (root / "zz_empty").mkdir()
    with pytest.warns(UserWarning, match="zz_empty"):
        folder = read_image_folder(str(root), image_size=8)
    assert folder.classes == CLASSES


def test_invalid_channels_raise(root):
    with pytest.raises(ValueError, match="channels must be 1 .grayscale. or 3 .RGB., got 2"):
        ImageFolderDataModule(root=str(root), channels=2)
