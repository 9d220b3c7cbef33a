"""Benchmark and user-data DataModules, one file per dataset family.

Each dataset has a loader, ``load_<name>(root, ...) -> {"train", "val", "test"} ->
LabelledData``, and a ``download_<name>(root)`` where there is a download; both work
without Lightning. Its DataModule is a thin shell over them (see docs/adding-a-dataset.md).
"""
from .cifar_fs import (
    CIFAR_FS_CLASSES, FC100_SUPERCLASSES, CIFARFSDataModule, FC100DataModule, download_cifar100, load_cifar_fs,
    load_fc100,
)
from .folder import ImageFolderDataModule, load_image_folder, read_image_folder
from .kanji import KanjiDataModule, load_kanji, render_kanji, split_characters
from .mini_imagenet import MiniImageNetDataModule, load_mini_imagenet
from .omniglot import OmniglotDataModule, download_omniglot, load_omniglot, vinyals_split
from .tiered_imagenet import TieredImageNetDataModule, load_tiered_imagenet

__all__ = [
    "CIFAR_FS_CLASSES",
    "CIFARFSDataModule",
    "FC100DataModule",
    "FC100_SUPERCLASSES",
    "ImageFolderDataModule",
    "KanjiDataModule",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "TieredImageNetDataModule",
    "download_cifar100",
    "download_omniglot",
    "load_cifar_fs",
    "load_fc100",
    "load_image_folder",
    "load_kanji",
    "load_mini_imagenet",
    "load_omniglot",
    "load_tiered_imagenet",
    "read_image_folder",
    "render_kanji",
    "split_characters",
    "vinyals_split",
]
