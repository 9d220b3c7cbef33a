"""A learner and its DataModule must agree before anything runs. The kind of task: a learner
given tasks it does not solve (ProtoNet on regression, CNP on images) stops at setup naming
both, instead of failing deep in its backbone. The MAML family's class scores and the
episodes' ways: fewer scores fail with a message naming both options (instead of
cross-entropy's "Target 5 is out of bounds" mid-step, or a device-side assert on a GPU); more
train, with a warning."""
import warnings

import lightning as L
import torch
import pytest
from lightning.pytorch.callbacks import Callback

from fewshot_lightning.algorithms import CAVIA, CNP, MAML, AttentionLearner, MatchingNet, ProtoNet, RelationNet
from fewshot_lightning.data import EpisodicDataModule, SinusoidDataModule
from fewshot_lightning.models import MLP, Conv4, FiLMConv4, RelationEmbedding
from test_episodes import identity_data


class Steps(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1

    def on_test_batch_start(self, *args) -> None:
        self.batches += 1


def start(model, datamodule, stage="fit"):
    """Run ``stage`` (one training step at most, no validation); ``start.batches``: the batches
    that started, even when it raised."""
    steps = Steps()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[steps])
    try:
        getattr(trainer, stage)(model, datamodule)
    finally:
        start.batches = steps.batches


def run(out_features, stage="fit", **episodes):
    """MAML with ``out_features`` class scores on ``episodes``; returns the class-score warnings."""
    data, labels = identity_data()
    datamodule = EpisodicDataModule(data, labels, shots=1, queries=1, meta_batch_size=2, train_tasks=2,
                                    val_tasks=2, test_tasks=2, num_workers=0, **episodes)
    model = MAML(MLP(in_features=2, hidden=[8], out_features=out_features), inner_lr=0.1, batching="loop")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            start(model, datamodule, stage)
        finally:
            run.batches = start.batches
    return [str(w.message) for w in warned if "class scores" in str(w.message)]


def test_fewer_scores_than_training_ways_stop_fit_before_a_step():
    with pytest.raises(ValueError, match=r"MAML's backbone outputs 3 class scores, but the training episodes are "
                                         r"5-way \(ways = 5\): labels 3 to 4 have no score\. Either build the "
                                         r"backbone with out_features=5 .*or ask for 3-way episodes"):
        run(3, ways=5)
    assert run.batches == 0


def test_test_ways_are_checked_at_fit_and_at_test():
    # Validation and test episodes take test_ways: at fit (validation) and at test.
    with pytest.raises(ValueError, match=r"the validation episodes are 5-way \(test_ways = 5\)"):
        run(3, ways=3, test_ways=5)
    assert run.batches == 0
    with pytest.raises(ValueError, match=r"the test episodes are 5-way \(test_ways = 5\)"):
        run(3, stage="test", ways=3, test_ways=5)
    assert run.batches == 0


def test_more_scores_than_ways_warn_once_and_train():
    warned = run(5, ways=3)
    assert run.batches == 1
    assert len(warned) == 1  # training and validation episodes are both 3-way: one warning
    assert "outputs 5 class scores for 3-way training episodes (ways = 3): the other 2 are never a target" in warned[0]
    assert run(3, ways=3) == [] and run.batches == 1


def test_class_scores_from_output_shape_or_head():
    assert MAML(MLP(in_features=2, out_features=7), inner_lr=0.1).class_scores() == 7  # output_shape
    # CAVIA's image network has no output_shape: its linear head says.
    assert CAVIA(FiLMConv4(out_features=6, hidden=8), inner_lr=0.1).class_scores() == 6


@pytest.mark.parametrize("learner", ["ProtoNet", "MatchingNet", "RelationNet", "AttentionLearner"])
def test_classifiers_refuse_regression_tasks(learner):
    model = {
        "ProtoNet": lambda: ProtoNet(Conv4(out_features=None, hidden=8, track_running_stats=True)),
        "MatchingNet": lambda: MatchingNet(Conv4(out_features=None, hidden=8, track_running_stats=True)),
        "RelationNet": lambda: RelationNet(RelationEmbedding(hidden=8, image_size=16), relation_channels=8, relation_hidden=4),
        "AttentionLearner": lambda: AttentionLearner(Conv4(out_features=None, hidden=8, track_running_stats=True)),
    }[learner]()
    with pytest.raises(ValueError, match=rf"^{learner} solves classification tasks \(integer labels\), but "
                                         r"SinusoidDataModule makes regression tasks \(float targets\)\. Use a "
                                         r"DataModule of classification tasks, or a learner for regression: the MAML "
                                         r"family .* or CNP\.$"):
        start(model, SinusoidDataModule(meta_batch_size=2, train_tasks=2, val_tasks=2, num_workers=0))
    assert start.batches == 0


def test_cnp_refuses_classification_tasks_and_maml_solves_both():
    data, labels = identity_data()
    episodes = EpisodicDataModule(data, labels, ways=3, shots=1, queries=1, meta_batch_size=2, train_tasks=2,
                                  val_tasks=2, num_workers=0)
    with pytest.raises(ValueError, match=r"^CNP solves regression tasks \(float targets\), but EpisodicDataModule "
                                         r"makes classification tasks \(integer labels\)\."):
        start(CNP(MLP(in_features=2, hidden=[8], out_features=8)), episodes)
    assert start.batches == 0
    start(MAML(MLP(in_features=2, hidden=[8], out_features=3), inner_lr=0.1, batching="loop"), episodes)
    assert start.batches == 1
    start(MAML(MLP(), inner_lr=0.1, batching="loop"),
              SinusoidDataModule(meta_batch_size=2, train_tasks=2, val_tasks=2, num_workers=0))
    assert start.batches == 1


@pytest.mark.parametrize("learner, backbone, fix", [
    ("MAML", lambda: Conv4(in_channels=1, hidden=8, image_size=84, out_features=3), "image_size 16"),
    ("ProtoNet", lambda: Conv4(in_channels=3, hidden=8, image_size=16, out_features=None, track_running_stats=True),
     "in_channels 1"),
    ("CAVIA", lambda: FiLMConv4(in_channels=3, hidden=8, image_size=32, out_features=3), "in_channels 1 and "
     "--model.init_args.backbone.init_args.image_size 16"),
])
def test_samples_of_another_shape_stop_at_the_first_batch_naming_the_arguments(learner, backbone, fix):
    # 16x16 grey images; the backbone was built for other ones. Before, a Conv4 with a head
    # failed in it ("mat1 and mat2 shapes cannot be multiplied"), the others in a convolution.
    images, labels = torch.rand(120, 1, 16, 16), torch.arange(20).repeat_interleave(6)
    datamodule = EpisodicDataModule(images, labels, ways=3, shots=1, queries=1, meta_batch_size=2,
                                    train_tasks=2, val_tasks=2, split_fractions=(0.6, 0.2, 0.2), num_workers=0)
    kwargs = {"inner_lr": 0.1} if learner != "ProtoNet" else {}
    model = {"MAML": MAML, "ProtoNet": ProtoNet, "CAVIA": CAVIA}[learner](backbone(), **kwargs)
    with pytest.raises(ValueError, match=rf"^{learner}'s backbone \w+ was built for samples of shape "
                                         rf"\[.*\], but the batches hold samples of shape \[1, 16, 16\]: build it "
                                         rf"with --model.init_args.backbone.init_args.{fix}, or"):
        start(model, datamodule)
    assert start.batches == 1  # the check runs at the first batch's start, before its step


@pytest.mark.parametrize("images, said", [
    # [N, H, W, C] uint8 images (numpy's and PIL's order) were read as H channels of W x C maps:
    # "build it with in_channels 28 and image_size 1", advice that cannot work.
    (lambda: torch.randint(0, 256, (120, 16, 16, 1), dtype=torch.uint8),
     r"takes images as \[channels, height, width\] \[1, 16, 16\], but the batches hold them channels-last, "
     r"\[16, 16, 1\] \(\[height, width, channels\]\): give them channels first, e\.g\. `images\.permute\(0, 3, 1, 2\)` "
     r"on an \[N, H, W, C\] array of images\.$"),
    (lambda: torch.rand(120, 16, 16, 3),
     r"takes images .* channels-last, \[16, 16, 3\] .* array of images; and build the backbone for 3 channel\(s\) \(it takes 1\)\.$"),
    # Integer images other than uint8 stopped at the first step with PyTorch's "Input type (long
    # int) and bias type (float) should be the same".
    (lambda: torch.randint(0, 256, (120, 1, 16, 16)),
     r"computes in floating point, but the samples are torch\.int64: give images as uint8 \(0 to 255, scaled to "
     r"\[0, 1\] for you\) or as floats"),
])
def test_channels_last_or_integer_images_stop_at_the_first_batch_with_the_fix(images, said):
    labels = torch.arange(20).repeat_interleave(6)
    datamodule = EpisodicDataModule(images(), labels, ways=3, shots=1, queries=1, meta_batch_size=2,
                                    train_tasks=2, val_tasks=2, split_fractions=(0.6, 0.2, 0.2), num_workers=0)
    model = MAML(Conv4(in_channels=1, hidden=8, image_size=16, out_features=3), inner_lr=0.1, batching="loop")
    with pytest.raises(ValueError, match=r"^MAML's backbone Conv4 " + said):
        start(model, datamodule)


def test_strided_conv4_takes_any_image_size():
    # Conv4(max_pool=False) ends in a spatial mean: only the channels are checked.
    assert Conv4(in_channels=3, max_pool=False).input_shape == (3, None, None)
    model = MAML(Conv4(in_channels=1, hidden=8, max_pool=False, out_features=3), inner_lr=0.1, batching="loop")
    images, labels = torch.rand(120, 1, 20, 20), torch.arange(20).repeat_interleave(6)
    start(model, EpisodicDataModule(images, labels, ways=3, shots=1, queries=1, meta_batch_size=2, train_tasks=2,
                                        val_tasks=2, split_fractions=(0.6, 0.2, 0.2), num_workers=0))
    assert start.batches == 1


def test_a_sequential_backbone_ending_in_a_linear_layer_is_checked_too():
    # A plain nn.Sequential has no output_shape or head: 2 scores for 3-way episodes stopped at
    # the first step with cross-entropy's "Target 2 is out of bounds", 5 trained silently.
    from torch import nn

    data, labels = identity_data()

    def fit(out_features):
        datamodule = EpisodicDataModule(data, labels, ways=3, shots=1, queries=1, meta_batch_size=2, train_tasks=2,
                                        val_tasks=2, test_tasks=2, num_workers=0)
        model = MAML(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, out_features)), inner_lr=0.1)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            start(model, datamodule, "fit")
        return [str(w.message) for w in warned if "class scores" in str(w.message)]

    with pytest.raises(ValueError, match=r"outputs 2 class scores, but the training episodes are 3-way "
                                         r"\(ways = 3\): label 2 has no score"):
        fit(2)
    assert start.batches == 0
    assert any("5 class scores" in message for message in fit(5))
    assert fit(3) == []
