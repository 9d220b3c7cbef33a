"""Episodic data: the :class:`TaskBatch` contract, task datasets and DataModules."""
from .datamodule import (
    ClassificationDataModule, EpisodicDataModule, LabelledDataModule, TaskDataModule, split_by_class, subset_by_classes,
)
from .episodes import (
    EpisodeDataset, EpisodeSampler, LabelledData, TaskDataset, check_episode_shape, check_finite, labels_of,
)
from .learn2learn_tasks import Learn2LearnDataModule, Learn2LearnTasks
from .sinusoid import SinusoidDataModule, SinusoidTasks
from .task import TaskBatch, collate_tasks, scale_images

__all__ = [
    "ClassificationDataModule",
    "EpisodeDataset",
    "EpisodeSampler",
    "EpisodicDataModule",
    "LabelledData",
    "LabelledDataModule",
    "Learn2LearnDataModule",
    "Learn2LearnTasks",
    "SinusoidDataModule",
    "SinusoidTasks",
    "TaskBatch",
    "TaskDataModule",
    "TaskDataset",
    "check_episode_shape",
    "check_finite",
    "collate_tasks",
    "scale_images",
    "labels_of",
    "split_by_class",
    "subset_by_classes",
]
