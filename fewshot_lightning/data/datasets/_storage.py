"""On-disk helpers shared by the dataset loaders: atomic cache writes, cache reads (loaded
with ``weights_only=True``, so a cache file can never run code), guarded pickle reads and the
wording of missing-data errors."""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..episodes import LabelledData

PathLike = Union[str, os.PathLike]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)`` then rename the result onto ``path``.

    The temporary file sits in the same folder (a rename is only atomic within a filesystem)
    and has a unique name, so a crash never leaves a half-written cache behind, and ranks or
    processes that build the same cache at once each publish a complete file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_atomic(tensors: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` a dict of tensors (and strings, numbers), atomically: a reader (another
    DDP rank, a second run) sees either no file or a complete one."""
    atomic_write(path, lambda temporary: torch.save(dict(tensors), temporary))


def load_tensors(path: Path) -> Dict[str, Any]:
    """Read a cache written by :func:`save_atomic`; a damaged one raises a ``RuntimeError`` saying to delete it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(
            f"The cache file {path} could not be read ({type(error).__name__}: {error}). It is rebuilt from "
            "the raw files when missing: delete it and run again."
        ) from error


def load_cache(path: Path, problem: Callable[[Dict[str, Any]], Optional[str]]) -> Optional[Dict[str, Any]]:
    """The cache at ``path``, or ``None`` if it is missing or must be rebuilt.

    ``problem(payload)`` names what is wrong with a readable cache (a different format
    version, shape or source), or returns ``None`` if it is usable. A corrupt or stale cache
    gives a warning naming the file and ``None``; the caller rebuilds it under the same
    name, so only our own file is ever replaced. A path we cannot read at all (a directory,
    no permission) raises, since rebuilding could not fix it.
    """
    if not path.exists():
        return None
    if not path.is_file():
        raise OSError(f"Cache path {path} exists but is not a file: move it away or choose another root/cache_dir.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as error:
        raise PermissionError(f"Cannot read the cache file {path}: {error}. Fix its permissions or delete it.") from error
    except Exception as error:  # a truncated zip, a bad pickle, a foreign file: all mean "rebuild"
        warnings.warn(f"Cache file {path} is unreadable ({type(error).__name__}: {error}); rebuilding it.", stacklevel=3)
        return None
    reason = problem(payload) if isinstance(payload, dict) else f"it holds a {type(payload).__name__}, not a dict"
    if reason is not None:
        warnings.warn(f"Cache file {path} does not match this request ({reason}); rebuilding it.", stacklevel=3)
        return None
    return payload


def load_pickle(path: Path, what: str, how_to_get: str) -> Any:
    """Unpickle ``path``, raising errors that name the file, what it should hold, and how to get it.

    ``latin1`` decodes the Python 2 pickles that several benchmarks are still shipped as; it
    leaves Python 3 pickles unchanged.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {what}. {how_to_get}")
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except Exception as error:
        raise RuntimeError(
            f"{path} could not be unpickled ({type(error).__name__}: {error}); the file is corrupt or "
            f"incomplete. Expected {what}. Delete it and fetch it again: {how_to_get}"
        ) from error


def missing(folder: Path, expected: str, how_to_get: str) -> FileNotFoundError:
    return FileNotFoundError(f"Dataset not found in {folder}: expected {expected}. {how_to_get}")


def relabel_splits(parts: Sequence[Tuple[str, Tensor, Tensor]]) -> Dict[str, LabelledData]:
    """Give every split's classes ids of their own: ``0..C_train-1`` for train, then val, then test.

    Files such as tiered-ImageNet's number each split's classes from 0; renumbering keeps
    class ids unique across splits, so disjointness is visible in the labels.
    """
    splits, offset = {}, 0
    for split, data, labels in parts:
        classes, inverse = torch.unique(labels, return_inverse=True)
        splits[split] = LabelledData(data, inverse + offset)
        offset += len(classes)
    return splits


def check_class_counts(
    name: str, folder: Path, found: Mapping[str, int], published: Mapping[str, int]
) -> None:
    """Warn when a split holds a different number of classes from the published split.

    A warning rather than an error: subsets (and test fixtures) are legitimate, but a partial
    download usually shows up here first.
    """
    differing = {split: count for split, count in found.items() if count != published[split]}
    if differing:
        described = ", ".join(f"{split} {found[split]} (published {published[split]})" for split in differing)
        warnings.warn(
            f"{name} in {folder} has a different number of classes from the published split: {described}. "
            "Results will not be comparable to the literature; check the files are complete.",
            stacklevel=3,
        )


def as_uint8_chw(images: np.ndarray, path: Path, side: int) -> Tensor:
    """``[N, H, W, 3]`` uint8 array -> contiguous ``[N, 3, H, W]`` uint8 tensor, checking the shape."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (side, side, 3):
        raise RuntimeError(
            f"{path} holds images of dtype {images.dtype} and shape {tuple(images.shape)}; expected uint8 "
            f"[N, {side}, {side}, 3]. The file is not the expected release of the dataset."
        )
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def check_disjoint(folder: Path, classes: Mapping[str, Sequence[str]]) -> None:
    """Raise if a class name appears in two splits: the files come from different releases."""
    seen: Dict[str, str] = {}
    for split, names in classes.items():
        for name in names:
            if name in seen:
                raise RuntimeError(
                    f"Class {name} is in both the {seen[name]} and the {split} split of {folder}: the files do not "
                    "come from one release of the split. Replace them with a consistent set."
                )
            seen[name] = split
