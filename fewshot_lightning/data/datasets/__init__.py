"""Benchmark and user-data DataModules, one file per dataset family."""
from .cifar_fs import CIFAR_FS_CLASSES, FC100_SUPERCLASSES, CIFARFSDataModule, FC100DataModule
from .folder import ImageFolderDataModule
from .kanji import KanjiDataModule, load_kanji, render_kanji, split_characters
from .mini_imagenet import MiniImageNetDataModule
from .omniglot import OmniglotDataModule, vinyals_split
from .tiered_imagenet import TieredImageNetDataModule

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
    "load_kanji",
    "render_kanji",
    "split_characters",
    "vinyals_split",
]
