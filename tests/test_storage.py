"""Cache files (datasets/_storage.py): a checksum of the content, verified on load, so bytes
changed on disk are rebuilt rather than trained on; and file modes like any dataset file's."""
import importlib.metadata
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_lightning.data.datasets import kanji as kanji_module
from fewshot_lightning.data.datasets import read_image_folder
from fewshot_lightning.data.datasets._storage import CHECKSUM_KEY, load_cache, save_atomic
from test_folder import write_folder


def overwrite_middle(path: Path, size: int, seed: int = 0) -> None:
    """Write ``size`` random bytes into the middle of ``path``, as a failing disk or a bad copy would."""
    noise = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2 - size // 2)
        handle.write(noise)


def never_a_problem(payload):
    return None


def test_a_cache_with_random_bytes_in_its_middle_is_refused(tmp_path):
    path = tmp_path / "cache.pt"
    images = torch.arange(4 * 2**20, dtype=torch.int64).to(torch.uint8)  # 4 MiB: the middle is tensor bytes
    save_atomic({"images": images, "name": "test"}, path)
    loaded = load_cache(path, never_a_problem)
    # The reader gets back what was saved, without the checksum entry.
    assert set(loaded) == {"images", "name"} and torch.equal(loaded["images"], images)

    overwrite_middle(path, 2**20)
    # torch.load alone does not notice: it returns a tensor with about a mebibyte of wrong bytes
    # (255/256 of 2^20 random bytes differ from what they replace).
    damaged = torch.load(path, weights_only=True)["images"]
    assert 1_040_000 < int((damaged != images).sum()) <= 2**20
    with pytest.warns(UserWarning, match=r"cache.pt is damaged: its content no longer has the SHA-256 recorded"):
        assert load_cache(path, never_a_problem) is None


def test_a_cache_without_a_checksum_is_rebuilt(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"images": torch.zeros(3)}, path)  # as caches were written before checksums
    with pytest.warns(UserWarning, match="has no checksum .it was written by an older version.; rebuilding it"):
        assert load_cache(path, never_a_problem) is None
    with pytest.raises(ValueError, match="'content_sha256' is reserved"):
        save_atomic({CHECKSUM_KEY: "mine"}, path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_fresh_cache_has_the_mode_of_an_ordinary_file(tmp_path, umask, mode):
    # mkstemp's 0600 would hide a shared dataset's cache from the group; an ordinary file is
    # created 0666 less the umask, and so is ours.
    previous = os.umask(umask)
    try:
        save_atomic({"images": torch.zeros(2)}, tmp_path / "cache.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "cache.pt").stat().st_mode & 0o777 == mode


def test_a_damaged_image_folder_cache_is_rebuilt_with_the_right_pixels(tmp_path):
    root = write_folder(tmp_path / "images")
    first = read_image_folder(str(root), image_size=64, channels=3)  # 40 x 3 x 64 x 64: 480 KiB
    (cache,) = (root / ".fewshot_cache").glob("*.pt")
    overwrite_middle(cache, 64 * 1024)
    with pytest.warns(UserWarning, match="is damaged"):
        rebuilt = read_image_folder(str(root), image_size=64, channels=3)
    assert torch.equal(rebuilt.images, first.images)
    # The rebuilt file is sound: the next load reads it without a warning.
    loaded = load_cache(cache, never_a_problem)
    assert torch.equal(loaded["images"], first.images)


@pytest.mark.skipif(
    "kanjivg" not in {d.metadata["Name"] for d in importlib.metadata.distributions()},
    reason="draws the kanjivg package's SVG files",
)
def test_the_kanji_cache_with_random_bytes_in_its_middle_is_rebuilt(tmp_path):
    # Issue 10's case on an 8-character build (125 KB of images rather than 100 MB).
    first = kanji_module.kanji_images(tmp_path, num_characters=8)
    path = kanji_module.cache_path(tmp_path, num_characters=8)
    overwrite_middle(path, 32 * 1024)
    with pytest.warns(UserWarning, match="is damaged"):
        rebuilt = kanji_module.kanji_images(tmp_path, num_characters=8)
    assert torch.equal(rebuilt.images, first.images) and rebuilt.characters == first.characters
