"""Benchmark and user-data DataModules, one file per dataset."""
from .kanji import KanjiDataModule, load_kanji, render_kanji, split_characters

__all__ = ["KanjiDataModule", "load_kanji", "render_kanji", "split_characters"]
