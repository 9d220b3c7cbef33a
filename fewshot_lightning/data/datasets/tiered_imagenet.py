"""tiered-ImageNet (Ren et al., ICLR 2018): 608 ImageNet classes grouped by 34 high-level
categories, the categories split 20/6/8 so that train, val and test are semantically apart."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..datamodule import SPLITS, LabelledDataModule
from ..episodes import LabelledData
from ._storage import (
    DataFileError, PathLike, atomic_write, check_class_counts, check_disjoint, describe_failures, ensure_writable, file_stamp,
    load_pickle, missing, record_file_checksum, record_source, recorded_source, relabel_splits,
    verify_file_checksum,
)

PUBLISHED_CLASSES = {"train": 351, "val": 97, "test": 160}
FOLDER = "tiered-imagenet"
IMAGE_SIZE = 84
HOW_TO_GET = (
    "tiered-ImageNet has no official, stable download. Build the files with Ren et al.'s script "
    "(https://github.com/renmengye/few-shot-ssl-public, tiered_imagenet.py) or fetch the copies learn2learn "
    "uses (https://zenodo.org/record/7978538, named tiered-imagenet-{split}_images_png.pkl and "
    "tiered-imagenet-{split}_labels.pkl: drop the 'tiered-imagenet-' prefix), for split in train, val, test."
)


def load_tiered_imagenet(root: PathLike = "data") -> Dict[str, LabelledData]:
    """tiered-ImageNet's 351/97/160 classes (see :class:`TieredImageNetDataModule`): memory-mapped
    uint8 images ``[N, 3, 84, 84]``, class ids unique across splits (train, then val, then test).

    Reads ``{root}/tiered-imagenet/``; the first call decodes each split's PNGs into a ``.npy``
    file beside them (several minutes), later calls map it. Missing files raise a
    ``FileNotFoundError`` that says where to get them.
    """
    folder = Path(root).expanduser() / FOLDER
    loaded = {split: read_split(folder, split) for split in SPLITS}
    named = {split: names for split, (_, _, names) in loaded.items() if names}
    if len(named) == len(SPLITS):
        check_disjoint(folder, named)
    check_class_counts(
        "tiered-ImageNet", folder,
        {split: len(torch.unique(labels)) for split, (_, labels, _) in loaded.items()}, PUBLISHED_CLASSES,
    )
    return relabel_splits([(split, images, labels) for split, (images, labels, _) in loaded.items()])


def read_split(folder: Path, split: str) -> Tuple[Tensor, Tensor, List[str]]:
    """``(memory-mapped uint8 [N, 3, 84, 84], int64 labels [N], class names)`` of one split,
    decoding its PNGs into the memory map first if it is missing or damaged.

    The map's SHA-256 is recorded beside it when it is built (``.npy.sha256``) and checked by
    :func:`verify_file_checksum`: in full when the file's size or modification time changed
    since it was last hashed, otherwise by one ``stat``: hashing the 16.5 GB of the three maps
    takes about 20 s from the page cache at 1 GB/s, minutes from a cold disk, and would be paid
    at every start of every process. A damaged map is rebuilt with a warning when the PNG
    pickle is there, and refused with an error saying what to restore when it is not.
    """
    images_path, labels_path = folder / f"{split}_images_png.pkl", folder / f"{split}_labels.pkl"
    cache_path = folder / f"{split}_images_{IMAGE_SIZE}px.npy"
    if not labels_path.is_file():
        raise missing(folder, f"{labels_path.name} and {images_path.name}", HOW_TO_GET)
    if cache_path.is_file():
        problem = verify_file_checksum(cache_path)
        if problem is not None and not images_path.is_file():
            raise DataFileError(
                f"{cache_path} is damaged ({problem}) and {images_path.name}, which it is decoded from, is not in "
                f"{folder}. Put {images_path.name} back (the map is then rebuilt from it). {HOW_TO_GET}"
            )
        elif problem is not None:
            warnings.warn(f"{cache_path} is damaged ({problem}); rebuilding it from {images_path.name}.", stacklevel=3)
            cache_path.unlink()
        elif images_path.is_file():
            # A sound map of another PNG pickle (a replaced or re-downloaded release whose images
            # come in another order) put every image under another one's label.
            built_from = recorded_source(cache_path)
            if built_from is None:
                record_source(cache_path, file_stamp(images_path))  # an older record: adopted
            elif built_from != file_stamp(images_path):
                warnings.warn(
                    f"{cache_path} was decoded from another {images_path.name} (size or modification time "
                    f"differs: {built_from.get('size')} bytes then, {images_path.stat().st_size} now); rebuilding it.",
                    stacklevel=3)
                cache_path.unlink()
    if not cache_path.is_file():
        if not images_path.is_file():
            raise missing(folder, f"{images_path.name} (PNG-encoded images)", HOW_TO_GET)
        ensure_writable(folder, cache_path.name)  # before reading gigabytes of PNGs and decoding them
        encoded = load_pickle(images_path, "a list of PNG-encoded images", HOW_TO_GET)
        atomic_write(cache_path, lambda path: decode_pngs(encoded, images_path, path))
        record_file_checksum(cache_path, source=file_stamp(images_path))
    labels, names = read_labels(labels_path)
    # Copy-on-write mapping: a writable array for torch.from_numpy that never writes to the file.
    images = np.load(cache_path, mmap_mode="c")
    if images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        if images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and images_path.is_file() \
                and recorded_source(cache_path) == file_stamp(images_path):
            # The map is the images pickle's, decoded and verified: the two source files disagree.
            raise DataFileError(
                f"{images_path.name} holds {len(images)} images but {labels_path.name} {len(labels)} labels: the two "
                f"files in {folder} do not belong together (another release, or one cut short). Fetch both again; "
                f"{cache_path.name} is then rebuilt. {HOW_TO_GET}")
        raise DataFileError(
            f"{cache_path} holds images of shape {images.shape} but {labels_path.name} has {len(labels)} labels: "
            f"the cache is stale or damaged. Delete it; it is rebuilt from {images_path.name}."
        )
    return torch.from_numpy(images), labels, names


class TieredImageNetDataModule(LabelledDataModule):
    """tiered-ImageNet episodes: 351/97/160 classes (448,695 / 124,261 / 206,209 images) of
    84x84 RGB, as published by Ren et al., "Meta-Learning for Semi-Supervised Few-Shot
    Classification" (ICLR 2018).

    Reads the release's layout from ``{root}/tiered-imagenet/`` (:func:`load_tiered_imagenet`):
    ``{split}_images_png.pkl`` (a list of PNG-encoded images) and ``{split}_labels.pkl`` (a
    dict whose ``label_specific`` gives each image's class; ``label_specific_str``, when
    present, the class names).

    The PNGs are decoded **once** into a uint8 ``[N, 3, 84, 84]`` ``.npy`` file per split
    (``{split}_images_84px.npy``, about 16.5 GB for the three) that is then memory-mapped,
    rather than decoded lazily per sample. Lazily, every 5-way 1-shot 15-query task would
    cost 80 PNG decodes, and each DataLoader worker would keep the multi-gigabyte list of
    PNG byte strings alive (Python's reference counts touch every object, so fork's
    copy-on-write ends up copying it). Mapped, a task is a slice read, workers share the OS
    page cache, and the label pickle alone gives the labels without touching the images. The
    price is a one-off decoding pass of several minutes and the disk space.

    Args:
        root: folder holding ``tiered-imagenet/``.
        meta_batch_size: tasks per step (4, as for mini-ImageNet).
        **kwargs: the episode arguments of :class:`~fewshot_lightning.data.LabelledDataModule`
            (``ways``, ``shots``, ``queries``, ``test_ways``, ..., ``num_workers``, ``seed``, ...).
    """

    def __init__(self, root: PathLike = "data", meta_batch_size: int = 4, **kwargs: Any) -> None:
        super().__init__(meta_batch_size=meta_batch_size, **kwargs)
        self.root = root

    def prepare_data(self) -> None:
        # Once per node, before `setup` on every process: the decoding pass (and its 16.5 GB of
        # output) happens once, not once per rank; `setup` then only maps the files.
        self.load_splits()

    def load_splits(self) -> Dict[str, LabelledData]:
        return load_tiered_imagenet(self.root)


def read_labels(path: Path) -> Tuple[Tensor, List[str]]:
    """``label_specific`` as a tensor, and the names of its classes (``label_specific_str``) if given."""
    content = load_pickle(path, "a dict with 'label_specific'", HOW_TO_GET)
    if not isinstance(content, dict) or "label_specific" not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataFileError(f"{path} holds {keys}, not a dict with 'label_specific'. {HOW_TO_GET}")
    labels = torch.as_tensor(np.asarray(content["label_specific"], dtype=np.int64))
    names = [str(name) for name in content.get("label_specific_str", [])]
    return labels, names


def decode_pngs(encoded: List[Any], source: Path, destination: Path) -> None:
    """Decode every PNG of ``encoded`` into a uint8 ``[N, 3, 84, 84]`` ``.npy`` at ``destination``.

    Every image is tried, and the unreadable ones are listed together in one error (none is
    skipped: the benchmark would change, and the labels file counts every image).
    """
    images = np.lib.format.open_memmap(
        destination, mode="w+", dtype=np.uint8, shape=(len(encoded), 3, IMAGE_SIZE, IMAGE_SIZE)
    )
    failures = []
    for i, item in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(png_bytes(item))) as image:
                image = image.convert("RGB")
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
                images[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for a bad file
            failures.append((f"image {i}", error))
    images.flush()
    del images
    if failures:
        raise DataFileError(
            f"{len(failures)} of the {len(encoded)} images in {source} are not readable PNGs: "
            f"{describe_failures(failures)}. None is skipped (the benchmark would change): the file is corrupt. "
            f"{HOW_TO_GET}"
        )


def png_bytes(item: Any) -> bytes:
    """The bytes of one encoded image: releases hold ``numpy`` arrays (``cv2.imencode``), bytes,
    or, from Python 2 pickles read as ``latin1``, strings."""
    if isinstance(item, str):
        return item.encode("latin1")
    if isinstance(item, np.ndarray):
        return item.tobytes()
    return bytes(item)
