"""Few-shot episodes over your own images: a folder with one sub-folder per class.

The layout is torchvision's ``ImageFolder`` (``root/<class name>/**/<image>``). Every image
is decoded once, resized to ``image_size`` x ``image_size`` (the whole image, ignoring its
aspect ratio, as mini-ImageNet's 84x84 images were made by Ravi & Larochelle, 2017) and
stored in one uint8 tensor cached on disk; later runs load that tensor in a second.

Files that cannot be decoded (a truncated JPEG, a text file named ``.png``) are skipped,
with a warning listing them in every run. Skipped rather than fatal, unlike in the
benchmarks: a folder of your own is whatever it holds, a few broken downloads are common in
one, and the rest is still a valid dataset; the warning names every file, and a class left
with too few images for the requested episodes fails at setup (before any training) with
an error naming it.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageOps
from torch import Tensor

from ..._text import listed
from ..datamodule import SPLITS, LabelledDataModule, check_split_fractions, split_by_class, subset_by_classes
from ..episodes import LabelledData
from ._storage import DataFileError, describe_error, describe_failures, load_cache, save_atomic

#: Bumped whenever decoding changes, so an old cache is never mistaken for a new one.
FORMAT_VERSION = 2  # 2: images of more than 8 bits scaled, not clipped (eight_bit)
#: File name endings read as images (case-insensitive); other files are skipped.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff",
                    ".webp")
#: Cache folder made under ``root`` when no ``cache_dir`` is given; never read as a class.
DEFAULT_CACHE_FOLDER = ".fewshot_cache"
#: Image file endings of formats that Pillow opens only with plug-ins, if at all (phones,
#: cameras, vector drawings): named in the warning about skipped files, whatever is installed.
UNREAD_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".svg", ".dng", ".cr2", ".cr3", ".nef",
                                     ".arw", ".orf", ".rw2", ".raf", ".raw", ".psd"})

LAYOUT = "root/<class name>/<image>.png|jpg|... (one sub-folder per class, images anywhere inside it)"


class FolderImages(NamedTuple):
    """Decoded images ``[N, C, S, S]`` uint8, their labels ``[N]`` (index into ``classes``),
    the class folder names in sorted order and each image's path relative to the root."""

    images: Tensor
    labels: Tensor
    classes: List[str]
    files: List[str]


def scan_folder(root: Path) -> Tuple[List[str], List[str], List[int]]:
    """Class names (sorted), image paths relative to ``root`` (sorted) and their class indices.

    Hidden files and folders (names starting with ``.``, such as our cache) are skipped;
    class folders holding no image are dropped with a warning.

    Links are followed, to folders and to files, but every folder and every image is read once,
    in one class: an image under two labels could be drawn into two splits. What a class folder
    holds itself (no link on the way) is its own; a link, followed after every class's own
    files are known, that leads to an image or folder some class already holds (the same file
    again, the dataset, a parent of it, a class folder) is skipped with a warning naming it, and
    so is a link that leads nowhere (a moved target, a loop).
    """
    if not root.exists():
        raise FileNotFoundError(f"Image folder {root} does not exist. Expected the layout {LAYOUT}.")
    if not root.is_dir():
        raise NotADirectoryError(f"Image folder {root} is a file, not a folder. Expected the layout {LAYOUT}.")
    # Image formats Pillow opens that this reader skips (by name: .ico, .avif, ...), to name them,
    # and common ones it cannot open here at all (phone and camera formats, without plug-ins).
    openable = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    other_kinds = openable | UNREAD_IMAGE_EXTENSIONS
    folders = {_folder_id(root.resolve())} | {_folder_id(parent) for parent in root.resolve().parents}
    class_dirs = _distinct_class_folders(root, folders)
    _refuse_split_folders(root, class_dirs)
    found: Dict[Path, List[str]] = {class_dir: [] for class_dir in class_dirs}
    images: set = set()  # identities of the image files read
    looped, doubled, broken, other_images = [], [], [], []
    links: List[Tuple[Path, str, bool]] = []  # (class folder, link path, leads to a folder?), in walk order

    def wanted(name: str) -> bool:
        return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)

    def relative(path: str) -> str:
        return Path(path).relative_to(root).as_posix()

    def first_visit(path: str, seen: set, again: List[str]) -> bool:
        """Whether ``path`` leads (through links) to a file or folder not in ``seen``, which it is
        then added to; one already there is listed in ``again``, one leading nowhere in ``broken``."""
        try:
            identity = _folder_id(Path(path))
        except OSError:
            broken.append(relative(path))
            return False
        if identity in seen:
            again.append(relative(path))
            return False
        seen.add(identity)
        return True

    def take_files(class_dir: Path, folder: str, names: List[str], linked: bool) -> None:
        """The images among ``names`` of ``folder`` (reached through a link if ``linked``)."""
        for name in sorted(names):
            path = os.path.join(folder, name)
            if not wanted(name):
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in other_kinds:
                    other_images.append(path)
                continue
            if not linked and os.path.islink(path):
                links.append((class_dir, path, False))
            elif first_visit(path, images, doubled):
                found[class_dir].append(path)

    # First what each class folder holds itself, no link followed (a class folder that is itself
    # a link holds nothing of its own: all of it is read in the second pass).
    for class_dir in class_dirs:
        if class_dir.is_symlink():
            links.append((class_dir, str(class_dir), True))
            continue
        folders.add(_folder_id(class_dir))
        for folder, subfolders, names in os.walk(class_dir):
            kept = []
            for name in subfolders:
                if name.startswith("."):
                    continue
                if os.path.islink(os.path.join(folder, name)):
                    links.append((class_dir, os.path.join(folder, name), True))
                    continue
                folders.add(_folder_id(Path(folder, name)))
                kept.append(name)
            subfolders[:] = kept
            # os.walk lists a link to a folder among the folders, and a broken link among the files
            take_files(class_dir, folder, names, linked=False)
    # Then the links, each class's in order: a folder or image some class already holds is skipped.
    for class_dir, link, to_folder in links:
        if not to_folder:
            take_files(class_dir, os.path.dirname(link), [os.path.basename(link)], linked=True)
            continue
        if not first_visit(link, folders, looped):
            continue
        for folder, subfolders, names in os.walk(link, followlinks=True):
            subfolders[:] = [name for name in subfolders
                             if not name.startswith(".") and first_visit(os.path.join(folder, name), folders, looped)]
            take_files(class_dir, folder, names, linked=True)
    classes, files, labels, empty = [], [], [], []
    for class_dir in class_dirs:
        if not found[class_dir]:
            empty.append(class_dir.name)
            continue
        files += sorted(relative(path) for path in found[class_dir])
        labels += [len(classes)] * len(found[class_dir])
        classes.append(class_dir.name)
    if not classes:
        raise FileNotFoundError(
            f"Image folder {root} holds no images in class sub-folders (looked for {', '.join(IMAGE_EXTENSIONS)}). "
            f"Expected the layout {LAYOUT}; images directly in {root} are not read."
        )
    if other_images:
        kinds = sorted({os.path.splitext(path)[1].lower() for path in other_images})
        warnings.warn(
            f"Skipping {len(other_images)} file(s) of {root} in image formats not read here ({', '.join(kinds)}): "
            f"{listed([relative(path) for path in other_images], 3)}. Convert them to one "
            f"of {', '.join(IMAGE_EXTENSIONS)} to use them.", stacklevel=2)
    if empty:
        warnings.warn(f"Skipping {len(empty)} class folder(s) of {root} with no images: {', '.join(empty[:10])}.", stacklevel=2)
    if looped:
        warnings.warn(
            f"Skipping {len(looped)} linked folder(s) of {root} that lead to a folder already read (the dataset, a "
            f"parent of it, a class folder or a folder inside one): {listed(sorted(looped), 5)}. Each folder's images are "
            "read once, where the folder is (an image under two labels could be drawn into two splits).", stacklevel=2)
    if doubled:
        warnings.warn(
            f"Skipping {len(doubled)} image(s) of {root} that are links to (or hard links of) an image already read: "
            f"{listed(sorted(doubled), 5)}. Each image is read once, where the file itself is (an image under two labels "
            "could be drawn into two splits; twice in one class, into a task's support and query set).",
            stacklevel=2)
    if broken:
        warnings.warn(
            f"Skipping {len(broken)} link(s) of {root} that lead nowhere (the target was moved or deleted, or the "
            f"link leads to itself): {listed(sorted(broken), 5)}.", stacklevel=2)
    return classes, files, labels


#: Folder names of a dataset already split into train/val/test folders of class folders.
SPLIT_FOLDER_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


def _refuse_split_folders(root: Path, class_dirs: List[Path]) -> None:
    """Stop on a root of split folders (``train/``, ``val/``, ``test/``, each of class folders):
    read as three classes, it failed later with advice on split fractions."""
    names = {d.name.lower() for d in class_dirs}
    if len(names) < 2 or not names <= SPLIT_FOLDER_NAMES:
        return
    if not all(any(child.is_dir() and not child.name.startswith(".") for child in d.iterdir()) for d in class_dirs):
        return
    raise ValueError(
        f"Image folder {root} holds the split folders {', '.join(sorted(d.name for d in class_dirs))}, each a folder "
        f"of classes, where the layout is {LAYOUT}. Put every class folder in one folder as root and give each "
        "split's classes with train_classes, val_classes and test_classes (their folder names), or point root at "
        "one of them.")


def _distinct_class_folders(root: Path, ancestors: set) -> List[Path]:
    """The class folders of ``root`` (sorted; hidden ones skipped), each folder once: a class
    folder that is a link to another (whose images it would read again under a second label, the
    two then possibly in different splits) or to the dataset or a parent of it is skipped with a
    warning; of a folder and a link to it, the folder is kept."""
    kept: Dict[Tuple[int, int], Path] = {}
    skipped = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        identity = _folder_id(class_dir)
        if identity in ancestors:
            skipped.append(f"{class_dir.name} (the dataset folder or a parent of it)")
            continue
        other = kept.get(identity)
        if other is not None:
            if other.is_symlink() and not class_dir.is_symlink():
                kept[identity], class_dir = class_dir, other  # keep the folder, skip the link to it
            skipped.append(f"{class_dir.name} (the same folder as {kept[identity].name})")
            continue
        kept[identity] = class_dir
    if skipped:
        warnings.warn(
            f"Skipping {len(skipped)} class folder(s) of {root} linked to a folder already read: "
            f"{listed(skipped, 5)}. A class folder that is another's would give its images two labels (and could "
            "put them in two splits); each folder is read once.", stacklevel=3)
    return sorted(kept.values())


def _folder_id(path: Path) -> Tuple[int, int]:
    """The device and inode of the folder ``path`` leads to (through links): equal for every
    path to the same folder."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def folder_fingerprint(root: Path, files: Sequence[str], image_size: int, channels: int) -> str:
    """A hash of every image's path, size in bytes and modification time, and of the decoding
    settings: any added, removed, renamed or edited image gives a new cache."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION} {image_size}px {channels}ch\n".encode())
    for relative in files:
        stat = (root / relative).stat()
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def eight_bit(image: Image.Image) -> Image.Image:
    """A grey image of more than 8 bits (16-bit PNG and TIFF: Pillow's modes ``I;16*``, ``I``,
    ``F``) scaled to 8 bits: Pillow's conversion to ``L`` clips every value above 255, so a
    16-bit scan came out nearly all white. 16-bit values are divided by 257 (65535 -> 255);
    32-bit integers that fit 8 or 16 bits are read as such, larger ones scaled by their maximum;
    floats are taken in [0, 1] when they fit it, else like integers. Other modes pass as they are."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    largest = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F" and largest <= 1.0:
        top = 1.0
    else:
        top = 255.0 if largest <= 255 else 65535.0 if largest <= 65535 else largest
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def decode_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image as ``[channels, image_size, image_size]`` uint8."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as image:
        # A JPEG can be decoded straight at a fraction of its size: much faster for photos.
        image.draft(mode, (image_size, image_size))
        image = ImageOps.exif_transpose(image)
        if image.mode == "P":
            # Palette transparency is lost by a direct conversion (and Pillow warns about it).
            image = image.convert("RGBA")
        image = eight_bit(image)
        image = image.convert(mode).resize((image_size, image_size), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def load_image_folder(
    root: str,
    image_size: int = 84,
    channels: int = 3,
    cache_dir: Optional[str] = None,
    split_fractions: Sequence[float] = (0.64, 0.16, 0.20),
    split_seed: int = 0,
    train_classes: Optional[List[str]] = None,
    val_classes: Optional[List[str]] = None,
    test_classes: Optional[List[str]] = None,
) -> Dict[str, LabelledData]:
    """The images under ``root`` (see :func:`read_image_folder`), split by class: by a seeded
    shuffle in ``split_fractions``, or exactly as listed in ``train_classes``, ``val_classes``
    and ``test_classes`` (all three, disjoint). Labels index the sorted class folder names."""
    class_lists = check_class_lists(train_classes, val_classes, test_classes)
    fractions = check_split_fractions(split_fractions)
    folder = read_image_folder(root, image_size, channels, cache_dir)
    return split_folder(folder, root, fractions, split_seed, class_lists)


def read_image_folder(
    root: str, image_size: int = 84, channels: int = 3, cache_dir: Optional[str] = None
) -> FolderImages:
    """Every image under ``root``, decoded once and cached in ``cache_dir`` (default
    ``<root>/.fewshot_cache``) under a name keyed by :func:`folder_fingerprint`.

    Files that cannot be decoded are left out with a warning naming them (in every process
    that loads them, from the cache too), and so is a class left with no image.
    """
    check_image_shape(image_size, channels)
    root_path = Path(root).expanduser()
    classes, files, labels = scan_folder(root_path)
    fingerprint = folder_fingerprint(root_path, files, image_size, channels)
    cache_folder = Path(cache_dir).expanduser() if cache_dir is not None else root_path / DEFAULT_CACHE_FOLDER
    path = cache_folder / f"images_{image_size}px_{channels}ch_{fingerprint[:16]}.pt"

    def problem(payload: Dict) -> Optional[str]:
        if payload.get("version") != FORMAT_VERSION or payload.get("fingerprint") != fingerprint:
            return "it was made from other files or settings"
        skipped, reasons = payload.get("skipped"), payload.get("skip_reasons")
        if not isinstance(skipped, list) or not isinstance(reasons, list) or not set(skipped) <= set(files):
            return "it does not list the skipped files"
        images = payload.get("images")
        shape = (len(files) - len(skipped), channels, image_size, image_size)
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != shape:
            return "images have the wrong type or shape"
        return None

    payload = load_cache(path, problem)
    if payload is None:
        payload = decode_folder(root_path, files, len(classes), image_size, channels, path)
        payload.update(version=FORMAT_VERSION, fingerprint=fingerprint)
        try:
            save_atomic(payload, path)
        except OSError as error:
            raise OSError(
                f"Cannot write the image cache {path} ({error}). Pass a writable `cache_dir` "
                "(the image folder itself may be read-only)."
            ) from error
    skipped = list(zip(payload["skipped"], payload["skip_reasons"]))
    return kept_images(root_path, payload["images"], classes, files, labels, skipped)


def decode_folder(root: Path, files: List[str], num_classes: int, image_size: int, channels: int, cache: Path) -> Dict:
    """``{"images": uint8 [N', C, S, S], "skipped": [files], "skip_reasons": [why]}``: the files
    that decode, in order, and those that do not."""
    rank_zero_info(f"Decoding {len(files):,} images of {num_classes:,} classes from {root} into {cache} (once).")

    def decode(relative: str) -> Any:
        try:
            return decode_image(root / relative, image_size, channels)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for a bad file
            return error

    # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(decode, files))
    failed = [(relative, result) for relative, result in zip(files, decoded) if isinstance(result, BaseException)]
    if len(failed) == len(files):
        raise DataFileError(
            f"None of the {len(files)} images under {root} could be decoded: {describe_failures(failed)}. "
            "Are they images? Pillow decodes BMP, GIF, JPEG, PGM/PPM, PNG, TIFF and WebP."
        )
    pixels = [result for result in decoded if not isinstance(result, BaseException)]
    return {
        "images": torch.from_numpy(np.stack(pixels)),
        "skipped": [relative for relative, _ in failed],
        "skip_reasons": [describe_error(error) for _, error in failed],
    }


def kept_images(
    root: Path, images: Tensor, classes: List[str], files: List[str], labels: List[int], skipped: List[Tuple[str, str]]
) -> FolderImages:
    """The images that decoded, relabelled over the classes that still hold one, with a
    warning naming the ``(file, why)`` pairs of ``skipped`` and any class they emptied."""
    if not skipped:
        return FolderImages(images, torch.tensor(labels, dtype=torch.long), classes, files)
    left_out = {relative for relative, _ in skipped}
    kept = [(relative, label) for relative, label in zip(files, labels) if relative not in left_out]
    remaining = sorted({label for _, label in kept})
    emptied = [classes[label] for label in range(len(classes)) if label not in set(remaining)]
    new_label = {label: index for index, label in enumerate(remaining)}
    dropped = f" Class folder(s) left with no image, and so dropped: {', '.join(emptied)}." if emptied else ""
    # Once per process (one warning location, so Python shows it once though prepare_data and
    # setup both load) and on rank 0 only: the same news from every DDP rank is noise.
    rank_zero_warn(
        f"Skipping {len(skipped)} of the {len(files)} images under {root}, which could not be decoded: "
        f"{describe_failures(skipped)}. The other {len(kept)} are used.{dropped} "
        "Delete or replace those files to silence this warning."
    )
    return FolderImages(
        images,
        torch.tensor([new_label[label] for _, label in kept], dtype=torch.long),
        [classes[label] for label in remaining],
        [relative for relative, _ in kept],
    )


def split_folder(
    folder: FolderImages, root: str, fractions: Sequence[float], seed: int, class_lists: Optional[Dict[str, List[str]]]
) -> Dict[str, LabelledData]:
    """The classes of ``folder`` by split: as named in ``class_lists``, or if it is ``None`` by a
    shuffle seeded with ``seed`` in ``fractions``."""
    if class_lists is None:
        return split_by_class(folder.images, folder.labels, fractions, seed)
    index = {name: label for label, name in enumerate(folder.classes)}
    unknown = sorted({name for names in class_lists.values() for name in names} - index.keys())
    if unknown:
        raise ValueError(
            f"Class(es) {', '.join(unknown[:10])} are not image-holding sub-folders of {root}; "
            f"its classes are {', '.join(folder.classes[:20])}{' ...' if len(folder.classes) > 20 else ''}."
        )
    return {
        split: subset_by_classes(folder.images, folder.labels, torch.tensor([index[n] for n in names], dtype=torch.long))
        for split, names in class_lists.items()
    }


class ImageFolderDataModule(LabelledDataModule):
    """Few-shot episodes over a folder of class sub-folders of images (your own data).

    Images are decoded once into a cached uint8 tensor (see :func:`read_image_folder`); a
    changed folder (any image added, removed or edited) is decoded again. Classes are split
    either by a seeded shuffle in ``split_fractions``, or exactly as given by
    ``train_classes``, ``val_classes`` and ``test_classes`` (all three, disjoint; classes in
    none of them are left out). After ``setup``, ``classes`` holds the class folder names
    that the labels index, and ``class_split`` the names in each split; the split is also
    printed, and written to ``class_split.json`` in the run's log folder.

    Args:
        root: the folder, laid out as ``root/<class name>/<image>``.
        image_size: side of the square images the files are resized to, in pixels.
        channels: 1 (grayscale) or 3 (RGB).
        cache_dir: where the decoded tensor is cached; default ``<root>/.fewshot_cache``.
        split_fractions: fractions of the classes for train/val/test (used when no class
            lists are given).
        split_seed: seed of that shuffle (kept apart from ``seed`` so that rerunning with a new
            episode seed tests on the same classes).
        train_classes, val_classes, test_classes: class folder names of each split.
        **kwargs: the episode arguments of :class:`~fewshot_lightning.data.LabelledDataModule`
            (``ways``, ``shots``, ``queries``, ``test_ways``, ..., ``meta_batch_size``, ``seed``, ...).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 84,
        channels: int = 3,
        cache_dir: Optional[str] = None,
        split_fractions: Sequence[float] = (0.64, 0.16, 0.20),
        split_seed: int = 0,
        train_classes: Optional[List[str]] = None,
        val_classes: Optional[List[str]] = None,
        test_classes: Optional[List[str]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_image_shape(image_size, channels)
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.cache_dir = cache_dir
        self.split_fractions = check_split_fractions(split_fractions)
        self.split_seed = split_seed
        self.class_lists = check_class_lists(train_classes, val_classes, test_classes)
        self.classes: Optional[List[str]] = None
        self._files: Optional[List[str]] = None  # each image's path under root, after load_splits

    def prepare_data(self) -> None:
        # Once per node, before `setup` on every process: the decoding happens once, not per rank.
        read_image_folder(self.root, self.image_size, self.channels, self.cache_dir)

    def load_splits(self) -> Dict[str, LabelledData]:
        # load_image_folder's two halves: the class names are kept for `classes`.
        folder = read_image_folder(self.root, self.image_size, self.channels, self.cache_dir)
        self.classes = folder.classes
        self._files = folder.files
        self._identities: Optional[Dict[str, str]] = None
        return split_folder(folder, self.root, self.split_fractions, self.split_seed, self.class_lists)

    def class_identities(self) -> Optional[Dict[str, str]]:
        """Per class folder, a digest of its files' names and sizes: the same in a copy of the
        folder elsewhere (``data_source`` is the path), so that a checkpoint's class split is
        checked there too; another dataset's class of the same name differs."""
        if self._files is None:
            return None
        if self._identities is not None:  # a stat per image: once per load, not at every checkpoint save
            return self._identities
        root = Path(self.root).expanduser()
        digests: Dict[str, Any] = {}
        for relative in self._files:
            name, _, inside = relative.partition("/")
            try:
                size = (root / relative).stat().st_size
            except OSError:
                size = -1
            digests.setdefault(name, hashlib.sha256()).update(f"{inside}\t{size}\n".encode())
        self._identities = {name: digest.hexdigest()[:32] for name, digest in digests.items()}
        return self._identities

    def class_name(self, label: int) -> str:
        return self.classes[label]

    def data_source(self) -> str:
        return f"{type(self).__name__}: {Path(self.root).expanduser().resolve()}"

    def too_few_classes(self) -> Optional[str]:
        # Episodes are at least 2-way: under 6 classes, no ways and no split_fractions can work.
        if self.class_lists is not None or self.classes is None or len(self.classes) >= 2 * len(SPLITS):
            return None
        needed = [self.episode_shape[split][0] for split in SPLITS]
        root = Path(self.root).expanduser()
        return (
            f"{root} holds {len(self.classes)} class folder{'s' if len(self.classes) != 1 else ''} "
            f"({listed(self.classes, 5)}), fewer than the {' + '.join(map(str, needed))} = {sum(needed)} that the "
            "train, val and test splits need together at these ways (ways, test_ways; at least 2 each), so no "
            "split_fractions gives each split enough: use a folder with more classes"
            + nested_classes_hint(root, self.classes) + ".")

    def more_classes_advice(self, splits: List[str]) -> str:
        if self.class_lists is not None:
            return f"list more classes in {' and '.join(split + '_classes' for split in splits)}"
        return (
            f"give the {' and '.join(splits)} split{'s' if len(splits) > 1 else ''} a larger share of the "
            f"{len(self.classes)} classes through split_fractions (now {list(self.split_fractions)}), or name each "
            "split's classes with train_classes, val_classes and test_classes"
        )


def nested_classes_hint(root: Path, classes: List[str]) -> str:
    """Advice for class folders that hold no image themselves, only folders of images: each
    is read as one class (images anywhere inside it), where they may be groups of classes
    (``root/<alphabet>/<character>/...``). Empty if there are none."""
    grouped = []
    for name in classes:
        entries = [entry for entry in (root / name).iterdir() if not entry.name.startswith(".")]
        folders = [entry.name for entry in entries if entry.is_dir()]
        if len(folders) >= 2 and not any(entry.is_file() for entry in entries):
            grouped.append((name, sorted(folders)))
    if not grouped:
        return ""
    name, folders = grouped[0]
    return (f". Note: {listed([group for group, _ in grouped], 3)} hold{'s' if len(grouped) == 1 else ''} no image "
            f"itself, only folders ({name}/: {listed(folders, 4)}), and each is read as ONE class with the images of "
            f"all its folders: if those folders are the classes, point root at them ({root / name})")


def check_image_shape(image_size: int, channels: int) -> None:
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1 pixel, got {image_size}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")


def check_class_lists(
    train_classes: Optional[List[str]], val_classes: Optional[List[str]], test_classes: Optional[List[str]]
) -> Optional[Dict[str, List[str]]]:
    """The user's class lists by split, or ``None`` if none was given; raises ``ValueError`` if
    only some are given or a class is in more than one split."""
    lists = dict(zip(SPLITS, (train_classes, val_classes, test_classes)))
    given = [split for split, names in lists.items() if names is not None]
    if not given:
        return None
    if len(given) != len(SPLITS):
        missing = [f"{split}_classes" for split in SPLITS if split not in given]
        raise ValueError(
            f"Got class lists for {', '.join(given)} but not {', '.join(missing)}: give all three "
            "(disjoint), or none to split by `split_fractions`."
        )
    seen: Dict[str, str] = {}
    for split, names in lists.items():
        for name in names:
            if name in seen and seen[name] != split:
                raise ValueError(
                    f"Class {name!r} is in both {seen[name]}_classes and {split}_classes: the splits must be "
                    "disjoint, or test accuracy measures memorised classes."
                )
            seen[name] = split
    return {split: list(dict.fromkeys(names)) for split, names in lists.items()}
