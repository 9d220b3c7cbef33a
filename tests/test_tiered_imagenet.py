"""tiered-ImageNet's loader and DataModule on a small fixture in the release's format (PNG
pickles and label pickles), never a download."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_lightning.data import scale_images
from fewshot_lightning.data.datasets import TieredImageNetDataModule, load_tiered_imagenet
from fewshot_lightning.data.datasets._storage import DataFileError

SPLITS = ("train", "val", "test")


def classes_of(labels: torch.Tensor) -> set:
    return set(torch.unique(labels).tolist())


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
    with pytest.raises(RuntimeError, match="4 of the 4 images in .* are not readable PNGs: image 0 ") as error:
        load_tiered_imagenet(tmp_path)
    assert str(folder / "val_images_png.pkl") in str(error.value)
    assert "image 3 (not an image format Pillow can read). None is skipped" in str(error.value)
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
    batch = scale_images(next(iter(module.train_dataloader())))
    assert batch.support_x.shape == (4, 2, 3, 84, 84) and batch.query_x.shape == (4, 2, 3, 84, 84)


def overwrite_middle(path: Path, size: int) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(noise)


@pytest.mark.filterwarnings("ignore:tiered-ImageNet in .* has a different number of classes")
def test_tiered_imagenet_damaged_memory_map_is_rebuilt_or_refused(tmp_path):
    folder = tmp_path / "tiered-imagenet"
    written = write_tiered(folder)
    load_tiered_imagenet(tmp_path)
    cache = folder / "train_images_84px.npy"
    # Its SHA-256 was recorded with the size and time it had, so an unchanged map costs a stat.
    assert (folder / "train_images_84px.npy.sha256").is_file()
    overwrite_middle(cache, 4096)
    with pytest.warns(UserWarning, match=r"train_images_84px.npy is damaged \(its SHA-256 is .*, not the .* recorded"):
        splits = load_tiered_imagenet(tmp_path)
    # Rebuilt from the PNG pickle: the written pixels again.
    assert torch.equal(splits["train"].data, torch.from_numpy(written["train"][0]).permute(0, 3, 1, 2))

    # Without the pickle to rebuild from, a damaged map is refused, saying what to put back.
    overwrite_middle(cache, 4096)
    (folder / "train_images_png.pkl").unlink()
    with pytest.raises(RuntimeError, match=r"is damaged .* and train_images_png.pkl, which it is decoded from, is not"):
        load_tiered_imagenet(tmp_path)


@pytest.mark.filterwarnings("ignore:tiered-ImageNet in .* has a different number of classes")
def test_tiered_imagenet_map_without_a_record_is_hashed_once(tmp_path):
    # A map decoded by an older version has no .sha256 beside it, and its pickles may be gone:
    # it is hashed and recorded (trusted on first use) rather than refused.
    folder = tmp_path / "tiered-imagenet"
    write_tiered(folder)
    first = load_tiered_imagenet(tmp_path)
    (folder / "val_images_84px.npy.sha256").unlink()
    (folder / "val_images_png.pkl").unlink()
    with pytest.warns(UserWarning, match="val_images_84px.npy has no recorded checksum .made by an older version."):
        again = load_tiered_imagenet(tmp_path)
    assert torch.equal(again["val"].data, first["val"].data)
    assert (folder / "val_images_84px.npy.sha256").is_file()


@pytest.mark.filterwarnings("ignore:tiered-ImageNet in .* has a different number of classes")
def test_a_map_of_another_png_pickle_is_rebuilt(tmp_path):
    # The map was checked against itself only: a replaced train_images_png.pkl (the same count,
    # another order, its labels.pkl to match) was read through the old map, every image under
    # another one's label, exit 0.
    import json
    import os

    folder = tmp_path / "tiered-imagenet"
    written = write_tiered(folder)
    first = load_tiered_imagenet(tmp_path)
    record = json.loads((folder / "train_images_84px.npy.sha256").read_text())
    assert record["source"]["name"] == "train_images_png.pkl"
    images, labels = written["train"]
    order = np.array([5, 4, 3, 2, 1, 0])
    with open(folder / "train_images_png.pkl", "wb") as handle:
        pickle.dump([png(image) for image in images[order]], handle)
    with open(folder / "train_labels.pkl", "wb") as handle:
        pickle.dump({"label_specific": labels[order], "label_specific_str": ["ntrain0", "ntrain1", "ntrain2"]}, handle)
    with pytest.warns(UserWarning, match=r"train_images_84px.npy was decoded from another train_images_png.pkl"):
        again = load_tiered_imagenet(tmp_path)
    assert torch.equal(again["train"].data, torch.from_numpy(images[order]).permute(0, 3, 1, 2))
    assert torch.equal(again["train"].labels, first["train"].labels.flip(0))
    # A record without a source (an older version's) adopts the pickle beside it, unhashed.
    path = folder / "val_images_84px.npy.sha256"
    old = json.loads(path.read_text())
    del old["source"]
    path.write_text(json.dumps(old))
    os.utime(folder / "val_images_84px.npy", ns=(old["mtime_ns"], old["mtime_ns"]))
    load_tiered_imagenet(tmp_path)
    assert json.loads(path.read_text())["source"]["name"] == "val_images_png.pkl"
    assert json.loads(path.read_text())["sha256"] == old["sha256"]


def test_images_and_labels_of_different_counts_are_named_as_the_source_files(tmp_path):
    # The error blamed the freshly decoded map and said to delete it, which rebuilt the same map.
    folder = tmp_path / "tiered-imagenet"
    write_tiered(folder)
    with open(folder / "train_labels.pkl", "rb") as handle:
        labels = pickle.load(handle)
    labels["label_specific"] = labels["label_specific"][:-2]
    with open(folder / "train_labels.pkl", "wb") as handle:
        pickle.dump(labels, handle)
    with pytest.raises(DataFileError, match=r"train_images_png.pkl holds \d+ images but train_labels.pkl \d+ labels: "
                                            r"the two files .* do not belong together"):
        load_tiered_imagenet(tmp_path)
