"""Every shipped config builds through the command line, so that none can rot: LightningCLI with
``run=False`` parses it (types and argument names checked), then constructs its Trainer, model
and DataModule (no data is read: the datasets are not on a CI machine), and the model takes a
training step on a random episode of the config's shape. The MAML configs are checked against
the original code's conventions (cbfinn/maml): the paper's inner step on our loss, batch norm
left out of the inner loop, the outer-gradient clip on our loss scale, K queries per class."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn
from torch.func import functional_call

from fewshot_lightning.algorithms import MAML, MetaLearner
from fewshot_lightning.cli import FewShotCLI
from fewshot_lightning.data import ClassificationDataModule, TaskBatch, TaskDataModule
from fewshot_lightning.data.datasets import (
    CIFARFSDataModule, FC100DataModule, ImageFolderDataModule, KanjiDataModule, MiniImageNetDataModule,
    OmniglotDataModule, TieredImageNetDataModule,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(path.stem for path in CONFIGS.glob("*.yaml"))
# Arguments a config leaves to the command line, as its header says.
REQUIRED = {"protonet_folder": ["--data.init_args.root", "path/to/folder"]}


def build(name: str) -> FewShotCLI:
    return FewShotCLI(
        MetaLearner, TaskDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        auto_configure_optimizers=False, args=["--config", str(CONFIGS / f"{name}.yaml"), *REQUIRED.get(name, [])],
    )


def image_shape(data: TaskDataModule):
    """(channels, side) of the images a classification DataModule serves."""
    if isinstance(data, (MiniImageNetDataModule, TieredImageNetDataModule)):
        return 3, 84
    if isinstance(data, (CIFARFSDataModule, FC100DataModule)):
        return 3, 32
    if isinstance(data, (OmniglotDataModule, KanjiDataModule)):
        return 1, data.image_size
    if isinstance(data, ImageFolderDataModule):
        return data.channels, data.image_size
    raise AssertionError(f"{type(data).__name__}: add the shape of its images to image_shape() in this test.")


def random_episode(ways: int, shots: int, channels: int, side: int, seed: int = 0) -> TaskBatch:
    """One task of ``ways`` classes with ``shots`` support and one query image each."""
    generator = torch.Generator().manual_seed(seed)
    support = torch.rand(1, ways * shots, channels, side, side, generator=generator)
    query = torch.rand(1, ways, channels, side, side, generator=generator)
    return TaskBatch(support, torch.arange(ways).repeat(shots)[None], query, torch.arange(ways)[None])


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing should be written, and nothing lands in the checkout if it is
    monkeypatch.setattr("sys.argv", ["fewshot-lightning"])  # the arguments are `args`, not pytest's


@pytest.mark.parametrize("name", NAMES)
def test_every_config_builds_and_its_model_trains_on_its_episode_shape(name):
    cli = build(name)
    model, data = cli.model, cli.datamodule
    assert isinstance(cli.trainer, Trainer) and isinstance(model, MetaLearner) and isinstance(data, TaskDataModule)
    if not isinstance(data, ClassificationDataModule):
        return  # sinusoid regression and navigation goals: their configs run end to end in their own tests
    channels, side = image_shape(data)
    if getattr(model, "batching", "fixed") is None:
        model.batching = "vmap"  # "auto" would time both batchings on this first batch: speed only
    if hasattr(model, "inner_steps"):
        model.inner_steps = min(model.inner_steps, 2)  # the configured steps, at most two: speed only
    train_ways, test_ways = data.episode_shape["train"][0], data.episode_shape["test"][0]
    batch = random_episode(train_ways, 1, channels, side)
    losses, _ = model.training_losses(batch)
    losses.mean().backward()
    assert losses.shape == (1,) and torch.isfinite(losses).all()
    # Every trainable tensor gets a gradient (MAML++'s per-step batch-norm tables replace the
    # backbone's batch-norm weights, whose requires_grad is off).
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert any(p.requires_grad for p in model.backbone.parameters())
    # A head sized for the training ways must also fit the test episodes (ProtoNet trains wider).
    outputs = model(random_episode(test_ways, 1, channels, side, seed=1))
    assert outputs.shape == (1, test_ways, test_ways)


# The paper's inner step (Finn et al. 2017, appendix A.1) of each MAML config built on its code.
PAPER_INNER_LR = {
    "maml_omniglot": 0.4, "maml_omniglot_20way": 0.1, "maml_miniimagenet": 0.01,
    "maml_tiered_imagenet": 0.01, "maml_cifar_fs": 0.01, "maml_fc100": 0.01,
}


@pytest.mark.parametrize("name", sorted(PAPER_INNER_LR))
def test_maml_configs_take_the_original_inner_step_and_leave_batch_norm_to_the_outer_loop(name):
    cli = build(name)
    model, data = cli.model, cli.datamodule
    assert isinstance(model, MAML)
    ways = data.episode_shape["train"][0]
    channels, side = image_shape(data)
    batch = random_episode(ways, 2, channels, side)  # K = 2: the original divides by K, so K must show
    backbone = model.backbone
    batch_norm = {f"{m}.{p}" for m, module in backbone.named_modules() if isinstance(module, nn.BatchNorm2d)
                  for p, _ in module.named_parameters()}
    assert batch_norm and set(model.adapt_names) == {n for n, _ in backbone.named_parameters()} - batch_norm

    # The original's inner step (cbfinn/maml): xent = softmax cross-entropy / K per support image,
    # a vector loss whose gradient tf.gradients sums, then theta - alpha * grad, on the weights
    # it passes around (conv and head), batch norm untouched.
    params = {n: p.detach().clone().requires_grad_(n in model.adapt_names) for n, p in backbone.named_parameters()}
    logits = functional_call(backbone, params, (batch.support_x[0],))
    summed = F.cross_entropy(logits, batch.support_y[0], reduction="sum") / 2
    grads = dict(zip(model.adapt_names, torch.autograd.grad(summed, [params[n] for n in model.adapt_names])))
    adapted = model.adapt(batch.support_x, batch.support_y, steps=1)
    for n in model.adapt_names:
        expected = params[n] - PAPER_INNER_LR[name] * grads[n]
        torch.testing.assert_close(adapted[n][0].detach(), expected.detach(), rtol=1e-4, atol=1e-6, msg=n)
        assert not torch.equal(expected, params[n]), n  # the step moved it: the comparison can fail


@pytest.mark.parametrize("name", sorted(PAPER_INNER_LR))
def test_maml_configs_clip_and_evaluate_as_the_original(name):
    cli = build(name)
    data, trainer = cli.datamodule, cli.trainer
    ways, shots, queries = data.episode_shape["train"]
    # main.py draws 2K images per class at test: K support and K query.
    assert data.episode_shape["test"] == (ways, shots, shots)
    if name.startswith("maml_omniglot"):
        # 2K per class in training too, and no clip (maml.py clips mini-ImageNet only).
        assert queries == shots and trainer.gradient_clip_val is None
        assert cli.model.backbone.max_pool is False  # stride-2 convolutions, MAML's Omniglot network
        return
    # maml.py clips each element of the gradient of sum(xent) / B = (N*Q/K) x our mean loss to
    # [-10, 10]: on our loss, 10 * K / (N * Q).
    assert queries == 15 and trainer.gradient_clip_algorithm == "value"
    assert trainer.gradient_clip_val == pytest.approx(10 * shots / (ways * queries), rel=1e-4)


def test_maml_omniglot_configs_test_with_the_papers_inner_steps():
    # Finn et al., appendix A.1: 5-way "evaluated using 3 gradient steps", 20-way "trained and
    # evaluated with 5 gradient steps".
    assert build("maml_omniglot").model.test_inner_steps == 3
    assert build("maml_omniglot_20way").model.test_inner_steps == 5


@pytest.mark.parametrize("name", ["maml_omniglot", "maml_omniglot_20way", "reptile_omniglot", "reptile_omniglot_20way",
                                  "imaml_omniglot", "imaml_omniglot_20way"])
def test_maml_and_reptile_omniglot_configs_split_characters_at_random_as_their_code(name):
    # cbfinn/maml and openai/supervised-reptile shuffle all characters irrespective of alphabet
    # (MAML: 1,100 train, 100 val, 423 test); these configs ran Vinyals' lists, whose test is
    # mostly unseen alphabets, and said it was the papers' setting.
    data = build(name).datamodule
    assert (data.split, data.split_sizes) == ("random", (1100, 100, 423))


@pytest.mark.parametrize("name", ["imaml_omniglot", "imaml_omniglot_20way"])
def test_imaml_omniglot_configs_draw_k_queries_a_class_as_its_tasks(name):
    # imaml_dev's tasks are "a support and query set with K images each"; the configs drew 15
    # queries a class, which under transductive batch norm changes the accuracy itself.
    data = build(name).datamodule
    ways, shots, queries = data.episode_shape["test"]
    assert queries == shots == 1 and data.episode_shape["train"][2] == 1


def test_mamlpp_omniglot_config_splits_and_rotates_as_the_authors_code():
    # HowToTrainYourMAMLPytorch: train_val_test_split [0.70918, 0.03081, 0.26063] of the 1,623
    # characters after a seeded shuffle (int() of the bounds: 1,150 / 50 / 423); training turns a
    # task's classes by random quarter turns, evaluation is upright (augment_images only in
    # training). The config ran Vinyals' lists with rotated test classes.
    data = build("mamlpp_omniglot_20way").datamodule
    fractions = [0.70918052988, 0.03080714725, 0.2606284658]
    bounds = [int(fractions[0] * 1623), int((fractions[0] + fractions[1]) * 1623), 1623]
    assert data.split_sizes == (bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1]) == (1150, 50, 423)
    assert data.split == "random" and data.train_rotations and not data.eval_rotations
    assert data.episode_shape["train"] == data.episode_shape["test"] == (20, 1, 1)
