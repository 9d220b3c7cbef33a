"""Kanji: an offline Omniglot-like benchmark of 6,394 classes, rendered from KanjiVG strokes.

How it is made. The ``kanjidraw`` package (Stegerman, https://github.com/obfusk/kanjidraw)
ships ``data.json``: the 6,394 kanji of the CJK Unified Ideographs block (U+4E00-U+9FFF)
in KanjiVG (Apel, https://kanjivg.tagaini.net), each a list of strokes in writing order.
kanjidraw reduces every KanjiVG stroke to the straight segment from its first to its last
point, on a 0-255 grid. The images are therefore stick-figure abstractions of the
characters, not faithful glyphs: a bent stroke (the second stroke of 口) becomes a diagonal.
Every character is still distinct (no two share the same segments).

Each character is drawn ``instances`` times (20, like the 20 drawers per Omniglot
character; Lake, Salakhutdinov & Tenenbaum, Science 2015), each time as a different
"hand": a random affine map of the whole character (rotation within ±12°, scale 0.75-0.95
of the frame, aspect 0.9-1.1, horizontal shear ±0.2, shift ±6% of the frame), every stroke
endpoint moved by up to ±2% of the frame, every stroke bowed sideways at its middle by up
to ±8% of its length (drawn as two segments), and a pen width of 4.5-7.5% of the frame,
varied ±15% per stroke. Strokes are round-capped capsules rasterised with anti-aliased
coverage (full ink within the pen radius, fading linearly to zero over one pixel), white
(255) ink on black (0), 1 channel, uint8.

Reproducibility. Character ``c`` is drawn from ``numpy.random.default_rng([seed, ord(c)])``,
so its images do not depend on which other characters are built (``num_characters``), and
instance ``i`` does not depend on ``instances``. Only IEEE-754 operations that are exactly
rounded on every platform are used (uniform draws, + - * /, sqrt, rounding; the rotation
comes from a rational parametrisation, not from sin/cos, and there are no matrix products
whose summation order could vary), so the bytes are the same on every machine for a given
``data.json`` (whose SHA-256 the cache records). The full set, 127,880 images of 28x28,
takes about 30 s to render on one CPU core and is cached under ``root``.

Split. A seeded shuffle of the characters gives 4,000 training, 1,000 validation and 1,394
test classes: close to mini-ImageNet's 64/16/20 class proportions (Ravi & Larochelle, ICLR
2017) in round numbers, with every character used. Test episodes then draw from 1,394
classes (Omniglot's common split of Vinyals et al., NeurIPS 2016, tests on 423). The split
is by character, not by component: test kanji share radicals with training kanji, as
Omniglot's character-level split shares alphabets.

License. KanjiVG's stroke data is © Ulrich Apel, CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/); the rendered images are an adaptation
of it and carry the same license: attribute KanjiVG and share adaptations alike. The
kanjidraw package (the code) is AGPL-3.0-or-later; this module reads only its
``data.json`` file and never imports its code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..datamodule import SPLITS, EpisodicDataModule, subset_by_classes
from ..episodes import LabelledData
from ._storage import load_cache, save_atomic

#: Bumped whenever rendering changes, so an old cache is never mistaken for a new one.
FORMAT_VERSION = 1
#: Characters in kanjidraw 0.2.x's data.json.
NUM_CHARACTERS = 6394
#: Train, validation and test characters of the full set (see the module docstring).
SPLIT_SIZES = (4000, 1000, 1394)

# The "hand" of one instance, in fractions of the image side unless stated.
# Rotation is drawn as t = tan(angle / 2) within ±0.105 (angle within ±12°), so that
# cos = (1 - t²) / (1 + t²) and sin = 2t / (1 + t²) are exact-rounding arithmetic.
HALF_ANGLE_TAN = 0.105
SCALE = (0.75, 0.95)  # the 0-255 source grid is nearly edge to edge; this leaves a margin
ASPECT = (0.9, 1.1)
SHEAR = 0.2
SHIFT = 0.06
ENDPOINT_JITTER = 0.02
BOW = 0.08  # sideways offset of a stroke's midpoint, in stroke lengths
PEN_WIDTH = (0.045, 0.075)  # 1.3-2.1 px at 28 px: Omniglot's pen at that size
STROKE_WIDTH_FACTOR = (0.85, 1.15)

# Uniform draws per instance: 7 for the whole character, then 6 per stroke.
_CHARACTER_DRAWS = 7
_STROKE_DRAWS = 6
# Pixel-stroke pairs rasterised at once: bounds the temporary arrays (16 MiB in float32).
_RASTER_CHUNK = 4 * 1024 * 1024


class KanjiImages(NamedTuple):
    """Rendered instances: ``images`` ``[C * I, 1, S, S]`` uint8, ``labels`` ``[C * I]`` int64
    (instance ``j`` of character ``k`` is row ``k * I + j``, label ``k``), and ``characters``, the
    ``C`` characters in code-point order (label ``k`` is ``characters[k]``)."""

    images: Tensor
    labels: Tensor
    characters: str


def stroke_data_path() -> Path:
    """``data.json`` of the installed kanjidraw package, located without importing its code."""
    spec = importlib.util.find_spec("kanjidraw")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The Kanji benchmark renders the stroke data of the kanjidraw package, which is not installed: "
            "pip install 'kanjidraw>=0.2.3,<0.3'."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data.json"
    if not path.is_file():
        raise FileNotFoundError(f"kanjidraw is installed but has no stroke data at {path}: reinstall kanjidraw.")
    return path


def load_strokes(path: Optional[Path] = None) -> Tuple[str, List[np.ndarray], str]:
    """Characters in code-point order, their strokes (``[S, 4]`` float64 arrays of
    ``x1, y1, x2, y2`` on the 0-255 grid) and the SHA-256 of the file they came from."""
    path = stroke_data_path() if path is None else path
    raw = path.read_bytes()
    by_stroke_count = json.loads(raw)
    # The file groups characters by stroke count; code-point order is independent of that.
    items = sorted(
        ((character, strokes) for group in by_stroke_count.values() for character, strokes in group.items()),
        key=lambda item: ord(item[0]),
    )
    characters = "".join(character for character, _ in items)
    strokes = [np.asarray(segments, dtype=np.float64).reshape(-1, 4) for _, segments in items]
    return characters, strokes, hashlib.sha256(raw).hexdigest()


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


def _between(uniform: np.ndarray, bounds: Tuple[float, float]) -> np.ndarray:
    return bounds[0] + (bounds[1] - bounds[0]) * uniform


def _symmetric(uniform: np.ndarray, limit: float) -> np.ndarray:
    return (2 * uniform - 1) * limit


def render_character(strokes: np.ndarray, codepoint: int, instances: int, image_size: int, seed: int) -> np.ndarray:
    """``instances`` renderings of one character, ``[instances, image_size, image_size]`` uint8.

    ``strokes`` is ``[S, 4]`` (``x1, y1, x2, y2`` on the 0-255 grid); the randomness comes only
    from ``default_rng([seed, codepoint])`` (see the module docstring).
    """
    num_strokes = len(strokes)
    draws = np.random.default_rng([seed, codepoint]).random((instances, _CHARACTER_DRAWS + _STROKE_DRAWS * num_strokes))
    hand = draws[:, :_CHARACTER_DRAWS].T
    per_stroke = draws[:, _CHARACTER_DRAWS:].reshape(instances, num_strokes, _STROKE_DRAWS)

    # Centre the 0-255 grid on the origin, in units of the image side: [I, S] each.
    centred = (strokes - 127.5) / 256
    ends = centred[None] + _symmetric(per_stroke[..., :4], ENDPOINT_JITTER)
    start_x, start_y, end_x, end_y = ends[..., 0], ends[..., 1], ends[..., 2], ends[..., 3]
    bow = _symmetric(per_stroke[..., 4], BOW)
    # (-dy, dx) is the stroke turned by 90°, as long as the stroke: no normalisation needed.
    mid_x = (start_x + end_x) * 0.5 - (end_y - start_y) * bow
    mid_y = (start_y + end_y) * 0.5 + (end_x - start_x) * bow
    x0 = np.concatenate([start_x, mid_x], axis=1)
    y0 = np.concatenate([start_y, mid_y], axis=1)
    x1 = np.concatenate([mid_x, end_x], axis=1)
    y1 = np.concatenate([mid_y, end_y], axis=1)

    half_tan = _symmetric(hand[0], HALF_ANGLE_TAN)
    cos = (1 - half_tan * half_tan) / (1 + half_tan * half_tan)
    sin = 2 * half_tan / (1 + half_tan * half_tan)
    scale, aspect = _between(hand[1], SCALE), _between(hand[2], ASPECT)
    scale_x, scale_y = scale * aspect, scale / aspect
    shear = _symmetric(hand[3], SHEAR)
    # rotation @ scale @ shear, written out entry by entry (see the module docstring on matmul).
    a11, a12 = cos * scale_x, cos * scale_x * shear - sin * scale_y
    a21, a22 = sin * scale_x, sin * scale_x * shear + cos * scale_y
    shift_x, shift_y = _symmetric(hand[4], SHIFT), _symmetric(hand[5], SHIFT)

    def to_pixels(x: np.ndarray, y: np.ndarray, row_x: np.ndarray, row_y: np.ndarray, shift: np.ndarray) -> np.ndarray:
        return (row_x[:, None] * x + row_y[:, None] * y + shift[:, None] + 0.5) * image_size

    px0, py0 = to_pixels(x0, y0, a11, a12, shift_x), to_pixels(x0, y0, a21, a22, shift_y)
    px1, py1 = to_pixels(x1, y1, a11, a12, shift_x), to_pixels(x1, y1, a21, a22, shift_y)
    radius = 0.5 * image_size * _between(hand[6], PEN_WIDTH)[:, None] * _between(per_stroke[..., 5], STROKE_WIDTH_FACTOR)
    radius = np.concatenate([radius, radius], axis=1)

    segments = [a.astype(np.float32) for a in (px0, py0, px1, py1, radius)]
    per_instance = 2 * num_strokes * image_size * image_size
    chunk = max(1, _RASTER_CHUNK // per_instance)
    return np.concatenate(
        [rasterise(*(a[i : i + chunk] for a in segments), image_size) for i in range(0, instances, chunk)]
    )


def rasterise(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased round-capped segments: ``[I, G]`` float32 pixel coordinates and radii (pixel
    ``(r, c)`` has its centre at ``(c + 0.5, r + 0.5)``) -> ``[I, size, size]`` uint8.

    Coverage of a pixel is ``clip(radius + 0.5 - distance, 0, 1)`` for its centre's distance to
    the segment, maximised over segments (overlapping strokes do not add ink).
    """
    f32 = np.float32
    dx, dy = x1 - x0, y1 - y0
    # A jittered dot can have zero length; the floor keeps the projection finite (t = 0).
    inverse_length2 = f32(1) / np.maximum(dx * dx + dy * dy, f32(1e-6))
    centres = np.arange(size, dtype=f32) + f32(0.5)
    from_x = (centres - x0[..., None])[..., None, :]  # [I, G, 1, W]
    from_y = (centres - y0[..., None])[..., :, None]  # [I, G, H, 1]
    dx, dy = dx[..., None, None], dy[..., None, None]
    # Position of the nearest point along the segment, 0 at (x0, y0) and 1 at (x1, y1).
    along = from_x * (dx * inverse_length2[..., None, None]) + from_y * (dy * inverse_length2[..., None, None])
    np.clip(along, f32(0), f32(1), out=along)
    # In-place arithmetic from here on: these arrays are the whole cost of a build.
    off_x = along * dx
    np.subtract(from_x, off_x, out=off_x)
    np.multiply(off_x, off_x, out=off_x)
    off_y = np.multiply(along, dy, out=along)
    np.subtract(from_y, off_y, out=off_y)
    np.multiply(off_y, off_y, out=off_y)
    distance = np.add(off_x, off_y, out=off_x)
    np.sqrt(distance, out=distance)
    coverage = np.subtract(radius[..., None, None] + f32(0.5), distance, out=distance).max(axis=1)
    np.clip(coverage, f32(0), f32(1), out=coverage)
    return np.rint(coverage * f32(255)).astype(np.uint8)


def render_kanji(
    image_size: int = 28, instances: int = 20, seed: int = 0, num_characters: Optional[int] = None
) -> Tuple[KanjiImages, str]:
    """Render the benchmark (no cache): the images and the SHA-256 of the stroke data used."""
    if image_size < 1 or instances < 1:
        raise ValueError(f"image_size and instances must be at least 1, got {image_size} and {instances}.")
    characters, strokes, source_sha256 = load_strokes()
    chosen = select_characters(len(characters), num_characters)
    images = np.empty((len(chosen) * instances, 1, image_size, image_size), dtype=np.uint8)
    for row, index in enumerate(chosen):
        images[row * instances : (row + 1) * instances, 0] = render_character(
            strokes[index], ord(characters[index]), instances, image_size, seed
        )
    labels = torch.arange(len(chosen)).repeat_interleave(instances)
    chosen_characters = "".join(characters[i] for i in chosen)
    return KanjiImages(torch.from_numpy(images), labels, chosen_characters), source_sha256


def cache_path(
    root: Union[str, Path], image_size: int = 28, instances: int = 20, seed: int = 0, num_characters: Optional[int] = None
) -> Path:
    """Where :func:`load_kanji` keeps a build: ``<root>/kanji/kanji_<S>px_<I>inst_seed<seed>[_<n>chars]_v<version>.pt``."""
    subset = "" if num_characters is None else f"_{num_characters}chars"
    return Path(root) / "kanji" / f"kanji_{image_size}px_{instances}inst_seed{seed}{subset}_v{FORMAT_VERSION}.pt"


def load_kanji(
    root: Union[str, Path], image_size: int = 28, instances: int = 20, seed: int = 0, num_characters: Optional[int] = None
) -> KanjiImages:
    """The rendered benchmark, from its cache under ``root`` or rendered (once) and cached there.

    A cache that is unreadable, from another format version or from different stroke data
    is rebuilt with a warning naming the file.
    """
    path = cache_path(root, image_size, instances, seed, num_characters)
    characters, _, source_sha256 = load_strokes()
    expected_characters = "".join(characters[i] for i in select_characters(len(characters), num_characters))
    rows = len(expected_characters) * instances

    def problem(payload: Dict) -> Optional[str]:
        wanted = {"version": FORMAT_VERSION, "image_size": image_size, "instances": instances, "seed": seed,
                  "source_sha256": source_sha256, "characters": expected_characters}
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

    rank_zero_info(f"Rendering {len(expected_characters):,} kanji x {instances} instances into {path} (once).")
    started = time.perf_counter()
    kanji, source_sha256 = render_kanji(image_size, instances, seed, num_characters)
    save_atomic(
        {"version": FORMAT_VERSION, "image_size": image_size, "instances": instances, "seed": seed,
         "source_sha256": source_sha256, "characters": kanji.characters,
         "images": kanji.images, "labels": kanji.labels},
        path,
    )
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


class KanjiDataModule(EpisodicDataModule):
    """Few-shot episodes over the Kanji benchmark: 6,394 classes of 20 rendered instances each.

    See the module docstring for how the images are made, the split and the license. The
    images are rendered once (about 30 s) into ``<root>/kanji/`` and loaded from there after.

    Args:
        root: folder for the cache file (created if missing).
        image_size: side of the square images in pixels (28, like Omniglot in the literature).
        instances: renderings ("drawers") per character.
        render_seed: seed of the renderings; a different seed is a different set of images.
        split_seed: seed of the class split (kept apart from ``seed`` so that rerunning with a
            new episode seed tests on the same characters).
        num_characters: render only this many characters, spread evenly over the set, and
            split them in the full set's proportions (for quick tests); ``None`` for all.
        ways, shots, queries: the training episodes.
        test_ways, test_shots, test_queries: validation/test episodes (default: as training).
        meta_batch_size: tasks per step.
        train_tasks, val_tasks, test_tasks: tasks per training epoch; fixed evaluation episodes.
        num_workers: DataLoader worker processes.
        seed: base seed of the episodes.

    Example::

        from fewshot_lightning.data.datasets import KanjiDataModule
        data = KanjiDataModule(root="data", ways=5, shots=1, queries=15)
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
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        test_ways: Optional[int] = None,
        test_shots: Optional[int] = None,
        test_queries: Optional[int] = None,
        meta_batch_size: int = 32,
        train_tasks: int = 32_000,
        val_tasks: int = 200,
        test_tasks: int = 600,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(
            ways=ways, shots=shots, queries=queries, test_ways=test_ways, test_shots=test_shots,
            test_queries=test_queries, meta_batch_size=meta_batch_size, train_tasks=train_tasks,
            val_tasks=val_tasks, test_tasks=test_tasks, num_workers=num_workers, seed=seed,
        )
        if image_size < 1:
            raise ValueError(f"image_size must be at least 1 pixel, got {image_size}.")
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}.")
        select_characters(NUM_CHARACTERS, num_characters)  # fail now, not after the first epoch starts
        self.root = root
        self.image_size = image_size
        self.instances = instances
        self.render_seed = render_seed
        self.split_seed = split_seed
        self.num_characters = num_characters
        self.characters: Optional[str] = None

    def _load(self) -> KanjiImages:
        return load_kanji(self.root, self.image_size, self.instances, self.render_seed, self.num_characters)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the render happens once, not per rank.
        self._load()

    def load_splits(self) -> Dict[str, LabelledData]:
        kanji = self._load()
        self.characters = kanji.characters
        parts = split_characters(len(kanji.characters), self.split_seed)
        return {
            split: subset_by_classes(kanji.images, kanji.labels, torch.from_numpy(classes))
            for split, classes in parts.items()
        }
