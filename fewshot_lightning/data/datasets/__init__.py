"""Benchmark and user-data DataModules, one file per dataset."""
from .folder import ImageFolderDataModule
from .kanji import KanjiDataModule, load_kanji, render_kanji, split_characters

__all__ = ["ImageFolderDataModule", "KanjiDataModule", "load_kanji", "render_kanji", "split_characters"]
