"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): 1623 handwritten characters from
50 alphabets, 20 drawings each, as used for few-shot learning by Vinyals et al. (2016)."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from ..datamodule import LabelledDataModule
from ..episodes import LabelledData
from ._storage import PathLike, describe_failures, load_cache, missing, save_atomic

#: The official archives and their MD5s, as torchvision's ``Omniglot`` lists them.
ARCHIVE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
ARCHIVE_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
#: 964 characters in ``images_background`` and 659 in ``images_evaluation``.
NUM_CHARACTERS = 1623
#: Vinyals et al. train on 1200 characters and test on the other 423; MAML's reference code
#: holds out 100 of the 1200 for validation.
VINYALS_TRAIN, VINYALS_VAL, VINYALS_TEST = 1100, 100, 423
QUARTER_TURNS = 4
#: The folder under ``root``: torchvision's ``Omniglot`` layout, so both share one download.
FOLDER = "omniglot-py"


def vinyals_split(
    characters: Sequence[str], train: int = VINYALS_TRAIN, val: int = VINYALS_VAL, seed: int = 0
) -> Dict[str, List[str]]:
    """Split character names into ``train`` / ``val`` / rest-for-test.

    The background and evaluation characters are pooled and ordered by the SHA-256 of
    ``"{seed}/{name}"``: a fixed shuffle that is the same on every machine, Python, NumPy and
    torch version, and does not depend on the order a filesystem lists folders in.
    """
    if train < 1 or val < 0 or train + val >= len(characters):
        raise ValueError(
            f"Cannot take {train} train and {val} validation characters from {len(characters)} and leave any "
            f"for test: lower train_characters/val_characters (the full Omniglot has {NUM_CHARACTERS})."
        )
    order = sorted(characters, key=lambda name: hashlib.sha256(f"{seed}/{name}".encode()).hexdigest())
    return {"train": order[:train], "val": order[train : train + val], "test": order[train + val :]}


def with_rotations(images: Tensor, characters: Tensor, rotate: bool) -> LabelledData:
    """Images ``[N, S, S]`` -> ``LabelledData([N', 1, S, S], class ids)``.

    Class id ``4 * character + quarter_turns``: a rotated character is a new class (Santoro
    et al. 2016, Vinyals et al. 2016), and the ids of different characters never collide.
    """
    turns = range(QUARTER_TURNS) if rotate else range(1)
    data = torch.cat([torch.rot90(images, k, dims=(1, 2)) for k in turns])
    labels = torch.cat([characters * QUARTER_TURNS + k for k in turns])
    return LabelledData(data.unsqueeze(1), labels)


def download_omniglot(root: PathLike = "data") -> None:
    """Fetch ``images_background.zip`` and ``images_evaluation.zip`` from the brendenlake/omniglot
    repository into ``{root}/omniglot-py/``, checking their MD5s. An archive already there with
    the right MD5, or already extracted, is not fetched again."""
    folder = Path(root).expanduser() / FOLDER
    for name, md5 in ARCHIVE_MD5.items():
        if not (folder / name).is_dir():
            download_url(f"{ARCHIVE_URL}/{name}.zip", str(folder), f"{name}.zip", md5)


def load_omniglot(
    root: PathLike = "data",
    image_size: int = 28,
    train_characters: int = VINYALS_TRAIN,
    val_characters: int = VINYALS_VAL,
    split_seed: int = 0,
    train_rotations: bool = True,
    eval_rotations: bool = False,
) -> Dict[str, LabelledData]:
    """Omniglot on the split of Vinyals et al. (see :class:`OmniglotDataModule`): uint8 images
    ``[N, 1, S, S]`` (strokes 255 on 0) with class ids ``4 * character + quarter_turns``.

    Reads ``{root}/omniglot-py/``; the first call extracts the archives (checking their MD5s)
    and decodes the PNGs into the cache ``omniglot-{image_size}px.pt`` there, later calls read
    only the cache. A missing download raises a ``FileNotFoundError`` that says how to get it
    (:func:`download_omniglot`).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    cache = decoded_characters(Path(root).expanduser() / FOLDER, image_size)
    names: List[str] = list(cache["characters"])
    chosen = vinyals_split(names, train_characters, val_characters, split_seed)
    rotations = {"train": train_rotations, "val": eval_rotations, "test": eval_rotations}
    images, labels = cache["images"], cache["labels"]
    index_of = {name: i for i, name in enumerate(names)}
    splits = {}
    for split, members in chosen.items():
        member_ids = torch.tensor(sorted(index_of[name] for name in members))
        keep = torch.isin(labels, member_ids)
        splits[split] = with_rotations(images[keep], labels[keep], rotations[split])
    return splits


def decoded_characters(folder: Path, image_size: int) -> Dict[str, object]:
    """The cache ``{"images": uint8 [N, S, S], "labels": int64 [N], "characters": [names]}``,
    built from the archives or extracted folders when missing, damaged (see :func:`load_cache`)
    or of another shape."""
    cache_path = folder / f"omniglot-{image_size}px.pt"

    def problem(payload: Dict) -> Optional[str]:
        images, labels = payload.get("images"), payload.get("labels")
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.shape[1:] != (image_size,) * 2:
            return "images have the wrong type or shape"
        if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
            return "labels do not match the images"
        if not isinstance(payload.get("characters"), list):
            return "the character names are missing"
        return None

    cache = load_cache(cache_path, problem)
    if cache is None:
        extract_archives(folder)
        cache = decode_characters(folder, image_size)
        save_atomic(cache, cache_path)
    found = len(cache["characters"])
    if found != NUM_CHARACTERS:
        warnings.warn(
            f"Omniglot in {folder} has {found} characters, not {NUM_CHARACTERS} "
            f"({', '.join(ARCHIVE_MD5)} together): an incomplete extraction? Delete {cache_path} "
            "and the extracted folders, then run again with download=True.",
            stacklevel=3,
        )
    return cache


def extract_archives(folder: Path) -> None:
    """Extract each archive whose folder is missing, after checking its MD5."""
    how_to_get = (
        f"Pass download=True (or call download_omniglot), or put "
        f"{', '.join(name + '.zip' for name in ARCHIVE_MD5)} from {ARCHIVE_URL}/ in {folder}."
    )
    for name, md5 in ARCHIVE_MD5.items():
        target = folder / name
        if target.is_dir():
            continue
        archive = folder / f"{name}.zip"
        if not archive.is_file():
            raise missing(
                folder, f"the folders {', '.join(ARCHIVE_MD5)} (alphabet/character/*.png) or their zip archives", how_to_get
            )
        if not check_integrity(str(archive), md5):
            raise RuntimeError(
                f"{archive} is corrupt or incomplete: its MD5 is not {md5}. Delete it and pass download=True, "
                f"or download it again from {ARCHIVE_URL}/{archive.name}."
            )
        # Extract beside the target and rename, so an interrupted extraction leaves no partial folder.
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            extract_archive(str(archive), scratch)
            shutil.move(str(Path(scratch) / name), str(target))


class OmniglotDataModule(LabelledDataModule):
    """Omniglot episodes on the split of Vinyals et al., "Matching Networks for One Shot
    Learning" (NeurIPS 2016), as commonly implemented.

    Split: all 1623 characters of ``images_background`` and ``images_evaluation`` pooled and
    shuffled with a fixed seed (see :func:`vinyals_split`); 1200 for meta-training, of which
    100 are held out for validation as in MAML's reference code (Finn et al. 2017), and the
    remaining 423 for test. So train/val/test = 1100/100/423 characters. We take the
    1200/423 counts because they are the ones Vinyals et al. report and MAML, learn2learn and
    most re-implementations use; the character lists themselves were never published, so
    every variant (including the 1028/172/423 lists of Ravi & Larochelle's and Snell et al.'s
    code) is one fixed draw among many.

    Rotations by 90, 180 and 270 degrees make new classes: 4400 training classes by default
    (``train_rotations``); validation and test use the upright characters unless
    ``eval_rotations`` is set (then 400 and 1692 classes).

    Images are inverted (strokes 255 on a 0 background, as in MAML's and learn2learn's
    preprocessing, so zero padding and the background agree), resized 105 -> ``image_size``
    with Lanczos antialiasing, and cached once as a uint8 tensor in
    ``{root}/omniglot-py/omniglot-{image_size}px.pt`` (:func:`load_omniglot`).

    Args:
        root: folder holding ``omniglot-py/`` (the layout of torchvision's ``Omniglot``, so both
            share one download): ``images_background/`` and ``images_evaluation/`` with
            ``alphabet/character/*.png``, or the two zip archives.
        download: fetch the official archives from the brendenlake/omniglot repository and
            check their MD5s (:func:`download_omniglot`).
        image_size: side of the square images (28 in the literature).
        train_characters, val_characters: sizes of the training and validation character
            sets; the rest are for test.
        split_seed: seed of the fixed shuffle that picks the characters of each split.
        train_rotations, eval_rotations: add the three rotations as classes.
        **kwargs: the episode arguments of :class:`~fewshot_lightning.data.LabelledDataModule`
            (``ways``, ``shots``, ``queries``, ``test_ways``, ..., ``meta_batch_size``, ``seed``, ...).
    """

    def __init__(
        self,
        root: PathLike = "data",
        download: bool = False,
        image_size: int = 28,
        train_characters: int = VINYALS_TRAIN,
        val_characters: int = VINYALS_VAL,
        split_seed: int = 0,
        train_rotations: bool = True,
        eval_rotations: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        self.root = root
        self.download = download
        self.image_size = image_size
        self.train_characters, self.val_characters = train_characters, val_characters
        self.split_seed = split_seed
        self.train_rotations, self.eval_rotations = train_rotations, eval_rotations

    def prepare_data(self) -> None:
        # Once per node, before `setup` on every process: the download, the extraction and the
        # decoding into the cache happen once; `setup` then only reads the cache.
        if self.download:
            download_omniglot(self.root)
        self.load_splits()

    def load_splits(self) -> Dict[str, LabelledData]:
        return load_omniglot(
            self.root, self.image_size, self.train_characters, self.val_characters, self.split_seed,
            self.train_rotations, self.eval_rotations,
        )


def decode_characters(folder: Path, image_size: int) -> Dict[str, object]:
    """Read every ``{set}/{alphabet}/{character}/*.png`` under ``folder``, in sorted order."""
    images, labels, characters, failures = [], [], [], []
    for image_set in ARCHIVE_MD5:
        set_folder = folder / image_set
        character_folders = sorted(p for p in set_folder.glob("*/*") if p.is_dir())
        if not character_folders:
            raise RuntimeError(
                f"{set_folder} holds no alphabet/character folders: the extraction is incomplete. Delete it and "
                f"extract {image_set}.zip again (or pass download=True)."
            )
        for character in character_folders:
            drawings = sorted(character.glob("*.png"))
            if not drawings:
                raise RuntimeError(f"{character} holds no .png drawings; delete {set_folder} and extract it again.")
            label = len(characters)
            characters.append(character.relative_to(folder).as_posix())
            for drawing in drawings:
                try:
                    images.append(decode_drawing(drawing, image_size))
                except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for a bad file
                    failures.append((str(drawing), error))
                labels.append(label)
    if failures:
        # All of them at once, and none skipped: the archives are MD5-checked, so a bad drawing
        # means the extracted folders were damaged after extraction, and Omniglot is a benchmark.
        raise RuntimeError(
            f"{len(failures)} of the {len(labels)} Omniglot drawings in {folder} could not be read: "
            f"{describe_failures(failures)}. None is skipped (the benchmark would change): delete "
            f"{' and '.join(str(folder / name) for name in ARCHIVE_MD5)} and run again to extract them from the "
            "verified archives (with download=True if the archives are gone)."
        )
    return {
        "images": torch.from_numpy(np.stack(images)),
        "labels": torch.tensor(labels, dtype=torch.long),
        "characters": characters,
    }


def decode_drawing(path: Path, image_size: int) -> np.ndarray:
    with Image.open(path) as image:
        strokes = ImageOps.invert(image.convert("L"))
    if strokes.size != (image_size, image_size):
        strokes = strokes.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(strokes, dtype=np.uint8)
