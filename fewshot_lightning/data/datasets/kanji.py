"""Kanji: an offline Omniglot-like benchmark of 6,413 classes, drawn from KanjiVG's stroke paths.

How it is made. The ``kanjivg`` package on PyPI (version 20260714) installs the SVG files of
KanjiVG (Apel, https://kanjivg.tagaini.net): one file per character, each stroke a path of
cubic Bézier curves in writing order. The benchmark uses every base-form file (``4e00.svg``,
not the ``-Kaisho``, ``-Jinmei``, ``-HzFst``... variant forms) of the CJK Unified Ideographs
block (U+4E00-U+9FFF): 6,413 kanji of 1 to 30 strokes, 79,040 strokes in all, every path of
which parses (:mod:`.svg_path`). The kana, Latin, radical and compatibility-block files of
the package are left out, so every class is a kanji.

Each character is drawn 20 times by seeded random "hands" (:mod:`.kanji_render`: a smooth
warp and a random affine map of the whole character, strokes moved, bent, cut short or drawn
on, varying pen width, anti-aliased), 28x28, 1 channel, uint8, like Omniglot's 20 drawers per character (Lake
et al., Science 2015). The images are the same bytes on every machine; the full set, 128,260
images, renders once (about 35 s of CPU time on one core) into a cache under ``root``, which
records the SHA-256 of the SVG files it came from.

Split. A seeded shuffle of the characters gives 4,000 training, 1,000 validation and 1,413
test classes: close to mini-ImageNet's 64/16/20 class proportions (Ravi & Larochelle, ICLR
2017) in round numbers, with every character used. Test episodes draw from 1,413 classes
(Omniglot's split of Vinyals et al., NeurIPS 2016, tests on 423). The split is by character,
not by component: test kanji share radicals with training kanji, as Omniglot's
character-level split shares alphabets.

License. KanjiVG is © Ulrich Apel, CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/); the rendered images are an adaptation of
it and carry the same license: attribute KanjiVG and share adaptations alike. The ``kanjivg``
package holds only those data files; this module reads them, it imports no code from it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import re
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..datamodule import SPLITS, LabelledDataModule, subset_by_classes
from ..episodes import LabelledData
from ._storage import DataFileError, load_cache, save_atomic
from .kanji_render import render_character
from .svg_path import parse_path

#: The KanjiVG release the benchmark is drawn from; another release has other strokes (and
#: characters), so it would be another benchmark.
KANJIVG_VERSION = "20260714"
#: Bumped whenever rendering changes, so an old cache is never mistaken for a new one.
FORMAT_VERSION = 2
#: Base-form CJK Unified Ideographs in KanjiVG 20260714.
NUM_CHARACTERS = 6413
#: Train, validation and test characters of the full set (see the module docstring).
SPLIT_SIZES = (4000, 1000, 1413)

# A base-form file is named by its code point alone (5 hex digits); variants add "-<form>".
_BASE_FORM = re.compile(r"([0-9a-f]{5})\.svg")
_CJK_UNIFIED_IDEOGRAPHS = (0x4E00, 0x9FFF)
_SVG = "{http://www.w3.org/2000/svg}"


class KanjiImages(NamedTuple):
    """Rendered instances: ``images`` ``[C * I, 1, S, S]`` uint8, ``labels`` ``[C * I]`` int64
    (instance ``j`` of character ``k`` is row ``k * I + j``, label ``k``), and ``characters``, the
    ``C`` characters in code-point order (label ``k`` is ``characters[k]``)."""

    images: Tensor
    labels: Tensor
    characters: str


def kanjivg_files() -> List[Path]:
    """The base-form SVG files of the CJK Unified Ideographs in the installed ``kanjivg``
    package, in code-point order (the package installs them as ``site-packages/kanji/*.svg``)."""
    install = f"pip install 'kanjivg=={KANJIVG_VERSION}'"
    try:
        distribution = importlib.metadata.distribution("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"The Kanji benchmark is drawn from the SVG files of the kanjivg package, which is not installed: {install}."
        ) from None
    if distribution.version != KANJIVG_VERSION:
        raise DataFileError(
            f"kanjivg {distribution.version} is installed; the Kanji benchmark is defined on KanjiVG {KANJIVG_VERSION} "
            f"(another release has other strokes, so other images and results): {install}."
        )
    folder = Path(distribution.locate_file("kanji"))
    if not folder.is_dir():
        raise FileNotFoundError(f"kanjivg {KANJIVG_VERSION} is installed but {folder} is missing: reinstall it ({install}).")
    files = []
    for path in folder.iterdir():
        match = _BASE_FORM.fullmatch(path.name)
        if match and _CJK_UNIFIED_IDEOGRAPHS[0] <= int(match.group(1), 16) <= _CJK_UNIFIED_IDEOGRAPHS[1]:
            files.append(path)
    if len(files) != NUM_CHARACTERS:
        raise DataFileError(
            f"{folder} holds {len(files)} base-form kanji files, KanjiVG {KANJIVG_VERSION} has {NUM_CHARACTERS}: "
            f"the installation is damaged; reinstall it ({install})."
        )
    return sorted(files, key=lambda path: path.name)


def character_of(path: Path) -> str:
    """The character a KanjiVG file draws (its name is the code point in hex)."""
    return chr(int(path.stem, 16))


def read_strokes(path: Path) -> List[np.ndarray]:
    """The strokes of one KanjiVG file in writing order, each ``[n, 4, 2]`` cubic Bézier
    segments on the 109-unit canvas (the paths of its ``kvg:StrokePaths`` group)."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise DataFileError(f"{path} is not valid SVG ({error}): reinstall kanjivg=={KANJIVG_VERSION}.") from error
    groups = [g for g in root.iter(f"{_SVG}g") if g.get("id", "").startswith("kvg:StrokePaths_")]
    paths = [p for g in groups for p in g.iter(f"{_SVG}path")]
    if len(groups) != 1 or not paths:
        raise DataFileError(f"{path} has no kvg:StrokePaths group of stroke paths: reinstall kanjivg=={KANJIVG_VERSION}.")
    strokes = []
    for element in paths:
        try:
            subpaths = parse_path(element.get("d", ""))
        except ValueError as error:
            raise DataFileError(f"{path}: stroke {element.get('id')}: {error}") from error
        if len(subpaths) != 1:
            raise DataFileError(f"{path}: stroke {element.get('id')} has {len(subpaths)} subpaths, a stroke is one.")
        strokes.append(subpaths[0])
    return strokes


def source_sha256(files: Sequence[Path]) -> str:
    """SHA-256 over the names and bytes of ``files``, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def select_characters(total: int, num_characters: Optional[int]) -> np.ndarray:
    """Indices of ``num_characters`` characters spread evenly over code-point order (all if None).

    Code-point order follows radical and stroke count, so an even spread gives a small
    subset the variety of the full set, where the first ``n`` would all share a radical.
    """
    if num_characters is None:
        return np.arange(total)
    if not 2 <= num_characters <= total:
        raise ValueError(f"num_characters must be between 2 and {total} (or None for all), got {num_characters}.")
    return np.linspace(0, total - 1, num_characters).round().astype(np.int64)


def kanji_characters(num_characters: Optional[int] = None) -> str:
    """The characters of a build in label order (label ``k`` is character ``k``): all 6,413 in
    code-point order, or the even spread of :func:`select_characters`."""
    files = kanjivg_files()
    return "".join(character_of(files[i]) for i in select_characters(len(files), num_characters))


def _check_sizes(image_size: int, instances: int) -> None:
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1 pixel, got {image_size}.")
    if instances < 1:
        raise ValueError(f"instances must be at least 1, got {instances}.")


def render_kanji(
    image_size: int = 28, instances: int = 20, seed: int = 0, num_characters: Optional[int] = None
) -> Tuple[KanjiImages, str]:
    """Render the benchmark (no cache): the images and the SHA-256 of the SVG files used."""
    _check_sizes(image_size, instances)
    files = kanjivg_files()
    chosen = [files[i] for i in select_characters(len(files), num_characters)]
    images = np.empty((len(chosen) * instances, 1, image_size, image_size), dtype=np.uint8)
    for row, path in enumerate(chosen):
        images[row * instances : (row + 1) * instances, 0] = render_character(
            read_strokes(path), ord(character_of(path)), instances, image_size, seed
        )
    labels = torch.arange(len(chosen)).repeat_interleave(instances)
    characters = "".join(character_of(path) for path in chosen)
    return KanjiImages(torch.from_numpy(images), labels, characters), source_sha256(chosen)


def cache_path(
    root: Union[str, Path], image_size: int = 28, instances: int = 20, seed: int = 0, num_characters: Optional[int] = None
) -> Path:
    """Where :func:`kanji_images` keeps a build: ``<root>/kanji/kanji_<S>px_<I>inst_seed<seed>[_<n>chars]_v<version>.pt``."""
    subset = "" if num_characters is None else f"_{num_characters}chars"
    return Path(root) / "kanji" / f"kanji_{image_size}px_{instances}inst_seed{seed}{subset}_v{FORMAT_VERSION}.pt"


def kanji_images(
    root: Union[str, Path], image_size: int = 28, instances: int = 20, seed: int = 0, num_characters: Optional[int] = None
) -> KanjiImages:
    """The rendered benchmark, from its cache under ``root`` or rendered (once) and cached there.

    A cache that is unreadable, from another format version or from different SVG files is
    rebuilt with a warning naming the file.
    """
    _check_sizes(image_size, instances)
    path = cache_path(root, image_size, instances, seed, num_characters)
    files = kanjivg_files()
    chosen = [files[i] for i in select_characters(len(files), num_characters)]
    wanted = {"version": FORMAT_VERSION, "image_size": image_size, "instances": instances, "seed": seed,
              "source_sha256": source_sha256(chosen), "characters": "".join(character_of(p) for p in chosen)}
    rows = len(chosen) * instances

    def problem(payload: Dict) -> Optional[str]:
        for key, value in wanted.items():
            if payload.get(key) != value:
                return f"{key} differs"
        images, labels = payload.get("images"), payload.get("labels")
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.shape != (rows, 1, image_size, image_size):
            return "images have the wrong type or shape"
        if not isinstance(labels, Tensor) or labels.shape != (rows,):
            return "labels have the wrong shape"
        return None

    payload = load_cache(path, problem)
    if payload is not None:
        return KanjiImages(payload["images"], payload["labels"], payload["characters"])

    rank_zero_info(f"Rendering {len(chosen):,} kanji x {instances} instances into {path} (once).")
    started = time.perf_counter()
    kanji, _ = render_kanji(image_size, instances, seed, num_characters)
    save_atomic({**wanted, "images": kanji.images, "labels": kanji.labels}, path)
    rank_zero_info(f"Rendered the Kanji benchmark in {time.perf_counter() - started:.1f} s.")
    return kanji


def split_characters(num_classes: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Class indices of train/val/test: :data:`SPLIT_SIZES` for the full set, the same
    proportions (rounded) for a subset, from a seeded shuffle.

    The shuffle sorts uniform keys rather than calling a permutation routine, so it stays the
    same across numpy versions.
    """
    full_train, full_val, _ = SPLIT_SIZES
    num_train = round(num_classes * full_train / NUM_CHARACTERS)
    num_val = round(num_classes * full_val / NUM_CHARACTERS)
    keys = np.random.default_rng([seed]).random(num_classes)
    order = np.argsort(keys, kind="stable")
    parts = (order[:num_train], order[num_train : num_train + num_val], order[num_train + num_val :])
    return {split: np.sort(part) for split, part in zip(SPLITS, parts)}


def load_kanji(
    root: Union[str, Path],
    image_size: int = 28,
    instances: int = 20,
    render_seed: int = 0,
    split_seed: int = 0,
    num_characters: Optional[int] = None,
) -> Dict[str, LabelledData]:
    """The Kanji benchmark split by character: ``{"train", "val", "test"}`` ->
    :class:`LabelledData` of ``[n, 1, S, S]`` uint8 images and their character labels (the
    index into the characters in code-point order, so the splits' labels are disjoint).

    Renders into the cache under ``root`` on first use (:func:`kanji_images`); no Lightning needed::

        from fewshot_lightning.data.datasets import load_kanji
        splits = load_kanji("data")
        images, labels = splits["train"]  # [80000, 1, 28, 28] uint8, 4,000 characters
    """
    kanji = kanji_images(root, image_size, instances, render_seed, num_characters)
    parts = split_characters(len(kanji.characters), split_seed)
    return {
        split: subset_by_classes(kanji.images, kanji.labels, torch.from_numpy(classes))
        for split, classes in parts.items()
    }


class KanjiDataModule(LabelledDataModule):
    """Few-shot episodes over the Kanji benchmark: 6,413 classes of 20 handwritten-style instances each.

    See the module docstring for how the images are made, the split and the license. The
    images are rendered once (about 35 s) into ``<root>/kanji/`` and loaded from there after.

    Args:
        root: folder for the cache file (created if missing).
        image_size: side of the square images in pixels (28, like Omniglot in the literature).
        instances: renderings ("drawers") per character.
        render_seed: seed of the renderings; a different seed is a different set of images.
        split_seed: seed of the class split (kept apart from ``seed`` so that rerunning with a
            new episode seed tests on the same characters).
        num_characters: render only this many characters, spread evenly over the set, and
            split them in the full set's proportions (for quick tests); ``None`` for all.
        **kwargs: the episode arguments of :class:`~fewshot_lightning.data.LabelledDataModule`
            (``ways``, ``shots``, ``queries``, ``test_ways``, ..., ``meta_batch_size``, ``seed``, ...).

    Example::

        from fewshot_lightning.data.datasets import KanjiDataModule
        data = KanjiDataModule(root="data", ways=5, shots=1, queries=15)
        data.prepare_data()
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))  # TaskBatch, support_x [32, 5, 1, 28, 28]
    """

    def __init__(
        self,
        root: str = "data",
        image_size: int = 28,
        instances: int = 20,
        render_seed: int = 0,
        split_seed: int = 0,
        num_characters: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_sizes(image_size, instances)
        select_characters(NUM_CHARACTERS, num_characters)  # fail now, not after the first epoch starts
        self.root = root
        self.image_size = image_size
        self.instances = instances
        self.render_seed = render_seed
        self.split_seed = split_seed
        self.num_characters = num_characters
        #: After ``setup``: the characters in label order (label ``k`` is ``characters[k]``).
        self.characters: Optional[str] = None

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the render happens once, not per rank.
        kanji_images(self.root, self.image_size, self.instances, self.render_seed, self.num_characters)

    def load_splits(self) -> Dict[str, LabelledData]:
        self.characters = kanji_characters(self.num_characters)
        return load_kanji(self.root, self.image_size, self.instances, self.render_seed, self.split_seed, self.num_characters)

    def class_name(self, label: int) -> str:
        return self.characters[label]

    def more_classes_advice(self, splits: List[str]) -> str:
        counts = "/".join(str(len(names)) for names in (self.class_split or {}).values())
        chosen = f"now {self.num_characters}" if self.num_characters is not None else "now all"
        return (f"raise num_characters (--data.init_args.num_characters, {chosen}; the split gave train/val/test "
                f"{counts} classes) or leave it unset for all {NUM_CHARACTERS:,}")

    def more_samples_advice(self, needed: int) -> str:
        return (f"raise instances (--data.init_args.instances, now {self.instances}: the images rendered per "
                f"character) to at least {needed}")
