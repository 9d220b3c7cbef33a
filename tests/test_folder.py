"""ImageFolderDataModule on a small folder of PNGs written here: 10 classes x 4 solid-colour images.

Solid colours make every decoded pixel predictable: resizing a constant image leaves it
constant, so each class's pixels must equal its colour exactly.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_lightning.data import scale_images
from fewshot_lightning.cli import main
from fewshot_lightning.data import TaskBatch, split_by_class
from fewshot_lightning.data.datasets import ImageFolderDataModule
from fewshot_lightning.data.datasets import folder as folder_module
from fewshot_lightning.data.datasets.folder import load_image_folder, read_image_folder
from test_cli import ROOT

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

    batch = scale_images(next(iter(data.train_dataloader())))
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


def truncate(path):
    """Keep the first half of a file: the pixel data stops short, as after an interrupted download."""
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def test_undecodable_images_are_skipped_with_a_warning_naming_each(root, monkeypatch):
    noisy = root / CLASSES[1] / "img_noise.png"  # noise compresses badly: half the file is half the pixels
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(noisy)
    truncate(noisy)
    (root / CLASSES[2] / "img_0.png").write_bytes(b"not a png")
    (root / "zz_broken").mkdir()
    (root / "zz_broken" / "only.png").write_bytes(b"")
    expected = (
        r"Skipping 3 of the 42 images under .*images, which could not be decoded: "
        r"class_01/img_noise.png \(OSError: image file is truncated\), "
        r"class_02/img_0.png \(not an image format Pillow can read\), "
        r"zz_broken/only.png \(not an image format Pillow can read\)\. The other 39 are used\. "
        r"Class folder\(s\) left with no image, and so dropped: zz_broken\. Delete or replace those files"
    )
    with pytest.warns(UserWarning, match=expected):
        folder = read_image_folder(str(root), image_size=8)
    # The readable images, labelled over the classes that still hold one: class_02 keeps 3.
    assert folder.classes == CLASSES and folder.images.shape == (39, 3, 8, 8)
    assert torch.bincount(folder.labels).tolist() == [4, 4, 3] + [4] * 7
    assert "class_02/img_0.png" not in folder.files and len(folder.files) == 39
    class_02 = torch.tensor(colour(2), dtype=torch.uint8).view(1, 3, 1, 1).expand(3, 3, 8, 8)
    assert torch.equal(folder.images[folder.labels == 2], class_02)
    # A later run reads the cache, decodes nothing, and is told again.
    monkeypatch.setattr(folder_module, "decode_image", None)
    with pytest.warns(UserWarning, match=expected):
        again = read_image_folder(str(root), image_size=8)
    assert torch.equal(again.images, folder.images) and torch.equal(again.labels, folder.labels)


# The README's command for your own images, made quick: 16-pixel images, two steps.
QUICK = ["--data.image_size", "16", "--model.init_args.backbone.init_args.image_size", "16",
         "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.val_tasks", "2",
         "--trainer.logger.init_args.save_dir", "logs"]


def write_noise_folder(root, per_class=7, seed=0):
    """10 classes of 7 noise images (the folder config needs 6 per class, 10 classes)."""
    generator = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(generator.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"img_{i}.png")
    return root


def test_the_folder_config_trains_on_ten_classes_and_reports_the_split_and_skipped_files(tmp_path, monkeypatch, caplog):
    # The command line's entry point in this process: a second interpreter would cost seconds.
    root = write_noise_folder(tmp_path / "images")
    truncate(root / CLASSES[3] / "img_6.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["fewshot-lightning"])
    skipped = (f"Skipping 1 of the 70 images under {root}, which could not be decoded: class_03/img_6.png "
               "(OSError: image file is truncated). The other 69 are used.")
    with pytest.warns(UserWarning, match=re.escape(skipped)), caplog.at_level("INFO"):
        main(["fit", "--config", str(ROOT / "configs" / "protonet_folder.yaml"), "--data.root", str(root), *QUICK])
    # The seeded split, as split_by_class draws it for 10 classes (seed 0): printed and saved.
    expected = {split: [CLASSES[label] for label in part.labels.unique().tolist()]
                for split, part in split_by_class(torch.zeros(10), torch.arange(10), (0.64, 0.16, 0.20), 0).items()}
    assert [len(names) for names in expected.values()] == [6, 2, 2]
    assert ("ImageFolderDataModule class split (train/val/test: 6/2/2 classes):\n"
            f"  train: {', '.join(expected['train'])}\n  val: {', '.join(expected['val'])}\n"
            f"  test: {', '.join(expected['test'])}") in caplog.text
    run_dir = tmp_path / "logs" / "protonet_folder" / "version_0"  # its own log name, not protonet_kanji's
    assert json.loads((run_dir / "class_split.json").read_text()) == {"datamodule": "ImageFolderDataModule", **expected}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_test_ways_above_the_test_classes_stops_fit_before_training(tmp_path, monkeypatch, capfd):
    # The command's error, whether it reaches us raised or printed by the command line as it exits.
    root = write_noise_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["fewshot-lightning"])
    with pytest.raises((ValueError, SystemExit)) as failure:
        main(["fit", "--config", str(ROOT / "configs" / "protonet_folder.yaml"), "--data.root", str(root), *QUICK,
              "--data.test_ways", "3", "--data.split_fractions", "[0.5, 0.3, 0.2]"])
    if failure.type is SystemExit:
        assert failure.value.code not in (0, None)
    message = " ".join((str(failure.value) + capfd.readouterr().err).split())
    assert ("ImageFolderDataModule cannot draw the requested episodes: test_ways = 3, but the test split has only 2 "
            "classes: set test_ways to at most 2, or give the test split a larger share of the 10 classes through "
            "split_fractions (now [0.5, 0.3, 0.2]), or name each split's classes with train_classes, val_classes and "
            "test_classes.") in message
    assert not list(tmp_path.glob("logs/**/*.ckpt"))  # stopped at setup: no step was taken


@pytest.mark.filterwarnings("ignore")
@pytest.mark.filterwarnings("ignore")
def test_a_refused_resume_leaves_the_runs_class_split_file(tmp_path, monkeypatch, cli):
    # `fit --ckpt_path last --data.split_seed 1` was refused (the split mixes classes), but the
    # data's setup had already rewritten the run's class_split.json with the refused split: the
    # only readable record of the classes the run trained on.
    root = write_noise_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(ROOT / "configs" / "protonet_folder.yaml"), "--data.root", str(root), *QUICK]
    code, out = cli(*fit)
    assert code == 0, out[-3000:]
    record = next(tmp_path.glob("logs/*/version_0/class_split.json"))
    before = record.read_text()
    code, out = cli(*fit, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.split_seed", "1")
    assert code == 1 and "class split differs from the one the checkpoint was trained with" in out, out[-3000:]
    assert record.read_text() == before
    # A resume that passes the check goes on in the run's folder, with the same record.
    code, out = cli(*fit, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert code == 0, out[-3000:]
    assert record.read_text() == before


def test_testing_a_checkpoint_on_a_changed_split_of_its_folder_is_refused(tmp_path, monkeypatch, cli):
    # `test --ckpt_path last --data.split_seed 1`, or a class folder added since the fit, put
    # classes the checkpoint trained on in the test split and scored them, exit 0.
    root = write_noise_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "protonet_folder.yaml")
    code, out = cli("fit", "--config", config, "--data.root", str(root), *QUICK)
    assert code == 0, out[-3000:]
    test = ["test", "--config", config, "--data.root", str(root), "--ckpt_path", "last", *QUICK[:4],
            "--trainer.logger.init_args.save_dir", "logs", "--trainer.limit_test_batches", "1"]
    code, out = cli(*test)
    assert code == 0, out[-3000:]
    code, out = cli(*test, "--data.split_seed", "1")
    assert code == 1
    assert "ImageFolderDataModule's class split differs from the one the checkpoint was trained with" in out
    assert re.search(r"its (val|test) split holds \d+ class(es)? the checkpoint trained on \(class_\d\d", out)
    # The same folder copied elsewhere (a scratch disk) is the same data: refused there too (the
    # check compared by path, and the copy tested on training classes, exit 0).
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".*"))
    code, out = cli("test", "--config", config, "--data.root", str(copy), "--ckpt_path", "last", *QUICK[:4],
                    "--trainer.logger.init_args.save_dir", "logs", "--trainer.limit_test_batches", "1",
                    "--data.split_seed", "1")
    assert code == 1 and "class split differs from the one the checkpoint was trained with" in out, out[-3000:]
    code, out = cli("test", "--config", config, "--data.root", str(copy), "--ckpt_path", "last", *QUICK[:4],
                    "--trainer.logger.init_args.save_dir", "logs", "--trainer.limit_test_batches", "1")
    assert code == 0, out[-3000:]
    # Another folder's classes (a cross-domain test; here the same class names, other images) are not compared.
    other = write_noise_folder(tmp_path / "other", per_class=8, seed=1)
    code, out = cli("test", "--config", config, "--data.root", str(other), "--ckpt_path", "last", *QUICK[:4],
                    "--trainer.logger.init_args.save_dir", "logs", "--trainer.limit_test_batches", "1",
                    "--data.split_seed", "1")
    assert code == 0, out[-3000:]


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    # Pillow's conversion of a 16-bit image to 8 bits clips at 255: a 16-bit scan read nearly
    # all white (94% of pixels 255). Each value v is now round(v * 255 / 65535).
    for name, level in (("dark", 12850), ("bright", 52428)):  # 0.196 and 0.8 of full scale
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((12, 12), level, dtype=np.uint16)).save(tmp_path / name / f"{i}.png")
    assert Image.open(tmp_path / "dark" / "0.png").mode == "I;16"
    for channels in (1, 3):
        folder = read_image_folder(str(tmp_path), image_size=8, channels=channels)
        assert folder.classes == ["bright", "dark"]
        assert torch.all(folder.images[folder.labels == 0] == 204)  # 52428 * 255 / 65535 = 204.0
        assert torch.all(folder.images[folder.labels == 1] == 50)  # 12850 * 255 / 65535 = 50.0


def test_a_linked_folder_leading_back_is_read_once(root):
    # os.walk followed a link from a class folder back to the dataset until the system refused
    # (ELOOP): every other class's images, dozens of times over, read into that class, exit 0.
    (root / CLASSES[0] / "up").symlink_to("..", target_is_directory=True)
    (root / CLASSES[1] / "sibling").symlink_to(root / CLASSES[2], target_is_directory=True)
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (20, 20), colour(3)).save(elsewhere / "extra.png")
    (root / CLASSES[3] / "more").symlink_to(elsewhere, target_is_directory=True)
    with pytest.warns(UserWarning, match=r"Skipping 2 linked folder\(s\) of .* that lead to a folder already read .*: "
                                         r"class_00/up, class_01/sibling"):
        folder = read_image_folder(str(root), image_size=8, channels=3)
    counts = torch.bincount(folder.labels).tolist()
    # Every class its own 4 images; class 3 also the one its link to a folder outside leads to.
    assert counts == [PER_CLASS] * 3 + [PER_CLASS + 1] + [PER_CLASS] * (NUM_CLASSES - 4)
    assert "class_03/more/extra.png" in folder.files


def test_a_class_folder_linked_to_another_is_read_once(root):
    # A class folder that is a link to another class's folder was read as a class of its own:
    # the same images under two labels, which the class split could put in validation and test.
    (root / "class_zz").symlink_to(root / CLASSES[0], target_is_directory=True)
    (root / "a_link").symlink_to(root / CLASSES[1], target_is_directory=True)  # sorts before its folder
    (root / "loop").symlink_to(root, target_is_directory=True)
    with pytest.warns(UserWarning, match=r"Skipping 3 class folder\(s\) of .* linked to a folder already read: "
                                         r"a_link \(the same folder as class_01\), class_zz \(the same folder as "
                                         r"class_00\), loop \(the dataset folder or a parent of it\)"):
        folder = read_image_folder(str(root), image_size=8, channels=3)
    assert folder.classes == CLASSES  # the folders themselves, under their own names
    assert torch.bincount(folder.labels).tolist() == [PER_CLASS] * NUM_CLASSES


def test_a_folder_of_too_few_classes_says_so_and_names_class_folders_one_level_down(tmp_path):
    # A dataset wrapped in one more folder (root/mydata/<class>/...) read as one class, and the
    # error advised a larger share of that one class for each split, three times over.
    write_folder(tmp_path / "wrapped" / "mydata")
    module = ImageFolderDataModule(str(tmp_path / "wrapped"), image_size=8, ways=2, shots=1, queries=1,
                                   meta_batch_size=1, num_workers=0)
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    assert str(error.value) == (
        f"ImageFolderDataModule cannot draw the requested episodes: {tmp_path / 'wrapped'} holds 1 class folder "
        "(mydata), fewer than the 2 + 2 + 2 = 6 that the train, val and test splits need together at these ways "
        "(ways, test_ways; at least 2 each), so no split_fractions gives each split enough: use a folder with more "
        "classes. Note: "
        "mydata holds no image itself, only folders (mydata/: class_00, class_01, class_02, class_03 and 6 more), and each "
        "is read as ONE class with the images of all its folders: if those folders are the classes, point root at "
        f"them ({tmp_path / 'wrapped' / 'mydata'}).")
    # Enough classes, too few in one split for these fractions: the per-split advice stands.
    module = ImageFolderDataModule(str(tmp_path / "wrapped" / "mydata"), image_size=8, ways=2, shots=1, queries=1,
                                   meta_batch_size=1, num_workers=0, split_fractions=(0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match=r"the val split has 1 class, .* a larger share of the 10 classes through "
                                         r"split_fractions"):
        module.setup("fit")


def pixels_by_file(folder):
    return {name: tuple(folder.images[i, :, 0, 0].tolist()) for i, name in enumerate(folder.files)}


def test_a_folder_inside_a_class_is_read_there_not_through_a_link_from_another(root):
    # class_01/more, a real folder of class_01, was claimed by class_00 through the link
    # class_00/see_also (class_00 is walked first): class_01's images labelled class_00, exit 0,
    # with a warning that named the real folder as the skipped link.
    more = root / CLASSES[1] / "more"
    more.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 20), colour(1)).save(more / f"m{i}.png")
    (root / CLASSES[0] / "see_also").symlink_to("../class_01/more", target_is_directory=True)
    with pytest.warns(UserWarning, match=r"Skipping 1 linked folder\(s\) of .* that lead to a folder already read .*: "
                                         r"class_00/see_also\. "):
        folder = read_image_folder(str(root), image_size=8, channels=3)
    assert torch.bincount(folder.labels).tolist() == [PER_CLASS, PER_CLASS + 2] + [PER_CLASS] * (NUM_CLASSES - 2)
    assert [name for name in folder.files if "/m" in name] == ["class_01/more/m0.png", "class_01/more/m1.png"]
    for name, pixel in pixels_by_file(folder).items():  # every image under the class whose colour it has
        assert pixel == colour(CLASSES.index(name.split("/")[0])), name


def test_a_linked_image_of_another_class_is_read_once_in_its_own(root):
    # A file link class_00/x.png -> class_01/img_0.png gave that image two labels, silently.
    (root / CLASSES[0] / "x.png").symlink_to(root / CLASSES[1] / "img_0.png")
    # A hard link is the file itself, as much as the other name: the first class (in name order) keeps it.
    os.link(root / CLASSES[2] / "img_0.png", root / CLASSES[0] / "y.png")
    outside = root.parent / "outside.png"
    Image.new("RGB", (20, 20), colour(0)).save(outside)
    (root / CLASSES[0] / "z.png").symlink_to(outside)  # an image kept elsewhere: read, once
    (root / CLASSES[3] / "zz.png").symlink_to(outside)
    with pytest.warns(UserWarning, match=r"Skipping 3 image\(s\) of .* that are links to \(or hard links of\) an "
                                         r"image already read: class_00/x.png, class_02/img_0.png, class_03/zz.png\."):
        folder = read_image_folder(str(root), image_size=8, channels=3)
    assert "class_00/x.png" not in folder.files and {"class_00/y.png", "class_00/z.png"} <= set(folder.files)
    assert torch.bincount(folder.labels).tolist() == [PER_CLASS + 2, PER_CLASS, PER_CLASS - 1] + [PER_CLASS] * 7
    assert "class_01/img_0.png" in folder.files and "class_03/zz.png" not in folder.files


def test_links_that_lead_nowhere_are_skipped_with_a_warning(root):
    # A link whose target was moved (or a link to itself) stopped the run with a traceback from the
    # cache's fingerprint (FileNotFoundError, or OSError: too many levels of symbolic links).
    (root / CLASSES[0] / "moved.png").symlink_to(root / "gone.png")
    (root / CLASSES[1] / "loop.png").symlink_to("loop.png")
    (root / CLASSES[2] / "old_folder").symlink_to(root / "gone", target_is_directory=True)
    (root / CLASSES[3] / "photo.HEIC").write_bytes(b"not read here")  # a phone's format: named, not dropped silently
    with pytest.warns(UserWarning) as caught:
        folder = read_image_folder(str(root), image_size=8, channels=3)
    messages = " ".join(str(w.message) for w in caught)
    assert ("Skipping 2 link(s) of " in messages and "that lead nowhere (the target was moved or deleted, or the link "
            "leads to itself): class_00/moved.png, class_01/loop.png." in messages), messages
    assert "in image formats not read here (.heic): class_03/photo.HEIC" in messages
    assert torch.bincount(folder.labels).tolist() == [PER_CLASS] * NUM_CLASSES


@pytest.mark.filterwarnings("ignore")
def test_a_named_version_holding_a_run_is_refused_before_anything_is_written(tmp_path, monkeypatch, cli):
    # `fit --trainer.logger.init_args.version exp1` over an earlier exp1 rewrote its
    # class_split.json (the data's setup) before the config's save refused, with advice for a run
    # without a logger; the record of the classes that run held out was lost.
    root = write_noise_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(ROOT / "configs" / "protonet_folder.yaml"), "--data.root", str(root), *QUICK,
           "--trainer.logger.init_args.version", "exp1"]
    code, out = cli(*fit)
    assert code == 0, out[-3000:]
    run = next(tmp_path.glob("logs/*/exp1"))
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    assert "class_split.json" in before
    code, out = cli(*fit, "--data.split_seed", "5")
    assert code == 1
    assert (f"error: --trainer.logger.init_args.version exp1: {os.path.join('logs', run.parent.name, 'exp1')} holds an "
            "earlier run (its config, checkpoints and class split), which this fit would write into. Drop the "
            "version") in " ".join(out.split())
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    # Resuming that run, into its own folder, goes on.
    code, out = cli(*fit, "--trainer.max_steps", "4", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert code == 0, out[-3000:]
    assert (run / "config.resume1.yaml").is_file()


def test_a_root_of_split_folders_is_named(tmp_path):
    # train/, val/ and test/ folders of class folders were read as 3 classes, and the error that
    # followed suggested other split fractions.
    for split, names in (("train", CLASSES[:6]), ("val", CLASSES[6:8]), ("test", CLASSES[8:])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / split / name / "0.png")
    with pytest.raises(ValueError, match=r"holds the split folders test, train, val, each a folder of classes, where "
                                         r"the layout is root/<class name>/.*give each split's classes with "
                                         r"train_classes, val_classes and test_classes"):
        read_image_folder(str(tmp_path), image_size=8, channels=3)
    # Classes that happen to be called so, holding images, are classes.
    plain = tmp_path.parent / "plain"
    for split in ("train", "test"):
        (plain / split).mkdir(parents=True)
        Image.new("RGB", (20, 20), (1, 2, 3)).save(plain / split / "0.png")
    assert read_image_folder(str(plain), image_size=8, channels=3).classes == ["test", "train"]


def test_images_in_formats_not_read_are_named(root):
    # JPEGs named .jfif were skipped without a word: a class "has 3" images with 6 in its folder.
    (root / CLASSES[0] / "img_0.png").rename(root / CLASSES[0] / "img_0.jfif")
    Image.new("RGB", (20, 20), colour(1)).save(root / CLASSES[1] / "extra.ico")
    (root / CLASSES[2] / "notes.txt").write_text("not an image")
    (root / CLASSES[2] / "notes.pdf").write_text("a format Pillow writes, not reads")
    with pytest.warns(UserWarning, match=r"Skipping 1 file\(s\) of .* in image formats not read here \(\.ico\): "
                                         r"class_01/extra\.ico\. Convert them to one of \.bmp, "):
        folder = read_image_folder(str(root), image_size=8, channels=3)
    assert "class_00/img_0.jfif" in folder.files  # a JPEG by another name: read
    assert torch.bincount(folder.labels).tolist() == [PER_CLASS] * NUM_CLASSES
