"""docs/adding-a-dataset.md, run as written: its loader and DataModule on a tiny fake "Glyphs"
release, through Lightning's hooks and the command line, so the guide cannot rot."""
import ast
import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewshot_lightning.cli import main

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-dataset.md"
# The fake release: 6 / 3 / 3 classes of 4 images of 8x8, class ids disjoint across splits.
CLASSES = {"train": range(0, 6), "val": range(6, 9), "test": range(9, 12)}
PER_CLASS, SIDE = 4, 8


@pytest.fixture
def glyphs(tmp_path, monkeypatch):
    """The guide's module (its first two Python blocks), importable as ``glyphs``."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 3, "the guide's blocks are: loader, DataModule, usage"
    (tmp_path / "glyphs.py").write_text(blocks[0] + "\n\n" + blocks[1])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module("glyphs")
    yield module, blocks
    sys.modules.pop("glyphs", None)


def fake_download(fetched):
    """torchvision's download_and_extract_archive, minus the network: writes the release."""

    def download_and_extract_archive(url, download_root, md5=None):
        fetched.append((url, md5))
        folder = Path(download_root)
        folder.mkdir(parents=True, exist_ok=True)
        generator = np.random.default_rng(0)
        for split, classes in CLASSES.items():
            labels = np.repeat(np.array(classes), PER_CLASS)
            images = generator.integers(0, 256, (len(labels), SIDE, SIDE), dtype=np.uint8)
            np.savez(folder / f"{split}.npz", images=images, labels=labels)

    return download_and_extract_archive


def test_the_guides_datamodule_is_about_ten_lines(glyphs):
    _, blocks = glyphs
    (cls,) = [node for node in ast.parse(blocks[1]).body if isinstance(node, ast.ClassDef)]
    docstring_lines = cls.body[0].end_lineno - cls.body[0].lineno + 1
    code_lines = [line for line in blocks[1].splitlines() if line.strip()]
    assert len(code_lines) - docstring_lines <= 11


def test_the_guides_dataset_downloads_loads_and_batches(glyphs, monkeypatch, capsys):
    module, blocks = glyphs
    fetched = []
    monkeypatch.setattr(module, "download_and_extract_archive", fake_download(fetched))
    # Before the download, the loader names the missing file and the fix.
    with pytest.raises(FileNotFoundError, match=r"train\.npz not found.*download=True"):
        module.load_glyphs("data")

    data = module.GlyphsDataModule(
        root="data", download=True, ways=3, shots=1, queries=2, meta_batch_size=2, train_tasks=4, num_workers=0
    )
    data.prepare_data()
    assert fetched == [(module.URL, module.MD5)]
    data.setup("fit")
    raw = next(iter(data.train_dataloader()))
    assert raw.support_x.dtype == torch.uint8  # uint8 until the device: a quarter of the bytes to move
    batch = data.on_after_batch_transfer(raw, 0)  # what the Trainer does after moving it
    # 2 tasks of 3-way 1-shot 2-query on 1x8x8 images, scaled from uint8 to [0, 1].
    assert batch.support_x.shape == (2, 3, 1, SIDE, SIDE) and batch.query_x.shape == (2, 6, 1, SIDE, SIDE)
    assert batch.support_x.dtype == torch.float32 and 0 <= float(batch.query_x.min()) <= float(batch.query_x.max()) <= 1
    assert sorted(batch.support_y[0].tolist()) == [0, 1, 2]
    # Validation draws only validation classes (ids 6-8).
    assert set(data.datasets["val"].classes.tolist()) == set(CLASSES["val"])

    # The guide's "without Lightning" block prints each split's shape.
    exec(blocks[2], vars(module))
    printed = capsys.readouterr().out
    assert printed.strip() == str({split: (len(c) * PER_CLASS, 1, SIDE, SIDE) for split, c in CLASSES.items()})


def test_the_guides_datamodule_on_the_command_line(glyphs, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["fewshot-lightning"])
    with pytest.raises(SystemExit):
        main(["fit", "--data", "glyphs.GlyphsDataModule", "--data.ways", "3", "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    # Its own two arguments, and every inherited one through **kwargs, with the value given.
    assert {"root", "download", "ways", "shots", "queries", "test_ways", "meta_batch_size", "seed",
            "num_workers", "train_transform"} <= init_args.keys()
    assert init_args["ways"] == 3 and init_args["root"] == "data"
