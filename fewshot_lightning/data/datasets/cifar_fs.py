"""Few-shot benchmarks carved out of CIFAR-100 (Krizhevsky 2009): CIFAR-FS and FC100.

Both pool CIFAR-100's train and test images (600 per class, 32x32 RGB) and split the 100
classes; they differ in how. The splits below are data copied from the papers' published
split files, not derived.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR100

from ..datamodule import SPLITS, LabelledDataModule, subset_by_classes
from ..episodes import LabelledData
from ._storage import DataFileError, PathLike, fetching, load_pickle, missing

#: CIFAR-FS, Bertinetto et al., "Meta-learning with differentiable closed-form solvers"
#: (ICLR 2019): the class names of their split files (r2d2 repository,
#: ``data/cifar100/splits/bertinetto/{train,val,test}.txt``), 64/16/20.
CIFAR_FS_CLASSES: Dict[str, Tuple[str, ...]] = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl", "can",
        "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch", "bee",
        "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road",
        "skyscraper", "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon",
        "skunk", "lobster", "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse",
        "rabbit", "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "val": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
        "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
        "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
    ),
}

#: FC100, Oreshkin et al., "TADAM: Task dependent adaptive metric for improved few-shot
#: learning" (NeurIPS 2018, supplementary material): CIFAR-100 superclass (coarse label)
#: indices, 12/4/4 superclasses = 60/20/20 classes. Whole superclasses per split, so test
#: classes share no superclass with training ones.
FC100_SUPERCLASSES: Dict[str, Tuple[int, ...]] = {
    # fish, flowers, food_containers, fruit_and_vegetables, household_electrical_devices,
    # household_furniture, large_man-made_outdoor_things, large_natural_outdoor_scenes,
    # reptiles, trees, vehicles_1, vehicles_2
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    # large_carnivores, large_omnivores_and_herbivores, non-insect_invertebrates, small_mammals
    "val": (8, 11, 13, 16),
    # aquatic_mammals, insects, medium_mammals, people
    "test": (0, 7, 12, 14),
}

FOLDER = "cifar-100-python"
#: Where torchvision's CIFAR100 fetches the archive from.
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
HOW_TO_GET = (
    "Pass download=True (--data.init_args.download true on the command line; or call download_cifar100) to "
    "fetch CIFAR-100 (python version) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, or extract cifar-100-python.tar.gz there yourself."
)


class CIFAR100Images(NamedTuple):
    """All 60,000 CIFAR-100 images ``[N, 3, 32, 32]`` uint8 (train and test files pooled), their
    fine and coarse labels ``[N]``, and the fine class names."""

    images: Tensor
    fine_labels: Tensor
    coarse_labels: Tensor
    class_names: List[str]


def download_cifar100(root: PathLike = "data") -> None:
    """Fetch CIFAR-100 (python version) into ``{root}/cifar-100-python/`` with torchvision, which
    checks the archive's MD5 and extracts it; nothing is fetched if it is already there."""
    folder = Path(root).expanduser()
    with fetching(CIFAR100_URL, folder, "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted"):
        CIFAR100(str(folder), train=True, download=True)


def load_cifar_fs(root: PathLike = "data") -> Dict[str, LabelledData]:
    """CIFAR-FS (see :class:`CIFARFSDataModule`): the 64/16/20 classes of :data:`CIFAR_FS_CLASSES`,
    uint8 images ``[N, 3, 32, 32]`` labelled by their CIFAR-100 fine label."""
    cifar = read_cifar100(root)
    unknown = [name for split in SPLITS for name in CIFAR_FS_CLASSES[split] if name not in cifar.class_names]
    if unknown:
        raise DataFileError(
            f"{cifar_folder(root) / 'meta'} does not list the classes {unknown}; it is not CIFAR-100's. {HOW_TO_GET}"
        )
    index = {name: label for label, name in enumerate(cifar.class_names)}
    return split_cifar100(cifar, {split: torch.tensor([index[n] for n in CIFAR_FS_CLASSES[split]]) for split in SPLITS})


def load_fc100(root: PathLike = "data") -> Dict[str, LabelledData]:
    """FC100 (see :class:`FC100DataModule`): the classes of the 12/4/4 superclasses of
    :data:`FC100_SUPERCLASSES`, uint8 images ``[N, 3, 32, 32]`` labelled by their CIFAR-100 fine label."""
    cifar = read_cifar100(root)
    in_split = {split: torch.isin(cifar.coarse_labels, torch.tensor(FC100_SUPERCLASSES[split])) for split in SPLITS}
    return split_cifar100(cifar, {split: torch.unique(cifar.fine_labels[in_split[split]]) for split in SPLITS})


def split_cifar100(cifar: CIFAR100Images, classes: Dict[str, Tensor]) -> Dict[str, LabelledData]:
    """The images of each split's fine classes, labelled by their fine label (unique across splits)."""
    return {split: subset_by_classes(cifar.images, cifar.fine_labels, classes[split]) for split in SPLITS}


def cifar_folder(root: PathLike) -> Path:
    return Path(root).expanduser() / FOLDER


def read_cifar100(root: PathLike) -> CIFAR100Images:
    """The python-pickle release in ``{root}/cifar-100-python/`` (torchvision's layout)."""
    folder = cifar_folder(root)
    files = ("train", "test", "meta")
    absent = [name for name in files if not (folder / name).is_file()]
    if absent:
        raise missing(folder, f"the files {', '.join(files)} ({', '.join(absent)} absent)", HOW_TO_GET)
    meta = load_pickle(folder / "meta", "a dict with 'fine_label_names'", HOW_TO_GET)
    if not isinstance(meta, dict) or "fine_label_names" not in meta:
        raise DataFileError(f"{folder / 'meta'} has no 'fine_label_names'; it is not CIFAR-100's. {HOW_TO_GET}")
    parts = [read_cifar100_file(folder / name) for name in ("train", "test")]
    return CIFAR100Images(
        torch.cat([images for images, _, _ in parts]),
        torch.cat([fine for _, fine, _ in parts]),
        torch.cat([coarse for _, _, coarse in parts]),
        list(meta["fine_label_names"]),
    )


def read_cifar100_file(path: Path) -> Tuple[Tensor, Tensor, Tensor]:
    content = load_pickle(path, "a dict with 'data', 'fine_labels' and 'coarse_labels'", HOW_TO_GET)
    keys = {"data", "fine_labels", "coarse_labels"}
    if not isinstance(content, dict) or not keys <= set(content):
        raise DataFileError(f"{path} lacks {sorted(keys)}; it is not CIFAR-100's python release. {HOW_TO_GET}")
    data = np.asarray(content["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFileError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]. {HOW_TO_GET}")
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue): a reshape gives CHW.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    fine = torch.as_tensor(content["fine_labels"], dtype=torch.long)
    coarse = torch.as_tensor(content["coarse_labels"], dtype=torch.long)
    if not len(images) == len(fine) == len(coarse):
        raise DataFileError(f"{path} has {len(images)} images but {len(fine)} labels; it is damaged. {HOW_TO_GET}")
    return images, fine, coarse


class _CIFAR100FewShot(LabelledDataModule):
    """Shared arguments of the CIFAR-100 benchmarks; subclasses choose the loader."""

    def __init__(
        self, root: PathLike = "data", download: bool = False, meta_batch_size: int = 4, **kwargs: Any
    ) -> None:
        super().__init__(meta_batch_size=meta_batch_size, **kwargs)
        self.root = root
        self.download = download

    def prepare_data(self) -> None:
        # Once per node, before `setup` on every process: ranks never download at the same time.
        if self.download:
            download_cifar100(self.root)


class CIFARFSDataModule(_CIFAR100FewShot):
    """CIFAR-FS (Bertinetto et al., ICLR 2019): CIFAR-100 split 64/16/20 by class, 600 32x32
    RGB images per class; the class lists are :data:`CIFAR_FS_CLASSES` (:func:`load_cifar_fs`).

    Args:
        root: folder holding ``cifar-100-python/`` (torchvision's ``CIFAR100`` layout, so both
            share one download).
        download: fetch CIFAR-100 with torchvision (MD5-checked) if it is not there
            (:func:`download_cifar100`).
        meta_batch_size: tasks per step (4, as for mini-ImageNet).
        **kwargs: the episode arguments of :class:`~fewshot_lightning.data.LabelledDataModule`
            (``ways``, ``shots``, ``queries``, ``test_ways``, ..., ``num_workers``, ``seed``, ...).
    """

    def load_splits(self) -> Dict[str, LabelledData]:
        return load_cifar_fs(self.root)


class FC100DataModule(_CIFAR100FewShot):
    """FC100 (Oreshkin et al., NeurIPS 2018): CIFAR-100 split by superclass, 12/4/4
    superclasses = 60/20/20 classes of 600 32x32 RGB images; see :data:`FC100_SUPERCLASSES`
    (:func:`load_fc100`).

    Args: as :class:`CIFARFSDataModule`.
    """

    def load_splits(self) -> Dict[str, LabelledData]:
        return load_fc100(self.root)
