"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): 1623 handwritten characters from
50 alphabets, 20 drawings each, as used for few-shot learning by Vinyals et al. (2016)."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from ..datamodule import SPLITS, LabelledDataModule
from ..episodes import LabelledData
from ._storage import (
    DataFileError, PathLike, describe_failures, ensure_writable, fetching, load_cache, missing, save_atomic,
)

#: The official archives and their MD5s, as torchvision's ``Omniglot`` lists them.
ARCHIVE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
ARCHIVE_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
#: 964 characters in ``images_background`` and 659 in ``images_evaluation``.
NUM_CHARACTERS = 1623
QUARTER_TURNS = 4
#: The folder under ``root``: torchvision's ``Omniglot`` layout, so both share one download.
FOLDER = "omniglot-py"
#: The package folder holding the published lists, ``{train,val,test}.txt``.
SPLIT_LISTS = "splits/omniglot_vinyals"


def vinyals_split() -> Dict[str, List[str]]:
    """The classes of each split of Omniglot as Vinyals et al. (NeurIPS 2016) split it, in the
    lists Snell et al. published with Prototypical Networks (github.com/jakesnell/
    prototypical-networks, ``data/omniglot/splits/vinyals/{train,val,test}.txt``; the same
    characters as Ren et al.'s few-shot-ssl-public lists), shipped with this package as data.

    A class is ``"alphabet/characterNN/rotDDD"``: a character of the official release turned
    ``DDD`` degrees counter-clockwise. The lists hold 1028 / 172 / 423 characters (Vinyals et
    al.'s 1200 training characters, of which Ravi & Larochelle's and Snell et al.'s code hold
    172 out for validation, and 423 for test), each in all four rotations: 4112 / 688 / 1692
    classes. The test characters are from 13 alphabets of ``images_evaluation``: Kannada, Keble,
    Malayalam, Manipuri, Mongolian, Old Church Slavonic, Oriya, Sylheti, Syriac (Serto), Tengwar,
    Tibetan and ULOG whole, and Gurmukhi's characters 42 to 45 (1 to 41 are training ones).
    """
    folder = resources.files(__package__).joinpath(SPLIT_LISTS)
    return {split: folder.joinpath(f"{split}.txt").read_text(encoding="utf-8").split() for split in SPLITS}


def character_key(name: str) -> str:
    """``"images_background/Latin/character01"`` (a character as the cache names it) ->
    ``"Latin/character01"`` (as the published lists name it: alphabet names are unique)."""
    return name.split("/", 1)[1]


def class_label(character: int, turns: int) -> int:
    """Class id of character ``character`` (its index in the cache) turned ``turns`` quarter
    turns: a rotated character is a new class (Santoro et al. 2016, Vinyals et al. 2016), and
    the ids of different characters never collide."""
    return QUARTER_TURNS * character + turns


def published_name(characters: Sequence[str], label: int) -> str:
    """The published name of class ``label``, ``"alphabet/characterNN/rotDDD"``, given the
    characters in cache order as :func:`character_key` names them."""
    character, turns = divmod(label, QUARTER_TURNS)
    return f"{characters[character]}/rot{90 * turns:03d}"


def random_character_split(characters: Sequence[str], sizes: Sequence[int], seed: int) -> Dict[str, List[str]]:
    """A split of Omniglot's characters drawn at random, irrespective of alphabet, as MAML's and
    Reptile's code split them (cbfinn/maml: 1200 characters shuffled, 100 of them for validation,
    the other 423 for test; supervised-reptile: 1200 / 423), in the form of :func:`vinyals_split`
    (every character in its four rotations). ``sizes``: characters for train, val and test, at
    most the 1623 there are; ``seed``: of the shuffle of the sorted characters. The original
    code's own draw shuffled the file system's listing, so its characters cannot be named: this
    is the same kind of split (test alphabets shared with training, an easier test than
    Vinyals'), not the same characters."""
    names = sorted(characters)
    if len(sizes) != 3 or any(size < 0 for size in sizes) or sum(sizes) > len(names):
        raise ValueError(f"split_sizes must be three character counts (train, val, test) summing to at most the "
                         f"{len(names)} characters, got {list(sizes)}.")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    return {split: [f"{names[i]}/rot{90 * turns:03d}" for i in order[bounds[k]:bounds[k + 1]] for turns in range(4)]
            for k, split in enumerate(SPLITS)}


def split_characters(
    images: Tensor, labels: Tensor, characters: Sequence[str], train_rotations: bool = True, eval_rotations: bool = True,
    published: Optional[Dict[str, List[str]]] = None,
) -> Dict[str, LabelledData]:
    """Images ``[N, S, S]`` of the characters ``labels`` (indices into ``characters``, named as
    :func:`character_key`) -> ``{split: LabelledData([N', 1, S, S], class ids)}`` on the
    published split (:func:`vinyals_split`), class ids as :func:`class_label`.

    The classes are the lists' own, ``rotDDD`` included; ``train_rotations=False`` or
    ``eval_rotations=False`` keep only the upright (``rot000``) classes of training or of
    validation and test. Listed characters absent from ``characters`` are left out (an
    incomplete extraction is warned about where the images are read); a character that no list
    names is an error, as the release would not be Omniglot's.
    """
    vinyals = vinyals_split()
    published = vinyals if published is None else published
    listed = {name.rsplit("/", 1)[0] for names in vinyals.values() for name in names}
    unknown = [name for name in characters if name not in listed]
    if unknown:
        raise DataFileError(
            f"{len(unknown)} character folders are not in the published Omniglot split (Vinyals et al.), e.g. "
            f"{', '.join(unknown[:5])}: these are not the official images_background/images_evaluation "
            "archives. Delete the extracted folders and the cache and run again with download=True."
        )
    index_of = {name: i for i, name in enumerate(characters)}
    rotate = {"train": train_rotations, "val": eval_rotations, "test": eval_rotations}
    splits = {}
    for split, names in published.items():
        by_turns: Dict[int, List[int]] = {}
        for name in names:
            character, rotation = name.rsplit("/", 1)
            turns = int(rotation[len("rot"):]) // 90
            if character in index_of and (turns == 0 or rotate[split]):
                by_turns.setdefault(turns, []).append(index_of[character])
        # An empty split (none of its characters extracted) stays empty, for the episode check to name.
        data, ids = [images[:0]], [labels[:0]]
        for turns, members in sorted(by_turns.items()):
            keep = torch.isin(labels, torch.tensor(members))
            data.append(torch.rot90(images[keep], turns, dims=(1, 2)))
            ids.append(class_label(labels[keep], turns))
        splits[split] = LabelledData(torch.cat(data).unsqueeze(1), torch.cat(ids))
    return splits


def download_omniglot(root: PathLike = "data") -> None:
    """Fetch ``images_background.zip`` and ``images_evaluation.zip`` from the brendenlake/omniglot
    repository into ``{root}/omniglot-py/``, checking their MD5s. An archive already there with
    the right MD5, or already extracted, is not fetched again."""
    folder = Path(root).expanduser() / FOLDER
    for name, md5 in ARCHIVE_MD5.items():
        if not (folder / name).is_dir():
            url = f"{ARCHIVE_URL}/{name}.zip"
            with fetching(url, folder, f"{', '.join(f'{n}.zip' for n in ARCHIVE_MD5)} from {ARCHIVE_URL}, or their "
                                       "extracted folders"):
                download_url(url, str(folder), f"{name}.zip", md5)


def load_omniglot(
    root: PathLike = "data",
    image_size: int = 28,
    train_rotations: bool = True,
    eval_rotations: bool = True,
) -> Dict[str, LabelledData]:
    """Omniglot on the published split of Vinyals et al. (see :class:`OmniglotDataModule` and
    :func:`vinyals_split`): uint8 images ``[N, 1, S, S]`` (strokes 255 on 0) with class ids
    ``4 * character + quarter_turns``.

    Reads ``{root}/omniglot-py/``; the first call extracts the archives (checking their MD5s)
    and decodes the PNGs into the cache ``omniglot-{image_size}px.pt`` there, later calls read
    only the cache. A missing download raises a ``FileNotFoundError`` that says how to get it
    (:func:`download_omniglot`).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    cache = decoded_characters(Path(root).expanduser() / FOLDER, image_size)
    characters = [character_key(name) for name in cache["characters"]]
    return split_characters(cache["images"], cache["labels"], characters, train_rotations, eval_rotations)


def decoded_characters(folder: Path, image_size: int) -> Dict[str, object]:
    """The cache ``{"images": uint8 [N, S, S], "labels": int64 [N], "characters": [names]}``,
    built from the archives or extracted folders when missing, damaged (see :func:`load_cache`),
    of another shape, or of other drawings (:func:`drawings_source`: a drawing replaced, added
    or removed since, or a partial extraction completed)."""
    cache_path = folder / f"omniglot-{image_size}px.pt"
    source = drawings_source(folder)

    def problem(payload: Dict) -> Optional[str]:
        if source is not None and payload.get("source") != source:
            return ("it does not record the drawings it was decoded from (an older version made it)"
                    if "source" not in payload else "the extracted drawings changed since it was decoded")
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
        ensure_writable(folder, cache_path.name)  # before minutes of extracting and decoding
        extract_archives(folder)
        source = drawings_source(folder)
        cache = decode_characters(folder, image_size)
        if source is not None:
            cache["source"] = source
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
        f"Pass download=True (--data.init_args.download true on the command line; or call download_omniglot), or put "
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
            raise DataFileError(
                f"{archive} is corrupt or incomplete: its MD5 is not {md5}. Delete it and pass download=True, "
                f"or download it again from {ARCHIVE_URL}/{archive.name}."
            )
        # Extract beside the target and rename, so an interrupted extraction leaves no partial folder.
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            extract_archive(str(archive), scratch)
            shutil.move(str(Path(scratch) / name), str(target))


class OmniglotDataModule(LabelledDataModule):
    """Omniglot episodes on the split of Vinyals et al., "Matching Networks for One Shot
    Learning" (NeurIPS 2016), in the lists Snell et al. published (:func:`vinyals_split`).

    Split: 1028 / 172 / 423 characters for training, validation and test; Vinyals et al. train
    on 1200 characters and test on the other 423, and the published lists hold 172 of the 1200
    out for validation. The test characters are 12 whole alphabets of ``images_evaluation`` and
    the last 4 characters of a thirteenth (Gurmukhi), so test alphabets are mostly unseen in training.

    Rotations by 90, 180 and 270 degrees make new classes in every split, as the lists name
    them (and as MAML's code does): 4112 / 688 / 1692 classes. ``train_rotations=False`` or
    ``eval_rotations=False`` keeps only the upright characters of that part.

    Images are inverted (strokes 255 on a 0 background, as in MAML's and learn2learn's
    preprocessing, so zero padding and the background agree), resized 105 -> ``image_size``
    with Lanczos antialiasing, and cached once as a uint8 tensor in
    ``{root}/omniglot-py/omniglot-{image_size}px.pt`` (:func:`load_omniglot`). Class names, in
    the printed class split and ``class_split.json``, are the lists' ``alphabet/characterNN/rotDDD``.

    Args:
        root: folder holding ``omniglot-py/`` (the layout of torchvision's ``Omniglot``, so both
            share one download): ``images_background/`` and ``images_evaluation/`` with
            ``alphabet/character/*.png``, or the two zip archives.
        download: fetch the official archives from the brendenlake/omniglot repository and
            check their MD5s (:func:`download_omniglot`).
        image_size: side of the square images (28 in the literature).
        train_rotations, eval_rotations: keep the rotated classes of training, and of
            validation and test.
        split: ``"vinyals"`` (the lists above; Matching and Prototypical Networks, and most
            later work) or ``"random"``: characters drawn at random irrespective of alphabet
            (:func:`random_character_split`), as MAML's and Reptile's code split Omniglot.
        split_sizes: with ``"random"``, characters for train, val and test (MAML's 1100 / 100 /
            423: 1200 for training, 100 of them held out for validation).
        split_seed: with ``"random"``, the seed of that draw (apart from ``seed``, the episodes').
        **kwargs: the episode arguments of :class:`~fewshot_lightning.data.LabelledDataModule`
            (``ways``, ``shots``, ``queries``, ``test_ways``, ..., ``meta_batch_size``, ``seed``, ...).
    """

    def __init__(
        self,
        root: PathLike = "data",
        download: bool = False,
        image_size: int = 28,
        train_rotations: bool = True,
        eval_rotations: bool = True,
        split: str = "vinyals",
        split_sizes: Sequence[int] = (1100, 100, 423),
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if split not in ("vinyals", "random"):
            raise ValueError(f"split must be 'vinyals' (the published lists) or 'random' (characters drawn at random, "
                             f"as MAML's and Reptile's code), got {split!r}.")
        self.split, self.split_sizes, self.split_seed = split, tuple(split_sizes), split_seed
        self.root = root
        self.download = download
        self.image_size = image_size
        self.train_rotations, self.eval_rotations = train_rotations, eval_rotations
        #: After ``setup``: the characters in cache order, ``"alphabet/characterNN"``.
        self.characters: Optional[List[str]] = None

    def prepare_data(self) -> None:
        # Once per node, before `setup` on every process: the download, the extraction and the
        # decoding into the cache happen once; `setup` then only reads the cache.
        if self.download:
            download_omniglot(self.root)
        decoded_characters(Path(self.root).expanduser() / FOLDER, self.image_size)

    def load_splits(self) -> Dict[str, LabelledData]:
        cache = decoded_characters(Path(self.root).expanduser() / FOLDER, self.image_size)
        self.characters = [character_key(name) for name in cache["characters"]]
        lists = (random_character_split(self.characters, self.split_sizes, self.split_seed)
                 if self.split == "random" else None)
        return split_characters(
            cache["images"], cache["labels"], self.characters, self.train_rotations, self.eval_rotations, lists
        )

    def class_name(self, label: int) -> str:
        return published_name(self.characters, label) if self.characters is not None else str(label)


def visible(paths: Iterable[Path], folder: Path) -> List[Path]:
    """``paths`` less the hidden ones (a name under ``folder`` starting with ``.``): the ``._*.png``
    files macOS writes beside every drawing on a disk of another format are not drawings."""
    return [path for path in paths if not any(part.startswith(".") for part in path.relative_to(folder).parts)]


def drawings_source(folder: Path) -> Optional[str]:
    """A hash of the path, size and modification time of every extracted drawing
    (``{set}/{alphabet}/{character}/*.png``), ``None`` if nothing is extracted (the archives
    alone): the cache is used only for the drawings it was decoded from. About a ``stat`` per
    drawing (32,460)."""
    digest, found = hashlib.sha256(), False
    for image_set in ARCHIVE_MD5:
        for drawing in sorted(visible((folder / image_set).glob("*/*/*.png"), folder)):
            stat = drawing.stat()
            digest.update(f"{drawing.relative_to(folder).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            found = True
    return digest.hexdigest() if found else None


def decode_characters(folder: Path, image_size: int) -> Dict[str, object]:
    """Read every ``{set}/{alphabet}/{character}/*.png`` under ``folder``, in sorted order."""
    images, labels, characters, failures = [], [], [], []
    for image_set in ARCHIVE_MD5:
        set_folder = folder / image_set
        character_folders = sorted(p for p in visible(set_folder.glob("*/*"), folder) if p.is_dir())
        if not character_folders:
            raise DataFileError(
                f"{set_folder} holds no alphabet/character folders: the extraction is incomplete. Delete it and "
                f"extract {image_set}.zip again (or pass download=True)."
            )
        for character in character_folders:
            drawings = sorted(visible(character.glob("*.png"), folder))
            if not drawings:
                raise DataFileError(f"{character} holds no .png drawings; delete {set_folder} and extract it again.")
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
        raise DataFileError(
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
