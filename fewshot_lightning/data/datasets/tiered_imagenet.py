"""tiered-ImageNet (Ren et al., ICLR 2018): 608 ImageNet classes grouped by 34 high-level
categories, the categories split 20/6/8 so that train, val and test are semantically apart."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..datamodule import SPLITS, EpisodicDataModule
from ..episodes import LabelledData, Transform
from ._storage import (
    PathLike, atomic_write, check_class_counts, check_disjoint, load_pickle, missing, relabel_splits,
)

PUBLISHED_CLASSES = {"train": 351, "val": 97, "test": 160}
IMAGE_SIZE = 84
HOW_TO_GET = (
    "tiered-ImageNet has no official, stable download. Build the files with Ren et al.'s script "
    "(https://github.com/renmengye/few-shot-ssl-public, tiered_imagenet.py) or fetch the copies learn2learn "
    "uses (https://zenodo.org/record/7978538, named tiered-imagenet-{split}_images_png.pkl and "
    "tiered-imagenet-{split}_labels.pkl: drop the 'tiered-imagenet-' prefix), for split in train, val, test."
)


class TieredImageNetDataModule(EpisodicDataModule):
    """tiered-ImageNet episodes: 351/97/160 classes (448,695 / 124,261 / 206,209 images) of
    84x84 RGB, as published by Ren et al., "Meta-Learning for Semi-Supervised Few-Shot
    Classification" (ICLR 2018).

    Reads the release's layout from ``{root}/tiered-imagenet/``: ``{split}_images_png.pkl``
    (a list of PNG-encoded images) and ``{split}_labels.pkl`` (a dict whose ``label_specific``
    gives each image's class; ``label_specific_str``, when present, the class names).

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
        ways, shots, queries, test_ways, test_shots, test_queries, train_transform,
        meta_batch_size, train_tasks, val_tasks, test_tasks, num_workers, seed: as in
            :class:`~fewshot_lightning.data.EpisodicDataModule`.
    """

    folder_name = "tiered-imagenet"

    def __init__(
        self,
        root: PathLike = "data",
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        test_ways: Optional[int] = None,
        test_shots: Optional[int] = None,
        test_queries: Optional[int] = None,
        train_transform: Optional[Transform] = None,
        meta_batch_size: int = 4,
        train_tasks: int = 32_000,
        val_tasks: int = 200,
        test_tasks: int = 600,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(
            ways=ways, shots=shots, queries=queries, test_ways=test_ways, test_shots=test_shots,
            test_queries=test_queries, train_transform=train_transform, meta_batch_size=meta_batch_size,
            train_tasks=train_tasks, val_tasks=val_tasks, test_tasks=test_tasks, num_workers=num_workers, seed=seed,
        )
        self.folder = Path(root).expanduser() / self.folder_name

    def images_path(self, split: str) -> Path:
        return self.folder / f"{split}_images_png.pkl"

    def labels_path(self, split: str) -> Path:
        return self.folder / f"{split}_labels.pkl"

    def cache_path(self, split: str) -> Path:
        return self.folder / f"{split}_images_{IMAGE_SIZE}px.npy"

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, so the decoding pass happens once.
        for split in SPLITS:
            labels_path = self.labels_path(split)
            if not labels_path.is_file():
                raise missing(self.folder, f"{labels_path.name} and {self.images_path(split).name}", HOW_TO_GET)
            if self.cache_path(split).is_file():
                continue
            if not self.images_path(split).is_file():
                raise missing(self.folder, f"{self.images_path(split).name} (PNG-encoded images)", HOW_TO_GET)
            encoded = load_pickle(self.images_path(split), "a list of PNG-encoded images", HOW_TO_GET)
            atomic_write(self.cache_path(split), lambda path: decode_pngs(encoded, self.images_path(split), path))

    def load_split(self, split: str) -> Tuple[Tensor, Tensor, List[str]]:
        """``(memory-mapped uint8 [N, 3, 84, 84], int64 labels [N], class names)`` of one split."""
        labels, names = read_labels(self.labels_path(split))
        # Copy-on-write mapping: a writable array for torch.from_numpy that never writes to the file.
        images = np.load(self.cache_path(split), mmap_mode="c")
        if images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
            raise RuntimeError(
                f"{self.cache_path(split)} holds images of shape {images.shape} but {self.labels_path(split).name} "
                f"has {len(labels)} labels: the cache is stale or damaged. Delete it; it is rebuilt from "
                f"{self.images_path(split).name}."
            )
        return torch.from_numpy(images), labels, names

    def load_splits(self) -> Dict[str, LabelledData]:
        self.prepare_data()
        loaded = {split: self.load_split(split) for split in SPLITS}
        named = {split: names for split, (_, _, names) in loaded.items() if names}
        if len(named) == len(SPLITS):
            check_disjoint(self.folder, named)
        check_class_counts(
            "tiered-ImageNet", self.folder,
            {split: len(torch.unique(labels)) for split, (_, labels, _) in loaded.items()}, PUBLISHED_CLASSES,
        )
        return relabel_splits([(split, images, labels) for split, (images, labels, _) in loaded.items()])


def read_labels(path: Path) -> Tuple[Tensor, List[str]]:
    """``label_specific`` as a tensor, and the names of its classes (``label_specific_str``) if given."""
    content = load_pickle(path, "a dict with 'label_specific'", HOW_TO_GET)
    if not isinstance(content, dict) or "label_specific" not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise RuntimeError(f"{path} holds {keys}, not a dict with 'label_specific'. {HOW_TO_GET}")
    labels = torch.as_tensor(np.asarray(content["label_specific"], dtype=np.int64))
    names = [str(name) for name in content.get("label_specific_str", [])]
    return labels, names


def decode_pngs(encoded: List[Any], source: Path, destination: Path) -> None:
    """Decode every PNG of ``encoded`` into a uint8 ``[N, 3, 84, 84]`` ``.npy`` at ``destination``."""
    images = np.lib.format.open_memmap(
        destination, mode="w+", dtype=np.uint8, shape=(len(encoded), 3, IMAGE_SIZE, IMAGE_SIZE)
    )
    for i, item in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(png_bytes(item))) as image:
                image = image.convert("RGB")
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
                images[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        except Exception as error:
            raise RuntimeError(
                f"Image {i} of {source} is not a readable PNG ({type(error).__name__}: {error}); the file is "
                f"corrupt. {HOW_TO_GET}"
            ) from error
    images.flush()
    del images


def png_bytes(item: Any) -> bytes:
    """The bytes of one encoded image: releases hold ``numpy`` arrays (``cv2.imencode``), bytes,
    or, from Python 2 pickles read as ``latin1``, strings."""
    if isinstance(item, str):
        return item.encode("latin1")
    if isinstance(item, np.ndarray):
        return item.tobytes()
    return bytes(item)
