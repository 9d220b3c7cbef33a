"""mini-ImageNet (Vinyals et al. 2016) on the class split of Ravi & Larochelle (ICLR 2017)."""
from __future__ import annotations

import csv
import warnings
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..datamodule import SPLITS, LabelledDataModule
from ..episodes import LabelledData
from ._storage import (
    DataFileError, PathLike, as_uint8_chw, check_class_counts, check_disjoint, describe_failures, ensure_writable, load_cache,
    load_pickle, missing, relabel_splits, save_atomic,
)

PUBLISHED_CLASSES = {"train": 64, "val": 16, "test": 20}
FOLDER = "mini-imagenet"
IMAGE_SIZE = 84
#: learn2learn's copies name the validation pickle ``-validation``; both spellings are accepted.
PICKLE_NAMES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
HOW_TO_GET = (
    "mini-ImageNet has no official, stable download. Either (a) put the pickles "
    "mini-imagenet-cache-{train,val,test}.pkl there (dicts with 'image_data', uint8 [N, 84, 84, 3], and "
    "'class_dict', {wnid: [indices]}), e.g. the copies learn2learn fetches from "
    "https://zenodo.org/record/7978538; or (b) put the images in images/*.jpg with Ravi & Larochelle's "
    "split files train.csv, val.csv and test.csv (rows 'filename,label', from "
    "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet); images of any size are "
    "resized to 84x84."
)


def load_mini_imagenet(root: PathLike = "data") -> Dict[str, LabelledData]:
    """mini-ImageNet's 64/16/20 classes (see :class:`MiniImageNetDataModule`): uint8 images
    ``[N, 3, 84, 84]``, class ids unique across splits (train first, then val, then test).

    Reads ``{root}/mini-imagenet/``: the pickles if all three are there, otherwise ``images/``
    with the split CSVs, decoded on the first call into ``{split}-84px.pt`` caches beside them.
    Missing files raise a ``FileNotFoundError`` that says where to get them.
    """
    folder = Path(root).expanduser() / FOLDER
    pickles = {split: pickle_path(folder, split) for split in SPLITS}
    if not all(pickles.values()):
        check_csv_layout(folder, pickles)  # raises the missing-data error before anything slow
        present = [path.name for path in pickles.values() if path is not None]
        if present:
            # One layout for every split: a pickle beside the CSV layout read its split from
            # another source than the others, with nothing said.
            warnings.warn(f"{folder} holds {', '.join(present)} but not all three pickles: reading every split from "
                          "images/ and the split CSVs; the pickle is not used.", stacklevel=2)
        pickles = dict.fromkeys(pickles)
    loaded = {split: read_cache_pickle(path) if path else csv_split(folder, split) for split, path in pickles.items()}
    check_disjoint(folder, {split: wnids for split, (_, _, wnids) in loaded.items()})
    check_class_counts(
        "mini-ImageNet", folder, {split: len(wnids) for split, (_, _, wnids) in loaded.items()}, PUBLISHED_CLASSES
    )
    return relabel_splits([(split, images, labels) for split, (images, labels, _) in loaded.items()])


def pickle_path(folder: Path, split: str) -> Optional[Path]:
    return next((folder / name for name in PICKLE_NAMES[split] if (folder / name).is_file()), None)


def check_csv_layout(folder: Path, pickles: Dict[str, Optional[Path]]) -> None:
    """Raise the missing-data error unless ``images/`` and the three split CSVs are there."""
    if (folder / "images").is_dir() and all((folder / f"{split}.csv").is_file() for split in SPLITS):
        return
    if any(pickles.values()):
        absent = [" or ".join(PICKLE_NAMES[split]) for split, path in pickles.items() if path is None]
        raise missing(folder, f"all three pickles, but {'; '.join(absent)} is missing", HOW_TO_GET)
    raise missing(
        folder, "mini-imagenet-cache-{train,val,test}.pkl, or images/ with train.csv, val.csv and test.csv", HOW_TO_GET
    )


def csv_split(folder: Path, split: str) -> Tuple[Tensor, Tensor, List[str]]:
    """One split of the JPEG layout, from its cache, decoded into the cache first if it is
    missing, damaged (see :func:`load_cache`) or not a cache of this layout."""
    cache_path = folder / f"{split}-{IMAGE_SIZE}px.pt"
    source = csv_source(folder, split)

    def problem(payload: Dict) -> Optional[str]:
        if "source" not in payload:
            return "it does not record the split file it was decoded from (an older version made it)"
        if payload["source"] != source:
            # Another split file (Ravi's and Vinyals' CSVs differ) or images changed since.
            return f"{split}.csv or the images it lists changed since it was decoded"
        images, labels = payload.get("images"), payload.get("labels")
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.shape[1:] != (3, *(IMAGE_SIZE,) * 2):
            return "images have the wrong type or shape"
        if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
            return "labels do not match the images"
        if not isinstance(payload.get("wnids"), list):
            return "the class wnids are missing"
        return None

    cache = load_cache(cache_path, problem)
    if cache is None:
        ensure_writable(folder, cache_path.name)  # before decoding the split, not after
        images, labels, wnids = decode_csv_split(folder, split)
        save_atomic({"images": images, "labels": labels, "wnids": wnids, "source": source}, cache_path)
        return images, labels, wnids
    return cache["images"], cache["labels"], list(cache["wnids"])


class MiniImageNetDataModule(LabelledDataModule):
    """mini-ImageNet episodes: 100 ImageNet classes of 600 84x84 RGB images, split 64/16/20
    by class as in Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning" (ICLR
    2017), the split nearly every later paper reports on.

    Two on-disk layouts are read, from ``{root}/mini-imagenet/`` (:func:`load_mini_imagenet`):

    * the widely shared pickles ``mini-imagenet-cache-{train,val,test}.pkl`` (``-validation``
      also accepted), each a dict with ``image_data`` (uint8 ``[N, 84, 84, 3]``) and
      ``class_dict`` (``{wnid: [indices]}``);
    * ``images/*.jpg`` with the split files ``train.csv``, ``val.csv``, ``test.csv``
      (``filename,label`` rows). Images are resized to 84x84 (Lanczos) and decoded once into
      ``{split}-84px.pt`` beside them.

    There is no download: the data has no official stable URL, and a missing file raises a
    ``FileNotFoundError`` saying where to get it.

    Args:
        root: folder holding ``mini-imagenet/``.
        meta_batch_size: tasks per step (4, as MAML's mini-ImageNet setting).
        **kwargs: the episode arguments of :class:`~fewshot_lightning.data.LabelledDataModule`
            (``ways``, ``shots``, ``queries``, ``test_ways``, ..., ``num_workers``, ``seed``, ...).
    """

    def __init__(self, root: PathLike = "data", meta_batch_size: int = 4, **kwargs: Any) -> None:
        super().__init__(meta_batch_size=meta_batch_size, **kwargs)
        self.root = root

    def prepare_data(self) -> None:
        # Once per node, before `setup` on every process: the JPEG layout is decoded into its
        # caches once (decoding is the slow part); `setup` then only reads them.
        self.load_splits()

    def load_splits(self) -> Dict[str, LabelledData]:
        return load_mini_imagenet(self.root)


def read_cache_pickle(path: Path) -> Tuple[Tensor, Tensor, List[str]]:
    content = load_pickle(path, "a dict with 'image_data' and 'class_dict'", HOW_TO_GET)
    if not isinstance(content, dict) or not {"image_data", "class_dict"} <= set(content):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataFileError(f"{path} holds {keys}, not a dict with 'image_data' and 'class_dict'. {HOW_TO_GET}")
    images = as_uint8_chw(np.asarray(content["image_data"]), path, IMAGE_SIZE)
    wnids = sorted(content["class_dict"])
    labels = torch.full((len(images),), -1, dtype=torch.long)
    for label, wnid in enumerate(wnids):
        try:
            indices = torch.as_tensor(np.asarray(content["class_dict"][wnid], dtype=np.int64)).reshape(-1)
        except (TypeError, ValueError) as error:
            raise DataFileError(f"{path}: class_dict[{wnid!r}] is not a list of image indices ({error}); the file is "
                                f"damaged. {HOW_TO_GET}") from error
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(images)):
            raise DataFileError(
                f"{path}: class_dict[{wnid!r}] lists image indices from {int(indices.min())} to {int(indices.max())}, "
                f"but the file holds {len(images)} images (0..{len(images) - 1}); the file is damaged. {HOW_TO_GET}")
        taken = labels[indices]
        if (taken >= 0).any():
            other = wnids[int(taken[taken >= 0][0])]
            raise DataFileError(
                f"{path}: class_dict lists image {int(indices[taken >= 0][0])} under both {other!r} and {wnid!r} "
                f"({int((taken >= 0).sum())} images under two classes); the file is damaged. {HOW_TO_GET}")
        labels[indices] = label
    if (labels < 0).any():
        raise DataFileError(
            f"{path}: {int((labels < 0).sum())} of {len(images)} images belong to no class of 'class_dict'; "
            f"the file is damaged. {HOW_TO_GET}"
        )
    return images, labels, wnids


def decode_csv_split(folder: Path, split: str) -> Tuple[Tensor, Tensor, List[str]]:
    """Decode the images listed in ``{split}.csv``: ``(uint8 [N, 3, 84, 84], labels, wnids)``.

    Every image is tried; missing or undecodable ones (a truncated JPEG) are listed together
    in one error, so one run names all the files to fetch again. None is skipped: mini-ImageNet
    is a fixed benchmark, and a result on fewer images is not comparable to the literature.
    """
    rows = read_split_csv(folder / f"{split}.csv")
    wnids = sorted({wnid for _, wnid in rows})
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    # Filled channel-first in place: no second full-size copy for the permute.
    images = np.empty((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    failures = []
    for i, (filename, _) in enumerate(rows):
        path = folder / "images" / filename
        try:
            images[i] = decode_image(path).transpose(2, 0, 1)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for a bad file
            failures.append((str(path), error))
    if failures:
        raise DataFileError(
            f"{len(failures)} of the {len(rows)} images listed in {folder / f'{split}.csv'} could not be read: "
            f"{describe_failures(failures)}. None is skipped (the benchmark would change): fetch those files "
            f"again. {HOW_TO_GET}"
        )
    labels = torch.tensor([label_of[wnid] for _, wnid in rows], dtype=torch.long)
    return torch.from_numpy(images), labels, wnids


def csv_source(folder: Path, split: str) -> str:
    """A hash of ``{split}.csv``'s bytes and of the size and modification time of every image
    it lists (a missing one counts as such): the cache of a split is used only for the CSV and
    images it was decoded from, so another split file, or an image replaced or edited, decodes
    the split again, while a copy that keeps the times (``cp -a``, ``rsync -a``) keeps its cache.
    About a ``stat`` per image (38,400 for the training split)."""
    path = folder / f"{split}.csv"
    digest = hashlib.sha256(path.read_bytes())
    for filename, _ in read_split_csv(path):
        try:
            stat = (folder / "images" / filename).stat()
            digest.update(f"{filename}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{filename}\tmissing\n".encode())
    return digest.hexdigest()


def read_split_csv(path: Path) -> List[Tuple[str, str]]:
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and [cell.strip() for cell in rows[0]] == ["filename", "label"]:
        rows = rows[1:]
    malformed = [row for row in rows if len(row) != 2]
    if malformed or not rows:
        problem = f"a malformed row {malformed[0]}" if malformed else "no rows"
        raise DataFileError(f"{path} has {problem}; expected 'filename,label' rows. {HOW_TO_GET}")
    return [(filename.strip(), wnid.strip()) for filename, wnid in rows]


def decode_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError("listed in the split CSV but missing")
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.uint8)

