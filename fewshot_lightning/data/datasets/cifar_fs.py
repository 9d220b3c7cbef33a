"""Few-shot benchmarks carved out of CIFAR-100 (Krizhevsky 2009): CIFAR-FS and FC100.

Both pool CIFAR-100's train and test images (600 per class, 32x32 RGB) and split the 100
classes; they differ in how. The splits below are data copied from the papers' published
split files, not derived.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR100

from ..datamodule import SPLITS, EpisodicDataModule, subset_by_classes
from ..episodes import LabelledData, Transform
from ._storage import PathLike, load_pickle, missing

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
HOW_TO_GET = (
    "Pass download=True to fetch CIFAR-100 (python version) from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "or extract cifar-100-python.tar.gz there yourself."
)


class CIFAR100Pool:
    """All 60,000 CIFAR-100 images (train and test files pooled) with fine and coarse labels,
    read from the python-pickle release in ``{root}/cifar-100-python/`` (torchvision's layout)."""

    def __init__(self, root: PathLike, download: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.folder = self.root / FOLDER
        files = ("train", "test", "meta")
        absent = [name for name in files if not (self.folder / name).is_file()]
        if absent and download:
            # torchvision downloads, checks the archive's MD5 and extracts it.
            CIFAR100(str(self.root), train=True, download=True)
            absent = [name for name in files if not (self.folder / name).is_file()]
        if absent:
            raise missing(self.folder, f"the files {', '.join(files)} ({', '.join(absent)} absent)", HOW_TO_GET)
        meta = load_pickle(self.folder / "meta", "a dict with 'fine_label_names'", HOW_TO_GET)
        if not isinstance(meta, dict) or "fine_label_names" not in meta:
            raise RuntimeError(f"{self.folder / 'meta'} has no 'fine_label_names'; it is not CIFAR-100's. {HOW_TO_GET}")
        self.class_names: List[str] = list(meta["fine_label_names"])
        parts = [self._read(self.folder / name) for name in ("train", "test")]
        self.images = torch.cat([images for images, _, _ in parts])
        self.fine_labels = torch.cat([fine for _, fine, _ in parts])
        self.coarse_labels = torch.cat([coarse for _, _, coarse in parts])

    def _read(self, path: Path) -> Tuple[Tensor, Tensor, Tensor]:
        content = load_pickle(path, "a dict with 'data', 'fine_labels' and 'coarse_labels'", HOW_TO_GET)
        keys = {"data", "fine_labels", "coarse_labels"}
        if not isinstance(content, dict) or not keys <= set(content):
            raise RuntimeError(f"{path} lacks {sorted(keys)}; it is not CIFAR-100's python release. {HOW_TO_GET}")
        data = np.asarray(content["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise RuntimeError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]. {HOW_TO_GET}")
        # Rows are stored channel-major (1024 red, 1024 green, 1024 blue): a reshape gives CHW.
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        fine = torch.as_tensor(content["fine_labels"], dtype=torch.long)
        coarse = torch.as_tensor(content["coarse_labels"], dtype=torch.long)
        if not len(images) == len(fine) == len(coarse):
            raise RuntimeError(f"{path} has {len(images)} images but {len(fine)} labels; it is damaged. {HOW_TO_GET}")
        return images, fine, coarse

    def classes_named(self, names: Sequence[str]) -> Tensor:
        unknown = [name for name in names if name not in self.class_names]
        if unknown:
            raise RuntimeError(
                f"{self.folder / 'meta'} does not list the classes {unknown}; it is not CIFAR-100's. {HOW_TO_GET}"
            )
        return torch.tensor([self.class_names.index(name) for name in names])

    def classes_of_superclasses(self, superclasses: Sequence[int]) -> Tensor:
        return torch.unique(self.fine_labels[torch.isin(self.coarse_labels, torch.tensor(superclasses))])

    def split(self, classes: Dict[str, Tensor]) -> Dict[str, LabelledData]:
        """The images of each split's fine classes, labelled by their CIFAR-100 fine label (unique across splits)."""
        return {split: subset_by_classes(self.images, self.fine_labels, classes[split]) for split in SPLITS}


class _CIFAR100FewShot(EpisodicDataModule):
    """Shared arguments of the CIFAR-100 benchmarks; subclasses choose the classes."""

    def __init__(
        self,
        root: PathLike = "data",
        download: bool = False,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        test_ways: Optional[int] = None,
        test_shots: Optional[int] = None,
        test_queries: Optional[int] = None,
        train_transform: Optional[Transform] = None,
        meta_batch_size: int = 4,
        train_tasks: int = 32_000,
        val_tasks: int = 200,
        test_tasks: int = 600,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(
            ways=ways, shots=shots, queries=queries, test_ways=test_ways, test_shots=test_shots,
            test_queries=test_queries, train_transform=train_transform, meta_batch_size=meta_batch_size,
            train_tasks=train_tasks, val_tasks=val_tasks, test_tasks=test_tasks, num_workers=num_workers, seed=seed,
        )
        self.root = Path(root).expanduser()
        self.download = download

    def prepare_data(self) -> None:
        # Once per node, before `setup` on every process: ranks never download at the same time.
        if self.download:
            CIFAR100(str(self.root), train=True, download=True)

    def split_classes(self, pool: CIFAR100Pool) -> Dict[str, Tensor]:
        raise NotImplementedError

    def load_splits(self) -> Dict[str, LabelledData]:
        pool = CIFAR100Pool(self.root, self.download)
        return pool.split(self.split_classes(pool))


class CIFARFSDataModule(_CIFAR100FewShot):
    """CIFAR-FS (Bertinetto et al., ICLR 2019): CIFAR-100 split 64/16/20 by class, 600 32x32
    RGB images per class; the class lists are :data:`CIFAR_FS_CLASSES`.

    Args:
        root: folder holding ``cifar-100-python/`` (torchvision's ``CIFAR100`` layout, so both
            share one download).
        download: fetch CIFAR-100 with torchvision (MD5-checked) if it is not there.
        ways, shots, queries, test_ways, test_shots, test_queries, train_transform,
        meta_batch_size, train_tasks, val_tasks, test_tasks, num_workers, seed: as in
            :class:`~fewshot_lightning.data.EpisodicDataModule`.
    """

    def split_classes(self, pool: CIFAR100Pool) -> Dict[str, Tensor]:
        return {split: pool.classes_named(CIFAR_FS_CLASSES[split]) for split in SPLITS}


class FC100DataModule(_CIFAR100FewShot):
    """FC100 (Oreshkin et al., NeurIPS 2018): CIFAR-100 split by superclass, 12/4/4
    superclasses = 60/20/20 classes of 600 32x32 RGB images; see :data:`FC100_SUPERCLASSES`.

    Args: as :class:`CIFARFSDataModule`.
    """

    def split_classes(self, pool: CIFAR100Pool) -> Dict[str, Tensor]:
        return {split: pool.classes_of_superclasses(FC100_SUPERCLASSES[split]) for split in SPLITS}
