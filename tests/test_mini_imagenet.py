"""mini-ImageNet's loader and DataModule on small fixtures of both on-disk layouts (the
pickles; JPEGs with split CSVs), never a download."""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_lightning.data import scale_images
from fewshot_lightning.data.datasets import MiniImageNetDataModule, load_mini_imagenet

SPLITS = ("train", "val", "test")


def classes_of(labels: torch.Tensor) -> set:
    return set(torch.unique(labels).tolist())


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
    batch = scale_images(next(iter(module.train_dataloader())))
    # 4 tasks of 2-way 1-shot 2-query over 3 training classes of 84x84 RGB.
    assert batch.support_x.shape == (4, 2, 3, 84, 84) and batch.query_x.shape == (4, 4, 3, 84, 84)


def test_mini_imagenet_unreadable_images_are_all_named_and_none_is_skipped(tmp_path):
    folder = tmp_path / "mini-imagenet"
    (folder / "images").mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8)
    for split, count in MINI_CLASSES.items():
        rows = [(f"n{split}{c}_{i}.jpg", f"n{split}{c}") for c in range(count) for i in range(2)]
        for name, _ in rows:
            Image.fromarray(noise).save(folder / "images" / name)
        (folder / f"{split}.csv").write_text("".join(f"{name},{wnid}\n" for name, wnid in rows))
    truncated = folder / "images" / "ntrain1_0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (folder / "images" / "ntrain2_1.jpg").unlink()
    with pytest.raises(RuntimeError) as error:
        load_mini_imagenet(tmp_path)
    message = str(error.value)
    # Both bad files in one message (one run to learn every file to fetch again), and no cache.
    assert message.startswith(
        f"2 of the 6 images listed in {folder / 'train.csv'} could not be read: "
        f"{truncated} (OSError: image file is truncated"
    )
    assert f"{folder / 'images' / 'ntrain2_1.jpg'} (FileNotFoundError: listed in the split CSV but missing)" in message
    assert "None is skipped (the benchmark would change): fetch those files again." in message
    assert not (folder / "train-84px.pt").exists()


def write_mini_csvs(folder: Path) -> None:
    """The JPEG layout: classes n<split><c>, two flat-coloured images each (colour by class)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, count in MINI_CLASSES.items():
        rows = ["filename,label"]
        for c in range(count):
            wnid = f"n{split}{c}"
            for i in range(2):
                name = f"{wnid}{i:08d}.jpg"
                Image.new("RGB", (84, 84), (40 * c + 20, 100 + 20 * SPLITS.index(split), 60)).save(folder / "images" / name)
                rows.append(f"{name},{wnid}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_a_changed_split_csv_decodes_its_split_again(tmp_path):
    # The cache of a split was used whatever its CSV said since: a class moved from train.csv to
    # test.csv (another published split) still trained on it and tested without it, exit 0.
    folder = tmp_path / "mini-imagenet"
    write_mini_csvs(folder)
    with pytest.warns(UserWarning, match="published"):
        before = load_mini_imagenet(tmp_path)
    assert [len(before[s].labels) for s in SPLITS] == [6, 4, 4]
    train = (folder / "train.csv").read_text().splitlines()
    moved = [row for row in train if row.startswith("ntrain2")]
    (folder / "train.csv").write_text("\n".join(row for row in train if row not in moved) + "\n")
    with open(folder / "test.csv", "a") as handle:
        handle.write("\n".join(moved) + "\n")
    with pytest.warns(UserWarning, match=r"train-84px.pt .*train.csv or the images it lists changed since it was decoded"):
        after = load_mini_imagenet(tmp_path)
    assert [len(after[s].labels) for s in SPLITS] == [4, 4, 6]
    assert [len(classes_of(after[s].labels)) for s in SPLITS] == [2, 2, 3]
    # An image replaced under the same name (another size or time) decodes its split again too.
    Image.new("RGB", (84, 84), (250, 0, 0)).save(folder / "images" / "ntrain000000000.jpg", quality=50)
    with pytest.warns(UserWarning, match=r"train-84px.pt .*changed since it was decoded"):
        again = load_mini_imagenet(tmp_path)
    assert again["train"].data[0, 0].float().mean() > 240
    # Unchanged, the caches are read as they are: no rebuild warning.
    with pytest.warns(UserWarning) as caught:
        load_mini_imagenet(tmp_path)
    assert not [w for w in caught if "changed since" in str(w.message)]


def test_a_damaged_class_dict_is_named_not_an_index_error(tmp_path):
    # An index past the images raised a raw IndexError naming no file; two classes listing the
    # same image gave it to the later one without a word.
    folder = tmp_path / "mini-imagenet"
    write_mini_pickles(folder)
    path = folder / "mini-imagenet-cache-train.pkl"
    content = pickle.loads(path.read_bytes())
    content["class_dict"]["n00000000"] = [0, 3, 999]
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(RuntimeError, match=r"mini-imagenet-cache-train.pkl: class_dict\['n00000000'\] lists image "
                                           r"indices from 0 to 999, but the file holds 9 images \(0\.\.8\)"):
        load_mini_imagenet(tmp_path)
    content["class_dict"]["n00000000"] = [0, 3, 4]  # 4 is n00000001's too
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(RuntimeError, match=r"class_dict lists image 4 under both 'n00000000' and 'n00000001'"):
        load_mini_imagenet(tmp_path)


@pytest.mark.filterwarnings("ignore")
def test_a_damaged_dataset_file_is_one_line_from_the_command(tmp_path, monkeypatch, cli):
    # The loaders' RuntimeErrors (a truncated pickle, images no decoder reads) printed a whole
    # traceback, where the command promises one short message with exit code 1 for bad input.
    write_mini_pickles(tmp_path / "mini-imagenet")
    path = tmp_path / "mini-imagenet" / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "protonet_miniimagenet.yaml")
    code, out = cli("fit", "--config", config, "--data.init_args.root", str(tmp_path), "--trainer.max_steps", "1")
    assert code == 1
    assert "Traceback" not in out
    assert re.search(rf"error: {re.escape(str(path))} .*corrupt", out), out[-2000:]


def test_one_pickle_beside_the_csv_layout_is_not_mixed_in(tmp_path):
    # With the CSV layout complete and only the training pickle beside it, train came from the
    # pickle and val and test from the CSVs, with nothing said; the docstring promises one layout.
    folder = tmp_path / "mini-imagenet"
    write_mini_csvs(folder)
    write_mini_pickles(tmp_path / "pickles")
    shutil.copy(tmp_path / "pickles" / "mini-imagenet-cache-train.pkl", folder)
    with pytest.warns(UserWarning, match=r"holds mini-imagenet-cache-train.pkl but not all three pickles: reading every "
                                         r"split from images/ and the split CSVs"):
        splits = load_mini_imagenet(tmp_path)
    assert [len(splits[s].labels) for s in SPLITS] == [6, 4, 4]  # the CSVs' 2 images a class, not the pickle's
