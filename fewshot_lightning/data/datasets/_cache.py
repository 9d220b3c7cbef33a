"""Tensor caches on disk: written atomically, read back safely, rebuilt when unreadable.

A dataset that is expensive to make (rendered, or decoded from thousands of files) is saved
once as a ``torch.save`` dict of tensors, strings and numbers, and loaded with
``weights_only=True`` so a cache file can never run code.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch


def save_atomic(payload: Dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place.

    A reader (another DDP rank, a second run) therefore sees either no file or a complete
    one, never a half-written file; an interrupted write leaves only the temporary file,
    which is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


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
