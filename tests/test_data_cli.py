"""Every DataModule on the command line: LightningCLI follows ``**kwargs`` to the base classes,
so each lists (and resolves) its own arguments and every inherited one, with today's defaults."""
import re

import pytest
import yaml

from fewshot_lightning.cli import main
from test_cli import run_cli

TASK = {"meta_batch_size": 32, "train_tasks": 32_000, "val_tasks": 200, "test_tasks": 600, "num_workers": 2, "seed": 0}
EPISODE = {"ways": 5, "shots": 1, "queries": 15, "test_ways": None, "test_shots": None, "test_queries": None}
LABELLED = {**TASK, **EPISODE, "train_transform": None}

# class path: (its own arguments with their defaults, the inherited ones with theirs). The
# defaults a class changes are its own: mini-ImageNet's meta-batch of 4, sinusoid's 25 tasks.
DATA_MODULES = {
    "fewshot_lightning.data.EpisodicDataModule": (
        {"data": None, "labels": None, "split_fractions": [0.64, 0.16, 0.2], "split_seed": 0}, LABELLED),
    "fewshot_lightning.data.SinusoidDataModule": (
        {"shots": 10, "queries": 10, "meta_batch_size": 25, "train_tasks": 25_000, "num_workers": 0}, TASK),
    "fewshot_lightning.data.Learn2LearnDataModule": (
        {"benchmark": None, "root": "data", "tasksets": None, "benchmark_kwargs": None}, {**TASK, **EPISODE}),
    "fewshot_lightning.data.datasets.OmniglotDataModule": (
        {"root": "data", "download": False, "image_size": 28, "train_rotations": True, "eval_rotations": True,
         "split": "vinyals", "split_sizes": [1100, 100, 423], "split_seed": 0},
        LABELLED),
    "fewshot_lightning.data.datasets.MiniImageNetDataModule": ({"root": "data", "meta_batch_size": 4}, LABELLED),
    "fewshot_lightning.data.datasets.TieredImageNetDataModule": ({"root": "data", "meta_batch_size": 4}, LABELLED),
    "fewshot_lightning.data.datasets.CIFARFSDataModule": (
        {"root": "data", "download": False, "meta_batch_size": 4}, LABELLED),
    "fewshot_lightning.data.datasets.FC100DataModule": (
        {"root": "data", "download": False, "meta_batch_size": 4}, LABELLED),
    "fewshot_lightning.data.datasets.ImageFolderDataModule": (
        {"root": None, "image_size": 84, "channels": 3, "cache_dir": None, "split_fractions": [0.64, 0.16, 0.2],
         "split_seed": 0, "train_classes": None, "val_classes": None, "test_classes": None}, LABELLED),
}


def printed_config(capsys, monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["fewshot-lightning"])  # the arguments are `args`, not pytest's
    with pytest.raises(SystemExit) as exit:
        main(["fit", *args, "--print_config"])
    assert exit.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["data"]


@pytest.mark.parametrize("class_path", DATA_MODULES, ids=lambda path: path.rsplit(".", 1)[1])
def test_print_config_lists_own_and_inherited_arguments_with_their_defaults(class_path, capsys, monkeypatch):
    own, inherited = DATA_MODULES[class_path]
    data = printed_config(capsys, monkeypatch, "--data", class_path)
    assert data["class_path"] == class_path
    # Exactly these: nothing missing, and no argument of a sibling (EpisodicDataModule's `data`) leaks in.
    assert data["init_args"] == {**inherited, **own}


@pytest.mark.parametrize("class_path", DATA_MODULES, ids=lambda path: path.rsplit(".", 1)[1])
def test_inherited_arguments_resolve_and_reach_the_base_class(class_path, capsys, monkeypatch):
    own, inherited = DATA_MODULES[class_path]
    overrides = {"seed": 7, "meta_batch_size": 3, "val_tasks": 11}
    if "test_ways" in inherited:
        overrides["test_ways"] = 3
    args = [item for name, value in overrides.items() for item in (f"--data.{name}", str(value))]
    if "benchmark" in own:
        args += ["--data.benchmark", "omniglot"]  # one of benchmark/tasksets is required to build it
    data = printed_config(capsys, monkeypatch, "--data", class_path, *args)
    for name, value in overrides.items():
        assert data["init_args"][name] == value, name
    # The resolved config builds the DataModule, and the values land where the base classes keep them.
    module_name, class_name = class_path.rsplit(".", 1)
    datamodule = getattr(__import__(module_name, fromlist=[class_name]), class_name)(**data["init_args"])
    assert datamodule.seed == 7 and datamodule.meta_batch_size == 3 and datamodule.num_tasks["val"] == 11
    if "test_ways" in inherited:
        assert datamodule.episode_shape["train"][0] == 5 and datamodule.episode_shape["test"][0] == 3


def test_kanji_lists_every_inherited_argument(capsys, monkeypatch):
    # KanjiDataModule is maintained elsewhere: only its inherited arguments are checked here.
    data = printed_config(capsys, monkeypatch, "--data", "fewshot_lightning.data.datasets.KanjiDataModule")
    assert {**TASK, **EPISODE}.items() <= data["init_args"].items()


def test_the_command_line_help_documents_inherited_arguments(tmp_path):
    # The installed entry point in a fresh process, as a user types it.
    class_path = "fewshot_lightning.data.datasets.MiniImageNetDataModule"
    out = run_cli("fit", "--data", class_path, "--data.help", class_path, cwd=tmp_path)
    for argument in ("--data.root", "--data.ways", "--data.test_ways", "--data.meta_batch_size", "--data.seed"):
        assert argument in out, argument
    # One entry per argument: "  --data.<name> ...", up to the next one.
    entries = {entry.split()[0]: entry for entry in re.split(r"\n  (?=--data\.)", out)[1:]}
    assert "(type: int, default: 4)" in " ".join(entries["--data.meta_batch_size"].split())  # not the base's 32
    assert "N of validation and test episodes" in out  # the base classes' docstrings reach the help
