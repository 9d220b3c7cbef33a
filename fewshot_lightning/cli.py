"""The ``fewshot-lightning`` command: Lightning's CLI over our algorithms and DataModules.

    fewshot-lightning fit --config configs/maml_sinusoid.yaml
    fewshot-lightning test --config configs/maml_sinusoid.yaml --ckpt_path path/to/last.ckpt
"""
from __future__ import annotations

from typing import List, Optional

from lightning.pytorch.cli import LightningCLI

from .algorithms import MetaLearner
from .data import TaskDataModule


def main(args: Optional[List[str]] = None) -> None:
    LightningCLI(
        MetaLearner,
        TaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
