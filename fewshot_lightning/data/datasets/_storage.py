"""On-disk helpers shared by the dataset loaders: atomic, checksummed cache writes; cache reads
(loaded with ``weights_only=True``, so a cache file can never run code) that verify the
checksum; guarded pickle reads and the wording of missing-data and decoding errors."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import secrets
import socket
import urllib.error
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import Tensor

from ..._text import listed
from ..episodes import LabelledData

PathLike = Union[str, os.PathLike]

class DataFileError(RuntimeError):
    """A dataset file that is damaged, incomplete or not the file it should be (a truncated
    pickle, images no decoder reads, a split file in another layout): the user's data to fix,
    which the message names with the fix. ``fewshot-lightning`` prints it as one line."""


#: The payload entry where :func:`save_atomic` records the SHA-256 of the rest (:func:`content_sha256`).
CHECKSUM_KEY = "content_sha256"
#: Read size when hashing a file: large enough that the per-call cost vanishes, small enough to stay in cache.
_HASH_BLOCK = 16 * 1024 * 1024


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)`` then rename the result onto ``path``.

    The temporary file sits in the same folder (a rename is only atomic within a filesystem)
    and has a unique name, so a crash never leaves a half-written cache behind, and ranks or
    processes that build the same cache at once each publish a complete file. It is created
    as an ordinary file is, mode ``0o666`` less the umask (``0644`` under the usual ``022``),
    so a cache is readable by whoever may read the dataset beside it; ``tempfile.mkstemp``
    would make it ``0600``, private to whoever happened to build it first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # 64 random bits: a name no other writer picks; O_EXCL refuses to reuse one anyway.
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    _create_new(temporary, path.name)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _create_new(path: Path, name: str) -> None:
    """Create the empty file ``path`` (``O_EXCL``: never one that exists), as an ordinary file is
    (mode ``0o666`` less the umask), on the way to writing ``name`` beside it; a folder that refuses
    it is a :class:`DataFileError` naming the folder and the fixes."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise DataFileError(
            f"Cannot write {name} in {path.parent} ({error.strerror or error}): the data folder is read-only here, and "
            f"{name} is built there once (decoded images, or their checksum record) and reused. Make the folder "
            "writable for one run, or copy the dataset folder somewhere writable (cp -a keeps its caches) and point "
            "root there.") from error


def ensure_writable(folder: Path, name: str) -> None:
    """Raise :class:`DataFileError` now if ``name`` could not be written into ``folder``: before a
    decoding pass of minutes, not after it."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".{name}.{secrets.token_hex(8)}.probe"
    _create_new(probe, name)
    os.remove(probe)


@contextlib.contextmanager
def fetching(url: str, folder: Path, by_hand: str) -> Iterator[None]:
    """Report a download that cannot reach ``url`` (no network, a proxy, a name that does not
    resolve) as a :class:`DataFileError` naming ``folder`` and what to put there by hand
    (``by_hand``), not as urllib's traceback; and remove ``folder`` if the attempt made it and
    left it empty."""
    existed = folder.exists()
    try:
        yield
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as error:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        reason = getattr(error, "reason", error)
        raise DataFileError(
            f"Could not download {url} ({reason}): is this machine offline? Put the files in {folder} by hand "
            f"({by_hand}) and run with download=False (--data.init_args.download false); check that root points "
            "at the folder that holds them.") from error


def content_sha256(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a cache payload: for every entry in key order, its name and either a tensor's
    dtype, shape and raw bytes or another value's ``repr`` (strings, numbers, lists of them).

    SHA-256 rather than a CRC or BLAKE2: it is what ``sha256sum`` prints, and on CPUs with
    SHA instructions (x86 SHA-NI, ARMv8) it is the fastest hash in ``hashlib``, about as fast as
    reading the cache (see :func:`load_cache`).
    """
    digest = hashlib.sha256()
    for key in sorted(payload):
        value = payload[key]
        if isinstance(value, Tensor):
            digest.update(f"{key}\0tensor\0{value.dtype}\0{tuple(value.shape)}\0".encode())
            # Raw bytes through a uint8 view: no copy for a contiguous tensor, any dtype.
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(f"{key}\0{value!r}\0".encode())
    return digest.hexdigest()


def save_atomic(tensors: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` a dict of tensors (and strings, numbers, lists of them) with its
    :func:`content_sha256` under :data:`CHECKSUM_KEY`, atomically: a reader (another DDP rank,
    a second run) sees either no file or a complete one, and :func:`load_cache` can tell a
    damaged one from a good one."""
    payload = dict(tensors)
    if CHECKSUM_KEY in payload:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checksum that save_atomic records.")
    payload[CHECKSUM_KEY] = content_sha256(payload)
    atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load_cache(path: Path, problem: Callable[[Dict[str, Any]], Optional[str]]) -> Optional[Dict[str, Any]]:
    """The cache at ``path`` as :func:`save_atomic` was given it, or ``None`` if it is missing
    or must be rebuilt.

    A cache whose content no longer has the SHA-256 recorded when it was written (bytes
    changed on disk, a bad copy) or that has none (written before checksums) is damaged; the
    check costs about as much as reading the file (0.11 s to hash the 100 MB Kanji cache, whose
    ``torch.load`` takes 0.13 s, on a shared 2-core machine). ``problem(payload)`` then names
    what is wrong with a sound cache (a different format version, shape or source), or returns
    ``None`` if it is usable. A damaged, unreadable or stale cache gives a warning naming the
    file and ``None``; the caller rebuilds it under the same name, so only our own file is ever
    replaced. A path we cannot read at all (a directory, no permission) raises, since
    rebuilding could not fix it.
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
    if not isinstance(payload, dict):
        warnings.warn(f"Cache file {path} holds a {type(payload).__name__}, not a dict; rebuilding it.", stacklevel=3)
        return None
    recorded = payload.pop(CHECKSUM_KEY, None)
    if recorded is None:
        warnings.warn(
            f"Cache file {path} has no checksum (it was written by an older version); rebuilding it.", stacklevel=3
        )
        return None
    if recorded != content_sha256(payload):
        warnings.warn(
            f"Cache file {path} is damaged: its content no longer has the SHA-256 recorded when it was written "
            "(changed on disk or a bad copy); rebuilding it.",
            stacklevel=3,
        )
        return None
    reason = problem(payload)
    if reason is not None:
        warnings.warn(f"Cache file {path} does not match this request ({reason}); rebuilding it.", stacklevel=3)
        return None
    return payload


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (so a 10 GB file costs 16 MiB of memory)."""
    digest = hashlib.sha256()
    block = bytearray(_HASH_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as handle:
        while True:
            size = handle.readinto(view)
            if not size:
                return digest.hexdigest()
            digest.update(view[:size])


def checksum_record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_record(path: Path, record: Dict[str, Any]) -> None:
    atomic_write(checksum_record_path(path), lambda temporary: temporary.write_text(json.dumps(record) + "\n"))


def record_file_checksum(path: Path, sha256: Optional[str] = None, source: Optional[Dict[str, Any]] = None) -> None:
    """Write ``<path>.sha256``: the file's SHA-256 (computed unless given) with the size and
    modification time it had when hashed (see :func:`verify_file_checksum`), and the
    :func:`file_stamp` of the ``source`` it was built from, if given (:func:`recorded_source`)."""
    stat = path.stat()
    record = {"sha256": sha256 or file_sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if source is not None:
        record["source"] = source
    _write_record(path, record)


def verify_file_checksum(path: Path) -> Optional[str]:
    """``None`` if ``path`` still holds the bytes recorded by :func:`record_file_checksum`,
    otherwise what differs.

    For files too large to hash on every load (tiered-ImageNet's 16.5 GB of memory maps,
    which each process of a run opens) the full SHA-256 is computed when the file's size or
    modification time differs from the recorded ones: after anything wrote into it, and
    after a copy that did not keep the time. A match then records the new time, so the next
    load costs one ``stat``. What this does not catch is a change that leaves the
    modification time alone (a failing disk, a deliberate ``touch -d``): it trades that for
    not reading the whole file at every start. A file with no record (made by an older
    version) is hashed once and recorded from then on, with a warning.
    """
    try:
        record = json.loads(checksum_record_path(path).read_text())
        recorded, size, mtime_ns = record["sha256"], record["size"], record["mtime_ns"]
    except (OSError, ValueError, KeyError, TypeError):
        warnings.warn(
            f"{path} has no recorded checksum (made by an older version): recording its SHA-256 now; it is "
            "verified from now on.",
            stacklevel=3,
        )
        try:
            record_file_checksum(path)
        except DataFileError:
            warnings.warn(f"{path.parent} is read-only: {path.name}'s checksum cannot be recorded, so it is not "
                          "verified.", stacklevel=3)
        return None
    stat = path.stat()
    if (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns):
        return None
    actual = file_sha256(path)
    if actual != recorded:
        return f"its SHA-256 is {actual[:16]}..., not the {recorded[:16]}... recorded when it was built"
    try:
        record_file_checksum(path, actual, record.get("source"))
    except DataFileError:
        # A sound file in a read-only copy (one that did not keep the times): usable as it is.
        warnings.warn(f"{path} is intact, but its new modification time cannot be recorded in the read-only "
                      f"{path.parent}: it is hashed again at every start until it can be.", stacklevel=3)
    return None


def file_stamp(path: Path) -> Dict[str, Any]:
    """What tells one version of a source file from another without reading it: its name, size
    and modification time."""
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def record_source(path: Path, source: Dict[str, Any]) -> None:
    """Add ``source`` (a :func:`file_stamp`) to the checksum record of ``path``, not hashing it again."""
    record = json.loads(checksum_record_path(path).read_text())
    record["source"] = source
    _write_record(path, record)


def recorded_source(path: Path) -> Optional[Dict[str, Any]]:
    """The :func:`file_stamp` of the file ``path`` was built from, as :func:`record_file_checksum`
    recorded it; ``None`` if none was (a record made by an older version)."""
    try:
        source = json.loads(checksum_record_path(path).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, dict) else None


def describe_failures(failures: Sequence[Tuple[str, Union[str, BaseException]]], limit: int = 10) -> str:
    """``"a.png (OSError: image file is truncated), b.png (...) and 3 more"``: the first ``limit``
    of ``(file, error or its description)`` pairs."""
    return listed([f"{name} ({error if isinstance(error, str) else describe_error(error)})"
                   for name, error in failures], limit)


def describe_error(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        # Its own message repeats the file name, or names an in-memory buffer: neither helps.
        return "not an image format Pillow can read"
    return f"{type(error).__name__}: {error}"


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
        raise DataFileError(
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
        raise DataFileError(
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
                raise DataFileError(
                    f"Class {name} is in both the {seen[name]} and the {split} split of {folder}: the files do not "
                    "come from one release of the split. Replace them with a consistent set."
                )
            seen[name] = split
