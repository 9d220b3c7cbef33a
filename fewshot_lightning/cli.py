"""The ``fewshot-lightning`` command: Lightning's CLI over our algorithms and DataModules.

    fewshot-lightning fit     --config configs/maml_sinusoid.yaml
    fewshot-lightning fit     --config configs/maml_sinusoid.yaml --ckpt_path last   # resume
    fewshot-lightning test    --config configs/maml_sinusoid.yaml --ckpt_path best
    fewshot-lightning predict --config configs/maml_sinusoid.yaml --ckpt_path last

What it adds to ``LightningCLI``, so that a run's number can be trusted:

- ``--ckpt_path last`` and ``best`` look in the previous runs of the config (the run folder of
  the logger, ``version_N`` or a named version, whose ``checkpoints/last.ckpt`` was saved most
  recently), and a resumed
  ``fit`` goes on writing into that run's folder. ``test``, ``validate`` and ``predict``
  refuse to score weights no checkpoint gave unless ``--untrained true`` asks for it.
- The config and the command line decide the model's arguments; a checkpoint's saved ones do
  not replace them (a warning names those that differ), and a checkpoint saved by another
  learner class is refused.
- Every run trains under a :class:`~fewshot_lightning.callbacks.NonFiniteGuard`, configured
  as ``--nonfinite.policy raise|skip`` and ``--nonfinite.max_consecutive_skips``.
- A new run reserves its version folder atomically, so two runs started together get two;
  a run that fails before finishing a batch removes the folder it reserved.
- Bad input reported by our code (a ``ValueError`` from a constructor, a missing file, a
  non-finite loss, a checkpoint whose weights do not fit the configured model) is printed as
  a short message rather than a traceback, with exit code 1;
  ``FEWSHOT_LIGHTNING_TRACEBACK=1`` shows the whole traceback.
- ``predict`` writes the query predictions of the test episodes to ``predictions.pt`` in
  the run's folder (see :class:`~fewshot_lightning.callbacks.PredictionWriter`).
"""
from __future__ import annotations

import contextlib
import dis
import importlib
import linecache
import os
import signal
import re
import shutil
import sys
import tempfile
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, List, Literal, Optional, Sequence

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from . import allocator
from ._text import listed
from .algorithms import MetaLearner
from .algorithms.base import same_value
from .algorithms.maml import out_of_memory
from .callbacks import LastCheckpoint, NonFiniteError, NonFiniteGuard, PredictionWriter, RequeueAtStepEnd
from .data.datasets._storage import DataFileError
from .data import TaskDataModule

TRACEBACK_VARIABLE = "FEWSHOT_LIGHTNING_TRACEBACK"
#: The command's exit code after a SIGTERM stopped a run before its end (128 + 15, as a shell reports one).
SIGTERM_EXIT = 143
#: The exit code of a fit stopped by Ctrl-C at a step end (128 + SIGINT, as a shell reports it).
SIGINT_EXIT = 130
#: Data arguments a resume may change without changing the task stream (where the data lie, how
#: many processes load it: the stream is the same with workers or without, tests/test_resume.py).
STREAM_NEUTRAL = frozenset({"num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "root", "cache_dir",
                            "download"})
#: The entry every checkpoint Lightning writes holds (its loader fails with a KeyError on it otherwise).
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
_PACKAGE = Path(__file__).resolve().parent
#: Lightning's trainer package: its deliberate ValueErrors are refusals of a setting (see _user_error).
_LIGHTNING = Path(L.__file__).resolve().parent / "pytorch"
#: Lightning's shared layer (accelerators, devices), whose deliberate errors are refusals of a setting too.
_FABRIC = Path(L.__file__).resolve().parent / "fabric"
#: torch.optim, whose optimizers and schedulers refuse bad arguments with a ValueError.
_TORCH_OPTIM = Path(torch.optim.__file__).resolve().parent
_LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION


class RunFolder(Callback):
    """The version folder this process reserved for a new run, and whether any batch finished
    in it: a run that fails before one did leaves nothing worth keeping there. Also a folder it
    shares with earlier runs (a resumed run's own, or the ``default_root_dir`` of runs without a
    logger) and what was there before, so that a failure leaves only that."""

    def __init__(self) -> None:
        self.path: Optional[Path] = None
        self.batches = 0
        self.shared: Optional[Path] = None
        self.existed = False
        self.before: set = set()
        #: The folders above ``path`` that this run made, deepest first.
        self.made: List[Path] = []

    def share(self, folder: Path) -> None:
        # Its top level only (where a run writes its config and logs): without a logger the
        # folder is the working directory, which may hold a whole dataset below.
        self.shared, self.existed = folder, folder.is_dir()
        self.before = set(folder.iterdir()) if self.existed else set()

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking:
            self.batches += 1

    def on_test_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_predict_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def remove_if_unused(self) -> None:
        if self.path is not None and not self.batches and not any(self.path.rglob("*.ckpt")):
            shutil.rmtree(self.path, ignore_errors=True)
            # The logger's folders this run made (lightning_logs/<name>/), if nothing else is there.
            for folder in self.made or [self.path.parent]:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        if self.shared is not None and not self.batches and self.shared.is_dir():
            # What this run added (its config.resume1.yaml, a TensorBoard events file): a failed
            # resume recorded a run that never happened beside the real one.
            for path in self.shared.iterdir():
                if path not in self.before and path.is_file() and path.suffix != ".ckpt":
                    with contextlib.suppress(OSError):
                        path.unlink()
            with contextlib.suppress(OSError):
                if not self.existed:
                    self.shared.rmdir()  # made by this run, and empty now


#: The trainer's options whose meaning changes between an int (batches) and a float (a fraction).
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _batch_limits_read_integers_first(parser: LightningArgumentParser) -> None:
    """Read ``--trainer.limit_*_batches 1`` (or ``1`` in a config file) as one batch, not 100%.

    ``Trainer`` takes an int as a number of batches and a float as a fraction of them, so ``1``
    means one batch and ``1.0`` all of them. Its signature is ``Optional[Union[int, float]]``, but
    ``typing`` caches unions as equal whatever their order, and the one Lightning's signature
    gets in this environment reads ``Union[float, int, None]``: the CLI then tries ``float``
    first and turns ``1`` into ``1.0``, so ``--trainer.limit_test_batches 1`` scored every test
    batch (with Lightning's message that 100% will be used, and exit code 0). The four options
    are given the order the signature writes, ``Union[int, float, None]`` (which keeps its order;
    written with ``typing``, not ``int | float``, which Python 3.9 cannot evaluate): ``1`` is one batch, ``1.0`` and ``0.5`` fractions, as in Python.
    The type is an attribute of jsonargparse's action; if a later version has none, nothing is
    changed (``tests/test_cli.py`` would then fail on the one-batch check).
    """
    for action in parser._actions:
        if action.dest in {f"trainer.{name}" for name in BATCH_LIMITS} and hasattr(action, "_typehint"):
            action._typehint = typing.Union[int, float, None]
        # ``val_check_interval`` (an int: every so many batches; a float: a fraction of the epoch) has
        # the same union in Lightning 2.5 (2.6 writes int first, with more types after): there
        # ``--trainer.val_check_interval 2`` became 2.0, which Lightning refuses with
        # ``check_val_every_n_epoch null``, and ``1`` a whole epoch instead of every batch.
        elif (action.dest == "trainer.val_check_interval" and hasattr(action, "_typehint")
              and set(typing.get_args(action._typehint)) == {int, float, type(None)}):
            action._typehint = typing.Union[int, float, None]


#: ``--help``'s text for ``--ckpt_path``.
CKPT_PATH_HELP = (
    "a checkpoint file, or 'last' (the newest last checkpoint of this config's runs: of the logger's run folders, "
    "version_N or named, the checkpoints/last.ckpt or last-vN.ckpt saved most recently) or 'best' (the best "
    "checkpoint the newest run's ModelCheckpoint recorded). fit: resume that run (its optimizer and scheduler as "
    "saved). test, validate, predict: required, unless --untrained true scores the initial weights.")


class FewShotArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors in the arguments (a value of the wrong type, an unknown
    option) are one short message with exit code 1, as the command's other input errors are:
    argparse's usage (sixty lines) and jsonargparse's nested report of every Union member it
    tried are left out (``FEWSHOT_LIGHTNING_TRACEBACK=1`` shows them)."""

    def add_method_arguments(self, *args: Any, **kwargs: Any) -> Any:
        added = super().add_method_arguments(*args, **kwargs)
        for action in self._actions:
            if action.dest == "ckpt_path":  # Lightning's text describes Trainer.fit's, not this command's
                action.help = CKPT_PATH_HELP
        return added

    def error(self, message: str, ex: Optional[Exception] = None) -> typing.NoReturn:
        if not self.exit_on_error or os.environ.get(TRACEBACK_VARIABLE) or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        sys.stderr.write(
            f"error: {condensed_parse_error(message)}\n({self.prog.replace(' [options]', '')} --help lists the "
            f"arguments; {TRACEBACK_VARIABLE}=1 shows the parser's whole report)\n")
        self.exit(1)


def condensed_parse_error(message: str) -> str:
    """jsonargparse's report of a bad argument in one line: the argument as typed on the command
    line (``--model.init_args.inner_steps``) and the innermost problem, where the report nests
    it under each Union member tried ("Does not validate against any of the Union subtypes")."""
    keys, problem, nested, class_path, given, done = [], [], False, None, None, False
    for line in message.splitlines():
        stripped = line.strip()
        found = re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', stripped)
        if found:
            keys.append(found.group(1))
            stripped = found.group(2)  # the problem, when on the same line
        if stripped.startswith(("- Problem with given class_path", "Problem with given class_path")):
            nested = True
            keys.append("init_args")
            class_path = stripped.split("'")[1] if stripped.count("'") >= 2 else None
            continue
        if not stripped:
            continue
        if stripped.startswith("Given value:") and nested and given is None:
            given = stripped[len("Given value:"):].strip()
        if nested and stripped.startswith("- ") and problem:
            done = True  # the next Union member tried (None): not what the user meant
        if done:
            continue
        if stripped.startswith(("Does not validate against any", "Subtypes:", "Errors:", "Given value")):
            continue
        problem.append(stripped)
    text = " ".join(part[2:] if part.startswith("- ") else part for part in problem)
    text = text.replace("Expected a <class 'collections.abc.Sequence'>", "Expected a list, e.g. [a, b]")
    unknown = re.fullmatch(r"Option '([^']+)' is not accepted", text)
    if unknown and keys and keys[-1] == "init_args":
        keys.append(unknown.group(1))
        text = f"not an argument of {class_path}" if class_path else "not an argument of this class"
    elif given is not None and "Got value" not in text and not given.startswith("NestedArg("):
        text += f". Got value: {given}"
    argument = "--" + ".".join(keys) if keys else ""
    return f"{argument}: {text}" if argument else text


class FewShotCLI(LightningCLI):
    """``LightningCLI`` with checkpoint look-up, a non-finite guard and run folders one can trust
    (see the module's docstring)."""

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        if trainer is None:
            return
        _drop_switched_off_callbacks(trainer)
        interval = trainer.get("val_check_interval")
        if isinstance(interval, float) and not isinstance(interval, bool) and trainer.get("check_val_every_n_epoch") is None:
            # The configs count validation steps across epochs (check_val_every_n_epoch: null), for
            # which Lightning's Trainer refuses a fraction of an epoch: a fraction asks for epochs.
            trainer["check_val_every_n_epoch"] = 1
            rank_zero_info(f"--trainer.val_check_interval {interval} is a fraction of an epoch: validating every epoch at "
                           "that fraction (check_val_every_n_epoch 1, where the config counted steps across epochs).")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _batch_limits_read_integers_first(parser)
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_argument(
            "--untrained", type=bool, default=False,
            help="test/validate/predict: score the model's initial, untrained weights (a baseline) instead "
            "of a checkpoint. Without it these subcommands need --ckpt_path.",
        )
        parser.add_argument(
            "--cpu_allocator", type=Literal["keep", "keep_all", "system"], default="keep",
            help="runs on the CPU: 'keep' has glibc keep freed memory for reuse (blocks up to 32 MiB from its "
            "heap) instead of mapping each step's activations afresh; 'keep_all' serves every block from the "
            "heap (faster on large images, more peak memory); 'system' leaves the C allocator as it is. See "
            "fewshot_lightning.allocator and docs/benchmarks.md.",
        )

    def before_fit(self) -> None:
        self._prepare("fit")

    def before_validate(self) -> None:
        self._prepare("validate")

    def before_test(self) -> None:
        self._prepare("test")

    def before_predict(self) -> None:
        self._prepare("predict")

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI replaces the configured model's arguments with the hyperparameters
        saved in ``--ckpt_path`` when that is a file (not for ``last`` or ``best``, resolved
        later): ``test --ckpt_path run.ckpt --model.init_args.test_inner_steps 3`` evaluated with
        the checkpoint's 10 steps, and a checkpoint of another learner silently swapped the
        configured one. Here the config and the command line decide; :meth:`_compare_with`
        refuses a checkpoint of another learner and names the arguments that differ."""

    def _compare_with(self, checkpoint: str) -> None:
        """Stop if ``checkpoint`` was saved by another learner class than the configured one;
        warn, naming them, where its saved arguments differ from the configured ones."""
        if checkpoint == "hpc" or "://" in checkpoint or not Path(checkpoint).is_file():
            return
        readable_checkpoint(checkpoint)
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old (non-zip) file, or objects weights_only refuses: Lightning's load reports it
            return
        if not isinstance(saved, dict):
            raise ValueError(
                f"--ckpt_path {checkpoint} is not a Lightning checkpoint: it holds a {type(saved).__name__}. Pass a .ckpt "
                "file a run saved (its run folder's checkpoints/), or 'last' or 'best'.")
        if "state_dict" not in saved:
            raise ValueError(
                f"--ckpt_path {checkpoint} is not a Lightning checkpoint: it holds "
                f"{', '.join(map(repr, list(saved)[:6]))}{', ...' if len(saved) > 6 else ''} but no 'state_dict'. Pass a "
                ".ckpt file a run saved (its run folder's checkpoints/), or 'last' or 'best'.")
        if LIGHTNING_VERSION_KEY not in saved:
            raise ValueError(
                f"--ckpt_path {checkpoint} holds a 'state_dict' but not the rest of a Lightning checkpoint (no "
                f"{LIGHTNING_VERSION_KEY!r}; it holds {', '.join(map(repr, list(saved)[:6]))}): a file saved with "
                "torch.save, not by a run. Load its weights in your own code (model.load_state_dict(torch.load(path)"
                "['state_dict'])), or pass a .ckpt file a run saved, or 'last' or 'best'.")
        saved = dict(saved.get("hyper_parameters") or {}) if isinstance(saved, dict) else {}
        class_path = saved.pop("_class_path", None)
        saved.pop("_instantiator", None)
        model = self.model
        if class_path is not None and class_path.rsplit(".", 1)[-1] != type(model).__name__:
            raise ValueError(
                f"--ckpt_path {checkpoint} was saved by {class_path}, but the config's model is "
                f"{type(model).__module__}.{type(model).__qualname__}: pass the config of the run that "
                "saved it (its config.yaml, in the run's folder) or a checkpoint of this learner."
            )
        configured = dict(getattr(model, "hparams", {}))
        differ = [name for name, value in saved.items() if name in configured and not same_value(configured[name], value)]
        newer = [name for name in configured if saved and name not in saved and not name.startswith("_")]
        if newer:
            # An argument added to the learner since the checkpoint was saved (CNP's training_context):
            # the run that saved it ran as before it existed, whatever its default is now.
            rank_zero_warn(
                f"--ckpt_path {Path(checkpoint).name} was saved before {type(model).__name__} took "
                + ", ".join(newer) + "; this run uses " + ", ".join(f"{name}={configured[name]!r}" for name in newer)
                + ", as configured. If that is not how the checkpoint was trained, set it to the behaviour of the code "
                "that saved it (see the argument's documentation).")
        held = getattr(model, "arguments_in_weights", dict)()
        restored = [name for name in differ if name in held]
        if restored:
            # MAML++'s per-step (or learned) inner learning rates, a metric learner's scale: the
            # argument only initialises a tensor, which the checkpoint restores. The run used the
            # checkpoint's values while the warning below said the configured ones.
            raise ValueError(
                f"--ckpt_path {Path(checkpoint).name} was saved with "
                + ", ".join(f"{name}={saved[name]!r}" for name in restored)
                + " and this run sets " + ", ".join(f"{name}={configured[name]!r}" for name in restored)
                + f", but {type(model).__name__} keeps "
                + ", ".join(f"{name} in its weights ({held[name]})" for name in restored)
                + ", which the checkpoint restores: the configured value would not be used. Remove "
                + " and ".join(f"--model.init_args.{name}" for name in restored)
                + " (or give the checkpoint's value), or start a new run to train with another value."
            )
        if differ:
            rank_zero_warn(
                f"--ckpt_path {Path(checkpoint).name} was saved with "
                + ", ".join(f"{name}={saved[name]!r}" for name in differ)
                + "; this run uses " + ", ".join(f"{name}={configured[name]!r}" for name in differ)
                + ", as configured (the config and the command line decide; to run as it was trained, pass its "
                "run's config.yaml)."
            )

    def _prepare(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        self._check_trainer_counts()
        checkpoint = self._checkpoint(subcommand, config.get("ckpt_path"), bool(config.get("untrained")))
        config["ckpt_path"] = checkpoint
        # And in the config the run saves (config.yaml, config.resume1.yaml): the file `best` or `last`
        # meant at this run, which a later `best` or `last` no longer means.
        saved = self.config.get(subcommand) if hasattr(self.config, "get") else None
        if saved is not None and "ckpt_path" in saved:
            saved["ckpt_path"] = checkpoint
        if checkpoint is not None:
            self._compare_with(checkpoint)
            if subcommand == "fit":
                self._compare_data_with_run(checkpoint)
        wanted = config.get("cpu_allocator", "keep")
        if wanted != "system" and self.trainer.strategy.root_device.type == "cpu":
            before = allocator.in_effect()
            if allocator.keep_freed_memory(all_blocks=wanted == "keep_all") and allocator.in_effect() != before:
                rank_zero_info(
                    "CPU allocator: glibc keeps freed memory for reuse ("
                    + ("every block from its heap" if wanted == "keep_all" else "blocks up to 32 MiB from its heap")
                    + "; --cpu_allocator system leaves it as it is, see fewshot_lightning.allocator)."
                )
        if subcommand != "fit":
            # Outside fit the checkpoint callbacks save nothing, so the state they restore (and
            # Lightning's warning that the run's folder differs from theirs) is moot.
            warnings.filterwarnings(
                "ignore", message=r"The dirpath has changed from .* Only `best_model_path` will be reloaded\.",
                module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
            )
        if subcommand == "predict":
            self.trainer.callbacks.append(PredictionWriter())
        self._claim_run_folder(checkpoint if subcommand == "fit" else None, subcommand)

    def _compare_data_with_run(self, checkpoint: str) -> None:
        """Warn where a resumed fit's data arguments differ from those of the run that saved the
        checkpoint (its folder's ``config.yaml``, where one is): the resume continues that run's
        task stream exactly only with the same ones (another ``meta_batch_size``, ``train_tasks``
        or ``seed`` gives other batches from the next step on, without a word until now)."""
        if "://" in checkpoint:
            return
        saved_config = Path(checkpoint).resolve().parents[1] / "config.yaml"
        try:
            import yaml

            saved = (yaml.safe_load(saved_config.read_text()) or {}).get("data") or {}
        except (OSError, ValueError, AttributeError, ImportError):
            return
        data = self.config["fit"].get("data")
        current = data.as_dict() if hasattr(data, "as_dict") else data
        if not isinstance(saved, dict) or not isinstance(current, dict):
            return
        if saved.get("class_path") != current.get("class_path"):
            differ = [f"class_path {saved.get('class_path')} then, {current.get('class_path')} now"]
        else:
            before, now = saved.get("init_args") or {}, current.get("init_args") or {}
            differ = [f"{name} {before[name]!r} then, {now[name]!r} now" for name in sorted(set(before) & set(now))
                      if name not in STREAM_NEUTRAL and not same_value(before[name], now[name])]
        if differ:
            rank_zero_warn(
                f"Resuming with other data arguments than the run that saved {Path(checkpoint).name} ({saved_config}): "
                + "; ".join(differ) + ". The run goes on, but its task stream is not the one it would have continued: "
                "resume with the run's own data arguments for the exact continuation.")

    def _check_trainer_counts(self) -> None:
        """Trainer counts Lightning takes as they come and then divides by (``integer modulo by
        zero`` from inside its loop, after the run folder was made and a batch ran)."""
        trainer = self.trainer
        if trainer.accumulate_grad_batches < 1:
            raise ValueError(f"--trainer.accumulate_grad_batches must be at least 1 (batches per optimizer step), got "
                             f"{trainer.accumulate_grad_batches}.")
        interval = trainer.val_check_interval
        if interval is not None and not isinstance(interval, bool) and isinstance(interval, (int, float)) and interval <= 0:
            raise ValueError(f"--trainer.val_check_interval must be positive (batches between validations, or a fraction "
                             f"of an epoch), got {interval}; to skip validation pass --trainer.limit_val_batches 0.")
        environment = trainer._accelerator_connector.cluster_environment
        if trainer.num_nodes > 1 and isinstance(environment, LightningEnvironment) and "MASTER_ADDR" not in os.environ:
            # Lightning's own environment then waits at the first collective for machines nothing
            # starts (half an hour, the process group's timeout), leaving an empty run folder.
            raise ValueError(
                f"--trainer.num_nodes {trainer.num_nodes} without a launcher for the other machines (no SLURM job, no "
                "torchrun, no MASTER_ADDR): this process would wait for them until the process group timed out. Start "
                "the same command on every machine with torchrun (cluster/torchrun_2x4.sh) or under SLURM "
                "(cluster/README.md), or drop --trainer.num_nodes for one machine.")

    # -- checkpoints --------------------------------------------------------------------------
    def _checkpoint(self, subcommand: str, path: Optional[str], untrained: bool) -> Optional[str]:
        """The checkpoint file to load, from ``--ckpt_path`` (a path, ``last`` or ``best``)."""
        if untrained:
            if subcommand == "fit":
                raise ValueError("--untrained is for test, validate and predict; fit starts from initial weights anyway.")
            if path is not None:
                raise ValueError(f"--untrained true and --ckpt_path {path} contradict each other: drop one of them.")
            return None
        if path is None:
            if subcommand == "fit":
                return None
            raise ValueError(
                f"{subcommand} needs trained weights: pass --ckpt_path with a .ckpt file, or 'last' or 'best' "
                f"(from the newest run in {self._where_runs_are()}). To {subcommand} the untrained initial "
                "weights on purpose, pass --untrained true."
            )
        if path == "last":
            return str(self._last_checkpoint("last", subcommand))
        if path == "best":
            return str(self._best_checkpoint())
        if path != "hpc" and "://" not in str(path) and Path(path).is_dir():
            found = sorted(Path(path).glob("**/*.ckpt"))[:3]
            raise IsADirectoryError(
                f"--ckpt_path {path} is a folder: pass a checkpoint file"
                + (f", e.g. {', '.join(str(p) for p in found)}" if found else " (a run folder keeps them in checkpoints/)")
                + ", or 'last' or 'best'.")
        if path != "hpc" and "://" not in str(path) and not Path(path).is_file():
            raise FileNotFoundError(f"--ckpt_path {path}: no such file.")
        return path

    def _checkpoint_dirs(self) -> List[Path]:
        """The checkpoint folders of this config's runs, newest first."""
        fixed = [c.dirpath for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if fixed:
            return [Path(fixed[0])]
        root = self._versions_root()
        if root is None:
            return [Path(self.trainer.default_root_dir) / "checkpoints"]
        return [root / name / "checkpoints" for name in _run_folders(root)]

    def _versions_root(self) -> Optional[Path]:
        """The folder whose ``version_N`` sub-folders are runs, if the logger numbers its runs."""
        logger = self.trainer.logger
        root = getattr(logger, "root_dir", None)
        if root is None or not hasattr(logger, "_version") or "://" in str(root):
            return None
        return Path(root)

    def _where_runs_are(self) -> str:
        root = self._versions_root()
        if root is None:
            return str(self._checkpoint_dirs()[0])
        return f"{root}{os.sep}<version>{os.sep}checkpoints"

    def _newest_run(self, option: str, subcommand: str) -> Path:
        """The checkpoint folder of the newest run that trained: the one whose newest checkpoint
        (of any kind) was saved most recently, numbered and named versions alike; a fit that has
        saved none yet counts from its start (its config), as the CLI makes its checkpoint folder
        when it starts. Evaluation runs, which save no checkpoints, are not runs that trained."""
        dirs = self._checkpoint_dirs()
        found = [(when, directory) for directory in dirs for when in [_run_activity(directory)] if when is not None]
        if found:
            return max(found, key=lambda pair: pair[0])[1]
        root = self._versions_root()
        if root is None:
            found_text = f"{dirs[0]} holds no checkpoint"
        elif not dirs:
            found_text = f"{root} holds no run folder" if root.is_dir() else f"{root} does not exist"
        else:
            found_text = f"none of the {len(dirs)} version folders in {root} ({_names(dirs)}) holds checkpoints"
        advice = "Drop --ckpt_path to start a new run" if subcommand == "fit" else "Pass the path of a .ckpt file"
        setting = "--trainer.logger.init_args.save_dir and name" if root else "ModelCheckpoint's dirpath or --trainer.default_root_dir"
        advice += f", or point {setting} at the run you mean."
        raise FileNotFoundError(f"--ckpt_path {option}: found no run with checkpoints: {found_text}. {advice}")

    def _last_checkpoint(self, option: str, subcommand: str) -> Path:
        # The newest run's last checkpoint (within its folder the newest of last.ckpt and
        # last-vN.ckpt). Never an older run's: a newer run killed before its first last save
        # (LastCheckpoint saves every N steps) had its place taken by the run before it, which
        # `fit --ckpt_path last` then trained on, overwriting that finished run's last.ckpt.
        directory = self._newest_run(option, subcommand)
        last = newest_last(directory)
        if last is not None:
            return last
        held = sorted(directory.glob("*.ckpt"), key=lambda path: path.stat().st_mtime_ns)
        older = [path for path in map(newest_last, self._checkpoint_dirs()) if path is not None]
        what = f"only {listed([path.name for path in held], 3)}" if held else "no checkpoint"
        advice = (f"Pass one of its checkpoints to go on from it (--ckpt_path {held[-1]})" if held
                  else "Start it again without --ckpt_path")
        raise FileNotFoundError(
            f"--ckpt_path {option}: the newest run, {directory.parent}, holds {what}, no {_LAST}: it stopped before "
            "its first last checkpoint (LastCheckpoint saves every every_n_train_steps steps), or that file was "
            f"deleted. {advice}"
            + (f", or pass an older run's explicitly ({older[0]}): it is not taken in the newest run's place." if older
               else ".") )

    def _best_checkpoint(self) -> Path:
        """The best checkpoint of the newest run, as its ``ModelCheckpoint(monitor=...)`` recorded
        it in the newest checkpoint it saved (no later one can have changed the record)."""
        directory = self._newest_run("best", "test")
        saved = sorted(directory.glob("*.ckpt"), key=lambda path: path.stat().st_mtime_ns)
        last = newest_last(directory)
        if not saved or all(path == last for path in saved):
            raise FileNotFoundError(
                f"--ckpt_path best: the newest run with checkpoints, {directory.parent}, has saved no best checkpoint "
                f"({'only ' + saved[-1].name if saved else 'none at all'}): no validation has run yet, or no "
                "ModelCheckpoint of that run monitors a metric."
                + (f" Pass --ckpt_path last for its last weights ({saved[-1]})." if saved else ""))
        states = torch.load(saved[-1], map_location="cpu", weights_only=True).get("callbacks", {})
        monitors = [c.state_key for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
        recorded = sorted(states, key=lambda key: key not in monitors)
        best = next((states[key]["best_model_path"] for key in recorded if states[key].get("best_model_path")), None)
        path = directory / Path(best).name if best else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"--ckpt_path best: the newest run with checkpoints, {directory.parent}, records "
                f"{Path(best).name + ' (missing)' if best else 'no best checkpoint'} in its newest checkpoint, "
                f"{saved[-1].name}. Pass the path of the .ckpt file you mean."
            )
        return path

    # -- run folders --------------------------------------------------------------------------
    def _claim_run_folder(self, resumed: Optional[str], subcommand: str = "fit") -> None:
        """Fix the logger's version folder before anything writes to it: the resumed run's
        folder, or a new one made with ``mkdir`` (atomic, so a concurrent run gets another).
        Without a logger that numbers its runs, every run saves its config in the trainer's
        ``default_root_dir``: a resumed fit, or a test, validation or prediction of the run
        there, saves it beside the first run's under its own name (they were refused: "holds
        the config an earlier run saved there"); only a new fit over an earlier one is."""
        root = self._versions_root()
        logger = self.trainer.logger
        if root is None and self.trainer.is_global_zero:
            self._share_run_folder(Path(self.trainer.default_root_dir))
            if resumed is not None or subcommand != "fit":
                self._keep_earlier_config(Path(self.trainer.default_root_dir), "resume" if subcommand == "fit" else subcommand)
        if root is None or not self.trainer.is_global_zero:
            return
        if logger._version is not None:
            self._named_run_folder(root, logger._version, resumed, subcommand)
            return
        if resumed is not None and "://" not in str(resumed):
            run = Path(resumed).resolve().parents[1]
            if run.parent == root.resolve() and run.name in _run_folders(root):
                # A numbered run, or one given a version name (which a resume went past into a new
                # version_N, the run's curves split between two folders).
                number = _version_number(run.name)
                logger._version = run.name if number is None else number
                self._go_on_in(run)
                return
        made = [folder for folder in (root, *root.parents) if not folder.exists()]
        version = max(_versions(root), default=-1) + 1
        try:
            root.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    (root / f"version_{version}").mkdir()
                    break
                except FileExistsError:
                    version += 1
        except OSError as error:  # read-only, no space, a file in the way: a traceback from mkdir
            raise OSError(
                f"Cannot make the run's log folder {root / f'version_{version}'}: {error.strerror or error}. Point "
                "--trainer.logger.init_args.save_dir at a folder you can write to.") from error
        logger._version = version
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunFolder):
                callback.path = root / f"version_{version}"
                callback.made = made  # lightning_logs/<name>/ on a first run: removed too if the run fails
        self._mark_training_run(root / f"version_{version}", subcommand)

    def _mark_training_run(self, run: Path, subcommand: str) -> None:
        """A new fit's checkpoint folder, made now: a run killed before its first checkpoint is
        then still the newest run for ``--ckpt_path last`` (which refuses it, as it holds nothing
        to resume), instead of the run before it, whose last checkpoint a resumed fit overwrote."""
        default_folder = any(isinstance(c, ModelCheckpoint) and not c.dirpath for c in self.trainer.checkpoint_callbacks)
        if subcommand == "fit" and default_folder:
            (run / "checkpoints").mkdir(parents=True, exist_ok=True)

    def _named_run_folder(self, root: Path, version: Any, resumed: Optional[str], subcommand: str) -> None:
        """A version the user fixed (``--trainer.logger.init_args.version``) whose folder holds an
        earlier run: a fit resumed from its checkpoint goes on in it (its config saved beside the
        first); anything else is refused before it writes there (the data's setup rewrote the
        run's ``class_split.json`` before the config's save refused, naming a missing logger)."""
        run = root / (version if isinstance(version, str) else f"version_{version}")
        configs = [c.config_filename for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback)]
        if not any((run / name).exists() for name in configs):
            if not run.exists():  # a new run in a folder of its own: removed, with what it made, if it fails
                made = [folder for folder in (run, *run.parents) if not folder.exists()]
                for callback in self.trainer.callbacks:
                    if isinstance(callback, RunFolder):
                        callback.path, callback.made = run, made[1:]
                self._mark_training_run(run, subcommand)
            return
        # A requeued SLURM job (no --ckpt_path, or "hpc") goes on from its HPC checkpoint, in its run folder.
        # (Lightning restores one with no --ckpt_path only under SLURM.)
        requeued = (resumed == "hpc" or (resumed is None and SLURMEnvironment.detect())) \
            and any(Path(self.trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
        if requeued or (resumed is not None and resumed != "hpc" and "://" not in str(resumed)
                        and Path(resumed).resolve().parents[1] == run.resolve()):
            self._go_on_in(run)
            return
        last = newest_last(run / "checkpoints")
        resume = f"; to train that run on, fit with --ckpt_path {last}" if subcommand == "fit" and last else ""
        raise FileExistsError(
            f"--trainer.logger.init_args.version {version}: {run} holds an earlier run (its config, checkpoints and "
            f"class split), which this {subcommand} would write into. Drop the version (each run then gets a new "
            f"version_N folder) or give one not used yet{resume}.")

    def _go_on_in(self, run: Path) -> None:
        """A resumed fit writes into its run's folder: its config saved beside the first."""
        for folder in (run, run / "checkpoints"):
            if not folder.is_dir():
                continue
            try:  # a read-only folder failed in TensorBoard's writer thread, with a traceback
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as error:
                raise OSError(
                    f"Cannot write into the resumed run's folder {folder}: {error.strerror or error}. A resumed fit goes "
                    "on writing there (its logs and checkpoints): make it writable, or copy the run to a folder you "
                    "can write to and resume from the checkpoint there.") from error
        self._share_run_folder(run)
        self._keep_earlier_config(run)
        # Resuming into the run's own folder, its checkpoints are expected there.
        warnings.filterwarnings(
            "ignore", message=rf"Checkpoint directory .*{re.escape(os.sep + run.name + os.sep)}checkpoints exists and is not empty")

    def _share_run_folder(self, folder: Path) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunFolder):
                callback.share(folder)

    def _keep_earlier_config(self, run: Path, tag: str = "resume") -> None:
        """A resumed run (or, without a logger, an evaluation: ``tag`` its subcommand) saves its
        config next to the first run's, under a new name (``config.resume1.yaml``, ``config.test1.yaml``)."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback) and not callback.overwrite:
                name, count = callback.config_filename, 0
                while (run / name).exists():
                    count += 1
                    name = f"{Path(callback.config_filename).stem}.{tag}{count}{Path(callback.config_filename).suffix}"
                callback.config_filename = name


def _version_number(name: str) -> Optional[int]:
    number = name[len("version_"):]
    return int(number) if name.startswith("version_") and number.isdigit() else None


def readable_checkpoint(path: str) -> None:
    """Stop with one line if ``path`` cannot be a checkpoint file: a ``torch.save`` zip archive cut
    short (a run killed while saving: its end, the archive's directory, is missing) or a file of
    another kind (a config, a text file). Lightning's own load reported these from deep inside
    fsspec or the unpickler ("OSError: [Errno 22] Invalid argument", "Weights only load
    failed"). Old non-zip ``torch.save`` pickles pass, for Lightning to load."""
    import zipfile

    with open(path, "rb") as file:
        head = file.read(4)
    size = os.path.getsize(path)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise ValueError(
            f"--ckpt_path {path} is cut short ({size:,} bytes; its end is missing): a run stopped while saving it, "
            "or an incomplete copy. Pass another checkpoint of the run (its checkpoints/ folder), or copy it again.")
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        raise ValueError(
            f"--ckpt_path {path} is not a checkpoint file (a torch.save archive): it starts with {head!r}. Pass a .ckpt "
            "file a run saved (its run folder's checkpoints/), or 'last' or 'best'.")


def _run_activity(directory: Path) -> Optional[int]:
    """When the run of the checkpoint folder ``directory`` last saved (its newest ``.ckpt``), or,
    with none saved yet, when it started (its newest ``config*.yaml``, beside the folder); ``None``
    if ``directory`` is no run's checkpoint folder (an evaluation's run folder has none)."""
    if not directory.is_dir():
        return None
    saved = [path.stat().st_mtime_ns for path in directory.glob("*.ckpt") if path.is_file()]
    if saved:
        return max(saved)
    configs = [path.stat().st_mtime_ns for path in directory.parent.glob("config*.yaml") if path.is_file()]
    return max(configs, default=directory.stat().st_mtime_ns)


def newest_last(directory: Path) -> Optional[Path]:
    """The newest of a checkpoint folder's ``last.ckpt`` and ``last-vN.ckpt``: a fit resumed from
    an earlier checkpoint (``--ckpt_path best``, or a path) writes its last weights to
    ``last-v1.ckpt`` beside the first branch's ``last.ckpt``, and ``last`` means the newest."""
    candidates = [path for path in [directory / _LAST, *directory.glob(f"{Path(_LAST).stem}-v*.ckpt")]
                  if path.is_file() and (path.name == _LAST or path.stem.rpartition("-v")[2].isdigit())]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def _versions(root: Path) -> List[int]:
    if not root.is_dir():
        return []
    numbers = (_version_number(entry.name) for entry in root.iterdir() if entry.is_dir())
    return [number for number in numbers if number is not None]


def _run_folders(root: Path) -> List[str]:
    """The logger's run folders under ``root``: ``version_N`` newest first, then named versions."""
    if not root.is_dir():
        return []
    named = sorted(entry.name for entry in root.iterdir()
                   if entry.is_dir() and not entry.name.startswith(".") and _version_number(entry.name) is None)
    return [f"version_{number}" for number in sorted(_versions(root), reverse=True)] + named


def _names(dirs: List[Path], limit: int = 4) -> str:
    return listed([d.parent.name for d in dirs], limit)


def _quiet_known_warnings() -> None:
    """Filter the warnings of our dependencies that a user can do nothing about, each by its
    exact text (Lightning's docs suggest ``warnings.filterwarnings`` for this)."""
    # Lightning 2.6's own pytree helper builds a LeafSpec, which torch 2.14 deprecates.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def _drop_switched_off_callbacks(trainer: Any) -> None:
    """``--trainer.enable_progress_bar false`` and ``--trainer.enable_checkpointing false`` on a
    config that lists a progress bar or checkpoint callbacks: Lightning's Trainer refuses the
    mix; drop those callbacks instead (said in the log), as the flags ask."""
    from lightning.pytorch.callbacks import Checkpoint, ProgressBar

    callbacks = trainer.get("callbacks")
    off = {flag: kind for flag, kind in (("enable_progress_bar", ProgressBar), ("enable_checkpointing", Checkpoint))
           if trainer.get(flag) is False}
    if not isinstance(callbacks, list) or not off:
        return
    kept = []
    for callback in callbacks:
        cls = _callback_class(callback)
        flag = next((flag for flag, kind in off.items() if isinstance(cls, type) and issubclass(cls, kind)), None)
        if flag is None:
            kept.append(callback)
            continue
        rank_zero_info(f"--trainer.{flag} false: the config's {cls.__name__} callback is left out."
                       + (" No checkpoint is saved: this run cannot be resumed or tested by --ckpt_path last/best."
                          if flag == "enable_checkpointing" else ""))
    trainer["callbacks"] = kept


def _callback_class(callback: Any) -> Optional[type]:
    """The class of a callback as the parser holds it: a ``class_path`` namespace (imported), or
    an instance; ``None`` where the path does not import."""
    if not hasattr(callback, "get"):
        return type(callback)
    module, _, name = str(callback.get("class_path") or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def _user_error(error: Optional[BaseException]) -> Optional[BaseException]:
    """The report of bad input behind ``error``, if that is what it is: a ``ValueError``,
    ``TypeError``, ``OSError``, :class:`NonFiniteError` or :class:`DataFileError` that this package raises
    (with a ``raise`` of its own), or Lightning's
    ``MisconfigurationException``, as is or wrapped by jsonargparse (which re-raises a
    constructor's error as one of its own)."""
    while error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        innermost = Path(frames[-1].filename).resolve() if frames else None
        if isinstance(error, MisconfigurationException):
            if "No supported gpu backend found" in str(error):
                return MisconfigurationException(
                    f"{error} PyTorch sees no GPU here (no CUDA device, no MPS): train with --trainer.accelerator cpu "
                    "(or auto), or on a machine with a GPU and a CUDA build of PyTorch.").with_traceback(error.__traceback__)
            return error
        found = re.match(r"SaveConfigCallback expected (.+) to NOT exist", str(error))
        if isinstance(error, RuntimeError) and found:
            # Lightning's refusal to overwrite the config an earlier run saved in the same folder
            # (no logger, so no version folder of its own): right, but a traceback, and its fixes
            # are Python arguments of LightningCLI.
            where = Path(found.group(1))
            return FileExistsError(
                f"{where} holds the config an earlier run saved there (runs without a logger save theirs in "
                f"the trainer's default_root_dir, {where.parent}); it is kept. Pass --trainer.default_root_dir "
                "with another folder, or a logger (each run then gets its own version folder), or move that file."
            ).with_traceback(error.__traceback__)
        deliberate = bool(frames) and _raised_by_raise_statement(error)  # not a library call failing in our code
        if isinstance(error, (ValueError, TypeError, OSError, NonFiniteError, DataFileError, NotImplementedError)) \
                and deliberate \
                and innermost.is_relative_to(_PACKAGE):
            return error
        if isinstance(error, KeyError) and error.args == (LIGHTNING_VERSION_KEY,) and innermost is not None \
                and "lightning" in innermost.parts:
            # An old (non-zip) pickle the comparison could not read: Lightning's loader fails on it.
            return ValueError(
                f"--ckpt_path: the file is not a Lightning checkpoint (it has no {LIGHTNING_VERSION_KEY!r} entry): a "
                "file saved with torch.save, not by a run. Pass a .ckpt file a run saved, or 'last' or 'best'."
            ).with_traceback(error.__traceback__)
        if isinstance(error, (ValueError, TypeError, ModuleNotFoundError)) and deliberate and innermost is not None \
                and (_LIGHTNING in innermost.parents or _FABRIC in innermost.parents):
            # Lightning's own refusal of a Trainer setting ("`val_check_interval` (10) must be less than or equal
            # to the number of the training batches (8)", "`devices` selected with `CPUAccelerator` should be an
            # int > 0", an accelerator whose package is missing): a message, not a fault.
            return error
        if isinstance(error, ValueError) and deliberate and innermost is not None and _TORCH_OPTIM in innermost.parents:
            # An optimizer's or scheduler's refusal of its arguments ("Invalid learning rate: -1.0").
            return ValueError(
                f"{error} (refused by torch.optim: see --model.init_args.optimizer and "
                "--model.init_args.lr_scheduler)").with_traceback(error.__traceback__)
        if innermost is None or "jsonargparse" not in innermost.parts:
            return None
        error = error.__cause__ or error.__context__
    return None


def _raised_by_raise_statement(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback stopped at a ``raise`` statement (a
    ``ValueError`` our code raises on purpose), not at a call that failed (a builtin or C
    function raising from our line). Read from the bytecode, not the source file, which a user
    may be editing while a run goes on (the line read back is then another one) or which an
    install may lack."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    for instruction in dis.get_instructions(tb.tb_frame.f_code):
        if instruction.offset == tb.tb_lasti:
            return instruction.opname == "RAISE_VARARGS"
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
    return line.startswith("raise ")


def _short_report(error: BaseException) -> str:
    frames = list(traceback.walk_tb(error.__traceback__))
    frame, line = frames[-1]
    owner = frame.f_locals.get("self")
    prefix = f"{type(owner).__name__}: " if frame.f_code.co_name == "__init__" and owner is not None else ""
    where = frame.f_globals.get("__name__", frame.f_code.co_filename)
    return (
        f"error: {prefix}{error}\n"
        f"({type(error).__name__} at {where}:{line}; {TRACEBACK_VARIABLE}=1 shows the traceback)\n"
    )


def build_cli(args: Optional[List[str]] = None, run_folder: Optional[RunFolder] = None,
              callbacks: Sequence[Callback] = ()) -> FewShotCLI:
    """The CLI exactly as ``fewshot-lightning`` builds and runs it on ``args`` (default: the
    command line), with ``callbacks`` added to the trainer's (a benchmark's clock, say)."""
    return FewShotCLI(
        MetaLearner,
        TaskDataModule,
        parser_class=FewShotArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [run_folder or RunFolder(), *callbacks]},
    )


#: Added to an out-of-memory error that reaches the command: what lowers a step's memory.
OUT_OF_MEMORY_NOTE = (
    "fewshot-lightning: out of memory. What a training step holds: for MAML and the learners built on it, every "
    "task's graph until the backward pass; --model.init_args.tasks_per_backward N holds N tasks' at a time (the "
    "same gradient; 'auto', the default, halves the tasks per backward pass when a timed step does not fit). "
    "Otherwise a smaller --data.init_args.meta_batch_size, or fewer queries or inner steps."
)


def main(args: Optional[List[str]] = None) -> None:
    _quiet_known_warnings()
    run_folder = RunFolder()
    try:
        cli = build_cli(args, run_folder)
    except SIGTERMException:
        # Lightning's own stop on SIGTERM (a config without RequeueAtStepEnd, or before the first
        # training batch, when RequeueAtStepEnd takes it over): SystemExit with no code, so the
        # command exited 0, a run that stopped half-way looking finished.
        took_a_step = run_folder.batches > 0
        run_folder.remove_if_unused()  # stopped before any batch: nothing worth keeping in its folder
        if took_a_step:
            sys.stderr.write("fewshot-lightning: stopped by SIGTERM before the run finished; its checkpoints/last.ckpt "
                             "holds the last periodic save. Resume with the same command and --ckpt_path last.\n")
        else:
            sys.stderr.write("fewshot-lightning: stopped by SIGTERM before its first training step: this run saved "
                             "nothing (a new run's folder is removed). Run the same command again.\n")
        raise SystemExit(SIGTERM_EXIT) from None
    except Exception as error:
        run_folder.remove_if_unused()
        reported = _user_error(error)
        if reported is None or os.environ.get(TRACEBACK_VARIABLE):
            # Unless it already says so (MAML's own, raised when no group size fits, does).
            said = [str(error), *getattr(error, "__notes__", ())]
            if out_of_memory(error) and not any("tasks_per_backward" in text for text in said):
                error.add_note(OUT_OF_MEMORY_NOTE)
            raise
        sys.stderr.write(_short_report(reported))
        raise SystemExit(1) from None
    stopped = [(callback.stopped_by_sigterm_at, callback.stopped_by_signal)
               for callback in getattr(cli.trainer, "callbacks", [])
               if isinstance(callback, RequeueAtStepEnd) and callback.stopped_unplanned]
    if stopped:
        step, received = stopped[0]
        saved = any(isinstance(callback, LastCheckpoint) for callback in cli.trainer.callbacks)
        sys.stderr.write(
            f"fewshot-lightning: stopped by {'Ctrl-C' if received == signal.SIGINT else received.name} at the end of step "
            f"{step}, before the run finished; "
            + ("checkpoints/last.ckpt holds that step" if saved else "no LastCheckpoint callback saved that step")
            + ". Resume with the same command and --ckpt_path last.\n")
        raise SystemExit(SIGINT_EXIT if received == signal.SIGINT else SIGTERM_EXIT)


if __name__ == "__main__":
    main()
