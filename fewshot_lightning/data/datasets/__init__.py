"""Benchmark DataModules with their published class splits, one file per benchmark family."""
from .cifar_fs import CIFAR_FS_CLASSES, FC100_SUPERCLASSES, CIFARFSDataModule, FC100DataModule
from .mini_imagenet import MiniImageNetDataModule
from .omniglot import OmniglotDataModule, vinyals_split
from .tiered_imagenet import TieredImageNetDataModule

__all__ = [
    "CIFAR_FS_CLASSES",
    "CIFARFSDataModule",
    "FC100DataModule",
    "FC100_SUPERCLASSES",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "TieredImageNetDataModule",
    "vinyals_split",
]
